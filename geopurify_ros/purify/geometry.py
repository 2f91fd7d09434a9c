"""Neighbourhoods and local geometry on voxel centres, pure torch (CPU or GPU, no CUDA extensions).

Everything here works on plain tensors: `xyz (N,3) float32`, `colors (N,3)` (uint8 or float in [0,1]),
`neighbours (N,K) long` with -1 = no neighbour. The neighbour table has the same layout as
`VoxelMap.neighbours(slots)` (the 26-voxel hash neighbourhood), so the map's own table can be passed in.
"""
from __future__ import annotations

import itertools

import torch

_BITS = 21                      # bits per axis in a packed voxel key (±1M voxels = ±52 km at 5 cm)
_BIAS = 1 << (_BITS - 1)


def pack_keys(ijk: torch.Tensor) -> torch.Tensor:
    """(N,3) integer voxel coordinates -> (N,) int64 keys; key(ijk + d) == key(ijk) + pack_offset(d)."""
    ijk = ijk.long() + _BIAS
    return (ijk[:, 0] << (2 * _BITS)) | (ijk[:, 1] << _BITS) | ijk[:, 2]


def neighbour_offsets(radius: int = 1) -> torch.Tensor:
    """(M,3) long offsets of the (2r+1)^3 - 1 cube neighbourhood, centre excluded, fixed order."""
    rng = range(-radius, radius + 1)
    offs = [o for o in itertools.product(rng, rng, rng) if o != (0, 0, 0)]
    return torch.tensor(offs, dtype=torch.long)


class VoxelGrid:
    """Sorted-key voxel hash over points: O(N log N) build, vectorised neighbour look-up.

    Points are assumed to be one per voxel (voxel centres / means). Used by tests, training and
    `purify_tensors`; the live map provides the same table through `VoxelMap.neighbours`.
    """

    def __init__(self, xyz: torch.Tensor, voxel_size: float):
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"xyz: expected (N, 3), got {tuple(xyz.shape)}")
        self.voxel_size = float(voxel_size)
        self.ijk = torch.floor(xyz / self.voxel_size).long()
        keys = pack_keys(self.ijk)
        self.sorted_keys, self.order = torch.sort(keys)
        self.keys = keys

    @classmethod
    def from_ijk(cls, ijk: torch.Tensor, voxel_size: float) -> "VoxelGrid":
        """Grid over integer voxel coordinates (e.g. unpacked VoxelMap keys): no rounding ambiguity."""
        g = cls.__new__(cls)
        g.voxel_size = float(voxel_size)
        g.ijk = ijk.long()
        g.keys = pack_keys(g.ijk)
        g.sorted_keys, g.order = torch.sort(g.keys)
        return g

    def __len__(self) -> int:
        return self.keys.numel()

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """(M,) keys -> (M,) slots, -1 where absent."""
        n = self.sorted_keys.numel()
        if n == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_(max=n - 1)
        hit = self.sorted_keys[pos] == keys
        return torch.where(hit, self.order[pos], torch.full_like(pos, -1))

    def neighbours(self, slots: torch.Tensor | None = None, radius: int = 1) -> torch.Tensor:
        """(M,) slots (None = all) -> (M, (2r+1)^3 - 1) neighbour slots, -1 = empty voxel."""
        if slots is None:
            slots = torch.arange(len(self), device=self.keys.device)
        offs = neighbour_offsets(radius).to(self.keys.device)
        q = pack_keys(self.ijk[slots][:, None, :].add(offs[None]).reshape(-1, 3))
        return self.lookup(q).view(slots.numel(), offs.shape[0])


def grid_neighbours(xyz: torch.Tensor, voxel_size: float, radius: int = 1) -> torch.Tensor:
    """(N,3) voxel centres -> (N, (2r+1)^3-1) neighbour table from a voxel hash."""
    return VoxelGrid(xyz, voxel_size).neighbours(radius=radius)


