"""Offline evaluation: bag round trip through rosbags, replay through MappingPipeline, report, GT handling."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from geopurify_ros.data.bag_source import BagSource
from geopurify_ros.eval import EvalError
from geopurify_ros.eval.cli import load_gt, main, score_results
from geopurify_ros.eval.replay import ReplayResult

from conftest import tiny_demo_dir
from test_eval_errors import LABELS, eval_params, synthetic_gt, write_synthetic_bag

CLASSES = ["wall", "floor"]


tiny_demo = tiny_demo_dir


def _all_messages(bag: Path):
    from rosbags.rosbag2 import Reader

    with Reader(bag) as r:
        types = {c.topic: c.msgtype for c in r.connections}
        return types, [(c.topic, t, bytes(raw)) for c, t, raw in r.messages()]


def test_tiny_bag_round_trips_through_rosbags(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    demo = tiny_demo()
    types, msgs = _all_messages(demo / "bag_mcap")
    assert {"/camera/color/image_raw", "/camera/depth/image_raw", "/camera/color/camera_info", "/camera/pose"} <= set(types)
    # mcap and sqlite3 bags of the demo hold the same messages
    assert _all_messages(demo / "bag_sqlite3") == (types, msgs)
    for plugin in (StoragePlugin.MCAP, StoragePlugin.SQLITE3):
        out = tmp_path / plugin.name
        with Writer(out, version=9, storage_plugin=plugin) as w:
            conns = {topic: w.add_connection(topic, mtype, typestore=_ts()) for topic, mtype in types.items()}
            for topic, t, raw in msgs:
                w.write(conns[topic], t, raw)
        assert _all_messages(out) == (types, msgs)
    # and decode to the same frames
    with BagSource(demo / "bag_mcap") as a, BagSource(tmp_path / "SQLITE3") as b:
        fa, fb = list(a.frames()), list(b.frames())
    assert len(fa) == len(fb) == sum(m[0] == "/camera/color/image_raw" for m in msgs) == 12
    for x, y in zip(fa, fb):
        assert x.stamp == y.stamp
        np.testing.assert_array_equal(x.rgb, y.rgb)
        np.testing.assert_array_equal(x.depth, y.depth)
        np.testing.assert_allclose(x.T_world_cam, y.T_world_cam)


def _ts():
    from geopurify_ros.data.bag_io import typestore

    return typestore()


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One CLI run on a small synthetic bag, GT built from its label images (no --gt)."""
    tmp = tmp_path_factory.mktemp("offline")
    bag = write_synthetic_bag(tmp / "bag", n=3)
    code = main([str(bag), "--labels", LABELS, "--params", str(eval_params(tmp)), "--out", str(tmp / "report"),
                 "--quiet", "--ablation"])
    return code, tmp


def test_offline_cli_writes_report(offline_run):
    code, tmp = offline_run
    assert code == 0
    rep = tmp / "report"
    doc = json.loads((rep / "report.json").read_text())
    res = doc["results"]["offline"]
    assert list(res) == ["raw", "purified", "pooled"]
    for r in res.values():
        assert r["coverage"] > 0.9                  # GT from the same depth images: the map covers it
        assert set(r["per_class"]) == set(CLASSES)
        assert 0.0 <= r["miou"] <= 1.0
    info = doc["meta"]["replay"]["offline"]
    assert info["frames_read"] == 3 and info["frames_fused"] >= 1 and info["fps"] > 0
    md = (rep / "report.md").read_text()
    assert "| offline | pooled |" in md and "| wall |" in md
    for name in doc["figures"]:
        assert (rep / name).stat().st_size > 5000   # real PNGs
    assert {"offline_top.png", "offline_perspective.png", "offline_iou_bars.png", "offline_confusion_pooled.png"} <= set(doc["figures"])
    # --ablation: the variants re-label the same fused map; "raw" and the default agree with the modes
    abl = doc["results"]["ablation"]
    assert list(abl)[:5] == ["raw", "uniform smoothing", "constant affinities + gates", "student, no gates",
                             "student + gates (default)"] and list(abl)[5].startswith("student + gates at paper scale")
    assert list(abl)[6].startswith("paper-like")
    assert abl["raw"]["miou"] == res["raw"]["miou"]
    assert abl["student + gates (default)"]["miou"] == pytest.approx(res["pooled"]["miou"], abs=1e-6)
    assert "| ablation | uniform smoothing |" in md


