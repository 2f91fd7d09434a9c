#!/usr/bin/env python3
"""Open-vocabulary queries on a fused demo map: precision of the top-K voxels against the ground truth.

    python bench/bench_queries.py [--seeds 0] [--backend lseg] [--top 1000] [--mode pooled]

The queries are free text that names no class of the label table; each lists the classes that count as
a hit. A voxel's truth is the label of the nearest ground-truth point (within 1.5 voxels; others are
left out). Seeds 0-9 are reporting seeds: nothing here tunes anything.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QUERIES = [
    ("something to sleep on", {"bed"}),
    ("a place to sit", {"chair", "sofa"}),
    ("where books are kept", {"bookshelf"}),
    ("somewhere to store clothes", {"cabinet"}),
    ("a surface to eat a meal on", {"table"}),
    ("a place to work with a computer", {"desk"}),
    ("the way out of the room", {"door"}),
    ("where daylight comes in", {"window"}),
    ("fabric hanging beside the glass", {"curtain"}),
    ("a framed image hanging on the wall", {"picture"}),
    ("what we walk on", {"floor"}),
    ("a comfortable couch", {"sofa"}),
    ("a small table next to the bed", {"otherfurniture"}),
]


def main(argv=None) -> None:
    from scipy.spatial import cKDTree

    from geopurify_ros.config import PipelineConfig, load_ros_params
    from geopurify_ros.data.sequence import load_ground_truth
    from geopurify_ros.eval.ablation import demo_dir, fuse_recording
    from geopurify_ros.pipeline import MappingPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="demo seeds (comma-separated), reporting seeds 0-9")
    ap.add_argument("--backend", default="", help="feature backend ('' = config/mapping.yaml)")
    ap.add_argument("--mode", default="pooled", choices=("raw", "purified", "pooled"))
    ap.add_argument("--top", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_ros_params(os.path.join(os.path.dirname(__file__), "..", "config", "mapping.yaml"))
    params["device"] = "cpu"
    if args.backend:
        params.update(feature_backend=args.backend, feature_model="", feature_image_width=0)
    params["purify_mode"] = args.mode
    config = PipelineConfig.from_dict(params)
    pipe = MappingPipeline(config)
    prec = {q: [] for q, _ in QUERIES}
    for seed in (int(s) for s in args.seeds.split(",")):
        pipe.reset()
        rec = demo_dir(seed)
        fuse_recording(rec, pipe, params)
        pipe.purify(incremental=False)
        gt = load_ground_truth(rec)
        keep = gt.observed if gt.observed is not None else np.ones(len(gt.xyz), bool)
        tree = cKDTree(gt.xyz[keep])
        gt_lab = gt.labels[keep]
        for q, want in QUERIES:
            res = pipe.query(q, threshold=0.0, max_points=args.top)
            xyz = np.stack([res.cloud["x"], res.cloud["y"], res.cloud["z"]], 1)
            d, i = tree.query(xyz)
            ok = d <= 1.5 * config.voxel_size
            truth = [gt.class_names[int(c)] if c < len(gt.class_names) else "-" for c in gt_lab[i[ok]]]
            prec[q].append(float(np.mean([t in want for t in truth])) if truth else float("nan"))
    print(f"backend {config.feature_backend}, mode {args.mode}, seeds {args.seeds}, top {args.top} voxels")
    print("| query | counts as | precision@%d |" % args.top)
    print("|---|---|---:|")
    for q, want in QUERIES:
        print(f"| {q} | {', '.join(sorted(want))} | {100 * np.nanmean(prec[q]):.1f} % |")
    print(f"| **mean** | | {100 * np.nanmean([np.nanmean(v) for v in prec.values()]):.1f} % |")


if __name__ == "__main__":
    main()
