"""Purifier: adapts a VoxelMap to the tensor-level student + geometry-guided pooling, incrementally.

Map contract used (docs/ARCHITECTURE.md): `len(vmap)`, `xyz`, `colors`, `features` (float16),
`neighbours(slots)`, `dirty_slots()`, `clear_dirty()`, `add_channel/channel/set_channel/channel_names`,
optional `voxel_size`. Channels written:
  purified          float16 (D,)  output features (what labelling / queries read)
  purify_embedding  float16 (E,)  cached student embeddings
  purify_normal     float32 (3,)  cached PCA normals (for the normal / depth gates)

Incremental pass, with dirty set D and student receptive field r = student.receptive_hops:
  E = hops(D, r)             embeddings that can change -> recomputed on the subgraph hops(E, r)
  A = hops(E, iterations)    outputs that can change    -> pooled on the subgraph hops(A, iterations)
Everything else keeps its cached value, so the result equals a full pass (tested).
Evictions: the map does not mark the neighbours of evicted voxels dirty, so the Purifier remembers the
voxel keys of its last pass and adds the surviving 26-neighbours of vanished keys to the dirty set.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..device import resolve_device
from .geometry import (VoxelGrid, edge_gate_values, edge_gates, edge_list, expand_hops, local_table,
                       neighbour_offsets, normals_curvature)
from .pooling import geometry_guided_pooling_edges, incremental_pooling
from .student import StudentAffinityNet, load_student

MODES = ("raw", "purified", "pooled")


@dataclass
class PurifyConfig:
    iterations: int = 3                 # GGP iterations in "pooled" mode ("purified" always uses 1)
    radius: int = 1                     # pooling neighbourhood: voxels within this Chebyshev radius (1 = 26-ring)
    temperature: float = 0.3            # affinity softmax temperature on cosine
    affinity_threshold: float = 0.5     # neighbours with cosine below this get weight 0
    self_weight: float = 1.0            # weight of the voxel's own feature (neighbour weight <= 1)
    color_gate: bool = True             # gates, "pooled" mode only
    normal_gate: bool = True
    depth_gate: bool = True
    color_sigma: float = 0.12           # RGB distance in [0,1] units
    normal_sigma: float = 0.15          # on 1 - |n_i . n_j|
    depth_sigma: float = 0.5            # point-to-tangent-plane distance, in voxels
    voxel_size: float = 0.05            # used when the map has no `voxel_size` attribute
    output_channel: str = "purified"
    embedding_channel: str = "purify_embedding"
    normal_channel: str = "purify_normal"

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations: must be >= 0 (got {self.iterations})")
        if int(self.radius) != self.radius or self.radius < 1:
            raise ValueError(f"radius: must be an integer >= 1 (got {self.radius})")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0 (got {self.temperature})")
        if not -1.0 <= self.affinity_threshold <= 1.0:
            raise ValueError(f"affinity_threshold: must be in [-1, 1] (got {self.affinity_threshold})")
        if self.self_weight <= 0:
            raise ValueError(f"self_weight: must be > 0 (got {self.self_weight})")


@dataclass
class PurifyStats:
    mode: str = "pooled"
    incremental: bool = False
    voxels: int = 0                     # map size
    dirty: int = 0                      # dirty voxels consumed
    embedded: int = 0                   # student embeddings (re)written
    updated: int = 0                    # output features (re)written
    support: int = 0                    # voxels read by the pooling step
    ms_embed: float = 0.0
    ms_pool: float = 0.0
    ms_total: float = 0.0
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class Purifier:
    """Student embeddings + geometry-guided pooling over a VoxelMap, recomputing only what changed."""

    def __init__(self, student: StudentAffinityNet | None = None, config: PurifyConfig | None = None,
                 device: str | torch.device = "cpu"):
        self.config = config or PurifyConfig()
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        self.student = (student if student is not None else load_student()).to(self.device).eval()
        self._state = None              # (map id, mode, config) of the last pass; change => full pass
        self._keys = None               # voxel keys at the end of the last pass (eviction detection)

    # ------------------------------------------------------------------------------------------------
    def _voxel_size(self, vmap) -> float:
        return float(getattr(vmap, "voxel_size", self.config.voxel_size))

    def _ensure_channels(self, vmap) -> bool:
        """Create missing channels; True if any was created (then a full pass is needed)."""
        names = set(vmap.channel_names())
        created = False
        d = vmap.features.shape[1]
        for name, shape, dtype in ((self.config.output_channel, (d,), torch.float16),
                                   (self.config.embedding_channel, (self.student.embed_dim,), torch.float16),
                                   (self.config.normal_channel, (3,), torch.float32)):
            if name not in names:
                vmap.add_channel(name, shape, dtype, fill=0)
                created = True
        return created

    def _pool_params(self, mode: str) -> tuple[int, bool]:
        """(iterations, use_gates) for a mode."""
        if mode == "purified":
            return 1, False
        return self.config.iterations, any((self.config.color_gate, self.config.normal_gate, self.config.depth_gate))

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def purify(self, vmap, mode: str = "pooled", incremental: bool = True) -> PurifyStats:
        """Write `purified` features for the voxels whose result can have changed; clear the dirty set."""
        if mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES} (got {mode!r})")
        t0 = time.perf_counter()
        n = len(vmap)
        stats = PurifyStats(mode=mode, incremental=incremental, voxels=n)
        if n == 0:
            vmap.clear_dirty()
            return stats
        created = self._ensure_channels(vmap)
        state = (id(vmap), mode, tuple(asdict(self.config).items()), id(self.student))
        full = (not incremental) or created or state != self._state
        dirty = vmap.dirty_slots().to(torch.long)
        if not full:
            dirty = torch.cat([dirty, self._evicted_rings(vmap)]).unique()
        stats.dirty = int(dirty.numel())
        stats.incremental = not full
        if full:
            self._full(vmap, mode, stats)
        elif dirty.numel():
            self._incremental(vmap, mode, dirty, stats)
        vmap.clear_dirty()
        self._state = state
        keys = getattr(vmap, "keys", None)
        self._keys = keys.clone() if torch.is_tensor(keys) else None
        stats.ms_total = (time.perf_counter() - t0) * 1e3
        return stats

    @staticmethod
    def _all_neighbours(vmap) -> torch.Tensor:
        """(N,26) table of the whole map. Same layout and content as `vmap.neighbours(arange(N))` (offset
        order of itertools.product), built from the map's keys with additive key offsets — ~2x cheaper."""
        keys = getattr(vmap, "keys", None)
        if torch.is_tensor(keys):
            try:
                from ..voxel_map import unpack_keys
            except ImportError:
                unpack_keys = None
            if unpack_keys is not None:
                return VoxelGrid.from_ijk(unpack_keys(keys), 1.0).neighbours()
        return vmap.neighbours(torch.arange(len(vmap), device=vmap.xyz.device))

    def _pool_table(self, vmap, nb: torch.Tensor) -> torch.Tensor:
        """Pooling neighbourhood of the whole map: the 26-ring table itself, or the radius-r cube."""
        r = self.config.radius
        if r == 1:
            return nb
        keys = getattr(vmap, "keys", None)
        if torch.is_tensor(keys):
            from ..voxel_map import unpack_keys
            return VoxelGrid.from_ijk(unpack_keys(keys), 1.0).neighbours(radius=r)
        return vmap.neighbours(torch.arange(len(vmap), device=vmap.xyz.device), r)

    def _evicted_rings(self, vmap) -> torch.Tensor:
        """Slots of surviving voxels adjacent to voxels that vanished since the last pass."""
        keys = getattr(vmap, "keys", None)
        if self._keys is None or not torch.is_tensor(keys):
            return torch.zeros(0, dtype=torch.long, device=vmap.xyz.device)
        m = self._keys.numel()
        if m <= keys.numel() and torch.equal(keys[:m], self._keys):
            return torch.zeros(0, dtype=torch.long, device=keys.device)     # appends only: nothing vanished
        gone = self._keys[~torch.isin(self._keys, keys)]
        if gone.numel() == 0:
            return torch.zeros(0, dtype=torch.long, device=keys.device)
        from ..voxel_map import pack_keys, unpack_keys   # the map's own key packing
        offs = neighbour_offsets(1).to(keys.device)
        ring = pack_keys((unpack_keys(gone)[:, None, :] + offs[None]).reshape(-1, 3))
        slots = vmap.lookup(ring)
        return slots[slots >= 0].unique()

    def _embed(self, xyz, colors, nb, edges=None, features=None) -> tuple[torch.Tensor, torch.Tensor]:
        edges = edge_list(nb) if edges is None else edges
        normals, curv = normals_curvature(xyz, nb, edges=edges)
        dev = self.device
        kw = {"features": features.to(dev)} if getattr(self.student, "uses_features", False) else {}
        emb = self.student(xyz.to(dev), colors.to(dev), nb.to(dev), normals.to(dev), curv.to(dev),
                           edges=(edges[0].to(dev), edges[1].to(dev)), **kw)
        return emb.to(xyz.device), normals

    def _full(self, vmap, mode: str, stats: PurifyStats) -> None:
        c = self.config
        n = len(vmap)
        all_slots = torch.arange(n, device=vmap.xyz.device)
        if mode == "raw":
            vmap.set_channel(c.output_channel, all_slots, vmap.features.to(torch.float16))
            stats.updated = n
            return
        t = time.perf_counter()
        # One neighbour table and one edge list per pass, shared by normals, student, gates and pooling.
        nb = self._all_neighbours(vmap)
        src, dst = edge_list(nb)
        xyz = vmap.xyz.float()
        emb, normals = self._embed(xyz, vmap.colors, nb, (src, dst), vmap.features)
        emb16 = emb.to(torch.float16)
        vmap.set_channel(c.embedding_channel, all_slots, emb16)
        vmap.set_channel(c.normal_channel, all_slots, normals.float())
        stats.embedded = n
        stats.ms_embed = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        iters, use_gates = self._pool_params(mode)
        if c.radius > 1:                # wider pooling neighbourhood than the student's ring
            src, dst = edge_list(self._pool_table(vmap, nb))
        # Pool from exactly what the channels hold (float16 embeddings, float32 normals): the incremental
        # pass reads the channels, so full and incremental agree.
        gates = edge_gate_values(xyz, vmap.colors, normals.float(), src, dst, self._voxel_size(vmap),
                                 c.color_sigma if c.color_gate else None,
                                 c.normal_sigma if c.normal_gate else None,
                                 c.depth_sigma if c.depth_gate else None) if use_gates else None
        out = geometry_guided_pooling_edges(vmap.features, emb16, src, dst, iters, c.temperature,
                                            c.affinity_threshold, c.self_weight, gates, out_dtype=torch.float16)
        vmap.set_channel(c.output_channel, all_slots, out)
        stats.updated = stats.support = n
        stats.ms_pool = (time.perf_counter() - t) * 1e3

    def _incremental(self, vmap, mode: str, dirty: torch.Tensor, stats: PurifyStats) -> None:
        c = self.config
        n = len(vmap)
        if mode == "raw":
            vmap.set_channel(c.output_channel, dirty, vmap.features[dirty].to(torch.float16))
            stats.updated = int(dirty.numel())
            return
        t = time.perf_counter()
        r = self.student.receptive_hops
        nbf = _CachedNeighbours(vmap.neighbours, n, vmap.xyz.device)   # each voxel's hash look-up at most once
        changed = expand_hops(nbf, dirty, r, n)                       # embeddings/normals that can change
        sub = expand_hops(nbf, changed, r, n)                         # data they read
        local = local_table(nbf(sub), sub, n)
        emb, normals = self._embed(vmap.xyz[sub].float(), vmap.colors[sub], local, features=vmap.features[sub])
        pos = torch.searchsorted(sub, changed)
        vmap.set_channel(c.embedding_channel, changed, emb[pos].to(torch.float16))
        vmap.set_channel(c.normal_channel, changed, normals[pos].float())
        stats.embedded = int(changed.numel())
        stats.ms_embed = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        iters, use_gates = self._pool_params(mode)
        normals_all = vmap.channel(c.normal_channel)
        vs = self._voxel_size(vmap)
        gates = (lambda slots, rows: _edge_gates_rows(vmap.xyz, vmap.colors, normals_all, slots, rows, vs, c)) \
            if use_gates else None
        # the pooling reach (hops of the affected/support sets) must use the pooling neighbourhood itself
        nbp = nbf if c.radius == 1 else _CachedNeighbours(lambda s: vmap.neighbours(s, c.radius), n, vmap.xyz.device)
        affected, out = incremental_pooling(vmap.features, vmap.channel(c.embedding_channel), nbp,
                                            changed, iters, c.temperature, c.affinity_threshold, c.self_weight,
                                            gates, n=n)
        vmap.set_channel(c.output_channel, affected, out.to(torch.float16))
        stats.updated = int(affected.numel())
        stats.ms_pool = (time.perf_counter() - t) * 1e3


