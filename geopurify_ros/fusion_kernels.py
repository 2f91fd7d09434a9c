"""Fused CPU kernels for ``VoxelMap.fuse_frame`` (numba), used when numba is importable and the map is on the CPU.

The torch path (``voxel_map.py``) back-projects, groups a frame's points by (voxel, feature cell) with sorts and
folds the features block by block in ~150 tensor ops; each op is fast, but on one CPU thread their passes over
memory and their dispatch cost dominate (bench/bench_fusion.py). Here the same arithmetic runs in three passes:

* ``group_frame``: depth -> world points (``camera.backproject_grid``'s float32 operations, in its order) -> sorted
  unique voxel keys, per-voxel weighted sums (weight, xyz, rgb, count) and per (voxel, cell) pair the four bilinear
  corner weights, in CSR order by voxel. Voxels are found through a hash table after trying the previous pixel's
  and the pixel above's voxel, which answer most points. With depth guidance, a vectorised pass first gives every
  grid pixel its guided corner weights (``_guide_weights``), which the grouping then sums instead of the bilinear ones;
* ``update_existing``: the running-mean update of the voxels already in the map (position, colour, weight, count);
* ``fold_features``: per voxel, the bilinear feature sum ``sum_pairs sum_corners w * F[cell]`` scaled, blended
  with the stored float16 row and written back as float16 (conversions are LLVM ``fpext``/``fptrunc``, i.e. the
  same IEEE round-to-nearest-even as torch, vectorised with F16C where the CPU has it).

Voxel assignment is bit-identical to the torch path; sums differ only in float32 summation order (tests compare
the two). Without numba, on CUDA, or when a kernel fails to compile (checked once, in ``available()``, before any
map is touched), ``VoxelMap`` uses the torch path.
"""
from __future__ import annotations

import logging
import os

import numpy as np

_log = logging.getLogger(__name__)

try:  # optional dependency: the torch path covers everything without it
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised on installs without numba
    njit = None

# GEOPURIFY_FUSION_KERNELS=0 forces the torch path (A/B benchmarks, debugging).
ENABLED = njit is not None and os.environ.get("GEOPURIFY_FUSION_KERNELS", "1") != "0"
_BROKEN: list[str] = []      # reason, once compilation failed (then the torch path is used for the process)
_READY: list[bool] = []      # every kernel compiled (or loaded from numba's cache) in this process


def available() -> bool:
    """numba present, not switched off, and every kernel compiled. The first call compiles them all (~5 s once per
    machine, then ~0.4 s from numba's cache), so a compiler failure is found before any map is touched, never
    half-way through a fuse; it is logged once and the torch path is used."""
    if not ENABLED or _BROKEN:
        return False
    if not _READY:
        try:
            _compile_all()
        except Exception as exc:  # noqa: BLE001 - any numba/LLVM failure means "use the torch path"
            disable(f"{type(exc).__name__}: {exc}")
            return False
        _READY.append(True)
    return True


def disable(reason: str) -> None:
    """Fall back to the torch path for the rest of the process (logged once)."""
    if not _BROKEN:
        _BROKEN.append(reason)
        _log.warning("fusion kernels disabled, using the torch path: %s", reason)


