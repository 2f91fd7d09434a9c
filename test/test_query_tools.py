"""What a ROS user runs against the map: `geopurify-query` against a live node, `geopurify-export` on a
saved map, the semantic cloud colours and their legend (`ClassList.colors`), and the RViz config's topics
on the live graph.

One node (console script + config file, own process) serves a map fused offline from the tiny demo
and loaded through `~/load_map`; the tools run as subprocesses, as a user runs them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

os.environ["ROS_DOMAIN_ID"] = str(os.getpid() % 200 + 20)   # before rclpy initialises DDS

from conftest import tiny_demo_dir  # noqa: E402

rclpy = pytest.importorskip("rclpy")
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import PointCloud2  # noqa: E402

from geopurify_ros.eval.ros_replay import stop_node_process  # noqa: E402
from geopurify_ros.msg import ClassList  # noqa: E402
from geopurify_ros.palette import colors_of  # noqa: E402
from geopurify_ros.pointcloud2 import from_msg, unpack_rgb  # noqa: E402
from geopurify_ros.srv import MapFile, TextQuery  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODE = "/geopurify_mapping"
QUERY = "sofa"                 # separates well in the tiny demo (see test_node_integration)
TOOL_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_tool(*args, timeout=300):
    t0 = time.monotonic()
    out = subprocess.run([shutil.which(args[0]), *map(str, args[1:])], capture_output=True, text=True,
                         timeout=timeout, env=TOOL_ENV, cwd=str(ROOT))
    return out, time.monotonic() - t0


def xyz_of(cloud):
    return np.stack([cloud["x"], cloud["y"], cloud["z"]], 1).astype(np.float64)


def read_ply(path):
    """(xyz, rgb uint8, vertex rows with label / score) as trimesh reads the file."""
    trimesh = pytest.importorskip("trimesh")
    pc = trimesh.load(path)
    assert isinstance(pc, trimesh.PointCloud), type(pc)
    rows = pc.metadata["_ply_raw"]["vertex"]["data"]
    return np.asarray(pc.vertices), np.asarray(pc.colors)[:, :3], rows


# ------------------------------------------------------------------ fixtures


def fuse_tiny_demo(path: Path) -> int:
    """Fuse the tiny demo offline (the node's defaults, CPU) and save the map; returns its voxel count."""
    from geopurify_ros.config import PipelineConfig
    from geopurify_ros.data.sequence import load_sequence
    from geopurify_ros.pipeline import MappingPipeline

    pipe = MappingPipeline(PipelineConfig.from_yaml(ROOT / "config" / "mapping.yaml"))
    pipe.config.device = "cpu"
    for f in load_sequence(tiny_demo_dir()):
        pipe.process_frame(f.rgb, f.depth, f.cam, f.T_world_cam, f.stamp)
    pipe.save(path)
    return len(pipe.voxel_map)


class Live:
    """The node process and this process's client node."""

    def __init__(self, tmp: Path):
        cmd = [shutil.which("geopurify-mapping"), "--params", str(ROOT / "config" / "mapping.yaml"),
               "--ros-args", "-p", "device:=cpu", "-p", "purify_period_s:=0.3"]
        self.log = tmp / "node.log"
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=TOOL_ENV,
                                     cwd=str(ROOT))
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.node = rclpy.create_node("query_tools_test", context=self.ctx)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.clouds, self.classes = [], []
        self.node.create_subscription(PointCloud2, f"{NODE}/labelled_cloud", self.clouds.append, latched)
        self.node.create_subscription(ClassList, f"{NODE}/class_names", self.classes.append, latched)

    def spin_until(self, pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
            if pred():
                return True
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return False

    def call(self, srv_type, name, request, timeout=120.0):
        client = self.node.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=timeout), f"{name}: " + self.log.read_text()[-3000:]
        fut = client.call_async(request)
        assert self.spin_until(fut.done, timeout), f"{name} did not answer"
        return fut.result()

    def close(self):
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)
        stop_node_process(self.proc, 20)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("query_tools")
    env = Live(tmp)                              # the node starts while this process fuses the map
    try:
        map_path = tmp / "tiny_map.pt"
        n_voxels = fuse_tiny_demo(map_path)
        r = env.call(MapFile, f"{NODE}/load_map", MapFile.Request(path=str(map_path)), timeout=240)
        assert r.success, r.message
        assert env.spin_until(lambda: env.clouds and env.clouds[-1].width == n_voxels, 240), \
            [c.width for c in env.clouds]
        assert env.spin_until(lambda: bool(env.classes), 30)
        yield env, map_path, tmp
    finally:
        env.close()


