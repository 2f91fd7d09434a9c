"""`geopurify-eval`: replay a ROS 2 bag (offline and/or through the mapping node), score the map, write a report.

Exit status: 0 on success, 2 on a user-facing error (one line on stderr: missing topics, bad encodings,
corrupt bags, ground truth that does not overlap the map, ...).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from ..node import heap
from . import EvalError

MIN_OVERLAP = 0.05   # below this fraction of matched GT points the map and GT are almost surely misaligned


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geopurify-eval", description=__doc__.splitlines()[0])
    p.add_argument("bag", help="rosbag2 directory (mcap or sqlite3)")
    p.add_argument("--gt", help="ground truth: ground_truth.npz (xyz, labels) or a labelled PLY/NPZ point cloud; "
                                "omitted: built from the bag's label images (--topics labels=...)")
    p.add_argument("--gt-all-points", action="store_true",
                   help="score every GT point, also those the 'observed' mask of the GT marks as never seen")
    p.add_argument("--labels", default="config/labels.yaml", help="class table (classes, ignore_label)")
    p.add_argument("--params", default=None, help="node params file (default: config/mapping.yaml if present)")
    p.add_argument("--mode", choices=("offline", "ros", "both"), default="offline",
                   help="offline: MappingPipeline in-process; ros: through the mapping node over ROS topics")
    p.add_argument("--out", default="eval_report", help="output directory for report.md/json and PNGs")
    p.add_argument("--topics", default="", metavar="KEY=VALUE,...",
                   help="overrides of bag topics/frames/encodings: color, depth, camera_info, pose (PoseStamped, "
                        "Odometry or /tf), labels, map_frame, camera_frame, color_encoding, depth_encoding, base_to_camera")
    for key in ("color", "depth", "camera_info", "pose", "labels", "map_frame", "camera_frame",
                "color_encoding", "depth_encoding"):
        p.add_argument(f"--{key.replace('_', '-')}" + ("-topic" if key in ("color", "depth", "camera_info", "pose", "labels") else ""),
                       dest=f"topic_{key}", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N frames")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, default=None, help="ros mode: publish at R x recorded speed")
    pace.add_argument("--fast", action="store_true", help="ros mode: publish as fast as the node acknowledges (default)")
    p.add_argument("--match-radius", type=float, default=None, help="GT-to-map matching radius [m] (default 1.5 x voxel)")
    p.add_argument("--purify-modes", default="raw,purified,pooled", help="modes scored on the one fused map")
    p.add_argument("--compare-backends", default="", metavar="NAME,...",
                   help="also replay offline with these feature backends (e.g. conse) and report them in the same tables")
    p.add_argument("--ablation", action="store_true",
                   help="offline mode: also score the GeoPurify ablation variants (raw, uniform smoothing, constant "
                        "affinities + gates, student without gates, student + gates, paper-like) on the fused map")
    p.add_argument("--node-timeout", type=float, default=120.0, help="ros mode: seconds to wait for the node to start/answer")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_topic_overrides(args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in args.topics.replace(";", ",").split(","))):
        if "=" not in item:
            if "base_to_camera" in out and _is_number(item):
                out["base_to_camera"].append(float(item))   # base_to_camera=x,y,z,qx,qy,qz,qw spans commas
                continue
            raise EvalError(f"--topics: expected KEY=VALUE, got '{item}'")
        k, v = (s.strip() for s in item.split("=", 1))
        out[k] = [float(v)] if k == "base_to_camera" else v
    for key in ("color", "depth", "camera_info", "pose", "labels", "map_frame", "camera_frame",
                "color_encoding", "depth_encoding"):
        v = getattr(args, f"topic_{key}", None)
        if v is not None:
            out[key] = v
    if "base_to_camera" in out:
        if len(out["base_to_camera"]) != 7:
            raise EvalError("--topics: base_to_camera needs 7 numbers x,y,z,qx,qy,qz,qw")
        out["base_to_camera"] = tuple(out["base_to_camera"])
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_labels(path: str) -> tuple[list[str], int]:
    try:
        return config.load_labels(path, "--labels")
    except ValueError as exc:
        raise EvalError(str(exc)) from None


def load_gt(path: str, class_names: list[str], ignore_label: int, all_points: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float32 (N,3), labels int64 (N,)) from an NPZ or a PLY; GT ids are remapped by name if it has names.

    An NPZ `observed` mask (demo ground truth: surface seen by at least one frame) restricts the GT to what the
    camera could map, unless `all_points`.
    """
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"--gt: {p} does not exist")
    names, observed = None, None
    try:
        if p.suffix.lower() == ".ply":
            xyz, labels = _read_ply(p)
        else:
            with np.load(p, allow_pickle=False) as z:
                xyz = next((z[k] for k in ("xyz", "points", "positions", "coords") if k in z), None)
                labels = next((z[k] for k in ("labels", "label", "semantic", "classes") if k in z), None)
                if "class_names" in z:
                    names = [str(s) for s in z["class_names"]]
                if "observed" in z and not all_points:
                    observed = np.asarray(z["observed"]).astype(bool).reshape(-1)
                if xyz is None or labels is None:
                    raise EvalError(f"--gt: {p} needs arrays 'xyz' (N,3) and 'labels' (N,); has {sorted(z.files)}")
    except EvalError:
        raise
    except Exception as exc:
        raise EvalError(f"--gt: cannot read {p}: {type(exc).__name__}: {exc}") from None
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(xyz) != len(labels) or len(xyz) == 0:
        raise EvalError(f"--gt: {p} has {len(xyz)} points but {len(labels)} labels")
    if observed is not None and len(observed) == len(xyz):
        xyz, labels = xyz[observed], labels[observed]
    if names is not None and names != class_names:
        lut = np.full(max(len(names), 1), ignore_label, dtype=np.int64)
        for i, n in enumerate(names):
            if n in class_names:
                lut[i] = class_names.index(n)
        ok = (labels >= 0) & (labels < len(names))
        labels = np.where(ok, lut[np.clip(labels, 0, len(names) - 1)], ignore_label)
    return xyz, labels


