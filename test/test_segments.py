"""Label-free surface segments and the teacher's segment contrast (purify/segments.py, pretrain.segment_nce)."""
import numpy as np
import torch

from geopurify_ros.purify.pretrain import segment_nce
from geopurify_ros.purify.scenes import l_corner, poster_wall
from geopurify_ros.purify.segments import point_segments, surface_segments
from geopurify_ros.purify.train import make_view


def _main_segment(seg, mask):
    ids, counts = np.unique(seg[mask & (seg >= 0)], return_counts=True)
    return ids[counts.argmax()]


def test_a_crease_of_one_colour_splits_floor_from_wall():
    s = l_corner()
    seg, border = surface_segments(s.xyz, s.colors, 0.05)
    inst = s.instance.numpy()
    floor, wall = _main_segment(seg, inst == 0), _main_segment(seg, inst == 1)
    assert floor != wall
    assert np.mean(seg[inst == 0] == floor) > 0.6 and np.mean(seg[inst == 1] == wall) > 0.6
    assert np.mean(seg[inst == 1] == floor) < 0.02           # nothing of the wall chained into the floor
    x_border = s.xyz[torch.from_numpy(border)][:, 0].abs()   # borders sit at the crease (x = 0)
    assert border.any() and float(x_border.max()) < 0.2


def test_a_coplanar_poster_is_not_the_walls_segment():
    s = poster_wall()
    seg, _ = surface_segments(s.xyz, s.colors, 0.05)
    kind = s.kind.numpy()
    wall = _main_segment(seg, kind == 1)
    assert np.mean(seg[kind == 4] == wall) < 0.05


def test_point_segments_agree_within_a_voxel():
    s = l_corner()
    pts = s.xyz.numpy().astype(np.float64)
    pts = np.concatenate([pts, pts + 0.004])                  # two points in every voxel
    seg, border = point_segments(pts, np.concatenate([s.colors.numpy()] * 2), 0.05)
    n = len(s.xyz)
    assert seg.shape == (2 * n,) and border.shape == (2 * n,)
    same_voxel = (np.floor(pts[:n] / 0.05) == np.floor(pts[n:] / 0.05)).all(1)
    assert (seg[:n][same_voxel] == seg[n:][same_voxel]).all()


def test_segment_contrast_rewards_embeddings_that_follow_segments():
    s = poster_wall()
    pts, cols = s.xyz.numpy().astype(np.float64), s.colors.numpy()
    seg, border = point_segments(pts, cols, 0.05)
    rng = np.random.default_rng(0)
    va = make_view(pts, cols, pts[:, :2].mean(0), 5.0, 0.05, rng, augment=False)
    vb = make_view(pts, cols, pts[:, :2].mean(0), 5.0, 0.05, rng, augment=False)
    both = np.nonzero((va.voxel_of >= 0) & (vb.voxel_of >= 0))[0]

    def per_voxel(v, fn):
        out = torch.zeros(len(v.xyz), int(seg.max()) + 2)
        ok = v.voxel_of >= 0
        out[torch.from_numpy(v.voxel_of[ok]), torch.from_numpy(fn(seg[ok]))] = 1.0
        return torch.nn.functional.normalize(out, dim=1)     # a voxel of the view may hold two segments' points

    good_a, good_b = per_voxel(va, lambda x: x + 1), per_voxel(vb, lambda x: x + 1)   # one-hot of the segment
    flat_a, flat_b = per_voxel(va, np.zeros_like), per_voxel(vb, np.zeros_like)       # every voxel alike
    lg, top_g = segment_nce(good_a, good_b, va, vb, seg, border, both, 256, 0.1, 0.05, np.random.default_rng(1))
    lf, top_f = segment_nce(flat_a, flat_b, va, vb, seg, border, both, 256, 0.1, 0.05, np.random.default_rng(1))
    assert torch.isfinite(lg) and torch.isfinite(lf)
    assert float(lg) < 0.5 < float(lf) - 3.0                  # flat embeddings sit near chance (ln 257)
    assert top_g > 0.8 > 0.2 > top_f
