"""launch/mapping.launch.py: parses, and refers only to things that exist (executable, files, parameters).

`launch` / `launch_ros` are not installable in the venv, so the file is checked statically (ast);
where launch_ros is importable it is also imported and its LaunchDescription built.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from geopurify_ros.node.params import PARAMS

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "mapping.launch.py"
DECLARED = {p.name for p in PARAMS} | {"use_sim_time"}   # use_sim_time is declared by rclpy itself


def tree():
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


def node_call():
    calls = [n for n in ast.walk(tree()) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "Node"]
    assert len(calls) == 1
    return {k.arg: k.value for k in calls[0].keywords}


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
    assert re.search(rf"install\(PROGRAMS\s+scripts/{exe}\s+DESTINATION\s+lib/\$\{{PROJECT_NAME\}}\)", cmake)
    assert re.search(r"install\(DIRECTORY[^)]*\blaunch\b[^)]*\bconfig\b[^)]*DESTINATION share", cmake)
    script = ROOT / "scripts" / exe
    assert script.is_file() and "geopurify_ros.node.mapping_node import main" in script.read_text()


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


@pytest.mark.skipif(importlib.util.find_spec("launch_ros") is None,
                    reason="launch_ros is not importable in this environment; the file is checked statically above")
def test_imports_and_builds_with_launch_ros():
    spec = importlib.util.spec_from_file_location("mapping_launch", LAUNCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    from launch_ros.actions import Node
    assert any(isinstance(e, Node) for e in ld.entities)
