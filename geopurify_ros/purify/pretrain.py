"""`geopurify-pretrain-teacher`: self-supervised pre-training of the multi-scale teacher on mesh-sampled rooms.

Data: `rooms.room_cloud(seed)` for seeds >= 1000 (catalogue meshes placed in randomised rooms by the demo
generator, sampled without rendering; labels are never read). Objective (PointContrast / MSC family, at
every scale of the U-Net): two augmented views of a crop (`train.make_view`: rotation about z + tilt,
scaling, jitter, colour jitter, independent crops, random grid phase), with complementary colour masks on
30 cm cells (MSC: each view sees the colour of the cells the other view had masked, so embeddings must
come from geometry and context); symmetric InfoNCE between the embeddings of the fine voxels, the 15 cm
cells and the 45 cm cells that hold the same source points, negatives nearer than a per-level exclusion
radius masked out.

Optional **segment contrast** (`--segment-weight`): at the fine level, voxels of the same label-free surface segment
(`segments.surface_segments`: normals, tangent planes and colour of the un-augmented cloud) are positives across the
two views and voxels of other segments, including one right across the segment border, are negatives. It asks the
fine embedding for what pooling needs and the objective above never asks for: two voxels 5 cm apart on different
surfaces must differ. `--init` fine-tunes a teacher instead of starting from scratch.

Runs in the background with periodic checkpoints: `<out>/teacher.pt` (latest), `<out>/teacher.json`
(command, data, seeds, metrics so far) and `<out>/pretrain_log.jsonl`; `--minutes` bounds the wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .geometry import VoxelGrid
from .rooms import check_training_seed, room_cloud
from .segments import point_segments
from .teacher import MultiScaleTeacher, MultiScaleTeacherConfig, load_teacher
from .train import info_nce, make_view


@dataclass
class PretrainConfig:
    out: str = "build/teacher_v2"
    rooms: int = 48                      # room seeds first_seed .. first_seed + rooms - 1
    first_seed: int = 1000
    steps: int = 4000
    minutes: float = 60.0                # wall-time bound; the schedule is stretched to `steps`
    seed: int = 0
    crop: float = 1.25                   # half-size (m) of the square crop
    lr: float = 2e-3
    pairs: tuple = (1024, 512, 128)      # InfoNCE pairs per level
    exclusion: tuple = (0.15, 0.4, 1.0)  # negatives nearer than this (m) are masked, per level
    weights: tuple = (1.0, 0.5, 0.5)
    temperature: float = 0.1
    mask_cell: float = 0.3               # MSC colour-mask cell (m); 0 disables masking
    save_every: int = 100
    threads: int = 1
    widths: tuple = (32, 64, 96)
    embed_dim: int = 64
    density: float = 1000.0              # surface samples per m^2
    rooms_list: list = field(default_factory=list)
    init: str = ""                       # teacher checkpoint to fine-tune ("" = from scratch)
    segment_weight: float = 0.0          # weight of the fine-level segment contrast (0 = off)
    segment_pairs: int = 1024            # anchors per step, half of them on segment borders


def _complementary_colour_masks(va, vb, cell: float, rng: np.random.Generator) -> None:
    """Grey out the colour of random `cell`-sized blocks (original frame) in view A and of the others in B."""
    salt = rng.integers(1 << 30, size=3)
    for v, keep_bit in ((va, 0), (vb, 1)):
        ijk = np.floor(v.orig.numpy() / cell).astype(np.int64)
        h = (ijk * np.array([73856093, 19349663, 83492791]) ^ salt).sum(1)
        bit = (h * 2654435761 >> 7) & 1
        v.colors[torch.from_numpy(bit != keep_bit)] = 0.5


def _pairs(va, vb, both: np.ndarray, parents_a, parents_b, n: int, rng: np.random.Generator, level: int):
    """Matched (index in A, index in B) at `level` (0 = fine voxels) for source points `both`, one per A unit."""
    ia, ib = va.voxel_of[both], vb.voxel_of[both]
    for lv in range(level):
        ia, ib = parents_a[lv][ia], parents_b[lv][ib]
    ua, first = np.unique(ia, return_index=True)
    ub = ib[first]
    if ua.size > n:
        k = rng.choice(ua.size, n, replace=False)
        ua, ub = ua[k], ub[k]
    return torch.from_numpy(ua), torch.from_numpy(ub)


def _level_pos(v, parents, level: int) -> torch.Tensor:
    """Original-frame positions of the units of `level` (mean of their fine voxels)."""
    pos = v.orig
    for lv in range(level):
        p = parents[lv]
        m = int(p.max()) + 1
        cnt = torch.zeros(m).index_add_(0, p, torch.ones(p.numel()))
        pos = torch.zeros(m, 3).index_add_(0, p, pos) / cnt[:, None]
    return pos


def segment_nce(za: torch.Tensor, zb: torch.Tensor, va, vb, seg: np.ndarray, border: np.ndarray, both: np.ndarray,
                n: int, temperature: float, voxel_size: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Fine-level segment contrast between views A and B (module docstring); (loss, top-1 of the positive).

    Anchors: n source points seen by both views, half on segment borders; positive: the B-view voxel of a random
    point of the anchor's segment; negatives: the other anchors' positives from other segments (same-segment ones
    are masked) plus, for border anchors, an A-view 26-neighbour voxel of another segment."""
    cand = both[seg[both] >= 0]
    if cand.size < 64:
        return za.new_zeros(()), float("nan")
    on_border = cand[border[cand]]
    k = min(n // 2, on_border.size)
    anchors = np.concatenate([rng.choice(on_border, k, replace=False) if k else on_border[:0],
                              rng.choice(cand, n - k, replace=cand.size < n - k)])
    order = cand[np.argsort(seg[cand], kind="stable")]
    sseg = seg[order]
    lo, hi = np.searchsorted(sseg, seg[anchors], "left"), np.searchsorted(sseg, seg[anchors], "right")
    partner = order[lo + (rng.random(anchors.size) * (hi - lo)).astype(np.int64)]
    ia, ib = torch.from_numpy(va.voxel_of[anchors]), torch.from_numpy(vb.voxel_of[partner])
    ea, eb = za[ia], zb[ib]
    sa = torch.from_numpy(seg[anchors])
    logits = (ea @ eb.T) / temperature
    same = sa[:, None] == sa[None, :]
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    # hard negative: an A-view neighbour voxel of another (trusted) segment
    vseg = np.full(za.shape[0], -1, np.int64)
    seen = va.voxel_of >= 0
    vseg[va.voxel_of[seen]] = seg[seen]
    vseg = torch.from_numpy(vseg)
    nb = VoxelGrid(va.xyz, voxel_size).neighbours()[ia]                   # (n, 26)
    nseg = torch.where(nb >= 0, vseg[nb.clamp(min=0)], -1)
    other = (nseg >= 0) & (nseg != sa[:, None])
    pick = (torch.rand(other.shape) * other).argmax(1)
    j = nb.gather(1, pick[:, None]).squeeze(1)
    hard = ((ea * za[j.clamp(min=0)]).sum(1) / temperature).masked_fill(~other.any(1), float("-inf"))
    logits = torch.cat([logits, hard[:, None]], 1)
    target = torch.arange(anchors.size)
    with torch.no_grad():
        top1 = float((logits.argmax(1) == target).float().mean())
    return torch.nn.functional.cross_entropy(logits, target), top1


def pretrain(cfg: PretrainConfig, argv: list[str] | None = None, progress: bool = True) -> dict:
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [check_training_seed(s) for s in (cfg.rooms_list or range(cfg.first_seed, cfg.first_seed + cfg.rooms))]
    t0 = time.time()
    if cfg.init:                                  # before the data: segments use the network's own voxel size
        net = load_teacher(cfg.init).train()
        if not isinstance(net, MultiScaleTeacher):
            raise ValueError(f"init: {cfg.init} is not a multi-scale teacher checkpoint")
    else:
        net = MultiScaleTeacher(MultiScaleTeacherConfig(widths=tuple(cfg.widths), embed_dim=cfg.embed_dim))
    clouds = []
    for s in seeds:
        xyz, rgb, _ = room_cloud(s, density=cfg.density)        # labels dropped here: self-supervised
        segs = point_segments(xyz, rgb, net.config.voxel_size) if cfg.segment_weight > 0 else None
        clouds.append((xyz, rgb, segs))
    t_data = time.time() - t0
    levels = len(net.config.widths)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    log: list = []
    record = {"command": "geopurify-pretrain-teacher " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": asdict(cfg), "data": f"rooms.room_cloud(seed) for seeds {seeds[0]}..{seeds[-1]} "
              f"({len(seeds)} rooms, {sum(c[0].shape[0] for c in clouds)} points, labels unused)",
              "seeds": seeds, "labels_used": False, "teacher": asdict(net.config),
              "params": sum(p.numel() for p in net.parameters()), "data_s": round(t_data, 1),
              "torch": torch.__version__}
    t_train = time.time()
    deadline = t0 + 60.0 * cfg.minutes
    step = 0
    for step in range(cfg.steps):
        if time.time() > deadline:
            break
        xyz, rgb, segs = clouds[rng.integers(len(clouds))]
        centre = xyz[rng.integers(xyz.shape[0]), :2]
        va = make_view(xyz, rgb, centre, cfg.crop, net.config.voxel_size, rng)
        vb = make_view(xyz, rgb, centre, cfg.crop, net.config.voxel_size, rng)
        both = np.nonzero((va.voxel_of >= 0) & (vb.voxel_of >= 0))[0]
        if both.size < 256:
            continue
        if cfg.mask_cell > 0:
            _complementary_colour_masks(va, vb, cfg.mask_cell, rng)
        za, pa = net(va.xyz, va.colors)
        zb, pb = net(vb.xyz, vb.colors)
        pa_np, pb_np = [p.numpy() for p in pa], [p.numpy() for p in pb]
        loss, parts = 0.0, {}
        for lv in range(levels):
            ia, ib = _pairs(va, vb, both, pa_np, pb_np, cfg.pairs[lv], rng, lv)
            if ia.numel() < 8:
                continue
            pos = _level_pos(va, pa, lv)[ia]
            li = info_nce(za[lv][ia], zb[lv][ib], pos, cfg.temperature, cfg.exclusion[lv])
            loss = loss + cfg.weights[lv] * li
            with torch.no_grad():
                top1 = float(((za[lv][ia] @ zb[lv][ib].T).argmax(1) == torch.arange(ia.numel())).float().mean())
            parts[f"nce{lv}"], parts[f"top1_{lv}"] = li.item(), top1
        if segs is not None:
            ls, top1 = segment_nce(za[0], zb[0], va, vb, *segs, both, cfg.segment_pairs, cfg.temperature,
                                   net.config.voxel_size, rng)
            loss = loss + cfg.segment_weight * ls
            parts["seg"], parts["top1_seg"] = ls.item(), top1
        # cosine schedule over whichever bound (steps or wall time) comes first, 5 % linear warm-up
        frac = min(max(step / max(cfg.steps, 1), (time.time() - t_train) / max(deadline - t_train, 1e-9)), 1.0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, frac / 0.05) * 0.5 * (1.0 + np.cos(np.pi * frac)) if frac > 0 else cfg.lr * 0.01
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        log.append({"step": step, "t": round(time.time() - t0, 1), "loss": loss.item(), **parts})
        if progress and step % 20 == 0:
            print(json.dumps(log[-1]), file=sys.stderr, flush=True)
        if (step + 1) % cfg.save_every == 0:
            _save(net, out, record, log, t0)
    _save(net, out, record, log, t0)
    return record


def _save(net, out: Path, record: dict, log: list, t0: float) -> None:
    k = max(len(log) // 10, 1)
    record["steps_done"] = len(log)
    record["time_s"] = round(time.time() - t0, 1)
    if log:
        record["loss_curve_deciles"] = [round(float(np.mean([r["loss"] for r in log[i:i + k]])), 4)
                                        for i in range(0, len(log), k)]
        last = log[-k:]
        record["final"] = {key: round(float(np.mean([r.get(key, np.nan) for r in last])), 4)
                           for key in log[-1] if key not in ("step", "t")}
    tmp = out / "teacher.pt.tmp"                 # atomic: readers never see a half-written checkpoint
    net.save(tmp, {key: record[key] for key in ("command", "data", "seeds", "time_s")})
    tmp.replace(out / "teacher.pt")
    (out / "teacher.json").write_text(json.dumps(record, indent=1))
    (out / "pretrain_log.jsonl").write_text("\n".join(json.dumps(r) for r in log))


def main(argv: list[str] | None = None) -> int:
    d = PretrainConfig()
    ap = argparse.ArgumentParser(prog="geopurify-pretrain-teacher", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--rooms", type=int, default=d.rooms)
    ap.add_argument("--first-seed", type=int, default=d.first_seed)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--minutes", type=float, default=d.minutes)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--crop", type=float, default=d.crop)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--mask-cell", type=float, default=d.mask_cell)
    ap.add_argument("--save-every", type=int, default=d.save_every)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--init", default=d.init, help="teacher checkpoint to fine-tune (default: train from scratch)")
    ap.add_argument("--segment-weight", type=float, default=d.segment_weight,
                    help="weight of the fine-level segment contrast (0 = off; see the module docstring)")
    a = ap.parse_args(argv)
    try:
        cfg = PretrainConfig(out=a.out, rooms=a.rooms, first_seed=check_training_seed(a.first_seed), steps=a.steps,
                             minutes=a.minutes, seed=a.seed, crop=a.crop, lr=a.lr, mask_cell=a.mask_cell,
                             save_every=a.save_every, threads=a.threads, init=a.init,
                             segment_weight=a.segment_weight)
    except ValueError as exc:
        print(f"geopurify-pretrain-teacher: error: {exc}", file=sys.stderr)
        return 2
    rec = pretrain(cfg, argv if argv is not None else sys.argv[1:])
    print(json.dumps({"out": cfg.out, "steps": rec["steps_done"], "time_s": rec["time_s"],
                      "final": rec.get("final")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