# ------------------------------------------------------------------ tests without a node


def test_query_cli_errors_without_a_node_and_on_bad_input():
    absent = f"/geopurify_absent_{os.getpid()}"
    out, wall = run_tool("geopurify-query", "a chair", "--node", absent, "--timeout", "2")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"no service {absent}/query within 2 s" in out.stderr
    assert wall < 60, wall                           # process start + the 2 s wait, not a hang
    out, _ = run_tool("geopurify-query", "   ")
    assert out.returncode == 2 and "text: empty query" in out.stderr
    out, _ = run_tool("geopurify-query", "a chair", "--threshold", "1.5")
    assert out.returncode == 2 and "--threshold" in out.stderr


def test_export_errors_name_the_input(tmp_path):
    out, wall = run_tool("geopurify-export", tmp_path / "missing.pt", "--ply", tmp_path / "x.ply")
    assert out.returncode == 2 and "missing.pt does not exist" in out.stderr
    assert wall < 60, wall                           # checked before the feature backend loads
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a map")
    out, _ = run_tool("geopurify-export", garbage, "--ply", tmp_path / "x.ply", "--device", "cpu")
    assert out.returncode == 2 and "not a readable voxel map" in out.stderr
    assert not (tmp_path / "x.ply").exists()


# ------------------------------------------------------------------ against the live node


def test_semantic_cloud_rgb_is_the_class_list_palette(live):
    env, _, _ = live
    classes = env.classes[-1]
    names = list(classes.names)
    assert len(classes.colors) == len(names) == 20
    legend = np.array([[c.r, c.g, c.b] for c in classes.colors]) * 255
    assert len({tuple(np.round(c)) for c in legend}) == len(names), "two classes share a colour"
    cloud = from_msg(env.clouds[-1])
    labels = cloud["label"].astype(np.int64)
    assert labels.max() < len(names) and len(np.unique(labels)) >= 5
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), np.round(legend[labels]).astype(np.uint8))
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), colors_of(labels, len(names)))


def test_rviz_config_topics_are_live_with_the_display_types(live):
    env, _, _ = live
    doc = yaml.safe_load((ROOT / "rviz" / "mapping.rviz").read_text())
    wanted = {"rviz_default_plugins/PointCloud2": "sensor_msgs/msg/PointCloud2",
              "rviz_default_plugins/MarkerArray": "visualization_msgs/msg/MarkerArray"}
    shown = {d["Topic"]["Value"]: wanted[d["Class"]] for d in doc["Visualization Manager"]["Displays"]
             if "Topic" in d}
    assert len(shown) == 2

    def live_types():
        return dict(env.node.get_topic_names_and_types())

    assert env.spin_until(lambda: all(t in live_types() for t in shown), 30), live_types()
    for topic, msg_type in shown.items():
        assert msg_type in live_types()[topic], (topic, live_types()[topic])
        pubs = env.node.get_publishers_info_by_topic(topic)
        assert pubs and pubs[0].node_name == NODE.strip("/"), topic


