"""builtin_interfaces/Time <-> float seconds (duck-typed; no torch, no rclpy import at module level)."""
from __future__ import annotations

import math
from typing import Any


def stamp_to_sec(stamp: Any) -> float:
    """A Time-like object (`.sec`, `.nanosec`) -> seconds."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def sec_to_stamp(t: float, msg_cls: Any = None) -> Any:
    """Seconds -> builtin_interfaces/Time (or `msg_cls`), nanoseconds rounded and kept below 1 s."""
    if msg_cls is None:
        from builtin_interfaces.msg import Time as msg_cls
    sec = int(math.floor(t))
    return msg_cls(sec=sec, nanosec=min(999_999_999, int(round((t - sec) * 1e9))))