def test_gt_that_misses_the_map_is_rejected():
    rng = np.random.default_rng(0)
    cloud = np.zeros(500, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("label", "u2")])
    for i, k in enumerate("xyz"):
        cloud[k] = rng.uniform(0, 2, 500)
    res = {"offline": ReplayResult(clouds={"raw": cloud}, frames_read=1, frames_fused=1, seconds=1.0, source="offline")}
    xyz = np.stack([cloud[k] for k in "xyz"], 1)
    ok, _ = score_results(res, xyz, np.zeros(500, int), CLASSES, 0.075)
    assert ok["offline"]["raw"].coverage == pytest.approx(1.0)
    # the same GT in millimetres: a units mismatch
    with pytest.raises(EvalError, match="does not overlap the map.*frame or units mismatch"):
        score_results(res, xyz * 1000, np.zeros(500, int), CLASSES, 0.075)


def test_gt_loaders(tmp_path):
    gt = synthetic_gt(tmp_path / "gt.npz")
    xyz, lab = load_gt(str(gt), CLASSES, 65535)
    # binary and ascii PLY with a label property give the same points
    rec = np.zeros(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("label", "<u2")])
    rec["x"], rec["y"], rec["z"], rec["label"] = xyz[:, 0], xyz[:, 1], xyz[:, 2], lab
    head = ("ply\nformat {}\nelement vertex {}\nproperty float x\nproperty float y\nproperty float z\n"
            "property ushort label\nend_header\n")
    (tmp_path / "b.ply").write_bytes(head.format("binary_little_endian 1.0", len(rec)).encode() + rec.tobytes())
    body = "\n".join(f"{r['x']} {r['y']} {r['z']} {r['label']}" for r in rec[:50])
    (tmp_path / "a.ply").write_text(head.format("ascii 1.0", 50) + body + "\n")
    bx, bl = load_gt(str(tmp_path / "b.ply"), CLASSES, 65535)
    np.testing.assert_array_equal(bx, xyz)
    np.testing.assert_array_equal(bl, lab)
    ax, al = load_gt(str(tmp_path / "a.ply"), CLASSES, 65535)
    np.testing.assert_allclose(ax, xyz[:50], atol=1e-6)
    np.testing.assert_array_equal(al, lab[:50])
    # class ids are remapped by name; the 'observed' mask drops never-seen points
    np.savez(tmp_path / "named.npz", xyz=xyz[:4], labels=np.array([0, 1, 2, 1]), class_names=np.array(["floor", "wall", "x"]),
             observed=np.array([True, True, True, False]))
    nx, nl = load_gt(str(tmp_path / "named.npz"), CLASSES, 65535)
    assert len(nx) == 3 and nl.tolist() == [1, 0, 65535]
    with pytest.raises(EvalError, match="needs arrays 'xyz'"):
        np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
        load_gt(str(tmp_path / "bad.npz"), CLASSES, 65535)


def test_topics_follow_the_node_params_and_cli_overrides():
    from geopurify_ros.config import load_ros_params
    from geopurify_ros.eval.cli import build_parser, parse_topic_overrides
    from geopurify_ros.data.bag_source import Topics

    params = load_ros_params(Path(LABELS).parent / "mapping.yaml")
    t = Topics.from_params(params)
    assert (t.color, t.depth, t.camera_info, t.pose) == (params["color_topic"], params["depth_topic"],
                                                         params["camera_info_topic"], params["pose_topic"])
    assert Topics.from_params(dict(params, pose_source="odometry", odom_topic="/odom")).pose == "/odom"
    assert Topics.from_params(dict(params, pose_source="tf")).pose == "/tf"
    args = build_parser().parse_args(["bag", "--topics", "color=/rs/color,base_to_camera=0,0,0.1,0,0,0,1",
                                      "--depth-topic", "/rs/aligned_depth"])
    over = parse_topic_overrides(args)
    assert over == {"color": "/rs/color", "depth": "/rs/aligned_depth", "base_to_camera": (0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0)}
    t = Topics.from_params(params, over)
    assert t.color == "/rs/color" and t.depth == "/rs/aligned_depth" and t.base_to_camera[2] == 0.1
