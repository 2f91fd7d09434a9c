"""launch/mapping.launch.py: parses, and refers only to things that exist (executable, files, parameters).

`launch` / `launch_ros` are not installable in the venv, so the file is checked statically (ast);
where launch_ros is importable it is also imported and its LaunchDescription built.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from geopurify_ros.node.params import PARAMS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "mapping.launch.py"
RVIZ = ROOT / "rviz" / "mapping.rviz"
DECLARED = {p.name for p in PARAMS} | {"use_sim_time"}   # use_sim_time is declared by rclpy itself


def tree():
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def node_calls():
    """package name -> keyword arguments of each launch_ros Node(...) in the file."""
    calls = [n for n in ast.walk(tree()) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Node"]
    out = {}
    for c in calls:
        kw = {k.arg: k.value for k in c.keywords}
        out[ast.literal_eval(kw["package"])] = kw
    assert len(out) == len(calls), "one Node per package"
    return out


def node_call():
    return node_calls()["geopurify_ros"]


def test_parses_and_defines_generate_launch_description():
    names = {n.name for n in tree().body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in names
    imported = {a.name for n in ast.walk(tree()) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"LaunchDescription", "Node", "DeclareLaunchArgument", "FindPackageShare"} <= imported


def test_executable_is_installed_by_setup_py_and_cmake():
    kw = node_call()
    assert ast.literal_eval(kw["package"]) == "geopurify_ros"
    exe = ast.literal_eval(kw["executable"])
    assert ast.literal_eval(kw["name"]) == "geopurify_mapping"
    setup = (ROOT / "setup.py").read_text()
    assert re.search(rf'"{exe}\s*=\s*geopurify_ros\.node\.mapping_node:main"', setup)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert exe in installed_programs(cmake)
    assert re.search(r"install\(DIRECTORY[^)]*\blaunch\b[^)]*\bconfig\b[^)]*DESTINATION share", cmake)
    script = ROOT / "scripts" / exe
    assert script.is_file() and "geopurify_ros.node.mapping_node import main" in script.read_text()


def installed_programs(cmake: str) -> list[str]:
    m = re.search(r"install\(PROGRAMS\s+([^)]*?)\s+DESTINATION\s+lib/\$\{PROJECT_NAME\}\)", cmake)
    assert m, "no install(PROGRAMS ... DESTINATION lib/${PROJECT_NAME})"
    return [Path(f).name for f in m.group(1).split()]


def test_query_and_export_have_ros2_run_wrappers():
    """`ros2 run geopurify_ros geopurify-query ...` runs the same main as the venv command."""
    setup = (ROOT / "setup.py").read_text()
    scripts = dict(re.findall(r'"([\w-]+) = ([\w.]+):main"', setup))
    installed = installed_programs((ROOT / "CMakeLists.txt").read_text())
    for name in ("geopurify-query", "geopurify-export"):
        assert name in scripts and name in installed, name
        wrapper = ROOT / "scripts" / name
        assert wrapper.stat().st_mode & 0o111, f"{wrapper} is not executable"
        assert f"from {scripts[name]} import main" in wrapper.read_text()
        out = subprocess.run([sys.executable, str(wrapper), "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and f"usage: {name}" in out.stdout, out.stderr[-2000:]


def test_params_file_and_overrides_exist():
    src = LAUNCH.read_text()
    m = re.search(r'PathJoinSubstitution\(\[FindPackageShare\("geopurify_ros"\),\s*"(\w+)",\s*"([\w.]+)"\]\)', src)
    assert m, "params file should come from the package share dir"
    assert (ROOT / m.group(1) / m.group(2)).is_file()
    # every launch argument that becomes a parameter is a declared node parameter
    param_args = next(n for n in tree().body if isinstance(n, ast.Assign) and n.targets[0].id == "PARAM_ARGUMENTS")
    entries = ast.literal_eval(param_args.value)
    assert {"color_topic", "depth_topic", "device", "feature_backend"} <= {e[0] for e in entries}
    defaults = {p.name: p.default for p in PARAMS}
    for name, default, _ in entries:
        assert name in DECLARED, name
        assert str(defaults[name]) == default, f"{name}: launch default differs from the node default"
    literal_keys = {n.slice.value for n in ast.walk(tree())
                    if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant)
                    and getattr(n.value, "id", None) == "overrides"}
    assert literal_keys <= DECLARED
    # remapped names are topics the node publishes
    remaps = ast.unparse(node_call()["remappings"])
    assert "~/labelled_cloud" in remaps and "~/labelled_cloud" in (ROOT / "geopurify_ros/node/mapping_node.py").read_text()


def launch_argument_defaults() -> dict[str, str]:
    out = {}
    for n in ast.walk(tree()):
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "DeclareLaunchArgument":
            kw = {k.arg: k.value for k in n.keywords}
            if isinstance(n.args[0], ast.Constant) and isinstance(kw.get("default_value"), ast.Constant):
                out[n.args[0].value] = kw["default_value"].value
    param_args = next(n for n in tree().body if isinstance(n, ast.Assign) and n.targets[0].id == "PARAM_ARGUMENTS")
    out.update({name: default for name, default, _ in ast.literal_eval(param_args.value)})
    return out


def rviz_topics(doc) -> dict[str, str]:
    """topic -> display class of every display (nested groups included) of an RViz config."""
    found = {}

    def walk(displays):
        for d in displays or []:
            topic = d.get("Topic")
            if isinstance(topic, dict) and topic.get("Value"):
                found[topic["Value"]] = d["Class"]
            walk(d.get("Displays"))
    walk(doc["Visualization Manager"]["Displays"])
    return found


def launch_published_topics() -> set[str]:
    """Topics the launched node publishes: its `~/name` publishers under its node name, with the launch
    file's remap of ~/labelled_cloud (at its default) applied."""
    name = ast.literal_eval(node_call()["name"])
    src = (ROOT / "geopurify_ros/node/mapping_node.py").read_text()
    private = re.findall(r'create_publisher\(\w+, "~/(\w+)"', src)
    assert {"labelled_cloud", "class_names", "query_markers"} <= set(private)
    topics = {f"/{name}/{t}" for t in private}
    remaps = ast.unparse(node_call()["remappings"])
    if "~/labelled_cloud" in remaps:
        topics.discard(f"/{name}/labelled_cloud")
        topics.add(launch_argument_defaults()["cloud_topic"])
    return topics


