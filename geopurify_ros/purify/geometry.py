"""Neighbourhoods and local geometry on voxel centres, pure torch (CPU or GPU, no CUDA extensions).

Everything here works on plain tensors: `xyz (N,3) float32`, `colors (N,3)` (uint8 or float in [0,1]),
`neighbours (N,K) long` with -1 = no neighbour. The neighbour table has the same layout as
`VoxelMap.neighbours(slots)` (the 26-voxel hash neighbourhood), so the map's own table can be passed in.
"""
from __future__ import annotations

import itertools

import numpy as np
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
            if radius == 1:
                fast = self._all_neighbours_r1()
                if fast is not None:
                    return fast
            slots = torch.arange(len(self), device=self.keys.device)
        offs = neighbour_offsets(radius).to(self.keys.device)
        q = pack_keys(self.ijk[slots][:, None, :].add(offs[None]).reshape(-1, 3))
        return self.lookup(q).view(slots.numel(), offs.shape[0])


    def _all_neighbours_r1(self) -> torch.Tensor | None:
        """The full 26-neighbour table in 8 sorted searches instead of 26 random ones.

        Keys are additive (key(ijk + d) = key(ijk) + key offset of d) while no coordinate sits on the key
        range boundary (else None -> generic path). The three dk = -1, 0, +1 neighbours of a (di, dj) column
        are consecutive keys, so one searchsorted for the dk = -1 key finds all three by stepping forward
        in the sorted key array; queries are searched in sorted order (cache-friendly).
        """
        n = len(self)
        if n == 0:
            return None
        lo, hi = self.ijk.min(), self.ijk.max()
        if int(lo) <= -_BIAS or int(hi) >= _BIAS - 1:
            return None
        sk, order = self.sorted_keys, self.order
        dev = sk.device
        out_sorted = torch.empty(n, 26, dtype=torch.long, device=dev)
        minus1 = torch.full((n,), -1, dtype=torch.long, device=dev)
        col = 0
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                q = sk + ((di << (2 * _BITS)) + (dj << _BITS) - 1)
                p = torch.searchsorted(sk, q)
                for dk in (-1, 0, 1):
                    if di == 0 and dj == 0 and dk == 0:
                        p = p + 1                       # self is always present
                        continue
                    pc = p.clamp(max=n - 1)
                    hit = sk.index_select(0, pc) == q + (dk + 1)
                    out_sorted[:, col] = torch.where(hit, order.index_select(0, pc), minus1)
                    p = p + hit
                    col += 1
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out


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


