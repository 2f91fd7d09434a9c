"""RGB-D sequences from a ROS 2 bag (a thin wrapper over `bag_source.BagSource`) and their ground truth."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np

from . import bag_io
from .bag_source import BagSource, Frame, Topics, resolve_bag

__all__ = ["Frame", "GroundTruth", "load_ground_truth", "load_sequence"]

TOPIC_KEYS = ("color", "depth", "camera_info", "pose", "labels")


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    xyz: np.ndarray               # (N, 3) float32
    labels: np.ndarray            # (N,) uint16
    class_names: tuple
    instance: np.ndarray | None = None  # (N,) int32
    observed: np.ndarray | None = None  # (N,) bool, seen (depth test) in at least one frame


def load_sequence(path, topics: dict | None = None) -> Iterator[Frame]:
    """Yield one ``Frame`` per colour image paired with depth, with CameraInfo seen and a pose, as the node would.

    ``path``: a bag dir (or a file in one), or a dataset dir holding ``bag_mcap`` / ``bag_sqlite3``.
    ``topics`` overrides the default topic names (keys: color, depth, camera_info, pose, labels). The pose
    comes from the PoseStamped topic, or from ``/tf`` (map -> colour frame) if that topic is absent; label
    images are optional (``Frame.labels`` is None without them). Missing path / topics or a corrupt bag ->
    ValueError (a missing topic lists the bag's topics).
    """
    t = Topics()
    if topics:
        unknown = set(topics) - set(TOPIC_KEYS)
        if unknown:
            raise ValueError(f"topics: unknown keys {sorted(unknown)}; expected {sorted(TOPIC_KEYS)}")
        for key, name in topics.items():
            setattr(t, key, name)
    bag = resolve_bag(path)
    present = bag_io.list_topics(bag)
    if t.pose not in present and bag_io.TF_TOPIC in present:
        t.pose = bag_io.TF_TOPIC
    with BagSource(bag, t) as src:
        stamps, images = src.label_images()
        for fr in src.frames():
            fr.raw = {}  # only ros_replay republishes the CDR bytes; don't keep a second copy of every image
            if len(stamps):
                # label images are matched like the eval CLI does: nearest stamp within the sync slop
                j = int(np.argmin(np.abs(stamps - fr.stamp)))
                if abs(stamps[j] - fr.stamp) <= t.sync_slop_s and images[j].shape == fr.depth.shape:
                    fr.labels = images[j]
            yield fr


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
