"""`geopurify-query`: ask a running mapping node a free-text question from the command line.

    geopurify-query "a chair" [--node /geopurify_mapping] [--threshold T] [--max-points N]
                    [--ply matches.ply] [--png topdown.png] [--timeout S] [--ros-args ...]
    ros2 run geopurify_ros geopurify-query "a chair"

Calls `NODE/query` (geopurify_ros/srv/TextQuery) and prints the number of matches, the best score, the
histogram of their closed-set labels and the bounding box of the best cluster (`query_summary`).
`--ply` writes the matches (x, y, z, red, green, blue, label, score); `--png` draws a top-down view of
the map (`NODE/labelled_cloud`, in the label colours of `NODE/class_names`) with the matches on top.
Exit status: 0 answered (also with no match), 1 no node / no answer within --timeout / query refused,
2 bad arguments (e.g. empty text).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_NODE = "/geopurify_mapping"
PROG = "geopurify-query"


class QueryError(RuntimeError):
    """No node, no answer in time, or the node refused the query (message says which)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description="Query the geopurify mapping node with free text.")
    ap.add_argument("text", help="what to look for, e.g. 'a chair'")
    ap.add_argument("--node", default=DEFAULT_NODE, help=f"mapping node name with namespace (default {DEFAULT_NODE})")
    ap.add_argument("--threshold", type=float, default=0.0,
                    help="minimum calibrated score in [0, 1] (default 0: the node's query_threshold)")
    ap.add_argument("--max-points", type=int, default=0, help="cap on matches (default 0: the node's query_max_points)")
    ap.add_argument("--negative", action="append", default=[], help="extra negative prompt (repeatable)")
    ap.add_argument("--ply", type=Path, help="write the matches to this PLY file")
    ap.add_argument("--png", type=Path, help="write a top-down view of the map with the matches to this PNG")
    ap.add_argument("--cloud-topic", default="",
                    help="labelled cloud for --png (default NODE/labelled_cloud; set it if the launch remapped it)")
    ap.add_argument("--timeout", type=float, default=15.0,
                    help="seconds to wait for the node, for its answer and (with --png) for its cloud (default 15)")
    ap.add_argument("--cluster-radius", type=float, default=0.0,
                    help="link distance of the best-cluster search [m] (default 0: from the match spacing)")
    args = ap.parse_args(argv)
    args.text = args.text.strip()
    if not args.text:
        ap.error("text: empty query (give what to look for, e.g. 'a chair')")
    if not 0.0 <= args.threshold <= 1.0:
        ap.error(f"--threshold: must be in [0, 1], got {args.threshold}")
    if args.max_points < 0 or args.timeout <= 0 or args.cluster_radius < 0:
        ap.error("--max-points and --cluster-radius must be >= 0, --timeout > 0")
    for path in (args.ply, args.png):
        if path is not None and not path.resolve().parent.is_dir():
            ap.error(f"{path}: directory {path.resolve().parent} does not exist")
    args.node = "/" + args.node.strip("/")
    args.cloud_topic = args.cloud_topic or f"{args.node}/labelled_cloud"
    return args


class _Session:
    """A short-lived rclpy node in its own context: the service client and (for --png) the map topics."""

    def __init__(self, ros_args: list[str]) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx, args=[PROG, *ros_args])
        self.node = rclpy.create_node(f"geopurify_query_{os.getpid()}", context=self.ctx)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.cloud: Any = None
        self.classes: Any = None

    def close(self) -> None:
        import rclpy

        self.node.destroy_node()
        rclpy.try_shutdown(context=self.ctx)

    def spin_until(self, done, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not done() and time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.05)
        return bool(done())

    def query(self, service: str, request: Any, timeout: float) -> Any:
        from geopurify_ros.srv import TextQuery

        client = self.node.create_client(TextQuery, service)
        if not client.wait_for_service(timeout_sec=timeout):
            raise QueryError(f"no service {service} within {timeout:g} s: is geopurify-mapping running "
                             f"(and on this ROS_DOMAIN_ID)? --node names another node")
        future = client.call_async(request)
        if not self.spin_until(future.done, timeout):
            raise QueryError(f"{service} did not answer within {timeout:g} s")
        return future.result()

    def subscribe_map(self, cloud_topic: str, classes_topic: str, timeout: float) -> None:
        """Subscribe to the cloud with the publisher's durability (latched or not) and to the class list."""
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import PointCloud2

        from geopurify_ros.msg import ClassList

        pubs: list = []

        def discovered() -> bool:
            pubs[:] = self.node.get_publishers_info_by_topic(cloud_topic)
            return bool(pubs)

        self.spin_until(discovered, min(timeout, 3.0))
        latched = bool(pubs) and all(p.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL for p in pubs)
        durability = DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=durability)
        self.node.create_subscription(PointCloud2, cloud_topic, lambda m: setattr(self, "cloud", m), qos)
        latched_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                 durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.node.create_subscription(ClassList, classes_topic, lambda m: setattr(self, "classes", m), latched_qos)


