"""Semantic segmentation metrics for a labelled 3D map against labelled ground-truth points.

Convention: rows of the confusion matrix are ground-truth classes, columns are predictions.
The matrix has one extra column, ``unknown`` (index ``num_classes``), for ground-truth points the
map has no label for (no map point within the matching radius, or a predicted id outside the class
table). Such points are errors of their true class (false negatives) but nobody's false positive,
so they lower IoU/accuracy and are reported separately as coverage.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_LABEL = 65535


def match_nearest(gt_xyz: np.ndarray, map_xyz: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """For each GT point, index of the nearest map point within ``max_dist`` (-1 if none) and its distance."""
    gt_xyz = np.asarray(gt_xyz, dtype=np.float64).reshape(-1, 3)
    map_xyz = np.asarray(map_xyz, dtype=np.float64).reshape(-1, 3)
    idx = np.full(len(gt_xyz), -1, dtype=np.int64)
    dist = np.full(len(gt_xyz), np.inf)
    if len(gt_xyz) == 0 or len(map_xyz) == 0:
        return idx, dist
    from scipy.spatial import cKDTree  # lazy: scipy import is slow and only needed here

    d, i = cKDTree(map_xyz).query(gt_xyz, k=1, distance_upper_bound=max_dist)
    ok = np.isfinite(d)
    idx[ok] = i[ok]
    dist[ok] = d[ok]
    return idx, dist


def transfer_labels(gt_xyz: np.ndarray, map_xyz: np.ndarray, map_labels: np.ndarray, max_dist: float,
                    unknown: int = IGNORE_LABEL) -> np.ndarray:
    """Prediction per GT point: label of the nearest map point within ``max_dist``, else ``unknown``."""
    idx, _ = match_nearest(gt_xyz, map_xyz, max_dist)
    pred = np.full(len(idx), unknown, dtype=np.int64)
    ok = idx >= 0
    pred[ok] = np.asarray(map_labels, dtype=np.int64)[idx[ok]]
    return pred


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
    """(C, C+1) int64 counts: row = true class, column = predicted class or C for unknown/out-of-range.

    GT points equal to ``ignore_label`` (or outside [0, C)) are dropped.
    """
    gt = np.asarray(gt, dtype=np.int64).ravel()
    pred = np.asarray(pred, dtype=np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"pred: shape {pred.shape} does not match gt shape {gt.shape}")
    keep = (gt != ignore_label) & (gt >= 0) & (gt < num_classes)
    gt, pred = gt[keep], pred[keep]
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
    flat = np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return flat.reshape(num_classes, num_classes + 1)


@dataclass
class Scores:
    """Per-class and mean scores derived from a (C, C+1) confusion matrix."""

    confusion: np.ndarray
    class_names: list[str]
    iou: np.ndarray = field(init=False)          # (C,) NaN for classes absent from GT
    acc: np.ndarray = field(init=False)          # (C,) per-class recall, NaN if absent
    present: np.ndarray = field(init=False)      # (C,) bool: class has GT points
    miou: float = field(init=False)
    macc: float = field(init=False)
    overall_acc: float = field(init=False)
    coverage: float = field(init=False)          # fraction of GT points that got a known prediction

    def __post_init__(self) -> None:
        cm = np.asarray(self.confusion, dtype=np.float64)
        c = cm.shape[0]
        tp = np.diag(cm[:, :c])
        gt_count = cm.sum(axis=1)                # includes the unknown column (false negatives)
        pred_count = cm[:, :c].sum(axis=0)
        self.present = gt_count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            union = gt_count + pred_count - tp
            self.iou = np.where(self.present, tp / np.where(union > 0, union, 1), np.nan)
            self.acc = np.where(self.present, tp / np.where(gt_count > 0, gt_count, 1), np.nan)
        total = gt_count.sum()
        self.miou = float(np.nanmean(self.iou)) if self.present.any() else float("nan")
        self.macc = float(np.nanmean(self.acc)) if self.present.any() else float("nan")
        self.overall_acc = float(tp.sum() / total) if total else float("nan")
        self.coverage = float(1.0 - cm[:, c].sum() / total) if total else float("nan")

    def to_dict(self) -> dict:
        def f(x: float):
            return None if np.isnan(x) else round(float(x), 6)

        return {
            "miou": f(self.miou), "macc": f(self.macc), "overall_acc": f(self.overall_acc), "coverage": f(self.coverage),
            "num_points": int(self.confusion.sum()),
            "per_class": {
                name: {"iou": f(self.iou[i]), "acc": f(self.acc[i]), "gt_points": int(self.confusion[i].sum())}
                for i, name in enumerate(self.class_names) if self.present[i]
            },
            "confusion": self.confusion.tolist(),
        }


def evaluate(gt_xyz: np.ndarray, gt_labels: np.ndarray, map_xyz: np.ndarray, map_labels: np.ndarray,
             class_names: list[str], max_dist: float, ignore_label: int = IGNORE_LABEL) -> Scores:
    """Nearest-map-point label transfer onto GT points, then confusion-matrix scores."""
    pred = transfer_labels(gt_xyz, map_xyz, map_labels, max_dist, unknown=len(class_names))
    return Scores(confusion_matrix(gt_labels, pred, len(class_names), ignore_label), list(class_names))
