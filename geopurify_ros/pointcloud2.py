"""numpy structured arrays <-> sensor_msgs/PointCloud2.

Layout written by ``to_msg``: one unorganised row (height=1, width=N), fields packed without padding in the
structured dtype's order, ``point_step`` = dtype itemsize, ``row_step`` = point_step * width, host byte order
(``is_bigendian`` set accordingly), ``is_dense`` False iff some x/y/z is NaN/inf.
``rgb`` is a float32 whose 4 bytes are the uint32 0x00RRGGBB, the packing RViz's "RGB8" colour transformer reads.
``from_msg`` reads either byte order, any field order/offsets, padding, count>1 fields and row padding.

Multi-count fields (PointField ``count`` > 1): here they are one sub-array column (``cloud["normal"]`` is (N, 3)).
``sensor_msgs_py.point_cloud2`` instead names the elements ``normal_0 .. normal_2`` (``read_points`` returns that,
and ``create_cloud`` asserts the array has exactly that dtype). ``flat_fields(cloud)`` is a zero-copy view in
sensor_msgs_py's layout, so ``create_cloud(header, to_msg(cloud, ...).fields, flat_fields(cloud))`` works and
``flat_fields(from_msg(msg))`` equals ``read_points(msg)``. Clouds without count > 1 fields are the same in both.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

# sensor_msgs/PointField datatype constants.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
_NP_OF = {INT8: "i1", UINT8: "u1", INT16: "i2", UINT16: "u2", INT32: "i4", UINT32: "u4", FLOAT32: "f4", FLOAT64: "f8"}
_PF_OF = {np.dtype(v).newbyteorder("=").str[1:]: k for k, v in _NP_OF.items()}


class Field(NamedTuple):
    """ROS-free PointField: name, byte offset, datatype constant, count."""

    name: str
    offset: int
    datatype: int
    count: int = 1


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 (N,3) RGB -> float32 (N,) whose bytes are the uint32 0x00RRGGBB."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 2 or rgb.shape[1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb: expected uint8 (N, 3), got {rgb.dtype} {rgb.shape}")
    c = rgb.astype(np.uint32)
    return ((c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]).view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """float32 (or uint32) packed 0x00RRGGBB (N,) -> uint8 (N,3)."""
    u = np.ascontiguousarray(packed).view(np.uint32)
    return np.stack(((u >> 16) & 255, (u >> 8) & 255, u & 255), axis=1).astype(np.uint8)


def _column(name: str, value, n: int) -> np.ndarray:
    a = np.asarray(value)
    if a.shape[:1] != (n,) or a.ndim > 2:
        raise ValueError(f"{name}: expected ({n},) or ({n}, k), got {a.shape}")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype.kind not in "iuf" or a.dtype.itemsize > 8 or a.dtype.newbyteorder("=").str[1:] not in _PF_OF:
        raise ValueError(f"{name}: dtype {a.dtype} has no PointField datatype (use int8..uint32, float32, float64)")
    return a


def make_cloud(xyz, rgb=None, label=None, score=None, **extra) -> np.ndarray:
    """Build a packed structured array: x, y, z float32 [, rgb float32 packed] [, label uint16] [, score float32]
    [, extra fields in keyword order, each (N,) or (N, k) of a PointField-compatible dtype].

    ``rgb`` may be uint8 (N,3) or an already packed float32/uint32 (N,).
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or xyz.dtype.kind not in "iuf":
        raise ValueError(f"xyz: expected numeric (N, 3), got {xyz.dtype} {xyz.shape}")
    n = xyz.shape[0]
    cols: list[tuple[str, np.ndarray]] = [("x", xyz[:, 0]), ("y", xyz[:, 1]), ("z", xyz[:, 2])]
    descr: list = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.ndim == 2:
            if rgb.shape[0] != n:
                raise ValueError(f"rgb: expected ({n}, 3) to match xyz, got {rgb.shape}")
            packed = pack_rgb(rgb)
        elif rgb.shape == (n,) and rgb.dtype in (np.float32, np.uint32):
            packed = np.ascontiguousarray(rgb).view(np.float32)
        else:
            raise ValueError(f"rgb: expected uint8 ({n}, 3) or packed float32/uint32 ({n},), "
                             f"got {rgb.dtype} {rgb.shape}")
        cols.append(("rgb", packed))
        descr.append(("rgb", "f4"))
    if label is not None:
        lab = np.asarray(label)
        if lab.shape != (n,) or lab.dtype.kind not in "iu" or (lab.size and (lab.min() < 0 or lab.max() > 65535)):
            raise ValueError(f"label: expected ({n},) integer ids in [0, 65535], got {lab.dtype} {lab.shape}")
        cols.append(("label", lab))
        descr.append(("label", "u2"))
    if score is not None:
        sc = np.asarray(score)
        if sc.shape != (n,) or sc.dtype.kind not in "iuf":
            raise ValueError(f"score: expected numeric ({n},), got {sc.dtype} {sc.shape}")
        cols.append(("score", sc))
        descr.append(("score", "f4"))
    for name, value in extra.items():
        if name in ("x", "y", "z", "rgb", "label", "score"):
            raise ValueError(f"{name}: duplicate field name")
        a = _column(name, value, n)
        cols.append((name, a))
        dt = a.dtype.newbyteorder("=").str[1:]
        descr.append((name, dt, (a.shape[1],)) if a.ndim == 2 else (name, dt))
    out = np.empty(n, dtype=np.dtype(descr))
    for name, a in cols:
        out[name] = a
    return out


