"""Read RGB-D frames out of any ROS 2 bag (rosbags, no ROS install) and replay them offline.

`BagSource` turns a bag into posed frames exactly as the mapping node would see them:
colour/depth paired by nearest header stamp (within `sync_slop_s`), the latest CameraInfo, and a
pose from PoseStamped / Odometry / TF interpolated at the colour stamp (the node's `PoseBuffer`).
Every frame also keeps the raw CDR bytes of its messages so `ros_replay` can publish them
unchanged. `replay_offline` feeds the same frames through `MappingPipeline` (same keyframe gate as
the node), then purifies the one fused map three ways (raw / purified / pooled).
"""
from __future__ import annotations

import time
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import EvalError

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
                raise EvalError(f"--topics: unknown key '{attr}' (known: {', '.join(cls.__dataclass_fields__)})")
            if value is not None:
                setattr(t, attr, type(getattr(t, attr))(value) if not isinstance(getattr(t, attr), tuple) else value)
        return t


@dataclass
class Frame:
    """One posed RGB-D frame plus the raw messages it came from (topic -> (msgtype, cdr bytes)).

    `labels` is filled by callers that match label images to frames (`BagSource.label_images`)."""

    stamp: float
    rgb: np.ndarray
    depth: np.ndarray
    cam: Any
    T_world_cam: np.ndarray
    labels: np.ndarray | None = None
    raw: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    frame_id: str = ""


def _stamp(header) -> float:
    return float(header.stamp.sec) + float(header.stamp.nanosec) * 1e-9


def _bag_dir(path: Path) -> Path:
    """A rosbag2 directory; a .mcap/.db3 file inside one is accepted too."""
    if not path.exists():
        raise EvalError(f"bag: {path} does not exist")
    if path.is_file():
        if (path.parent / "metadata.yaml").is_file():
            return path.parent
        raise EvalError(f"bag: {path} is a file without metadata.yaml beside it; pass the rosbag2 directory")
    if not (path / "metadata.yaml").is_file():
        raise EvalError(f"bag: {path} is not a rosbag2 directory (no metadata.yaml)")
    return path


