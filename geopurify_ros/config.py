"""Pipeline configuration: one dataclass, loaded from the node's ROS parameter YAML.

`config/mapping.yaml` is the single file of defaults for users; the node declares each field below
as a ROS parameter and the offline tools (evaluator, benchmarks) read the same file through
`PipelineConfig.from_yaml`, so the deployed node and the evaluation run the same settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCANNET20 = [
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink",
    "bathtub", "otherfurniture",
]


class ParamConfig:
    """Base of the flat parameter dataclasses (pipeline, node): validated on construction, loaded from
    a flat name -> value dict, errors name the parameter."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def _need(self, cond: bool, name: str, why: str) -> None:
        if not cond:
            raise ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, params: dict[str, Any], strict: bool = False):
        """Build from a flat parameter dict; unknown keys are ignored unless `strict`."""
        known = set(cls.field_names())
        unknown = sorted(set(params) - known)
        if strict and unknown:
            raise ValueError(f"{unknown[0]}: unknown parameter")
        return cls(**{k: v for k, v in params.items() if k in known})


@dataclass
class PipelineConfig(ParamConfig):
    """Settings of the ROS-free mapping pipeline (feature extraction, fusion, purification, queries)."""

    device: str = "auto"
    # Vision-language features
    feature_backend: str = "lseg"           # lseg | conse | open_clip
    feature_model: str = ""                 # backend-specific model name ("" = backend default)
    feature_pretrained: str = ""            # open_clip pretrained tag or checkpoint path
    feature_image_width: int = 0            # resize colour to this width before encoding (0 = backend default)
    feature_compile: bool = False           # lseg: torch.compile the encoder in the background (features/compiled.py)
    # Voxel map and fusion
    voxel_size: float = 0.05
    max_voxels: int = 500_000
    eviction: str = "farthest"              # farthest | lru
    stride: int = 2
    min_depth: float = 0.2
    max_depth: float = 6.0
    depth_weighting: str = "depth"          # depth | uniform
    depth_guide_sigma: float = 0.03         # depth-guided feature sampling (voxel_map.guided_corner_weights); 0 = bilinear
    # Purification (student affinities + geometry-guided pooling)
    purify_mode: str = "pooled"             # raw | purified | pooled
    student_checkpoint: str = ""            # "" = checkpoint shipped in the package
    pooling_iterations: int = 3
    pooling_radius: int = 1                 # pooling neighbourhood in voxels (1 = 26-ring, 2 = 5x5x5 cube, ...)
    pooling_temperature: float = 0.3
    affinity_threshold: float = 0.5
    color_gate: bool = True
    normal_gate: bool = True
    # Labels and queries
    class_names: list[str] = field(default_factory=lambda: list(SCANNET20))
    prompt_templates: list[str] = field(default_factory=list)   # [] = backend default templates
    query_negatives: list[str] = field(default_factory=lambda: ["object", "things", "stuff", "texture"])
    query_threshold: float = 0.3
    query_max_points: int = 50_000
    cloud_min_observations: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        need = self._need
        need(self.voxel_size > 0, "voxel_size", "must be > 0")
        need(self.max_voxels > 0, "max_voxels", "must be > 0")
        need(self.eviction in ("farthest", "lru"), "eviction", "must be 'farthest' or 'lru'")
        need(self.stride >= 1, "stride", "must be >= 1")
        need(0 <= self.min_depth < self.max_depth, "min_depth", "must satisfy 0 <= min_depth < max_depth")
        need(self.depth_weighting in ("depth", "uniform"), "depth_weighting", "must be 'depth' or 'uniform'")
        need(math.isfinite(self.depth_guide_sigma) and self.depth_guide_sigma >= 0, "depth_guide_sigma",
             "must be >= 0 (0 = plain bilinear sampling)")
        need(self.purify_mode in ("raw", "purified", "pooled"), "purify_mode", "must be raw, purified or pooled")
        need(self.pooling_iterations >= 0, "pooling_iterations", "must be >= 0")
        need(int(self.pooling_radius) == self.pooling_radius and self.pooling_radius >= 1, "pooling_radius",
             "must be an integer >= 1")
        need(self.pooling_temperature > 0, "pooling_temperature", "must be > 0")
        need(-1.0 <= self.affinity_threshold <= 1.0, "affinity_threshold", "must be in [-1, 1]")
        need(len(self.class_names) >= 2, "class_names", "needs at least two classes")
        need(all(isinstance(c, str) and c.strip() for c in self.class_names), "class_names", "entries must be non-empty strings")
        need(0.0 <= self.query_threshold <= 1.0, "query_threshold", "must be in [0, 1]")
        need(self.query_max_points > 0, "query_max_points", "must be > 0")
        need(self.feature_image_width >= 0, "feature_image_width", "must be >= 0")
        need(self.cloud_min_observations >= 1, "cloud_min_observations", "must be >= 1")

    @classmethod
    def from_yaml(cls, path: str | Path, node_name: str = "geopurify_mapping") -> "PipelineConfig":
        return cls.from_dict(load_ros_params(path, node_name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_ros_params(path: str | Path, node_name: str = "geopurify_mapping") -> dict[str, Any]:
    """Read the `ros__parameters` of `node_name` (or of the `/**` wildcard) from a ROS 2 params file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"params file: {path} does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ValueError(f"params file: {path} is not a mapping")
    params: dict[str, Any] = {}
    for key in ("/**", node_name, "/" + node_name):
        section = doc.get(key)
        if isinstance(section, dict):
            params.update(section.get("ros__parameters", {}) or {})
    if not params and "ros__parameters" in doc:
        params = dict(doc["ros__parameters"])
    return params


def load_labels(path: str | Path, name: str = "labels") -> tuple[list[str], int]:
    """(class names in label-id order, ignore label) from a labels file such as `config/labels.yaml`.

    `name` is the parameter or flag the path came from; ValueError messages start with it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{name}: {p} does not exist")
    doc = yaml.safe_load(p.read_text()) or {}
    classes = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(classes, list) or len(classes) < 2:
        raise ValueError(f"{name}: {p} needs a 'classes' list with at least two names")
    return [str(c) for c in classes], int(doc.get("ignore_label", 65535))
