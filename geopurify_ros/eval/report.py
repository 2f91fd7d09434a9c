"""report.md + report.json + PNG figures (matplotlib, Agg backend) for an evaluation run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..figures import dot_size, pyplot as _plt, subsample as _subsample
from ..palette import colors_of, label_colors
from .metrics import Scores


def _rgba(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb.astype(np.float64) / 255.0, np.ones((len(rgb), 1))], axis=1)


def palette(num_classes: int) -> np.ndarray:
    """(C+1, 4) RGBA colours of `geopurify_ros.palette`; the last row (unknown / ignore) is grey."""
    return _rgba(label_colors(num_classes))


def _colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return _rgba(colors_of(labels, num_classes))


def plot_views(path: Path, panels: list[tuple[str, np.ndarray, np.ndarray]], class_names: list[str], view: str) -> None:
    """One panel per (title, xyz, labels): top-down (x-y) or perspective 3D scatter, shared legend."""
    plt = _plt()
    c = len(class_names)
    n = len(panels)
    fig = plt.figure(figsize=(4.2 * n + 2.2, 4.6))
    used = set()
    for k, (title, xyz, lab) in enumerate(panels):
        xyz = np.asarray(xyz, dtype=np.float32)
        idx = _subsample(len(xyz))
        xyz, lab = xyz[idx], np.asarray(lab)[idx]
        used.update(int(v) for v in np.unique(lab) if 0 <= v < c)
        size = dot_size(len(xyz))
        if view == "top":
            ax = fig.add_subplot(1, n, k + 1)
            order = np.argsort(xyz[:, 2]) if len(xyz) else idx   # draw high points last (seen from above)
            ax.scatter(xyz[order, 0], xyz[order, 1], c=_colors(lab[order], c), s=size, linewidths=0)
            ax.set_aspect("equal")
            ax.set_xlabel("x [m]")
            ax.set_ylabel("y [m]")
        else:
            ax = fig.add_subplot(1, n, k + 1, projection="3d")
            ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=_colors(lab, c), s=size * 0.7, linewidths=0, depthshade=False)
            ax.view_init(elev=35, azim=-60)
            if len(xyz):
                span = (xyz.max(0) - xyz.min(0)).max() / 2 + 1e-3
                mid = (xyz.max(0) + xyz.min(0)) / 2
                for setter, m in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), mid):
                    setter(m - span, m + span)
            ax.set_axis_off()
        ax.set_title(title, fontsize=10)
    from matplotlib.patches import Patch

    pal = palette(c)
    handles = [Patch(color=pal[i], label=class_names[i]) for i in sorted(used)] + [Patch(color=pal[c], label="unknown")]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (4.2 * n + 2.2), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(path: Path, scores: Scores, title: str) -> None:
    """Row-normalised confusion matrix over classes present in GT (+ the unknown column)."""
    plt = _plt()
    cm = scores.confusion.astype(np.float64)
    rows = np.flatnonzero(scores.present)
    cols = np.concatenate([rows, [cm.shape[0]]])
    sub = cm[np.ix_(rows, cols)]
    norm = sub / np.maximum(sub.sum(1, keepdims=True), 1)
    names = [scores.class_names[i] for i in rows]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(cols), 1.0 + 0.42 * len(rows)))
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(cols)), names + ["unknown"], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if norm[i, j] >= 0.01:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_iou_bars(path: Path, results: dict[str, Scores], title: str) -> None:
    """Grouped per-class IoU bars, one bar per run (e.g. raw / purified / pooled)."""
    plt = _plt()
    first = next(iter(results.values()))
    rows = np.flatnonzero(first.present)
    names = [first.class_names[i] for i in rows]
    width = 0.8 / max(len(results), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) + 2), 4))
    for k, (label, s) in enumerate(results.items()):
        ax.bar(np.arange(len(rows)) + (k - (len(results) - 1) / 2) * width, np.nan_to_num(s.iou[rows]), width,
               label=f"{label} (mIoU {100 * s.miou:.1f})")
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return "–" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def write_report(out: Path, scores: dict[str, dict[str, Scores]], clouds: dict[str, dict[str, tuple]],
                 gt_xyz: np.ndarray, gt_labels: np.ndarray, class_names: list[str], meta: dict[str, Any],
                 plots: bool = True) -> dict[str, Any]:
    """Write report.md / report.json / PNGs under ``out``.

    ``scores[source][mode]`` are the metrics, ``clouds[source][mode]`` the predicted ``(xyz, labels)``.
    """
    out.mkdir(parents=True, exist_ok=True)
    figures: list[str] = []
    if plots:
        for source, by_mode in scores.items():
            panels = [("ground truth", gt_xyz, gt_labels)] + [
                (f"{source}: {mode}", *clouds[source][mode]) for mode in by_mode]
            for view in ("top", "perspective"):
                name = f"{source}_{view}.png"
                plot_views(out / name, panels, class_names, view)
                figures.append(name)
            for mode, s in by_mode.items():
                name = f"{source}_confusion_{mode}.png"
                plot_confusion(out / name, s, f"{source} / {mode}: mIoU {100 * s.miou:.1f}")
                figures.append(name)
            name = f"{source}_iou_bars.png"
            plot_iou_bars(out / name, by_mode, f"per-class IoU ({source})")
            figures.append(name)

    doc = {"meta": meta, "results": {src: {m: s.to_dict() for m, s in bm.items()} for src, bm in scores.items()},
           "figures": figures}
    (out / "report.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    (out / "report.md").write_text(_markdown(scores, class_names, meta, figures))
    return doc


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _markdown(scores: dict[str, dict[str, Scores]], class_names: list[str], meta: dict[str, Any], figures: list[str]) -> str:
    L = ["# geopurify_ros evaluation report", ""]
    L += [f"- bag: `{meta.get('bag')}`", f"- ground truth: `{meta.get('gt')}` ({meta.get('gt_points')} labelled points)",
          f"- params: `{meta.get('params')}`; voxel size {meta.get('voxel_size')} m, match radius {meta.get('match_radius', 0):.3f} m"]
    for src, info in meta.get("replay", {}).items():
        L.append(f"- {src} replay: {info['frames_read']} frames read, {info['frames_fused']} fused, "
                 f"{info['fps']:.2f} frames/s ({info['seconds']:.1f} s)")
    L += ["", "mIoU / mAcc are means over the classes present in the ground truth (in %). Each GT point takes the label of",
          "the nearest labelled map point within the match radius; points without one count as wrong (coverage).", "",
          "| run | purify mode | mIoU | mAcc | overall acc | coverage |", "|---|---|---:|---:|---:|---:|"]
    for src, bm in scores.items():
        for mode, s in bm.items():
            L.append(f"| {src} | {mode} | {_pct(s.miou)} | {_pct(s.macc)} | {_pct(s.overall_acc)} | {_pct(s.coverage)} |")
    for src, bm in scores.items():
        first = next(iter(bm.values()))
        rows = np.flatnonzero(first.present)
        L += ["", f"## Per-class IoU ({src})", "", "| class | GT points | " + " | ".join(bm) + " |",
              "|---|---:|" + "---:|" * len(bm)]
        for i in rows:
            L.append(f"| {class_names[i]} | {int(first.confusion[i].sum())} | "
                     + " | ".join(_pct(s.iou[i]) for s in bm.values()) + " |")
    if meta.get("ros_vs_offline") is not None:
        L += ["", f"ROS vs offline replay, |ΔmIoU| per mode (points): {meta['ros_vs_offline']}"]
    if figures:
        L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(L) + "\n"