def knn_neighbours(xyz: torch.Tensor, k: int, max_radius: float | None = None, chunk: int = 4096) -> torch.Tensor:
    """Chunked brute-force kNN (self excluded) for unstructured points -> (N,k) long, -1 beyond max_radius.

    O(N^2) work, meant for point clouds of up to ~50k points (training crops); maps use the voxel hash.
    """
    n = xyz.shape[0]
    out = torch.full((n, k), -1, dtype=torch.long, device=xyz.device)
    kk = min(k + 1, n)
    for s in range(0, n, chunk):
        d = torch.cdist(xyz[s:s + chunk], xyz)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        dist, idx = torch.topk(d, kk - 1 if kk > 1 else 0, largest=False)
        if max_radius is not None:
            idx = torch.where(dist <= max_radius, idx, torch.full_like(idx, -1))
        out[s:s + chunk, : idx.shape[1]] = idx
    return out


def compact_neighbours(neighbours: torch.Tensor) -> torch.Tensor:
    """Move valid entries first (stable, order kept) and drop all-empty trailing columns.

    On surfaces only ~8 of the 26 hash neighbours exist, so this cuts gathers by ~2-3x.
    """
    if neighbours.numel() == 0:
        return neighbours
    valid = neighbours >= 0
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    nb = torch.gather(neighbours, 1, order)
    width = int(valid.sum(1).max().item()) if valid.any() else 0
    return nb[:, :max(width, 1)].contiguous()


def expand_hops(neighbours_of, seeds: torch.Tensor, hops: int, n: int) -> torch.Tensor:
    """Slots within `hops` neighbourhood steps of `seeds` (sorted, includes seeds).

    neighbours_of: callable (M,) slots -> (M,K) table (e.g. VoxelMap.neighbours) or a full (N,K) tensor.
    """
    if torch.is_tensor(neighbours_of):
        table = neighbours_of
        neighbours_of = lambda s: table[s]  # noqa: E731
    mask = torch.zeros(n, dtype=torch.bool, device=seeds.device)
    mask[seeds] = True
    frontier = seeds.unique()
    for _ in range(hops):
        if frontier.numel() == 0:
            break
        nb = neighbours_of(frontier).reshape(-1)
        nb = nb[nb >= 0]
        new = nb[~mask[nb]].unique()
        mask[new] = True
        frontier = new
    return mask.nonzero().squeeze(1)


def local_table(neighbours_global: torch.Tensor, subset: torch.Tensor, n: int) -> torch.Tensor:
    """Re-index the neighbour rows of `subset` into subset-local indices (-1 outside the subset)."""
    remap = torch.full((n,), -1, dtype=torch.long, device=subset.device)
    remap[subset] = torch.arange(subset.numel(), device=subset.device)
    nb = neighbours_global
    return torch.where(nb >= 0, remap[nb.clamp(min=0)], torch.full_like(nb, -1))


def colors_float(colors: torch.Tensor) -> torch.Tensor:
    """uint8 or float colours -> float32 in [0,1]."""
    if colors.dtype == torch.uint8:
        return colors.float() / 255.0
    return colors.float()


