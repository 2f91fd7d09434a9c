"""Pose buffer, interpolation and message pose sources (geopurify_ros/node/pose_source.py)."""
from types import SimpleNamespace as NS

import numpy as np
import pytest

from geopurify_ros.node.pose_source import (MessagePoseSource, PoseBuffer, PoseLookupError, TfPoseSource,
                                            TfUnavailable, extrinsic_from_param, matrix_to_quat, pose_matrix,
                                            quat_to_matrix, slerp, tf2_available)
from geopurify_ros.ros_time import sec_to_ns as ns


def yaw(deg, t=(0.0, 0.0, 0.0)):
    a = np.radians(deg)
    return pose_matrix(t, (0.0, 0.0, np.sin(a / 2), np.cos(a / 2)))


def test_quaternion_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q2 = matrix_to_quat(quat_to_matrix(q))
        assert min(np.abs(q - q2).max(), np.abs(q + q2).max()) < 1e-9
    mid = slerp(np.array([0, 0, 0, 1.0]), np.array([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]), 0.5)
    np.testing.assert_allclose(quat_to_matrix(mid), yaw(45)[:3, :3], atol=1e-9)


def test_interpolates_between_bracketing_poses():
    b = PoseBuffer(max_age_s=0.2)
    b.add(ns(1.0), yaw(0, (0, 0, 0)))
    b.add(ns(1.2), yaw(90, (2, 0, 0)))
    T = b.lookup(ns(1.05))
    np.testing.assert_allclose(T[:3, 3], [0.5, 0, 0], atol=1e-9)
    np.testing.assert_allclose(T[:3, :3], yaw(22.5)[:3, :3], atol=1e-9)
    np.testing.assert_allclose(b.lookup(ns(1.2)), yaw(90, (2, 0, 0)), atol=1e-12)   # exact stamp
    with pytest.raises(TypeError, match="nanoseconds"):
        b.lookup(1.2)                                                 # float seconds are a caller bug


def test_stamps_one_nanosecond_apart_are_distinct():
    # at 1.7e9 s a float64 second count cannot tell these apart; integer nanoseconds can
    t = 1_700_000_001_100_000_000
    b = PoseBuffer(max_age_s=0.1)
    b.add(t, yaw(0))
    b.add(t + 1, yaw(0, (1, 0, 0)))
    np.testing.assert_allclose(b.lookup(t + 1)[:3, 3], [1, 0, 0])
    with pytest.raises(PoseLookupError, match="not after"):
        b.add(t + 1, yaw(0))


def test_stale_empty_and_out_of_order():
    b = PoseBuffer(max_age_s=0.1)
    with pytest.raises(PoseLookupError) as e:
        b.lookup(ns(1.0))
    assert e.value.reason == "no_pose"
    b.add(ns(1.0), np.eye(4))
    b.add(ns(2.0), np.eye(4))
    np.testing.assert_allclose(b.lookup(ns(2.05)), np.eye(4))         # within max age past the end
    for stamp in (0.5, 2.5, 1.5):                                     # before, after, middle of a wide gap
        with pytest.raises(PoseLookupError) as e:
            b.lookup(ns(stamp))
        assert e.value.reason == "pose_stale"
    np.testing.assert_allclose(b.lookup(ns(1.08)), np.eye(4))         # near side of a wide gap
    with pytest.raises(PoseLookupError) as e:
        b.add(ns(1.5), np.eye(4))
    assert e.value.reason == "pose_out_of_order"
    with pytest.raises(PoseLookupError) as e:
        b.add(ns(3.0), np.full((4, 4), np.nan))
    assert e.value.reason == "pose_invalid"
    assert len(b) == 2


def test_buffer_keeps_only_the_horizon():
    b = PoseBuffer(max_age_s=0.1, horizon_s=1.0)
    for i in range(100):
        b.add(ns(i * 0.1), np.eye(4))
    assert len(b) <= 12
    with pytest.raises(PoseLookupError):
        b.lookup(0)
    b.clear()
    assert len(b) == 0
    b.add(0, np.eye(4))                                               # a cleared buffer accepts older stamps