class BagSource:
    """Posed frames of a ROS 2 bag. Validates topics and encodings when opened."""

    def __init__(self, path: str | Path, topics: Topics | None = None) -> None:
        from rosbags.typesys import Stores, get_typestore

        self.path = _bag_dir(Path(path))
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
            raise EvalError(f"bag: cannot open {self.path}: corrupt or truncated bag file ({_short(exc)})") from None
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
            raise EvalError(f"bag {self.path}: missing topic(s) {', '.join(missing)}; topics present: {self.describe()} "
                            f"(set them with --topics color=...,depth=...,camera_info=...,pose=...)")
        for name, wanted in ((t.color, COLOR_TYPES), (t.depth, COLOR_TYPES), (t.camera_info, ("sensor_msgs/msg/CameraInfo",))):
            got = self.connections[name].msgtype
            if got not in wanted:
                raise EvalError(f"bag {self.path}: topic {name} has type {got}, expected {wanted[0]}"
                                + (" (compressed images are not supported; decompress the bag first)" if "Compressed" in got else ""))
        ptype = self.connections[t.pose].msgtype
        if ptype not in POSE_TYPES:
            raise EvalError(f"bag {self.path}: pose topic {t.pose} has unsupported type {ptype} "
                            f"(supported: {', '.join(POSE_TYPES)})")
        self.pose_kind = POSE_TYPES[ptype]
        if self.connections[t.color].msgcount == 0 or self.connections[t.depth].msgcount == 0:
            raise EvalError(f"bag {self.path}: no messages on {t.color} or {t.depth}")

    def _messages(self, topics: list[str]) -> Iterator[tuple[str, str, int, bytes]]:
        conns = [self.connections[n] for n in topics if n in self.connections]
        it = self._reader.messages(connections=conns)
        while True:
            try:
                conn, t_ns, raw = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise EvalError(f"bag {self.path}: corrupt or truncated bag file ({_short(exc)})") from None
            yield conn.topic, conn.msgtype, t_ns, bytes(raw)

    def _decode(self, raw: bytes, msgtype: str, topic: str):
        try:
            return self.typestore.deserialize_cdr(raw, msgtype)
        except Exception as exc:
            raise EvalError(f"bag {self.path}: cannot decode a {msgtype} message on {topic}: corrupt data ({_short(exc)})") from None

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
                if frame and t.map_frame and frame != t.map_frame.lstrip("/"):
                    raise EvalError(f"bag {self.path}: pose on {topic} is in frame '{frame}', expected map_frame "
                                    f"'{t.map_frame}' (set --topics map_frame=...)")
                pose = msg.pose if self.pose_kind == "pose" else msg.pose.pose
                T = pose_msg_to_matrix(pose)
                if self.pose_kind == "odometry":
                    T = T @ T_base_cam
                stamps.append(_stamp(msg.header))
                mats.append(T)
        order = np.argsort(stamps, kind="stable")
        last = -np.inf
        self._pose_samples = ([], [])
        for i in order:
            if stamps[i] > last:           # the buffer rejects duplicate stamps, as the node does
                buf.add(stamps[i], mats[i])
                self._pose_samples[0].append(float(stamps[i]))
                self._pose_samples[1].append(mats[i])
                last = stamps[i]
        if len(buf) == 0:
            raise EvalError(f"bag {self.path}: no usable pose on {t.pose}")
        self._poses = buf
        return buf

    def pose_samples(self) -> tuple[list[float], list[np.ndarray]]:
        """Camera poses in the map frame at every pose stamp of the bag (sorted, unique stamps)."""
        self.poses()
        return self._pose_samples

    def _tf_poses(self) -> tuple[list[float], list[np.ndarray]]:
        """map_frame <- camera_frame from /tf (+ /tf_static), sampled at each dynamic transform stamp."""
        from geopurify_ros.node.pose_source import transform_msg_to_matrix

        t = self.topics
        static: dict[str, tuple[str, np.ndarray]] = {}
        dynamic: dict[str, list[tuple[float, str, np.ndarray]]] = {}
        for topic, mtype, _, raw in self._messages([t.pose, "/tf_static"]):
            msg = self._decode(raw, mtype, topic)
            for tr in msg.transforms:
                child, parent = tr.child_frame_id.lstrip("/"), tr.header.frame_id.lstrip("/")
                T = transform_msg_to_matrix(tr.transform)
                if topic == "/tf_static":
                    static[child] = (parent, T)
                else:
                    dynamic.setdefault(child, []).append((_stamp(tr.header), parent, T))
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
                raise EvalError(f"bag {self.path}: no TF path from '{t.map_frame}' to camera frame '{cam}' "
                                f"(frame '{frame}' has no parent; set --topics camera_frame=... or map_frame=...)")
            if len(chain) > 50:
                raise EvalError(f"bag {self.path}: TF tree has a loop above '{cam}'")
        dyn_links = [f for kind, f in chain if kind == "d"]
        if not dyn_links:
            raise EvalError(f"bag {self.path}: the TF path {t.map_frame} -> {cam} never moves (only /tf_static)")
        series = {f: (np.array([s for s, _, _ in dynamic[f]]), [T for _, _, T in dynamic[f]]) for f in dyn_links}
        stamps = list(series[dyn_links[0]][0])
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
                    # plain sequences: rosbags gives numpy arrays, whose truth value is ambiguous
                    cam = CameraModel.from_camera_info(SimpleNamespace(
                        width=info.width, height=info.height, k=list(info.k), d=tuple(info.d),
                        distortion_model=info.distortion_model))
                except ValueError as exc:
                    raise EvalError(f"bag {self.path}: bad CameraInfo on {topic}: {exc}") from None
                continue
            msg = self._decode(raw, mtype, topic)
            s = _stamp(msg.header)
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
                T = poses.lookup(color[0])
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
            raise EvalError(f"bag {self.path}: colour on {t.color}: {exc} (override with --topics color_encoding=...)") from None
        try:
            d = decode_depth(depth.data, denc, depth.height, depth.width, depth.step, bool(depth.is_bigendian))
        except ValueError as exc:
            raise EvalError(f"bag {self.path}: depth on {t.depth}: {exc} (override with --topics depth_encoding=...)") from None
        if d.shape != rgb.shape[:2]:
            raise EvalError(f"bag {self.path}: depth {d.shape[1]}x{d.shape[0]} and colour {rgb.shape[1]}x{rgb.shape[0]} "
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
                    raise EvalError(f"bag {self.path}: label image on {topic}: {exc}") from None
                out.append((_stamp(msg.header), img))
        out.sort(key=lambda x: x[0])
        return np.array([s for s, _ in out]), [img for _, img in out]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text[:200]


# --------------------------------------------------------------------- offline replay
MODES = ("raw", "purified", "pooled")


@dataclass
class ReplayResult:
    """Final labelled clouds per purify mode, plus throughput of the replay."""

    clouds: dict[str, np.ndarray]
    frames_read: int
    frames_fused: int
    seconds: float
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames_read / self.seconds if self.seconds > 0 else float("nan")


def keyframe_selector(params: dict[str, Any]):
    """The node's keyframe gate, built from the same parameters (so offline fuses the same frames)."""
    from geopurify_ros.node.sync import KeyframeSelector

    keys = {"keyframe_min_translation_m": "min_translation_m", "keyframe_min_rotation_deg": "min_rotation_deg",
            "keyframe_max_interval_s": "max_interval_s"}
    return KeyframeSelector(**{v: float(params[k]) for k, v in keys.items() if k in params})


def _on_worker_thread(fn, *args):
    """Run `fn` on a fresh thread (as the node's MapWorker does) and return its result / re-raise its error.

    Why: torch's intra-op threads behave per calling thread; on 2 busy cores the main thread ran
    process_frame 3-4x slower than a worker thread, which made offline look much slower than the node.
    """
    import threading

    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # re-raised on the caller's thread
            box["error"] = exc

    th = threading.Thread(target=target, name="geopurify_eval_worker")
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def replay_offline(source: BagSource, config, params: dict[str, Any], modes=MODES, max_frames: int | None = None,
                   progress: bool = True) -> ReplayResult:
    """Fuse the bag's frames with `MappingPipeline`, then label the map once per purify mode."""
    try:
        from geopurify_ros.pipeline import MappingPipeline

        pipe = MappingPipeline(config)
    except (ValueError, OSError) as exc:       # e.g. a missing student checkpoint
        raise EvalError(f"pipeline: {exc}") from None
    return _on_worker_thread(_replay_offline, pipe, source, config, params, modes, max_frames, progress)


def _replay_offline(pipe, source: BagSource, config, params, modes, max_frames, progress) -> ReplayResult:
    from tqdm import tqdm

    gate = keyframe_selector(params)
    total = source.connections[source.topics.color].msgcount
    total = min(total, max_frames) if max_frames else total
    n_read = n_fused = 0
    frame_s = 0.0
    t0 = time.perf_counter()
    for fr in tqdm(source.frames(max_frames=max_frames), total=total, desc="offline replay", unit="frame",
                   disable=not progress, leave=False):
        n_read += 1
        if not gate.is_keyframe(fr.stamp, fr.T_world_cam):
            continue
        gate.accept(fr.stamp, fr.T_world_cam)
        t1 = time.perf_counter()
        pipe.process_frame(fr.rgb, fr.depth, fr.cam, fr.T_world_cam, fr.stamp)
        frame_s += time.perf_counter() - t1
        n_fused += 1
    fuse_s = time.perf_counter() - t0
    if n_read == 0:
        raise EvalError(f"bag {source.path}: no posed frame could be assembled ({source.skipped})")
    clouds = {}
    for mode in modes:                    # fuse once, purify three ways (full pass: not incremental)
        pipe.set_purify_mode(mode)
        pipe.purify(incremental=False)
        clouds[mode] = pipe.labelled_cloud()
    return ReplayResult(clouds=clouds, frames_read=n_read, frames_fused=n_fused, seconds=fuse_s, source="offline",
                        extra={"skipped": dict(source.skipped), "total_s": time.perf_counter() - t0,
                               "frame_ms_mean": 1e3 * frame_s / max(n_fused, 1),
                               "class_names": list(getattr(pipe, "class_names", config.class_names))})
