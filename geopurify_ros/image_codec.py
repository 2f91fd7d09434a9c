"""ROS-free decoding/encoding of sensor_msgs/Image payloads (colour, depth, label images).

``data`` may be bytes, bytearray, memoryview, array.array (what rclpy gives), a list of ints, or an ndarray
(either the raw byte buffer, or already shaped (H, W[, C]) with the encoding's dtype). Rows may be padded:
``step`` (bytes per row) >= width * bytes_per_pixel; None means unpadded.
"""
from __future__ import annotations

import numpy as np

# encoding -> (channels, numpy dtype of one channel)
_COLOR = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
_DEPTH = {"16UC1": np.uint16, "mono16": np.uint16, "32FC1": np.float32}
_LABEL = {"16UC1": np.uint16, "mono16": np.uint16}
MAX_DEPTH_MM = 65535  # largest depth a 16UC1 image can hold, in millimetres


def _raw_plane(data, encoding: str, height: int, width: int, step, channels: int, dtype, is_bigendian: bool):
    """Return a (height, width, channels) array of ``dtype`` (native byte order) viewing/copying ``data``."""
    for name, v in (("height", height), ("width", width)):
        if int(v) != v or v <= 0:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    height, width = int(height), int(width)
    dt = np.dtype(dtype).newbyteorder(">" if is_bigendian else "<")
    if (isinstance(data, np.ndarray) and data.dtype == np.dtype(dtype) and data.shape[:2] == (height, width)
            and (data.ndim == 2 and channels == 1 or data.ndim == 3 and data.shape[2] == channels)):
        return data.reshape(height, width, channels)  # already decoded pixels (native byte order)
    if isinstance(data, (list, tuple)):
        buf = np.asarray(data, dtype=np.uint8)
    elif isinstance(data, np.ndarray):
        buf = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    else:
        try:
            buf = np.frombuffer(data, dtype=np.uint8)
        except TypeError as exc:
            raise ValueError(f"data: expected a byte buffer, got {type(data).__name__}") from exc
    row = width * channels * dt.itemsize
    step = row if step is None or step == 0 else int(step)
    if step < row:
        raise ValueError(f"step: {step} bytes is smaller than width * pixel size = {row} for '{encoding}'")
    # The last row may omit its padding; anything shorter than that is truncated data.
    need = step * (height - 1) + row
    if buf.size < need:
        raise ValueError(f"data: expected at least {need} bytes for {height}x{width} '{encoding}' "
                         f"with step {step}, got {buf.size}")
    if step * height <= buf.size:
        rows = buf[: step * height].reshape(height, step)[:, :row]
    else:
        rows = np.lib.stride_tricks.as_strided(buf, shape=(height, row), strides=(step, 1))
    rows = np.ascontiguousarray(rows)
    out = rows.view(dt).reshape(height, width, channels)
    return out.astype(np.dtype(dtype), copy=False) if is_bigendian else out


def decode_color(data, encoding: str, height: int, width: int, step=None) -> np.ndarray:
    """Decode rgb8/bgr8/rgba8/bgra8/mono8 to uint8 (H, W, 3) RGB (alpha dropped, mono replicated)."""
    if encoding not in _COLOR:
        raise ValueError(f"encoding: unsupported '{encoding}' for color (supported: {sorted(_COLOR)})")
    img = _raw_plane(data, encoding, height, width, step, _COLOR[encoding], np.uint8, False)
    if encoding == "mono8":
        return np.repeat(img, 3, axis=2)
    if encoding.startswith("bgr"):
        return np.ascontiguousarray(img[:, :, 2::-1])
    return np.ascontiguousarray(img[:, :, :3])


