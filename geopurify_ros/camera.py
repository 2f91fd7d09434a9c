"""Camera geometry: pinhole intrinsics (+ plumb_bob undistortion), back-projection, pose maths.

Frames (REP-103 / REP-105):
- The *camera optical frame* (``<camera>_optical_frame``) has x right, y down, z forward (out of the lens);
  pixel (row, col) with depth z back-projects to ``z * ((col - cx) / fx, (row - cy) / fy, 1)`` (before
  undistortion). Depth is the z coordinate (as RGB-D drivers publish it), not the ray length.
- The *camera body frame* (``<camera>_link``) has x forward, y left, z up. ``R_BODY_OPTICAL`` rotates
  optical-frame vectors into the body frame; its quaternion (xyzw) is ``Q_BODY_OPTICAL = (-0.5, 0.5, -0.5, 0.5)``,
  the usual static transform ``<camera>_link -> <camera>_optical_frame``.
- Poses are ``T_world_cam``: 4x4 float64 mapping optical-frame points to the world (map) frame,
  ``p_world = T[:3, :3] @ p_cam + T[:3, 3]``.

Pixel convention: integer pixel (row, col) is the *centre* of that pixel, as in sensor_msgs/CameraInfo K.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

R_BODY_OPTICAL = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
Q_BODY_OPTICAL = (-0.5, 0.5, -0.5, 0.5)

# Models whose coefficients we can invert; others are accepted only when all coefficients are zero.
_SUPPORTED_DISTORTION = ("plumb_bob", "rational_polynomial")
_UNDISTORT_ITERATIONS = 10


@dataclass(frozen=True)
class CameraModel:
    """Pinhole camera with optional plumb_bob / rational_polynomial distortion (OpenCV coefficient order).

    ``d`` = (k1, k2, p1, p2, k3[, k4, k5, k6]); all-zero or empty ``d`` means an ideal pinhole.
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = ""
    d: tuple = field(default=())

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if int(v) != v or v <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("fx", "fy", "cx", "cy"):
            v = float(getattr(self, name))
            if not np.isfinite(v) or (name in ("fx", "fy") and v <= 0):
                kind = "finite positive" if name in ("fx", "fy") else "finite"
                raise ValueError(f"{name}: expected a {kind} value, got {v!r}")
            object.__setattr__(self, name, v)
        d = tuple(float(x) for x in (self.d if self.d is not None else ()))
        if not all(np.isfinite(d)):
            raise ValueError(f"d: non-finite distortion coefficients {d}")
        object.__setattr__(self, "d", d)
        model = (self.distortion_model or "").strip()
        object.__setattr__(self, "distortion_model", model)
        if any(d) and model not in _SUPPORTED_DISTORTION:
            raise ValueError(f"distortion_model: unsupported '{model}' with non-zero d "
                             f"(supported: {_SUPPORTED_DISTORTION})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_k(cls, K, width: int, height: int, distortion_model: str = "", d: Sequence[float] = ()) -> "CameraModel":
        """From a (3,3) or flat 9-element intrinsic matrix."""
        K = np.asarray(K, dtype=np.float64)
        if K.size != 9:
            raise ValueError(f"k: expected 9 elements (3x3), got shape {K.shape}")
        K = K.reshape(3, 3)
        return cls(width, height, K[0, 0], K[1, 1], K[0, 2], K[1, 2], distortion_model, tuple(d))

    @classmethod
    def from_camera_info(cls, info) -> "CameraModel":
        """From a sensor_msgs/CameraInfo (or anything with ``.width .height .k .d .distortion_model``)."""
        d = getattr(info, "d", None)  # may be a list, array.array or ndarray (rosbags): no truthiness tests
        d = () if d is None else tuple(np.asarray(d, dtype=np.float64).reshape(-1))
        return cls.from_k(info.k, info.width, info.height, getattr(info, "distortion_model", "") or "", d)

    # ------------------------------------------------------------------ derived
    @property
    def k(self) -> np.ndarray:
        """(3,3) float64 intrinsic matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def has_distortion(self) -> bool:
        return any(self.d)

    def scaled(self, width: int, height: int) -> "CameraModel":
        """Model for the same camera with the image resized to (width, height).

        Pixel centres map as ``u' = (u + 0.5) * s - 0.5``; distortion acts on normalised coordinates so it is kept.
        """
        sx, sy = width / self.width, height / self.height
        return CameraModel(width, height, self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5,
                           (self.cy + 0.5) * sy - 0.5, self.distortion_model, self.d)

    # ------------------------------------------------------------------ distortion
    def distort(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the distortion model to normalised coordinates (any equal shapes)."""
        d = list(self.d) + [0.0] * (8 - len(self.d))
        k1, k2, p1, p2, k3, k4, k5, k6 = d[:8]
        r2 = x * x + y * y
        radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        return xd, yd

    def undistort(self, xd: torch.Tensor, yd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert ``distort`` by fixed-point iteration (as OpenCV's undistortPoints); identity without distortion."""
        if not self.has_distortion:
            return xd, yd
        d = list(self.d) + [0.0] * (8 - len(self.d))
        k1, k2, p1, p2, k3, k4, k5, k6 = d[:8]
        x, y = xd.clone(), yd.clone()
        for _ in range(_UNDISTORT_ITERATIONS):
            r2 = x * x + y * y
            icdist = (1 + r2 * (k4 + r2 * (k5 + r2 * k6))) / (1 + r2 * (k1 + r2 * (k2 + r2 * k3)))
            dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
            dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
            x = (xd - dx) * icdist
            y = (yd - dy) * icdist
        return x, y

    def pixel_rays(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Undistorted normalised ray (x/z, y/z) for pixel centres; rows/cols any equal shapes (float)."""
        xd = (cols - self.cx) / self.fx
        yd = (rows - self.cy) / self.fy
        return self.undistort(xd, yd)


# ---------------------------------------------------------------------- poses
def pose_to_matrix(position, quaternion_xyzw) -> np.ndarray:
    """(4,4) float64 homogeneous transform from a translation (3,) and a quaternion (x, y, z, w).

    The quaternion is normalised; a zero-norm or non-finite quaternion raises ValueError.
    """
    p = np.asarray(position, dtype=np.float64).reshape(-1)
    q = np.asarray(quaternion_xyzw, dtype=np.float64).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ValueError(f"position: expected 3 finite values, got {position!r}")
    if q.shape != (4,) or not np.all(np.isfinite(q)):
        raise ValueError(f"quaternion: expected 4 finite values (x, y, z, w), got {quaternion_xyzw!r}")
    n = np.linalg.norm(q)
    if n < 1e-12:
        raise ValueError("quaternion: zero norm, not a rotation")
    x, y, z, w = q / n
    T = np.eye(4)
    T[:3, :3] = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ]
    T[:3, 3] = p
    return T


def matrix_to_pose(T) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pose_to_matrix``: (position (3,), quaternion xyzw (4,) with w >= 0)."""
    T = validate_pose(T)
    R = T[:3, :3]
    # Shepperd's method: pivot on the largest of (trace, diagonal) for numerical stability.
    tr = np.trace(R)
    i = int(np.argmax([tr, R[0, 0], R[1, 1], R[2, 2]]))
    if i == 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif i == 1:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif i == 2:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    return T[:3, 3].copy(), q


def validate_pose(T, name: str = "T_world_cam", atol: float = 1e-3) -> np.ndarray:
    """Check a (4,4) rigid transform (finite, orthonormal rotation, det +1, last row 0 0 0 1); returns float64."""
    if isinstance(T, torch.Tensor):
        T = T.detach().cpu().numpy()
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise ValueError(f"{name}: expected shape (4, 4), got {T.shape}")
    if not np.all(np.isfinite(T)):
        raise ValueError(f"{name}: contains non-finite values")
    R = T[:3, :3]
    # np.allclose semantics (rtol 1e-5) without its overhead: this runs for every frame.
    if (not _close(R @ R.T, _EYE3, atol) or abs(np.linalg.det(R) - 1) > atol
            or not _close(T[3], _LAST_ROW, atol)):
        raise ValueError(f"{name}: not a rigid transform (rotation must be orthonormal with det +1)")
    return T


_EYE3 = np.eye(3)
_LAST_ROW = np.array([0.0, 0.0, 0.0, 1.0])


def _close(a: np.ndarray, b: np.ndarray, atol: float) -> bool:
    return bool((np.abs(a - b) <= atol + 1e-5 * np.abs(b)).all())


# ---------------------------------------------------------------------- back-projection
def depth_in_range(z, min_depth: float, max_depth: float):
    """Mask of the depths `backproject` uses (ndarray or Tensor): min_depth <= z <= max_depth and z > 0.

    NaN compares False, so NaN is dropped; inf fails the max test; z = 0 is "no return" even if min_depth = 0.
    """
    return (z >= min_depth) & (z <= max_depth) & (z > 0)


def count_fusable_depth(depth, stride: int, min_depth: float, max_depth: float) -> int:
    """Number of pixels of the stride grid that `backproject` would keep (0: the frame adds nothing)."""
    return int(depth_in_range(depth[::stride, ::stride], min_depth, max_depth).sum())


def backproject(depth, cam: CameraModel, T_world_cam, stride: int = 1, min_depth: float = 0.1,
                max_depth: float = 8.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Back-project valid depth pixels of the stride grid into the world frame.

    Args:
        depth: (H, W) metres (Tensor or ndarray), NaN/inf/<=0 invalid; (H, W) must match ``cam``.
        cam: intrinsics of the depth image.
        T_world_cam: (4,4) world <- optical frame.
        stride: use pixels (stride*i, stride*j).
        min_depth, max_depth: keep min_depth <= z <= max_depth.
    Returns:
        points_world (N,3) float32, pixels (N,2) long (row, col) in the full image, depth (N,) float32;
        all on ``depth``'s device (CPU for ndarray input).
    """
    points, idx, z = backproject_grid(depth, cam, T_world_cam, stride, min_depth, max_depth)
    pix_grid, _ = stride_grid(cam, stride, points.device)
    return points, pix_grid.index_select(0, idx), z


def backproject_grid(depth, cam: CameraModel, T_world_cam, stride: int = 1, min_depth: float = 0.1,
                     max_depth: float = 8.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As ``backproject``, but returns the points' indices into ``stride_grid`` (N,) long instead of pixels.
    The (N, 3) points are a view of channel-major (3, N) storage (elementwise results keep that layout).

    Callers that need per-pixel quantities of the grid (colours, sampling coefficients) index cached grid tables
    with them, which is cheaper than recomputing those from (row, col) for every frame.
    """
    if isinstance(depth, np.ndarray):
        depth = torch.from_numpy(np.ascontiguousarray(depth))
    if not isinstance(depth, torch.Tensor):
        raise ValueError(f"depth: expected a Tensor or ndarray, got {type(depth).__name__}")
    if not depth.is_floating_point():
        raise ValueError(f"depth: expected float metres, got {depth.dtype} (decode with image_codec.decode_depth)")
    if depth.shape != (cam.height, cam.width):
        raise ValueError(f"depth: expected ({cam.height}, {cam.width}) to match cam, got {tuple(depth.shape)}")
    check_grid_args(stride, min_depth, max_depth)
    stride = int(stride)
    T = torch.as_tensor(validate_pose(T_world_cam), dtype=torch.float32, device=depth.device)
    R, t = T[:3, :3], T[:3, 3]
    dev = depth.device
    z = depth[::stride, ::stride].to(torch.float32).contiguous()
    valid = depth_in_range(z, min_depth, max_depth)
    idx = valid.reshape(-1).nonzero().squeeze(1)
    _, ray_grid = stride_grid(cam, stride, dev)
    zv = z.reshape(-1).index_select(0, idx)
    xn, yn = ray_grid.index_select(0, idx).unbind(1)
    x, y = xn * zv, yn * zv
    # Row-by-row affine map: a (N,3)@(3,3) matmul is slower than 3 fused multiply-adds per output on CPU. Stored
    # channel-major ((3, N) memory, returned as its (N, 3) transpose): each coordinate is one contiguous row.
    points = torch.stack([torch.addcmul(torch.addcmul(zv * R[i, 2] + t[i], x, R[i, 0]), y, R[i, 1])
                          for i in range(3)], dim=0).t()
    return points, idx, zv


def check_grid_args(stride, min_depth: float, max_depth: float) -> None:
    """ValueError unless stride is a positive integer and 0 <= min_depth < max_depth (``backproject_grid``'s args)."""
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride: expected a positive integer, got {stride!r}")
    if not (0 <= min_depth < max_depth):
        raise ValueError(f"min_depth/max_depth: need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}")


def stride_grid(cam: CameraModel, stride: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (n,2) long (row, col), rays (n,2) float32 (x/z, y/z)) of the stride grid of ``cam``, row-major; cached.

    The rays are ``cam.pixel_rays`` of the grid pixels (elementwise, so identical to evaluating them per point).
    The cache is keyed by the camera's value (CameraModel is a frozen, hashable dataclass), so a node that rebuilds
    the model from every CameraInfo message still hits it; it holds at most ``_RAY_GRID_CACHE_SIZE`` grids.
    """
    stride = int(stride)
    key = (cam, stride, str(dev))
    hit = _RAY_GRIDS.get(key)
    if hit is None:
        h_s, w_s = (cam.height + stride - 1) // stride, (cam.width + stride - 1) // stride
        rows = (torch.arange(h_s, device=dev) * stride)[:, None].expand(h_s, w_s).reshape(-1)
        cols = (torch.arange(w_s, device=dev) * stride)[None, :].expand(h_s, w_s).reshape(-1)
        xn, yn = cam.pixel_rays(rows.to(torch.float32), cols.to(torch.float32))
        hit = (torch.stack((rows, cols), dim=1), torch.stack((xn, yn), dim=1))
        if len(_RAY_GRIDS) >= _RAY_GRID_CACHE_SIZE:
            _RAY_GRIDS.clear()
        _RAY_GRIDS[key] = hit
    return hit


_RAY_GRID_CACHE_SIZE = 8
_RAY_GRIDS: dict = {}