def _read_ply(p: Path) -> tuple[np.ndarray, np.ndarray]:
    """Minimal PLY vertex reader (ascii / binary_little_endian) for x, y, z and a label property."""
    types = {"char": "i1", "uchar": "u1", "short": "i2", "ushort": "u2", "int": "i4", "uint": "u4", "float": "f4",
             "double": "f8", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
             "float32": "f4", "float64": "f8"}
    data = p.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise EvalError(f"--gt: {p} is not a PLY file")
    header = data[:end].decode("ascii", "replace").splitlines()
    body = data[data.index(b"\n", end) + 1:]
    fmt, n, props, in_vertex = "", 0, [], False
    for line in header:
        parts = line.split()
        if parts[:1] == ["format"]:
            fmt = parts[1]
        elif parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list":
                raise EvalError(f"--gt: {p}: list properties on vertices are not supported")
            props.append((parts[2], types[parts[1]]))
    names = [k for k, _ in props]
    label_key = next((k for k in ("label", "class", "semantic", "semantic_label", "scalar_label") if k in names), None)
    if label_key is None or not {"x", "y", "z"} <= set(names):
        raise EvalError(f"--gt: {p} needs vertex properties x, y, z and label (has {names})")
    if fmt == "ascii":
        arr = np.loadtxt(body.decode().splitlines()[:n], ndmin=2)
        col = {k: arr[:, i] for i, k in enumerate(names)}
    elif fmt == "binary_little_endian":
        rec = np.frombuffer(body, dtype=np.dtype([(k, "<" + t) for k, t in props]), count=n)
        col = {k: rec[k] for k in names}
    else:
        raise EvalError(f"--gt: {p}: PLY format '{fmt}' not supported (ascii, binary_little_endian)")
    return np.stack([col["x"], col["y"], col["z"]], 1), col[label_key]


