"""The one semantic colour palette: label id -> RGB, shared by the node's cloud and `ClassList`, the
evaluation report, the query figure and the PLY export, so every picture and every legend agree.

ROS- and matplotlib-free (the node imports it). Colours depend only on the label id, never on the
class names, so any class list gets a palette; ids beyond the fixed table get evenly spread hues.
"""
from __future__ import annotations

import colorsys

import numpy as np

# matplotlib's tab20, strong shades first (so the first ten ids are far apart), its two greys
# replaced so that no class looks like UNKNOWN.
_TABLE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (82, 84, 163), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (0, 128, 128), (219, 219, 141), (158, 218, 229),
], dtype=np.uint8)
UNKNOWN = (153, 153, 153)          # labels outside the class list (ignore label, unknown)
_GOLDEN = 0.618033988749895


def label_colors(num_classes: int) -> np.ndarray:
    """uint8 (num_classes + 1, 3): row i is the colour of label i, the last row is UNKNOWN."""
    if num_classes < 0:
        raise ValueError(f"num_classes: must be >= 0, got {num_classes}")
    rows = [tuple(_TABLE[i]) if i < len(_TABLE) else
            tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb((i * _GOLDEN) % 1.0, 0.65, 0.9))
            for i in range(num_classes)]
    return np.array(rows + [UNKNOWN], dtype=np.uint8).reshape(-1, 3)


def colors_of(labels, num_classes: int) -> np.ndarray:
    """uint8 (N, 3) colours of label ids (N,); ids outside [0, num_classes) get UNKNOWN."""
    lab = np.asarray(labels).astype(np.int64)
    lab = np.where((lab >= 0) & (lab < num_classes), lab, num_classes)
    return label_colors(num_classes)[lab]


def colorize(cloud: np.ndarray, num_classes: int) -> np.ndarray:
    """Copy of a structured cloud (fields rgb, label as in `pointcloud2.make_cloud`) whose rgb is the
    palette colour of each point's label."""
    from .pointcloud2 import pack_rgb

    names = cloud.dtype.names or ()
    if "rgb" not in names or "label" not in names:
        raise ValueError(f"cloud: needs 'rgb' and 'label' fields, has {names}")
    out = cloud.copy()
    out["rgb"] = pack_rgb(colors_of(cloud["label"], num_classes))
    return out
