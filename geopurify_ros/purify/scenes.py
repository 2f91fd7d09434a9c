"""Procedural room-like scenes (planes, boxes, cylinders, posters) voxelised at a given size.

Used for self-supervised training when no demo data exists, by the benchmark and by the tests.
Instance ids are returned for evaluation only; training never reads them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .geometry import voxel_means


@dataclass
class Scene:
    xyz: torch.Tensor        # (N,3) float32 voxel-mean positions
    colors: torch.Tensor     # (N,3) uint8
    instance: torch.Tensor   # (N,) long, majority surface id per voxel (evaluation only)
    kind: torch.Tensor       # (N,) long, 0 floor, 1 wall, 2 box, 3 cylinder, 4 poster (evaluation only)


def voxelize(points: np.ndarray, colors: np.ndarray, ids: np.ndarray, kinds: np.ndarray, voxel_size: float,
             offset: np.ndarray | None = None) -> Scene:
    """Average points per voxel (positions, colours) and take the majority id. Returns a Scene."""
    off = np.zeros(3) if offset is None else offset
    ijk = np.floor((points - off) / voxel_size).astype(np.int64)
    _, inv, cnt = np.unique(ijk, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    xyz, col = voxel_means(points, inv, cnt), voxel_means(colors.astype(np.float64), inv, cnt)
    # majority id per voxel: count (voxel, id) pairs, keep the most frequent id per voxel
    key = inv.astype(np.int64) * (ids.max() + 1) + ids
    uk, kc = np.unique(key, return_counts=True)
    vv, ii = uk // (ids.max() + 1), uk % (ids.max() + 1)
    o = np.lexsort((-kc, vv))                    # per voxel, the most frequent id first
    first = np.unique(vv[o], return_index=True)[1]
    best = ii[o][first]
    kind_of = np.zeros(ids.max() + 1, np.int64)
    kind_of[ids] = kinds
    return Scene(torch.from_numpy(xyz.astype(np.float32)), torch.from_numpy(np.clip(col, 0, 255).astype(np.uint8)),
                 torch.from_numpy(best), torch.from_numpy(kind_of[best]))


class _Builder:
    def __init__(self, rng: np.random.Generator, spacing: float):
        self.rng, self.h = rng, spacing
        self.pts, self.cols, self.ids, self.kinds = [], [], [], []
        self.next_id = 0

    def _colour(self, n: int, base: np.ndarray, texture: float) -> np.ndarray:
        return np.clip(base[None] + self.rng.normal(0, texture, (n, 3)), 0, 255)

    def _add(self, p: np.ndarray, base, kind: int, texture: float = 6.0) -> int:
        base = np.asarray(base, np.float64)
        sid = self.next_id
        self.next_id += 1
        self.pts.append(p)
        self.cols.append(self._colour(len(p), base, texture))
        self.ids.append(np.full(len(p), sid))
        self.kinds.append(np.full(len(p), kind))
        return sid

    def rect(self, origin, u, v, base, kind, texture=6.0) -> int:
        """Rectangle origin + s*u + t*v, s,t in [0,1]."""
        origin, u, v = map(np.asarray, (origin, u, v))
        ns = max(int(np.linalg.norm(u) / self.h), 1)
        nt = max(int(np.linalg.norm(v) / self.h), 1)
        s, t = np.meshgrid((np.arange(ns) + 0.5) / ns, (np.arange(nt) + 0.5) / nt, indexing="ij")
        p = origin + s.reshape(-1, 1) * u + t.reshape(-1, 1) * v
        return self._add(p, base, kind, texture)

    def box(self, lo, hi, base, kind=2, top_only_colour=None) -> None:
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        d = hi - lo
        ex, ey, ez = np.array([d[0], 0, 0]), np.array([0, d[1], 0]), np.array([0, 0, d[2]])
        self.rect(lo + ez, ex, ey, top_only_colour if top_only_colour is not None else base, kind)
        for o, u in ((lo, ex), (lo + ey, ex), (lo, ey), (lo + ex, ey)):
            self.rect(o, u, ez, base, kind)

    def cylinder(self, centre, radius, height, base, kind=3) -> None:
        n_a = max(int(2 * np.pi * radius / self.h), 8)
        n_z = max(int(height / self.h), 1)
        a, z = np.meshgrid(np.arange(n_a) * 2 * np.pi / n_a, (np.arange(n_z) + 0.5) / n_z * height, indexing="ij")
        p = np.stack([centre[0] + radius * np.cos(a).ravel(), centre[1] + radius * np.sin(a).ravel(),
                      centre[2] + z.ravel()], 1)
        self._add(p, base, kind)

    def build(self, noise: float, voxel_size: float) -> Scene:
        p = np.concatenate(self.pts)
        p = p + self.rng.normal(0, noise, p.shape)
        # random grid phase (scene shifted by < 1 voxel): surfaces exactly on voxel borders would voxelise
        # two layers thick; voxel means stay inside their own grid cell so a hash rebuilt from them agrees
        p = p + self.rng.uniform(0.1, 0.9, 3) * voxel_size
        return voxelize(p, np.concatenate(self.cols), np.concatenate(self.ids), np.concatenate(self.kinds),
                        voxel_size)


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(30, 230, 3)


def room_scene(seed: int = 0, voxel_size: float = 0.05, size=(4.0, 5.0), height: float = 2.5,
               n_objects: int = 6, n_posters: int = 3, noise: float = 0.004, origin=(0.0, 0.0)) -> Scene:
    """A rectangular room: floor, 4 walls, boxes (tables/cabinets), cylinders, posters co-planar with walls."""
    return _room(seed, voxel_size, size, height, n_objects, n_posters, origin).build(noise, voxel_size)


def room_points(seed: int = 0, spacing: float = 0.02, noise: float = 0.004, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Dense surface samples of `room_scene(seed)` before voxelisation: (M,3) float64, (M,3) uint8."""
    b = _room(seed, 2.5 * spacing, kw.get("size", (4.0, 5.0)), kw.get("height", 2.5), kw.get("n_objects", 6),
              kw.get("n_posters", 3), kw.get("origin", (0.0, 0.0)))
    p = np.concatenate(b.pts)
    return p + b.rng.normal(0, noise, p.shape), np.concatenate(b.cols).astype(np.uint8)


