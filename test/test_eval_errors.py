"""geopurify-eval fails with exit status 2 and one clear line for bad inputs.

Also holds `write_synthetic_bag`, a small posed RGB-D bag of a wall + floor (used by the other eval tests):
no rendering, so these checks stay fast and independent of the demo generator.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from geopurify_ros.data.bag_source import BagSource, Topics
from geopurify_ros.eval import EvalError
from geopurify_ros.eval.cli import main

ROOT = Path(__file__).resolve().parents[1]
LABELS = str(ROOT / "config" / "labels.yaml")
W, H, F = 64, 48, 50.0


def scene_frame(k: int):
    """Camera k of a slow sideways track in front of a wall (z=2, class 0) above a floor (y=0.5 down, class 1).

    World frame = optical frame of camera 0 (x right, y down, z forward).
    """
    T = np.eye(4)
    T[0, 3] = 0.1 * k
    rows, cols = np.mgrid[0:H, 0:W].astype(np.float64)
    ry = (rows - (H - 1) / 2) / F
    floor_z = np.where(ry > 1e-6, 0.5 / np.maximum(ry, 1e-6), np.inf)
    on_floor = floor_z < 2.0
    depth = np.where(on_floor, floor_z, 2.0).astype(np.float32)
    labels = on_floor.astype(np.uint16)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[~on_floor] = (200, 60, 50)
    rgb[on_floor] = (120, 120, 120)
    rgb[..., 1] += (cols.astype(np.uint8) * 2)   # some texture
    return T, rgb, depth, labels


def write_synthetic_bag(path: Path, n: int = 4, storage: str = "mcap", skip=(), pose_kind: str = "pose") -> Path:
    from geopurify_ros.camera import CameraModel
    from geopurify_ros.data import bag_io as bio
    from geopurify_ros.image_codec import encode_color, encode_depth, encode_labels

    def img(ns, encoded):
        enc, step, data = encoded
        return bio.image_msg(ns, bio.CAMERA_FRAME, enc, H, W, step, data)

    cam = CameraModel(width=W, height=H, fx=F, fy=F, cx=(W - 1) / 2, cy=(H - 1) / 2)
    with bio.BagWriter(path, storage=storage) as bw:
        for k in range(n):
            T, rgb, depth, labels = scene_frame(k)
            ns = 1_000_000_000 + k * 200_000_000
            msgs = {
                bio.CAMERA_INFO_TOPIC: bio.camera_info_msg(ns, bio.CAMERA_FRAME, cam),
                bio.COLOR_TOPIC: img(ns, encode_color(rgb)),
                bio.DEPTH_TOPIC: img(ns, encode_depth(depth)),
                bio.LABELS_TOPIC: img(ns, encode_labels(labels)),
            }
            if pose_kind == "pose":
                msgs[bio.POSE_TOPIC] = bio.pose_stamped_msg(ns, T)
            else:
                msgs[bio.TF_TOPIC] = bio.tf_msg(ns, T)
            for topic, msg in msgs.items():
                if topic not in skip:
                    bw.write(topic, ns, msg)
    return path


def synthetic_gt(path: Path, offset=(0.0, 0.0, 0.0)) -> Path:
    """Dense GT points on the visible wall and floor."""
    xs = np.arange(-1.0, 1.6, 0.02)
    wall = np.stack(np.meshgrid(xs, np.arange(-0.9, 0.5, 0.02), [2.0], indexing="ij"), -1).reshape(-1, 3)
    floor = np.stack(np.meshgrid(xs, [0.5], np.arange(1.05, 2.0, 0.02), indexing="ij"), -1).reshape(-1, 3)
    xyz = np.concatenate([wall, floor]) + np.asarray(offset)
    labels = np.concatenate([np.zeros(len(wall)), np.ones(len(floor))]).astype(np.uint16)
    np.savez(path, xyz=xyz.astype(np.float32), labels=labels)
    return path


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def good_bag(tmp_path_factory) -> Path:
    return write_synthetic_bag(tmp_path_factory.mktemp("bags") / "good")


def test_missing_depth_topic_lists_topics_present(tmp_path, capsys):
    bag = write_synthetic_bag(tmp_path / "nodepth", skip={"/camera/depth/image_raw"})
    code, err = run_cli(capsys, bag, "--gt", synthetic_gt(tmp_path / "gt.npz"), "--labels", LABELS, "--out", tmp_path / "r")
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "missing topic(s) /camera/depth/image_raw" in err
    assert "/camera/color/image_raw [sensor_msgs/msg/Image" in err and "/camera/pose" in err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_bag_gives_clear_error(tmp_path, capsys, good_bag, damage):
    bag = tmp_path / "bad"
    shutil.copytree(good_bag, bag)
    data = next(bag.glob("*.mcap"))
    raw = data.read_bytes()
    data.write_bytes(b"\x00garbage" * 100 if damage == "garbage" else raw[: len(raw) // 2])
    code, err = run_cli(capsys, bag, "--gt", synthetic_gt(tmp_path / "gt.npz"), "--labels", LABELS, "--out", tmp_path / "r")
    assert code == 2
    assert len(err.splitlines()) == 1 and "corrupt or truncated" in err and str(bag) in err


def test_not_a_bag_and_missing_files(tmp_path, capsys):
    code, err = run_cli(capsys, tmp_path, "--gt", "x.npz", "--labels", LABELS)
    assert code == 2 and "no metadata.yaml" in err
    code, err = run_cli(capsys, tmp_path / "nope", "--labels", LABELS)
    assert code == 2 and "does not exist" in err


def test_unsupported_encoding_is_reported(good_bag):
    with BagSource(good_bag, Topics(color_encoding="yuv422")) as src:
        with pytest.raises(EvalError, match="unsupported 'yuv422'.*color_encoding"):
            next(src.frames())


def test_wrong_pose_type_and_tf_pose_source(tmp_path):
    with pytest.raises(EvalError, match="topic /camera/labels has type sensor_msgs/msg/Image, expected sensor_msgs/msg/CameraInfo"):
        BagSource(write_synthetic_bag(tmp_path / "b1"), Topics(camera_info="/camera/labels"))
    # /tf as pose source: the camera chain map -> camera_color_optical_frame is resolved from the bag.
    bag = write_synthetic_bag(tmp_path / "tf", pose_kind="tf")
    with BagSource(bag, Topics(pose="/tf")) as src:
        frames = list(src.frames())
    assert len(frames) == 4
    np.testing.assert_allclose(frames[3].T_world_cam[0, 3], 0.3, atol=1e-9)


def test_topic_overrides_parse(tmp_path, capsys):
    bag = write_synthetic_bag(tmp_path / "b", skip={"/camera/pose"}, pose_kind="tf")
    code, err = run_cli(capsys, bag, "--labels", LABELS, "--topics", "pose=/camera/pose", "--out", tmp_path / "r")
    assert code == 2 and "missing topic(s) /camera/pose" in err and "/tf [tf2_msgs/msg/TFMessage" in err
    code, err = run_cli(capsys, bag, "--labels", LABELS, "--topics", "nonsense=1", "--out", tmp_path / "r")
    assert code == 2 and "unknown key 'nonsense'" in err


def eval_params(tmp: Path) -> Path:
    """config/mapping.yaml on CPU; with an untrained student when the shipped checkpoint is not there yet."""
    import torch
    import yaml

    from geopurify_ros.purify.student import DEFAULT_CHECKPOINT, StudentAffinityNet

    doc = yaml.safe_load((ROOT / "config" / "mapping.yaml").read_text())
    params = doc["geopurify_mapping"]["ros__parameters"]
    params["device"] = "cpu"
    if not Path(DEFAULT_CHECKPOINT).is_file():
        torch.manual_seed(0)
        StudentAffinityNet().save(tmp / "student.pt")
        params["student_checkpoint"] = str(tmp / "student.pt")
    out = tmp / "params.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out
