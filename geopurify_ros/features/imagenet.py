"""ImageNet-1k class names (standard index order), shipped as `imagenet_classes.txt`."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CLASSES_FILE = Path(__file__).with_name("imagenet_classes.txt")


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 human-readable ImageNet-1k names; index i = logit i of an ImageNet classifier."""
    names = tuple(line.strip() for line in CLASSES_FILE.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"{CLASSES_FILE}: expected 1000 class names, found {len(names)}")
    return names