class _CachedNeighbours:
    """Memoising wrapper of `vmap.neighbours` for one incremental pass: the hop expansions, the student
    sub-graph and the pooling support all query overlapping slot sets; each slot is looked up once."""

    def __init__(self, fn, n: int, device):
        self.fn = fn
        self.pos = torch.full((n,), -1, dtype=torch.long, device=device)
        self.rows = None
        self.used = 0

    def __call__(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.reshape(-1)
        new = slots[self.pos[slots] < 0].unique()
        if new.numel():
            nb = self.fn(new)
            if self.rows is None or self.used + new.numel() > self.rows.shape[0]:
                cap = max(2 * (self.used + new.numel()), 1024)
                grown = nb.new_empty(cap, nb.shape[1])
                if self.rows is not None:
                    grown[:self.used] = self.rows[:self.used]
                self.rows = grown
            self.rows[self.used:self.used + new.numel()] = nb
            self.pos[new] = torch.arange(self.used, self.used + new.numel(), device=slots.device)
            self.used += new.numel()
        return self.rows[self.pos[slots]]


def _edge_gates_rows(xyz, colors, normals, slots, nb_rows, voxel_size, c: PurifyConfig) -> torch.Tensor:
    """Gates (M,K) for the neighbour rows `nb_rows` (global slots) of voxels `slots` (M,)."""
    return edge_gates(xyz, colors, normals, nb_rows, voxel_size,
                      c.color_sigma if c.color_gate else None,
                      c.normal_sigma if c.normal_gate else None,
                      c.depth_sigma if c.depth_gate else None, rows=slots)


class TensorMap:
    """Minimal in-memory stand-in for VoxelMap (the subset the Purifier uses), over plain tensors.

    Used by `purify_tensors`, the tests and the benchmark; one point per voxel, neighbours from a voxel hash.
    """

    def __init__(self, xyz: torch.Tensor, colors: torch.Tensor, features: torch.Tensor, voxel_size: float = 0.05):
        if not (xyz.shape[0] == colors.shape[0] == features.shape[0]):
            raise ValueError("xyz/colors/features: row counts differ")
        self.voxel_size = float(voxel_size)
        self.xyz = xyz.float().contiguous()
        self.colors = colors
        self.features = features.to(torch.float16)
        self._channels: dict[str, torch.Tensor] = {}
        self._rebuild()
        self._dirty = torch.ones(len(self), dtype=torch.bool)

    def _rebuild(self) -> None:
        self._grid = VoxelGrid(self.xyz, self.voxel_size)
        self._table = self._grid.neighbours()

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def features_f32(self) -> torch.Tensor:
        return self.features.float()

    def neighbours(self, slots: torch.Tensor, radius: int = 1) -> torch.Tensor:
        return self._table[slots] if radius == 1 else self._grid.neighbours(slots, radius)

    def dirty_slots(self) -> torch.Tensor:
        return self._dirty.nonzero().squeeze(1)

    def clear_dirty(self) -> None:
        self._dirty.zero_()

    def update(self, slots: torch.Tensor, features: torch.Tensor | None = None,
               colors: torch.Tensor | None = None) -> None:
        """Overwrite features/colours of existing voxels and mark them dirty (a re-observation)."""
        if features is not None:
            self.features[slots] = features.to(torch.float16)
        if colors is not None:
            self.colors[slots] = colors.to(self.colors.dtype)
        self._dirty[slots] = True

    def append(self, xyz: torch.Tensor, colors: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Insert new voxels (marked dirty); returns their slots."""
        n0 = len(self)
        self.xyz = torch.cat([self.xyz, xyz.float()])
        self.colors = torch.cat([self.colors, colors.to(self.colors.dtype)])
        self.features = torch.cat([self.features, features.to(torch.float16)])
        for name, ch in self._channels.items():
            self._channels[name] = torch.cat([ch, ch.new_zeros((xyz.shape[0],) + ch.shape[1:])])
        self._dirty = torch.cat([self._dirty, torch.ones(xyz.shape[0], dtype=torch.bool)])
        self._rebuild()
        return torch.arange(n0, len(self))

    def add_channel(self, name, trailing_shape, dtype, fill=0) -> None:
        self._channels[name] = torch.full((len(self),) + tuple(trailing_shape), fill, dtype=dtype)

    def channel(self, name: str) -> torch.Tensor:
        return self._channels[name]

    def set_channel(self, name: str, slots: torch.Tensor, values: torch.Tensor) -> None:
        self._channels[name][slots] = values.to(self._channels[name].dtype)

    def channel_names(self) -> list[str]:
        return list(self._channels)


def purify_tensors(xyz: torch.Tensor, colors: torch.Tensor, features: torch.Tensor, voxel_size: float = 0.05,
                   mode: str = "pooled", student: StudentAffinityNet | None = None,
                   config: PurifyConfig | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """One full pass on plain tensors: xyz (N,3) voxel centres, colors (N,3) uint8, features (N,D) -> (N,D) f32."""
    purifier = Purifier(student, config, device)
    vmap = TensorMap(xyz, colors, features, voxel_size)
    purifier.purify(vmap, mode=mode, incremental=False)
    if mode == "raw":
        return features.float().clone()
    return vmap.channel(purifier.config.output_channel).float()
