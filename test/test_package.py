"""The package as a ROS 2 package: manifest, interfaces, entry points."""
import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_xml_validates_with_catkin_pkg():
    from catkin_pkg.package import parse_package

    pkg = parse_package(str(ROOT / "package.xml"))
    pkg.validate()
    assert pkg.name == "geopurify_ros"
    assert pkg.package_format == 3
    deps = {d.name for d in pkg.build_depends + pkg.exec_depends + pkg.buildtool_depends}
    for key in ("rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "std_srvs", "tf2_ros",
                "sensor_msgs_py", "visualization_msgs", "rosidl_default_generators", "ament_cmake_python"):
        assert key in deps, key
    assert pkg.get_build_type() == "ament_cmake"


def test_every_interface_file_is_generated():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    files = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("msg/*.msg"), *ROOT.glob("srv/*.srv")])
    assert files, "no interface files"
    for f in files:
        assert f'"{f}"' in cmake, f"{f} missing from rosidl_generate_interfaces"


def test_generated_text_query_imports_in_a_second_process():
    code = (
        "from geopurify_ros.srv import TextQuery, MapFile\n"
        "from geopurify_ros.msg import ClassList\n"
        "r = TextQuery.Request(text='chair', negative_prompts=['wall'], threshold=0.3, max_points=10)\n"
        "resp = TextQuery.Response(success=True, scores=[0.5], labels=['chair'])\n"
        "assert r.text == 'chair' and list(resp.labels) == ['chair']\n"
        "assert 'PointCloud2' in type(resp.matches).__name__\n"
        "print(TextQuery.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "geopurify_ros.srv" in out.stdout


def test_console_scripts_resolve_to_callables():
    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and re.match(r"^[\w-]+ = [\w.]+:\w+$", n.value)]
    assert len(scripts) >= 5
    for spec in scripts:
        name, target = [s.strip() for s in spec.split("=")]
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), spec


def test_builds_as_a_colcon_workspace(tmp_path):
    """The full ament_cmake package (interfaces + Python + launch/config) builds with colcon and
    the installed copy imports with its generated service beside the hand-written modules."""
    import os
    import shutil

    src = tmp_path / "src" / "geopurify_ros"
    src.mkdir(parents=True)
    for name in ("CMakeLists.txt", "package.xml", "msg", "srv", "scripts", "launch", "config", "rviz", "geopurify_ros"):
        p = ROOT / name
        (shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
         if p.is_dir() else shutil.copy(p, src / name))
    venv = Path(sys.prefix)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(venv), CMAKE_PREFIX_PATH=str(venv))
    build = subprocess.run(
        ["colcon", "--log-base", "log", "build", "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DBUILD_TESTING=OFF"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    prefix = tmp_path / "install" / "geopurify_ros"
    for exe in ("mapping_node", "geopurify-query", "geopurify-export"):
        assert (prefix / "lib" / "geopurify_ros" / exe).is_file(), exe
    assert (prefix / "share" / "geopurify_ros" / "rviz" / "mapping.rviz").is_file()
    assert (prefix / "share" / "geopurify_ros" / "launch" / "mapping.launch.py").is_file()
    assert (prefix / "share" / "geopurify_ros" / "config" / "mapping.yaml").is_file()
    site = next(prefix.glob("lib/python3*/site-packages"))
    code = ("import geopurify_ros, geopurify_ros.srv, geopurify_ros.pipeline\n"
            "assert geopurify_ros.__file__.startswith(%r), geopurify_ros.__file__\n"
            "geopurify_ros.srv.TextQuery.Request(text='x')\n"
            "from geopurify_ros.msg import ClassList\n"
            "from std_msgs.msg import ColorRGBA\n"
            "ClassList(names=['a'], colors=[ColorRGBA(r=1.0)])\n" % str(site))
    run_env = dict(env, PYTHONPATH=str(site), AMENT_PREFIX_PATH=f"{prefix}:{venv}",
                   LD_LIBRARY_PATH=f"{prefix / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=run_env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
