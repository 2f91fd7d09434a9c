"""Camera poses for the mapping node: a short stamped buffer with interpolation, and the three sources.

`PoseBuffer` is ROS-free: poses are added in stamp order (integer nanoseconds; older-than-newest is
rejected as out of order), `lookup(stamp_ns)` interpolates between the bracketing poses (linear in translation, slerp in
rotation) and raises `PoseLookupError(reason)` when the nearest pose is farther than `max_age_s`
(`pose_stale`) or the buffer is empty (`no_pose`).

Sources, chosen by the `pose_source` parameter:
- `pose`: geometry_msgs/PoseStamped of the camera optical frame in `map_frame`;
- `odometry`: nav_msgs/Odometry of the robot base, composed with the static `base_to_camera`;
- `tf`: tf2_ros lookup `map_frame <- camera_frame` (needs tf2_ros; `TfUnavailable` otherwise).
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Any, Sequence

import numpy as np

from geopurify_ros.camera import matrix_to_pose, pose_to_matrix
from geopurify_ros.ros_time import NS_PER_S, sec_to_ns, stamp_to_ns

POSE_SOURCES = ("pose", "odometry", "tf")
# tf2's tolerance: a quaternion whose norm is further than this from 1 is rejected, not normalised
# (normalising a wrong message would fuse a whole frame at a wrong orientation).
QUAT_NORM_TOLERANCE = 0.01


class PoseLookupError(Exception):
    """A pose could not be provided for a stamp; `reason` is the diagnostics counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TfUnavailable(RuntimeError):
    """`pose_source: tf` was requested but tf2_ros cannot be imported."""


# ---------------------------------------------------------------- quaternion / pose maths (xyzw)

def quat_normalize(q: Sequence[float]) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    n = np.linalg.norm(q)
    if not np.isfinite(n) or n < 1e-9:
        raise ValueError(f"quaternion: zero or non-finite ({q.tolist()})")
    return q / n


def quat_to_matrix(q: Sequence[float]) -> np.ndarray:
    return pose_to_matrix(np.zeros(3), q)[:3, :3]


