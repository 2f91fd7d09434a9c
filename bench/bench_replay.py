"""Replay throughput (frames/s) of a demo bag: offline (MappingPipeline in-process) vs over ROS (the node).

    python bench/bench_replay.py [--size tiny|demo] [--max-frames N] [--modes offline,ros] [--params FILE]

Frames/s counts bag frames pushed through (read, decoded, paired, posed, keyframe-gated, fused); start-up
(model loading, node launch) is excluded and printed separately. The ROS number uses the acknowledged
("fast") pacing, so it includes the round trip through DDS and the node's worker. Ratio = ros / offline
(target >= 0.7).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.7          # through the node, at least this fraction of the offline throughput


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "demo"), default="tiny")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--modes", default="offline,ros")
    ap.add_argument("--params", default=str(ROOT / "config" / "mapping.yaml"))
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from geopurify_ros.config import PipelineConfig, load_ros_params
    from geopurify_ros.data import make_demo
    from geopurify_ros.eval.cli import load_labels
    from geopurify_ros.data.bag_source import BagSource, Topics
    from geopurify_ros.eval.replay import replay_offline

    from geopurify_ros.cache import cache_dir

    demo = cache_dir(f"demo_{args.size}_0")
    make_demo.main(["--size", args.size, "--seed", "0", "--out", str(demo)])
    classes, _ = load_labels(str(ROOT / "config" / "labels.yaml"))
    params = load_ros_params(args.params)
    params["class_names"] = classes
    rows = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        t0 = time.perf_counter()
        with BagSource(demo / "bag_mcap", Topics.from_params(params)) as src:
            if mode == "offline":
                res = replay_offline(src, PipelineConfig.from_dict(params), params, modes=("pooled",),
                                     max_frames=args.max_frames, progress=False)
            else:
                from geopurify_ros.eval.ros_replay import replay_ros

                res = replay_ros(src, params, classes, modes=(params.get("purify_mode", "pooled"),),
                                 max_frames=args.max_frames, progress=False)
        total = time.perf_counter() - t0
        rows[mode] = res
        print(f"{mode:8s} {res.frames_read:4d} frames ({res.frames_fused} fused) in {res.seconds:7.2f} s -> "
              f"{res.fps:6.2f} frames/s   (wall incl. start-up and final purify: {total:.1f} s)", flush=True)
        if "frame_ms_mean" in res.extra:
            print(f"         process_frame: {res.extra['frame_ms_mean']:.0f} ms per fused keyframe", flush=True)
        if "node_frame_ms_mean" in res.extra:
            print(f"         node worker: {res.extra['node_frame_ms_mean']:.0f} ms per fused keyframe", flush=True)
    if {"offline", "ros"} <= set(rows):
        r = rows['ros'].fps / rows['offline'].fps
        print(f"ratio ros/offline: {r:.2f}  (target >= {TARGET_RATIO}: {r / TARGET_RATIO:.2f} of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