def _room(seed, voxel_size, size, height, n_objects, n_posters, origin) -> "_Builder":
    rng = np.random.default_rng(seed)
    b = _Builder(rng, voxel_size / 2.5)
    w, d = size
    ox, oy = origin
    b.rect((ox, oy, 0), (w, 0, 0), (0, d, 0), random_colour(rng), 0)
    wall_col = random_colour(rng)
    walls = [((ox, oy, 0), (w, 0, 0)), ((ox, oy + d, 0), (w, 0, 0)), ((ox, oy, 0), (0, d, 0)), ((ox + w, oy, 0), (0, d, 0))]
    for o, u in walls:
        b.rect(o, u, (0, 0, height), wall_col if rng.random() < 0.7 else random_colour(rng), 1)
    for _ in range(n_posters):   # thin, co-planar with a wall: the case GeoPurify alone leaks on
        o, u = walls[rng.integers(4)]
        u = np.asarray(u, float)
        L = np.linalg.norm(u)
        pw, ph = rng.uniform(0.4, 1.0), rng.uniform(0.4, 0.9)
        s = rng.uniform(0.2, max(L - pw - 0.2, 0.3))
        z = rng.uniform(0.9, height - ph - 0.1)
        nrm = np.cross(u / L, [0, 0, 1.0])
        inward = 1.0 if np.dot(nrm, np.array([ox + w / 2, oy + d / 2, 0]) - np.asarray(o)) > 0 else -1.0
        po = np.asarray(o, float) + u / L * s + np.array([0, 0, z]) + inward * nrm * 0.004
        b.rect(po, u / L * pw, (0, 0, ph), random_colour(rng), 4, texture=4.0)
    for _ in range(n_objects):
        sx, sy = rng.uniform(0.4, 1.4), rng.uniform(0.4, 1.0)
        x, y = ox + rng.uniform(0.2, w - sx - 0.2), oy + rng.uniform(0.2, d - sy - 0.2)
        if rng.random() < 0.7:
            hz = rng.uniform(0.4, 1.2)
            col = random_colour(rng)
            b.box((x, y, 0), (x + sx, y + sy, hz), col, 2,
                  top_only_colour=random_colour(rng) if rng.random() < 0.3 else None)
        else:
            b.cylinder((x + sx / 2, y + sy / 2, 0), rng.uniform(0.1, 0.35), rng.uniform(0.4, 1.5), random_colour(rng))
    return b


