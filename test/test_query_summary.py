"""Summary of a query's matches: histogram, best cluster and its bounding box."""
import numpy as np
import pytest

from geopurify_ros.query_summary import cluster_ids, format_summary, link_radius, summarize


def blob(lo, shape, step=0.05):
    g = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    return np.asarray(lo) + g * step


def test_best_cluster_is_the_largest_score_sum_and_its_box_is_tight():
    big = blob([0, 0, 0], (4, 3, 2))                     # 24 voxels, score 0.5 each -> sum 12
    lone = np.array([[3.0, 3.0, 1.0]])                    # best single score, far away
    small = blob([-2, 1, 0], (2, 2, 1))                   # 4 voxels, 0.9 each -> 3.6
    xyz = np.concatenate([big, lone, small])
    scores = np.concatenate([np.full(24, 0.5), [0.99], np.full(4, 0.9)])
    labels = ["chair"] * 20 + ["table"] * 4 + ["picture"] + ["chair"] * 4
    s = summarize(xyz, scores, labels)
    assert s.matches == 29 and s.best_score == pytest.approx(0.99)
    assert s.histogram == [("chair", 24), ("table", 4), ("picture", 1)]
    assert s.clusters == 3
    c = s.best_cluster
    assert c.size == 24 and c.score_sum == pytest.approx(12.0)
    np.testing.assert_allclose(c.lo, [0, 0, 0])
    np.testing.assert_allclose(c.hi, [0.15, 0.10, 0.05])
    np.testing.assert_array_equal(np.sort(c.indices), np.arange(24))
    text = format_summary("a chair", s, "29 of 1000 voxels match")
    assert "matches: 29" in text and "best score: 0.990" in text and "labels: chair 24, table 4, picture 1" in text
    assert "bbox min (0.00, 0.00, 0.00) max (0.15, 0.10, 0.05)" in text


def test_diagonal_voxel_neighbours_link_and_a_gap_splits():
    xyz = np.array([[0, 0, 0], [0.05, 0.05, 0.05], [0.10, 0.10, 0.10], [0.30, 0.10, 0.10]])
    r = link_radius(np.concatenate([xyz, blob([1, 1, 1], (3, 3, 3))]))
    assert 0.087 < r < 0.2                                # joins corner neighbours (0.087), not 0.2 gaps
    ids = cluster_ids(xyz, r)
    assert ids[0] == ids[1] == ids[2] != ids[3]


def test_no_matches_and_mismatched_inputs():
    s = summarize(np.zeros((0, 3)), [], [])
    assert s.matches == 0 and s.best_cluster is None and s.best_score is None
    assert format_summary("x", s).splitlines()[-1] == "matches: 0"
    one = summarize([[1.0, 2.0, 3.0]], [0.7], ["bed"])
    assert one.best_cluster.size == 1 and np.allclose(one.best_cluster.lo, [1, 2, 3])
    with pytest.raises(ValueError, match="matches"):
        summarize(np.zeros((2, 3)), [0.5], ["a", "b"])
