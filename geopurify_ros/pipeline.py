"""The ROS-free mapping pipeline: features → voxel fusion → GeoPurify → labels / queries.

This is the one place where the parts are put together. The ROS node (`node/mapping_node.py`) and the
offline evaluator (`eval/`) both drive a `MappingPipeline`, so what is evaluated is what is deployed.

Threading: the node calls `process_frame`/`purify` from a worker thread and `query`/`labelled_cloud`/
`save`/`load`/`reset` from service callbacks. `self._lock` is a readers-writer lock (rwlock.py): queries, clouds
and saving read; fusion, `load` and `reset` write, and writers are serialised by `self._writers`; `stats()` takes
no lock (writers record its figures).
Feature extraction (the slow part of a frame) runs outside the lock. A purification pass computes under the read
side on a StagedMap (staged_map.py), so queries run meanwhile, and takes the write side only to commit its results,
one block of rows at a time: a query waits for at most one fusion or one commit block.
"""
from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .camera import CameraModel, count_fusable_depth, validate_pose
from .config import PipelineConfig
from .device import resolve_device
from .features import backend_key, make_backend
from .pointcloud2 import make_cloud
from .purify.purifier import Purifier, PurifyConfig
from .purify.student import load_student
from .query import TextScorer
from .rwlock import RWLock
from .staged_map import StagedMap
from .voxel_map import VoxelMap

