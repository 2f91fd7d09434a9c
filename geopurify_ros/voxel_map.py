"""Sparse voxel map on torch: per-voxel running weighted means of features, position and colour.

Storage is slot-indexed and compact (slots 0..len-1, no holes); buffers are over-allocated (amortised
doubling up to ``max_voxels``) and the public attributes are views of the first ``len`` rows.

Voxel hash: integer voxel coords ``(i, j, k) = floor(p / voxel_size)`` are packed into one int64 key,
21 bits per axis with an offset of 2**20, i.e. each coordinate must lie in [KEY_MIN, KEY_MAX] =
[-1048576, 1048575] voxels (±52 km at 5 cm); points outside are dropped. Key order is lexicographic in
(i, j, k). The index is a sorted key array plus the slot of each key; lookups are ``searchsorted``,
inserts merge the (already sorted) new keys in O(len) without re-sorting the map.
"""
from __future__ import annotations

import itertools
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from . import fusion_kernels
from .camera import CameraModel, backproject_grid, check_grid_args, stride_grid, validate_pose
from .device import resolve_device

KEY_BITS = 21
KEY_OFFSET = 1 << (KEY_BITS - 1)
KEY_MIN = -KEY_OFFSET
KEY_MAX = KEY_OFFSET - 1
_KEY_MASK = (1 << KEY_BITS) - 1
FORMAT_NAME = "geopurify_ros.VoxelMap"
FORMAT_VERSION = 1
EVICTION_POLICIES = ("farthest", "lru")
WEIGHTINGS = ("depth", "uniform")
_INITIAL_CAPACITY = 4096
_LERP_BLOCK_BYTES = 1 << 20  # float32 bytes per block of the feature fold (fits L2)


def pack_keys(ijk: torch.Tensor) -> torch.Tensor:
    """(N,3) int64 voxel coords in [KEY_MIN, KEY_MAX] -> (N,) int64 keys (non-negative)."""
    u = ijk + KEY_OFFSET
    return (u[:, 0] << (2 * KEY_BITS)) | (u[:, 1] << KEY_BITS) | u[:, 2]


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys -> (N,3) int64 voxel coords."""
    return torch.stack(((keys >> (2 * KEY_BITS)) & _KEY_MASK, (keys >> KEY_BITS) & _KEY_MASK, keys & _KEY_MASK),
                       dim=1) - KEY_OFFSET


def voxel_coords(points: torch.Tensor, voxel_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,3) float points -> ((N,3) int64 voxel coords, (N,) bool in-range mask)."""
    ijk = torch.floor(points / voxel_size)
    ok = ((ijk >= KEY_MIN) & (ijk <= KEY_MAX)).all(dim=1)
    return ijk.clamp_(KEY_MIN, KEY_MAX).to(torch.int64), ok