def gt_from_label_images(source, class_names: list[str], ignore_label: int, voxel: float,
                         max_frames: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth by back-projecting the bag's label images (majority label per voxel)."""
    import torch

    from geopurify_ros.camera import backproject

    stamps, images = source.label_images()
    pts, labs = [], []
    for fr in source.frames(max_frames=max_frames) if len(stamps) else ():
        j = int(np.argmin(np.abs(stamps - fr.stamp)))
        if abs(stamps[j] - fr.stamp) > source.topics.sync_slop_s or images[j].shape != fr.depth.shape:
            continue
        xyz, pix, _ = backproject(torch.from_numpy(fr.depth), fr.cam, fr.T_world_cam, stride=2)
        lab = images[j][pix[:, 0].numpy(), pix[:, 1].numpy()].astype(np.int64)
        keep = (lab != ignore_label) & (lab < len(class_names))
        pts.append(xyz.numpy()[keep])
        labs.append(lab[keep])
    if not pts:
        raise EvalError(f"--gt not given and the bag has no label images on {source.topics.labels}; pass --gt")
    xyz, lab = np.concatenate(pts), np.concatenate(labs)
    keys = np.floor(xyz / voxel).astype(np.int64)
    _, inv = np.unique(keys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    votes = np.zeros((inv.max() + 1, len(class_names)), dtype=np.int64)
    np.add.at(votes, (inv, lab), 1)
    sums = np.zeros((inv.max() + 1, 3))
    np.add.at(sums, inv, xyz)
    return (sums / np.bincount(inv)[:, None]).astype(np.float32), votes.argmax(1)


def cloud_xyz_labels(cloud: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], 1).astype(np.float32)
    return xyz, np.asarray(cloud["label"]).astype(np.int64)


def run(args) -> Path:
    from geopurify_ros.config import PipelineConfig, load_ros_params

    from ..data.bag_source import BagSource, Topics
    from .replay import replay_offline
    from .report import write_report

    class_names, ignore_label = load_labels(args.labels)
    params_path = args.params or ("config/mapping.yaml" if Path("config/mapping.yaml").is_file() else None)
    try:
        params = load_ros_params(params_path) if params_path else {}
        params["class_names"] = class_names       # label ids must index the evaluation's class table
        config = PipelineConfig.from_dict(params)
    except ValueError as exc:
        raise EvalError(f"--params: {exc}") from None
    modes = [m.strip() for m in args.purify_modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("raw", "purified", "pooled")]
    if bad or not modes:
        raise EvalError(f"--purify-modes: unknown mode(s) {bad}; use raw, purified, pooled")
    topics = Topics.from_params(params, parse_topic_overrides(args))
    radius = args.match_radius or 1.5 * config.voxel_size
    out = Path(args.out)

    with BagSource(args.bag, topics) as source:
        if args.gt:
            gt_xyz, gt_labels = load_gt(args.gt, class_names, ignore_label, args.gt_all_points)
        else:
            gt_xyz, gt_labels = gt_from_label_images(source, class_names, ignore_label, config.voxel_size, args.max_frames)
        results = {}
        if args.mode in ("offline", "both"):
            results["offline"] = replay_offline(source, config, params, modes, args.max_frames, progress=not args.quiet,
                                                ablation=args.ablation)
        for name in filter(None, (b.strip() for b in args.compare_backends.split(","))):
            # same bag, same parameters, only the feature backend differs (its own default model and width)
            other = dict(params, feature_backend=name, feature_model="", feature_image_width=0)
            try:
                other_config = PipelineConfig.from_dict(other)
            except ValueError as exc:
                raise EvalError(f"--compare-backends: {exc}") from None
            results[f"offline[{name}]"] = replay_offline(source, other_config, other, modes, args.max_frames,
                                                         progress=not args.quiet)
        if args.mode in ("ros", "both"):
            from .ros_replay import replay_ros

            results["ros"] = replay_ros(source, params, class_names, modes, max_frames=args.max_frames,
                                        rate=args.rate, timeout=args.node_timeout, progress=not args.quiet,
                                        workdir=out / "ros_replay")    # node params + node.log kept beside the report

    scores, preds = score_results(results, gt_xyz, gt_labels, class_names, radius, ignore_label)
    abl = results["offline"].extra.pop("ablation_clouds", None) if "offline" in results else None
    if abl:                      # one more "run" whose modes are the ablation variants (same fused map)
        from .replay import ReplayResult

        s, p = score_results({"ablation": ReplayResult(abl, 0, 0, 0.0, "ablation")}, gt_xyz, gt_labels, class_names,
                             radius, ignore_label)
        scores.update(s)
        preds.update(p)
    meta = {
        "bag": str(args.bag), "gt": args.gt or f"label images on {topics.labels}", "gt_points": int(len(gt_xyz)),
        "labels": args.labels, "params": params_path, "voxel_size": config.voxel_size, "match_radius": radius,
        "modes": modes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "replay": {src: {"frames_read": r.frames_read, "frames_fused": r.frames_fused, "seconds": r.seconds,
                         "fps": r.fps, **{k: v for k, v in r.extra.items() if k != "class_names"}}
                   for src, r in results.items()},
    }
    if "ros" in scores and "offline" in scores:
        meta["ros_vs_offline"] = {m: round(100 * abs(scores["ros"][m].miou - scores["offline"][m].miou), 3)
                                  for m in scores["ros"] if m in scores["offline"]}
    write_report(out, scores, preds, gt_xyz, gt_labels, class_names, meta, plots=not args.no_plots)
    return out


def score_results(results: dict, gt_xyz: np.ndarray, gt_labels: np.ndarray, class_names: list[str], radius: float,
                  ignore_label: int = 65535) -> tuple[dict, dict]:
    """Scores and (xyz, labels) predictions per replay source and purify mode; EvalError if GT misses the map."""
    from .metrics import evaluate

    scores: dict = {}
    preds: dict = {}
    for src, res in results.items():
        scores[src], preds[src] = {}, {}
        for mode, cloud in res.clouds.items():
            xyz, lab = cloud_xyz_labels(cloud)
            s = evaluate(gt_xyz, gt_labels, xyz, lab, class_names, radius, ignore_label)
            if s.coverage < MIN_OVERLAP:
                raise EvalError(_overlap_message(s.coverage, radius, gt_xyz, xyz, src, mode))
            scores[src][mode], preds[src][mode] = s, (xyz, lab)
    return scores, preds


def _overlap_message(coverage: float, radius: float, gt_xyz: np.ndarray, map_xyz: np.ndarray, src: str, mode: str) -> str:
    def box(a):
        return "empty" if len(a) == 0 else f"[{', '.join(f'{v:.2f}' for v in a.min(0))}] .. [{', '.join(f'{v:.2f}' for v in a.max(0))}]"

    return (f"ground truth does not overlap the map ({src}/{mode}): only {100 * coverage:.1f}% of GT points have a map "
            f"point within {radius:.3f} m (need {100 * MIN_OVERLAP:.0f}%); GT box {box(gt_xyz)} vs map box {box(map_xyz)} "
            f"- probably a frame or units mismatch")


def print_summary(out: Path) -> None:
    import json

    doc = json.loads((out / "report.json").read_text())
    for src, bm in doc["results"].items():
        for mode, r in bm.items():
            miou = "n/a" if r["miou"] is None else f"{100 * r['miou']:.1f}"
            macc = "n/a" if r["macc"] is None else f"{100 * r['macc']:.1f}"
            print(f"{src:8s} {mode:9s} mIoU {miou:>5s}  mAcc {macc:>5s}  coverage {100 * (r['coverage'] or 0):.1f}%")
    for src, info in doc["meta"]["replay"].items():
        print(f"{src:8s} throughput {info['fps']:.2f} frames/s ({info['frames_read']} frames)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    heap.configure()            # the node's heap settings: frames cost what they cost in the node
    try:
        out = run(args)
    except EvalError as exc:
        print(f"geopurify-eval: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("geopurify-eval: interrupted", file=sys.stderr)
        return 130
    print_summary(out)
    print(f"report: {(out / 'report.md').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
