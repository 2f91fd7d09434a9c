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


def lawnmower(width: float, depth: float, n_frames: int, seed: int = 0, margin: float = 0.8,
              height=(1.2, 1.7), rows: int = 3) -> list[np.ndarray]:
    """Back-and-forth rows across the room (a mapping robot's coverage pattern), looking ahead and to the
    sides in turn, at a camera height drawn from ``height``."""
    if n_frames < 2:
        raise ValueError(f"n_frames: need >= 2, got {n_frames}")
    rng = np.random.default_rng(seed + 104729)
    xs = np.linspace(margin, max(width - margin, margin + 0.1), max(2, n_frames // rows))
    ys = np.linspace(margin, max(depth - margin, margin + 0.1), rows)
    path = [(x, y) for r, y in enumerate(ys) for x in (xs if r % 2 == 0 else xs[::-1])]
    z = rng.uniform(*height)
    poses = []
    for k in range(n_frames):
        x, y = path[int(k * len(path) / n_frames)]
        # heading sweeps ±100° around the row direction so walls on both sides are seen
        heading = np.arctan2(0.0, 1.0 if (int(k * rows / n_frames) % 2 == 0) else -1.0)
        yaw = heading + np.deg2rad(100) * np.sin(2 * np.pi * k / max(n_frames / rows, 1))
        target = np.array([x + 2.0 * np.cos(yaw), y + 2.0 * np.sin(yaw), z - rng.uniform(0.4, 1.0)])
        poses.append(look_at((x, y, z), target))
    return poses


def handheld_jitter(poses: list[np.ndarray], seed: int = 0, trans_m: float = 0.02,
                    rot_deg: float = 2.0) -> list[np.ndarray]:
    """A hand-held camera: smooth random shake (low-pass random walk) applied in the camera frame."""
    from .noise import _rotvec_to_matrix

    rng = np.random.default_rng(seed + 15485863)
    n = len(poses)
    kernel = np.hanning(7)
    kernel /= kernel.sum()
    shake = [np.convolve(rng.normal(0, 1, n + 6), kernel, "valid")[:n] for _ in range(6)]
    out = []
    for k, T in enumerate(poses):
        d = np.eye(4)
        d[:3, :3] = _rotvec_to_matrix(np.deg2rad(rot_deg) * np.array([s[k] for s in shake[:3]]))
        d[:3, 3] = trans_m * np.array([s[k] for s in shake[3:]])
        out.append(np.asarray(T, np.float64) @ d)
    return out


TRAJECTORIES = ("loop", "lawnmower", "handheld")


def make_trajectory(kind: str, width: float, depth: float, n_frames: int, seed: int = 0,
                    height=(1.3, 1.6)) -> list[np.ndarray]:
    """Camera poses for ``kind``: 'loop' (room_loop), 'lawnmower', 'handheld' (a loop with hand-held shake)."""
    if kind == "loop":
        return room_loop(width, depth, n_frames, seed=seed, height=height)
    if kind == "lawnmower":
        return lawnmower(width, depth, n_frames, seed=seed, height=height)
    if kind == "handheld":
        return handheld_jitter(room_loop(width, depth, n_frames, seed=seed, height=height), seed=seed)
    raise ValueError(f"trajectory: expected one of {TRAJECTORIES}, got {kind!r}")