def _group_pairs(ijk: torch.Tensor, cell: torch.Tensor, ncell: int, bounds=None):
    """Group points by (voxel, cell) with one sort.

    Args: ijk (N,3) int64 voxel coords, cell (N,) int64 in [0, ncell); bounds: per-axis (min, max) (3,) int64 of
    ijk when the caller has them.
    Returns: ukeys (M,) sorted unique voxel keys, pvox (P,) voxel index of each pair (non-decreasing),
    pcell (P,) cell of each pair, pinv (N,) pair index of each point.
    Voxel coords are re-indexed relative to the frame's bounding box so (voxel, cell) fits one int64 whose order
    is the voxel-key order (both lexicographic in i, j, k); the global keys are only formed for the M voxels.
    """
    lo, hi = ijk.aminmax(dim=0) if bounds is None else bounds
    si, sj, sk = (hi - lo + 1).tolist()
    if si * sj * sk * ncell < 2 ** 62:
        # int32 pair keys when the frame's box fits (cheaper sort); same order either way.
        kt = torch.int32 if si * sj * sk * ncell < 2 ** 31 else torch.int64
        rel = (ijk - lo).to(kt)
        local = (rel[:, 0] * sj + rel[:, 1]) * sk + rel[:, 2]
        upair, pinv = torch.unique(local * ncell + cell.to(kt), return_inverse=True)
        ulocal, pvox = torch.unique_consecutive(upair // ncell, return_inverse=True)
        ulocal = ulocal.to(torch.int64)
        uijk = torch.stack((ulocal // (sj * sk), (ulocal // sk) % sj, ulocal % sk), 1) + lo
        return pack_keys(uijk), pvox, (upair % ncell).to(torch.int64), pinv
    # Frame spans a huge extent: two sorts (voxel keys, then pairs of voxel index and cell).
    ukeys, vinv = torch.unique(pack_keys(ijk), return_inverse=True)
    upair, pinv = torch.unique(vinv * ncell + cell, return_inverse=True)
    return ukeys, upair // ncell, upair % ncell, pinv


def _wide_rows(t: torch.Tensor) -> torch.Tensor:
    """(C, ...) contiguous tensor viewed as (C, k) of the widest integer type dividing a row's bytes.

    Row gathers/scatters then move a few wide words per row (CPU index kernels are per element and slow for
    float16); the bits are untouched, so this is exact for every dtype.
    """
    flat = t.reshape(t.shape[0], -1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    row_bytes = flat.shape[1] * flat.element_size()
    for dt in (torch.int64, torch.int32, torch.int16):
        size = dt.itemsize
        if row_bytes % size == 0 and size > flat.element_size():
            return flat.view(dt)
    return flat


def _row_view(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, ...) contiguous tensor viewed as (C, k) of ``dtype`` when a row's bytes divide evenly, else ``_wide_rows``.

    Bit-exact reinterpretation for row moves only (no arithmetic): CPU ``index_select`` takes a row-memcpy path for
    float64 and ``index_copy_`` moves 16-byte elements fastest as complex128 (measured, torch 2.x).
    """
    flat = t.reshape(t.shape[0], -1)
    size = dtype.itemsize
    if t.device.type == "cpu" and (flat.shape[1] * flat.element_size()) % size == 0 and flat.element_size() < size:
        return flat.view(dtype)
    return _wide_rows(t)


def _sample_grid(cam: CameraModel, stride: int, h: int, w: int, dev) -> tuple[torch.Tensor, ...]:
    """Per pixel of ``camera.stride_grid``: flat pixel index (n,) long, top-left cell (n,) long of the bilinear
    sample in an (h, w) feature grid, and the fractions (n, 2) float32 (ax, ay); and per feature cell the flat index
    (h * w,) long of the pixel nearest its centre (`cell_depths`). Cached: they only depend on geometry.

    Full-res pixel centre (row, col) samples the low-res grid at ((row+0.5)*h/H - 0.5, (col+0.5)*w/W - 0.5), clamped
    to the border (= grid_sample(align_corners=False, padding_mode="border")).
    """
    key = (cam, int(stride), h, w, str(dev))
    hit = _SAMPLE_GRIDS.get(key)
    if hit is None:
        pix, _ = stride_grid(cam, stride, dev)
        H, W = cam.height, cam.width
        fy = ((pix[:, 0].to(torch.float32) + 0.5) * (h / H) - 0.5).clamp_(0, h - 1)
        fx = ((pix[:, 1].to(torch.float32) + 0.5) * (w / W) - 0.5).clamp_(0, w - 1)
        y0 = fy.floor().clamp_(max=max(h - 2, 0))
        x0 = fx.floor().clamp_(max=max(w - 2, 0))
        rows = ((torch.arange(h, device=dev) + 0.5) * (H / h)).long().clamp_(max=H - 1)
        cols = ((torch.arange(w, device=dev) + 0.5) * (W / w)).long().clamp_(max=W - 1)
        hit = (pix[:, 0] * W + pix[:, 1], y0.to(torch.int64) * w + x0.to(torch.int64), torch.stack((fx - x0, fy - y0), 1),
               (rows[:, None] * W + cols[None, :]).reshape(-1))
        if len(_SAMPLE_GRIDS) >= 8:
            _SAMPLE_GRIDS.clear()
        _SAMPLE_GRIDS[key] = hit
    return hit


_SAMPLE_GRIDS: dict = {}
GUIDE_FLOOR = 1e-4     # depth affinity of a cell at another depth (or with no depth): all four that far = bilinear


def cell_depths(depth: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(h * w,) float32: the depth at the pixel nearest each feature cell's centre (``centres``, from `_sample_grid`),
    NaN where the depth is missing: the depth the cell's feature describes, for depth-guided sampling."""
    zc = depth.reshape(-1).index_select(0, centres).to(torch.float32)
    return zc.masked_fill_(~(zc > 0), float("nan"))


def bilinear_corner_weights(ax: torch.Tensor, ay: torch.Tensor) -> torch.Tensor:
    """(N, 4) bilinear weights of the corners 00, 01, 10, 11 for fractions ax, ay (N,)."""
    bx, by = 1 - ax, 1 - ay
    return torch.stack((bx * by, ax * by, bx * ay, ax * ay), 1)


def depth_affinity(d: torch.Tensor) -> torch.Tensor:
    """The guide's affinity for a normalised depth difference d: (1 - d^2 / 2048)_+^1024, a Gaussian exp(-d^2 / 2)
    to within 1 % for |d| <= 3 (where it is 0.011) that the fusion kernel evaluates without a call or a branch (ten
    squarings; it vectorises where expf does not); at least ``GUIDE_FLOOR``, which is also what NaN gives."""
    e = (1 - d * d * (1 / 2048)).clamp_min_(0)
    for _ in range(10):
        e = e * e
    return torch.nan_to_num(e, nan=0.0).clamp_min_(GUIDE_FLOOR)


def guided_corner_weights(ax: torch.Tensor, ay: torch.Tensor, z: torch.Tensor, corner_depth: torch.Tensor,
                          sigma: float) -> torch.Tensor:
    """(N, 4) weights of the corners 00, 01, 10, 11 of each point's bilinear sample, each multiplied by the point's
    depth affinity to that cell, ``depth_affinity((z - z_cell) / (sigma z))`` (≈ a Gaussian; NaN cell depth gives
    the floor), renormalised to sum 1 (joint bilateral upsampling with depth as the guide, Kopf et al. 2007).

    Why: a stride-8 cell on an object's silhouette is blended into the wall behind it (and the wall into the object)
    by plain bilinear sampling; weighting by depth agreement keeps each 3D point's feature from cells on its own
    surface. ax, ay, z (N,); corner_depth (N, 4)."""
    c = bilinear_corner_weights(ax, ay) * depth_affinity((z[:, None] - corner_depth) / (sigma * z[:, None]))
    return c / c.sum(1, keepdim=True)


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and fusion_kernels.available():
        return fusion_kernels.all_finite(t.detach().numpy())
    # min/max propagate NaN and expose +-inf: one reduction pass instead of an isfinite mask over (h, w, D).
    lo, hi = t.aminmax()
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


@dataclass
class FuseStats:
    """Outcome of one fuse: voxels created, existing voxels updated, voxels evicted, points fused."""

    new: int = 0
    updated: int = 0
    evicted: int = 0
    points: int = 0


def _as_tensor(x, name: str, device, dtype=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, (list, tuple)):
        x = torch.as_tensor(np.asarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a Tensor or ndarray, got {type(x).__name__}")
    return x.to(device=device, dtype=dtype if dtype is not None else x.dtype)


class VoxelMap:
    """Sparse voxel map; see module docstring for the hashing scheme.

    Per-slot state (views, length ``len(map)``): ``keys`` int64 (M,), ``xyz`` float32 (M,3) weighted mean position,
    ``features`` float16 (M,D) weighted mean, ``colors`` uint8 (M,3) weighted mean RGB, ``weights`` float32 (M,)
    weight sum, ``counts`` int32 (M,) number of points fused, ``last_seen`` float64 (M,) stamp of the last fuse.

    Eviction keeps ``len(map) <= max_voxels`` at all times: before new voxels are inserted, the
    ``farthest`` policy drops the voxels (old or new) farthest from the sensor origin of the current fuse; ``lru``
    drops the voxels with the oldest ``last_seen`` not touched by the current fuse, then (only if the frame
    alone overflows the map) the farthest voxels of the frame. ``evict_margin`` (fraction of ``max_voxels``)
    evicts extra untouched voxels when eviction triggers, so that a full map does not pay for a top-k every frame.
    """

    _CORE = ("keys", "xyz", "features", "colors", "weights", "counts", "last_seen", "dirty")

    def __init__(self, voxel_size: float = 0.05, feature_dim: int = 384, max_voxels: int = 500_000,
                 eviction: str = "farthest", device="cpu", evict_margin: float = 0.0):
        if not (np.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"voxel_size: expected a positive value, got {voxel_size!r}")
        if int(feature_dim) != feature_dim or feature_dim < 1:
            raise ValueError(f"feature_dim: expected a positive integer, got {feature_dim!r}")
        if int(max_voxels) != max_voxels or max_voxels < 1:
            raise ValueError(f"max_voxels: expected a positive integer, got {max_voxels!r}")
        if eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction: unknown policy '{eviction}' (expected one of {EVICTION_POLICIES})")
        if not (0.0 <= evict_margin < 1.0):
            raise ValueError(f"evict_margin: expected a fraction in [0, 1), got {evict_margin!r}")
        self.voxel_size = float(voxel_size)
        self.feature_dim = int(feature_dim)
        self.max_voxels = int(max_voxels)
        self.eviction = eviction
        self.evict_margin = float(evict_margin)
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self._specs: dict[str, tuple[tuple, torch.dtype, float]] = {}  # auxiliary channels
        self._kernel_ws = None      # fusion_kernels.Workspace, made on the first kernel fuse
        self._alloc(0)

    # ------------------------------------------------------------------ storage
    def _core_specs(self) -> dict:
        return {"keys": ((), torch.int64, 0), "xyz": ((3,), torch.float32, 0), "features": ((self.feature_dim,),
                torch.float16, 0), "colors": ((3,), torch.uint8, 0), "weights": ((), torch.float32, 0),
                "counts": ((), torch.int32, 0), "last_seen": ((), torch.float64, 0), "dirty": ((), torch.bool, 0)}

    def _all_specs(self) -> dict:
        return {**self._core_specs(), **{"ch:" + k: v for k, v in self._specs.items()}}

    def _alloc(self, capacity: int) -> None:
        self._n = 0
        self._cap = capacity
        self._buf = {name: torch.zeros((capacity, *shape), dtype=dt, device=self.device)
                     for name, (shape, dt, _) in self._all_specs().items()}
        self._skeys = torch.empty(0, dtype=torch.int64, device=self.device)   # sorted keys
        self._sslots = torch.empty(0, dtype=torch.int64, device=self.device)  # slot of each sorted key
        self._origin: torch.Tensor | None = None

    def _reserve(self, needed: int) -> None:
        if needed <= self._cap:
            return
        cap = min(max(needed, 2 * self._cap, _INITIAL_CAPACITY), self.max_voxels)
        for name, buf in self._buf.items():
            # zeros, not empty: the pages are touched (faulted in) now, in the one frame that grows the map, instead
            # of a few at a time in every later frame that inserts voxels.
            new = torch.zeros((cap, *buf.shape[1:]), dtype=buf.dtype, device=self.device)
            new[: self._n] = buf[: self._n]
            self._buf[name] = new
        self._cap = cap

    def __len__(self) -> int:
        return self._n

    keys = property(lambda self: self._buf["keys"][: self._n])
    xyz = property(lambda self: self._buf["xyz"][: self._n])
    features = property(lambda self: self._buf["features"][: self._n])
    colors = property(lambda self: self._buf["colors"][: self._n])
    weights = property(lambda self: self._buf["weights"][: self._n])
    counts = property(lambda self: self._buf["counts"][: self._n])
    last_seen = property(lambda self: self._buf["last_seen"][: self._n])

    @property
    def origin(self) -> torch.Tensor | None:
        """Sensor origin (3,) of the latest fuse that had one (used by the ``farthest`` policy)."""
        return self._origin

    def features_f32(self) -> torch.Tensor:
        """(M, D) float32 copy of the mean features."""
        return self.features.float()

    def voxel_centers(self) -> torch.Tensor:
        """(M, 3) float32 centres of the voxel cells (not the mean point positions)."""
        return (unpack_keys(self.keys).to(torch.float32) + 0.5) * self.voxel_size

    def nbytes(self) -> int:
        """Bytes held by this map on its device: all buffers at their allocated capacity plus the hash index."""
        total = sum(b.numel() * b.element_size() for b in self._buf.values())
        return total + (self._skeys.numel() + self._sslots.numel()) * 8

    # ------------------------------------------------------------------ channels
    def add_channel(self, name: str, trailing_shape=(), dtype=torch.float32, fill=0) -> None:
        """Register an auxiliary per-voxel channel (kept aligned with the slots); existing voxels get ``fill``.

        Re-adding an identical channel is a no-op; a different spec under the same name raises ValueError.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty string, got {name!r}")
        if not isinstance(trailing_shape, (tuple, list)):
            trailing_shape = (trailing_shape,)
        shape = tuple(int(s) for s in trailing_shape)
        if any(s < 1 for s in shape):
            raise ValueError(f"trailing_shape: expected positive sizes, got {trailing_shape!r}")
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype: expected a torch.dtype, got {dtype!r}")
        spec = (shape, dtype, fill)
        if name in self._specs:
            if self._specs[name] != spec:
                raise ValueError(f"name: channel '{name}' already exists with spec {self._specs[name]}, got {spec}")
            return
        self._specs[name] = spec
        self._buf["ch:" + name] = torch.full((self._cap, *shape), fill, dtype=dtype, device=self.device)

    def remove_channel(self, name: str) -> None:
        """Drop an auxiliary channel (no-op if absent)."""
        if self._specs.pop(name, None) is not None:
            del self._buf["ch:" + name]

    def channel_names(self) -> list[str]:
        return list(self._specs)

    def channel(self, name: str) -> torch.Tensor:
        """View (M, *trailing_shape) of an auxiliary channel."""
        if name not in self._specs:
            raise ValueError(f"name: no channel '{name}' (have {list(self._specs)})")
        return self._buf["ch:" + name][: self._n]

    def set_channel(self, name: str, slots, values) -> None:
        """Write ``values`` (len(slots), *trailing_shape) into channel ``name`` at ``slots``."""
        view = self.channel(name)
        slots = self._check_slots(slots)
        values = _as_tensor(values, "values", self.device, view.dtype)
        want = (slots.numel(), *view.shape[1:])
        if values.shape != want:
            raise ValueError(f"values: expected {want} for channel '{name}', got {tuple(values.shape)}")
        # Whole rows moved as wide words (bit-exact; ~4x faster than view[slots] = values for float16 rows on CPU).
        _row_view(view, torch.complex128).index_copy_(0, slots, _row_view(values.contiguous(), torch.complex128))

    def _check_slots(self, slots) -> torch.Tensor:
        slots = _as_tensor(slots, "slots", self.device, torch.int64).reshape(-1)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self._n):
            raise ValueError(f"slots: expected indices in [0, {self._n}), got [{int(slots.min())}, {int(slots.max())}]")
        return slots

    # ------------------------------------------------------------------ hash
    def lookup(self, keys) -> torch.Tensor:
        """(K,) int64 keys -> (K,) int64 slots, -1 where absent."""
        keys = _as_tensor(keys, "keys", self.device, torch.int64).reshape(-1)
        if self._n == 0 or keys.numel() == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self._skeys, keys).clamp_(max=self._n - 1)
        return torch.where(self._skeys[pos] == keys, self._sslots[pos], torch.full_like(keys, -1))

    def lookup_points(self, points) -> torch.Tensor:
        """(N,3) world points -> (N,) slots of the voxels containing them, -1 where absent."""
        points = _as_tensor(points, "points", self.device, torch.float32)
        ijk, ok = voxel_coords(points, self.voxel_size)
        slots = self.lookup(pack_keys(ijk))
        return torch.where(ok, slots, torch.full_like(slots, -1))

    def neighbours(self, slots, radius: int = 1) -> torch.Tensor:
        """(M,) slots -> (M, (2r+1)^3 - 1) int64 slots of the voxel-hash neighbourhood, -1 where empty.

        Column order: offsets (di, dj, dk) in itertools.product(range(-r, r+1), repeat=3) order, centre skipped.
        """
        if int(radius) != radius or radius < 1:
            raise ValueError(f"radius: expected a positive integer, got {radius!r}")
        slots = self._check_slots(slots)
        r = int(radius)
        offs = torch.tensor([o for o in itertools.product(range(-r, r + 1), repeat=3) if any(o)],
                            dtype=torch.int64, device=self.device)
        nb = unpack_keys(self.keys[slots])[:, None, :] + offs[None]  # (M, K, 3)
        ok = ((nb >= KEY_MIN) & (nb <= KEY_MAX)).all(dim=2)
        found = self.lookup(pack_keys(nb.clamp(KEY_MIN, KEY_MAX).reshape(-1, 3))).reshape(nb.shape[:2])
        return torch.where(ok, found, torch.full_like(found, -1))

    def _index_remove(self, gone: torch.Tensor, remap: torch.Tensor) -> None:
        keep = ~gone[self._sslots]
        self._skeys = self._skeys[keep]
        self._sslots = remap[self._sslots[keep]]

    def _index_insert(self, keys: torch.Tensor, slots: torch.Tensor) -> None:
        """Merge sorted, absent ``keys`` into the sorted index in O(len) (no full re-sort)."""
        m = keys.numel()
        if m == 0:
            return
        pos = torch.searchsorted(self._skeys, keys) + torch.arange(m, device=self.device)
        total = self._skeys.numel() + m
        old = torch.ones(total, dtype=torch.bool, device=self.device)
        old[pos] = False
        sk = torch.empty(total, dtype=torch.int64, device=self.device)
        ss = torch.empty(total, dtype=torch.int64, device=self.device)
        sk.masked_scatter_(old, self._skeys)   # a sequential pass; much cheaper than boolean-index assignment
        ss.masked_scatter_(old, self._sslots)
        sk[pos], ss[pos] = keys, slots
        self._skeys, self._sslots = sk, ss

    def _remove_slots(self, slots: torch.Tensor) -> torch.Tensor | None:
        """Evict ``slots`` (unique); the last surviving voxels move into the holes so storage stays compact.

        Returns the slot remap (old slot -> new slot, -1 for evicted), or None when nothing was removed.
        """
        k = slots.numel()
        if k == 0:
            return None
        n, n2 = self._n, self._n - slots.numel()
        gone = torch.zeros(n, dtype=torch.bool, device=self.device)
        gone[slots] = True
        holes = gone[:n2].nonzero().squeeze(1)
        movers = (~gone[n2:]).nonzero().squeeze(1) + n2
        for buf in self._buf.values():
            wide = _wide_rows(buf)
            wide.index_copy_(0, holes, wide.index_select(0, movers))
        remap = torch.arange(n, device=self.device)
        remap[movers] = holes
        self._index_remove(gone, remap)
        remap[gone] = -1
        self._n = n2
        return remap

    # ------------------------------------------------------------------ dirty set
    def dirty_slots(self) -> torch.Tensor:
        """(K,) int64 slots fused since the last ``clear_dirty()`` (evicted voxels leave the set)."""
        return self._buf["dirty"][: self._n].nonzero().squeeze(1)

    def clear_dirty(self) -> None:
        self._buf["dirty"][: self._n] = False

    # ------------------------------------------------------------------ fusion
    def fuse(self, points, features, colors=None, weights=None, stamp: float = 0.0, sensor_origin=None) -> FuseStats:
        """Fuse world points with per-point features.

        Args:
            points: (N,3) float world coordinates; non-finite rows are skipped.
            features: (N,D) float (D = feature_dim).
            colors: (N,3) uint8 RGB, or None (black).
            weights: (N,) non-negative float, or None (uniform); zero-weight points are skipped.
            stamp: time of the observation (seconds), stored in ``last_seen``.
            sensor_origin: (3,) sensor position for the ``farthest`` policy; None reuses the last one.
        """
        dev = self.device
        points = _as_tensor(points, "points", dev, torch.float32)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"points: expected (N, 3), got {tuple(points.shape)}")
        n = points.shape[0]
        features = _as_tensor(features, "features", dev)
        if features.shape != (n, self.feature_dim) or not features.is_floating_point():
            raise ValueError(f"features: expected float ({n}, {self.feature_dim}), "
                             f"got {features.dtype} {tuple(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features: contains NaN/inf")
        if colors is None:
            colors = torch.zeros((n, 3), dtype=torch.uint8, device=dev)
        colors = _as_tensor(colors, "colors", dev)
        if colors.shape != (n, 3) or colors.dtype != torch.uint8:
            raise ValueError(f"colors: expected uint8 ({n}, 3), got {colors.dtype} {tuple(colors.shape)}")
        if weights is None:
            weights = torch.ones(n, dtype=torch.float32, device=dev)
        weights = _as_tensor(weights, "weights", dev, torch.float32)
        if weights.shape != (n,):
            raise ValueError(f"weights: expected ({n},), got {tuple(weights.shape)}")
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError("weights: expected finite non-negative values")
        ijk, ok = voxel_coords(points, self.voxel_size)
        ok &= torch.isfinite(points).all(dim=1) & (weights > 0)
        if not bool(ok.all()):
            sel = ok.nonzero().squeeze(1)
            points, features, colors, weights, ijk = points[sel], features[sel], colors[sel], weights[sel], ijk[sel]
        origin = self._resolve_origin(sensor_origin, points, weights)
        if points.shape[0] == 0:
            self._origin = origin
            return FuseStats()
        ukeys, inv = torch.unique(pack_keys(ijk), return_inverse=True)
        m = ukeys.numel()
        wsum = torch.zeros(m, device=dev).index_add_(0, inv, weights)
        fsum = torch.zeros((m, self.feature_dim), device=dev).index_add_(0, inv, features.float() * weights[:, None])
        xsum = torch.zeros((m, 3), device=dev).index_add_(0, inv, points * weights[:, None])
        csum = torch.zeros((m, 3), device=dev).index_add_(0, inv, colors.float() * weights[:, None])
        cnt = torch.bincount(inv, minlength=m).to(torch.int32)

        def fold(scale, old, dest, a):
            self._fold_features(lambda v0, v1: fsum[v0:v1] * scale[v0:v1, None], old, dest, a)

        return self._integrate(ukeys, wsum, fold, xsum, csum, cnt, stamp, origin)

    def fuse_frame(self, depth, feature_map, rgb, cam: CameraModel, T_world_cam, stamp: float = 0.0, stride: int = 2,
                   min_depth: float = 0.1, max_depth: float = 8.0, weighting: str = "depth",
                   guide_sigma: float = 0.0) -> FuseStats:
        """Back-project a depth frame and fuse it with bilinearly sampled low-res features.

        Args:
            depth: (H,W) float metres (NaN invalid), matching ``cam``.
            feature_map: (h,w,D) float features on any grid covering the same field of view. Full-res pixel centre
                (row, col) samples the low-res grid at ((row+0.5)*h/H - 0.5, (col+0.5)*w/W - 0.5), clamped to the
                border (= grid_sample(align_corners=False, padding_mode="border")).
            rgb: (H,W,3) uint8.
            cam, T_world_cam: intrinsics of the depth image and world <- optical pose.
            weighting: "depth" (w = 1/z^2, nearer is more reliable) or "uniform".
            guide_sigma: > 0: depth-guided sampling (``guided_corner_weights``, sigma relative to the point's depth);
                0: plain bilinear.
        The result equals ``fuse`` with per-point sampled features; bilinear sampling is linear, so instead of
        materialising (N, D) samples the per-voxel sums are formed as a sparse (voxels x cells) matrix times the
        feature map, with points first merged per (voxel, cell).
        """
        dev = self.device
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got '{weighting}'")
        guide_sigma = float(guide_sigma)
        if not (math.isfinite(guide_sigma) and guide_sigma >= 0):
            raise ValueError(f"guide_sigma: expected a finite value >= 0, got {guide_sigma}")
        depth = _as_tensor(depth, "depth", dev)
        if not depth.is_floating_point():
            raise ValueError(f"depth: expected float metres, got {depth.dtype} (decode with image_codec.decode_depth)")
        depth = depth.to(torch.float32)
        if depth.shape != (cam.height, cam.width):
            raise ValueError(f"depth: expected ({cam.height}, {cam.width}) to match cam, got {tuple(depth.shape)}")
        H, W = depth.shape
        rgb = _as_tensor(rgb, "rgb", dev)
        if rgb.shape != (H, W, 3) or rgb.dtype != torch.uint8:
            raise ValueError(f"rgb: expected uint8 ({H}, {W}, 3) to match depth, got {rgb.dtype} {tuple(rgb.shape)}")
        feature_map = _as_tensor(feature_map, "feature_map", dev)
        if (feature_map.ndim != 3 or feature_map.shape[2] != self.feature_dim or not feature_map.is_floating_point()
                or feature_map.shape[0] < 1 or feature_map.shape[1] < 1):
            raise ValueError(f"feature_map: expected float (h, w, {self.feature_dim}), got "
                             f"{feature_map.dtype} {tuple(feature_map.shape)}")
        if not _all_finite(feature_map):
            raise ValueError("feature_map: contains NaN/inf")
        T = validate_pose(T_world_cam)
        if dev.type == "cpu" and fusion_kernels.available():
            check_grid_args(stride, min_depth, max_depth)
            return self._fuse_frame_kernels(depth, feature_map, rgb, cam, T, stamp, int(stride), min_depth, max_depth,
                                            weighting, guide_sigma)
        points, gidx, z = backproject_grid(depth, cam, T, stride, min_depth, max_depth)
        w = (1.0 / (z * z)) if weighting == "depth" else torch.ones_like(z)
        q = torch.floor(points / self.voxel_size)
        bounds = q.aminmax(dim=0) if q.numel() else None   # per axis; NaN-free (depth was range-checked)
        if bounds is not None and float(bounds[0].min()) >= KEY_MIN and float(bounds[1].max()) <= KEY_MAX:
            ijk = q.to(torch.int64)            # common case: whole frame in range, no mask
            bounds = (bounds[0].to(torch.int64), bounds[1].to(torch.int64))
        else:
            ijk, ok = voxel_coords(points, self.voxel_size)
            sel = ok.nonzero().squeeze(1)
            points, gidx, w, z, ijk = points[sel], gidx[sel], w[sel], z[sel], ijk[sel]
            bounds = None
        origin = torch.as_tensor(T[:3, 3], dtype=torch.float32, device=dev)
        if points.shape[0] == 0:
            self._origin = origin
            return FuseStats()
        h, wf = feature_map.shape[:2]
        hw = h * wf
        # Per grid pixel (cached): flat pixel index, top-left feature cell, bilinear fractions (ax, ay).
        flat, cell_grid, frac_grid, centres = _sample_grid(cam, stride, h, wf, dev)
        cell0 = cell_grid.index_select(0, gidx)
        ax, ay = frac_grid.index_select(0, gidx).unbind(1)
        ukeys, pvox, pcell, pinv = _group_pairs(ijk, cell0, hw, bounds)
        m = ukeys.numel()
        colors = rgb.reshape(-1, 3).index_select(0, flat.index_select(0, gidx))   # uint8; promoted in the product
        # Channel-major (10, N) sums: index_add_ along dim 1 is one vectorised pass (dim 0 of a (N, 10) tensor costs
        # one kernel launch per row on CPU). Rows: w, w*ax, w*ay, w*ax*ay, w*xyz, w*rgb.
        dx = 1 if wf > 1 else 0
        dy = wf if h > 1 else 0
        per_point = torch.empty((10, w.numel()), device=dev)
        per_point[0] = w
        if guide_sigma > 0:      # rows 1-3: w * (c01, c10, c11); c00 = 1 - the others
            corners = torch.stack((cell0, cell0 + dx, cell0 + dy, cell0 + dy + dx), 1)
            c = guided_corner_weights(ax, ay, z, cell_depths(depth, centres)[corners], guide_sigma)
        else:
            c = bilinear_corner_weights(ax, ay)
        torch.mul(c[:, 1:].t(), w, out=per_point[1:4])
        torch.mul(points.t(), w, out=per_point[4:7])
        torch.mul(colors.t(), w, out=per_point[7:10])
        npair = pvox.numel()
        per_pair = torch.zeros((10, npair), device=dev).index_add_(1, pinv, per_point)
        pcount = torch.bincount(pinv, minlength=npair)
        per_vox = torch.zeros((7, m), device=dev).index_add_(1, pvox, per_pair[[0, 4, 5, 6, 7, 8, 9]]).t().contiguous()
        cnt = torch.zeros(m, dtype=torch.int64, device=dev).index_add_(0, pvox, pcount).to(torch.int32)
        s0, s1, s2, s3 = per_pair[:4]
        cw = torch.stack((s0 - s1 - s2 - s3, s1, s2, s3), 1)               # (P,4) corners 00, 01, 10, 11
        cols = torch.stack((pcell, pcell + dx, pcell + dy, pcell + dy + dx), 1).reshape(-1)
        fmap = feature_map.reshape(hw, self.feature_dim).float()
        # Bag (voxel) v owns entries [start[v], start[v+1]) of ``cols``; pairs are grouped by ascending voxel.
        start = torch.zeros(m + 1, dtype=torch.int64, device=dev)
        torch.cumsum(torch.bincount(pvox, minlength=m) * 4, 0, out=start[1:])

        def fold(scale: torch.Tensor, old, dest, a):
            # sum_points w * bilinear(F) = A @ F with A (voxels x cells) sparse, 4 entries per pair; evaluated as a
            # weighted embedding_bag (CSR x dense, fast on CPU and CUDA) one block of voxels at a time, so each
            # (rows, D) result is consumed while cache-resident. ``scale`` (per voxel) goes into the sparse values.
            vals = (cw * scale[pvox][:, None]).reshape(-1)

            def rows(v0: int, v1: int) -> torch.Tensor:
                e0, e1 = int(start[v0]), int(start[v1])
                return torch.nn.functional.embedding_bag(cols[e0:e1], fmap, start[v0:v1] - e0, mode="sum",
                                                         per_sample_weights=vals[e0:e1])
            self._fold_features(rows, old, dest, a)

        return self._integrate(ukeys, per_vox[:, 0], fold, per_vox[:, 1:4], per_vox[:, 4:7], cnt, stamp, origin)

    def warm_up(self) -> None:
        """Load (or, the first time on a machine, compile: ~5 s) the fused CPU kernels now instead of in the first
        frame. No-op on CUDA; once per process (``fusion_kernels.available``)."""
        if self.device.type == "cpu":
            fusion_kernels.available()

    def _workspace(self) -> "fusion_kernels.Workspace":
        if self._kernel_ws is None:
            self._kernel_ws = fusion_kernels.Workspace()
        return self._kernel_ws

    def _fuse_frame_kernels(self, depth, feature_map, rgb, cam, T, stamp, stride, min_depth, max_depth,
                            weighting, guide_sigma) -> FuseStats:
        """``fuse_frame`` with the fused CPU kernels (``fusion_kernels``): the same back-projection, sums and fold as
        the torch path, in three passes (group, update of existing voxels, feature fold) instead of ~100 ops."""
        h, wf = feature_map.shape[:2]
        _, rays = stride_grid(cam, stride, self.device)
        flat, cell_grid, frac_grid, centres = _sample_grid(cam, stride, h, wf, self.device)
        Tf = torch.as_tensor(T, dtype=torch.float32)      # backproject_grid's float32 pose
        dx, dy = (1 if wf > 1 else 0), (wf if h > 1 else 0)
        zc = cell_depths(depth, centres).numpy() if guide_sigma > 0 else None
        ukeys, per_vox, cnt, start, cells, cw = (torch.from_numpy(x) for x in fusion_kernels.group_frame(
            self._workspace(), depth.contiguous().numpy(), stride, min_depth, max_depth, weighting == "uniform",
            rays.numpy(), Tf[:3, :3].contiguous().numpy(), Tf[:3, 3].contiguous().numpy(), cell_grid.numpy(),
            frac_grid.numpy(), flat.numpy(), rgb.reshape(-1, 3).contiguous().numpy(), self.voxel_size, KEY_MIN,
            KEY_MAX, KEY_OFFSET, KEY_BITS, zc, guide_sigma, GUIDE_FLOOR, dx, dy))   # contiguous: one signature
        origin = Tf[:3, 3].clone()
        if ukeys.numel() == 0:
            self._origin = origin
            return FuseStats()
        fmap = feature_map.detach().reshape(h * wf, self.feature_dim).float().contiguous().numpy()

        def fold(scale, old, dest, a):
            fusion_kernels.fold_features(start.numpy(), cells.numpy(), cw.numpy(), fmap, dx, dy,
                                         scale.contiguous().numpy(), a.contiguous().numpy(), old.numpy(),
                                         dest.contiguous().numpy(), self._buf["features"].view(torch.int16).numpy())

        return self._integrate(ukeys, per_vox[:, 0], fold, per_vox[:, 1:4], per_vox[:, 4:7], cnt, stamp, origin)

    def _integrate(self, ukeys, wsum, fold, xsum, csum, cnt, stamp, origin) -> FuseStats:
        """Fold per-voxel weighted sums into the map.

        ukeys (M,) sorted unique keys; wsum (M,) weight sums; xsum, csum (M,3) weighted sums of positions / colours;
        cnt (M,) int32 point counts; fold(scale (M,), old, dest, a) writes each voxel's blended feature row
        ``scale[v] * sum(w * f) + a[v] * stored`` to slot dest[v] (``_fold_features`` or the fused kernel).
        Order: small per-voxel fields of existing voxels, then eviction (if the budget is exceeded), then the features
        of all surviving voxels in one blocked pass (``_fold_features``), then the new voxels' other fields.
        """
        self._origin = origin
        stamp = float(stamp)
        b = self._buf
        m = ukeys.numel()
        slots = self.lookup(ukeys)
        old = slots >= 0
        oi = old.nonzero().squeeze(1)
        ni = (~old).nonzero().squeeze(1)
        n_old, k = oi.numel(), ni.numel()
        s = slots[oi]
        # Running weighted mean: mean' = mean * w0/w1 + sum(w f)/w1, with w0 = 0 (a = 0) for new voxels.
        if self.device.type == "cpu" and fusion_kernels.available():
            w1, scale, a = (torch.from_numpy(x) for x in fusion_kernels.update_existing(
                slots.numpy(), wsum.numpy(), xsum.numpy(), csum.numpy(), cnt.numpy(), stamp,
                *(b[k].numpy() for k in ("weights", "xyz", "colors", "counts", "last_seen", "dirty"))))
        else:
            w1, scale, a = self._update_existing(s, oi, wsum, xsum, csum, cnt, stamp)
        nxyz = xsum[ni] * scale[ni, None]
        need = self._n + k - self.max_voxels
        evicted = 0
        dest = slots.clone()                   # destination slot of each voxel's feature row, -1 = not kept
        if need > 0:
            touched = None
            if n_old:
                touched = torch.zeros(self._n, dtype=torch.bool, device=self.device)
                touched[s] = True
            drop_old, keep_new = self._choose_evictions(need, nxyz, origin, touched)
            remap = self._remove_slots(drop_old)
            evicted = drop_old.numel()
            if remap is not None:
                dest[oi] = remap[s]
            if not bool(keep_new.all()):
                dest[ni[~keep_new]] = -1
                ni, nxyz = ni[keep_new], nxyz[keep_new]
        k = ni.numel()
        n0 = self._n
        self._reserve(n0 + k)
        dest[ni] = torch.arange(n0, n0 + k, device=self.device)
        fold(scale, old, dest, a)
        if k:
            sl = slice(n0, n0 + k)
            b["keys"][sl] = ukeys[ni]
            b["xyz"][sl] = nxyz
            b["colors"][sl] = (csum[ni] / wsum[ni, None]).round_().clamp_(0, 255).to(torch.uint8)
            b["weights"][sl] = wsum[ni]
            b["counts"][sl] = cnt[ni]
            b["last_seen"][sl] = stamp
            b["dirty"][sl] = True
            for name, (_, _, fill) in self._specs.items():
                b["ch:" + name][sl] = fill
            self._n += k
            self._index_insert(ukeys[ni], torch.arange(n0, n0 + k, device=self.device))
        return FuseStats(new=k, updated=n_old, evicted=evicted, points=int(cnt.sum()))

    def _update_existing(self, s, oi, wsum, xsum, csum, cnt, stamp: float):
        """Torch path of ``fusion_kernels.update_existing``: the fields other than features of the existing voxels
        ``oi`` (slots ``s``); returns (w1, scale, a) over all M voxels."""
        b = self._buf
        w0 = b["weights"][s]
        w1 = wsum.clone()
        w1[oi] += w0
        scale = 1.0 / w1
        a = torch.zeros(wsum.numel(), device=self.device)
        a[oi] = w0 / w1[oi]
        if oi.numel():   # index_select / index_copy_: cheaper on CPU than advanced indexing for these narrow rows
            a_old, c = a[oi, None], scale[oi, None]
            b["xyz"].index_copy_(0, s, b["xyz"].index_select(0, s) * a_old + xsum[oi] * c)
            b["colors"].index_copy_(0, s, (b["colors"].index_select(0, s) * a_old + csum[oi] * c)
                                    .round_().clamp_(0, 255).to(torch.uint8))
            b["weights"].index_copy_(0, s, w1[oi])
            b["counts"].index_add_(0, s, cnt[oi])
            b["last_seen"].index_fill_(0, s, stamp)
            b["dirty"].index_fill_(0, s, True)
        return w1, scale, a

    def _fold_features(self, rows, old: torch.Tensor, dest: torch.Tensor, a: torch.Tensor) -> None:
        """Write voxel v's feature row ``rows(v, v+1) + a[v] * stored[dest[v]]`` (stored term only for existing
        voxels, ``old``) to slot ``dest[v]``; rows with dest -1 are skipped.

        Blocks of about _LERP_BLOCK_BYTES: gather -> float32 blend -> float16 -> scatter while the block is
        cache-resident. New voxels in a block with existing ones blend with a = 0 against slot 0 (any stored, finite
        row), so a block is one uniform gather / blend / scatter instead of separate index selections.
        """
        m = old.numel()
        if m == 0:
            return
        fs = self._buf["features"]
        gather, scatter = _row_view(fs, torch.float64), _row_view(fs, torch.complex128)
        keep = dest >= 0
        src = torch.where(old & keep, dest, torch.zeros_like(dest))
        step = max(1, _LERP_BLOCK_BYTES // (4 * self.feature_dim))
        edges = list(range(0, m, step)) + [m]
        counts = torch.zeros((2, m + 1), dtype=torch.int64, device=old.device)
        torch.cumsum(torch.stack((keep, old & keep)), 1, out=counts[:, 1:])
        n_keep, n_old = counts[:, edges].tolist()
        for j in range(len(edges) - 1):
            v0, v1 = edges[j], edges[j + 1]
            kept, olds = n_keep[j + 1] - n_keep[j], n_old[j + 1] - n_old[j]
            if kept == 0:
                continue
            fb, d, g, ab = rows(v0, v1), dest[v0:v1], src[v0:v1], a[v0:v1]
            if kept < v1 - v0:
                sel = keep[v0:v1].nonzero().squeeze(1)
                fb, d, g, ab = fb.index_select(0, sel), d[sel], g[sel], ab[sel]
            if olds:
                fb.addcmul_(gather.index_select(0, g).view(fs.dtype), ab[:, None])
            scatter.index_copy_(0, d, _row_view(fb.to(fs.dtype), torch.complex128))

    def _resolve_origin(self, sensor_origin, points, weights) -> torch.Tensor:
        if sensor_origin is not None:
            o = _as_tensor(sensor_origin, "sensor_origin", self.device, torch.float32).reshape(-1)
            if o.shape != (3,) or not bool(torch.isfinite(o).all()):
                raise ValueError(f"sensor_origin: expected 3 finite values, got {sensor_origin!r}")
            return o
        if self._origin is not None:
            return self._origin
        # No sensor position ever given: the centroid is the least arbitrary reference for "farthest".
        return points.mean(0) if points.shape[0] else torch.zeros(3, device=self.device)

    def _choose_evictions(self, need: int, new_xyz, origin, touched) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick ``need`` (+ margin) voxels among existing slots and candidate new voxels.

        Returns (existing slots to evict (K,), bool mask over new voxels to keep).
        """
        n, m = self._n, new_xyz.shape[0]
        dist_old = (self.xyz - origin).norm(dim=1)
        dist_new = (new_xyz - origin).norm(dim=1)
        untouched = torch.ones(n, dtype=torch.bool, device=self.device) if touched is None else ~touched
        n_untouched = int(untouched.sum())
        extra = min(int(self.evict_margin * self.max_voxels), max(n_untouched - need, 0))
        if self.eviction == "farthest":
            drop = torch.topk(torch.cat((dist_old, dist_new)), need).indices
            if extra:  # margin evictions: further untouched old voxels, farthest first
                rest = torch.where(untouched, dist_old, torch.full_like(dist_old, -1.0))
                rest[drop[drop < n]] = -1.0
                extra = min(extra, int((rest >= 0).sum()))
                drop = torch.cat((drop, torch.topk(rest, extra).indices))
        else:  # lru: oldest untouched first, then the farthest of this fuse
            k = min(need + extra, n_untouched)
            age = torch.where(untouched, self.last_seen, torch.full_like(self.last_seen, float("inf")))
            drop = torch.topk(age, k, largest=False).indices if k else age.new_empty(0, dtype=torch.int64)
            if need > n_untouched:
                cur = torch.cat((torch.where(untouched, torch.full_like(dist_old, -1.0), dist_old), dist_new))
                drop = torch.cat((drop, torch.topk(cur, need - n_untouched).indices))
        keep_new = torch.ones(m, dtype=torch.bool, device=self.device)
        keep_new[drop[drop >= n] - n] = False
        return drop[drop < n], keep_new

    # ------------------------------------------------------------------ persistence
    def reset(self) -> None:
        """Drop all voxels (channel definitions are kept) and release the storage."""
        self._alloc(0)

    def save(self, path) -> None:
        """Write the map to one file (torch.save of a plain dict with a version tag), atomically."""
        n = self._n
        state = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "voxel_size": self.voxel_size,
            "feature_dim": self.feature_dim, "max_voxels": self.max_voxels, "eviction": self.eviction,
            "evict_margin": self.evict_margin,
            "origin": None if self._origin is None else self._origin.cpu().clone(),
            "core": {name: self._buf[name][:n].cpu().clone() for name in self._CORE},
            "channels": {name: {"shape": list(shape), "dtype": str(dt).replace("torch.", ""), "fill": fill,
                                "data": self._buf["ch:" + name][:n].cpu().clone()}
                         for name, (shape, dt, fill) in self._specs.items()},
        }
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        os.close(fd)
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path, device=None) -> "VoxelMap":
        """Read a file written by ``save``; ``device`` None -> cpu. Wrong version / corrupt file -> ValueError."""
        path = os.fspath(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"path: no such voxel map file '{path}'") from None
        except Exception as exc:  # torch raises many types for truncated/garbage files
            raise ValueError(f"path: '{path}' is not a readable voxel map file ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f"path: '{path}' is not a voxel map file (format tag missing)")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"version: unsupported voxel map file version {state.get('version')!r} "
                             f"(expected {FORMAT_VERSION})")
        try:
            vm = cls(state["voxel_size"], state["feature_dim"], state["max_voxels"], state["eviction"],
                     device if device is not None else "cpu", state.get("evict_margin", 0.0))
            for name, ch in state["channels"].items():
                vm.add_channel(name, tuple(ch["shape"]), getattr(torch, ch["dtype"]), ch["fill"])
            core = state["core"]
            n = int(core["keys"].shape[0])
            if n > vm.max_voxels:
                raise ValueError(f"max_voxels: file holds {n} voxels, more than max_voxels={vm.max_voxels}")
            vm._reserve(n)
            for name, (shape, dt, _) in vm._all_specs().items():
                t = core[name] if name in core else state["channels"][name[3:]]["data"]
                if tuple(t.shape) != (n, *shape) or t.dtype != dt:
                    raise ValueError(f"{name}: expected {dt} {(n, *shape)}, got {t.dtype} {tuple(t.shape)}")
                vm._buf[name][:n] = t.to(vm.device)
            vm._n = n
            vm._origin = None if state["origin"] is None else state["origin"].to(vm.device)
            vm._skeys, vm._sslots = torch.sort(vm._buf["keys"][:n])
            if n > 1 and not bool((vm._skeys[1:] != vm._skeys[:-1]).all()):
                raise ValueError("keys: duplicate voxel keys in file")
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"path: '{path}' is a corrupt voxel map file ({type(exc).__name__}: {exc})") from exc
        return vm