def edge_list(neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,K) table -> directed edges (src (E,), dst (E,)) of the existing neighbours, row-major order."""
    valid = neighbours >= 0
    src = valid.nonzero()[:, 0]
    return src, neighbours[valid]


def normals_curvature(xyz: torch.Tensor, neighbours: torch.Tensor, min_points: int = 3
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Local PCA over {self} ∪ neighbours.

    Returns normals (N,3) unit (sign arbitrary but deterministic: first non-negligible of z, y, x positive)
    and curvature (N,) = λ_min / Σλ in [0, 1/3]; voxels with < min_points get normal 0, curvature 1/3.
    """
    n = xyz.shape[0]
    if n == 0:
        return xyz.new_zeros(0, 3), xyz.new_zeros(0)
    src, dst = edge_list(neighbours)
    rel = xyz[dst] - xyz[src]                                   # centred on the voxel: better conditioned
    cnt = torch.ones(n, dtype=xyz.dtype, device=xyz.device).index_add_(0, src, torch.ones_like(src, dtype=xyz.dtype))
    s1 = xyz.new_zeros(n, 3).index_add_(0, src, rel)
    s2 = xyz.new_zeros(n, 9).index_add_(0, src, (rel[:, :, None] * rel[:, None, :]).reshape(-1, 9))
    mean = s1 / cnt[:, None]
    cov = s2.view(n, 3, 3) / cnt[:, None, None] - mean[:, :, None] * mean[:, None, :]
    cov = cov + 1e-10 * torch.eye(3, dtype=cov.dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh(cov)
    nrm = evecs[..., 0]
    evals = evals.clamp(min=0)
    ref = torch.where(nrm[:, 2].abs() > 1e-3, nrm[:, 2], torch.where(nrm[:, 1].abs() > 1e-3, nrm[:, 1], nrm[:, 0]))
    nrm = nrm * torch.where(ref < 0, -1.0, 1.0).unsqueeze(1)
    curv = evals[:, 0] / evals.sum(1).clamp(min=1e-12)
    few = cnt < min_points
    nrm[few] = 0.0
    curv[few] = 1.0 / 3.0
    return nrm, curv


def colour_stats(colors: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local colour mean and std over {self} ∪ neighbours: (N,3), (N,3) in [0,1] units."""
    c = colors_float(colors)
    n = c.shape[0]
    src, dst = edge_list(neighbours)
    cnt = torch.ones(n, dtype=c.dtype, device=c.device).index_add_(0, src, torch.ones_like(src, dtype=c.dtype))
    mean = c.clone().index_add_(0, src, c[dst]) / cnt[:, None]
    var = (c - mean) ** 2
    var = var.index_add_(0, src, (c[dst] - mean[src]) ** 2) / cnt[:, None]
    return mean, var.clamp(min=0).sqrt()


def edge_gates(xyz: torch.Tensor, colors: torch.Tensor, normals: torch.Tensor, neighbours: torch.Tensor,
               voxel_size: float, color_sigma: float | None = 0.12, normal_sigma: float | None = 0.15,
               depth_sigma: float | None = 0.5, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per-edge gates in [0,1] for what student geometry cannot see: (M,K) float32, 0 at -1.

    neighbours (M,K) are the neighbour slots of voxels `rows` (None = all, M = N), indexing xyz/colors/normals.
    colour:  exp(-(|c_i - c_j| / color_sigma)^2)            -- poster on a wall, paint edges
    normal:  exp(-(1 - |n_i . n_j|) / normal_sigma)          -- creases, table top vs. leg
    depth:   exp(-(d_plane / (depth_sigma * voxel))^2), d_plane = the larger point-to-tangent-plane
             distance of the pair                            -- steps, an object lying on a surface
    A sigma of None disables that gate.
    """
    valid = neighbours >= 0
    gate = valid.to(torch.float32)
    # Work on existing edges only (~9 of 26 slots on surfaces), then scatter back into the table.
    r, _ = valid.nonzero(as_tuple=True)
    i = r if rows is None else rows[r]
    j = neighbours[valid]
    g = torch.ones(j.numel(), dtype=torch.float32, device=neighbours.device)
    if color_sigma is not None:
        c = colors_float(colors)
        dc = (c[j] - c[i]).norm(dim=-1)
        g = g * torch.exp(-(dc / color_sigma) ** 2)
    if normal_sigma is not None or depth_sigma is not None:
        ni, nj = normals[i].float(), normals[j].float()
        if normal_sigma is not None:
            cos = (ni * nj).sum(-1).abs()
            g = g * torch.exp(-(1.0 - cos).clamp(min=0) / normal_sigma)
        if depth_sigma is not None:
            d = xyz[j].float() - xyz[i].float()
            dp = torch.maximum((d * ni).sum(-1).abs(), (d * nj).sum(-1).abs())
            g = g * torch.exp(-(dp / (depth_sigma * voxel_size)) ** 2)
    gate[valid] = g
    return gate
