"""ROS messages <-> numpy for the mapping node.

Decoding goes through `geopurify_ros.image_codec` / `geopurify_ros.camera` / `geopurify_ros.pointcloud2`;
this module only checks the message-level contract (encodings, sizes, step/data length, content)
and maps every failure to a `FrameRejected(reason)` whose `reason` is a diagnostics counter key.
ROS message classes are imported lazily so the checks can be unit-tested with duck-typed objects.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from geopurify_ros import image_codec
from geopurify_ros.camera import CameraModel, count_fusable_depth
from geopurify_ros.ros_time import sec_to_stamp, stamp_to_sec  # noqa: F401  (part of this module's API)

COLOR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8")
DEPTH_ENCODINGS = ("16UC1", "32FC1")

# Drop reasons counted by the node (diagnostics keys are "dropped.<reason>").
DROP_REASONS = (
    "bad_encoding", "bad_data", "size_mismatch", "invalid_depth", "no_camera_info", "bad_camera_info",
    "camera_info_mismatch", "no_pose", "pose_stale", "pose_out_of_order", "pose_invalid",
    "pose_wrong_frame", "no_camera_frame", "sync_unmatched", "queue_full", "worker_error",
    "depth_out_of_range", "stamp_future",
)


class FrameRejected(ValueError):
    """Input that must be dropped; `reason` is one of DROP_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_image_header(msg: Any, what: str) -> None:
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise FrameRejected("bad_data", f"{what}: empty image {w}x{h}")
    n = len(msg.data)
    if step <= 0 or n != step * h:
        raise FrameRejected("bad_data", f"{what}: data length {n} != height {h} x step {step}")


def _decode_image(msg: Any, what: str, encodings, required_encoding: str, decode) -> np.ndarray:
    """Check encoding and header of an Image, then decode its payload; FrameRejected names the reason."""
    enc = msg.encoding
    if enc not in encodings or (required_encoding and enc != required_encoding):
        want = required_encoding or "|".join(encodings)
        raise FrameRejected("bad_encoding", f"{what} encoding '{enc}', expected {want}")
    _check_image_header(msg, what)
    try:
        return decode(msg.data, enc, msg.height, msg.width, msg.step)
    except ValueError as exc:
        raise FrameRejected("bad_data", f"{what}: {exc}") from None


def decode_color_msg(msg: Any, required_encoding: str = "") -> np.ndarray:
    """sensor_msgs/Image -> uint8 (H, W, 3) RGB."""
    return _decode_image(msg, "colour", COLOR_ENCODINGS, required_encoding, image_codec.decode_color)


def decode_depth_msg(msg: Any, required_encoding: str = "") -> np.ndarray:
    """sensor_msgs/Image (16UC1 mm / 32FC1 m) -> float32 (H, W) metres, NaN invalid."""
    return _decode_image(msg, "depth", DEPTH_ENCODINGS, required_encoding,
                         lambda *a: image_codec.decode_depth(*a, is_bigendian=bool(msg.is_bigendian)))


def camera_info_to_model(msg: Any) -> CameraModel:
    try:
        return CameraModel.from_camera_info(msg)
    except (ValueError, TypeError) as exc:
        raise FrameRejected("bad_camera_info", f"camera_info: {exc}") from None