def header(stamp, frame="map"):
    return NS(stamp=NS(sec=int(stamp), nanosec=int(round((stamp % 1) * 1e9))), frame_id=frame)


def pose(t, q):
    return NS(position=NS(x=t[0], y=t[1], z=t[2]), orientation=NS(x=q[0], y=q[1], z=q[2], w=q[3]))


def test_pose_stamped_source_and_frame_check():
    src = MessagePoseSource("pose", "map", PoseBuffer(0.1))
    src.on_message(NS(header=header(5.5), pose=pose((1, 2, 3), (0, 0, 0, 1))))
    np.testing.assert_allclose(src.lookup(ns(5.5))[:3, 3], [1, 2, 3])
    for frame in ("odom", "", "/"):                                   # wrong, empty
        with pytest.raises(PoseLookupError) as e:
            src.on_message(NS(header=header(6.0, frame), pose=pose((0, 0, 0), (0, 0, 0, 1))))
        assert e.value.reason == "pose_wrong_frame"
    assert len(src.buffer) == 1
    src.on_message(NS(header=header(6.0, "/map"), pose=pose((0, 0, 0), (0, 0, 0, 1))))   # leading slash is fine
    src.clear()
    assert len(src.buffer) == 0


@pytest.mark.parametrize("q", [(0, 0, 0, 0), (0.1, 0.2, 0.3, 0.4), (0, 0, 0, 1.0101), (0, 0, 0, 0.9899),
                               (0, 0, 0, float("nan")), (0, 0, float("inf"), 1)])
def test_non_unit_quaternion_is_rejected_not_normalised(q):
    src = MessagePoseSource("pose", "map", PoseBuffer(0.1))
    with pytest.raises(PoseLookupError) as e:
        src.on_message(NS(header=header(6.0), pose=pose((0, 0, 0), q)))
    assert e.value.reason == "pose_invalid" and "norm" in e.value.detail
    assert len(src.buffer) == 0


def test_quaternion_within_tf2_tolerance_is_accepted():
    src = MessagePoseSource("pose", "map", PoseBuffer(0.1))
    a = np.radians(30)
    for i, scale in enumerate((0.991, 1.0, 1.009)):          # | |q| - 1 | <= 0.01
        q = scale * np.array([0, 0, np.sin(a / 2), np.cos(a / 2)])
        src.on_message(NS(header=header(6.0 + i), pose=pose((0, 0, 0), q)))
        np.testing.assert_allclose(src.lookup(ns(6.0 + i))[:3, :3], yaw(30)[:3, :3], atol=1e-9)


def test_odometry_composes_base_to_camera():
    # camera 0.5 m ahead of the base, optical axes (z forward) aligned with base x.
    T_bc = extrinsic_from_param([0.5, 0, 0, -0.5, 0.5, -0.5, 0.5])
    src = MessagePoseSource("odometry", "map", PoseBuffer(0.1), T_bc)
    base = yaw(90, (1, 0, 0))                                          # base at (1,0,0) facing +y
    q = matrix_to_quat(base[:3, :3])
    src.on_message(NS(header=header(1.0), pose=NS(pose=pose(base[:3, 3], q)), child_frame_id="base_link"))
    T = src.lookup(ns(1.0))
    np.testing.assert_allclose(T[:3, 3], [1, 0.5, 0], atol=1e-9)       # camera ahead of the base along +y
    np.testing.assert_allclose(T[:3, 2], [0, 1, 0], atol=1e-9)         # optical z looks along +y
    with pytest.raises(ValueError, match="base_to_camera"):
        extrinsic_from_param([0, 0, 0])
    with pytest.raises(ValueError, match="base_to_camera"):
        extrinsic_from_param([0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="base_to_camera.*norm"):
        extrinsic_from_param([0, 0, 0, 0, 0, 0, 2.0])


@pytest.mark.skipif(tf2_available(), reason="tf2_ros is importable here; the error path is for its absence")
def test_tf_source_without_tf2_is_a_clear_error():
    with pytest.raises(TfUnavailable, match="tf2_ros"):
        TfPoseSource(node=None, map_frame="map", max_age_s=0.1)
