"""Time jumps for the mapping node (ROS-free): when to throw away time-ordered input state.

The pose buffer, the colour/depth synchroniser and the keyframe gate all assume stamps move forward.
Three things break that, and each used to stop mapping until a restart:

- the node clock jumps backwards (a bag looped with `/clock`, a simulator reset, `/clock` restarting,
  the system clock stepped back): as tf2's buffer does, the state is cleared, with one warning;
- one input stream's stamps step back by more than `tolerance_ns` (a bag looped without `/clock`):
  the same restart;
- a stamp lies more than `tolerance_ns` ahead of the node clock: that message is dropped
  (`stamp_future`) before it reaches any state, so one bad stamp cannot make every later one look old.
  A clock reading 0 (use_sim_time before the first `/clock`) cannot judge this and lets stamps pass.

When the data shows the jump before the clock does (bag messages overtaking `/clock`), the clock's jump
that follows is the same event: it restarts again only if held stamps are still ahead of the new clock.
"""
from __future__ import annotations

import threading
from typing import Callable

from geopurify_ros.node.msg_convert import FrameRejected
from geopurify_ros.ros_time import NS_PER_S


def _s(ns: int) -> str:
    return f"{ns / NS_PER_S:.3f}"


class TimeJumpGuard:
    """`check(stream, stamp_ns, now_ns)` before a stamped message touches any state.

    Raises FrameRejected('stamp_future') for a far-future stamp; calls `on_restart(reason)` (outside
    its lock) once per detected jump. `reset()` forgets the stamps seen (after `~/reset`).
    """

    def __init__(self, tolerance_ns: int, on_restart: Callable[[str], None]) -> None:
        if tolerance_ns <= 0:
            raise ValueError(f"max_time_jump_s: must be > 0 (got {tolerance_ns / NS_PER_S})")
        self.tolerance_ns = int(tolerance_ns)
        self.on_restart = on_restart
        self.restarts = 0
        self._lock = threading.Lock()
        self._last_now: int | None = None
        self._newest: dict[str, int] = {}
        self._data_restarted = False       # a stream restarted us and the clock has not jumped since

    def check(self, stream: str, stamp_ns: int, now_ns: int) -> None:
        stamp_ns, now_ns, tol = int(stamp_ns), int(now_ns), self.tolerance_ns
        reason = None
        with self._lock:
            if self._last_now is not None and now_ns < self._last_now:
                newest = max(self._newest.values(), default=None)
                if not (self._data_restarted and (newest is None or newest <= now_ns + tol)):
                    reason = f"ROS time jumped back {_s(self._last_now - now_ns)} s (from {_s(self._last_now)} to {_s(now_ns)})"
                    self._forget()
                self._data_restarted = False
            self._last_now = now_ns
            if now_ns > 0 and stamp_ns - now_ns > tol:
                detail = (f"{stream} stamp {_s(stamp_ns)} is {_s(stamp_ns - now_ns)} s ahead of the node clock "
                          f"{_s(now_ns)} (max_time_jump_s={_s(tol)})")
            else:
                detail = None
                last = self._newest.get(stream)
                if last is not None and stamp_ns < last - tol:
                    reason = f"{stream} stamps jumped back {_s(last - stamp_ns)} s (from {_s(last)} to {_s(stamp_ns)})"
                    self._forget()
                    self._data_restarted = True
                self._newest[stream] = max(stamp_ns, self._newest.get(stream, stamp_ns))
            if reason is not None:
                self.restarts += 1
        if reason is not None:
            self.on_restart(reason)
        if detail is not None:
            raise FrameRejected("stamp_future", detail)

    def _forget(self) -> None:
        self._newest.clear()

    def reset(self) -> None:
        with self._lock:
            self._forget()
            self._data_restarted = False