def decode_depth(data, encoding: str, height: int, width: int, step=None, is_bigendian: bool = False) -> np.ndarray:
    """Decode 16UC1/mono16 (millimetres) or 32FC1 (metres) to float32 (H, W) metres; 0, NaN, inf, <0 -> NaN."""
    if encoding not in _DEPTH:
        raise ValueError(f"encoding: unsupported '{encoding}' for depth (supported: {sorted(_DEPTH)})")
    raw = _raw_plane(data, encoding, height, width, step, 1, _DEPTH[encoding], bool(is_bigendian))[:, :, 0]
    if raw.dtype == np.uint16:
        out = raw.astype(np.float32) * np.float32(1e-3)
    else:
        out = raw.astype(np.float32, copy=True)
    out[~(np.isfinite(out) & (out > 0))] = np.nan
    return out


def decode_labels(data, encoding: str, height: int, width: int, step=None, is_bigendian: bool = False) -> np.ndarray:
    """Decode a 16UC1/mono16 label-id image to uint16 (H, W)."""
    if encoding not in _LABEL:
        raise ValueError(f"encoding: unsupported '{encoding}' for labels (supported: {sorted(_LABEL)})")
    raw = _raw_plane(data, encoding, height, width, step, 1, np.uint16, bool(is_bigendian))[:, :, 0]
    return np.array(raw, dtype=np.uint16, copy=True)


# ---------------------------------------------------------------------- encoders (little-endian, unpadded)
def encode_color(rgb: np.ndarray, encoding: str = "rgb8") -> tuple[str, int, bytes]:
    """uint8 (H, W, 3) RGB -> (encoding, step, bytes); alpha (rgba8/bgra8) is written as 255."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if encoding not in _COLOR:
        raise ValueError(f"encoding: unsupported '{encoding}' for color (supported: {sorted(_COLOR)})")
    if encoding == "mono8":
        # ITU-R 601 luma, the same weights cv_bridge uses.
        img = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
        img = img[:, :, None]
    else:
        img = rgb[:, :, ::-1] if encoding.startswith("bgr") else rgb
        if encoding.endswith("a8"):
            img = np.concatenate([img, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    img = np.ascontiguousarray(img)
    return encoding, img.shape[1] * img.shape[2], img.tobytes()


def encode_depth(depth_m: np.ndarray, encoding: str = "16UC1") -> tuple[str, int, bytes]:
    """float (H, W) metres, NaN invalid -> (encoding, step, bytes). 16UC1 rounds to millimetres; invalid or
    out-of-range (> 65.535 m) pixels become 0; 32FC1 keeps NaN."""
    d = np.asarray(depth_m, dtype=np.float32)
    if d.ndim != 2:
        raise ValueError(f"depth: expected (H, W), got {d.shape}")
    if encoding in ("16UC1", "mono16"):
        mm = np.rint(d.astype(np.float64) * 1000.0)
        ok = np.isfinite(mm) & (mm > 0) & (mm <= MAX_DEPTH_MM)
        out = np.where(ok, mm, 0).astype("<u2")
    elif encoding == "32FC1":
        out = np.where(np.isfinite(d) & (d > 0), d, np.nan).astype("<f4")
    else:
        raise ValueError(f"encoding: unsupported '{encoding}' for depth (supported: {sorted(_DEPTH)})")
    return encoding, d.shape[1] * out.itemsize, out.tobytes()


def encode_labels(labels: np.ndarray, encoding: str = "16UC1") -> tuple[str, int, bytes]:
    """uint16-compatible (H, W) label ids -> (encoding, step, bytes)."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels: expected (H, W), got {lab.shape}")
    if encoding not in _LABEL:
        raise ValueError(f"encoding: unsupported '{encoding}' for labels (supported: {sorted(_LABEL)})")
    if lab.size and (lab.min() < 0 or lab.max() > 65535 or not np.issubdtype(lab.dtype, np.integer)):
        raise ValueError(f"labels: expected integer ids in [0, 65535], got {lab.dtype} in [{lab.min()}, {lab.max()}]")
    out = lab.astype("<u2")
    return encoding, lab.shape[1] * 2, out.tobytes()
