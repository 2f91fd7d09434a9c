"""`geopurify-export`: a saved map (a `~/save_map` file) -> coloured, labelled PLY.

    geopurify-export MAP --ply OUT.ply [--color label|rgb] [--mode raw|purified|pooled]
                     [--params config/mapping.yaml] [--device cpu]

The map is loaded into a `MappingPipeline` built from the node's parameters (`--params`, default the
node defaults: the feature backend and `class_names` must be those the map was made with), purified in
the chosen mode and labelled exactly as the node labels `~/labelled_cloud`. Points: every voxel seen at
least `cloud_min_observations` times; colours: the label palette (`--color label`, as the node's
semantic cloud) or the fused camera colour (`--color rgb`). Columns: x, y, z, red, green, blue, label,
score (`geopurify_ros.ply`).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .config import PipelineConfig
from .palette import colorize
from .ply import write_ply

PROG = "geopurify-export"
COLOR_MODES = ("label", "rgb")
PURIFY_MODES = ("raw", "purified", "pooled")


def export_map(map_path: str | Path, ply_path: str | Path, config: PipelineConfig, color: str = "label",
               mode: str | None = None) -> tuple[int, dict[str, int]]:
    """Write the PLY; returns (points written, {class name: points}). ValueError names a bad input."""
    from .pipeline import MappingPipeline

    if color not in COLOR_MODES:
        raise ValueError(f"color: must be one of {', '.join(COLOR_MODES)}, got {color!r}")
    if mode is not None:
        config.purify_mode = mode
        config.validate()
    pipeline = MappingPipeline(config)
    pipeline.load(map_path)                      # ValueError: missing / not a map / wrong feature size
    pipeline.purify(incremental=False)
    cloud = pipeline.labelled_cloud()
    names = pipeline.class_names
    if color == "label":
        cloud = colorize(cloud, len(names))
    n = write_ply(ply_path, cloud, comments=(f"map {Path(map_path).name}", f"purify_mode {config.purify_mode}",
                                             f"color {color}", "labels " + ",".join(c.replace(" ", "_") for c in names)))
    counts = Counter(names[i] if i < len(names) else "unknown" for i in cloud["label"].tolist())
    return n, dict(counts.most_common())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description="Export a saved geopurify map to a labelled PLY.")
    ap.add_argument("map", type=Path, help="map file written by the node's ~/save_map")
    ap.add_argument("--ply", type=Path, required=True, help="output PLY file")
    ap.add_argument("--color", choices=COLOR_MODES, default="label",
                    help="label: semantic palette (default); rgb: fused camera colour")
    ap.add_argument("--mode", choices=PURIFY_MODES, default=None,
                    help="feature purification before labelling (default: purify_mode of --params)")
    ap.add_argument("--params", type=Path, default=None,
                    help="node parameters file the map was made with (default: the node defaults)")
    ap.add_argument("--device", default=None, help="torch device (default: device of --params)")
    a = ap.parse_args(argv)
    if not a.map.is_file():                      # before the (slow) pipeline start
        ap.error(f"map: {a.map} does not exist")
    if not a.ply.resolve().parent.is_dir():
        ap.error(f"--ply: directory {a.ply.resolve().parent} does not exist")
    try:
        config = PipelineConfig.from_yaml(a.params) if a.params else PipelineConfig()
        if a.device:
            config.device = a.device
        n, counts = export_map(a.map, a.ply, config, a.color, a.mode)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.ply}: {n} points (purify_mode {config.purify_mode}, colour {a.color})")
    print("labels: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
