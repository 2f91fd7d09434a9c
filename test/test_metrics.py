"""Metrics: confusion matrix against a hand-computed one, IoU/accuracy, nearest-voxel matching."""
import numpy as np
import pytest

from geopurify_ros.eval.metrics import IGNORE_LABEL, Scores, confusion_matrix, evaluate, match_nearest

NAMES = ["a", "b", "c", "d"]


def test_confusion_matches_hand_computed():
    gt = np.array([0, 0, 1, 1, 2, IGNORE_LABEL, 0])
    pred = np.array([0, 1, 1, 1, 0, 2, 7])          # 7 is outside the table -> unknown column
    cm = confusion_matrix(gt, pred, 4)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[0, 4] = 1                              # unknown
    expected[1, 1] = 2
    expected[2, 0] = 1
    np.testing.assert_array_equal(cm, expected)

    s = Scores(cm, NAMES)
    # IoU = TP / (GT + pred - TP); unknown counts as FN only.
    np.testing.assert_allclose(s.iou[:3], [1 / (3 + 2 - 1), 2 / (2 + 3 - 2), 0.0])
    assert np.isnan(s.iou[3]) and not s.present[3]   # class d absent from GT: excluded from the means
    np.testing.assert_allclose(s.acc[:3], [1 / 3, 1.0, 0.0])
    assert s.miou == pytest.approx((1 / 4 + 2 / 3 + 0) / 3)
    assert s.macc == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert s.overall_acc == pytest.approx(3 / 6)
    assert s.coverage == pytest.approx(5 / 6)
    d = s.to_dict()
    assert set(d["per_class"]) == {"a", "b", "c"} and d["num_points"] == 6


def test_perfect_prediction_scores_one_and_shuffled_scores_low():
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 4, size=(5000, 3)).astype(np.float32)
    labels = (xyz[:, 0] // 1).astype(np.int64)          # 4 spatially coherent classes
    perfect = evaluate(xyz, labels, xyz, labels, NAMES, max_dist=0.075)
    assert perfect.miou == pytest.approx(1.0) and perfect.macc == pytest.approx(1.0)
    assert perfect.coverage == pytest.approx(1.0)
    shuffled = evaluate(xyz, labels, xyz, rng.permutation(labels), NAMES, max_dist=0.075)
    assert shuffled.miou < 0.2


def test_unmatched_points_count_as_wrong_and_lower_coverage():
    gt_xyz = np.array([[0, 0, 0], [1, 0, 0], [5, 5, 5]], dtype=np.float32)
    gt = np.array([0, 1, 1])
    map_xyz = np.array([[0.01, 0, 0], [1.02, 0, 0]], dtype=np.float32)
    s = evaluate(gt_xyz, gt, map_xyz, np.array([0, 1]), NAMES[:2], max_dist=0.075)
    assert s.coverage == pytest.approx(2 / 3)
    assert s.iou[1] == pytest.approx(0.5) and s.iou[0] == pytest.approx(1.0)


def test_match_nearest_respects_radius():
    idx, dist = match_nearest(np.array([[0, 0, 0], [0.2, 0, 0]]), np.array([[0.05, 0, 0], [0.3, 0, 0]]), 0.075)
    np.testing.assert_array_equal(idx, [0, -1])      # second GT point is 0.1 away: beyond the radius
    assert dist[0] == pytest.approx(0.05) and np.isinf(dist[1])
    idx, _ = match_nearest(np.array([[0, 0, 0]]), np.array([[1.0, 0, 0]]), 0.075)
    assert idx[0] == -1
    idx, _ = match_nearest(np.zeros((3, 3)), np.zeros((0, 3)), 0.1)
    assert (idx == -1).all()
