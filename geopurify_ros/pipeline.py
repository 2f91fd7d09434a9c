"""The ROS-free mapping pipeline: features → voxel fusion → GeoPurify → labels / queries.

This is the one place where the parts are put together. The ROS node (`node/mapping_node.py`) and the
offline evaluator (`eval/`) both drive a `MappingPipeline`, so what is evaluated is what is deployed.

Threading: the node calls `process_frame`/`purify` from a worker thread and `query`/`labelled_cloud`/
`save`/`load`/`reset` from service callbacks. Feature extraction (the slow part) runs outside the lock;
everything that reads or writes the map holds `self._lock`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .camera import CameraModel, validate_pose
from .config import PipelineConfig
from .device import resolve_device
from .features import make_backend
from .pointcloud2 import make_cloud
from .purify.purifier import Purifier, PurifyConfig
from .purify.student import load_student
from .query import TextScorer
from .voxel_map import VoxelMap


@dataclass
class QueryResult:
    """Matches of a text query, best score first."""

    cloud: np.ndarray                 # structured array x,y,z,rgb,label,score
    scores: np.ndarray                # (M,) float32 calibrated scores in [0, 1]
    labels: list[str]                 # best closed-set label per match
    class_names: list[str]
    message: str = ""


@dataclass
class PipelineStats:
    frames_fused: int = 0
    purify_runs: int = 0
    last_fuse_ms: float = 0.0
    last_features_ms: float = 0.0
    last_purify_ms: float = 0.0


class MappingPipeline:
    def __init__(self, config: PipelineConfig | None = None, backend=None, student=None):
        self.config = config or PipelineConfig()
        self.config.validate()
        self.device = resolve_device(self.config.device)
        self.backend = backend if backend is not None else make_backend(
            self.config.feature_backend, device=str(self.device), **self._backend_options())
        self.scorer = TextScorer(self.backend, list(self.config.class_names),
                                 templates=list(self.config.prompt_templates) or None,
                                 negatives=list(self.config.query_negatives))
        if student is None:
            student = load_student(self.config.student_checkpoint or None, backend=self.backend.name,
                                   feature_dim=self.backend.dim)
        self.purifier = Purifier(student=student, config=self._purify_config(), device=self.device)
        self.voxel_map = self._new_map()
        self._lock = threading.RLock()
        self._stats = PipelineStats()
        self._version = 0                       # bumps on every map change; keys the label cache
        self._label_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._force_full = False                # next purify() must be a full pass (mode change, load)

    # ----------------------------------------------------------------------------------------
    # construction helpers
    def _backend_options(self) -> dict:
        opts = {}
        if self.config.feature_model:
            opts["model"] = self.config.feature_model
        if self.config.feature_pretrained:
            opts["pretrained"] = self.config.feature_pretrained
        if self.config.feature_image_width:
            opts["image_width"] = self.config.feature_image_width
        return opts

    def _purify_config(self) -> PurifyConfig:
        c = self.config
        return PurifyConfig(iterations=c.pooling_iterations, radius=c.pooling_radius, temperature=c.pooling_temperature,
                            affinity_threshold=c.affinity_threshold, color_gate=c.color_gate,
                            normal_gate=c.normal_gate)

    def _new_map(self) -> VoxelMap:
        c = self.config
        return VoxelMap(voxel_size=c.voxel_size, feature_dim=self.backend.dim, max_voxels=c.max_voxels,
                        eviction=c.eviction, device=self.device)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    # ----------------------------------------------------------------------------------------
    # mapping
    def process_frame(self, rgb: np.ndarray, depth: np.ndarray, cam: CameraModel,
                      T_world_cam: np.ndarray, stamp: float):
        """Encode one RGB-D keyframe and fuse it into the map.

        rgb: uint8 (H, W, 3); depth: float32 (H, W) metres, NaN = invalid; cam: intrinsics of both
        (depth registered to colour); T_world_cam: (4, 4) camera optical frame → map.
        Raises ValueError (field named) on inconsistent input; the map is untouched then.
        """
        rgb, depth, T = self._check_frame(rgb, depth, cam, T_world_cam)
        t0 = time.perf_counter()
        feats = self.backend.encode_image(rgb)            # outside the lock: the slow part
        t1 = time.perf_counter()
        with self._lock:
            stats = self.voxel_map.fuse_frame(
                torch.from_numpy(depth), feats, torch.from_numpy(rgb), cam, T, float(stamp),
                stride=self.config.stride, min_depth=self.config.min_depth,
                max_depth=self.config.max_depth, weighting=self.config.depth_weighting)
            self._version += 1
            self._stats.frames_fused += 1
            self._stats.last_features_ms = (t1 - t0) * 1e3
            self._stats.last_fuse_ms = (time.perf_counter() - t1) * 1e3
        return stats

    @staticmethod
    def _check_frame(rgb, depth, cam, T):
        # Checked before encoding: fuse_frame checks too, but only after the costly feature pass.
        rgb = np.asarray(rgb)
        depth = np.asarray(depth)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"rgb: expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        if depth.ndim != 2:
            raise ValueError(f"depth: expected (H, W), got {depth.shape}")
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"depth: shape {depth.shape} does not match color {rgb.shape[:2]} (register depth to colour)")
        if (cam.height, cam.width) != depth.shape:
            raise ValueError(f"camera_info: size {cam.width}x{cam.height} does not match image {depth.shape[1]}x{depth.shape[0]}")
        T = validate_pose(T, "pose")
        depth = depth.astype(np.float32, copy=False)
        valid = np.isfinite(depth)
        if not valid.any():
            raise ValueError("depth: no valid pixels")
        # Decoded ROS payloads are read-only views of the message buffer; torch needs writable memory.
        return _writable(rgb), _writable(depth), T

    def purify(self, incremental: bool = True) -> dict:
        """Run student purification + geometry-guided pooling where the map changed."""
        with self._lock:
            t0 = time.perf_counter()
            full = self._force_full or not incremental
            stats = self.purifier.purify(self.voxel_map, mode=self.config.purify_mode, incremental=not full)
            self._force_full = False
            self._version += 1
            self._stats.purify_runs += 1
            self._stats.last_purify_ms = (time.perf_counter() - t0) * 1e3
            return {"ms": self._stats.last_purify_ms, "voxels": len(self.voxel_map), "stats": stats}

    def set_purify_mode(self, mode: str) -> None:
        """Switch raw | purified | pooled; the next `purify()` recomputes the whole map."""
        old = self.config.purify_mode
        self.config.purify_mode = mode
        try:
            self.config.validate()
        except ValueError:
            self.config.purify_mode = old
            raise
        self._force_full = True

    # ----------------------------------------------------------------------------------------
    # reading the map
    def _current_features(self) -> torch.Tensor:
        """Purified features where up to date; raw fused features for voxels not purified yet."""
        vm = self.voxel_map
        if self._force_full or "purified" not in vm.channel_names():
            return vm.features_f32()
        feats = vm.channel("purified").float()
        dirty = vm.dirty_slots()
        if dirty.numel():
            feats[dirty] = vm.features_f32()[dirty]
        return feats

    def _labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._label_cache is None or self._label_cache[0] != self._version:
            labels, scores = self.scorer.label(self._current_features())
            self._label_cache = (self._version, labels, scores)
        return self._label_cache[1], self._label_cache[2]

    def _visible(self) -> torch.Tensor:
        return self.voxel_map.counts >= self.config.cloud_min_observations

    def labelled_cloud(self) -> np.ndarray:
        """Structured array (x, y, z, rgb, label, score) of every voxel seen often enough."""
        with self._lock:
            if len(self.voxel_map) == 0:
                return make_cloud(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8),
                                  np.zeros(0, np.uint16), np.zeros(0, np.float32))
            labels, scores = self._labels()
            keep = self._visible()
            vm = self.voxel_map
            return make_cloud(vm.xyz[keep].cpu().numpy(), vm.colors[keep].cpu().numpy(),
                              labels[keep].cpu().numpy().astype(np.uint16), scores[keep].cpu().numpy())

    def query(self, text: str, negatives: Sequence[str] = (), threshold: float | None = None,
              max_points: int | None = None) -> QueryResult:
        """Points matching free text, with calibrated scores and best closed-set labels."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text: empty query")
        threshold = self.config.query_threshold if threshold is None or threshold <= 0 else float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold: must be in [0, 1], got {threshold}")
        max_points = self.config.query_max_points if not max_points else int(max_points)
        negatives = [n for n in negatives if isinstance(n, str) and n.strip()]
        with self._lock:
            n = len(self.voxel_map)
            if n == 0:
                return QueryResult(self.labelled_cloud(), np.zeros(0, np.float32), [], self.class_names,
                                   "map is empty")
            keep = self._visible()
            scores = self.scorer.query(self._current_features(), text.strip(), negatives=negatives)
            scores = torch.where(keep, scores, torch.zeros_like(scores))
            idx = torch.nonzero(scores >= threshold).flatten()
            idx = idx[torch.argsort(scores[idx], descending=True)][:max_points]
            labels, _ = self._labels()
            vm = self.voxel_map
            sel_scores = scores[idx].float().cpu().numpy()
            sel_labels = labels[idx].cpu().numpy().astype(np.uint16)
            cloud = make_cloud(vm.xyz[idx].cpu().numpy(), vm.colors[idx].cpu().numpy(), sel_labels, sel_scores)
        names = self.class_names
        return QueryResult(cloud, sel_scores, [names[i] for i in sel_labels], names,
                           f"{len(idx)} of {n} voxels match '{text.strip()}' (threshold {threshold:.2f})")

    # ----------------------------------------------------------------------------------------
    # persistence and housekeeping
    def save(self, path: str | Path) -> None:
        with self._lock:
            self.voxel_map.save(path)

    def load(self, path: str | Path) -> None:
        new = VoxelMap.load(path, device=self.device)
        if new.feature_dim != self.backend.dim:
            raise ValueError(f"path: map has {new.feature_dim}-d features but backend "
                             f"'{self.backend.name}' produces {self.backend.dim}-d")
        with self._lock:
            self.voxel_map = new
            self._version += 1
            self._force_full = True

    def reset(self) -> None:
        with self._lock:
            self.voxel_map.reset()
            self._version += 1

    def stats(self) -> dict:
        with self._lock:
            s = self._stats
            return {
                "voxels": len(self.voxel_map), "dirty_voxels": int(self.voxel_map.dirty_slots().numel()),
                "map_bytes": int(self.voxel_map.nbytes()), "frames_fused": s.frames_fused,
                "purify_runs": s.purify_runs, "last_features_ms": s.last_features_ms,
                "last_fuse_ms": s.last_fuse_ms, "last_purify_ms": s.last_purify_ms,
                "device": str(self.device), "backend": self.backend.name,
            }


def _writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()
