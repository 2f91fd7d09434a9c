"""Benchmark text queries over a 200k-voxel, 384-d map: TextScorer.query, MappingPipeline.query, and how long a
query waits for the map lock while a purification pass runs.

    python bench/bench_query.py [--voxels 200000] [--repeats 7] [--threads 1] [--backend conse] [--device cpu]

Target: TextScorer.query <= 30 ms over 200k voxels (1 query + 4 canonical negatives, 1 CPU thread). The features
are passed as the map stores them (float16); the query's text embedding is cached after its first use, so the
scoring figure is with a warm text cache and the first-use encoding of a new text is printed separately.
The lock figure runs a full purification pass (the longest one: start-up, ~/load_map, mode change) in a second
thread and measures each pipeline.query issued meanwhile, minus the same query's time on an idle map.
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from geopurify_ros import staged_map

TARGET_MS = 30.0


SYNC = [lambda: None]        # torch.cuda.synchronize when timing on CUDA


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(median wall, min wall, median CPU of this thread) ms over `repeats` calls; with 1 torch thread the CPU figure
    is the work itself, without the time a loaded machine spends running other processes."""
    ts, cs = [], []
    for _ in range(repeats):
        SYNC[0]()
        t, c = time.perf_counter(), time.thread_time()
        fn()
        SYNC[0]()
        ts.append((time.perf_counter() - t) * 1e3)
        cs.append((time.thread_time() - c) * 1e3)
    return statistics.median(ts), min(ts), statistics.median(cs)


def synthetic_pipeline(n: int, backend: str, device: str = "cpu"):
    """A MappingPipeline whose map holds `n` voxels of room-like geometry with features near the class texts."""
    from geopurify_ros.config import PipelineConfig
    from geopurify_ros.pipeline import MappingPipeline
    from geopurify_ros.purify.scenes import large_scene

    pipe = MappingPipeline(PipelineConfig(device=device, feature_backend=backend, max_voxels=2 * n))
    s = large_scene(n, seed=0)
    g = torch.Generator().manual_seed(0)
    cls = pipe.scorer.class_embeddings
    mix = torch.randint(len(cls), (len(s.xyz),), generator=g)
    feats = (0.8 * cls[mix].cpu() + 0.05 * torch.randn(len(s.xyz), cls.shape[1], generator=g)).to(pipe.device)
    pipe.voxel_map.fuse(s.xyz, feats, s.colors, stamp=0.0, sensor_origin=s.xyz.mean(0))
    return pipe


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="conse")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if a.device.startswith("cuda"):
        SYNC[0] = torch.cuda.synchronize
    pipe = synthetic_pipeline(a.voxels, a.backend, a.device)
    n = len(pipe.voxel_map)
    print(f"torch {torch.__version__}, device {pipe.device}, threads {torch.get_num_threads()}, {os.cpu_count()} cores, load average "
          f"{load:.2f}; {n} voxels x {pipe.voxel_map.feature_dim}-d float16, backend {a.backend}, "
          f"{len(pipe.scorer.negatives)} canonical negatives")
    scorer = pipe.scorer
    feats16 = pipe.voxel_map.features
    t = time.perf_counter()
    scorer.query(feats16[:1], "a chair")
    print(f"first use of a query text (encoding, then cached): {(time.perf_counter() - t) * 1e3:.1f} ms")

    med, mn, cpu = timed(lambda: scorer.query(feats16, "a chair"), a.repeats)
    print(f"TextScorer.query, float16 features: {med:7.1f} ms median wall (min {mn:.1f}, CPU {cpu:.1f})  ratio to "
          f"{TARGET_MS:.0f} ms target: {med / TARGET_MS:.2f} (median), {mn / TARGET_MS:.2f} (min), "
          f"{cpu / TARGET_MS:.2f} (CPU)")
    stats = scorer.negative_stats(feats16)
    med, mn, cpu = timed(lambda: scorer.query(feats16, "a chair", stats=stats), a.repeats)
    print(f"  with cached negative statistics:  {med:7.1f} ms median wall (min {mn:.1f}, CPU {cpu:.1f})  ratio: "
          f"{med / TARGET_MS:.2f} (median), {mn / TARGET_MS:.2f} (min), {cpu / TARGET_MS:.2f} (CPU)")
    med, mn, cpu = timed(lambda: scorer.negative_stats(feats16), max(2, a.repeats // 3))
    print(f"  (TextScorer.negative_stats itself: {med:.1f} ms median wall, CPU {cpu:.1f})")
    feats32 = feats16.float()
    med, mn, cpu = timed(lambda: scorer.query(feats32, "a chair"), a.repeats)
    print(f"TextScorer.query, float32 features: {med:7.1f} ms median wall (min {mn:.1f}, CPU {cpu:.1f})")
    del feats32
    med, mn, cpu = timed(lambda: scorer.label(feats16), max(2, a.repeats // 3))
    print(f"TextScorer.label ({len(scorer.class_names)} classes):     {med:7.1f} ms median wall (min {mn:.1f}, "
          f"CPU {cpu:.1f})")

    pipe.purify(incremental=False)                       # purified channel present, dirty set empty
    med, mn, cpu = timed(lambda: pipe.query("a chair", max_points=1000), 1)
    print(f"MappingPipeline.query, first after a full pass (computes the negative statistics): {med:7.1f} ms "
          f"(CPU {cpu:.1f})")
    med, mn, cpu = timed(lambda: pipe.query("a chair", max_points=1000), a.repeats)
    print(f"MappingPipeline.query (purified map, labels of the matches): {med:7.1f} ms median wall (min {mn:.1f}, "
          f"CPU {cpu:.1f})  ratio to {TARGET_MS:.0f} ms: {med / TARGET_MS:.2f} (median), {mn / TARGET_MS:.2f} (min)")
    idle = mn

    # A query while the worker runs a full purification pass: how long does it wait for the map?
    pipe.set_purify_mode("pooled")
    done = threading.Event()
    passes: list[float] = []

    def purify():
        t0 = time.perf_counter()
        pipe.purify(incremental=False)
        passes.append((time.perf_counter() - t0) * 1e3)
        done.set()

    lock_waits = []

    def probe():   # how long the read side of the map lock takes to get, every 5 ms during the pass
        while not done.is_set():
            t0 = time.perf_counter()
            with pipe._lock.read():
                lock_waits.append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.005)

    th = threading.Thread(target=purify)
    th.start()
    waits = []
    time.sleep(0.05)
    prober = threading.Thread(target=probe)
    prober.start()
    while not done.is_set():
        t0 = time.perf_counter()
        pipe.query("a chair", max_points=1000)
        waits.append((time.perf_counter() - t0) * 1e3 - idle)
    th.join()
    prober.join()
    if waits:
        print(f"pipeline.query during a full purification pass ({passes[0]:.0f} ms): {len(waits)} queries, extra "
              f"latency over an idle map (includes sharing the CPU with the pass): median "
              f"{statistics.median(waits):.0f} ms, max {max(waits):.0f} ms")
    if lock_waits:
        print(f"  map lock (read side) wait during the pass: {len(lock_waits)} probes, median "
              f"{statistics.median(lock_waits):.2f} ms, max {max(lock_waits):.1f} ms (commit blocks of "
              f"{staged_map.COMMIT_BLOCK_ROWS} rows)")


if __name__ == "__main__":
    main()
