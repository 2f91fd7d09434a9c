"""Vectorised z-buffer rasteriser (torch, CPU) for textured triangle soups.

Why our own: it needs no GL stack, is bit-deterministic, and yields the exact triangle under every
pixel, so label images and the depth/mesh consistency checks are exact. Pixel (row r, col c) samples
the ray through (u=c, v=r), the same convention as ``camera.backproject``. Depth is the optical-axis
z of the surface (perspective-correct), NaN where no triangle is hit.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch

_MAX_CANDIDATES = 3_000_000  # candidate pixels per chunk (bounds memory)


@dataclasses.dataclass(frozen=True)
class Lighting:
    """Directional light (world, z up) + ambient + a weak headlight so no surface is pitch black."""

    direction: tuple = (0.35, -0.45, 0.82)
    ambient: float = 0.38
    diffuse: float = 0.42
    headlight: float = 0.25
    tint: tuple = (1.0, 1.0, 1.0)       # light colour (per-channel gain)

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Lighting":
        """Domain randomisation: light from any upper direction, brighter or dimmer, warm or cool."""
        d = rng.normal(size=3)
        d[2] = abs(d[2]) + 0.3
        return cls(tuple(d / np.linalg.norm(d)), float(rng.uniform(0.2, 0.55)), float(rng.uniform(0.2, 0.6)),
                   float(rng.uniform(0.1, 0.35)), tuple(rng.uniform(0.85, 1.15, 3)))


DEFAULT_LIGHTING = Lighting()
@dataclasses.dataclass
class TriangleSoup:
    """Flat scene geometry: one row per triangle."""

    tris: np.ndarray       # (F, 3, 3) float64 world coordinates
    uv: np.ndarray         # (F, 3, 2) float32 texture coordinates (unused where tex_id < 0)
    tex_id: np.ndarray     # (F,) int64 index into ``textures`` or -1
    color: np.ndarray      # (F, 3) uint8 diffuse colour
    instance: np.ndarray   # (F,) int64 instance id
    textures: list         # list of (h, w, 3) uint8

    def __post_init__(self):
        e1 = self.tris[:, 1] - self.tris[:, 0]
        e2 = self.tris[:, 2] - self.tris[:, 0]
        n = np.cross(e1, e2)
        self.area = 0.5 * np.linalg.norm(n, axis=1)
        self.normal = n / np.maximum(2 * self.area, 1e-20)[:, None]

    @property
    def num_triangles(self) -> int:
        return len(self.tris)


@dataclasses.dataclass
class RenderResult:
    rgb: np.ndarray       # (H, W, 3) uint8
    depth: np.ndarray     # (H, W) float32 metres, NaN = no surface
    face: np.ndarray      # (H, W) int64 triangle index into the soup, -1 = none
    instance: np.ndarray  # (H, W) int64 instance id, -1 = none
    bary: np.ndarray      # (H, W, 3) float64 barycentrics of the hit point on ``face``
    normal_cam: np.ndarray  # (H, W, 3) float32 unit surface normal in the camera frame, facing the camera


def _clip_near(pc: np.ndarray, near: float):
    """Clip camera-space triangles (F,3,3) against z = near.

    Returns (clipped (G,3,3), source triangle (G,), barycentrics of each clipped vertex w.r.t. its
    source triangle (G,3,3)).
    """
    F = len(pc)
    inside = pc[:, :, 2] >= near
    n_in = inside.sum(1)
    eye = np.broadcast_to(np.eye(3), (F, 3, 3))
    out_t, out_src, out_b = [], [], []

    keep = n_in == 3
    out_t.append(pc[keep]); out_src.append(np.nonzero(keep)[0]); out_b.append(eye[keep])

    def roll(sel, first):  # reorder vertices so that vertex `first` comes first (keeps winding)
        idx = (first[:, None] + np.arange(3)[None]) % 3
        p = np.take_along_axis(pc[sel], idx[:, :, None], 1)
        b = np.take_along_axis(eye[sel], idx[:, :, None], 1)
        return p, b

    def cut(pa, pb, ba, bb):  # point on segment a→b where z = near
        s = ((near - pa[:, 2]) / (pb[:, 2] - pa[:, 2]))[:, None]
        return pa + s * (pb - pa), ba + s * (bb - ba)

    one = n_in == 1
    if one.any():
        p, b = roll(one, np.argmax(inside[one], 1))
        q1, c1 = cut(p[:, 0], p[:, 1], b[:, 0], b[:, 1])
        q2, c2 = cut(p[:, 0], p[:, 2], b[:, 0], b[:, 2])
        out_t.append(np.stack([p[:, 0], q1, q2], 1)); out_src.append(np.nonzero(one)[0])
        out_b.append(np.stack([b[:, 0], c1, c2], 1))
    two = n_in == 2
    if two.any():
        p, b = roll(two, np.argmin(inside[two], 1))  # outside vertex first: o, i1, i2
        q1, c1 = cut(p[:, 1], p[:, 0], b[:, 1], b[:, 0])
        q2, c2 = cut(p[:, 2], p[:, 0], b[:, 2], b[:, 0])
        src = np.nonzero(two)[0]
        out_t += [np.stack([q1, p[:, 1], p[:, 2]], 1), np.stack([q1, p[:, 2], q2], 1)]
        out_b += [np.stack([c1, b[:, 1], b[:, 2]], 1), np.stack([c1, b[:, 2], c2], 1)]
        out_src += [src, src]
    return np.concatenate(out_t), np.concatenate(out_src), np.concatenate(out_b)


def _edge(ax, ay, bx, by, px, py):
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


@contextlib.contextmanager
def _single_thread():
    # Elementwise ops here are memory-bound and short: intra-op threads only add sync overhead
    # (25× slower measured on a loaded 2-core box), so run them on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def rasterise(soup: TriangleSoup, cam, T_world_cam: np.ndarray, near: float = 0.05, far: float = 30.0):
    """Z-buffer: per pixel the winning (clipped) triangle. Returns (face, bary, depth) arrays."""
    with _single_thread():
        return _rasterise(soup, cam, T_world_cam, near, far)


def _rasterise(soup, cam, T_world_cam, near, far):
    W, H = int(cam.width), int(cam.height)
    T = np.asarray(T_world_cam, np.float64)
    R, t = T[:3, :3], T[:3, 3]
    pc = (soup.tris - t) @ R  # world → camera optical frame
    z = pc[:, :, 2]
    keep = (z.max(1) >= near) & (z.min(1) <= far)
    keep_idx = np.nonzero(keep)[0]
    ct, src, cb = _clip_near(pc[keep], near)
    src = keep_idx[src]
    zc = ct[:, :, 2]
    u = cam.fx * ct[:, :, 0] / zc + cam.cx
    v = cam.fy * ct[:, :, 1] / zc + cam.cy
    u0 = np.clip(np.ceil(u.min(1)), 0, W); u1 = np.clip(np.floor(u.max(1)), -1, W - 1)
    v0 = np.clip(np.ceil(v.min(1)), 0, H); v1 = np.clip(np.floor(v.max(1)), -1, H - 1)
    u0, u1, v0, v1 = (x.astype(np.int64) for x in (u0, u1, v0, v1))
    bw = u1 - u0 + 1; bh = v1 - v0 + 1
    area2 = _edge(u[:, 0], v[:, 0], u[:, 1], v[:, 1], u[:, 2], v[:, 2])
    ok = (bw > 0) & (bh > 0) & (np.abs(area2) > 1e-12)
    tri = np.nonzero(ok)[0]
    counts = bw[tri] * bh[tri]

    # Per triangle, the barycentric weights w0, w1 and 1/z are affine in the pixel (px, py): store
    # their coefficients once so each candidate pixel costs one gather and three dot products.
    tri_u, tri_v, tri_z, A = u[tri], v[tri], zc[tri], area2[tri]
    def affine(i, j):  # coefficients of edge(p_i, p_j, p) / area
        a = -(tri_v[:, j] - tri_v[:, i]) / A
        b = (tri_u[:, j] - tri_u[:, i]) / A
        c = -(a * tri_u[:, i] + b * tri_v[:, i])
        return a, b, c
    a0, b0, c0 = affine(1, 2)
    a1, b1, c1 = affine(2, 0)
    a2, b2, c2 = affine(0, 1)
    iz = 1.0 / tri_z
    coef = np.stack([a0, b0, c0, a1, b1, c1,
                     a0 * iz[:, 0] + a1 * iz[:, 1] + a2 * iz[:, 2],
                     b0 * iz[:, 0] + b1 * iz[:, 1] + b2 * iz[:, 2],
                     c0 * iz[:, 0] + c1 * iz[:, 1] + c2 * iz[:, 2]], 1)
    # float32, one contiguous row per coefficient: halves memory traffic of the per-pixel work.
    coef_t = torch.from_numpy(np.ascontiguousarray(coef.T, dtype=np.float32))
    box_t = torch.from_numpy(np.stack([u0[tri], v0[tri], bw[tri], np.cumsum(counts) - counts], 1))

    zbuf = torch.full((H * W,), float("inf"), dtype=torch.float64)
    win = torch.full((H * W,), -1, dtype=torch.int64)
    csum = np.cumsum(counts)
    start = 0
    while start < len(tri):
        # Chunk so that the candidate pixels of one chunk stay bounded.
        base = int(csum[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(csum, base + _MAX_CANDIDATES, side="right")))
        cnt = torch.from_numpy(counts[start:stop])
        rep = torch.repeat_interleave(torch.arange(start, stop), cnt)  # index into `tri`
        box = box_t[rep]
        off = torch.arange(base, base + len(rep)) - box[:, 3]
        px = box[:, 0] + off % box[:, 2]
        py = box[:, 1] + torch.div(off, box[:, 2], rounding_mode="floor")
        C = coef_t.index_select(1, rep)
        fx_, fy_ = px.to(torch.float32), py.to(torch.float32)
        w0 = C[0] * fx_ + C[1] * fy_ + C[2]
        w1 = C[3] * fx_ + C[4] * fy_ + C[5]
        invz = C[6] * fx_ + C[7] * fy_ + C[8]
        # small tolerance: no cracks on shared edges from float32 rounding (the z-test resolves overlap)
        inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w0 + w1 <= 1 + 1e-6) & (invz >= 1.0 / far) & (invz <= 1.0 / near)
        sel = inside.nonzero().squeeze(1)
        if len(sel):
            lin = py[sel] * W + px[sel]
            d = 1.0 / invz[sel].to(torch.float64)
            cand = torch.from_numpy(tri)[rep[sel]]
            best = zbuf.clone().scatter_reduce_(0, lin, d, reduce="amin", include_self=True)
            is_best = (d == best[lin]) & (d < zbuf[lin])
            # Ties (shared edges, coplanar faces): the highest clipped-triangle index wins, deterministically.
            pick = torch.full((H * W,), -1, dtype=torch.int64)
            pick.scatter_reduce_(0, lin[is_best], cand[is_best], reduce="amax", include_self=True)
            upd = pick >= 0
            win[upd] = pick[upd]
            zbuf[upd] = best[upd]
        start = stop

    win = win.numpy()
    hit = win >= 0
    face = np.full(H * W, -1, np.int64)
    bary = np.zeros((H * W, 3), np.float64)
    depth = np.full(H * W, np.nan, np.float64)
    if hit.any():
        lin = np.nonzero(hit)[0]
        k = win[hit]
        px = (lin % W).astype(np.float64); py = (lin // W).astype(np.float64)
        U, V, Z = u[k], v[k], zc[k]
        A = area2[k]
        w0 = _edge(U[:, 1], V[:, 1], U[:, 2], V[:, 2], px, py) / A
        w1 = _edge(U[:, 2], V[:, 2], U[:, 0], V[:, 0], px, py) / A
        w = np.stack([w0, w1, 1.0 - w0 - w1], 1) / Z
        zz = 1.0 / w.sum(1)
        b3 = w * zz[:, None]                      # true 3D barycentrics on the clipped triangle
        bary[hit] = np.einsum("nk,nkj->nj", b3, cb[k])  # → barycentrics on the source triangle
        face[hit] = src[k]
        depth[hit] = zz
    return face.reshape(H, W), bary.reshape(H, W, 3), depth.reshape(H, W)


def shade(soup: TriangleSoup, face: np.ndarray, bary: np.ndarray, T_world_cam: np.ndarray,
          lighting: Lighting = DEFAULT_LIGHTING):
    """Lambert + ambient + headlight on textured/diffuse albedo. Returns (rgb uint8, normal_cam)."""
    H, W = face.shape
    rgb = np.zeros((H, W, 3), np.uint8)
    ncam = np.zeros((H, W, 3), np.float32)
    hit = face >= 0
    if not hit.any():
        return rgb, ncam
    f = face[hit]
    b = bary[hit]
    albedo = soup.color[f].astype(np.float64) / 255.0
    tid = soup.tex_id[f]
    for t in np.unique(tid[tid >= 0]):
        sel = tid == t
        tex = soup.textures[t]
        uv = np.einsum("nk,nkj->nj", b[sel], soup.uv[f[sel]].astype(np.float64))
        uv -= np.floor(uv)  # repeat wrap
        th, tw = tex.shape[:2]
        col = np.minimum((uv[:, 0] * tw).astype(np.int64), tw - 1)
        row = np.minimum(((1.0 - uv[:, 1]) * th).astype(np.int64), th - 1)
        albedo[sel] = tex[row, col] / 255.0
    T = np.asarray(T_world_cam, np.float64)
    p = np.einsum("nk,nkj->nj", b, soup.tris[f])
    view = T[:3, 3] - p
    view /= np.maximum(np.linalg.norm(view, axis=1, keepdims=True), 1e-12)
    n = soup.normal[f]
    n = np.where((np.sum(n * view, 1) < 0)[:, None], -n, n)  # two-sided: face the camera
    L = lighting
    light_dir = np.asarray(L.direction, np.float64) / np.linalg.norm(L.direction)
    light = L.ambient + L.diffuse * np.clip(n @ light_dir, 0, None) + L.headlight * np.abs(np.sum(n * view, 1))
    light = light[:, None] * np.asarray(L.tint, np.float64)[None]
    rgb[hit] = np.clip(np.round(albedo * light * 255.0), 0, 255).astype(np.uint8)
    ncam[hit] = (n @ T[:3, :3]).astype(np.float32)
    return rgb, ncam


def render(soup: TriangleSoup, cam, T_world_cam: np.ndarray, near: float = 0.05, far: float = 30.0,
           lighting: Lighting = DEFAULT_LIGHTING) -> RenderResult:
    """Render colour, depth, triangle and instance ids for one camera pose (``T_world_cam`` optical frame)."""
    face, bary, depth = rasterise(soup, cam, T_world_cam, near, far)
    rgb, ncam = shade(soup, face, bary, T_world_cam, lighting)
    inst = np.where(face >= 0, soup.instance[np.maximum(face, 0)], -1)
    return RenderResult(rgb, depth.astype(np.float32), face, inst, bary, ncam)
