"""The one label palette: distinct colours for any class count, shared by the node's cloud, the report
and the exports."""
import numpy as np
import pytest

from geopurify_ros.palette import UNKNOWN, colorize, colors_of, label_colors
from geopurify_ros.pointcloud2 import make_cloud, unpack_rgb


@pytest.mark.parametrize("n", [2, 20, 45])
def test_every_class_gets_its_own_colour_and_none_looks_unknown(n):
    pal = label_colors(n)
    assert pal.shape == (n + 1, 3) and pal.dtype == np.uint8
    assert tuple(pal[-1]) == UNKNOWN
    assert len({tuple(c) for c in pal}) == n + 1
    # far enough apart to tell in a legend (max channel difference)
    d = np.abs(pal[:, None, :].astype(int) - pal[None, :, :].astype(int)).max(-1)
    assert d[~np.eye(n + 1, dtype=bool)].min() >= 10
    np.testing.assert_array_equal(label_colors(n), pal)          # deterministic
    np.testing.assert_array_equal(label_colors(n + 5)[:n], pal[:n])   # a longer list keeps the colours


def test_colors_of_maps_out_of_range_labels_to_unknown():
    out = colors_of(np.array([0, 3, 20, 65535, -1]), 20)
    pal = label_colors(20)
    np.testing.assert_array_equal(out[:2], pal[[0, 3]])
    assert all(tuple(c) == UNKNOWN for c in out[2:])
    with pytest.raises(ValueError, match="num_classes"):
        label_colors(-1)


def test_colorize_replaces_rgb_by_label_colour_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    cam = rng.integers(0, 256, (50, 3)).astype(np.uint8)
    lab = rng.integers(0, 5, 50).astype(np.uint16)
    cloud = make_cloud(xyz, cam, lab, rng.random(50).astype(np.float32))
    out = colorize(cloud, 5)
    np.testing.assert_array_equal(unpack_rgb(out["rgb"]), label_colors(5)[lab])
    for k in ("x", "y", "z", "label", "score"):
        np.testing.assert_array_equal(out[k], cloud[k])
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), cam)      # input untouched
    with pytest.raises(ValueError, match="label"):
        colorize(make_cloud(xyz, cam), 5)


def test_eval_report_uses_the_same_palette():
    from geopurify_ros.eval.report import _colors, palette

    np.testing.assert_allclose(palette(20)[:, :3] * 255, label_colors(20))
    np.testing.assert_allclose(_colors(np.array([4, 99]), 20)[:, :3] * 255, colors_of([4, 99], 20))
