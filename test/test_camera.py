import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from geopurify_ros.camera import (Q_BODY_OPTICAL, R_BODY_OPTICAL, CameraModel, backproject, matrix_to_pose,
                                  pose_to_matrix)

CAM = CameraModel(640, 480, 500.0, 510.0, 320.0, 240.0)


def test_from_camera_info_and_k():
    info = SimpleNamespace(width=640, height=480, k=[500, 0, 320, 0, 510, 240, 0, 0, 1], d=[0.0] * 5,
                           distortion_model="plumb_bob")
    cam = CameraModel.from_camera_info(info)
    assert (cam.fx, cam.fy, cam.cx, cam.cy) == (500, 510, 320, 240)
    assert not cam.has_distortion
    np.testing.assert_array_equal(cam.k, np.array(info.k, float).reshape(3, 3))
    assert CameraModel.from_k(cam.k, 640, 480) == CameraModel(640, 480, 500, 510, 320, 240)
    # rosbags hands out numpy arrays; ROS may leave d empty.
    info_np = SimpleNamespace(width=640, height=480, k=np.array(info.k, float), d=np.array([0.1, 0, 0, 0, 0.0]),
                              distortion_model="plumb_bob")
    assert CameraModel.from_camera_info(info_np).d == (0.1, 0, 0, 0, 0)
    info_np.d, info_np.distortion_model = np.zeros(0), ""
    assert CameraModel.from_camera_info(info_np).d == ()


def test_invalid_intrinsics_raise():
    with pytest.raises(ValueError, match="fx"):
        CameraModel(640, 480, 0.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="width"):
        CameraModel(0, 480, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="distortion_model"):
        CameraModel(640, 480, 1.0, 1.0, 1.0, 1.0, "equidistant", (0.1, 0, 0, 0))
    with pytest.raises(ValueError, match="k"):
        CameraModel.from_k(np.eye(2), 640, 480)


def test_scaled_keeps_pixel_centres():
    cam = CameraModel(640, 480, 500.0, 500.0, 319.5, 239.5)
    half = cam.scaled(320, 240)
    # The optical axis hits the exact image centre at both resolutions.
    assert (half.cx, half.cy) == (159.5, 119.5)
    assert half.fx == 250.0 and half.width == 320


