"""Message-level checks of the node (geopurify_ros/node/msg_convert.py): depth that would fuse nothing."""
import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg")

from geopurify_ros.camera import CameraModel  # noqa: E402
from geopurify_ros.node import msg_convert as mc  # noqa: E402
from geopurify_ros.ros_time import ns_to_stamp  # noqa: E402

CAM = CameraModel(8, 6, 5.0, 5.0, 3.5, 2.5)
RANGE = (2, 0.2, 6.0)                       # stride, min_depth, max_depth


def pair(depth, encoding="32FC1"):
    st = ns_to_stamp(1_700_000_001_100_000_000)
    rgb = np.zeros((6, 8, 3), np.uint8)
    return mc.image_msg(rgb, "color", st, "cam", "rgb8"), mc.image_msg(depth, "depth", st, "cam", encoding)


@pytest.mark.parametrize("value", [1e30, 1e-6, 6.5, 0.19])
def test_depth_with_no_pixel_in_range_is_rejected(value):
    c, d = pair(np.full((6, 8), value, np.float32))
    with pytest.raises(mc.FrameRejected) as e:
        mc.decode_rgbd(c, d, CAM, depth_range=RANGE)
    assert e.value.reason == "depth_out_of_range" and "[0.2, 6]" in e.value.detail
    mc.decode_rgbd(c, d, CAM)                # without a range only validity is checked


def test_in_range_pixels_off_the_stride_grid_fuse_nothing():
    depth = np.full((6, 8), 1e30, np.float32)
    depth[1::2, 1::2] = 2.0                  # stride 2 samples rows/cols 0, 2, 4, ...
    c, d = pair(depth)
    with pytest.raises(mc.FrameRejected, match="depth_out_of_range"):
        mc.decode_rgbd(c, d, CAM, depth_range=RANGE)
    depth[4, 6] = 2.0
    rgb, out = mc.decode_rgbd(*pair(depth), CAM, depth_range=RANGE)
    assert out.shape == (6, 8)


def test_no_finite_depth_is_still_invalid_depth():
    c, d = pair(np.full((6, 8), np.nan, np.float32))
    with pytest.raises(mc.FrameRejected) as e:
        mc.decode_rgbd(c, d, CAM, depth_range=RANGE)
    assert e.value.reason == "invalid_depth"


def test_pipeline_refuses_a_frame_that_would_fuse_nothing():
    from geopurify_ros.config import PipelineConfig
    from geopurify_ros.pipeline import MappingPipeline

    class Backend:                                   # never reached: the check runs before encoding
        name, dim, device = "stub", 4, "cpu"

        def encode_text(self, texts):
            import torch
            return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

        def encode_image(self, rgb):
            raise AssertionError("encoded a frame that fuses nothing")

    pipe = MappingPipeline(PipelineConfig(device="cpu"), backend=Backend(), student=None)
    with pytest.raises(ValueError, match="min_depth, max_depth"):
        pipe.process_frame(np.zeros((6, 8, 3), np.uint8), np.full((6, 8), 1e30, np.float32), CAM, np.eye(4), 1.0)
    assert pipe.stats()["frames_fused"] == 0 and pipe.stats()["voxels"] == 0
