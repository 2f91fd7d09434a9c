"""Read an RGB-D sequence back from a ROS 2 bag (any bag with the default topics) and its ground truth."""
from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from . import bag_io

DEFAULT_TOPICS = {
    "color": bag_io.COLOR_TOPIC,
    "depth": bag_io.DEPTH_TOPIC,
    "camera_info": bag_io.CAMERA_INFO_TOPIC,
    "pose": bag_io.POSE_TOPIC,
    "labels": bag_io.LABELS_TOPIC,
}
SYNC_TOLERANCE_NS = 20_000_000  # depth / pose / info matched to a colour stamp within 20 ms


@dataclasses.dataclass(frozen=True)
class Frame:
    stamp: float                  # seconds (colour header stamp)
    rgb: np.ndarray               # (H, W, 3) uint8
    depth: np.ndarray             # (H, W) float32 metres, NaN invalid
    cam: object                   # camera.CameraModel
    T_world_cam: np.ndarray       # (4, 4) float64, optical frame → map (as published)
    labels: np.ndarray | None     # (H, W) uint16, 65535 = ignore; None when the bag has no labels


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    xyz: np.ndarray               # (N, 3) float32
    labels: np.ndarray            # (N,) uint16
    class_names: tuple
    instance: np.ndarray | None = None  # (N,) int32
    observed: np.ndarray | None = None  # (N,) bool, seen (depth test) in at least one frame


def resolve_bag(path) -> Path:
    """A bag directory, or a dataset directory holding ``bag_mcap`` / ``bag_sqlite3`` (mcap preferred)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"path: does not exist: {p}")
    if (p / "metadata.yaml").is_file():
        return p
    for name in ("bag_mcap", "bag_sqlite3"):
        if (p / name / "metadata.yaml").is_file():
            return p / name
    raise ValueError(f"path: {p} is neither a ROS 2 bag nor a dataset dir with bag_mcap/ or bag_sqlite3/")


def _nearest(stamps: list, t: int):
    i = bisect.bisect_left(stamps, t)
    best = min((j for j in (i - 1, i) if 0 <= j < len(stamps)), key=lambda j: abs(stamps[j] - t), default=None)
    return best if best is not None and abs(stamps[best] - t) <= SYNC_TOLERANCE_NS else None


def _camera_from_info(info, CameraModel):
    # rosbags gives numpy arrays for `d`/`k`; hand CameraModel plain sequences (duck-typed CameraInfo).
    from types import SimpleNamespace

    return CameraModel.from_camera_info(SimpleNamespace(
        width=int(info.width), height=int(info.height), k=[float(x) for x in info.k],
        d=tuple(float(x) for x in info.d), distortion_model=str(info.distortion_model)))


def load_sequence(path, topics: dict | None = None) -> Iterator[Frame]:
    """Yield one ``Frame`` per colour image that has depth, intrinsics and a pose.

    ``topics`` overrides entries of ``DEFAULT_TOPICS`` (keys: color, depth, camera_info, pose, labels).
    The pose comes from the PoseStamped topic, or from ``/tf`` (map → camera) if that topic is absent;
    labels are optional. Missing required topics → ValueError listing the bag's topics.
    """
    from ..camera import CameraModel
    from ..image_codec import decode_color, decode_depth, decode_labels

    t = dict(DEFAULT_TOPICS)
    if topics:
        unknown = set(topics) - set(DEFAULT_TOPICS)
        if unknown:
            raise ValueError(f"topics: unknown keys {sorted(unknown)}; expected {sorted(DEFAULT_TOPICS)}")
        t.update(topics)
    bag = resolve_bag(path)
    info = bag_io.list_topics(bag)
    use_tf = t["pose"] not in info and bag_io.TF_TOPIC in info
    required = [t["color"], t["depth"], t["camera_info"]] + ([] if use_tf else [t["pose"]])
    bag_io.require_topics(bag, required)
    wanted = required + ([bag_io.TF_TOPIC] if use_tf else []) + ([t["labels"]] if t["labels"] in info else [])

    by_topic: dict[str, dict[int, object]] = {k: {} for k in wanted}
    for topic, _, msg in bag_io.read_messages(bag, wanted):
        if topic == bag_io.TF_TOPIC:
            for tr in msg.transforms:  # keep map → camera only
                if tr.child_frame_id.endswith("optical_frame") or tr.child_frame_id.startswith("camera"):
                    by_topic[topic][bag_io.stamp_ns_of(tr)] = tr
        else:
            by_topic[topic][bag_io.stamp_ns_of(msg)] = msg

    pose_topic = bag_io.TF_TOPIC if use_tf else t["pose"]
    index = {k: sorted(v) for k, v in by_topic.items()}
    for stamp in index[t["color"]]:
        msgs = {}
        for key, topic in (("depth", t["depth"]), ("info", t["camera_info"]), ("pose", pose_topic),
                           ("labels", t["labels"])):
            if topic not in by_topic:
                continue
            j = _nearest(index[topic], stamp)
            if j is not None:
                msgs[key] = by_topic[topic][index[topic][j]]
        if not {"depth", "info", "pose"} <= msgs.keys():
            continue  # incomplete frame: skip, like a synchroniser would
        c = by_topic[t["color"]][stamp]
        d = msgs["depth"]
        cam = _camera_from_info(msgs["info"], CameraModel)
        rgb = decode_color(c.data, c.encoding, c.height, c.width, c.step)
        depth = decode_depth(d.data, d.encoding, d.height, d.width, d.step, bool(d.is_bigendian))
        labels = None
        if "labels" in msgs:
            m = msgs["labels"]
            labels = decode_labels(m.data, m.encoding, m.height, m.width, m.step)
        yield Frame(stamp=stamp * 1e-9, rgb=rgb, depth=depth, cam=cam, T_world_cam=bag_io.pose_of(msgs["pose"]),
                    labels=labels)


def load_ground_truth(path) -> GroundTruth:
    """Ground-truth labelled points from ``ground_truth.npz`` (the file or its dataset directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "ground_truth.npz"
    if not p.is_file():
        raise ValueError(f"path: ground truth not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = {"xyz", "labels", "class_names"} - set(z.files)
            if missing:
                raise ValueError(f"ground truth {p}: missing arrays {sorted(missing)}")
            return GroundTruth(xyz=z["xyz"].astype(np.float32), labels=z["labels"].astype(np.uint16),
                               class_names=tuple(str(c) for c in z["class_names"]),
                               instance=z["instance"] if "instance" in z.files else None,
                               observed=z["observed"] if "observed" in z.files else None)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"ground truth {p}: unreadable ({exc})") from exc