def large_scene(n_voxels: int, seed: int = 0, voxel_size: float = 0.05) -> Scene:
    """Tile rooms side by side until at least n_voxels, then keep the first n_voxels (by x order)."""
    xs, cs, ins, ks = [], [], [], []
    total, i = 0, 0
    while total < n_voxels:
        s = room_scene(seed + i, voxel_size, origin=(i * 4.6, 0.0))
        xs.append(s.xyz), cs.append(s.colors), ins.append(s.instance + 1000 * i), ks.append(s.kind)
        total += s.xyz.shape[0]
        i += 1
    xyz, col, inst, kind = torch.cat(xs), torch.cat(cs), torch.cat(ins), torch.cat(ks)
    keep = torch.argsort(xyz[:, 0])[:n_voxels]
    keep = keep.sort().values
    return Scene(xyz[keep], col[keep], inst[keep], kind[keep])


def l_corner(seed: int = 0, voxel_size: float = 0.05) -> Scene:
    """Floor (instance 0) meeting a wall (instance 1) at x = 0, same colour: only geometry separates them."""
    b = _Builder(np.random.default_rng(seed), voxel_size / 2.5)
    b.rect((0, 0, 0), (1.5, 0, 0), (0, 1.5, 0), (120, 120, 120), 0)
    b.rect((0, 0, 0), (0, 1.5, 0), (0, 0, 1.5), (120, 120, 120), 1)
    return b.build(0.003, voxel_size)


def poster_wall(seed: int = 0, voxel_size: float = 0.05) -> Scene:
    """2 m x 2 m wall (instance 0) with a co-planar 0.6 m poster (instance 1) of another colour, floor (2).

    The wall has a hole behind the poster (the sensor only sees the poster there), 2 mm apart: geometry
    alone cannot tell the poster from the wall.
    """
    b = _Builder(np.random.default_rng(seed), voxel_size / 2.5)
    wall = np.array([200, 195, 185])
    b.rect((0, 0, 0), (2.0, 0, 0), (0, 0, 0.8), wall, 1)
    b.rect((0, 0, 1.4), (2.0, 0, 0), (0, 0, 0.6), wall, 1)
    b.rect((0, 0, 0.8), (0.7, 0, 0), (0, 0, 0.6), wall, 1)
    b.rect((1.3, 0, 0.8), (0.7, 0, 0), (0, 0, 0.6), wall, 1)
    b.next_id = 1                                   # the four wall pieces share instance 0
    b.ids = [np.zeros_like(i) for i in b.ids]
    b.rect((0.7, -0.002, 0.8), (0.6, 0, 0), (0, 0, 0.6), (40, 70, 150), 4, texture=4.0)
    b.rect((0, 0, 0), (2.0, 0, 0), (0, -1.0, 0), (120, 100, 80), 0)
    return b.build(0.002, voxel_size)


def noisy_onehot(labels: torch.Tensor, n_classes: int, noise: float, seed: int = 0) -> torch.Tensor:
    """One-hot features of `labels` with a fraction `noise` replaced by uniformly random classes."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape[0], generator=g) < noise
    lab = torch.where(flip, torch.randint(0, n_classes, labels.shape, generator=g), labels % n_classes)
    return torch.nn.functional.one_hot(lab, n_classes).float()


def poster_features(s: Scene, noise: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated fused VLM features for `poster_wall`: label noise plus blur (the poster's outer ring carries
    the wall's feature, as a low-resolution 2D feature map would). Returns (features (N,8), poster mask)."""
    lab = s.instance.clone()
    poster = lab == 1
    x, z = s.xyz[:, 0], s.xyz[:, 2]
    xs, zs = x[poster], z[poster]
    vs = float((xs.max() - xs.min()) / 12)  # ~ one voxel
    ring = poster & ((x < xs.min() + vs) | (x > xs.max() - vs) | (z < zs.min() + vs) | (z > zs.max() - vs))
    lab[ring] = 0
    return noisy_onehot(lab, 8, noise, seed), poster


def leakage(features: torch.Tensor, poster: torch.Tensor, label: int = 1) -> float:
    """Fraction of poster voxels whose arg-max class is not the poster's."""
    return float((features[poster].argmax(1) != label).float().mean())
