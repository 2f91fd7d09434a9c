"""Camera trajectories (REP-103 optical frame: x right, y down, z forward; world z up)."""
from __future__ import annotations

import numpy as np


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """T_world_cam of an optical-frame camera at ``eye`` looking at ``target``."""
    eye = np.asarray(eye, np.float64)
    z = np.asarray(target, np.float64) - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, np.float64))
    if np.linalg.norm(x) < 1e-9:
        raise ValueError("target: looking straight along 'up' is ambiguous")
    x /= np.linalg.norm(x)
    y = np.cross(z, x)  # points down for an upright camera
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, eye
    return T


def room_loop(width: float, depth: float, n_frames: int, seed: int = 0, margin: float = 1.05,
              height=(1.3, 1.6)) -> list[np.ndarray]:
    """Smooth closed loop on an ellipse ``margin`` inside the walls, looking across the room.

    The camera sweeps 360° once; it aims past the room centre at the far side (0.85 m high), so every
    wall, the furniture against it and the central table are seen from several viewpoints.
    """
    if n_frames < 2:
        raise ValueError(f"n_frames: need >= 2, got {n_frames}")
    rng = np.random.default_rng(seed + 7919)
    c = np.array([width / 2, depth / 2])
    a, b = max(width / 2 - margin, 0.3), max(depth / 2 - margin, 0.3)
    phase = rng.uniform(0, 2 * np.pi)
    h0, h1 = height
    poses = []
    for k in range(n_frames):
        th = phase + 2 * np.pi * k / n_frames
        eye = np.array([c[0] + a * np.cos(th), c[1] + b * np.sin(th),
                        (h0 + h1) / 2 + (h1 - h0) / 2 * np.sin(2 * th)])
        # target: far side of the room, slightly ahead along the loop so the view pans
        tt = th + np.pi + 0.45
        target = np.array([c[0] + 0.8 * (width / 2) * np.cos(tt), c[1] + 0.8 * (depth / 2) * np.sin(tt), 0.85])
        poses.append(look_at(eye, target))
    return poses
