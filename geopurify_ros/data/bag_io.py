"""ROS 2 bag helpers on ``rosbags`` (no ROS install needed): read, inspect, write standard messages.

Storage (mcap / sqlite3) is auto-detected from the bag's ``metadata.yaml`` by rosbags. Every failure
to open or decode a bag surfaces as a ``ValueError`` naming the path and what is wrong.
"""
from __future__ import annotations

import contextlib
import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from geopurify_ros.ros_time import stamp_to_ns

# Default topic names (docs/ARCHITECTURE.md) and their message types.
COLOR_TOPIC = "/camera/color/image_raw"
DEPTH_TOPIC = "/camera/depth/image_raw"
CAMERA_INFO_TOPIC = "/camera/color/camera_info"
POSE_TOPIC = "/camera/pose"
TF_TOPIC = "/tf"
LABELS_TOPIC = "/camera/labels"
TOPIC_TYPES = {
    COLOR_TOPIC: "sensor_msgs/msg/Image",
    DEPTH_TOPIC: "sensor_msgs/msg/Image",
    CAMERA_INFO_TOPIC: "sensor_msgs/msg/CameraInfo",
    POSE_TOPIC: "geometry_msgs/msg/PoseStamped",
    TF_TOPIC: "tf2_msgs/msg/TFMessage",
    LABELS_TOPIC: "sensor_msgs/msg/Image",
}
MAP_FRAME = "map"
CAMERA_FRAME = "camera_color_optical_frame"
STORAGES = ("mcap", "sqlite3")


@lru_cache(maxsize=None)
def typestore():
    """rosbags typestore with the standard ROS 2 messages (newest distro available)."""
    from rosbags.typesys import Stores, get_typestore

    for name in ("ROS2_KILTED", "ROS2_JAZZY", "ROS2_HUMBLE"):
        if hasattr(Stores, name):
            return get_typestore(getattr(Stores, name))
    raise RuntimeError("rosbags has no ROS 2 typestore")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class TopicInfo:
    topic: str
    msgtype: str
    count: int


def _check_bag_dir(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"bag: path does not exist: {p}")
    if not p.is_dir() or not (p / "metadata.yaml").is_file():
        raise ValueError(f"bag: {p} is not a ROS 2 bag directory (no metadata.yaml)")
    return p


@contextlib.contextmanager
def open_bag(path) -> Iterator:
    """Open a ROS 2 bag directory (mcap or sqlite3) as a ``rosbags.rosbag2.Reader``."""
    from rosbags.rosbag2 import Reader

    p = _check_bag_dir(path)
    try:
        reader = Reader(p)
        reader.open()
    except Exception as exc:  # ReaderError, sqlite3.DatabaseError, truncated mcap...
        raise ValueError(f"bag: cannot open {p} (corrupt or truncated?): {exc}") from exc
    try:
        yield reader
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def list_topics(path) -> dict[str, TopicInfo]:
    """Topics of the bag with their message type and message count."""
    with open_bag(path) as reader:
        out: dict[str, TopicInfo] = {}
        for c in reader.connections:
            prev = out.get(c.topic)
            out[c.topic] = TopicInfo(c.topic, c.msgtype, (prev.count if prev else 0) + c.msgcount)
        return out


def read_messages(path, topics: Iterable[str] | None = None, deserialize: bool = True) -> Iterator[tuple[str, int, object]]:
    """Yield ``(topic, bag_timestamp_ns, message)`` in bag time order.

    ``topics``: restrict to these; a topic absent from the bag → ValueError listing the bag's topics.
    """
    ts = typestore()
    with open_bag(path) as reader:
        available = sorted({c.topic for c in reader.connections})
        conns = reader.connections
        if topics is not None:
            wanted = list(dict.fromkeys(topics))
            missing = [t for t in wanted if t not in available]
            if missing:
                raise ValueError(f"topics: {missing} not in bag {path}; it has {available}")
            conns = [c for c in conns if c.topic in wanted]
        try:
            for conn, stamp, raw in reader.messages(connections=conns):
                msg = ts.deserialize_cdr(raw, conn.msgtype) if deserialize else raw
                yield conn.topic, stamp, msg
        except ValueError:
            raise
        except Exception as exc:
            raise ValueError(f"bag: failed reading {path} (corrupt or truncated?): {exc}") from exc


def require_topics(path, topics: Iterable[str]) -> dict[str, TopicInfo]:
    info = list_topics(path)
    missing = [t for t in topics if t not in info]
    if missing:
        raise ValueError(f"topics: {missing} not in bag {path}; it has {sorted(info)}")
    return info


