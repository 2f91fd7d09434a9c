"""What a text query found, in a few lines: match count, best score, label histogram and the bounding
box of the best cluster (ROS-free; used by `geopurify-query`).

Matches are voxel centres, so spatial clusters are the connected components of the graph that links
matches closer than `radius` (default: 1.8 x the median nearest-neighbour spacing, which joins face,
edge and corner neighbours of a voxel grid). The best cluster is the one with the largest score sum:
a large, confident object beats one isolated high-scoring voxel.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

LINK_FACTOR = 1.8


@dataclass
class Cluster:
    size: int
    score_sum: float
    lo: np.ndarray              # (3,) bounding box min [m]
    hi: np.ndarray              # (3,) bounding box max [m]
    indices: np.ndarray         # rows of the matches in this cluster

    @property
    def center(self) -> np.ndarray:
        return (self.lo + self.hi) / 2


@dataclass
class QuerySummary:
    matches: int
    best_score: float | None
    histogram: list[tuple[str, int]] = field(default_factory=list)   # most frequent first
    best_cluster: Cluster | None = None
    clusters: int = 0
    radius: float = 0.0


def link_radius(xyz: np.ndarray) -> float:
    """LINK_FACTOR x the median nearest-neighbour distance of the points (0 for fewer than two)."""
    if len(xyz) < 2:
        return 0.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xyz).query(xyz, k=2)
    return float(LINK_FACTOR * np.median(d[:, 1]))


def cluster_ids(xyz: np.ndarray, radius: float) -> np.ndarray:
    """(N,) connected-component id of each point, points linked when closer than `radius`."""
    n = len(xyz)
    if n == 0:
        return np.zeros(0, np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pairs = cKDTree(xyz).query_pairs(radius, output_type="ndarray") if radius > 0 else np.zeros((0, 2), int)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def summarize(xyz, scores, labels, radius: float | None = None) -> QuerySummary:
    """xyz (N,3), scores (N,), label names (N,) of the matches -> QuerySummary."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    scores = np.asarray(scores, np.float64).reshape(-1)
    labels = [str(x) for x in labels]
    if not len(xyz) == len(scores) == len(labels):
        raise ValueError(f"matches: {len(xyz)} points, {len(scores)} scores, {len(labels)} labels")
    out = QuerySummary(matches=len(xyz), best_score=float(scores.max()) if len(scores) else None,
                       histogram=Counter(labels).most_common())
    if not len(xyz):
        return out
    out.radius = float(radius) if radius else link_radius(xyz)
    ids = cluster_ids(xyz, out.radius)
    sums = np.bincount(ids, weights=scores)
    best = int(np.argmax(sums))
    rows = np.flatnonzero(ids == best)
    out.clusters = int(ids.max()) + 1
    out.best_cluster = Cluster(len(rows), float(sums[best]), xyz[rows].min(0), xyz[rows].max(0), rows)
    return out


def format_summary(text: str, s: QuerySummary, message: str = "") -> str:
    def v(a) -> str:
        return "(" + ", ".join(f"{x:.2f}" for x in a) + ")"

    lines = [f"query: '{text}'"] + ([f"node: {message}"] if message else []) + [f"matches: {s.matches}"]
    if s.matches == 0:
        return "\n".join(lines)
    lines.append(f"best score: {s.best_score:.3f}")
    lines.append("labels: " + ", ".join(f"{name} {n}" for name, n in s.histogram))
    c = s.best_cluster
    lines.append(f"best cluster: {c.size} of {s.matches} matches in {s.clusters} clusters "
                 f"(link radius {s.radius:.3f} m), score sum {c.score_sum:.2f}")
    lines.append(f"  bbox min {v(c.lo)} max {v(c.hi)} size {v(c.hi - c.lo)} centre {v(c.center)} [m]")
    return "\n".join(lines)