def fields_of(dtype: np.dtype) -> list[Field]:
    """PointField descriptions (offsets in bytes) of a structured dtype; sub-arrays become count > 1."""
    dtype = np.dtype(dtype)
    if dtype.names is None:
        raise ValueError(f"dtype: expected a structured dtype, got {dtype}")
    out = []
    for name in dtype.names:
        ft, off = dtype.fields[name][:2]
        base, count = (ft.base, int(np.prod(ft.shape))) if ft.shape else (ft, 1)
        key = base.newbyteorder("=").str[1:]
        if key not in _PF_OF:
            raise ValueError(f"{name}: dtype {base} has no PointField datatype")
        out.append(Field(name, int(off), _PF_OF[key], count))
    return out


def flat_fields(cloud: np.ndarray) -> np.ndarray:
    """View of a structured array with each (k,) sub-array field split into scalar fields ``name_0 .. name_{k-1}``
    at the same offsets (sensor_msgs_py's naming of PointField count > 1); other fields are unchanged."""
    cloud = np.asarray(cloud)
    dt = cloud.dtype
    if dt.names is None:
        raise ValueError(f"cloud: expected a structured array, got {dt}")
    names, formats, offsets = [], [], []
    for name in dt.names:
        ft, off = dt.fields[name][:2]
        count = int(np.prod(ft.shape)) if ft.shape else 1
        for i in range(count):
            names.append(f"{name}_{i}" if count > 1 else name)
            formats.append(ft.base.str)
            offsets.append(int(off) + i * ft.base.itemsize)
    if len(set(names)) != len(names):
        raise ValueError(f"cloud: splitting count > 1 fields gives duplicate names {names}")
    return cloud.view(np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": dt.itemsize}))


def _stamp_fields(stamp) -> tuple[int, int]:
    if stamp is None:
        return 0, 0
    if hasattr(stamp, "sec") and hasattr(stamp, "nanosec"):
        return int(stamp.sec), int(stamp.nanosec)
    if isinstance(stamp, (tuple, list)) and len(stamp) == 2:
        return int(stamp[0]), int(stamp[1])
    t = float(stamp)
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"stamp: expected a non-negative time, got {stamp!r}")
    sec = int(np.floor(t))
    return sec, min(int(round((t - sec) * 1e9)), 999_999_999)


