"""Real-depth sanity check of camera.backproject on the Middlebury 2014 'motorcycle' pair (scikit-image).

skimage.data.stereo_motorcycle() is already downsampled 4× and its documented calibration
(f=994.978 px, cx=311.193, cy=254.877, doffs=31.086 px, baseline 193.001 mm) is valid for the
downsampled 741×500 images, so no rescaling of f/cx/cy is needed (asserted below).
Depth: Z = f·B / (d + doffs).
"""
import numpy as np
import pytest

skdata = pytest.importorskip("skimage.data")

F, CX, CY, DOFFS, BASELINE_M = 994.978, 311.193, 254.877, 31.086, 0.193001


def test_motorcycle_disparity_backprojects_to_plausible_depth():
    from geopurify_ros.camera import CameraModel, backproject

    left, _, disp = skdata.stereo_motorcycle()
    assert left.shape[:2] == disp.shape == (500, 741)  # the size the calibration is valid for
    valid = np.isfinite(disp) & (disp > 0)
    assert valid.mean() > 0.9
    depth = np.full(disp.shape, np.nan, np.float32)
    depth[valid] = F * BASELINE_M / (disp[valid] + DOFFS)
    cam = CameraModel(width=741, height=500, fx=F, fy=F, cx=CX, cy=CY)
    pts, pix, z = backproject(depth, cam, np.eye(4), min_depth=0.1, max_depth=8.0)
    assert len(pts) == valid.sum()
    z = z.numpy()
    # The scene (motorbike in front of a wall) spans ~2.1–5.0 m; the farthest valid pixel is at 5.017 m.
    assert np.mean((z >= 2.1) & (z <= 5.0)) > 0.999
    assert z.min() > 2.1 and z.max() < 5.1
    # Identity pose: world = optical frame; the lateral extent matches the pinhole model at the image corners.
    assert np.allclose(pts[:, 2].numpy(), z)
    x_over_z = pts[:, 0].numpy() / z
    assert np.isclose(x_over_z.min(), (pix[:, 1].min().item() - CX) / F, atol=1e-3)
