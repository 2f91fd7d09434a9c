"""Label-free surface over-segmentation of a coloured voxel cloud: the teacher's segment-contrast signal.

A multi-scale PointContrast/MSC teacher never has to tell apart two voxels 5 cm apart (negatives nearer than the
exclusion radius are masked, and the coarse levels are shared by neighbours), so its affinities are nearly flat
across object borders. Geometry alone gives a cheap signal for that scale: two 26-neighbour voxels belong to the
same *surface segment* when their normals are nearly parallel, neither lies off the other's tangent plane and their
colours agree; segments are the connected components of those edges. Strict thresholds over-segment (a chair is
several segments), which only asks the teacher to separate more than it must; loose ones would chain a wall into
the furniture against it. No labels are read.
"""
from __future__ import annotations

import numpy as np
import torch

from .geometry import VoxelGrid, colors_float, edge_list, normals_curvature, voxel_means


def surface_segments(xyz: torch.Tensor, colors: torch.Tensor, voxel_size: float, normal_dot: float = 0.95,
                     colour_dist: float = 0.08, plane_dist: float = 0.3, min_voxels: int = 8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the voxels' 26-neighbour graph, cut where surfaces change.

    xyz (V,3) one point per voxel (voxel means), colors (V,3) uint8 or [0,1]. An edge i-j is kept when
    |n_i·n_j| >= normal_dot, the larger point-to-tangent-plane distance <= plane_dist·voxel_size and the RGB distance
    (in [0,1]) <= colour_dist. Returns (segment id per voxel (V,) int64, -1 in components of fewer than `min_voxels`
    (noisy normals at corners and thin parts: neither "same" nor "other" can be trusted there), whether the voxel
    touches another segment (V,) bool): the border voxels, where a contrastive loss finds hard negatives right next
    to its anchors."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    xyz = xyz.float()
    n = xyz.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    nb = VoxelGrid(xyz, voxel_size).neighbours()
    src, dst = edge_list(nb)
    normals, _ = normals_curvature(xyz, nb, edges=(src, dst))
    c = colors_float(colors)
    d = xyz[dst] - xyz[src]
    off_plane = torch.maximum((d * normals[src]).sum(1).abs(), (d * normals[dst]).sum(1).abs())
    keep = (((normals[src] * normals[dst]).sum(1).abs() >= normal_dot)
            & (off_plane <= plane_dist * voxel_size)
            & ((c[src] - c[dst]).norm(dim=1) <= colour_dist)).numpy()
    s, t = src.numpy()[keep], dst.numpy()[keep]
    _, seg = connected_components(coo_matrix((np.ones(s.size, np.int8), (s, t)), shape=(n, n)), directed=False)
    seg = seg.astype(np.int64)
    seg = np.where(np.bincount(seg)[seg] >= min_voxels, seg, -1)
    border = np.zeros(n, bool)
    si, sj = seg[src.numpy()], seg[dst.numpy()]
    differ = (si != sj) & (si >= 0) & (sj >= 0)
    border[src.numpy()[differ]] = True
    return seg, border


def point_segments(points: np.ndarray, colors: np.ndarray, voxel_size: float, **kwargs
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`surface_segments` of a point cloud voxelised at `voxel_size` (grid at the origin), per point:
    (segment id (M,), on a segment border (M,))."""
    ijk = np.floor(points / voxel_size).astype(np.int64)
    _, inv, cnt = np.unique(ijk, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)

    def mean(x):
        return torch.from_numpy(voxel_means(x, inv, cnt).astype(np.float32))

    seg, border = surface_segments(mean(points), mean(colors.astype(np.float64) / 255.0), voxel_size, **kwargs)
    return seg[inv], border[inv]
