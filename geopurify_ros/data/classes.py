"""Class table (config/labels.yaml) and the Sweet Home 3D item → class mapping (class_map.tsv)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from ..config import SCANNET20, load_labels

IGNORE_LABEL = 65535
_MAP_FILE = Path(__file__).with_name("class_map.tsv")
_LABELS_YAML = Path(__file__).resolve().parents[2] / "config" / "labels.yaml"


@lru_cache(maxsize=None)
def class_names(labels_yaml: str | None = None) -> tuple[str, ...]:
    """Class names in label-id order (from ``config/labels.yaml`` when present)."""
    if labels_yaml or _LABELS_YAML.is_file():
        return tuple(load_labels(labels_yaml or _LABELS_YAML, "labels_yaml")[0])
    return tuple(SCANNET20)   # installed without the config/ directory


@lru_cache(maxsize=None)
def _rules(path: str | None = None) -> tuple[tuple[re.Pattern, str], ...]:
    rules = []
    for line in Path(path or _MAP_FILE).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pattern, _, cls = line.partition("\t")
        rules.append((re.compile(pattern.strip(), re.IGNORECASE), cls.strip()))
    return tuple(rules)


def class_of_item(name: str, tags: tuple[str, ...] = ()) -> str | None:
    """ScanNet-20 class name of a furniture item, or None (no ground truth) when unmapped/ignored."""
    for text in (name, " ".join(tags)):
        for rx, cls in _rules():
            if rx.search(text):
                return None if cls == "-" else cls
    return None


def class_id(name: str | None, names: tuple[str, ...] | None = None) -> int:
    """Label id of a class name; None → ``IGNORE_LABEL``."""
    if name is None:
        return IGNORE_LABEL
    names = names or class_names()
    if name not in names:
        raise ValueError(f"class {name!r} not in the label table {names}")
    return names.index(name)
