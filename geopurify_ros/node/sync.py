"""Frame gating for the mapping node: approximate-time pairing and keyframe selection (ROS-free).

`ApproximateTimeSync` pairs two streams (colour, depth) by header stamp. It is the fallback used
when `message_filters` is not importable; with message_filters the node uses its
`ApproximateTimeSynchronizer` instead (same `slop` / `queue_size` meaning).

Stamps and `slop` share one unit (the node uses integer nanoseconds). Pairing rule (deterministic,
O(queue) per message): when a message arrives on one stream, it is
paired with the message of the other stream whose stamp is nearest, if that distance is <= `slop`.
A pair is emitted at most once; afterwards every queued message of either stream that is not newer
than its paired member is discarded (a pair is never emitted out of order). Each stream keeps at
most `queue_size` unmatched messages (oldest dropped first). Every discarded message is reported to
`on_drop(detail)` (the node counts and logs them as `sync_unmatched`).

`KeyframeSelector` keeps a frame when the camera moved at least `min_translation_m` or rotated at
least `min_rotation_deg` since the last keyframe, or when `max_interval_s` passed since it.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Callable

import numpy as np


class ApproximateTimeSync:
    """Pair messages from `n_streams` (2) streams whose stamps differ by at most `slop` (stamp units).

    `add(i, stamp, msg)` feeds stream `i`; the callback gets `(msg_0, msg_1)` for each pair.
    `dropped` counts messages discarded without being paired (queue overflow, superseded, too old);
    `on_drop(detail)`, if given, is called once for each of them, outside the lock.
    """

    def __init__(self, callback: Callable[..., Any], slop: float = 0.05, queue_size: int = 10,
                 n_streams: int = 2, on_drop: Callable[[str], None] | None = None) -> None:
        if slop < 0:
            raise ValueError(f"sync_slop_s: must be >= 0 (got {slop!r})")
        if queue_size < 1:
            raise ValueError(f"sync_queue_size: must be >= 1 (got {queue_size!r})")
        if n_streams != 2:
            raise ValueError("ApproximateTimeSync pairs exactly two streams")
        self.callback = callback
        self.on_drop = on_drop
        self.slop = slop
        self.queue_size = int(queue_size)
        self._queues: list[deque[tuple[float, Any]]] = [deque() for _ in range(n_streams)]
        self._last_emitted = -math.inf
        self._lock = threading.Lock()
        self.dropped = 0
        self.emitted = 0

    def add(self, stream: int, stamp: float, msg: Any) -> bool:
        """Feed one message; returns True when it completed a pair (callback already called)."""
        drops: list[str] = []
        pair = None
        with self._lock:
            if stamp <= self._last_emitted:
                # older than a pair already emitted: can never be used
                drops.append(f"stream {stream} stamp {stamp} is not after the last pair ({self._last_emitted})")
            else:
                pair = self._match(stream, stamp, msg, drops)
            self.dropped += len(drops)
        if self.on_drop is not None:
            for detail in drops:
                self.on_drop(detail)
        if pair is None:
            return False
        self.callback(*pair)
        return True

    def _match(self, stream: int, stamp: Any, msg: Any, drops: list[str]) -> tuple | None:
        other = self._queues[1 - stream]
        best = None
        for j, (t, _) in enumerate(other):
            d = abs(t - stamp)
            if d <= self.slop and (best is None or d < best[0]):
                best = (d, j)
        if best is None:
            q = self._queues[stream]
            q.append((stamp, msg))
            # keep stamps ordered (messages can arrive slightly out of order)
            if len(q) > 1 and q[-2][0] > stamp:
                items = sorted(q, key=lambda x: x[0])
                q.clear()
                q.extend(items)
            while len(q) > self.queue_size:
                t_old, _ = q.popleft()
                drops.append(f"stream {stream} stamp {t_old}: no partner within slop {self.slop} "
                             f"before the queue ({self.queue_size}) overflowed")
            return None
        t_other, msg_other = other[best[1]]
        del other[best[1]]
        newest = max(stamp, t_other)
        for i, q in enumerate(self._queues):
            while q and q[0][0] <= newest:
                t_old, _ = q.popleft()
                drops.append(f"stream {i} stamp {t_old}: superseded by the pair at {newest}")
        self._last_emitted = newest
        self.emitted += 1
        return (msg, msg_other) if stream == 0 else (msg_other, msg)

    def reset(self) -> None:
        with self._lock:
            for q in self._queues:
                q.clear()
            self._last_emitted = -math.inf


def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Angle of the relative rotation between two 3x3 rotation matrices, in degrees."""
    R = np.asarray(R_a, dtype=np.float64).T @ np.asarray(R_b, dtype=np.float64)
    c = (np.trace(R) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


class KeyframeSelector:
    """Decide whether a posed frame is worth fusing (motion or time since the last keyframe)."""

    def __init__(self, min_translation_m: float = 0.05, min_rotation_deg: float = 5.0,
                 max_interval_s: float = 2.0) -> None:
        self.min_translation_m = float(min_translation_m)
        self.min_rotation_deg = float(min_rotation_deg)
        self.max_interval_s = float(max_interval_s)
        self._last: tuple[float, np.ndarray] | None = None

    def is_keyframe(self, stamp: float, T_world_cam: np.ndarray) -> bool:
        if self._last is None:
            return True
        t0, T0 = self._last
        if stamp < t0:
            return False
        if self.max_interval_s > 0 and stamp - t0 >= self.max_interval_s:
            return True
        T = np.asarray(T_world_cam, dtype=np.float64)
        if np.linalg.norm(T[:3, 3] - T0[:3, 3]) >= self.min_translation_m:
            return True
        return rotation_angle_deg(T0[:3, :3], T[:3, :3]) >= self.min_rotation_deg

    def accept(self, stamp: float, T_world_cam: np.ndarray) -> None:
        """Record a frame as the latest keyframe (call once it was actually queued)."""
        self._last = (float(stamp), np.array(T_world_cam, dtype=np.float64))

    def reset(self) -> None:
        self._last = None