def test_pose_to_matrix_rotation_and_normalisation():
    s = math.sqrt(0.5)
    T = pose_to_matrix([1, 2, 3], [0, 0, 2 * s, 2 * s])  # 90 deg about z, non-unit input
    np.testing.assert_allclose(T[:3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-12)
    np.testing.assert_allclose(T[:3, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="quaternion"):
        pose_to_matrix([0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="position"):
        pose_to_matrix([0, np.nan, 0], [0, 0, 0, 1])


def test_matrix_to_pose_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        q = q if q[3] >= 0 else -q
        p = rng.normal(size=3)
        p2, q2 = matrix_to_pose(pose_to_matrix(p, q))
        np.testing.assert_allclose(p2, p)
        np.testing.assert_allclose(q2, q, atol=1e-9)
    with pytest.raises(ValueError, match="T_world_cam"):
        matrix_to_pose(np.diag([1.0, 1.0, -1.0, 1.0]))


def test_optical_frame_constants_agree():
    T = pose_to_matrix([0, 0, 0], Q_BODY_OPTICAL)
    np.testing.assert_allclose(T[:3, :3], R_BODY_OPTICAL, atol=1e-12)
    # optical z (forward) is body x; optical y (down) is body -z.
    np.testing.assert_allclose(R_BODY_OPTICAL @ [0, 0, 1], [1, 0, 0])
    np.testing.assert_allclose(R_BODY_OPTICAL @ [0, 1, 0], [0, 0, -1])


def test_backproject_known_points_pose_and_stride():
    depth = torch.full((480, 640), 2.0)
    depth[0, 0] = float("nan")
    depth[0, 2] = 50.0  # beyond max_depth
    depth[2, 0] = 0.05  # below min_depth
    T = pose_to_matrix([1.0, 0.0, 0.0], [0, 0, 0, 1])
    pts, pix, z = backproject(depth, CAM, T, stride=2)
    assert pts.dtype == torch.float32 and pix.dtype == torch.long
    assert pts.shape[0] == 240 * 320 - 3
    assert bool((pix % 2 == 0).all())
    i = ((pix[:, 0] == 240) & (pix[:, 1] == 320)).nonzero().item()
    np.testing.assert_allclose(pts[i].numpy(), [1.0, 0.0, 2.0], atol=1e-6)
    j = ((pix[:, 0] == 250) & (pix[:, 1] == 420)).nonzero().item()
    np.testing.assert_allclose(pts[j].numpy(), [1.0 + 100 * 2 / 500, 10 * 2 / 510, 2.0], atol=1e-5)
    assert bool((z == 2.0).all())


def test_backproject_rejects_mismatch_and_bad_pose():
    with pytest.raises(ValueError, match=r"depth: expected \(480, 640\)"):
        backproject(torch.ones(240, 320), CAM, np.eye(4))
    with pytest.raises(ValueError, match="T_world_cam"):
        backproject(torch.ones(480, 640), CAM, np.full((4, 4), np.nan))
    pts, _, _ = backproject(torch.zeros(480, 640), CAM, np.eye(4), min_depth=0.0)
    assert pts.shape[0] == 0  # zero depth is never a measurement
    with pytest.raises(ValueError, match="depth: expected float metres"):
        backproject(torch.ones(480, 640, dtype=torch.int32), CAM, np.eye(4))
    with pytest.raises(ValueError, match="stride"):
        backproject(torch.ones(480, 640), CAM, np.eye(4), stride=0)


def test_plumb_bob_undistortion_inverts_distortion():
    cam = CameraModel(640, 480, 500.0, 500.0, 320.0, 240.0, "plumb_bob", (-0.28, 0.07, 1e-3, -5e-4, 0.0))
    rows, cols = torch.meshgrid(torch.arange(0, 480, 16.0), torch.arange(0, 640, 16.0), indexing="ij")
    x, y = cam.pixel_rays(rows, cols)
    xd, yd = cam.distort(x, y)
    np.testing.assert_allclose((xd * cam.fx + cam.cx).numpy(), cols.numpy(), atol=1e-2)
    np.testing.assert_allclose((yd * cam.fy + cam.cy).numpy(), rows.numpy(), atol=1e-2)
    # Barrel distortion: corner rays are wider than the pinhole ones.
    assert abs(float(x[0, 0])) > abs((0 - 320) / 500)
    pts, _, _ = backproject(torch.ones(480, 640), cam, np.eye(4), stride=8)
    assert torch.isfinite(pts).all()


@pytest.mark.parametrize("stride", [1, 3])
def test_backproject_cached_ray_grid_matches_direct_evaluation(stride):
    cam = CameraModel(64, 48, 50.0, 52.0, 31.0, 24.5, "plumb_bob", (-0.2, 0.05, 1e-3, -5e-4, 0.0))
    depth = torch.rand(48, 64, generator=torch.Generator().manual_seed(3)) * 3 + 0.05
    depth[5, :] = float("nan")
    T = pose_to_matrix([0.3, -1.0, 2.0], [0.1, 0.2, -0.3, 0.9])
    for _ in range(2):  # second call hits the per-camera cache
        pts, pix, z = backproject(depth, cam, T, stride=stride)
        sub = depth[::stride, ::stride]
        valid = (sub >= 0.1) & (sub <= 8.0)
        r, c = torch.meshgrid(torch.arange(0, 48, stride), torch.arange(0, 64, stride), indexing="ij")
        assert torch.equal(pix, torch.stack((r[valid], c[valid]), 1))
        assert torch.equal(z, sub[valid])
        xn, yn = cam.pixel_rays(r[valid].float(), c[valid].float())
        p_cam = torch.stack((xn * z, yn * z, z), 1).double()
        ref = p_cam @ torch.from_numpy(T[:3, :3]).T + torch.from_numpy(T[:3, 3])
        np.testing.assert_allclose(pts.numpy(), ref.numpy(), atol=1e-5)
    # An equal model (e.g. rebuilt from every CameraInfo) shares the cached grid; a different one does not.
    same = CameraModel(64, 48, 50.0, 52.0, 31.0, 24.5, "plumb_bob", (-0.2, 0.05, 1e-3, -5e-4, 0.0))
    assert torch.equal(backproject(depth, same, T, stride=stride)[0], pts)
    other = CameraModel(64, 48, 50.0, 52.0, 31.0, 24.5)
    assert not torch.equal(backproject(depth, other, T, stride=stride)[0], pts)