def test_rviz_config_parses_and_shows_what_the_launched_node_publishes():
    doc = yaml.safe_load(RVIZ.read_text())
    topics = rviz_topics(doc)
    classes = set(topics.values())
    assert {"rviz_default_plugins/PointCloud2", "rviz_default_plugins/MarkerArray"} <= classes
    published = launch_published_topics()
    for topic, cls in topics.items():
        assert topic in published, f"{RVIZ.name}: {cls} shows {topic}, which the launch file does not publish"
    assert launch_argument_defaults()["cloud_topic"] in topics and "/geopurify_mapping/query_markers" in topics
    opts = doc["Visualization Manager"]["Global Options"]
    assert opts["Fixed Frame"] == launch_argument_defaults()["map_frame"]
    kinds = {d["Class"]: d for d in doc["Visualization Manager"]["Displays"]}
    assert kinds["rviz_default_plugins/Axes"]["Reference Frame"] == launch_argument_defaults()["map_frame"]
    cloud = kinds["rviz_default_plugins/PointCloud2"]
    assert cloud["Color Transformer"] == "RGB8"       # the semantic palette lives in the rgb field
    # the node latches both topics: a transient-local subscription gets the map when RViz starts
    for d in (cloud, kinds["rviz_default_plugins/MarkerArray"]):
        assert d["Topic"]["Durability Policy"] == "Transient Local"


def test_rviz_launch_argument_and_install():
    assert launch_argument_defaults()["rviz"] == "false"
    rviz = node_calls()["rviz2"]
    assert ast.unparse(rviz["condition"]) == "IfCondition(LaunchConfiguration('rviz'))"
    args = ast.unparse(rviz["arguments"])
    m = re.search(r"FindPackageShare\('geopurify_ros'\), '(\w+)', '([\w.]+)'", args)
    assert m and "'-d'" in args, args
    assert (ROOT / m.group(1) / m.group(2)) == RVIZ and RVIZ.is_file()
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"install\(DIRECTORY[^)]*\brviz\b[^)]*DESTINATION share", cmake)


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                    reason="launch_ros is not importable in this environment; the file is checked statically above")
def test_imports_and_builds_with_launch_ros():
    spec = importlib.util.spec_from_file_location("mapping_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    from launch_ros.actions import Node
    assert any(isinstance(e, Node) for e in ld.entities)