if njit is not None:
    @intrinsic
    def _half_to_f32(typingctx, bits):
        """int16 bits of an IEEE half -> float32 (exact)."""
        sig = types.float32(types.int16)

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return sig, codegen

    @intrinsic
    def _f32_to_half(typingctx, x):
        """float32 -> int16 bits of the nearest IEEE half (round to nearest even, as torch's .half())."""
        sig = types.int16(types.float32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return sig, codegen

    @njit(cache=True, nogil=True, inline="always")
    def _affinity(d, floor):
        """``voxel_map.depth_affinity``: (1 - d^2 / 2048)_+^1024 (≈ exp(-d^2 / 2)) by ten squarings, at least ``floor``
        (NaN: ``floor``). No call and no branch, so `_guide_weights`' loop vectorises (expf made it 2x slower)."""
        e = np.float32(1.0) - np.float32(1.0 / 2048.0) * d * d
        e = e if e > np.float32(0.0) else np.float32(0.0)
        for _ in range(10):
            e *= e
        return e if e >= floor else floor

    @njit(cache=True, nogil=True)
    def _guide_weights(depth, stride, cell_grid, frac_grid, cell_depth, inv_sigma, floor, dx, dy, out):
        """Per pixel g of the stride grid: its depth-guided corner weights c01, c10, c11 into out[g] (c00 = 1 - their
        sum; ``voxel_map.guided_corner_weights``): bilinear weight x `_affinity((z - z_cell) / (sigma z))`,
        renormalised. A pass of its own (pixels are independent), so it vectorises; rows of pixels without valid depth
        hold NaN and are never read."""
        hs = (depth.shape[0] + stride - 1) // stride
        ws = (depth.shape[1] + stride - 1) // stride
        one = np.float32(1.0)
        for row in range(hs):
            drow = depth[row * stride]
            for col in range(ws):
                g = row * ws + col
                zv = drow[col * stride]
                k = inv_sigma / zv
                c = cell_grid[g]
                ax, ay = frac_grid[g, 0], frac_grid[g, 1]
                t0 = (one - ax) * (one - ay) * _affinity((zv - cell_depth[c]) * k, floor)
                t1 = ax * (one - ay) * _affinity((zv - cell_depth[c + dx]) * k, floor)
                t2 = (one - ax) * ay * _affinity((zv - cell_depth[c + dy]) * k, floor)
                t3 = ax * ay * _affinity((zv - cell_depth[c + dy + dx]) * k, floor)
                sc = one / (t0 + t1 + t2 + t3)
                out[g, 0] = t1 * sc
                out[g, 1] = t2 * sc
                out[g, 2] = t3 * sc

    @njit(cache=True, nogil=True)
    def _group_frame(depth, stride, min_depth, max_depth, uniform, rays, rot, trans, cell_grid, frac_grid, pix_flat,
                     rgb, voxel_size, key_min, key_max, key_offset, key_bits, guided, corner_weights, table, vkeys,
                     vslot, vsum, vcnt, vhead, pcell, pnext, pvox, psum):
        hs = (depth.shape[0] + stride - 1) // stride
        ws = (depth.shape[1] + stride - 1) // stride
        vs = np.float32(voxel_size)
        one = np.float32(1.0)
        mask = table.shape[0] // 2 - 1
        above_key = np.full(ws, -1, np.int64)
        above_v = np.empty(ws, np.int64)
        m = 0
        npair = 0
        last_key = -1
        last_v = -1
        last_cell = -1
        last_p = -1
        for row in range(hs):
            drow = depth[row * stride]
            for col in range(ws):
                g = row * ws + col
                zv = drow[col * stride]
                if not (zv >= min_depth and zv <= max_depth and zv > 0):    # camera.depth_in_range (NaN fails)
                    continue
                # camera.backproject_grid's float32 operation order (so points, hence voxels, are bit-identical)
                xr, yr = rays[g, 0] * zv, rays[g, 1] * zv
                x = ((zv * rot[0, 2] + trans[0]) + xr * rot[0, 0]) + yr * rot[0, 1]
                y = ((zv * rot[1, 2] + trans[1]) + xr * rot[1, 0]) + yr * rot[1, 1]
                z = ((zv * rot[2, 2] + trans[2]) + xr * rot[2, 0]) + yr * rot[2, 1]
                qi, qj, qk = np.floor(x / vs), np.floor(y / vs), np.floor(z / vs)
                if not (qi >= key_min and qi <= key_max and qj >= key_min and qj <= key_max and qk >= key_min
                        and qk <= key_max):
                    continue
                key = (((np.int64(qi) + key_offset) << (2 * key_bits)) | ((np.int64(qj) + key_offset) << key_bits)
                       | (np.int64(qk) + key_offset))
                # Coherence first: the previous point and the point one grid row above usually share the voxel.
                if key == last_key:
                    v = last_v
                elif key == above_key[col]:
                    v = above_v[col]
                else:
                    h = ((key * np.int64(-7046029254386353131)) >> 20) & mask
                    while True:                      # open addressing; key and id side by side (one cache line)
                        k = table[2 * h]
                        if k == key:
                            v = table[2 * h + 1]
                            break
                        if k == -1:
                            table[2 * h] = key
                            table[2 * h + 1] = m
                            v = m
                            vkeys[v] = key
                            vslot[v] = h
                            for j in range(7):
                                vsum[v, j] = 0.0
                            vcnt[v] = 0
                            vhead[v] = -1
                            m += 1
                            break
                        h = (h + 1) & mask
                last_key, last_v = key, v
                above_key[col], above_v[col] = key, v
                cell = cell_grid[g]
                if cell == last_cell and last_p >= 0 and pvox[last_p] == v:
                    p = last_p
                else:
                    p = vhead[v]
                    while p >= 0 and pcell[p] != cell:
                        p = pnext[p]
                    if p < 0:
                        p = npair
                        npair += 1
                        pcell[p] = cell
                        pvox[p] = v
                        pnext[p] = vhead[v]
                        vhead[v] = p
                        for j in range(4):
                            psum[p, j] = 0.0
                    last_cell, last_p = cell, p
                wi = one if uniform else one / (zv * zv)
                ax, ay = frac_grid[g, 0], frac_grid[g, 1]
                # sums of w and w * (c01, c10, c11); c00 follows from the weight sum in _group_csr
                if guided:
                    c01, c10, c11 = corner_weights[g, 0], corner_weights[g, 1], corner_weights[g, 2]
                else:
                    c01, c10, c11 = ax * (one - ay), (one - ax) * ay, ax * ay
                psum[p, 0] += wi
                psum[p, 1] += wi * c01
                psum[p, 2] += wi * c10
                psum[p, 3] += wi * c11
                c = pix_flat[g]
                vsum[v, 0] += wi
                vsum[v, 1] += wi * x
                vsum[v, 2] += wi * y
                vsum[v, 3] += wi * z
                vsum[v, 4] += wi * rgb[c, 0]
                vsum[v, 5] += wi * rgb[c, 1]
                vsum[v, 6] += wi * rgb[c, 2]
                vcnt[v] += 1
        for v in range(m):                           # leave the hash table empty for the next frame: O(voxels)
            table[2 * vslot[v]] = -1
        return m, npair

    @njit(cache=True, nogil=True)
    def _group_csr(order, npair, vkeys, vsum, vcnt, vhead, pcell, pvox, psum, ukeys, per_vox, cnt, start, cells, cw):
        """Voxels in ``order`` (sorted keys: the map's index wants them), pairs in CSR order by sorted voxel."""
        m = order.shape[0]
        for r in range(m):
            v = order[r]
            vhead[v] = r                             # reused: rank of voxel v
            ukeys[r] = vkeys[v]
            for j in range(7):
                per_vox[r, j] = vsum[v, j]
            cnt[r] = vcnt[v]
            start[r + 1] = 0
        start[0] = 0
        for p in range(npair):
            start[vhead[pvox[p]] + 1] += 1
        for r in range(m):
            start[r + 1] += start[r]
        for p in range(npair):
            r = vhead[pvox[p]]
            q = start[r]                             # start[r] advances while filling; restored below
            start[r] = q + 1
            cells[q] = pcell[p]                      # psum = (w, w*c01, w*c10, w*c11); corners 00, 01, 10, 11
            cw[q, 0] = psum[p, 0] - psum[p, 1] - psum[p, 2] - psum[p, 3]
            cw[q, 1] = psum[p, 1]
            cw[q, 2] = psum[p, 2]
            cw[q, 3] = psum[p, 3]
        for r in range(m - 1, 0, -1):
            start[r] = start[r - 1]
        start[0] = 0

    @njit(cache=True, nogil=True)
    def _fold_features(start, cells, cw, fmap, dx, dy, scale, a, old, dest, store):
        m = dest.shape[0]
        d = fmap.shape[1]
        acc = np.empty(d, np.float32)
        for v in range(m):
            slot = dest[v]
            if slot < 0:
                continue
            acc[:] = 0.0
            sv = scale[v]
            for p in range(start[v], start[v + 1]):
                c = cells[p]
                w0, w1, w2, w3 = cw[p, 0] * sv, cw[p, 1] * sv, cw[p, 2] * sv, cw[p, 3] * sv
                r0, r1, r2, r3 = fmap[c], fmap[c + dx], fmap[c + dy], fmap[c + dy + dx]
                for j in range(d):
                    acc[j] += w0 * r0[j] + w1 * r1[j] + w2 * r2[j] + w3 * r3[j]
            row = store[slot]
            if old[v]:
                av = a[v]
                for j in range(d):
                    row[j] = _f32_to_half(acc[j] + av * _half_to_f32(row[j]))
            else:
                for j in range(d):
                    row[j] = _f32_to_half(acc[j])

    @njit(cache=True, nogil=True)
    def _update_existing(slots, wsum, xsum, csum, cnt, stamp, weights, xyz, colors, counts, last_seen, dirty, w1,
                         scale, a):
        one = np.float32(1.0)
        for v in range(slots.shape[0]):
            sl = slots[v]
            if sl < 0:
                w1[v] = wsum[v]
                scale[v] = one / wsum[v]
                a[v] = 0.0
                continue
            w0 = weights[sl]
            wv = wsum[v] + w0
            sc = one / wv
            av = w0 / wv
            w1[v], scale[v], a[v] = wv, sc, av
            for j in range(3):
                xyz[sl, j] = xyz[sl, j] * av + xsum[v, j] * sc
                col = np.rint(np.float32(colors[sl, j]) * av + csum[v, j] * sc)
                colors[sl, j] = np.uint8(min(max(col, np.float32(0.0)), np.float32(255.0)))
            weights[sl] = wv
            counts[sl] += cnt[v]
            last_seen[sl] = stamp
            dirty[sl] = True


    @njit(cache=True, nogil=True)
    def _all_finite(flat):
        ok = True
        for i in range(flat.shape[0]):
            ok &= flat[i] - flat[i] == np.float32(0.0)    # NaN for NaN / +-inf; an AND reduction vectorises
        return ok


class Workspace:
    """Scratch arrays of ``group_frame``, kept between frames: allocating (and page-faulting) ~15 MB per frame cost
    more than the kernel itself. Grown on demand; the hash table is left empty by every call."""

    def __init__(self):
        self.n = -1

    def ensure(self, n: int) -> None:
        if n <= self.n:
            return
        n = max(n, 1024)
        cap = 16
        while cap < 2 * n:
            cap *= 2
        self.table = np.full(2 * cap, -1, np.int64)      # (key, voxel id) pairs; key -1 = empty
        self.vkeys, self.vslot, self.vhead = (np.empty(n, np.int64) for _ in range(3))
        self.pcell, self.pnext, self.pvox = (np.empty(n, np.int64) for _ in range(3))
        # float32 sums, as the torch path's index_add_
        self.vsum, self.psum = np.empty((n, 7), np.float32), np.empty((n, 4), np.float32)
        self.vcnt, self.cnt = np.empty(n, np.int32), np.empty(n, np.int32)
        self.ukeys, self.cells = np.empty(n, np.int64), np.empty(n, np.int64)
        self.per_vox, self.cw = np.empty((n, 7), np.float32), np.empty((n, 4), np.float32)
        self.start = np.empty(n + 1, np.int64)
        self.gw = np.empty((n, 3), np.float32)           # depth-guided corner weights per grid pixel
        self.n = n


def group_frame(ws: Workspace, depth, stride: int, min_depth: float, max_depth: float, uniform: bool, rays, rot,
                trans, cell_grid, frac_grid, pix_flat, rgb, voxel_size: float, key_min: int, key_max: int,
                key_offset: int, key_bits: int, cell_depth=None, guide_sigma: float = 0.0, guide_floor: float = 0.0,
                dx: int = 0, dy: int = 0):
    """Back-project the stride grid of ``depth`` (H, W) float32 with ``rays`` (grid, 2) and world <- camera ``rot``
    (3, 3), ``trans`` (3,) float32 (as ``camera.backproject_grid``), weight points 1/z^2 (or 1 when ``uniform``) and
    group them. Returns views of ``ws`` (valid until its next use): (ukeys (M,) sorted int64, per_vox (M, 7) float32
    [w, w*xyz, w*rgb], cnt (M,) int32, start (M+1,) int64 CSR of pairs by voxel, cells (P,) int64 top-left cell,
    cw (P, 4) float32 corner weights). Points outside the key range are dropped, as in ``voxel_coords``.
    ``guide_sigma`` > 0: depth-guided corner weights (``voxel_map.guided_corner_weights``) with ``cell_depth`` (cells,)
    float32 the depth at each feature cell's centre and ``dx``, ``dy`` the cell offsets of the right / lower corner."""
    n = ((depth.shape[0] + stride - 1) // stride) * ((depth.shape[1] + stride - 1) // stride)
    ws.ensure(n)
    guided = guide_sigma > 0
    if guided:
        _guide_weights(depth, int(stride), cell_grid, frac_grid, cell_depth, np.float32(1.0 / guide_sigma),
                       np.float32(guide_floor), int(dx), int(dy), ws.gw)
    m, p = _group_frame(depth, int(stride), float(min_depth), float(max_depth), bool(uniform), rays, rot, trans,
                        cell_grid, frac_grid, pix_flat, rgb, float(voxel_size), float(key_min), float(key_max),
                        int(key_offset), int(key_bits), guided, ws.gw, ws.table, ws.vkeys, ws.vslot, ws.vsum,
                        ws.vcnt, ws.vhead, ws.pcell, ws.pnext, ws.pvox, ws.psum)
    order = np.argsort(ws.vkeys[:m])                 # numpy's sort: ~2x numba's on 10k keys
    _group_csr(order, p, ws.vkeys, ws.vsum, ws.vcnt, ws.vhead, ws.pcell, ws.pvox, ws.psum, ws.ukeys, ws.per_vox,
               ws.cnt, ws.start, ws.cells, ws.cw)
    return ws.ukeys[:m], ws.per_vox[:m], ws.cnt[:m], ws.start[:m + 1], ws.cells[:p], ws.cw[:p]


def fold_features(start, cells, cw, fmap, dx: int, dy: int, scale, a, old, dest, store) -> None:
    """In place on ``store`` (C, D) int16 bits of float16: row dest[v] = half(sum_pairs sum_corners cw*scale[v]*F
    + a[v] * stored row (existing voxels, ``old``)); dest -1 skips the voxel."""
    c = np.ascontiguousarray
    _fold_features(start, cells, cw, fmap, int(dx), int(dy), c(scale), c(a), c(old), c(dest), store)


def update_existing(slots, wsum, xsum, csum, cnt, stamp: float, weights, xyz, colors, counts, last_seen, dirty):
    """The running-mean update of the voxels already in the map (slots >= 0), in place on the storage arrays, in one
    pass; returns (w1, scale, a) (M,) float32: new weight sums, 1/w1 and the old-mean factor w0/w1 (0 for new)."""
    m = slots.shape[0]
    w1, scale, a = np.empty(m, np.float32), np.empty(m, np.float32), np.empty(m, np.float32)
    c = np.ascontiguousarray          # the per-voxel sums may be column views: (M, 7) -> one copy of M x 7 floats
    _update_existing(c(slots), c(wsum), c(xsum), c(csum), c(cnt), float(stamp), weights, xyz, colors, counts,
                     last_seen, dirty, w1, scale, a)
    return w1, scale, a


def all_finite(a: np.ndarray) -> bool:
    """True when no element of the float32 array is NaN or +-inf (one vectorised pass, ~2x torch's aminmax)."""
    return bool(_all_finite(a.reshape(-1)))


def _compile_all() -> None:
    """Run every kernel once on a one-voxel frame, with the dtypes and (contiguous) layouts of the real calls."""
    ws = Workspace()
    f32 = np.float32
    ukeys, per_vox, cnt, start, cells, cw = group_frame(
        ws, np.ones((2, 2), f32), 1, 0.1, 8.0, False, np.zeros((4, 2), f32), np.eye(3, dtype=f32), np.zeros(3, f32),
        np.zeros(4, np.int64), np.zeros((4, 2), f32), np.arange(4, dtype=np.int64), np.zeros((4, 3), np.uint8),
        0.05, -(1 << 20), (1 << 20) - 1, 1 << 20, 21, np.ones(4, f32), 0.05, 1e-4, 1, 2)      # guided signature
    m = ukeys.shape[0]
    weights, xyz, colors = np.ones(m, f32), np.zeros((m, 3), f32), np.zeros((m, 3), np.uint8)
    w1, scale, a = update_existing(np.arange(m, dtype=np.int64), per_vox[:, 0], per_vox[:, 1:4], per_vox[:, 4:7], cnt,
                                   0.0, weights, xyz, colors, np.zeros(m, np.int32), np.zeros(m, np.float64),
                                   np.zeros(m, np.bool_))
    fold_features(start, cells, cw, np.zeros((1, 2), f32), 0, 0, scale, a, np.ones(m, np.bool_),
                  np.arange(m, dtype=np.int64), np.zeros((m, 2), np.int16))
    all_finite(np.zeros(4, f32))