# ------------------------------------------------------------------ writing
class BagWriter:
    """Small wrapper over ``rosbags.rosbag2.Writer``: ``write(topic, stamp_ns, msg)`` registers topics lazily."""

    def __init__(self, path, storage: str = "mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        if storage not in STORAGES:
            raise ValueError(f"storage: expected one of {STORAGES}, got {storage!r}")
        p = Path(path)
        if p.exists():
            raise ValueError(f"bag: output path already exists: {p}")
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(p, version=9, storage_plugin=plugin)
        self._conns: dict[str, object] = {}
        self.path = p

    def __enter__(self):
        self._writer.open()
        return self

    def __exit__(self, *exc):
        self._writer.close()

    def write(self, topic: str, stamp_ns: int, msg) -> None:
        ts = typestore()
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._conns[topic] = self._writer.add_connection(topic, msg.__msgtype__, typestore=ts)
        self._writer.write(conn, int(stamp_ns), ts.serialize_cdr(msg, msg.__msgtype__))


# ------------------------------------------------------------------ message builders / parsers
def _T(name):
    return typestore().types[name]


def header(stamp_ns: int, frame_id: str):
    Time, Header = _T("builtin_interfaces/msg/Time"), _T("std_msgs/msg/Header")
    return Header(stamp=Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)), frame_id=frame_id)


def stamp_ns_of(msg) -> int:
    """Header stamp of a message in integer nanoseconds."""
    return stamp_to_ns(msg.header.stamp)


def image_msg(stamp_ns: int, frame_id: str, encoding: str, height: int, width: int, step: int, data: bytes):
    return _T("sensor_msgs/msg/Image")(header=header(stamp_ns, frame_id), height=int(height), width=int(width),
                                       encoding=encoding, is_bigendian=0, step=int(step),
                                       data=np.frombuffer(data, np.uint8).copy())


def camera_info_msg(stamp_ns: int, frame_id: str, cam):
    """plumb_bob CameraInfo with zero distortion (our images are rendered by an ideal pinhole)."""
    K = np.array([cam.fx, 0, cam.cx, 0, cam.fy, cam.cy, 0, 0, 1], np.float64)
    P = np.array([cam.fx, 0, cam.cx, 0, 0, cam.fy, cam.cy, 0, 0, 0, 1, 0], np.float64)
    roi = _T("sensor_msgs/msg/RegionOfInterest")(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False)
    return _T("sensor_msgs/msg/CameraInfo")(
        header=header(stamp_ns, frame_id), height=int(cam.height), width=int(cam.width),
        distortion_model="plumb_bob", d=np.zeros(5, np.float64), k=K, r=np.eye(3).reshape(-1), p=P,
        binning_x=0, binning_y=0, roi=roi)


def _pose_parts(T):
    from ..camera import matrix_to_pose

    pos, q = matrix_to_pose(np.asarray(T, np.float64))
    return [float(x) for x in pos], [float(x) for x in q]


def pose_stamped_msg(stamp_ns: int, T_world_cam, frame_id: str = MAP_FRAME):
    (x, y, z), (qx, qy, qz, qw) = _pose_parts(T_world_cam)
    Pose, Point, Quat = _T("geometry_msgs/msg/Pose"), _T("geometry_msgs/msg/Point"), _T("geometry_msgs/msg/Quaternion")
    return _T("geometry_msgs/msg/PoseStamped")(header=header(stamp_ns, frame_id),
                                               pose=Pose(position=Point(x=x, y=y, z=z),
                                                         orientation=Quat(x=qx, y=qy, z=qz, w=qw)))


def tf_msg(stamp_ns: int, T_parent_child, parent: str = MAP_FRAME, child: str = CAMERA_FRAME):
    (x, y, z), (qx, qy, qz, qw) = _pose_parts(T_parent_child)
    tr = _T("geometry_msgs/msg/Transform")(translation=_T("geometry_msgs/msg/Vector3")(x=x, y=y, z=z),
                                           rotation=_T("geometry_msgs/msg/Quaternion")(x=qx, y=qy, z=qz, w=qw))
    ts_ = _T("geometry_msgs/msg/TransformStamped")(header=header(stamp_ns, parent), child_frame_id=child, transform=tr)
    return _T("tf2_msgs/msg/TFMessage")(transforms=[ts_])


def pose_of(msg) -> np.ndarray:
    """4×4 matrix of a PoseStamped / TransformStamped / Pose message."""
    from ..camera import pose_to_matrix

    if hasattr(msg, "transform"):
        t, q = msg.transform.translation, msg.transform.rotation
    else:
        p = msg.pose if hasattr(msg, "pose") else msg
        t, q = p.position, p.orientation
    return pose_to_matrix([t.x, t.y, t.z], [q.x, q.y, q.z, q.w])