def decode_rgbd(color_msg: Any, depth_msg: Any, cam: CameraModel | None, color_encoding: str = "",
                depth_encoding: str = "", depth_range: tuple[int, float, float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Validate and decode one synchronised pair; FrameRejected on any problem (nothing is fused then).

    `depth_range` = (stride, min_depth, max_depth) of the fusion: a frame none of whose stride-grid
    pixels lies in that range would fuse nothing, so it is rejected (`depth_out_of_range`)."""
    if cam is None:
        raise FrameRejected("no_camera_info", "no CameraInfo received yet")
    if (color_msg.height, color_msg.width) != (depth_msg.height, depth_msg.width):
        raise FrameRejected("size_mismatch", f"colour {color_msg.width}x{color_msg.height} vs depth "
                            f"{depth_msg.width}x{depth_msg.height} (register depth to colour)")
    if (cam.height, cam.width) != (color_msg.height, color_msg.width):
        raise FrameRejected("camera_info_mismatch", f"CameraInfo {cam.width}x{cam.height} vs image "
                            f"{color_msg.width}x{color_msg.height}")
    rgb = decode_color_msg(color_msg, color_encoding)
    depth = decode_depth_msg(depth_msg, depth_encoding)
    if not np.isfinite(depth).any():
        raise FrameRejected("invalid_depth", "depth image has no valid pixel")
    if depth_range is not None and count_fusable_depth(depth, *depth_range) == 0:
        stride, lo, hi = depth_range
        raise FrameRejected("depth_out_of_range", f"no depth pixel (stride {stride}) within [min_depth, max_depth] = "
                            f"[{lo:g}, {hi:g}] m (check the depth encoding / units)")
    return rgb, depth


# ---------------------------------------------------------------- outgoing messages

def cloud_to_msg(cloud: np.ndarray, frame_id: str, stamp: Any) -> Any:
    from geopurify_ros import pointcloud2
    return pointcloud2.to_msg(cloud, frame_id, stamp)   # real sensor_msgs/PointCloud2


def class_list_msg(names: Iterable[str], frame_id: str, stamp: Any) -> Any:
    """ClassList: the label names and their palette colours (the legend of a semantic cloud)."""
    from std_msgs.msg import ColorRGBA

    from geopurify_ros.msg import ClassList
    from geopurify_ros.palette import label_colors
    msg = ClassList()
    msg.header.frame_id = frame_id
    msg.header.stamp = stamp
    msg.names = [str(n) for n in names]
    msg.colors = [ColorRGBA(r=r / 255.0, g=g / 255.0, b=b / 255.0, a=1.0)
                  for r, g, b in label_colors(len(msg.names))[:-1].tolist()]
    return msg


def fill_query_response(response: Any, result: Any, frame_id: str, stamp: Any) -> Any:
    """Copy a pipeline QueryResult into a TextQuery.Response."""
    response.success = True
    response.message = str(getattr(result, "message", "") or f"{len(result.scores)} matches")
    response.matches = cloud_to_msg(result.cloud, frame_id, stamp)
    response.scores = [float(s) for s in np.asarray(result.scores, dtype=np.float32)]
    response.labels = [str(x) for x in result.labels]
    response.class_names = [str(x) for x in result.class_names]
    return response


def query_markers(cloud: np.ndarray, frame_id: str, stamp: Any, text: str, voxel_size: float) -> Any:
    """MarkerArray: DELETEALL, then one CUBE_LIST of the matched voxels coloured by score (red=high)."""
    from geometry_msgs.msg import Point
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker, MarkerArray

    clear = Marker()
    clear.header.frame_id = frame_id
    clear.header.stamp = stamp
    clear.action = Marker.DELETEALL
    m = Marker()
    m.header.frame_id = frame_id
    m.header.stamp = stamp
    m.ns = "query"
    m.id = 0
    m.type = Marker.CUBE_LIST
    m.action = Marker.ADD
    m.pose.orientation.w = 1.0
    m.scale.x = m.scale.y = m.scale.z = float(voxel_size)
    m.text = text
    n = len(cloud)
    if n:
        xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float64)
        s = cloud["score"].astype(np.float64) if "score" in cloud.dtype.names else np.ones(n)
        m.points = [Point(x=p[0], y=p[1], z=p[2]) for p in xyz]
        m.colors = [ColorRGBA(r=float(v), g=float(1 - v), b=0.0, a=0.9) for v in np.clip(s, 0, 1)]
    else:
        m.action = Marker.DELETE
    return MarkerArray(markers=[clear, m])


def diagnostics_msg(node_name: str, hardware_id: str, values: Mapping[str, Any], stamp: Any,
                    level: int = 0, message: str = "ok") -> Any:
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

    st = DiagnosticStatus()
    st.level = bytes([level]) if isinstance(DiagnosticStatus().level, bytes) else level
    st.name = f"{node_name}: mapping"
    st.hardware_id = hardware_id
    st.message = message
    st.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
    arr = DiagnosticArray()
    arr.header.stamp = stamp
    arr.status = [st]
    return arr


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def diagnostics_values(msg: Any) -> dict[str, str]:
    """Flatten a DiagnosticArray's key/values (for clients and tests)."""
    out: dict[str, str] = {}
    for st in msg.status:
        for kv in st.values:
            out[kv.key] = kv.value
    return out


# ---------------------------------------------------------------- numpy -> sensor messages (players, tests, bench)

def image_msg(array: np.ndarray, kind: str, stamp: Any, frame_id: str, encoding: str) -> Any:
    """uint8 RGB (kind='color') or float metres (kind='depth') -> sensor_msgs/Image via image_codec."""
    from sensor_msgs.msg import Image
    arr = np.asarray(array)
    enc, step, data = (image_codec.encode_color(arr, encoding) if kind == "color"
                       else image_codec.encode_depth(arr, encoding))
    msg = Image(encoding=enc, height=arr.shape[0], width=arr.shape[1], step=step, is_bigendian=0)
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.data = data
    return msg


def camera_info_msg(cam: CameraModel, stamp: Any, frame_id: str) -> Any:
    from sensor_msgs.msg import CameraInfo
    msg = CameraInfo(width=cam.width, height=cam.height, distortion_model=cam.distortion_model or "plumb_bob")
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.k = [float(x) for x in cam.k.reshape(-1)]
    msg.d = [float(x) for x in cam.d] or [0.0] * 5
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [cam.fx, 0.0, cam.cx, 0.0, 0.0, cam.fy, cam.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def pose_stamped_msg(T_world_cam: np.ndarray, stamp: Any, frame_id: str) -> Any:
    from geometry_msgs.msg import PoseStamped

    from geopurify_ros.camera import matrix_to_pose
    p, q = matrix_to_pose(T_world_cam)
    msg = PoseStamped()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = (float(v) for v in p)
    o = msg.pose.orientation
    o.x, o.y, o.z, o.w = (float(v) for v in q)
    return msg
