#!/usr/bin/env python3
"""Frame-in -> cloud-out latency of the mapping node over ROS (ms), plus query latency while mapping.

Starts `geopurify-mapping --params config/mapping.yaml` as a subprocess (own ROS_DOMAIN_ID), plays
RGB-D + pose frames one at a time and waits for the ~/labelled_cloud whose header stamp equals the
frame's stamp (the node stamps the cloud with the newest fused frame). Latency = publish -> receive,
so it includes transport, decoding, feature extraction, fusion, purification and cloud packing.
Then streams the frames again and measures ~/query round trips while the worker is busy.
Frames are the demo sequence (or a synthetic room) resized to --size (default 640x480: colour bilinear,
depth nearest, intrinsics scaled); --size native keeps the data's own size.

    python bench/bench_node_latency.py [--frames 12] [--size 640x480] [--data DIR] [--purify-period 0.02]
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


def resized(frames, size: tuple[int, int] | None):
    """Frames resized to (width, height): colour bilinear, depth nearest (no mixed depths), camera scaled."""
    if size is None:
        return frames
    import torch
    from types import SimpleNamespace
    w, h = size
    out = []
    for f in frames:
        rgb = torch.from_numpy(np.array(f.rgb)).permute(2, 0, 1)[None].float()
        rgb = torch.nn.functional.interpolate(rgb, (h, w), mode="bilinear", align_corners=False)
        depth = torch.nn.functional.interpolate(torch.from_numpy(np.array(f.depth))[None, None], (h, w), mode="nearest")
        out.append(SimpleNamespace(stamp=f.stamp, T_world_cam=f.T_world_cam, cam=f.cam.scaled(w, h),
                                   rgb=rgb[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy(),
                                   depth=depth[0, 0].numpy()))
    return out


def frames_from(data: str | None, n: int):
    """Demo sequence frames when available (DIR or the test cache), else a synthetic textured room corner."""
    from geopurify_ros.cache import cache_dir

    candidates = [data] if data else [str(cache_dir("demo_tiny_0"))]
    for c in candidates:
        if c and Path(c, "meta.json").is_file():
            from geopurify_ros.data.sequence import load_sequence
            return list(load_sequence(c))[:n], f"demo sequence {c}"
    from types import SimpleNamespace

    from geopurify_ros.camera import CameraModel, pose_to_matrix
    cam = CameraModel(160, 120, 128.0, 128.0, 79.5, 59.5)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        rgb = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
        depth = np.full((120, 160), 2.0, np.float32) + np.linspace(0, 0.5, 160, dtype=np.float32)[None]
        T = pose_to_matrix([0.1 * i, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0])
        out.append(SimpleNamespace(stamp=100.0 + 0.1 * i, rgb=rgb, depth=depth, cam=cam, T_world_cam=T))
    return out, "synthetic frames (no demo data found)"


def stats(xs):
    a = np.asarray(xs, dtype=np.float64)
    return f"median {np.median(a):7.1f}  p90 {np.percentile(a, 90):7.1f}  min {a.min():7.1f}  max {a.max():7.1f}  (n={len(a)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--data", default=None, help="demo output dir (geopurify-make-demo --out DIR)")
    ap.add_argument("--size", default="640x480", help="WIDTHxHEIGHT the frames are resized to, or 'native'")
    ap.add_argument("--purify-period", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--student", default=None, help="student checkpoint (default: shipped one, else untrained)")
    args = ap.parse_args()

    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image, PointCloud2

    from geopurify_ros.eval.ros_replay import stop_node_process
    from geopurify_ros.node import msg_convert as mc
    from geopurify_ros.purify import student
    from geopurify_ros.srv import TextQuery

    frames, source = frames_from(args.data, args.frames)
    frames = resized(frames, None if args.size == "native" else tuple(int(v) for v in args.size.split("x")))
    tmp = Path(tempfile.mkdtemp(prefix="bench_node_"))
    over = {"device": args.device, "sensor_qos": "reliable", "purify_period_s": args.purify_period,
            "keyframe_max_interval_s": 0.01, "keyframe_min_translation_m": 0.0, "queue_size": 64,
            "diagnostics_period_s": 0.2, "pose_max_age_s": 0.2}
    ckpt = args.student
    if ckpt is None and not Path(student.DEFAULT_CHECKPOINT).is_file():
        ckpt = str(tmp / "student_untrained.pt")
        student.StudentAffinityNet().save(ckpt)
    if ckpt:
        over["student_checkpoint"] = ckpt
    cmd = [shutil.which("geopurify-mapping"), "--params", str(ROOT / "config/mapping.yaml"), "--ros-args"]
    for k, v in over.items():
        cmd += ["-p", f"{k}:={v}"]
    log = open(tmp / "node.log", "w")
    t_start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))

    rclpy.init()
    node = rclpy.create_node("bench_node_latency")
    rel = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pubs = {"info": node.create_publisher(CameraInfo, "/camera/color/camera_info", rel),
            "pose": node.create_publisher(PoseStamped, "/camera/pose", rel),
            "color": node.create_publisher(Image, "/camera/color/image_raw", rel),
            "depth": node.create_publisher(Image, "/camera/depth/image_raw", rel)}
    arrivals: dict[float, float] = {}
    diags: list[dict] = []
    node.create_subscription(PointCloud2, "/geopurify_mapping/labelled_cloud",
                             lambda m: arrivals.setdefault(round(mc.stamp_to_sec(m.header.stamp), 6), time.monotonic()),
                             latched)
    node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: diags.append(mc.diagnostics_values(m)), 10)
    client = node.create_client(TextQuery, "/geopurify_mapping/query")

    def spin_until(pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end and not pred():
            rclpy.spin_once(node, timeout_sec=0.005)
        return pred()

    def publish(f, stamp, pose=True):
        st = mc.sec_to_stamp(stamp)
        pubs["info"].publish(mc.camera_info_msg(f.cam, st, "camera"))
        if pose:
            pubs["pose"].publish(mc.pose_stamped_msg(f.T_world_cam, st, "map"))
        rclpy.spin_once(node, timeout_sec=0.002)
        pubs["color"].publish(mc.image_msg(f.rgb, "color", st, "camera", "rgb8"))
        pubs["depth"].publish(mc.image_msg(f.depth, "depth", st, "camera", "16UC1"))

    try:
        if not client.wait_for_service(timeout_sec=240) or \
                not spin_until(lambda: all(p.get_subscription_count() for p in pubs.values()), 60):
            print("node did not come up; log:\n" + (tmp / "node.log").read_text()[-3000:])
            return 1
        print(f"data: {source}; {len(frames)} frames {frames[0].rgb.shape[1]}x{frames[0].rgb.shape[0]}; "
              f"node ready after {time.monotonic() - t_start:.1f} s; purify_period_s={args.purify_period}")
        # 1) one frame at a time: frame-in -> cloud-out
        lat, parts, misses = [], [], 0
        for f in frames:
            stamp = round(float(f.stamp), 6)
            t0 = time.monotonic()
            publish(f, stamp)
            if not spin_until(lambda: stamp in arrivals, 60):
                misses += 1
                d = diags[-1] if diags else {}
                print(f"no cloud for frame {stamp} (dropped.worker_error={d.get('dropped.worker_error')}); "
                      f"see {tmp / 'node.log'}", flush=True)
                if misses >= 3:
                    break
                continue
            lat.append((arrivals[stamp] - t0) * 1e3)
            if diags:
                d = diags[-1]
                parts.append([float(d.get(k, "nan")) for k in ("worker.frame_ms", "worker.purify_ms", "worker.cloud_ms")])
        if not lat:
            print("no latency measured")
            return 1
        print(f"frame-in -> cloud-out latency [ms]: {stats(lat)}", flush=True)
        if parts:
            p = np.nanmedian(np.asarray(parts), axis=0)
            print(f"  worker medians [ms]: process_frame {p[0]:.1f}, purify {p[1]:.1f}, labelled_cloud {p[2]:.1f}; "
                  f"transport+decode+wait ~ {np.median(lat) - p.sum():.1f}")
        # 2) queries while the worker is busy: stream the frames again (new stamps), query meanwhile
        base = float(frames[-1].stamp) + 10.0
        qlat = []
        # Poses first: streamed images can overtake their pose on another topic (dropped as pose_stale then).
        for i, f in enumerate(frames):
            pubs["pose"].publish(mc.pose_stamped_msg(f.T_world_cam, mc.sec_to_stamp(round(base + 0.1 * i, 6)), "map"))
        spin_until(lambda: False, 0.2)
        for i, f in enumerate(frames):
            publish(f, round(base + 0.1 * i, 6), pose=False)
            t0 = time.monotonic()
            fut = client.call_async(TextQuery.Request(text="chair", max_points=100))
            if spin_until(fut.done, 60):
                qlat.append((time.monotonic() - t0) * 1e3)
        print(f"~/query round trip while mapping [ms]: {stats(qlat)}")
        def drained():
            d = diags[-1] if diags else {}
            done = sum(int(d.get(k, 0)) for k in ("frames_fused", "dropped.queue_full", "dropped.worker_error"))
            return d.get("queue_depth") == "0" and done >= int(d.get("keyframes", 1 << 30))
        t0 = time.monotonic()
        spin_until(drained, 120)
        print(f"  backlog of {len(frames)} streamed frames drained {time.monotonic() - t0:.1f} s after the last query")
        if diags:
            d = diags[-1]
            drops = {k: v for k, v in d.items() if k.startswith("dropped.") and v != "0"}
            print(f"diagnostics: frames_in {d.get('frames_in')}, fused {d.get('frames_fused')}, "
                  f"voxels {d.get('map.voxels')}, drops {drops or 'none'}")
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
        stop_node_process(proc, 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
