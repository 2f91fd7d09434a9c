"""Labelled point clouds as binary PLY (x, y, z, red, green, blue, label, score), the layout that
CloudCompare, MeshLab, Open3D, trimesh and Foxglove open: colours as uchar red/green/blue, the label id
as ushort and the score as float (both show up as scalar fields where a viewer supports them).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .pointcloud2 import unpack_rgb

_PLY_TYPES = {"f4": "float", "u1": "uchar", "u2": "ushort"}
VERTEX_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                         ("blue", "u1"), ("label", "<u2"), ("score", "<f4")])


def vertices(cloud: np.ndarray) -> np.ndarray:
    """Structured cloud (x, y, z, rgb packed, label, score as `pointcloud2.make_cloud`) -> PLY vertex rows.

    A cloud without rgb is written grey, without label as 0, without score as 0."""
    names = cloud.dtype.names or ()
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"cloud: needs x, y, z fields, has {names}")
    out = np.zeros(len(cloud), VERTEX_DTYPE)
    for k in ("x", "y", "z"):
        out[k] = cloud[k]
    rgb = unpack_rgb(cloud["rgb"]) if "rgb" in names else np.full((len(cloud), 3), 128, np.uint8)
    out["red"], out["green"], out["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    if "label" in names:
        out["label"] = cloud["label"]
    if "score" in names:
        out["score"] = cloud["score"]
    return out


def write_ply(path: str | Path, cloud: np.ndarray, comments: tuple[str, ...] = ()) -> int:
    """Write `cloud` as binary little-endian PLY (atomically: a reader never sees half a file).

    Returns the number of points written."""
    rows = vertices(cloud)
    header = ["ply", "format binary_little_endian 1.0", "comment written by geopurify_ros"]
    header += [f"comment {c}" for c in comments if c and "\n" not in c]
    header.append(f"element vertex {len(rows)}")
    header += [f"property {_PLY_TYPES[VERTEX_DTYPE[n].str[1:]]} {n}" for n in VERTEX_DTYPE.names]
    header.append("end_header")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".ply.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(("\n".join(header) + "\n").encode("ascii"))
            f.write(rows.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(rows)
