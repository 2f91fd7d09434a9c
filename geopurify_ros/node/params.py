"""Parameters of the `geopurify_mapping` node: one table, declared with descriptors, validated at startup.

Pipeline keys are exactly the fields of `PipelineConfig` (validated by `PipelineConfig.validate`);
node-only keys live in `NodeConfig` (validated by `NodeConfig.validate`). `PARAMS` is the single
table the node declares from and `docs/NODE.md` documents (`markdown_table()`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from geopurify_ros.config import ParamConfig, PipelineConfig
from geopurify_ros.node.pose_source import POSE_SOURCES, extrinsic_from_param

COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8")
DEPTH_ENCODINGS = ("16UC1", "32FC1")
CLOUD_COLORS = ("semantic", "rgb")


@dataclass
class NodeConfig(ParamConfig):
    """ROS-side settings of the mapping node (topics, frames, QoS, sync, keyframes, worker, outputs)."""

    color_topic: str = "/camera/color/image_raw"
    depth_topic: str = "/camera/depth/image_raw"
    camera_info_topic: str = "/camera/color/camera_info"
    pose_source: str = "pose"                 # pose | odometry | tf
    pose_topic: str = "/camera/pose"
    odom_topic: str = "/odom"
    map_frame: str = "map"
    camera_frame: str = ""                    # "" = image header frame_id (tf source)
    base_to_camera: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    color_encoding: str = ""                  # "" = any supported; else required encoding
    depth_encoding: str = ""                  # "" = any supported; else required encoding
    sensor_qos: str = "best_effort"           # best_effort | reliable
    sync_slop_s: float = 0.05
    sync_queue_size: int = 10
    pose_max_age_s: float = 0.1
    pose_buffer_s: float = 5.0
    max_time_jump_s: float = 2.0
    keyframe_min_translation_m: float = 0.05
    keyframe_min_rotation_deg: float = 5.0
    keyframe_max_interval_s: float = 1.0
    queue_size: int = 4
    purify_period_s: float = 1.0
    cloud_color: str = "semantic"             # semantic (palette by label) | rgb (camera colour)
    cloud_transient_local: bool = True
    publish_query_markers: bool = True
    publish_diagnostics: bool = True
    diagnostics_period_s: float = 1.0
    warn_throttle_s: float = 5.0
    torch_threads: int = 0                    # 0 = torch default (one per core)

    def validate(self) -> None:
        """Raise ValueError naming the first bad parameter."""
        need = self._need

        for topic in ("color_topic", "depth_topic", "camera_info_topic"):
            need(bool(getattr(self, topic).strip()), topic, "must not be empty")
        need(self.pose_source in POSE_SOURCES, "pose_source", "must be one of " + ", ".join(POSE_SOURCES))
        need(self.pose_source != "pose" or bool(self.pose_topic.strip()), "pose_topic", "must not be empty")
        need(self.pose_source != "odometry" or bool(self.odom_topic.strip()), "odom_topic", "must not be empty")
        need(bool(self.map_frame.strip()), "map_frame", "must not be empty")
        extrinsic_from_param(self.base_to_camera)
        need(self.color_encoding in ("",) + COLOR_ENCODINGS, "color_encoding",
             "must be '' or one of " + ", ".join(COLOR_ENCODINGS))
        need(self.depth_encoding in ("",) + DEPTH_ENCODINGS, "depth_encoding",
             "must be '' or one of " + ", ".join(DEPTH_ENCODINGS))
        need(self.sensor_qos in ("best_effort", "reliable"), "sensor_qos", "must be 'best_effort' or 'reliable'")
        need(self.sync_slop_s >= 0, "sync_slop_s", "must be >= 0")
        need(self.sync_queue_size >= 1, "sync_queue_size", "must be >= 1")
        need(self.pose_max_age_s > 0, "pose_max_age_s", "must be > 0")
        need(self.pose_buffer_s > 0, "pose_buffer_s", "must be > 0")
        need(self.max_time_jump_s > 0, "max_time_jump_s", "must be > 0")
        need(self.keyframe_min_translation_m >= 0, "keyframe_min_translation_m", "must be >= 0")
        need(0 <= self.keyframe_min_rotation_deg <= 180, "keyframe_min_rotation_deg", "must be in [0, 180]")
        need(self.keyframe_max_interval_s >= 0, "keyframe_max_interval_s", "must be >= 0 (0 = no time trigger)")
        need(self.queue_size >= 1, "queue_size", "must be >= 1")
        need(self.purify_period_s > 0, "purify_period_s", "must be > 0")
        need(self.cloud_color in CLOUD_COLORS, "cloud_color", "must be one of " + ", ".join(CLOUD_COLORS))
        need(self.diagnostics_period_s > 0, "diagnostics_period_s", "must be > 0")
        need(self.warn_throttle_s >= 0, "warn_throttle_s", "must be >= 0")
        need(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch default)")


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    range: tuple[float, float] | None = None   # inclusive numeric range for the descriptor
    read_only: bool = True
    scope: str = "node"                        # node | pipeline


_PIPELINE_DOC = {
    "device": ("Torch device: auto (cuda if available), cpu, cuda, cuda:N", None),
    "feature_backend": ("Vision-language feature backend: lseg (default, trained here), conse or open_clip", None),
    "feature_model": ("Backend-specific model name ('' = backend default)", None),
    "feature_pretrained": ("open_clip pretrained tag or checkpoint path", None),
    "feature_image_width": ("Resize colour to this width before encoding (0 = backend default)", (0, 4096)),
    "feature_compile": ("lseg: torch.compile the image encoder in a background thread (~15 % faster per frame on "
                        "CPU once built; needs a C++ compiler; eager until ready or if it fails)", None),
    "voxel_size": ("Voxel edge length [m]", (0.005, 1.0)),
    "max_voxels": ("Voxel budget; beyond it voxels are evicted", (1, 50_000_000)),
    "eviction": ("Eviction policy when the budget is full: farthest | lru", None),
    "stride": ("Pixel stride for back-projection", (1, 64)),
    "min_depth": ("Minimum depth used for fusion [m]", (0.0, 100.0)),
    "max_depth": ("Maximum depth used for fusion [m]", (0.0, 100.0)),
    "depth_weighting": ("Fusion weights: depth (closer = heavier) | uniform", None),
    "depth_guide_sigma": ("Depth-guided feature sampling: a feature cell's weight for a point falls with "
                          "|z - z_cell| / (sigma z) (joint bilateral upsampling); 0 = plain bilinear", (0.0, 10.0)),
    "purify_mode": ("Feature purification: raw | purified | pooled", None),
    "student_checkpoint": ("Student affinity network checkpoint ('' = shipped checkpoint)", None),
    "pooling_iterations": ("Geometry-guided pooling iterations", (0, 100)),
    "pooling_radius": ("Pooling neighbourhood radius in voxels (1 = 26 neighbours, 2 = 5x5x5 cube)", (1, 8)),
    "pooling_temperature": ("Affinity softmax temperature", (1e-6, 100.0)),
    "affinity_threshold": ("Minimum student affinity for pooling neighbours", (-1.0, 1.0)),
    "color_gate": ("Gate pooling affinities by colour similarity", None),
    "normal_gate": ("Gate pooling affinities by normal similarity", None),
    "class_names": ("Closed-set label table (label id = index)", None),
    "prompt_templates": ("Text prompt templates with one {} ([] = the backend's own, which match its image side; recommended)", None),
    "query_negatives": ("Canonical negative prompts used to calibrate query scores", None),
    "query_threshold": ("Default minimum calibrated query score", (0.0, 1.0)),
    "query_max_points": ("Default cap on points returned by ~/query", (1, 100_000_000)),
    "cloud_min_observations": ("Voxels observed fewer times are left out of ~/labelled_cloud", (1, 1_000_000)),
}

_NODE_DOC = {
    "color_topic": ("Colour image topic (sensor_msgs/Image rgb8|bgr8|rgba8|bgra8)", None),
    "depth_topic": ("Depth image topic (sensor_msgs/Image 16UC1 mm | 32FC1 m), registered to colour", None),
    "camera_info_topic": ("CameraInfo of the colour camera (latest is used)", None),
    "pose_source": ("Where camera poses come from: pose | odometry | tf", None),
    "pose_topic": ("geometry_msgs/PoseStamped of the camera optical frame in map_frame (pose_source=pose)", None),
    "odom_topic": ("nav_msgs/Odometry of the robot base (pose_source=odometry)", None),
    "map_frame": ("World frame of the map, the clouds and the markers", None),
    "camera_frame": ("Camera optical frame for tf lookups ('' = colour image header frame_id)", None),
    "base_to_camera": ("Static base->camera optical extrinsic for odometry: x,y,z,qx,qy,qz,qw", None),
    "color_encoding": ("Required colour encoding ('' = any supported)", None),
    "depth_encoding": ("Required depth encoding ('' = any supported)", None),
    "sensor_qos": ("QoS of sensor subscriptions: best_effort (sensor data) | reliable (bag replay)", None),
    "sync_slop_s": ("Max colour/depth stamp difference for a pair [s]", (0.0, 10.0)),
    "sync_queue_size": ("Unmatched messages kept per stream by the synchroniser", (1, 1000)),
    "pose_max_age_s": ("Reject frames whose nearest pose is farther than this [s]", (1e-6, 60.0)),
    "pose_buffer_s": ("History of poses kept for stamp lookups [s]", (1e-3, 600.0)),
    "max_time_jump_s": ("Stamps further ahead of the node clock are dropped (stamp_future); a stream stepping "
                        "back further, or the clock going back, clears poses, sync and keyframe gate [s]",
                        (1e-3, 1e9)),
    "keyframe_min_translation_m": ("Keyframe when moved at least this far since the last one [m]", (0.0, 100.0)),
    "keyframe_min_rotation_deg": ("Keyframe when rotated at least this much since the last one [deg]", (0.0, 180.0)),
    "keyframe_max_interval_s": ("Keyframe at least this often regardless of motion [s] (0 = off)", (0.0, 3600.0)),
    "queue_size": ("Keyframes waiting for the worker; the oldest is dropped when full", (1, 1000)),
    "purify_period_s": ("Period of incremental purification + cloud publishing [s]", (1e-3, 3600.0)),
    "cloud_color": ("Colour in ~/labelled_cloud rgb: semantic (label palette, = ~/class_names colors) | rgb "
                    "(camera)", None),
    "cloud_transient_local": ("Publish ~/labelled_cloud transient-local (latched)", None),
    "publish_query_markers": ("Publish ~/query_markers (MarkerArray of the last query's matches)", None),
    "publish_diagnostics": ("Publish /diagnostics", None),
    "diagnostics_period_s": ("Period of /diagnostics [s]", (1e-3, 3600.0)),
    "warn_throttle_s": ("Minimum interval between warnings of one drop reason [s]", (0.0, 3600.0)),
    "torch_threads": ("CPU threads for features, fusion and purification (0 = torch default, one per core; fewer leaves cores to the camera driver and other nodes)", (0, 1024)),
}


def _specs() -> list[ParamSpec]:
    specs = []
    pipe_defaults = PipelineConfig().to_dict()
    for name in PipelineConfig.field_names():
        desc, rng = _PIPELINE_DOC.get(name, (name.replace("_", " "), None))
        specs.append(ParamSpec(name, pipe_defaults[name], desc, rng, scope="pipeline"))
    node_defaults = dataclasses.asdict(NodeConfig())
    for name in NodeConfig.field_names():
        desc, rng = _NODE_DOC.get(name, (name.replace("_", " "), None))
        specs.append(ParamSpec(name, node_defaults[name], desc, rng, scope="node"))
    return specs


PARAMS: list[ParamSpec] = _specs()


def split_params(values: dict[str, Any]) -> tuple[PipelineConfig, NodeConfig]:
    """Validated (PipelineConfig, NodeConfig) from a flat name->value dict; ValueError names the parameter."""
    pipe = {k: values[k] for k in PipelineConfig.field_names() if k in values}
    for k, v in list(pipe.items()):
        if isinstance(v, tuple):
            pipe[k] = list(v)
    pcfg = PipelineConfig.from_dict(pipe)
    ncfg = NodeConfig.from_dict({k: values[k] for k in NodeConfig.field_names() if k in values})
    return pcfg, ncfg


def _descriptor(spec: ParamSpec):
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType

    d = spec.default
    if isinstance(d, bool):
        ptype = ParameterType.PARAMETER_BOOL
    elif isinstance(d, int):
        ptype = ParameterType.PARAMETER_INTEGER
    elif isinstance(d, float):
        ptype = ParameterType.PARAMETER_DOUBLE
    elif isinstance(d, str):
        ptype = ParameterType.PARAMETER_STRING
    elif isinstance(d, list) and (not d or isinstance(d[0], str)):
        ptype = ParameterType.PARAMETER_STRING_ARRAY
    else:
        ptype = ParameterType.PARAMETER_DOUBLE_ARRAY
    desc = ParameterDescriptor(type=ptype, description=spec.description, read_only=spec.read_only)
    if spec.range is not None and ptype == ParameterType.PARAMETER_INTEGER:
        desc.integer_range = [IntegerRange(from_value=int(spec.range[0]), to_value=int(spec.range[1]), step=0)]
    elif spec.range is not None and ptype == ParameterType.PARAMETER_DOUBLE:
        desc.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                        to_value=float(spec.range[1]), step=0.0)]
    return desc


def _int_for_float(default: Any, value: Any) -> bool:
    """YAML `1` for a float parameter (or [0, 0, 1] for a float list): accepted and converted."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)
    if isinstance(default, float):
        return is_int(value)
    if isinstance(default, list) and default and isinstance(default[0], float):
        return value is not None and not isinstance(value, (str, bytes)) and hasattr(value, "__len__") \
            and len(value) > 0 and all(is_int(x) for x in value)
    return False