PURIFIED = "purified"           # the Purifier's output channel (PurifyConfig.output_channel)
QUERY_STATS = "query_stats"     # per voxel: TextScorer.negative_stats of its purified row; NaN = to compute


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
    voxels: int = 0                   # map figures as of the last write (stats() reads them without the lock)
    dirty_voxels: int = 0
    map_bytes: int = 0


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
            digest = getattr(self.backend, "weights_digest", None)         # duck-typed test backends have none
            student = load_student(self.config.student_checkpoint or None, backend=self.backend.name,
                                   feature_dim=self.backend.dim,
                                   feature_basis=getattr(self.backend, "feature_basis", None),
                                   feature_weights=digest() if digest else None)
        self.purifier = Purifier(student=student, config=self._purify_config(), device=self.device)
        self.voxel_map = self._new_map()
        self._lock = RWLock()
        self._writers = threading.Lock()        # one writer at a time, held for a whole purification pass
        self._staged: StagedMap | None = None   # the view purification writes through (one per map object)
        self._stats = PipelineStats()
        self._version = 0                       # bumps on every map change; keys the label cache
        self._label_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._force_full = False                # next purify() must be a full pass (mode change, load)
        self._full_requests = 0                 # counts _force_full requests: one made during a pass survives it

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
        if self.config.feature_compile:
            if backend_key(self.config.feature_backend) == "lseg":
                opts["compile"] = True
            else:
                warnings.warn(f"feature_compile: only the lseg backend compiles its encoder; ignored for "
                              f"'{self.config.feature_backend}'", RuntimeWarning, stacklevel=2)
        return opts

    def _purify_config(self) -> PurifyConfig:
        c = self.config
        return PurifyConfig(iterations=c.pooling_iterations, radius=c.pooling_radius, temperature=c.pooling_temperature,
                            affinity_threshold=c.affinity_threshold, color_gate=c.color_gate,
                            normal_gate=c.normal_gate)

    def _new_map(self) -> VoxelMap:
        c = self.config
        vm = VoxelMap(voxel_size=c.voxel_size, feature_dim=self.backend.dim, max_voxels=c.max_voxels,
                      eviction=c.eviction, device=self.device)
        vm.warm_up()
        self._fresh_query_stats(vm)
        return vm

    def _fresh_query_stats(self, vm: VoxelMap) -> None:
        """(Re)create the QUERY_STATS channel, all rows "not computed" (a loaded file's may come from other negatives)."""
        vm.remove_channel(QUERY_STATS)
        vm.add_channel(QUERY_STATS, (2 + len(self.scorer.negatives),), torch.float32, fill=float("nan"))

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
        with self._writers, self._lock.write():
            stats = self.voxel_map.fuse_frame(
                torch.from_numpy(depth), feats, torch.from_numpy(rgb), cam, T, float(stamp),
                stride=self.config.stride, min_depth=self.config.min_depth,
                max_depth=self.config.max_depth, weighting=self.config.depth_weighting,
                guide_sigma=self.config.depth_guide_sigma)
            self._version += 1
            self._stats.frames_fused += 1
            self._stats.last_features_ms = (t1 - t0) * 1e3
            self._stats.last_fuse_ms = (time.perf_counter() - t1) * 1e3
            self._note_map()
        return stats

    def _check_frame(self, rgb, depth, cam, T):
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
        c = self.config
        if count_fusable_depth(depth, c.stride, c.min_depth, c.max_depth) == 0:
            raise ValueError(f"depth: no pixel of the stride-{c.stride} grid within [min_depth, max_depth] = "
                             f"[{c.min_depth:g}, {c.max_depth:g}] m: nothing to fuse")
        # Decoded ROS payloads are read-only views of the message buffer; torch needs writable memory.
        return _writable(rgb), _writable(depth), T

    def purify(self, incremental: bool = True) -> dict:
        """Run student purification + geometry-guided pooling where the map changed.

        Computed under the read side of the lock on a StagedMap (readers keep going), then committed under the write
        side in blocks of rows (staged_map.COMMIT_BLOCK_ROWS), releasing it in between.
        """
        with self._writers:
            t0 = time.perf_counter()
            with self._lock.read():
                full = self._force_full or not incremental
                requests = self._full_requests
                if self._staged is None or self._staged.map is not self.voxel_map:
                    self._staged = StagedMap(self.voxel_map)
                staged = self._staged
                staged.begin()
                stats = self.purifier.purify(staged, mode=self.config.purify_mode, incremental=not full)
            blocks = staged.commit_blocks()
            more = True
            while more:
                with self._lock.write():
                    step = next(blocks, _DONE)
                    more = step is not _DONE
                    if more and step[0] == PURIFIED:       # these rows' query statistics are stale now
                        self.voxel_map.channel(QUERY_STATS).index_fill_(0, step[1], float("nan"))
                    if not more and requests == self._full_requests:
                        self._force_full = False
                    self._version += 1
                    self._note_map()
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
        self._full_requests += 1

    # ----------------------------------------------------------------------------------------
    # reading the map (callers hold the read side of the lock)
    def _current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D) float16, slots (K,) whose row must be read from the raw features instead).

        Purified features where up to date; raw fused features for voxels fused since the last pass (dirty) or for
        all voxels when the next pass is a full one. Both are the map's own storage: nothing is copied.
        """
        vm = self.voxel_map
        if not self._purified_current():
            return vm.features, torch.zeros(0, dtype=torch.long, device=vm.device)
        return vm.channel(PURIFIED), vm.dirty_slots()

    def _purified_current(self) -> bool:
        return not self._force_full and PURIFIED in self.voxel_map.channel_names()

    def _query_stats(self) -> torch.Tensor | None:
        """TextScorer.negative_stats of the purified rows, computed for the rows that changed since last asked.

        Rows are invalidated (NaN) when a purification commit rewrites them and start invalid for new voxels; the
        map keeps the channel aligned through evictions. Concurrent readers may fill the same rows: same values.
        """
        if not self._purified_current():
            return None
        vm = self.voxel_map
        stats = vm.channel(QUERY_STATS)
        todo = torch.isnan(stats[:, 0]).nonzero().squeeze(1)
        if todo.numel() > len(stats) // 2:
            stats.copy_(self.scorer.negative_stats(vm.channel(PURIFIED)))
        elif todo.numel():
            stats[todo] = self.scorer.negative_stats(vm.channel(PURIFIED).index_select(0, todo))
        return stats

    def _current_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Current features (K, D) float16 of the voxels `slots`."""
        base, raw = self._current()
        rows = base[slots]
        if raw.numel():
            is_raw = torch.zeros(len(self.voxel_map), dtype=torch.bool, device=raw.device)
            is_raw[raw] = True
            pick = is_raw[slots].nonzero().squeeze(1)
            rows[pick] = self.voxel_map.features[slots[pick]]
        return rows

    def _labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._label_cache
        if cache is None or cache[0] != self._version:
            base, raw = self._current()
            labels, scores = self.scorer.label(base)
            if raw.numel():
                labels[raw], scores[raw] = self.scorer.label(self.voxel_map.features[raw])
            cache = self._label_cache = (self._version, labels, scores)
        return cache[1], cache[2]

    def _labels_of(self, slots: torch.Tensor) -> torch.Tensor:
        """Closed-set labels of `slots`: from the cache when it is current, else for these voxels only."""
        cache = self._label_cache
        if cache is not None and cache[0] == self._version:
            return cache[1][slots]
        return self.scorer.label(self._current_rows(slots))[0]

    def _visible(self) -> torch.Tensor:
        return self.voxel_map.counts >= self.config.cloud_min_observations

    def labelled_cloud(self) -> np.ndarray:
        """Structured array (x, y, z, rgb, label, score) of every voxel seen often enough."""
        with self._lock.read():
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
        with self._lock.read():
            n = len(self.voxel_map)
            if n == 0:
                return QueryResult(self.labelled_cloud(), np.zeros(0, np.float32), [], self.class_names,
                                   "map is empty")
            base, raw = self._current()
            scores = self.scorer.query(base, text.strip(), negatives=negatives, stats=self._query_stats())
            if raw.numel():
                scores[raw] = self.scorer.query(self.voxel_map.features[raw], text.strip(), negatives=negatives)
            scores.masked_fill_(~self._visible(), 0.0)
            idx = torch.nonzero(scores >= threshold).flatten()
            top = scores[idx]                              # best first; topk: no full sort of many matches
            idx = idx[torch.topk(top, max_points).indices if len(idx) > max_points
                      else torch.argsort(top, descending=True)]
            vm = self.voxel_map
            sel_scores = scores[idx].float().cpu().numpy()
            sel_labels = self._labels_of(idx).cpu().numpy().astype(np.uint16)
            cloud = make_cloud(vm.xyz[idx].cpu().numpy(), vm.colors[idx].cpu().numpy(), sel_labels, sel_scores)
        names = self.class_names
        return QueryResult(cloud, sel_scores, [names[i] for i in sel_labels.tolist()], names,
                           f"{len(idx)} of {n} voxels match '{text.strip()}' (threshold {threshold:.2f})")

    # ----------------------------------------------------------------------------------------
    # persistence and housekeeping
    def save(self, path: str | Path) -> None:
        with self._lock.read():
            self.voxel_map.save(path)

    def load(self, path: str | Path) -> None:
        new = VoxelMap.load(path, device=self.device)
        if new.feature_dim != self.backend.dim:
            raise ValueError(f"path: map has {new.feature_dim}-d features but backend "
                             f"'{self.backend.name}' produces {self.backend.dim}-d")
        self._fresh_query_stats(new)
        with self._writers, self._lock.write():
            self.voxel_map = new
            self._version += 1
            self._force_full = True
            self._full_requests += 1
            self._note_map()

    def reset(self) -> None:
        with self._writers, self._lock.write():
            self.voxel_map.reset()
            self._version += 1
            self._note_map()

    def _note_map(self) -> None:
        """Record the map figures stats() reports (callers hold the write side)."""
        vm = self.voxel_map
        self._stats.voxels, self._stats.map_bytes = len(vm), int(vm.nbytes())
        self._stats.dirty_voxels = int(vm.dirty_slots().numel())

    def stats(self) -> dict:
        """Counters and map figures as of the last write. Lock-free: /diagnostics must not wait for a fusion
        (an rclpy callback blocked in a mutually exclusive group makes the executor spin)."""
        s = self._stats
        return {
            "voxels": s.voxels, "dirty_voxels": s.dirty_voxels, "map_bytes": s.map_bytes,
            "frames_fused": s.frames_fused, "purify_runs": s.purify_runs, "last_features_ms": s.last_features_ms,
            "last_fuse_ms": s.last_fuse_ms, "last_purify_ms": s.last_purify_ms,
            "device": str(self.device), "backend": self.backend.name,
            "feature_compile": getattr(getattr(self.backend, "encoder", None), "status", "off"),
        }


_DONE = object()


def _writable(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a if a.flags.writeable else a.copy()