def voxel_means(x: np.ndarray, inv: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-voxel mean (M, C) float64 of per-point rows x (N, C), given each point's voxel `inv` (N,) and the voxels'
    point counts (M,) (`np.unique(..., return_inverse=True, return_counts=True)` of the voxel coordinates)."""
    out = np.zeros((counts.shape[0], x.shape[1]))
    np.add.at(out, inv, x)
    return out / counts[:, None]


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


def normals_curvature(xyz: torch.Tensor, neighbours: torch.Tensor, min_points: int = 3,
                      edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local PCA over {self} ∪ neighbours.

    Returns normals (N,3) unit (sign arbitrary but deterministic: first non-negligible of z, y, x positive)
    and curvature (N,) = λ_min / Σλ in [0, 1/3]; voxels with < min_points get normal 0, curvature 1/3.
    edges: `edge_list(neighbours)` if already computed (saves the extraction).
    """
    n = xyz.shape[0]
    if n == 0:
        return xyz.new_zeros(0, 3), xyz.new_zeros(0)
    src, dst = edge_list(neighbours) if edges is None else edges
    rel = xyz.index_select(0, dst) - xyz.index_select(0, src)  # centred on the voxel: better conditioned
    cnt = (torch.bincount(src, minlength=n) + 1).to(xyz.dtype)
    # [rel | the 6 distinct entries of rel rel^T (xx xy xz yy yz zz)] summed per voxel in one index_add
    m = rel.new_empty(rel.shape[0], 9)
    m[:, 0:3] = rel
    torch.mul(rel, rel[:, 0:1], out=m[:, 3:6])
    torch.mul(rel[:, 1:3], rel[:, 1:2], out=m[:, 6:8])
    torch.mul(rel[:, 2], rel[:, 2], out=m[:, 8])
    sums = xyz.new_zeros(n, 9).index_add_(0, src, m) / cnt[:, None]
    mean = sums[:, 0:3]
    mx, my, mz = mean[:, 0], mean[:, 1], mean[:, 2]
    cxx, cxy, cxz = sums[:, 3] - mx * mx + 1e-10, sums[:, 4] - mx * my, sums[:, 5] - mx * mz
    cyy, cyz, czz = sums[:, 6] - my * my + 1e-10, sums[:, 7] - my * mz, sums[:, 8] - mz * mz + 1e-10
    cov = torch.stack([cxx, cxy, cxz, cxy, cyy, cyz, cxz, cyz, czz], 1).view(n, 3, 3)
    evals, nrm = _smallest_eigenpair(cov)
    ref = torch.where(nrm[:, 2].abs() > 1e-3, nrm[:, 2], torch.where(nrm[:, 1].abs() > 1e-3, nrm[:, 1], nrm[:, 0]))
    nrm = nrm * torch.where(ref < 0, -1.0, 1.0).unsqueeze(1)
    curv = evals[:, 0] / evals.sum(1).clamp(min=1e-12)
    few = cnt < min_points
    nrm[few] = 0.0
    curv[few] = 1.0 / 3.0
    return nrm, curv


def _smallest_eigenpair(cov: torch.Tensor, rel_gap: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched symmetric 3x3 eigen-decomposition: (eigenvalues (N,3) ascending, clamped >= 0, eigenvector of the
    smallest (N,3)), the vector with arbitrary sign.

    Closed form (trigonometric eigenvalues, eigenvector = largest cross product of two rows of A - λI) in
    float64, ~20x cheaper than batched LAPACK `eigh`. Where the two smallest eigenvalues are (nearly) equal
    the eigenvector is ill-conditioned, so those rows (and non-finite ones) fall back to `torch.linalg.eigh`,
    which is what every row used before: results agree with it to float32 tolerance.
    """
    a = cov.double()
    a00, a01, a02 = a[:, 0, 0], a[:, 0, 1], a[:, 0, 2]
    a11, a12, a22 = a[:, 1, 1], a[:, 1, 2], a[:, 2, 2]
    q = (a00 + a11 + a22) / 3.0
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = ((b00 * b00 + b11 * b11 + b22 * b22 + 2.0 * p1) / 6.0).sqrt()
    ps = torch.where(p > 0, p, torch.ones_like(p))
    det = (b00 * (b11 * b22 - a12 * a12) - a01 * (a01 * b22 - a12 * a02) + a02 * (a01 * a12 - b11 * a02))
    r = (det / (2.0 * ps ** 3)).clamp(-1.0, 1.0)
    phi = torch.acos(r) / 3.0
    l_max = q + 2.0 * p * torch.cos(phi)
    l_min = q + 2.0 * p * torch.cos(phi + 2.0 * torch.pi / 3.0)
    l_mid = 3.0 * q - l_max - l_min
    # eigenvector of l_min: cross products of the rows of A - l_min I
    r0 = torch.stack([a00 - l_min, a01, a02], 1)
    r1 = torch.stack([a01, a11 - l_min, a12], 1)
    r2 = torch.stack([a02, a12, a22 - l_min], 1)
    cands = torch.stack([torch.linalg.cross(r0, r1), torch.linalg.cross(r0, r2), torch.linalg.cross(r1, r2)], 1)
    nn2 = (cands * cands).sum(-1)
    best = nn2.argmax(1)
    v = cands[torch.arange(cands.shape[0], device=cov.device), best]
    vn = nn2.gather(1, best[:, None]).squeeze(1).sqrt()
    v = v / vn.clamp(min=1e-300)[:, None]
    evals = torch.stack([l_min, l_mid, l_max], 1)
    scale = l_max.abs().clamp(min=1e-30)
    bad = (~torch.isfinite(v).all(1)) | (~torch.isfinite(evals).all(1)) | ((l_mid - l_min) <= rel_gap * scale) \
        | (vn <= 1e-12 * scale * scale)
    evals, v = evals.to(cov.dtype), v.to(cov.dtype)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        ev, evec = torch.linalg.eigh(cov[idx])
        evals[idx] = ev
        v[idx] = evec[..., 0]
    return evals.clamp(min=0), v


def colour_stats(colors: torch.Tensor, neighbours: torch.Tensor,
                 edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local colour mean and std over {self} ∪ neighbours: (N,3), (N,3) in [0,1] units."""
    c = colors_float(colors)
    n = c.shape[0]
    src, dst = edge_list(neighbours) if edges is None else edges
    cnt = torch.ones(n, dtype=c.dtype, device=c.device).index_add_(0, src, torch.ones_like(src, dtype=c.dtype))
    mean = c.clone().index_add_(0, src, c[dst]) / cnt[:, None]
    var = (c - mean) ** 2
    var = var.index_add_(0, src, (c[dst] - mean[src]) ** 2) / cnt[:, None]
    return mean, var.clamp(min=0).sqrt()


def edge_gate_values(xyz: torch.Tensor, colors: torch.Tensor, normals: torch.Tensor, i: torch.Tensor,
                     j: torch.Tensor, voxel_size: float, color_sigma: float | None = 0.12,
                     normal_sigma: float | None = 0.15, depth_sigma: float | None = 0.5) -> torch.Tensor:
    """`edge_gates` for a flat list of edges i -> j (E,) -> (E,) float32 (see there for the formulas)."""
    g = torch.ones(j.numel(), dtype=torch.float32, device=j.device)
    if color_sigma is None and normal_sigma is None and depth_sigma is None:
        return g
    # one packed (N,9) table [xyz | normal | colour]: 2 row gathers per edge block instead of 6
    packed = torch.cat([xyz.float(), normals.float(), colors_float(colors)], 1)
    step = 1 << 16                                  # cache-sized blocks: no (E, 9) temporaries
    for s in range(0, j.numel(), step):
        pi, pj = packed.index_select(0, i[s:s + step]), packed.index_select(0, j[s:s + step])
        gs = g[s:s + step]
        if color_sigma is not None:
            dc = (pj[:, 6:9] - pi[:, 6:9]).norm(dim=-1)
            gs.mul_(torch.exp(-(dc / color_sigma) ** 2))
        if normal_sigma is not None or depth_sigma is not None:
            ni, nj = pi[:, 3:6], pj[:, 3:6]
            if normal_sigma is not None:
                cos = (ni * nj).sum(-1).abs()
                gs.mul_(torch.exp(-(1.0 - cos).clamp(min=0) / normal_sigma))
            if depth_sigma is not None:
                d = pj[:, 0:3] - pi[:, 0:3]
                dp = torch.maximum((d * ni).sum(-1).abs(), (d * nj).sum(-1).abs())
                gs.mul_(torch.exp(-(dp / (depth_sigma * voxel_size)) ** 2))
    return g


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
    gate[valid] = edge_gate_values(xyz, colors, normals, i, j, voxel_size, color_sigma, normal_sigma, depth_sigma)
    return gate
