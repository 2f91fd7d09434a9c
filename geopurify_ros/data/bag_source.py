"""Read posed RGB-D frames out of any ROS 2 bag (rosbags, no ROS install): the one bag reader.

`BagSource` turns a bag into posed frames exactly as the mapping node would see them:
colour/depth paired by nearest header stamp (within `sync_slop_s`), the latest CameraInfo, and a
pose from PoseStamped / Odometry / TF interpolated at the colour stamp (the node's `PoseBuffer`).
Every frame also keeps the raw CDR bytes of its messages so `eval.ros_replay` can publish them
unchanged. `data.sequence.load_sequence` and `eval` (offline / over-ROS replay) both read through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from geopurify_ros.ros_time import NS_PER_S, stamp_to_ns, stamp_to_sec


class BagError(ValueError):
    """A user-facing problem with a bag (missing, corrupt, wrong topics / types / encodings).

    A ValueError so `load_sequence` callers catch it as before; `eval.EvalError` is this class, so the
    eval CLI reports it as one line (exit status 2)."""


COLOR_TYPES = ("sensor_msgs/msg/Image",)
POSE_TYPES = {
    "geometry_msgs/msg/PoseStamped": "pose",
    "geometry_msgs/msg/PoseWithCovarianceStamped": "pose_cov",
    "nav_msgs/msg/Odometry": "odometry",
    "tf2_msgs/msg/TFMessage": "tf",
}


@dataclass
class Topics:
    """Where to find each stream in a bag, and how to read it. Empty encoding = trust the message."""

    color: str = "/camera/color/image_raw"
    depth: str = "/camera/depth/image_raw"
    camera_info: str = "/camera/color/camera_info"
    pose: str = "/camera/pose"              # PoseStamped / Odometry topic, or /tf
    labels: str = "/camera/labels"          # optional label images (ground truth)
    map_frame: str = "map"
    camera_frame: str = ""                  # TF child frame; "" = colour header frame_id
    color_encoding: str = ""
    depth_encoding: str = ""
    base_to_camera: tuple = ()              # Odometry: x,y,z,qx,qy,qz,qw of the camera in the base frame
    sync_slop_s: float = 0.05
    pose_max_age_s: float = 0.1

    # ROS parameter name (config/mapping.yaml) -> field; CLI flags use the field names.
    # (color_encoding/depth_encoding are *not* taken from the params file: there they mean "required by the
    # node", here they override what the bag's messages claim.)
    PARAM_KEYS = {
        "color_topic": "color", "depth_topic": "depth", "camera_info_topic": "camera_info", "pose_topic": "pose",
        "map_frame": "map_frame", "camera_frame": "camera_frame", "base_to_camera": "base_to_camera",
        "sync_slop_s": "sync_slop_s", "pose_max_age_s": "pose_max_age_s",
    }

    @classmethod
    def from_params(cls, params: dict[str, Any], overrides: dict[str, Any] | None = None) -> "Topics":
        t = cls()
        for key, attr in cls.PARAM_KEYS.items():
            if key in params and params[key] not in (None, ""):
                setattr(t, attr, params[key])
        # The node reads poses from pose_topic, odom_topic or /tf depending on pose_source.
        source = params.get("pose_source", "pose")
        if source == "odometry" and params.get("odom_topic"):
            t.pose = params["odom_topic"]
        elif source == "tf":
            t.pose = "/tf"
        t.base_to_camera = tuple(t.base_to_camera)
        for attr, value in (overrides or {}).items():
            if attr not in cls.__dataclass_fields__:
                raise BagError(f"--topics: unknown key '{attr}' (known: {', '.join(cls.__dataclass_fields__)})")
            if value is not None:
                setattr(t, attr, type(getattr(t, attr))(value) if not isinstance(getattr(t, attr), tuple) else value)
        return t


@dataclass
class Frame:
    """One posed RGB-D frame plus the raw messages it came from (topic -> (msgtype, cdr bytes)).

    stamp: colour header stamp (s); rgb (H, W, 3) uint8; depth (H, W) float32 m, NaN invalid; cam: CameraModel;
    T_world_cam: (4, 4) optical frame -> map. `labels` ((H, W) uint16, 65535 = ignore) is filled by callers that
    match label images to frames (`BagSource.label_images`, e.g. `data.sequence.load_sequence`)."""

    stamp: float
    rgb: np.ndarray
    depth: np.ndarray
    cam: Any
    T_world_cam: np.ndarray
    labels: np.ndarray | None = None
    raw: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    frame_id: str = ""


def resolve_bag(path) -> Path:
    """The rosbag2 directory for `path`: a bag dir, a .mcap/.db3 file inside one, or a dataset dir holding
    ``bag_mcap`` / ``bag_sqlite3`` (mcap preferred)."""
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag: {path} does not exist")
    if path.is_file():
        if (path.parent / "metadata.yaml").is_file():
            return path.parent
        raise BagError(f"bag: {path} is a file without metadata.yaml beside it; pass the rosbag2 directory")
    if (path / "metadata.yaml").is_file():
        return path
    for name in ("bag_mcap", "bag_sqlite3"):
        if (path / name / "metadata.yaml").is_file():
            return path / name
    raise BagError(f"bag: {path} is not a rosbag2 directory (no metadata.yaml) nor a dataset dir with "
                   "bag_mcap/ or bag_sqlite3/")


class BagSource:
    """Posed frames of a ROS 2 bag. Validates topics and encodings when opened."""

    def __init__(self, path: str | Path, topics: Topics | None = None) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.path = resolve_bag(path)
        self.topics = topics or Topics()
        self.typestore = get_typestore(Stores.LATEST)
        self._reader = self._open()
        self.connections = {c.topic: c for c in self._reader.connections}
        self._check_topics()
        self._poses = None

    # ----------------------------------------------------------------- opening and validation
    def _open(self):
        from rosbags.rosbag2 import Reader

        try:
            reader = Reader(self.path)
            reader.open()
        except Exception as exc:  # rosbags raises several types for damaged files
            raise BagError(f"bag: cannot open {self.path}: corrupt or truncated bag file ({_short(exc)})") from None
        return reader

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "BagSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return ", ".join(f"{c.topic} [{c.msgtype}, {c.msgcount}]" for c in self._reader.connections) or "none"

    def _check_topics(self) -> None:
        t = self.topics
        missing = [name for name in (t.color, t.depth, t.camera_info) if name not in self.connections]
        if t.pose not in self.connections:
            missing.append(t.pose)
        if missing:
            raise BagError(f"bag {self.path}: missing topic(s) {', '.join(missing)} (not in bag); topics present: {self.describe()} "
                            f"(set them with --topics color=...,depth=...,camera_info=...,pose=...)")
        for name, wanted in ((t.color, COLOR_TYPES), (t.depth, COLOR_TYPES), (t.camera_info, ("sensor_msgs/msg/CameraInfo",))):
            got = self.connections[name].msgtype
            if got not in wanted:
                raise BagError(f"bag {self.path}: topic {name} has type {got}, expected {wanted[0]}"
                                + (" (compressed images are not supported; decompress the bag first)" if "Compressed" in got else ""))
        ptype = self.connections[t.pose].msgtype
        if ptype not in POSE_TYPES:
            raise BagError(f"bag {self.path}: pose topic {t.pose} has unsupported type {ptype} "
                            f"(supported: {', '.join(POSE_TYPES)})")
        self.pose_kind = POSE_TYPES[ptype]
        if self.connections[t.color].msgcount == 0 or self.connections[t.depth].msgcount == 0:
            raise BagError(f"bag {self.path}: no messages on {t.color} or {t.depth}")

    def _messages(self, topics: list[str]) -> Iterator[tuple[str, str, int, bytes]]:
        conns = [self.connections[n] for n in topics if n in self.connections]
        it = self._reader.messages(connections=conns)
        while True:
            try:
                conn, t_ns, raw = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise BagError(f"bag {self.path}: corrupt or truncated bag file ({_short(exc)})") from None
            yield conn.topic, conn.msgtype, t_ns, bytes(raw)

    def _decode(self, raw: bytes, msgtype: str, topic: str):
        try:
            return self.typestore.deserialize_cdr(raw, msgtype)
        except Exception as exc:
            raise BagError(f"bag {self.path}: cannot decode a {msgtype} message on {topic}: corrupt data ({_short(exc)})") from None

    # ----------------------------------------------------------------- poses
    def poses(self):
        """The node's PoseBuffer filled with every pose of the bag (poses are small; read them up front)."""
        if self._poses is not None:
            return self._poses
        from geopurify_ros.node.pose_source import PoseBuffer, extrinsic_from_param, pose_msg_to_matrix

        t = self.topics
        buf = PoseBuffer(max_age_s=t.pose_max_age_s, horizon_s=1e12, capacity=10**9)
        if self.pose_kind == "tf":
            stamps, mats = self._tf_poses()
        else:
            T_base_cam = np.eye(4)
            if self.pose_kind == "odometry" and t.base_to_camera:
                T_base_cam = extrinsic_from_param(t.base_to_camera)
            stamps, mats = [], []
            for topic, mtype, _, raw in self._messages([t.pose]):
                msg = self._decode(raw, mtype, topic)
                frame = msg.header.frame_id.lstrip("/")
                if t.map_frame and frame != t.map_frame.lstrip("/"):     # the node's rule: empty is wrong too
                    raise BagError(f"bag {self.path}: pose on {topic} is in frame '{frame}', expected map_frame "
                                    f"'{t.map_frame}' (set --topics map_frame=...)")
                pose = msg.pose if self.pose_kind == "pose" else msg.pose.pose
                try:
                    T = pose_msg_to_matrix(pose)
                except ValueError as exc:
                    raise BagError(f"bag {self.path}: pose on {topic} at {stamp_to_sec(msg.header.stamp):.3f}: "
                                   f"{exc}") from None
                if self.pose_kind == "odometry":
                    T = T @ T_base_cam
                stamps.append(stamp_to_ns(msg.header.stamp))
                mats.append(T)
        order = np.argsort(stamps, kind="stable")
        last = -np.inf
        self._pose_samples = ([], [])
        for i in order:
            if stamps[i] > last:           # the buffer rejects duplicate stamps, as the node does
                buf.add(stamps[i], mats[i])
                self._pose_samples[0].append(stamps[i] / NS_PER_S)
                self._pose_samples[1].append(mats[i])
                last = stamps[i]
        if len(buf) == 0:
            raise BagError(f"bag {self.path}: no usable pose on {t.pose}")
        self._poses = buf
        return buf

    def pose_samples(self) -> tuple[list[float], list[np.ndarray]]:
        """Camera poses in the map frame at every pose stamp of the bag (sorted, unique stamps)."""
        self.poses()
        return self._pose_samples

    def _tf_poses(self) -> tuple[list[int], list[np.ndarray]]:
        """map_frame <- camera_frame from /tf (+ /tf_static), sampled at each dynamic transform stamp."""
        from geopurify_ros.node.pose_source import transform_msg_to_matrix

        t = self.topics
        static: dict[str, tuple[str, np.ndarray]] = {}
        dynamic: dict[str, list[tuple[int, str, np.ndarray]]] = {}
        for topic, mtype, _, raw in self._messages([t.pose, "/tf_static"]):
            msg = self._decode(raw, mtype, topic)
            for tr in msg.transforms:
                child, parent = tr.child_frame_id.lstrip("/"), tr.header.frame_id.lstrip("/")
                try:
                    T = transform_msg_to_matrix(tr.transform)
                except ValueError as exc:
                    raise BagError(f"bag {self.path}: transform {tr.header.frame_id} -> {tr.child_frame_id} on "
                                   f"{topic}: {exc}") from None
                if topic == "/tf_static":
                    static[child] = (parent, T)
                else:
                    dynamic.setdefault(child, []).append((stamp_to_ns(tr.header.stamp), parent, T))
        cam = t.camera_frame.lstrip("/") or self._first_color_frame()
        # Walk up from the camera to the map; all dynamic links in the chain are sampled at the stamps
        # of the first dynamic one (typical bags: one moving link, e.g. map->base or odom->base).
        chain, frame = [], cam
        while frame != t.map_frame.lstrip("/"):
            if frame in static:
                chain.append(("s", frame))
                frame = static[frame][0]
            elif frame in dynamic:
                chain.append(("d", frame))
                frame = dynamic[frame][0][1]
            else:
                raise BagError(f"bag {self.path}: no TF path from '{t.map_frame}' to camera frame '{cam}' "
                                f"(frame '{frame}' has no parent; set --topics camera_frame=... or map_frame=...)")
            if len(chain) > 50:
                raise BagError(f"bag {self.path}: TF tree has a loop above '{cam}'")
        dyn_links = [f for kind, f in chain if kind == "d"]
        if not dyn_links:
            raise BagError(f"bag {self.path}: the TF path {t.map_frame} -> {cam} never moves (only /tf_static)")
        series = {f: (np.array([s for s, _, _ in dynamic[f]]), [T for _, _, T in dynamic[f]]) for f in dyn_links}
        stamps = [int(v) for v in series[dyn_links[0]][0]]
        mats = []
        for s in stamps:
            T = np.eye(4)
            for kind, f in chain:         # chain is child->parent; compose parent-most last
                if kind == "s":
                    link = static[f][1]
                else:
                    ts, Ts = series[f]
                    link = Ts[int(np.argmin(np.abs(ts - s)))]
                T = link @ T
            mats.append(T)
        return stamps, mats

    def _first_color_frame(self) -> str:
        for topic, mtype, _, raw in self._messages([self.topics.color]):
            return self._decode(raw, mtype, topic).header.frame_id.lstrip("/")
        return ""

    # ----------------------------------------------------------------- frames
    def frames(self, max_frames: int | None = None, decode: bool = True) -> Iterator[Frame]:
        """Posed frames in stamp order. Colour/depth pairing and pose lookup follow the node's rules."""
        from geopurify_ros.camera import CameraModel
        from geopurify_ros.node.pose_source import PoseLookupError

        t = self.topics
        poses = self.poses()
        pending: dict[str, list[tuple[float, Any, bytes]]] = {t.color: [], t.depth: []}
        info_raw, cam = None, None
        n = 0
        self.skipped = {"no_pose": 0, "unpaired": 0, "no_camera_info": 0, "camera_info_mismatch": 0}
        for topic, mtype, _, raw in self._messages([t.camera_info, t.color, t.depth]):
            if topic == t.camera_info:
                info = self._decode(raw, mtype, topic)
                info_raw = raw
                try:
                    cam = CameraModel.from_camera_info(info)  # accepts rosbags' numpy k / d as they are
                except ValueError as exc:
                    raise BagError(f"bag {self.path}: bad CameraInfo on {topic}: {exc}") from None
                continue
            msg = self._decode(raw, mtype, topic)
            s = stamp_to_sec(msg.header.stamp)
            other = t.depth if topic == t.color else t.color
            cands = pending[other]
            best = min(range(len(cands)), key=lambda j: abs(cands[j][0] - s), default=None)
            if best is None or abs(cands[best][0] - s) > t.sync_slop_s:
                pending[topic].append((s, msg, raw))
                if len(pending[topic]) > 10:
                    pending[topic].pop(0)
                    self.skipped["unpaired"] += 1
                continue
            o = cands[best]
            newest = max(s, o[0])
            for q in pending.values():       # like the node: nothing older than an emitted pair survives
                q[:] = [m for m in q if m[0] > newest]
            color, depth = ((s, msg, raw), o) if topic == t.color else (o, (s, msg, raw))
            if cam is None:
                self.skipped["no_camera_info"] += 1
                continue
            try:
                T = poses.lookup(stamp_to_ns(color[1].header.stamp))
            except PoseLookupError:
                self.skipped["no_pose"] += 1
                continue
            frame = Frame(stamp=color[0], rgb=None, depth=None, cam=cam, T_world_cam=T,
                          frame_id=color[1].header.frame_id,
                          raw={t.color: ("sensor_msgs/msg/Image", color[2]), t.depth: ("sensor_msgs/msg/Image", depth[2]),
                               t.camera_info: ("sensor_msgs/msg/CameraInfo", info_raw)})
            if (color[1].width, color[1].height) != (cam.width, cam.height):
                self.skipped["camera_info_mismatch"] += 1     # the node drops these too
                continue
            if decode:
                frame.rgb, frame.depth = self._decode_images(color[1], depth[1])
            yield frame
            n += 1
            if max_frames and n >= max_frames:
                return

    def _decode_images(self, color, depth) -> tuple[np.ndarray, np.ndarray]:
        from geopurify_ros.image_codec import decode_color, decode_depth

        t = self.topics
        cenc = t.color_encoding or color.encoding
        denc = t.depth_encoding or depth.encoding
        try:
            rgb = decode_color(color.data, cenc, color.height, color.width, color.step)
        except ValueError as exc:
            raise BagError(f"bag {self.path}: colour on {t.color}: {exc} (override with --topics color_encoding=...)") from None
        try:
            d = decode_depth(depth.data, denc, depth.height, depth.width, depth.step, bool(depth.is_bigendian))
        except ValueError as exc:
            raise BagError(f"bag {self.path}: depth on {t.depth}: {exc} (override with --topics depth_encoding=...)") from None
        if d.shape != rgb.shape[:2]:
            raise BagError(f"bag {self.path}: depth {d.shape[1]}x{d.shape[0]} and colour {rgb.shape[1]}x{rgb.shape[0]} "
                            "differ; the mapper needs depth registered to colour (aligned_depth_to_color)")
        return rgb, d

    def label_images(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """(stamps, uint16 label images) of the labels topic, sorted by stamp; empty if the bag has none."""
        from geopurify_ros.image_codec import decode_labels

        out = []
        if self.topics.labels in self.connections:
            for topic, mtype, _, raw in self._messages([self.topics.labels]):
                msg = self._decode(raw, mtype, topic)
                try:
                    img = decode_labels(msg.data, msg.encoding, msg.height, msg.width, msg.step, bool(msg.is_bigendian))
                except ValueError as exc:
                    raise BagError(f"bag {self.path}: label image on {topic}: {exc}") from None
                out.append((stamp_to_sec(msg.header.stamp), img))
        out.sort(key=lambda x: x[0])
        return np.array([s for s, _ in out]), [img for _, img in out]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:200]
