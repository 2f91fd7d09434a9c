"""Benchmark VoxelMap.fuse_frame: ms per 640x480 frame (stride 1/2/4, D-d features at 1/8 res) and bytes/voxel.

Prints plain numbers and ratios to the targets (<= 15 ms/frame on CPU at stride 2; <= 1 KiB/voxel). No asserts.
D defaults to that of the default backend (lseg: 129, its output subspace); `--dim 384` = lseg's full features.
Sampling: the default config's depth-guided sampling (`depth_guide_sigma`), and plain bilinear at stride 2 beside it.
`--ab-guide`: the paired cost of depth-guided sampling, frames alternating between a guided and a bilinear map.
Usage: python bench/bench_fusion.py [--frames 20] [--threads N] [--voxels 200000] [--dim D] [--guide-sigma S]
       [--ab-guide]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from geopurify_ros.camera import CameraModel, pose_to_matrix
from geopurify_ros.config import PipelineConfig
from geopurify_ros.features.lseg import feature_basis
from geopurify_ros.node import heap
from geopurify_ros.voxel_map import VoxelMap

TARGET_MS = 15.0
TARGET_BYTES = 1024
H, W, DOWN = 480, 640, 8


def synthetic_frame(rng: np.random.Generator, dim: int):
    """Room-like depth (1-4 m, smooth undulations, 2% holes), random colour, L2-normalised dim-d feature map."""
    r, c = np.mgrid[0:H, 0:W].astype(np.float32)
    depth = 2.5 + 0.8 * np.sin(c / 90.0) + 0.5 * np.cos(r / 70.0) + 0.2 * np.sin((r + c) / 23.0)
    depth[rng.random((H, W)) < 0.02] = np.nan
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    fmap = torch.nn.functional.normalize(torch.randn(H // DOWN, W // DOWN, dim), dim=-1)
    return depth.astype(np.float32), rgb, fmap


def time_fusion(device: str, stride: int, frames: int, dim: int, guide: float) -> tuple[float, float, float, int]:
    """Returns (median wall ms, min wall ms, median process-CPU ms per frame, voxels touched per frame)."""
    rng = np.random.default_rng(0)
    depth, rgb, fmap = synthetic_frame(rng, dim)
    cam = CameraModel(W, H, 525.0, 525.0, 319.5, 239.5)
    vm = VoxelMap(0.05, dim, max_voxels=500_000, device=device)
    dev = torch.device(device)
    depth_t, rgb_t, fmap_t = torch.from_numpy(depth).to(dev), torch.from_numpy(rgb).to(dev), fmap.to(dev)
    times, cpu, touched = [], [], []
    for i in range(frames + 3):
        # Small camera motion: most voxels are updates, some are new (as in a live sequence).
        T = pose_to_matrix([0.01 * i, 0.005 * i, 0.0], [0.0, 0.002 * i, 0.0, 1.0])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        st = vm.fuse_frame(depth_t, fmap_t, rgb_t, cam, T, stamp=float(i), stride=stride, guide_sigma=guide)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up frames excluded
            times.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
            touched.append(st.new + st.updated)
    return statistics.median(times), min(times), statistics.median(cpu), int(statistics.median(touched))


def paired_guide_cost(frames: int, dim: int, guide: float) -> None:
    """Stride-2 CPU fusion, guided and bilinear into two maps, the order alternating each frame so machine load hits
    both alike; prints min / median of each and the median paired difference."""
    depth, rgb, fmap = (torch.from_numpy(a) if isinstance(a, np.ndarray) else a
                        for a in synthetic_frame(np.random.default_rng(0), dim))
    cam = CameraModel(W, H, 525.0, 525.0, 319.5, 239.5)
    maps = {g: VoxelMap(0.05, dim, max_voxels=500_000) for g in (guide, 0.0)}
    times = {g: [] for g in maps}
    for i in range(frames + 3):
        T = pose_to_matrix([0.01 * i, 0.005 * i, 0.0], [0.0, 0.002 * i, 0.0, 1.0])
        for g in (list(maps) if i % 2 else list(maps)[::-1]):
            t = time.perf_counter()
            maps[g].fuse_frame(depth, fmap, rgb, cam, T, stamp=float(i), stride=2, guide_sigma=g)
            if i >= 3:
                times[g].append((time.perf_counter() - t) * 1e3)
    (a, ta), (b, tb) = times.items()
    print(f"paired, stride 2: guide {a:g} min {min(ta):.2f} median {statistics.median(ta):.2f} ms | bilinear min "
          f"{min(tb):.2f} median {statistics.median(tb):.2f} ms | guide costs "
          f"{statistics.median(np.array(ta) - np.array(tb)):+.2f} ms (median of {frames} pairs)")


def bytes_per_voxel(n: int, dim: int) -> float:
    vm = VoxelMap(0.05, dim, max_voxels=n)
    side = int(np.ceil(n ** (1 / 3)))
    ijk = torch.stack(torch.meshgrid(*(torch.arange(side),) * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    vm.fuse((ijk.float() + 0.5) * 0.05, torch.randn(n, dim))
    return vm.nbytes() / len(vm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--frames", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--voxels", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=0, help="feature D (default: the default backend's)")
    ap.add_argument("--guide-sigma", type=float, default=PipelineConfig().depth_guide_sigma,
                    help="depth_guide_sigma (default: the config default; 0 = bilinear)")
    ap.add_argument("--ab-guide", action="store_true", help="only the paired guided / bilinear cost (CPU, stride 2)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heap.configure()        # the node's heap settings: a frame costs here what it costs in the node
    dim = args.dim or feature_basis().shape[1]
    if args.ab_guide:
        paired_guide_cost(args.frames, dim, args.guide_sigma or PipelineConfig().depth_guide_sigma)
        return
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, cpu threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
          f"load average {load:.2f}, frame {W}x{H}, features {dim}-d at 1/{DOWN}")
    runs = [(s, args.guide_sigma) for s in (1, 2, 4)] + ([(2, 0.0)] if args.guide_sigma else [])
    for dev in devices:
        for stride, guide in runs:
            ms, ms_min, cpu_ms, nvox = time_fusion(dev, stride, args.frames, dim, guide)
            line = (f"{dev:5s} stride {stride}, {f'guide {guide:g}' if guide else 'bilinear':9s}: {ms:8.2f} ms/frame "
                    f"median wall (min {ms_min:.2f}, process CPU {cpu_ms:.2f} ms; {nvox} voxels fused per frame)")
            if stride == 2 and dev == "cpu":
                line += (f"  ratio to {TARGET_MS:.0f} ms target: {ms / TARGET_MS:.2f} (wall), "
                         f"{cpu_ms / TARGET_MS:.2f} (process CPU)")
            print(line)
    bpv = bytes_per_voxel(args.voxels, dim)
    print(f"bytes/voxel (D={dim}, incl. hash index, map full at {args.voxels} voxels): {bpv:.1f}  "
          f"ratio to {TARGET_BYTES} B target: {bpv / TARGET_BYTES:.3f}")


if __name__ == "__main__":
    main()
