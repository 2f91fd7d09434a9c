"""Sensor imperfections: structured-light style depth noise and a drifting published pose."""
from __future__ import annotations

import numpy as np


def depth_sigma(z: np.ndarray) -> np.ndarray:
    """Axial noise std (m) growing quadratically with range (Kinect model, Nguyen et al. 2012)."""
    return 0.0012 + 0.0019 * (z - 0.4) ** 2


def noisy_depth(depth: np.ndarray, normal_cam: np.ndarray, cam, rng: np.random.Generator, max_range: float = 6.0,
                grazing_deg: float = 78.0, edge_jump: float = 0.08, edge_drop: float = 0.5,
                speckle: float = 0.004) -> np.ndarray:
    """Noisy copy of ``depth`` (float32 m, NaN invalid).

    Adds range-dependent Gaussian noise and drops pixels (NaN) that a real sensor misses: surfaces
    seen at grazing angles, pixels on depth discontinuities (with probability ``edge_drop``), random
    speckle, and anything beyond ``max_range``.
    """
    H, W = depth.shape
    z = depth.astype(np.float64)
    valid = np.isfinite(z)
    out = z + rng.standard_normal((H, W)) * depth_sigma(np.where(valid, z, 0.0))
    # viewing angle between the pixel ray and the surface normal
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    ray = np.stack([(cols - cam.cx) / cam.fx, (rows - cam.cy) / cam.fy, np.ones((H, W))], -1)
    ray /= np.linalg.norm(ray, axis=-1, keepdims=True)
    cos = np.abs(np.sum(ray * normal_cam, -1))
    drop = valid & (cos < np.cos(np.deg2rad(grazing_deg)))
    # depth discontinuities vs 4-neighbours
    zp = np.pad(np.where(valid, z, np.inf), 1, mode="edge")
    jump = np.zeros((H, W), bool)
    for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
        nb = zp[dr:dr + H, dc:dc + W]
        jump |= ~(np.abs(nb - z) <= edge_jump * np.maximum(z, 1.0))
    drop |= valid & jump & (rng.random((H, W)) < edge_drop)
    drop |= rng.random((H, W)) < speckle
    drop |= z > max_range
    out[drop | ~valid] = np.nan
    return out.astype(np.float32)


def _rotvec_to_matrix(r: np.ndarray) -> np.ndarray:
    th = np.linalg.norm(r)
    if th < 1e-12:
        return np.eye(3)
    k = r / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(th) * K + (1 - np.cos(th)) * K @ K


def drifting_poses(poses_true: list, rng: np.random.Generator, trans_step: float = 0.002,
                   rot_step_deg: float = 0.08) -> list:
    """Published poses = D_k · T_k with D_k a world-frame random walk (odometry-like drift).

    Per frame the walk adds N(0, trans_step) m per axis and a N(0, rot_step_deg)° rotation; the first
    frame is exact.
    """
    D = np.eye(4)
    out = []
    for k, T in enumerate(poses_true):
        if k:
            step = np.eye(4)
            step[:3, :3] = _rotvec_to_matrix(rng.normal(0, np.deg2rad(rot_step_deg), 3))
            step[:3, 3] = rng.normal(0, trans_step, 3)
            D = step @ D
        out.append(D @ np.asarray(T, np.float64))
    return out


def camera_effects(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Domain randomisation of a rendered colour frame: exposure / contrast / white balance jitter,
    optional Gaussian blur (defocus, motion) and sensor noise. uint8 (H, W, 3) → uint8 (H, W, 3)."""
    x = rgb.astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.75, 1.25) + mean * rng.uniform(0.75, 1.25)      # contrast, exposure
    x *= rng.uniform(0.9, 1.1, 3)[None, None]                                        # white balance
    if rng.random() < 0.4:
        from scipy.ndimage import gaussian_filter
        x = gaussian_filter(x, sigma=(rng.uniform(0.4, 1.4),) * 2 + (0,))
    x += rng.normal(0, rng.uniform(0, 6), x.shape)                                  # read noise
    return np.clip(np.round(x), 0, 255).astype(np.uint8)
