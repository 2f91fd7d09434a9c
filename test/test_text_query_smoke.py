"""Smoke test: start the node (console script + config file), call ~/query from this (second) process."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["ROS_DOMAIN_ID"] = str(os.getpid() % 200 + 20)
rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from geopurify_ros.eval.ros_replay import stop_node_process  # noqa: E402
from geopurify_ros.node import msg_convert as mc  # noqa: E402
from geopurify_ros.srv import TextQuery  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def untrained_student_override(tmp: Path) -> list[str]:
    from geopurify_ros.purify import student
    if Path(student.DEFAULT_CHECKPOINT).is_file():
        return []
    ckpt = tmp / "student_untrained.pt"
    student.StudentAffinityNet().save(ckpt)
    return ["-p", f"student_checkpoint:={ckpt}"]


def test_text_query_from_another_process(tmp_path):
    exe = shutil.which("geopurify-mapping")
    cmd = [exe, "--params", str(ROOT / "config" / "mapping.yaml"), "--ros-args", "-p", "device:=cpu",
           "-p", "diagnostics_period_s:=0.3", "-p", "sensor_qos:=reliable", *untrained_student_override(tmp_path)]
    log = open(tmp_path / "node.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT),
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("query_smoke_client", context=ctx)
    ex = rclpy.executors.SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    diags = []
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.append(mc.diagnostics_values(m)), 10)
    t0 = time.monotonic()
    try:
        client = node.create_client(TextQuery, "/geopurify_mapping/query")
        assert client.wait_for_service(timeout_sec=180), (tmp_path / "node.log").read_text()
        t_ready = time.monotonic() - t0

        def call(**kw):
            fut = client.call_async(TextQuery.Request(**kw))
            ex.spin_until_future_complete(fut, timeout_sec=60)
            assert fut.done(), "no reply"
            return fut.result()

        r = call(text="")
        assert r.success is False and "text" in r.message
        r = call(text="   ")
        assert r.success is False
        t1 = time.monotonic()
        r = call(text="a chair", negative_prompts=["floor"], threshold=0.3, max_points=10)
        t_query = time.monotonic() - t1
        assert r.success is True, r.message
        assert {f.name for f in r.matches.fields} >= {"x", "y", "z", "rgb", "label", "score"}
        assert r.matches.header.frame_id == "map"
        assert r.matches.width == len(r.scores) == len(r.labels) == 0       # nothing mapped yet
        assert "chair" in list(r.class_names) and len(r.class_names) == 20

        # A frame pair before any CameraInfo: dropped and counted, node keeps answering.
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        pc = node.create_publisher(Image, "/camera/color/image_raw", qos)
        pd = node.create_publisher(Image, "/camera/depth/image_raw", qos)
        end = time.monotonic() + 30
        while (pc.get_subscription_count() == 0 or pd.get_subscription_count() == 0) and time.monotonic() < end:
            ex.spin_once(timeout_sec=0.05)
        st = mc.sec_to_stamp(5.0)
        pc.publish(mc.image_msg(np.zeros((4, 6, 3), np.uint8), "color", st, "cam", "bgr8"))
        pd.publish(mc.image_msg(np.ones((4, 6), np.float32), "depth", st, "cam", "32FC1"))
        end = time.monotonic() + 30
        while time.monotonic() < end and not (diags and diags[-1].get("dropped.no_camera_info") == "1"):
            ex.spin_once(timeout_sec=0.05)
        assert diags and diags[-1]["dropped.no_camera_info"] == "1", diags[-1:]
        assert call(text="table").success
        assert proc.poll() is None
        print(f"node ready after {t_ready:.1f} s; query on empty map {1e3 * t_query:.1f} ms")
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
        rc = stop_node_process(proc, 20)
    assert rc == 0, (tmp_path / "node.log").read_text()[-3000:]
