"""Headless matplotlib figures shared by the evaluation report and the query tool (colours from
`geopurify_ros.palette`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_PLOT_POINTS = 60_000   # scatter plots are subsampled: the figures stay readable and fast


def pyplot():
    import matplotlib

    matplotlib.use("Agg")              # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def subsample(n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most MAX_PLOT_POINTS of n points (all of them when fewer)."""
    if n <= MAX_PLOT_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, MAX_PLOT_POINTS, replace=False))


def dot_size(n: int) -> float:
    """Marker area for n points: sparse clouds get bigger dots."""
    return float(np.clip(8000.0 / max(n, 1), 0.4, 6.0))


def top_down_raster(xyz: np.ndarray, rgb: np.ndarray, cell: float | None = None) -> tuple[np.ndarray, tuple]:
    """Top-down image of coloured points: each cell shows its highest point (white where empty).

    `cell` defaults to the median nearest-neighbour spacing (the voxel size of a map). Returns
    (uint8 (H, W, 3) image with row 0 at max y, imshow extent (x0, x1, y0, y1))."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    if len(xyz) == 0:
        return np.full((1, 1, 3), 255, np.uint8), (0.0, 1.0, 0.0, 1.0)
    if cell is None:
        from scipy.spatial import cKDTree

        cell = float(np.median(cKDTree(xyz).query(xyz, k=2)[0][:, 1])) if len(xyz) > 1 else 1.0
    cell = max(cell, 1e-3)
    lo = xyz[:, :2].min(0)
    ij = np.floor((xyz[:, :2] - lo) / cell).astype(np.int64)
    w, h = (ij.max(0) + 1).tolist()
    img = np.full((h, w, 3), 255, np.uint8)
    order = np.argsort(xyz[:, 2])                     # later (higher) points overwrite lower ones
    img[h - 1 - ij[order, 1], ij[order, 0]] = np.asarray(rgb, np.uint8)[order]
    return img, (lo[0], lo[0] + w * cell, lo[1], lo[1] + h * cell)


def query_top_down(path: Path, title: str, map_xyz: np.ndarray, map_rgb: np.ndarray, match_xyz: np.ndarray,
                   match_scores: np.ndarray, legend: list[tuple[str, np.ndarray]] = (),
                   box: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Top-down (x-y) view: the map (highest point per cell, in its palette colours, faded); the
    matches on top coloured by score; `box` (lo, hi) as a dashed rectangle; `legend` = (name, uint8 rgb)."""
    plt = pyplot()
    from matplotlib.patches import Patch, Rectangle

    def fade(rgb):                                        # the map pales so the matches stand out
        return (0.55 * np.asarray(rgb, np.float64) + 0.45 * 255).astype(np.uint8)

    fig, ax = plt.subplots(figsize=(7.0, 5.6))
    if len(map_xyz):
        img, extent = top_down_raster(map_xyz, fade(map_rgb))
        ax.imshow(img, extent=extent, interpolation="nearest")
    mxyz, msc = np.asarray(match_xyz, np.float32).reshape(-1, 3), np.asarray(match_scores, np.float32)
    if len(mxyz):
        o = np.argsort(msc)                                # best drawn last
        sc = ax.scatter(mxyz[o, 0], mxyz[o, 1], c=msc[o], cmap="plasma", vmin=float(msc.min()),
                        vmax=max(float(msc.max()), float(msc.min()) + 1e-6), s=9, marker="s",
                        edgecolors="black", linewidths=0.2)
        fig.colorbar(sc, ax=ax, fraction=0.04, pad=0.02, label="query score")
    if box is not None:
        lo, hi = box
        ax.add_patch(Rectangle((lo[0], lo[1]), hi[0] - lo[0], hi[1] - lo[1], fill=False, ls="--", lw=1.2,
                               ec="black"))
    handles = [Patch(color=fade(c) / 255.0, label=name) for name, c in legend]
    if box is not None:
        handles.append(Patch(fill=False, ls="--", ec="black", label="best cluster"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.28, 1.0), fontsize=7, frameon=False,
                  title="map labels", title_fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlabel("x [m]")
    ax.set_ylabel("y [m]")
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
