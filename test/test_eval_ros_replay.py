"""Replay through the real mapping node (subprocess, sim time, reliable QoS) agrees with the offline replay."""
from __future__ import annotations

import json
import os

import pytest

from geopurify_ros.eval.cli import main

from test_eval_errors import LABELS, eval_params
from test_eval_offline import tiny_demo

pytest.importorskip("rclpy")


@pytest.fixture(autouse=True)
def _own_domain(monkeypatch):
    # The replay picks a private DDS domain per process; pin it apart from other test processes too.
    monkeypatch.setenv("GEOPURIFY_EVAL_DOMAIN_ID", str(os.getpid() % 70 + 30))


def test_fast_replay_defers_purification_rate_paced_keeps_the_period(tmp_path):
    import yaml
    from geopurify_ros.eval.ros_replay import FAST_PURIFY_PERIOD_S, NODE, write_node_params
    for fast, want in ((True, FAST_PURIFY_PERIOD_S), (False, 0.7)):
        write_node_params(tmp_path / "p.yaml", {"purify_period_s": 0.7, "voxel_size": 0.04}, ["chair"], fast=fast)
        p = yaml.safe_load((tmp_path / "p.yaml").read_text())[NODE]["ros__parameters"]
        assert p["purify_period_s"] == want and p["voxel_size"] == 0.04 and p["use_sim_time"] is True
        assert 1 <= p["torch_threads"] <= max(1, (os.cpu_count() or 2) - 1)     # a core left for the replayer
    write_node_params(tmp_path / "p.yaml", {"torch_threads": 3}, ["chair"])        # the user's choice is kept
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())[NODE]["ros__parameters"]["torch_threads"] == 3


def test_ros_and_offline_replay_agree_on_tiny_bag(tmp_path):
    demo = tiny_demo()
    out = tmp_path / "report"
    code = main([str(demo / "bag_mcap"), "--gt", str(demo / "ground_truth.npz"), "--labels", LABELS,
                 "--params", str(eval_params(tmp_path)), "--mode", "both", "--out", str(out), "--quiet",
                 "--node-timeout", "300", "--no-plots"])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    ros, off = doc["results"]["ros"], doc["results"]["offline"]
    replay = doc["meta"]["replay"]
    # same frames reached the map: nothing dropped by the node, same keyframes fused
    assert replay["ros"]["frames_read"] == replay["offline"]["frames_read"] == 12
    assert replay["ros"]["frames_fused"] == replay["offline"]["frames_fused"]
    assert replay["ros"]["dropped_total"] == 0
    # Fast replay purifies once at the end, as offline: the same map, so the same metrics.
    for mode in ("raw", "purified", "pooled"):
        assert abs(ros[mode]["miou"] - off[mode]["miou"]) < 1e-4, mode
        assert abs(ros[mode]["coverage"] - off[mode]["coverage"]) < 1e-4, mode
    assert max(doc["meta"]["ros_vs_offline"].values()) < 1.0


def test_rate_paced_replay_through_the_node(tmp_path):
    """--rate: published on the bag's clock (x rate), no per-frame handshake; the node still maps every frame."""
    from test_eval_errors import write_synthetic_bag

    bag = write_synthetic_bag(tmp_path / "bag", n=3)
    out = tmp_path / "report"
    code = main([str(bag), "--labels", LABELS, "--params", str(eval_params(tmp_path)), "--mode", "ros",
                 "--rate", "2.0", "--purify-modes", "pooled", "--out", str(out), "--quiet", "--no-plots",
                 "--node-timeout", "300"])
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    info = doc["meta"]["replay"]["ros"]
    assert info["frames_read"] == 3 and info["frames_fused"] == 3
    assert doc["results"]["ros"]["pooled"]["coverage"] > 0.9
    assert (out / "ros_replay" / "node.log").is_file()
