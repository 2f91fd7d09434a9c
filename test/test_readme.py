"""The README documents what the code does: parameter table, config file, commands."""
import re
from pathlib import Path

import yaml

from geopurify_ros.config import load_ros_params
from geopurify_ros.node.params import PARAMS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_parameter_table_is_the_generated_one():
    m = re.search(r"<!-- params:begin[^>]*-->\n(.*?)<!-- params:end -->", README, re.S)
    assert m, "README lacks the generated parameter table markers"
    assert m.group(1).strip() == markdown_table().strip(), "README table is stale: regenerate from markdown_table()"


def test_every_declared_parameter_is_in_config_and_readme():
    params = load_ros_params(ROOT / "config" / "mapping.yaml")
    names = [p.name for p in PARAMS]
    assert names
    for name in names:
        assert name in params, f"{name} missing from config/mapping.yaml"
        assert f"`{name}`" in README, f"{name} missing from README"
    assert not set(params) - set(names) - {"use_sim_time"}, "config has keys the node does not declare"


def test_readme_commands_exist_and_ci_runs_the_test_command():
    for script in ("scripts/setup.sh", "scripts/demo.sh", "scripts/test.sh"):
        assert f"./{script}" in README
        assert (ROOT / script).stat().st_mode & 0o111, f"{script} is not executable"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/setup.sh && ./scripts/test.sh" in ci
    assert "./scripts/setup.sh && ./scripts/test.sh" in README


def test_labels_file_matches_default_class_list():
    labels = yaml.safe_load((ROOT / "config" / "labels.yaml").read_text())
    params = load_ros_params(ROOT / "config" / "mapping.yaml")
    assert labels["classes"] == params["class_names"]
