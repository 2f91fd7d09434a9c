"""`geopurify-ablation`: what each part of GeoPurify adds, on fused maps of demo recordings.

Each recording (`geopurify-make-demo --size demo --seed S`, cached) is fused once with the configured feature
backend exactly as `geopurify-eval --mode offline` does (BagSource pairing/poses, the node's keyframe gate);
the fused VoxelMap is cached (`$GEOPURIFY_CACHE/fused/<backend>_<D>_demo_<S>_<hash>.pt`, the hash covering the
backend's weights, the pipeline config and the keyframe gate) and every variant below
re-labels that same map:

  raw                    fused features as they are
  uniform                geometry-blind smoothing (every ring neighbour weighs the same), `iterations` rounds
  constant + gates       GGP with constant embeddings (affinity 1 everywhere), colour/normal/depth gates
  student, no gates      GGP with the student's affinities only
  student + gates        the default `pooled` mode
  ... at paper scale     the same with the paper's neighbourhood and iteration count (the offline quality setting)
  paper-like             student affinities, no gates, no threshold, paper-scale neighbourhood and iterations

`--sweep ceiling` (training seeds only) asks how far any affinity could take the pooling: the same pooling with
the teacher's own embeddings (what the student is distilled to imitate) and with an oracle, one-hot ground-truth
labels (affinity 1 inside a class, 0 across), beside the student and the constant affinities.

Reported per seed and as means (demo seed 0 and evaluation seeds 1-9), per class, with deltas to raw.
Evaluation seeds are for reporting only: nothing here trains or tunes anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_dir
from ..node import heap
from . import EvalError


def fusion_fingerprint(pipe, params: dict) -> str:
    """Short hash of everything a fused map depends on besides the recording: the feature backend's weights
    (so a retrained head is never served a map fused with the old one), the pipeline's effective config and
    the keyframe gate."""
    from ..features.base import cache_key, module_digest

    # the modules as run (lseg's folded head): a map stored in other coordinates is another map
    weights = module_digest({k: m for k, m in vars(pipe.backend).items() if isinstance(m, torch.nn.Module)})
    cfg = {k: v for k, v in dataclasses.asdict(pipe.config).items() if k != "class_names"}
    gate = {k: v for k, v in params.items() if k.startswith("keyframe_")}
    return cache_key(pipe.backend.name, pipe.backend.dim, weights, cfg, gate)[:12]


def fused_map_path(backend, fingerprint: str, seed: int, size: str = "demo") -> Path:
    """Cache file of demo recording `seed` fused with `backend`; `fingerprint` = `fusion_fingerprint` of the pipeline
    (computed once per run by the callers: it hashes every weight of the backend)."""
    return cache_dir("fused", f"{backend.name}_{backend.dim}_{size}_{seed}_{fingerprint}.pt")


def fuse_recording(recording: Path, pipe, params: dict):
    """Fuse a recording's frames into `pipe.voxel_map` (same keyframe gate as the node); returns the map.

    recording: a demo directory (its bag_mcap/ is read) or a rosbag2 directory."""
    from ..data.bag_source import BagSource, Topics
    from .replay import _on_worker_thread, keyframe_selector

    def run():
        gate = keyframe_selector(params)
        bag = recording / "bag_mcap" if (recording / "bag_mcap").is_dir() else recording
        with BagSource(bag, Topics.from_params(params, {})) as src:
            for fr in src.frames():
                if not gate.is_keyframe(fr.stamp, fr.T_world_cam):
                    continue
                gate.accept(fr.stamp, fr.T_world_cam)
                pipe.process_frame(fr.rgb, fr.depth, fr.cam, fr.T_world_cam, fr.stamp)
        return pipe.voxel_map

    return _on_worker_thread(run)


def demo_dir(seed: int, size: str = "demo") -> Path:
    from ..data.make_demo import generate

    out = cache_dir(f"demo_{size}_{seed}")
    generate(out, size, seed, log=lambda *a: None)
    return out


def load_or_fuse(seed: int, pipe, params: dict, fingerprint: str, size: str = "demo"):
    """Cached fused VoxelMap of demo recording `seed` for `pipe` (`fingerprint` = its `fusion_fingerprint`)."""
    from ..voxel_map import VoxelMap

    path = fused_map_path(pipe.backend, fingerprint, seed, size)
    if path.is_file():
        return VoxelMap.load(path)
    d = demo_dir(seed, size)
    pipe.reset()
    vmap = fuse_recording(d, pipe, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    vmap.save(path)
    return VoxelMap.load(path)


# ------------------------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Variant:
    name: str
    kind: str                     # raw | uniform | ggp
    student: str = "student"      # student | constant | teacher | oracle (the last two: --sweep ceiling)
    gates: bool = True
    overrides: dict = dataclasses.field(default_factory=dict)    # PurifyConfig fields


def default_variants(iterations: int, paper: dict | None = None) -> list[Variant]:
    paper = paper or {"iterations": 18, "radius": 2, "temperature": 0.05, "affinity_threshold": -1.0}
    return [
        Variant("raw", "raw"),
        Variant("uniform smoothing", "uniform", overrides={"iterations": iterations}),
        Variant("constant affinities + gates", "ggp", student="constant"),
        Variant("student, no gates", "ggp", gates=False),
        Variant("student + gates (default)", "ggp"),
        Variant(f"student + gates at paper scale (radius {paper['radius']}, {paper['iterations']} it.)", "ggp",
                overrides={"iterations": paper["iterations"], "radius": paper["radius"]}),
        Variant(f"paper-like (radius {paper['radius']}, {paper['iterations']} it., T {paper['temperature']}, no gates)",
                "ggp", gates=False, overrides=dict(paper)),
    ]


def scale_sweep_variants() -> list[Variant]:
    """Neighbourhood × iterations grid with and without the gates (docs/GEOPURIFY.md, operating points)."""
    r1, r2 = [(it, 1) for it in (3, 6, 10)], [(it, 2) for it in (3, 6, 10)]
    rows = [  # (label, kind, student, gates, extra PurifyConfig overrides, (iterations, radius) points)
        ("uniform", "uniform", "student", True, {}, r1),
        ("student, no gates", "ggp", "student", False, {}, r1 + r2),
        ("student + gates", "ggp", "student", True, {}, r1 + r2 + [(18, 2), (6, 3), (10, 3), (18, 3)]),
        ("student + normal/depth gates", "ggp", "student", True, {"color_gate": False}, r2),
        ("constant + gates", "ggp", "constant", True, {}, r2 + [(18, 2)]),
    ]
    return [Variant("raw", "raw")] + [
        Variant(f"{label} it={it} r={r}", kind, student, gates, {"iterations": it, "radius": r, **extra})
        for label, kind, student, gates, extra, points in rows for it, r in points]


def ceiling_variants() -> list[Variant]:
    """Student vs. the teacher it imitates vs. perfect (ground-truth) affinities, at the default and the paper's scale
    (docs/GEOPURIFY.md, "How far can affinities take the pooling")."""
    paper = {"iterations": 18, "radius": 2}
    out = [Variant("raw", "raw")]
    for who in ("constant", "student", "teacher", "oracle"):
        for gates in ((True,) if who == "constant" else (False, True)):
            for scale, over in (("", {}), (" at paper scale", paper)):
                label = f"{who}{' + gates' if gates else ', no gates'}{scale}"
                out.append(Variant(label, "ggp", student=who, gates=gates, overrides=dict(over)))
    return out


def ceiling_embeddings(vmap, gt_xyz: np.ndarray, gt_labels: np.ndarray, n_classes: int, radius: float) -> dict:
    """Per-voxel embeddings for the `teacher` and `oracle` rows of `ceiling_variants`: the shipped teacher's, and
    one-hot labels of the nearest ground-truth point within `radius` (another one-hot "unlabelled" beyond it)."""
    from scipy.spatial import cKDTree

    from ..purify.teacher import DEFAULT_TEACHER, load_teacher

    xyz = vmap.xyz.float().cpu()
    dist, idx = cKDTree(gt_xyz).query(xyz.numpy(), k=1)
    lab = gt_labels[idx]                                     # k=1 without a bound: every query has a nearest point
    lab = np.where((dist <= radius) & (lab >= 0) & (lab < n_classes), lab, n_classes)
    with torch.no_grad():
        teacher = torch.nn.functional.normalize(load_teacher(DEFAULT_TEACHER).embed(xyz, vmap.colors.cpu()).float(), dim=1)
    return {"teacher": teacher, "oracle": torch.nn.functional.one_hot(torch.from_numpy(lab), n_classes + 1).float()}


def sweep_variants(iterations=(3, 10), temperatures=(0.1, 0.3), thresholds=(0.5, -1.0)) -> list[Variant]:
    """Operating-point grid for choosing the pooling defaults (run on training seeds >= 1000 only)."""
    out = [Variant("raw", "raw")]
    for it in iterations:
        for t in temperatures:
            for th in thresholds:
                for gates in (True, False):
                    out.append(Variant(f"it={it} T={t} thr={th} gates={'on' if gates else 'off'}", "ggp", gates=gates,
                                       overrides={"iterations": it, "temperature": t, "affinity_threshold": th}))
    return out


def run_variant(v: Variant, vmap, student, config, fixed: dict | None = None) -> torch.Tensor:
    """(N, D) float32 features of the map after variant `v` (full pass; the map's channels are left alone).
    `fixed`: per-voxel embeddings for the `teacher` / `oracle` students (`ceiling_embeddings`)."""
    from ..purify.pooling import uniform_smoothing
    from ..purify.purifier import Purifier, TensorMap
    from ..purify.student import ConstantEmbedding, FixedEmbedding

    if v.kind == "raw":
        return vmap.features.float()
    cfg = dataclasses.replace(config, **v.overrides)
    if v.kind == "uniform":
        nb = vmap.neighbours(torch.arange(len(vmap)), cfg.radius)
        return uniform_smoothing(vmap.features, nb, cfg.iterations)
    if not v.gates:
        cfg = dataclasses.replace(cfg, color_gate=False, normal_gate=False, depth_gate=False)
    if v.student in ("teacher", "oracle"):
        if not fixed or v.student not in fixed:
            raise ValueError(f"variant '{v.name}': needs the {v.student} embeddings of this map (ceiling_embeddings)")
        st = FixedEmbedding(fixed[v.student])
    else:
        st = ConstantEmbedding() if v.student == "constant" else student
    tm = TensorMap(vmap.xyz, vmap.colors, vmap.features, vmap.voxel_size)
    Purifier(st, cfg).purify(tm, mode="pooled", incremental=False)
    return tm.channel(cfg.output_channel).float()


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}"


def markdown(results: dict, class_names: list[str], seeds: list[int]) -> str:
    """Summary table (demo seed 0 if present, mean of the other seeds, deltas to raw), per-seed mIoU, then
    per-class IoU averaged over seeds with the classes that got worse than raw marked."""
    names = list(next(iter(results.values())).keys())
    rest = [s for s in seeds if s != 0]
    cols = ([("demo seed 0", [0])] if 0 in results else []) + \
        ([(f"seeds {rest[0]}-{rest[-1]} mean" if len(rest) > 1 else f"seed {rest[0]}", rest)] if rest else [])
    mean = {(c, n): float(np.mean([results[s][n]["miou"] for s in ss])) for c, ss in cols for n in names}
    lines = ["| variant | " + " | ".join(f"{c} mIoU | Δ raw" for c, _ in cols) + " |",
             "|---|" + "---|---|" * len(cols)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{_fmt(mean[c, n])} | {100 * (mean[c, n] - mean[c, 'raw']):+.1f}"
                                              for c, _ in cols) + " |")
    lines += ["", "Per-seed mIoU:", "", "| variant | " + " | ".join(str(s) for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(results[s][n]["miou"]) for s in seeds) + " |")
    lines += ["", "Per-class IoU, mean over the seeds where the class is present"
                  f" ({len(seeds)} seeds); ↓ marks a class that got worse than raw:", "",
              "| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for c in class_names:
        vals = []
        for n in names:
            v = [results[s][n]["per_class"][c]["iou"] for s in seeds if c in results[s][n]["per_class"]]
            vals.append(float(np.mean(v)) if v else None)
        if all(v is None for v in vals):
            continue
        cells = [_fmt(v) + (" ↓" if v is not None and vals[0] is not None and v < vals[0] - 1e-9 and i else "")
                 for i, v in enumerate(vals)]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_ablation(seeds: list[int], params_path: str | None, labels_path: str, out: Path,
                 student_checkpoint: str | None = None, progress: bool = True, sweep: bool | str = False) -> dict:
    from .. import config as cfgmod
    from ..pipeline import MappingPipeline
    from .cli import cloud_xyz_labels, load_gt
    from .metrics import evaluate
    from .replay import ablation_clouds

    class_names, ignore = cfgmod.load_labels(labels_path, "--labels")
    params = cfgmod.load_ros_params(params_path) if params_path else {}
    params["class_names"] = class_names
    if student_checkpoint:
        params["student_checkpoint"] = student_checkpoint
    pcfg = cfgmod.PipelineConfig.from_dict(params)
    pipe = MappingPipeline(pcfg)
    config = pipe.purifier.config
    if sweep:                               # tuning: never on evaluation (0-9) or reserved (10-99) seeds
        from ..purify.rooms import check_training_seed
        for s in seeds:
            check_training_seed(s)
        grids = {"temperature": sweep_variants, "scale": scale_sweep_variants, "ceiling": ceiling_variants}
        variants = grids["temperature" if sweep is True else sweep]()     # True = the original grid
    else:
        variants = default_variants(config.iterations)
    radius = 1.5 * pcfg.voxel_size
    fingerprint = fusion_fingerprint(pipe, params)
    results: dict = {}
    t0 = time.time()
    for s in seeds:
        pipe.voxel_map = load_or_fuse(s, pipe, params, fingerprint)
        gt_xyz, gt_labels = load_gt(str(demo_dir(s) / "ground_truth.npz"), class_names, ignore)
        t = time.perf_counter()
        fixed = (ceiling_embeddings(pipe.voxel_map, gt_xyz, gt_labels, len(class_names), radius)
                 if sweep == "ceiling" else None)
        clouds = ablation_clouds(pipe, variants, fixed)
        results[s] = {}
        for name, cloud in clouds.items():
            sc = evaluate(gt_xyz, gt_labels, *cloud_xyz_labels(cloud), class_names, radius, ignore)
            d = sc.to_dict()
            d.pop("confusion")
            results[s][name] = d
            if progress:
                print(f"seed {s} {name:45s} mIoU {100 * sc.miou:5.1f}", file=sys.stderr)
        if progress:
            print(f"seed {s}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    doc = {"seeds": seeds, "backend": pipe.backend.name, "feature_dim": pipe.backend.dim,
           "student": getattr(pipe.purifier.student, "meta", {}).get("command", "shipped"),
           "purify_config": dataclasses.asdict(config), "variants": [dataclasses.asdict(v) for v in variants],
           "params": params_path, "seconds": round(time.time() - t0, 1), "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(doc, indent=1))
    (out / "ablation.md").write_text(f"# GeoPurify ablation ({pipe.backend.name}, D={pipe.backend.dim})\n\n"
                                     + markdown(results, class_names, seeds))
    return doc


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="geopurify-ablation", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-9", help="demo seeds, e.g. 0-9 or 0,3,5")
    ap.add_argument("--params", default="config/mapping.yaml")
    ap.add_argument("--labels", default="config/labels.yaml")
    ap.add_argument("--student-checkpoint", default=None)
    ap.add_argument("--out", default="build/ablation")
    ap.add_argument("--sweep", nargs="?", const="temperature", default=None,
                    choices=("temperature", "scale", "ceiling"),
                    help="score a grid of pooling operating points instead (tuning: seeds >= 1000 only): "
                         "'temperature' (default: iterations x temperature x threshold x gates), 'scale' "
                         "(neighbourhood radius x iterations, with and without gates) or 'ceiling' (student vs. "
                         "the teacher's embeddings vs. ground-truth affinities)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    heap.configure()            # the node's heap settings (no per-frame page faults while fusing)
    try:
        doc = run_ablation(parse_seeds(a.seeds), a.params if Path(a.params).is_file() else None, a.labels,
                           Path(a.out), a.student_checkpoint, sweep=a.sweep)
    except (EvalError, ValueError, FileNotFoundError) as exc:
        print(f"geopurify-ablation: error: {exc}", file=sys.stderr)
        return 2
    print((Path(a.out) / "ablation.md").read_text())
    print(f"({doc['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
