"""No single message stops mapping: the node over ROS with `use_sim_time` and a /clock this test drives.

Far-future poses and image pairs are dropped (`stamp_future`) and later frames still map; a bag played
twice with /clock going back maps both passes (one time-jump warning); `~/reset` clears the map and
every time-ordered input state (older stamps map again after it); non-unit quaternions, empty pose
frames and depth with nothing in [min_depth, max_depth] are dropped, counted and logged without
touching the map; the cloud carries the newest fused frame's stamp to the nanosecond; startup
errors exit non-zero from every entry point and a repeated SIGINT still exits 0 without a traceback.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from rosgraph_msgs.msg import Clock  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from test_node_integration import (ROOT, Client, node_overrides, start_node, stop_node,  # noqa: E402
                                   synthetic_sequence)

from geopurify_ros.node import msg_convert as mc  # noqa: E402
from geopurify_ros.ros_time import NS_PER_S, ns_to_stamp, stamp_to_ns  # noqa: E402

# Sim time starts here: at 1.7e9 s float64 seconds resolve ~240 ns, so a cloud stamp that went through
# float seconds comes out as ...1.099999905 (the bug this guards against); integer nanoseconds are exact.
START_NS = 1_700_000_001_100_000_007


class SimClock:
    """Publishes /clock every 50 ms of wall time, advancing by the same amount; `jump_to` sets it."""

    def __init__(self, client: Client, start_ns: int) -> None:
        self.ns = start_ns
        self.pub = client.node.create_publisher(Clock, "/clock", 10)
        client.node.create_timer(0.05, self._tick)            # the client node runs on wall time

    def _tick(self) -> None:
        self.ns += 50_000_000
        self.pub.publish(Clock(clock=ns_to_stamp(self.ns)))

    def jump_to(self, ns: int) -> None:
        self.ns = ns
        self.pub.publish(Clock(clock=ns_to_stamp(ns)))


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    from geopurify_ros.config import PipelineConfig
    frames = synthetic_sequence(n=8, class_names=PipelineConfig().class_names)
    proc, log = start_node(tmp, node_overrides(tmp, use_sim_time=True, sync_queue_size=3), "robust_node.log")
    client = Client()
    clock = SimClock(client, START_NS)
    try:
        client.wait_connected(timeout=180)
        assert client.spin_until(lambda: "frames_fused" in client.latest_diag(), 120, proc), "no diagnostics"
        yield client, clock, proc, frames, log
    finally:
        client.close()
        stop_node(proc)
        print(log.read_text()[-4000:])


def send(client, f, stamp_ns, quat=None, pose_frame="map", depth=None, depth_encoding="16UC1", pose=True):
    st = ns_to_stamp(stamp_ns)
    client.info.publish(mc.camera_info_msg(f.cam, st, "camera_optical"))
    if pose:
        msg = mc.pose_stamped_msg(f.T_world_cam, st, pose_frame)
        if quat is not None:
            o = msg.pose.orientation
            o.x, o.y, o.z, o.w = quat
        client.pose.publish(msg)
    client.executor.spin_once(timeout_sec=0.01)
    client.color.publish(mc.image_msg(f.rgb, "color", st, "camera_optical", "rgb8"))
    client.depth.publish(mc.image_msg(f.depth if depth is None else depth, "depth", st, "camera_optical",
                                      depth_encoding))
    client.spin_until(lambda: False, 0.1)


def counter(client, key):
    return int(client.latest_diag().get(key, 0))


def wait_counts(client, proc, want: dict, timeout=240):
    ok = client.spin_until(lambda: all(counter(client, k) >= v for k, v in want.items()), timeout, proc)
    assert ok, {k: (counter(client, k), v) for k, v in want.items()}
    return client.fresh_diag()


def play(client, clock, proc, frames, stamps=None):
    """Send frames at the current sim time (0.5 s apart), wait until all are fused; returns their stamps."""
    # A diagnostics message published after now: the cached latest one can predate a fuse still finishing
    # from the previous test, and a count one short lets the wait below return one frame early.
    fused0 = int(client.fresh_diag()["frames_fused"])
    if stamps is None:
        stamps = [clock.ns + i * 500_000_000 for i in range(len(frames))]
    for f, s in zip(frames, stamps):
        while clock.ns < s:                          # keep stamps at or just behind the node clock
            client.spin_until(lambda: False, 0.05)
        send(client, f, s)
    wait_counts(client, proc, {"frames_fused": fused0 + len(frames)})
    wait_cloud_with_stamp(client, proc, stamps[-1])  # the last frame is fused and published, nothing in flight
    return stamps


def wait_cloud_with_stamp(client, proc, stamp_ns, timeout=120):
    ok = client.spin_until(lambda: client.clouds and stamp_to_ns(client.clouds[-1].header.stamp) == stamp_ns,
                           timeout, proc)
    last = stamp_to_ns(client.clouds[-1].header.stamp) if client.clouds else None
    assert ok, f"no cloud stamped {stamp_ns} (last {last})"
    return client.clouds[-1]


def reset_and_remap_older(client, clock, proc, frames, newest_ns):
    """~/reset, then frames stamped *before* everything seen so far must map: pose buffer, synchroniser
    and keyframe gate were cleared (within max_time_jump_s, so no time-jump logic is involved)."""
    n_clouds = len(client.clouds)
    assert client.call(client.reset, Trigger.Request()).success
    assert client.spin_until(lambda: len(client.clouds) > n_clouds and client.clouds[-1].width == 0, 60, proc), \
        "reset did not publish an empty cloud"
    before = client.fresh_diag()
    stamps = [newest_ns - 1_500_000_000 + i * 100_000_000 for i in range(3)]
    play(client, clock, proc, frames[:3], stamps)
    d = client.fresh_diag()
    for reason in ("pose_out_of_order", "pose_stale", "sync_unmatched", "no_pose"):
        assert d[f"dropped.{reason}"] == before[f"dropped.{reason}"], reason
    assert int(d["map.voxels"]) > 0 and d["skipped_not_keyframe"] == before["skipped_not_keyframe"]


def test_far_future_pose_then_valid_poses_keep_mapping_and_cloud_stamp_is_exact(graph):
    client, clock, proc, frames, log = graph
    stamps = play(client, clock, proc, frames[:3])
    msg = wait_cloud_with_stamp(client, proc, stamps[-1])
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == divmod(stamps[-1], NS_PER_S)

    before = client.fresh_diag()
    bad = mc.pose_stamped_msg(frames[3].T_world_cam, ns_to_stamp(clock.ns + 10**6 * NS_PER_S), "map")
    client.pose.publish(bad)
    wait_counts(client, proc, {"dropped.stamp_future": int(before["dropped.stamp_future"]) + 1})
    stamps = play(client, clock, proc, frames[3:6])
    d = client.fresh_diag()
    for reason in ("pose_out_of_order", "pose_stale"):
        assert d[f"dropped.{reason}"] == before[f"dropped.{reason}"], reason
    wait_cloud_with_stamp(client, proc, stamps[-1])
    reset_and_remap_older(client, clock, proc, frames, stamps[-1])


def test_far_future_pair_then_valid_pairs_keep_mapping(graph):
    client, clock, proc, frames, log = graph
    before = client.fresh_diag()
    send(client, frames[0], clock.ns + 10**6 * NS_PER_S, pose=False)
    wait_counts(client, proc, {"dropped.stamp_future": int(before["dropped.stamp_future"]) + 2})  # colour, depth
    stamps = play(client, clock, proc, frames[1:4])
    d = client.fresh_diag()
    assert int(d["frames_in"]) == int(before["frames_in"]) + 3
    assert d["dropped.sync_unmatched"] == before["dropped.sync_unmatched"]
    wait_cloud_with_stamp(client, proc, stamps[-1])
    reset_and_remap_older(client, clock, proc, frames, stamps[-1])


def test_bag_replayed_twice_with_clock_going_back_maps_both_passes(graph):
    client, clock, proc, frames, log = graph
    before = client.fresh_diag()
    start = clock.ns + NS_PER_S
    stamps = [start + i * 500_000_000 for i in range(4)]
    play(client, clock, proc, frames[:4], stamps)
    clock.jump_to(start - 200_000_000)                # `ros2 bag play -l`: /clock restarts with the bag
    client.spin_until(lambda: False, 0.5)
    play(client, clock, proc, frames[:4], stamps)     # same stamps again
    d = client.fresh_diag()
    assert int(d["frames_fused"]) == int(before["frames_fused"]) + 8
    assert int(d["time_jumps"]) == int(before["time_jumps"]) + 1
    for reason in ("pose_out_of_order", "pose_stale", "stamp_future"):
        assert d[f"dropped.{reason}"] == before[f"dropped.{reason}"], reason
    wait_cloud_with_stamp(client, proc, stamps[-1])
    text = log.read_text()
    assert text.count("ROS time jumped back") == 1, "one warning per jump"
    reset_and_remap_older(client, clock, proc, frames, stamps[-1])


def test_bad_poses_and_out_of_range_depth_are_dropped_counted_logged_and_leave_the_map(graph):
    client, clock, proc, frames, log = graph
    last = play(client, clock, proc, frames[:2])[-1]
    before = client.fresh_diag()
    f = frames[4]
    far = np.full_like(f.depth, 1e30)
    near = np.full_like(f.depth, 1e-6)
    # A frame whose own pose is bad still maps with a valid pose stamped within pose_max_age_s (0.1 s; the nearest
    # wins): keep the two bad-pose frames 0.3 s from every valid pose, the play's before and the ones below after.
    client.spin_until(lambda: clock.ns > last + 700_000_000, 30)
    send(client, f, clock.ns - 300_000_000, quat=(0.1, 0.2, 0.3, 0.4))        # |q| = 0.548
    send(client, f, clock.ns - 299_000_000, pose_frame="")                    # empty frame_id
    send(client, f, clock.ns + 2_000_000, depth=far, depth_encoding="32FC1")  # pose ok, depth beyond max
    send(client, f, clock.ns + 3_000_000, depth=near, depth_encoding="32FC1")  # pose ok, depth below min
    for i in range(6):                                                        # colour without depth
        client.color.publish(mc.image_msg(f.rgb, "color", ns_to_stamp(clock.ns + (4 + i) * 1_000_000),
                                          "camera_optical", "rgb8"))
    want = {"dropped.pose_invalid": 1, "dropped.pose_wrong_frame": 1, "dropped.depth_out_of_range": 2,
            "dropped.sync_unmatched": 3}
    d = wait_counts(client, proc, {k: int(before[k]) + v for k, v in want.items()}, timeout=120)
    client.spin_until(lambda: False, 2.0)
    d = client.fresh_diag()
    for key in ("frames_fused", "map.frames_fused", "map.voxels"):
        assert d[key] == before[key], key
    text = log.read_text()
    for reason in ("pose_invalid", "pose_wrong_frame", "depth_out_of_range", "sync_unmatched", "stamp_future"):
        assert f"dropped ({reason}," in text, f"{reason} not logged"
    assert "norm 0.5477" in text and "empty frame_id" in text
    assert proc.poll() is None


# ------------------------------------------------------------------ exit codes


def _env():
    return dict(os.environ, ROS_DOMAIN_ID=str(os.getpid() % 200 + 20), PYTHONUNBUFFERED="1")


@pytest.mark.parametrize("entry", ["console", "script", "module"])
def test_startup_error_exits_non_zero_from_every_entry_point(entry):
    cmd = {"console": [shutil.which("geopurify-mapping")],
           "script": [sys.executable, str(ROOT / "scripts" / "mapping_node")],
           "module": [sys.executable, "-m", "geopurify_ros.node.mapping_node"]}[entry]
    for args, status in ((["--ros-args", "-p", "pose_source:=bogus"], 2), (["--ros-args", "-p", "=broken"], 2)):
        r = subprocess.run(cmd + ["--params", str(ROOT / "config" / "mapping.yaml")] + args, capture_output=True,
                           text=True, timeout=120, env=_env(), cwd=str(ROOT), stdin=subprocess.DEVNULL)
        assert r.returncode == status, (args, r.returncode, r.stderr[-1500:])
        assert "startup error" in r.stderr and "Traceback" not in r.stderr


def test_repeated_sigint_shuts_down_cleanly(tmp_path):
    """As under `ros2 launch` with Ctrl-C: the process group's SIGINT, then launch's own, while stdin is
    not a terminal; and a SIGTERM on top."""
    for signals in ((signal.SIGINT, signal.SIGINT, signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)):
        proc = subprocess.Popen([shutil.which("geopurify-mapping"), "--params", str(ROOT / "config" / "mapping.yaml"),
                                 "--ros-args", "-p", "device:=cpu"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=str(ROOT))
        out = ""
        deadline = time.monotonic() + 240
        while "ready" not in out and time.monotonic() < deadline and proc.poll() is None:
            out += proc.stdout.readline()
        assert "ready" in out, out[-2000:]
        for sig, delay in zip(signals, (0.0, 0.05, 0.3, 1.0)):
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(sig)
        out += proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, (signals, proc.returncode, out[-2000:])
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-2000:]