def matrix_to_quat(R: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = R
    return matrix_to_pose(T)[1]


def slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    q0, q1 = quat_normalize(q0), quat_normalize(q1)
    d = float(np.dot(q0, q1))
    if d < 0:
        q1, d = -q1, -d
    if d > 0.9995:
        return quat_normalize(q0 + a * (q1 - q0))
    th = math.acos(d)
    return (math.sin((1 - a) * th) * q0 + math.sin(a * th) * q1) / math.sin(th)


def pose_matrix(position: Sequence[float], quat_xyzw: Sequence[float]) -> np.ndarray:
    """4x4 from position + quaternion xyzw (ValueError on zero / non-finite input)."""
    return pose_to_matrix(position, quat_xyzw)


def unit_quaternion(q: Sequence[float], what: str = "quaternion") -> np.ndarray:
    """`q` (xyzw) if it is finite with | |q| - 1 | <= QUAT_NORM_TOLERANCE, else ValueError naming `what`."""
    q = np.asarray(q, dtype=np.float64)
    n = float(np.linalg.norm(q))
    if not np.isfinite(n) or abs(n - 1.0) > QUAT_NORM_TOLERANCE:
        raise ValueError(f"{what}: norm {n:.4g} is not 1 (tolerance {QUAT_NORM_TOLERANCE}), "
                         f"xyzw = {[round(float(v), 6) for v in q]}")
    return q


def extrinsic_from_param(values: Sequence[float]) -> np.ndarray:
    """`base_to_camera` parameter (x, y, z, qx, qy, qz, qw) -> 4x4 T_base_cam."""
    v = list(values)
    if len(v) != 7:
        raise ValueError(f"base_to_camera: needs 7 numbers x,y,z,qx,qy,qz,qw (got {len(v)})")
    try:
        return pose_matrix(v[:3], unit_quaternion(v[3:]))
    except ValueError as exc:
        raise ValueError(f"base_to_camera: {exc}") from None


def pose_msg_to_matrix(pose: Any) -> np.ndarray:
    """geometry_msgs/Pose (duck-typed) -> 4x4."""
    p, o = pose.position, pose.orientation
    return pose_matrix((p.x, p.y, p.z), unit_quaternion((o.x, o.y, o.z, o.w), "orientation"))


def transform_msg_to_matrix(tf: Any) -> np.ndarray:
    """geometry_msgs/Transform (duck-typed) -> 4x4."""
    t, r = tf.translation, tf.rotation
    return pose_matrix((t.x, t.y, t.z), unit_quaternion((r.x, r.y, r.z, r.w), "rotation"))


# ---------------------------------------------------------------- buffer

class PoseBuffer:
    """Stamped poses of the camera in the map frame, oldest first, bounded by `horizon_s`.

    Stamps are integer nanoseconds (message stamps exactly); ages and the horizon are given in seconds.
    """

    def __init__(self, max_age_s: float = 0.1, horizon_s: float = 5.0, capacity: int = 2000) -> None:
        self.max_age_ns = sec_to_ns(max_age_s)
        self.horizon_ns = sec_to_ns(horizon_s)
        self.capacity = int(capacity)
        self._stamps: list[int] = []
        self._poses: list[tuple[np.ndarray, np.ndarray]] = []  # (position, quat xyzw)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._stamps)

    @staticmethod
    def _ns(stamp_ns: Any) -> int:
        if isinstance(stamp_ns, (bool, float, np.floating)) or not isinstance(stamp_ns, (int, np.integer)):
            raise TypeError(f"stamp_ns: expected integer nanoseconds, got {stamp_ns!r}")
        return int(stamp_ns)

    def add(self, stamp_ns: int, T_world_cam: np.ndarray) -> None:
        """Append a pose; raises PoseLookupError('pose_out_of_order') if not newer than the last."""
        stamp = self._ns(stamp_ns)
        T = np.asarray(T_world_cam, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise PoseLookupError("pose_invalid", "pose must be a finite 4x4 matrix")
        try:
            entry = (T[:3, 3].copy(), matrix_to_quat(T[:3, :3]))
        except ValueError as exc:
            raise PoseLookupError("pose_invalid", str(exc)) from None
        with self._lock:
            if self._stamps and stamp <= self._stamps[-1]:
                raise PoseLookupError("pose_out_of_order",
                                      f"stamp {_sec(stamp)} not after last pose {_sec(self._stamps[-1])}")
            self._stamps.append(stamp)
            self._poses.append(entry)
            cut = 0
            while cut < len(self._stamps) - 2 and (stamp - self._stamps[cut] > self.horizon_ns
                                                   or len(self._stamps) - cut > self.capacity):
                cut += 1
            if cut:
                del self._stamps[:cut], self._poses[:cut]

    def lookup(self, stamp_ns: int) -> np.ndarray:
        """Pose at `stamp_ns` (4x4), interpolated between the bracketing poses."""
        stamp = self._ns(stamp_ns)
        with self._lock:
            if not self._stamps:
                raise PoseLookupError("no_pose", "no pose received yet")
            i = bisect.bisect_left(self._stamps, stamp)
            if i < len(self._stamps) and self._stamps[i] == stamp:
                p, q = self._poses[i]
                return pose_matrix(p, q)
            lo = i - 1 if i > 0 else None
            hi = i if i < len(self._stamps) else None
            gaps = [abs(stamp - self._stamps[j]) for j in (lo, hi) if j is not None]
            if min(gaps) > self.max_age_ns:
                raise PoseLookupError("pose_stale", f"nearest pose is {_sec(min(gaps))} s from frame stamp "
                                      f"(pose_max_age_s={_sec(self.max_age_ns)})")
            if lo is None or hi is None:
                p, q = self._poses[lo if hi is None else hi]
                return pose_matrix(p, q)
            if max(gaps) > self.max_age_ns:
                # bracket too wide to interpolate safely: use the near side only
                j = lo if gaps[0] <= gaps[1] else hi
                p, q = self._poses[j]
                return pose_matrix(p, q)
            t0, t1 = self._stamps[lo], self._stamps[hi]
            a = (stamp - t0) / (t1 - t0)
            (p0, q0), (p1, q1) = self._poses[lo], self._poses[hi]
            return pose_matrix((1 - a) * p0 + a * p1, slerp(q0, q1, a))

    def clear(self) -> None:
        with self._lock:
            self._stamps.clear()
            self._poses.clear()


def _sec(ns: int) -> str:
    return f"{ns / NS_PER_S:.3f}"


# ---------------------------------------------------------------- sources

class MessagePoseSource:
    """PoseStamped or Odometry messages -> PoseBuffer (camera optical frame in the map frame)."""

    def __init__(self, kind: str, map_frame: str, buffer: PoseBuffer,
                 T_base_cam: np.ndarray | None = None) -> None:
        if kind not in ("pose", "odometry"):
            raise ValueError(f"pose_source: '{kind}' is not a message source")
        self.kind = kind
        self.map_frame = map_frame
        self.buffer = buffer
        self.T_base_cam = np.eye(4) if T_base_cam is None else np.asarray(T_base_cam, dtype=np.float64)

    def message_to_pose(self, msg: Any) -> tuple[int, np.ndarray]:
        """(stamp_ns, T_world_cam) of a PoseStamped / Odometry; PoseLookupError on bad content."""
        frame = msg.header.frame_id.lstrip("/")
        if frame != self.map_frame.lstrip("/"):
            got = f"frame '{frame}'" if frame else "an empty frame_id"
            raise PoseLookupError("pose_wrong_frame", f"pose has {got}, expected '{self.map_frame}'")
        pose = msg.pose.pose if self.kind == "odometry" else msg.pose
        try:
            T = pose_msg_to_matrix(pose)
        except ValueError as exc:
            raise PoseLookupError("pose_invalid", str(exc)) from None
        if self.kind == "odometry":
            T = T @ self.T_base_cam
        return stamp_to_ns(msg.header.stamp), T

    def on_message(self, msg: Any) -> None:
        stamp, T = self.message_to_pose(msg)
        self.buffer.add(stamp, T)

    def lookup(self, stamp_ns: int, camera_frame: str = "") -> np.ndarray:
        return self.buffer.lookup(stamp_ns)

    def clear(self) -> None:
        self.buffer.clear()


def tf2_available() -> bool:
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


class TfPoseSource:
    """tf2_ros lookups of `map_frame <- camera_frame` at the frame stamp."""

    def __init__(self, node: Any, map_frame: str, max_age_s: float, buffer_s: float = 10.0) -> None:
        try:
            import tf2_ros
            from rclpy.duration import Duration
        except ImportError as exc:
            raise TfUnavailable(
                "pose_source: 'tf' needs tf2_ros, which is not importable here "
                "(install ros-<distro>-tf2-ros, or use pose_source:=pose / odometry)") from exc
        self._tf2 = tf2_ros
        self.map_frame = map_frame
        self.max_age_s = float(max_age_s)
        self.tf_buffer = tf2_ros.Buffer(cache_time=Duration(seconds=buffer_s))
        self.listener = tf2_ros.TransformListener(self.tf_buffer, node, spin_thread=False)

    def lookup(self, stamp_ns: int, camera_frame: str) -> np.ndarray:
        from rclpy.time import Time
        if not camera_frame:
            raise PoseLookupError("no_camera_frame", "image header has no frame_id and camera_frame is empty")
        t = Time(nanoseconds=int(stamp_ns))
        try:
            tf = self.tf_buffer.lookup_transform(self.map_frame, camera_frame, t)
        except self._tf2.ExtrapolationException as exc:
            raise PoseLookupError("pose_stale", str(exc)) from None
        except (self._tf2.LookupException, self._tf2.ConnectivityException) as exc:
            raise PoseLookupError("no_pose", str(exc)) from None
        return transform_msg_to_matrix(tf.transform)

    def clear(self) -> None:
        """Forget the dynamic transforms (tf2 keeps /tf_static across a clear)."""
        self.tf_buffer.clear()
