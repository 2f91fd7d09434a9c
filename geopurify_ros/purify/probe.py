"""`geopurify-probe`: linear probe of frozen per-voxel features (is a teacher worth distilling?).

Rooms come from `rooms.room_cloud` (catalogue meshes sampled without rendering), voxelised at 5 cm with
mean position / colour and the majority class. A linear classifier (softmax regression on standardised
features) is trained on the labelled rooms of training seeds (>= 1000) and scored on evaluation seeds
0-9 (mIoU per seed over the classes present, then the mean; per-class IoU pooled over seeds).
Features compared: hand-made geometry + colour (`handmade_features`), and any teacher checkpoint.
Labels are used here only, never by `geopurify-train` / `geopurify-pretrain-teacher`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .geometry import VoxelGrid, colour_stats, colors_float, edge_list, normals_curvature
from .rooms import EVAL_SEEDS, check_training_seed, room_cloud, voxel_labels


def voxel_room(seed: int, voxel_size: float = 0.05, ignore: int = 65535):
    """(xyz (V,3) float32, colours (V,3) uint8, labels (V,) int64) of a room voxelised at `voxel_size`."""
    xyz, rgb, lab = room_cloud(seed)
    inv, vlab = voxel_labels(xyz, lab, voxel_size, ignore)
    m = vlab.shape[0]
    cnt = np.bincount(inv, minlength=m)[:, None]
    vx = np.zeros((m, 3))
    vc = np.zeros((m, 3))
    np.add.at(vx, inv, xyz)
    np.add.at(vc, inv, rgb.astype(np.float64))
    return (torch.from_numpy((vx / cnt).astype(np.float32)), torch.from_numpy(np.round(vc / cnt).astype(np.uint8)),
            torch.from_numpy(vlab))


def handmade_features(xyz: torch.Tensor, colors: torch.Tensor, voxel_size: float = 0.05) -> torch.Tensor:
    """(N,15): colour, local colour mean and std, |n_z|, |n_x|+|n_y| (verticality), curvature, occupancy,
    height above the floor (2nd percentile of z) and its square — what a geometry + colour hand design sees."""
    nb = VoxelGrid(xyz, voxel_size).neighbours()
    edges = edge_list(nb)
    n, curv = normals_curvature(xyz, nb, edges=edges)
    c = colors_float(colors)
    mean, std = colour_stats(c, nb, edges=edges)
    occ = (nb >= 0).float().sum(1, keepdim=True) / 26.0
    h = xyz[:, 2:3] - torch.quantile(xyz[:, 2], 0.02)
    return torch.cat([c, mean, std, n[:, 2:3].abs(), n[:, :2].abs().sum(1, keepdim=True), curv[:, None], occ,
                      h, h * h], 1)


def features_for(name: str, xyz, colors, teacher=None) -> torch.Tensor:
    if name == "handmade":
        return handmade_features(xyz, colors)
    with torch.no_grad():
        return teacher.embed(xyz, colors).float()


def fit_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 300, lr: float = 0.05,
               seed: int = 0) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Softmax regression on standardised features (full batch Adam); returns (layer, mean, std)."""
    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    xs = (x - mu) / sd
    lin = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=1e-5)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xs), y)
        loss.backward()
        opt.step()
    return lin, mu, sd


def miou(conf: np.ndarray) -> tuple[float, np.ndarray]:
    tp = np.diag(conf)
    gt, pr = conf.sum(1), conf.sum(0)
    present = gt > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(present, tp / np.maximum(gt + pr - tp, 1), np.nan)
    return float(np.nanmean(iou)), iou


def probe(feature_sets: dict, train_seeds, test_seeds, class_names, ignore: int = 65535, progress=True) -> dict:
    """feature_sets: name -> teacher (or None for 'handmade'). Returns {name: {miou_mean, per_seed, per_class}}."""
    train_seeds = [check_training_seed(s) for s in train_seeds]
    rooms = {s: voxel_room(s, ignore=ignore) for s in list(train_seeds) + list(test_seeds)}
    c = len(class_names)
    out = {}
    for name, teacher in feature_sets.items():
        t0 = time.time()
        feats = {s: features_for("handmade" if teacher is None else name, rooms[s][0], rooms[s][1], teacher)
                 for s in rooms}
        xs = torch.cat([feats[s][rooms[s][2] != ignore] for s in train_seeds])
        ys = torch.cat([rooms[s][2][rooms[s][2] != ignore] for s in train_seeds])
        lin, mu, sd = fit_linear(xs, ys, c)
        per_seed, total = {}, np.zeros((c, c), np.int64)
        for s in test_seeds:
            ok = rooms[s][2] != ignore
            with torch.no_grad():
                pred = lin((feats[s][ok] - mu) / sd).argmax(1).numpy()
            conf = np.zeros((c, c), np.int64)
            np.add.at(conf, (rooms[s][2][ok].numpy(), pred), 1)
            total += conf
            per_seed[s] = round(miou(conf)[0], 4)
        _, iou = miou(total)
        out[name] = {"miou_mean": round(float(np.mean(list(per_seed.values()))), 4), "per_seed": per_seed,
                     "per_class_pooled": {class_names[i]: round(float(iou[i]), 4) for i in range(c)
                                          if not np.isnan(iou[i])},
                     "dim": int(xs.shape[1]), "train_voxels": int(xs.shape[0]), "seconds": round(time.time() - t0, 1)}
        if progress:
            print(f"{name}: mIoU {100 * out[name]['miou_mean']:.1f} (D={xs.shape[1]})", file=sys.stderr)
    return out


def markdown(res: dict) -> str:
    names = list(res)
    classes = sorted({k for r in res.values() for k in r["per_class_pooled"]})
    lines = ["| features | D | mIoU (mean of seeds) | " + " | ".join(classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for n in names:
        r = res[n]
        lines.append(f"| {n} | {r['dim']} | {100 * r['miou_mean']:.1f} | "
                     + " | ".join(f"{100 * r['per_class_pooled'].get(k, float('nan')):.1f}" for k in classes) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ..data.classes import class_names
    from .teacher import load_teacher

    ap = argparse.ArgumentParser(prog="geopurify-probe", description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", action="append", default=[], metavar="NAME=CHECKPOINT",
                    help="teacher checkpoint to probe (repeatable); hand-made features are always probed")
    ap.add_argument("--train-seeds", default="1000-1007")
    ap.add_argument("--test-seeds", default="0-9")
    ap.add_argument("--out", default=None, help="write probe.json / probe.md here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ..eval.ablation import parse_seeds

    try:
        sets = {"handmade": None}
        for item in a.teacher:
            name, _, path = item.partition("=")
            sets[name] = load_teacher(path)
        res = probe(sets, parse_seeds(a.train_seeds), parse_seeds(a.test_seeds), list(class_names()))
    except (ValueError, FileNotFoundError) as exc:
        print(f"geopurify-probe: error: {exc}", file=sys.stderr)
        return 2
    md = markdown(res)
    print(md)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe.json").write_text(json.dumps({"args": vars(a), "results": res}, indent=1))
        (Path(a.out) / "probe.md").write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