def _legend(classes: Any, class_names: list[str], present: np.ndarray) -> tuple[np.ndarray, list]:
    """(palette uint8 (C+1, 3), legend entries of the labels present): the node's ClassList colours when
    it sent them, else geopurify_ros.palette (the same table)."""
    from geopurify_ros.palette import UNKNOWN, label_colors

    names = list(classes.names) if classes is not None else list(class_names)
    colors = label_colors(len(names))
    if classes is not None and len(classes.colors) == len(names):
        colors[:-1] = np.round([[c.r * 255, c.g * 255, c.b * 255] for c in classes.colors]).astype(np.uint8)
    colors[-1] = UNKNOWN
    return colors, [(names[i], colors[i]) for i in np.unique(present) if i < len(names)]


def write_png(path: Path, text: str, map_cloud: np.ndarray | None, matches: np.ndarray, scores: np.ndarray,
              classes: Any, class_names: list[str], summary: Any) -> None:
    from geopurify_ros.figures import query_top_down

    if map_cloud is None:
        map_cloud = matches[:0]
    labels = map_cloud["label"].astype(np.int64) if "label" in (map_cloud.dtype.names or ()) else np.zeros(0, int)
    colors, legend = _legend(classes, class_names, labels)
    map_xyz = np.stack([map_cloud["x"], map_cloud["y"], map_cloud["z"]], 1) if len(map_cloud) else np.zeros((0, 3))
    map_rgb = colors[np.clip(labels, 0, len(colors) - 1)]
    match_xyz = np.stack([matches["x"], matches["y"], matches["z"]], 1) if len(matches) else np.zeros((0, 3))
    c = summary.best_cluster
    title = f"'{text}': {summary.matches} matches" + (f", best score {summary.best_score:.2f}" if summary.matches else "")
    query_top_down(path, title, map_xyz, map_rgb, match_xyz, scores, legend,
                   box=None if c is None else (c.lo, c.hi))


def run(args: argparse.Namespace, ros_args: list[str], out=sys.stdout, err=sys.stderr) -> int:
    from geopurify_ros.pointcloud2 import from_msg
    from geopurify_ros.query_summary import format_summary, summarize
    from geopurify_ros.srv import TextQuery

    session = _Session(ros_args)
    try:
        if args.png is not None:
            session.subscribe_map(args.cloud_topic, f"{args.node}/class_names", args.timeout)
        request = TextQuery.Request(text=args.text, negative_prompts=list(args.negative),
                                    threshold=float(args.threshold), max_points=int(args.max_points))
        response = session.query(f"{args.node}/query", request, args.timeout)
        if not response.success:
            raise QueryError(f"the node refused the query: {response.message}")
        matches = from_msg(response.matches)
        scores = np.asarray(response.scores, np.float32)
        xyz = np.stack([matches["x"], matches["y"], matches["z"]], 1)
        summary = summarize(xyz, scores, list(response.labels), radius=args.cluster_radius or None)
        print(format_summary(args.text, summary, response.message), file=out)
        if args.ply is not None:
            from geopurify_ros.ply import write_ply
            n = write_ply(args.ply, matches, comments=(f"query '{args.text}'", f"frame {response.matches.header.frame_id}"))
            print(f"wrote {args.ply} ({n} points)", file=out)
        if args.png is not None:
            if not session.spin_until(lambda: session.cloud is not None, args.timeout):
                print(f"{PROG}: warning: no map on {args.cloud_topic} within {args.timeout:g} s; "
                      f"the picture shows the matches only", file=err)
            cloud = from_msg(session.cloud) if session.cloud is not None else None
            write_png(args.png, args.text, cloud, matches, scores, session.classes, list(response.class_names), summary)
            print(f"wrote {args.png}", file=out)
        return 0
    finally:
        session.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args: list[str] = []
    if "--ros-args" in argv:                      # remaps, namespaces, ... go to rclpy
        i = argv.index("--ros-args")
        argv, ros_args = argv[:i], argv[i:]
    args = parse_args(argv)                       # exits 2 with a message on bad arguments
    try:
        return run(args, ros_args)
    except QueryError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:                        # PLY / PNG not writable
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