def to_msg(cloud: np.ndarray, frame_id: str, stamp=None, msg_cls=None):
    """Structured array -> PointCloud2 (sensor_msgs, imported lazily) or an instance of ``msg_cls`` (duck-typed:
    attributes header, height, width, fields, is_bigendian, point_step, row_step, data, is_dense are set).

    ``stamp``: None (zero), float seconds, (sec, nanosec), or a builtin_interfaces/Time.
    """
    cloud = np.asarray(cloud)
    if cloud.dtype.names is None or cloud.ndim != 1:
        raise ValueError(f"cloud: expected a 1-D structured array, got {cloud.dtype} {cloud.shape}")
    if not isinstance(frame_id, str):
        raise ValueError(f"frame_id: expected a string, got {frame_id!r}")
    fields = fields_of(cloud.dtype)
    sec, nanosec = _stamp_fields(stamp)
    if msg_cls is None:
        from sensor_msgs.msg import PointCloud2, PointField  # lazy: keeps this module ROS-free
        msg = PointCloud2()
        msg.fields = [PointField(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count) for f in fields]
        msg.header.frame_id = frame_id
        msg.header.stamp.sec, msg.header.stamp.nanosec = sec, nanosec
    else:
        msg = msg_cls()
        msg.fields = [SimpleNamespace(**f._asdict()) for f in fields]
        header = getattr(msg, "header", None) or SimpleNamespace()
        header.frame_id = frame_id
        if getattr(header, "stamp", None) is None:
            header.stamp = SimpleNamespace()
        header.stamp.sec, header.stamp.nanosec = sec, nanosec
        msg.header = header
    data = np.ascontiguousarray(cloud)
    msg.height = 1
    msg.width = int(data.shape[0])
    msg.is_bigendian = sys.byteorder == "big"
    msg.point_step = int(data.dtype.itemsize)
    msg.row_step = msg.point_step * msg.width
    names = cloud.dtype.names
    dense = True
    if all(k in names for k in ("x", "y", "z")):
        dense = bool(np.isfinite(data["x"]).all() and np.isfinite(data["y"]).all() and np.isfinite(data["z"]).all())
    msg.is_dense = dense
    msg.data = data.view(np.uint8).tobytes() if data.size else b""
    return msg


def _dtype_of_msg(msg) -> np.dtype:
    order = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _NP_OF:
            raise ValueError(f"fields: '{f.name}' has unknown PointField datatype {f.datatype}")
        if f.name in names:
            raise ValueError(f"fields: duplicate field '{f.name}'")
        count = int(getattr(f, "count", 1) or 1)
        base = order + _NP_OF[f.datatype]
        names.append(f.name)
        formats.append((base, (count,)) if count > 1 else base)
        offsets.append(int(f.offset))
    dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": int(msg.point_step)})
    for name, off in zip(names, offsets):
        if off + dt.fields[name][0].itemsize > msg.point_step:
            raise ValueError(f"fields: '{name}' (offset {off}) does not fit in point_step {msg.point_step}")
    return dt


def from_msg(msg) -> np.ndarray:
    """PointCloud2 (real or duck-typed) -> packed, native-byte-order structured array of length height*width
    with the message's fields in order (count > 1 fields as sub-arrays)."""
    height, width, point_step, row_step = int(msg.height), int(msg.width), int(msg.point_step), int(msg.row_step)
    dt = _dtype_of_msg(msg)
    n = height * width
    if row_step < point_step * width:
        raise ValueError(f"row_step: {row_step} is smaller than point_step * width = {point_step * width}")
    raw = msg.data
    buf = np.asarray(raw, dtype=np.uint8) if isinstance(raw, (list, tuple)) else np.frombuffer(raw, dtype=np.uint8)
    need = row_step * (height - 1) + point_step * width if n else 0
    if buf.size < need:
        raise ValueError(f"data: expected at least {need} bytes, got {buf.size}")
    if n == 0:
        rows = np.empty((0,), dtype=np.uint8)
    elif row_step == point_step * width:
        rows = buf[: n * point_step]
    else:
        # Organised cloud with row padding: strided view over the rows, then drop the padding.
        rows = np.lib.stride_tricks.as_strided(buf, (height, point_step * width), (row_step, 1)).reshape(-1)
    src = rows.view(dt) if n else np.empty(0, dtype=dt)
    fields = fields_of(dt)
    out = np.empty(n, dtype=np.dtype([(f.name, np.dtype(_NP_OF[f.datatype]), (f.count,)) if f.count > 1
                                      else (f.name, np.dtype(_NP_OF[f.datatype])) for f in fields]))
    for f in fields:
        out[f.name] = src[f.name]
    return out