def declare_and_read(node) -> dict[str, Any]:
    """Declare every parameter of PARAMS on `node` and return name->value.

    Raises ValueError naming the parameter for a wrong type or an out-of-range value in the
    overrides (rclpy's own exceptions do not always say which file entry was at fault).
    """
    from rclpy.exceptions import (InvalidParameterTypeException, InvalidParameterValueException,
                                  ParameterUninitializedException)

    overrides = getattr(node, "_parameter_overrides", {}) or {}
    values: dict[str, Any] = {}
    for spec in PARAMS:
        default = list(spec.default) if isinstance(spec.default, list) else spec.default
        ov = overrides.get(spec.name)
        # An empty YAML list arrives as a NOT_SET override: treat it as [] for list parameters.
        empty_list = isinstance(default, list) and ov is not None and ov.value is None
        if ov is not None and _int_for_float(default, ov.value):
            from rclpy.parameter import Parameter
            if isinstance(default, float):
                overrides[spec.name] = Parameter(spec.name, Parameter.Type.DOUBLE, float(ov.value))
            else:
                overrides[spec.name] = Parameter(spec.name, Parameter.Type.DOUBLE_ARRAY,
                                                 [float(x) for x in ov.value])
        try:
            p = node.declare_parameter(spec.name, [] if empty_list else default, _descriptor(spec),
                                       ignore_override=empty_list)
            value = p.value
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            raise ValueError(f"{spec.name}: {exc}") from None
        except ParameterUninitializedException:
            value = default
        if isinstance(value, (tuple,)) or type(value).__name__ == "array":
            value = list(value)
        values[spec.name] = value
    return values


def markdown_table() -> str:
    """Parameter table for docs/NODE.md / README."""
    def fmt(v: Any) -> str:
        if isinstance(v, list):
            s = "[" + ", ".join(repr(x) if isinstance(x, str) else f"{x:g}" for x in v) + "]"
            return f"`{s}`" if len(s) < 60 else f"`{s[:56]}...]`"
        if isinstance(v, str):
            return f"`'{v}'`"
        return f"`{v}`"

    lines = ["| Parameter | Default | Range | Description |", "|---|---|---|---|"]
    for s in PARAMS:
        rng = f"[{s.range[0]:g}, {s.range[1]:g}]" if s.range else ""
        desc = s.description.replace("|", "\\|")
        lines.append(f"| `{s.name}` | {fmt(s.default)} | {rng} | {desc} ({s.scope}) |")
    return "\n".join(lines)
