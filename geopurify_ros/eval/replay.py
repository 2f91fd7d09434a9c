"""Replay a bag offline: `replay_offline` feeds `BagSource` frames (data/bag_source.py, the node's pairing and
pose rules) through `MappingPipeline` (same keyframe gate as the node), then purifies the one fused map three
ways (raw / purified / pooled).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.bag_source import BagSource
from . import EvalError


# --------------------------------------------------------------------- offline replay
MODES = ("raw", "purified", "pooled")


@dataclass
class ReplayResult:
    """Final labelled clouds per purify mode, plus throughput of the replay."""

    clouds: dict[str, np.ndarray]
    frames_read: int
    frames_fused: int
    seconds: float
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames_read / self.seconds if self.seconds > 0 else float("nan")


def keyframe_selector(params: dict[str, Any]):
    """The node's keyframe gate, built from the same parameters (so offline fuses the same frames)."""
    from geopurify_ros.node.sync import KeyframeSelector

    keys = {"keyframe_min_translation_m": "min_translation_m", "keyframe_min_rotation_deg": "min_rotation_deg",
            "keyframe_max_interval_s": "max_interval_s"}
    return KeyframeSelector(**{v: float(params[k]) for k, v in keys.items() if k in params})


def _on_worker_thread(fn, *args):
    """Run `fn` on a fresh thread (as the node's MapWorker does) and return its result / re-raise its error.

    Why: torch's intra-op threads behave per calling thread; on 2 busy cores the main thread ran
    process_frame 3-4x slower than a worker thread, which made offline look much slower than the node.
    """
    import threading

    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    th = threading.Thread(target=target, name="geopurify_eval_worker")
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def replay_offline(source: BagSource, config, params: dict[str, Any], modes=MODES, max_frames: int | None = None,
                   progress: bool = True, ablation: bool = False) -> ReplayResult:
    """Fuse the bag's frames with `MappingPipeline`, then label the map once per purify mode."""
    try:
        from geopurify_ros.pipeline import MappingPipeline

        pipe = MappingPipeline(config)
    except (ValueError, OSError) as exc:       # e.g. a missing student checkpoint
        raise EvalError(f"pipeline: {exc}") from None
    return _on_worker_thread(_replay_offline, pipe, source, config, params, modes, max_frames, progress, ablation)


def ablation_clouds(pipe, variants=None, fixed: dict | None = None) -> dict[str, np.ndarray]:
    """Labelled clouds of the GeoPurify ablation variants (eval/ablation.py) on the pipeline's fused map
    (`fixed`: embeddings for teacher / oracle variants, `ablation.ceiling_embeddings`)."""
    from geopurify_ros.pointcloud2 import make_cloud

    from .ablation import default_variants, run_variant

    vm, cfg = pipe.voxel_map, pipe.purifier.config
    keep = (vm.counts >= pipe.config.cloud_min_observations).cpu()
    out = {}
    for v in variants or default_variants(cfg.iterations):
        labels, scores = pipe.scorer.label(run_variant(v, vm, pipe.purifier.student, cfg, fixed))
        out[v.name] = make_cloud(vm.xyz[keep].cpu().numpy(), vm.colors[keep].cpu().numpy(),
                                 labels[keep].cpu().numpy().astype(np.uint16), scores[keep].cpu().numpy())
    return out


def _replay_offline(pipe, source: BagSource, config, params, modes, max_frames, progress, ablation=False) -> ReplayResult:
    from tqdm import tqdm

    gate = keyframe_selector(params)
    total = source.connections[source.topics.color].msgcount
    total = min(total, max_frames) if max_frames else total
    n_read = n_fused = 0
    frame_s = 0.0
    t0 = time.perf_counter()
    for fr in tqdm(source.frames(max_frames=max_frames), total=total, desc="offline replay", unit="frame",
                   disable=not progress, leave=False):
        n_read += 1
        if not gate.is_keyframe(fr.stamp, fr.T_world_cam):
            continue
        gate.accept(fr.stamp, fr.T_world_cam)
        t1 = time.perf_counter()
        pipe.process_frame(fr.rgb, fr.depth, fr.cam, fr.T_world_cam, fr.stamp)
        frame_s += time.perf_counter() - t1
        n_fused += 1
    fuse_s = time.perf_counter() - t0
    if n_read == 0:
        raise EvalError(f"bag {source.path}: no posed frame could be assembled ({source.skipped})")
    clouds = {}
    for mode in modes:                    # fuse once, purify three ways (full pass: not incremental)
        pipe.set_purify_mode(mode)
        pipe.purify(incremental=False)
        clouds[mode] = pipe.labelled_cloud()
    extra_clouds = ablation_clouds(pipe) if ablation else None
    return ReplayResult(clouds=clouds, frames_read=n_read, frames_fused=n_fused, seconds=fuse_s, source="offline",
                        extra={"ablation_clouds": extra_clouds, "skipped": dict(source.skipped),
                               "total_s": time.perf_counter() - t0,
                               "frame_ms_mean": 1e3 * frame_s / max(n_fused, 1),
                               "class_names": list(getattr(pipe, "class_names", config.class_names))})