def test_query_cli_prints_summary_and_writes_ply_and_png(live):
    env, _, tmp = live
    ply, png = tmp / "matches.ply", tmp / "matches.png"
    out, wall = run_tool("geopurify-query", QUERY, "--max-points", 300, "--ply", ply, "--png", png,
                         "--timeout", 60)
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout, f"({wall:.1f} s)")
    # the same question asked directly: the CLI reports exactly the node's answer
    res = env.call(TextQuery, f"{NODE}/query", TextQuery.Request(text=QUERY, max_points=300))
    assert res.success and len(res.scores) > 20, res.message
    lines = out.stdout.splitlines()
    assert f"matches: {len(res.scores)}" in lines
    assert f"best score: {max(res.scores):.3f}" in lines
    assert "labels: " + ", ".join(f"{k} {v}" for k, v in Counter(res.labels).most_common()) in lines
    box = next(ln for ln in lines if ln.strip().startswith("bbox min"))
    lo = np.array([float(v) for v in box.split("min (")[1].split(")")[0].split(",")])
    hi = np.array([float(v) for v in box.split("max (")[1].split(")")[0].split(",")])
    matches = from_msg(res.matches)
    xyz = xyz_of(matches)
    tol = 0.006                                                  # printed with 2 decimals
    inside = np.all((xyz >= lo - tol) & (xyz <= hi + tol), axis=1)
    n_best = int(next(ln for ln in lines if ln.startswith("best cluster:")).split()[2])
    assert 1 <= n_best <= inside.sum(), (n_best, inside.sum())   # the box holds its cluster...
    for k in range(3):                                           # ...and is tight around matches
        assert np.any(np.abs(xyz[inside, k] - lo[k]) <= tol) and np.any(np.abs(xyz[inside, k] - hi[k]) <= tol)
    # PLY: what the node sent, in its order
    p_xyz, p_rgb, rows = read_ply(ply)
    assert len(p_xyz) == len(res.scores) and f"wrote {ply} ({len(res.scores)} points)" in lines
    np.testing.assert_allclose(p_xyz, xyz, atol=1e-6)
    np.testing.assert_array_equal(rows["label"], matches["label"])
    np.testing.assert_allclose(rows["score"], res.scores, atol=1e-6)
    np.testing.assert_array_equal(p_rgb, unpack_rgb(matches["rgb"]))
    # PNG: a real picture (the map in many colours + the matches)
    from PIL import Image
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[0] > 300 and img.shape[1] > 300
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_export_ply_reads_back_with_the_map_labels_and_colours(live):
    env, map_path, tmp = live
    node_cloud = from_msg(env.clouds[-1])                    # the node's labels for this map (pooled)
    ply = tmp / "export_label.ply"
    out, wall = run_tool("geopurify-export", map_path, "--ply", ply, "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout, f"({wall:.1f} s)")
    xyz, rgb, rows = read_ply(ply)
    assert len(xyz) == len(node_cloud) and f"{len(xyz)} points" in out.stdout
    np.testing.assert_allclose(xyz, xyz_of(node_cloud), atol=1e-6)          # same voxels, same order
    agree = np.mean(rows["label"] == node_cloud["label"])
    assert agree > 0.99, agree                                              # labelled as the node labels
    np.testing.assert_array_equal(rgb, colors_of(rows["label"], 20))        # --color label: the palette
    assert np.all((rows["score"] >= 0) & (rows["score"] <= 1))

    from geopurify_ros.voxel_map import VoxelMap
    ply = tmp / "export_rgb.ply"
    out, _ = run_tool("geopurify-export", map_path, "--ply", ply, "--color", "rgb", "--mode", "raw",
                      "--device", "cpu")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "purify_mode raw" in out.stdout
    xyz, rgb, rows = read_ply(ply)
    vm = VoxelMap.load(map_path)
    np.testing.assert_array_equal(rgb, vm.colors.numpy())                   # --color rgb: fused camera colour
    assert len(np.unique(rows["label"])) >= 5 and rows["label"].max() < 20
