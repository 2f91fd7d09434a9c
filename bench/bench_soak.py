#!/usr/bin/env python3
"""Soak test of the mapping node: RSS over thousands of frames with the map held at `max_voxels`.

Starts `geopurify-mapping --params config/mapping.yaml` as a subprocess (own ROS_DOMAIN_ID, torch on
`--threads` threads) and streams synthetic RGB-D + pose frames at `--rate` Hz: a camera sliding
along an endless textured wall, so every frame adds new voxels and, once the map reaches
`--max-voxels`, evicts old ones. Every `--sample-s` seconds it records the node's RSS
(/proc/PID/status VmRSS) and its /diagnostics counters, then prints the series and the growth
after warm-up (the first `--warmup` fraction of the frames): RSS must be flat once the map is full.
`--query-every N` also sends a ~/query with a new text every N frames; `--bad-every N` sends a
malformed input (wrong encoding, short data, far-future stamp, non-unit quaternion) every N frames.

    python bench/bench_soak.py [--frames 3000] [--rate 10] [--max-voxels 20000] [--threads 1]
    python bench/bench_soak.py --frames 300 --rate 20          # quick run
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 200 + 20))
ROOT = Path(__file__).resolve().parents[1]
TARGET_GROWTH_MB = 20.0          # RSS growth allowed after warm-up ("flat"), whatever the run length


def wall_frame(i: int, step_m: float, W: int, H: int):
    """Frame i of a camera sliding along x, looking at a wavy wall 2 m away along +y (optical z = +y)."""
    from geopurify_ros.camera import CameraModel, pose_to_matrix

    cam = CameraModel(W, H, 0.8 * W, 0.8 * W, (W - 1) / 2, (H - 1) / 2)
    x0 = i * step_m
    cols = (np.arange(W) - cam.cx) / cam.fx
    wx = x0 + 2.0 * cols                                          # wall x seen by each column (flat approx.)
    depth = np.broadcast_to((2.0 + 0.3 * np.sin(3.0 * wx)).astype(np.float32), (H, W)).copy()
    rows = np.arange(H)[:, None]
    stripes = (np.floor(wx * 4) % 2)[None, :]
    rgb = np.empty((H, W, 3), np.uint8)
    rgb[..., 0] = (120 + 100 * stripes + 0 * rows).astype(np.uint8)
    rgb[..., 1] = (60 + 50 * np.sin(wx)[None, :] + 30 * (rows % 20 < 10)).astype(np.uint8)
    rgb[..., 2] = 90
    # optical frame: x right = world +x, y down = world -z, z forward = world +y
    q = (-np.sqrt(0.5), 0.0, 0.0, np.sqrt(0.5))
    return rgb, depth, cam, pose_to_matrix([x0, 0.0, 1.2], q)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=10.0, help="frames per second published")
    ap.add_argument("--max-voxels", type=int, default=20000)
    ap.add_argument("--size", default="640x480", help="image WxH")
    ap.add_argument("--step-m", type=float, default=0.05, help="camera motion per frame [m]")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of the node")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=0.25, help="fraction of frames treated as warm-up")
    ap.add_argument("--query-every", type=int, default=0, help="a ~/query with a new text every N frames (0: none)")
    ap.add_argument("--bad-every", type=int, default=0, help="a malformed input every N frames (0: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--log", default=None, help="write the node log here (default: a temp dir)")
    args = ap.parse_args()
    W, H = (int(v) for v in args.size.split("x"))

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    from geopurify_ros.eval.ros_replay import stop_node_process
    from geopurify_ros.node import msg_convert as mc
    from geopurify_ros.ros_time import ns_to_stamp
    from geopurify_ros.srv import TextQuery

    tmp = Path(tempfile.mkdtemp(prefix="bench_soak_"))
    log_path = Path(args.log) if args.log else tmp / "node.log"
    over = {"device": args.device, "sensor_qos": "reliable", "max_voxels": args.max_voxels, "eviction": "farthest",
            "purify_period_s": 1.0, "keyframe_min_translation_m": 0.0, "keyframe_max_interval_s": 0.0,
            "queue_size": 4, "diagnostics_period_s": 1.0, "pose_max_age_s": 0.2}
    cmd = [shutil.which("geopurify-mapping"), "--params", str(ROOT / "config/mapping.yaml"), "--ros-args"]
    for k, v in over.items():
        cmd += ["-p", f"{k}:={v}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)

    rclpy.init()
    node = rclpy.create_node("bench_soak")
    rel = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
    pubs = {"info": node.create_publisher(CameraInfo, "/camera/color/camera_info", rel),
            "pose": node.create_publisher(PoseStamped, "/camera/pose", rel),
            "color": node.create_publisher(Image, "/camera/color/image_raw", rel),
            "depth": node.create_publisher(Image, "/camera/depth/image_raw", rel)}
    diag: dict[str, str] = {}
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diag.update(mc.diagnostics_values(m)), 10)
    query = node.create_client(TextQuery, "/geopurify_mapping/query")
    pending: list = []
    queries = answered = 0

    def spin_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            rclpy.spin_once(node, timeout_sec=max(0.0, min(0.01, end - time.monotonic())))
            if time.monotonic() >= end:
                return

    samples: list[tuple[int, float, float, dict]] = []     # (frames sent, seconds, RSS MB, diagnostics)
    try:
        t0 = time.monotonic()
        while not all(p.get_subscription_count() for p in pubs.values()) or "frames_fused" not in diag:
            if proc.poll() is not None or time.monotonic() - t0 > 300:
                print("node did not come up; log:\n" + log_path.read_text()[-3000:])
                return 1
            spin_for(0.1)
        print(f"node pid {proc.pid} ready after {time.monotonic() - t0:.1f} s; {args.frames} frames {W}x{H} at "
              f"{args.rate} Hz, max_voxels {args.max_voxels}, {args.threads} thread(s), log {log_path}", flush=True)
        print(f"{'frames':>7} {'s':>7} {'RSS MB':>8} {'in':>6} {'fused':>6} {'voxels':>7} {'dropped':>8}", flush=True)
        start = time.monotonic()
        next_sample = start
        base_ns = 1_000_000_000_000                    # stamps from t = 1000 s, 0.1 s apart
        for i in range(args.frames + 1):
            now = time.monotonic()
            if now >= next_sample or i == args.frames:
                d = dict(diag)
                samples.append((i, now - start, rss_mb(proc.pid), d))
                print(f"{i:7d} {now - start:7.1f} {samples[-1][2]:8.1f} {d.get('frames_in', '?'):>6} "
                      f"{d.get('frames_fused', '?'):>6} {d.get('map.voxels', '?'):>7} {d.get('dropped_total', '?'):>8}",
                      flush=True)
                next_sample += args.sample_s
            if i == args.frames:
                break
            rgb, depth, cam, T = wall_frame(i, args.step_m, W, H)
            st = ns_to_stamp(base_ns + i * 100_000_000)
            pubs["info"].publish(mc.camera_info_msg(cam, st, "camera"))
            pubs["pose"].publish(mc.pose_stamped_msg(T, st, "map"))
            pubs["color"].publish(mc.image_msg(rgb, "color", st, "camera", "rgb8"))
            pubs["depth"].publish(mc.image_msg(depth, "depth", st, "camera", "16UC1"))
            if args.bad_every and i % args.bad_every == 0:
                publish_bad(pubs, mc, i // args.bad_every, rgb, depth, cam, T, base_ns + i * 100_000_000 + 50_000_000)
            if args.query_every and i % args.query_every == 0 and len(pending) < 4:
                pending.append(query.call_async(TextQuery.Request(text=f"a thing number {i}", max_points=100)))
                queries += 1
            answered += sum(f.done() for f in pending)
            pending = [f for f in pending if not f.done()]
            spin_for(max(0.0, start + (i + 1) / args.rate - time.monotonic()))
            if proc.poll() is not None:
                print(f"node exited with {proc.returncode}; log:\n" + log_path.read_text()[-3000:])
                return 1
        spin_for(3.0)
        if args.query_every:
            print(f"queries sent {queries}, answered {answered}")
        samples.append((args.frames, time.monotonic() - start, rss_mb(proc.pid), dict(diag)))
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop_node_process(proc, 30)
    report(samples, args)
    return 0


def publish_bad(pubs, mc, k: int, rgb, depth, cam, T, stamp_ns: int) -> None:
    """One malformed input, cycling through kinds the node must drop without growing."""
    from geopurify_ros.ros_time import ns_to_stamp

    st = ns_to_stamp(stamp_ns)
    kind = k % 4
    if kind == 0:                                       # wrong encoding
        c = mc.image_msg(rgb, "color", st, "camera", "rgb8")
        c.encoding = "mono16"
        pubs["color"].publish(c)
        pubs["depth"].publish(mc.image_msg(depth, "depth", st, "camera", "16UC1"))
    elif kind == 1:                                     # data shorter than height x step
        d = mc.image_msg(depth, "depth", st, "camera", "16UC1")
        d.data = bytes(d.data)[: len(d.data) // 2]
        pubs["color"].publish(mc.image_msg(rgb, "color", st, "camera", "rgb8"))
        pubs["depth"].publish(d)
    elif kind == 2:                                     # far-future pose
        pubs["pose"].publish(mc.pose_stamped_msg(T, ns_to_stamp(stamp_ns + 10**15), "map"))
    else:                                               # non-unit quaternion
        msg = mc.pose_stamped_msg(T, st, "map")
        msg.pose.orientation.x, msg.pose.orientation.y = 0.1, 0.2
        msg.pose.orientation.z, msg.pose.orientation.w = 0.3, 0.4
        pubs["pose"].publish(msg)


def report(samples, args) -> None:
    frames = np.array([s[0] for s in samples], float)
    rss = np.array([s[2] for s in samples], float)
    last = samples[-1][3]
    warm = frames >= args.warmup * args.frames
    if warm.sum() < 2:
        print("too few samples after warm-up for a trend")
        return
    fw, rw = frames[warm], rss[warm]
    slope = np.polyfit(fw, rw, 1)[0] * 1000.0 if np.ptp(fw) > 0 else 0.0
    growth = rw[-1] - rw[0]
    print(f"\nfinal: frames_in {last.get('frames_in')}, fused {last.get('frames_fused')}, voxels {last.get('map.voxels')} "
          f"(max_voxels {args.max_voxels}), map_bytes {last.get('map.map_bytes')}, dropped {last.get('dropped_total')}")
    print(f"RSS: start {rss[0]:.1f} MB, after warm-up (frame {int(fw[0])}) {rw[0]:.1f} MB, end {rw[-1]:.1f} MB, "
          f"max {rss.max():.1f} MB")
    print(f"growth after warm-up: {growth:+.1f} MB over {int(fw[-1] - fw[0])} frames; "
          f"trend {slope:+.2f} MB / 1000 frames")
    print(f"target: growth <= {TARGET_GROWTH_MB:.0f} MB after warm-up -> ratio {max(growth, 0.0) / TARGET_GROWTH_MB:.2f} "
          f"({'flat' if growth <= TARGET_GROWTH_MB else 'GROWING'})")


if __name__ == "__main__":
    sys.exit(main())
