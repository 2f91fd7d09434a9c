"""builtin_interfaces/Time <-> integer nanoseconds / float seconds (duck-typed; no torch, no rclpy import at module level).

Message stamps travel through the node as integer nanoseconds (exact: a cloud carries its frame's stamp
bit for bit); float seconds are for durations and for the offline tools.
"""
from __future__ import annotations

import math
from typing import Any

NS_PER_S = 1_000_000_000


def stamp_to_ns(stamp: Any) -> int:
    """A Time-like object (`.sec`, `.nanosec`) -> integer nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def ns_to_stamp(ns: int, msg_cls: Any = None) -> Any:
    """Integer nanoseconds -> builtin_interfaces/Time (or `msg_cls`), exactly."""
    if msg_cls is None:
        from builtin_interfaces.msg import Time as msg_cls
    sec, nanosec = divmod(int(ns), NS_PER_S)
    return msg_cls(sec=sec, nanosec=nanosec)


def sec_to_ns(t: float) -> int:
    """Seconds -> integer nanoseconds (rounded)."""
    return int(round(float(t) * NS_PER_S))


def stamp_to_sec(stamp: Any) -> float:
    """A Time-like object (`.sec`, `.nanosec`) -> seconds."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def sec_to_stamp(t: float, msg_cls: Any = None) -> Any:
    """Seconds -> builtin_interfaces/Time (or `msg_cls`), nanoseconds rounded and kept below 1 s."""
    if msg_cls is None:
        from builtin_interfaces.msg import Time as msg_cls
    sec = int(math.floor(t))
    return msg_cls(sec=sec, nanosec=min(999_999_999, int(round((t - sec) * 1e9))))
