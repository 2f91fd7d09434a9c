"""Node parameters: one table, declared with descriptors, defaults in config/mapping.yaml, bad values rejected."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from geopurify_ros.config import PipelineConfig
from geopurify_ros.node.params import PARAMS, NodeConfig, markdown_table, split_params

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "config" / "mapping.yaml"


def yaml_params():
    return yaml.safe_load(YAML.read_text())["geopurify_mapping"]["ros__parameters"]


def test_yaml_holds_every_parameter_with_the_declared_default():
    values = yaml_params()
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    assert set(values) == set(names)
    assert set(PipelineConfig.field_names()) <= set(values)          # pipeline keys keep their names
    for p in PARAMS:
        assert values[p.name] == p.default, p.name
        assert type(values[p.name]) is type(p.default), f"{p.name}: write floats with a decimal point"
    # the offline tools read the same file into the same config
    assert PipelineConfig.from_yaml(YAML) == PipelineConfig()
    pcfg, ncfg = split_params(values)
    assert pcfg == PipelineConfig() and ncfg == NodeConfig()


@pytest.mark.parametrize("name,value", [
    ("pose_source", "gps"), ("sensor_qos", "fast"), ("sync_slop_s", -0.1), ("queue_size", 0),
    ("purify_period_s", 0.0), ("base_to_camera", [0.0, 0.0, 0.0]), ("color_encoding", "mono16"),
    ("cloud_color", "label"),
    ("depth_encoding", "rgb8"), ("keyframe_min_rotation_deg", 270.0), ("map_frame", " "),
    ("voxel_size", 0.0), ("eviction", "random"), ("class_names", ["only_one"]), ("torch_threads", -1),
    ("depth_guide_sigma", -0.01), ("depth_guide_sigma", float("nan")),
])
def test_bad_values_are_rejected_naming_the_parameter(name, value):
    values = dict(yaml_params(), **{name: value})
    with pytest.raises(ValueError, match=name):
        split_params(values)


def test_markdown_table_lists_every_parameter():
    table = markdown_table()
    for p in PARAMS:
        assert f"| `{p.name}` |" in table


# ------------------------------------------------------------------ real rclpy node (declaration + startup)

rclpy = pytest.importorskip("rclpy")


@pytest.fixture()
def ros_domain(monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(os.getpid() % 200 + 20))


def test_declared_with_descriptors_and_yaml_overrides(ros_domain, tmp_path):
    from rclpy.parameter import Parameter

    from geopurify_ros.node.params import declare_and_read

    override = tmp_path / "p.yaml"
    override.write_text("geopurify_mapping:\n  ros__parameters:\n    voxel_size: 1\n    prompt_templates: []\n"
                        "    base_to_camera: [0, 0, 1, 0, 0, 0, 1]\n    pose_source: odometry\n")
    ctx = rclpy.Context()
    rclpy.init(context=ctx, args=["x", "--ros-args", "--params-file", str(YAML), "--params-file", str(override)])
    try:
        node = rclpy.create_node("geopurify_mapping", context=ctx)
        values = declare_and_read(node)
        assert values["voxel_size"] == 1.0 and isinstance(values["voxel_size"], float)   # int accepted for float
        assert values["prompt_templates"] == []                                          # empty YAML list
        assert values["base_to_camera"] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        assert values["pose_source"] == "odometry"
        d = node.describe_parameter("voxel_size")
        assert d.description and d.read_only
        assert d.floating_point_range[0].from_value > 0
        assert node.describe_parameter("queue_size").integer_range[0].from_value == 1
        assert node.get_parameter("class_names").type_ == Parameter.Type.STRING_ARRAY
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def run_node(*args, timeout=120):
    exe = shutil.which("geopurify-mapping")
    env = dict(os.environ, ROS_DOMAIN_ID=str(os.getpid() % 200 + 20))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))


@pytest.mark.parametrize("args,name", [
    (["--ros-args", "-p", "pose_source:=gps"], "pose_source"),
    (["--ros-args", "-p", "voxel_size:=-0.5"], "voxel_size"),          # outside the descriptor range
    (["--ros-args", "-p", "queue_size:=fast"], "queue_size"),          # wrong type
    (["--ros-args", "-p", "pose_source:=tf"], "tf2_ros"),              # tf asked for but not importable
])
def test_node_refuses_to_start_on_bad_values(args, name):
    if name == "tf2_ros":
        from geopurify_ros.node.pose_source import tf2_available
        if tf2_available():
            pytest.skip("tf2_ros is importable here")
    r = run_node("--params", str(YAML), *args)
    assert r.returncode == 2, r.stderr
    assert name in r.stderr and "startup error" in r.stderr


def test_missing_params_file_is_a_startup_error():
    r = run_node("--params", "/nonexistent/mapping.yaml")
    assert r.returncode == 2 and "/nonexistent/mapping.yaml" in r.stderr
