"""`geopurify_mapping`: the thin rclpy layer around `MappingPipeline`.

Callbacks only validate, convert and enqueue. One worker thread (`MapWorker`) runs the heavy work
(feature extraction + fusion, incremental purification) from a bounded drop-oldest queue; a
MultiThreadedExecutor with separate callback groups keeps subscriptions, timers and services
responsive meanwhile. See docs/NODE.md for topics, parameters and services.

    geopurify-mapping --params config/mapping.yaml [--ros-args ...]
    ros2 run geopurify_ros mapping_node --ros-args --params-file config/mapping.yaml
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from geopurify_ros.msg import ClassList
from geopurify_ros.srv import MapFile, TextQuery

from geopurify_ros.node import msg_convert as mc
from geopurify_ros.node import params as node_params
from geopurify_ros.node import heap
from geopurify_ros.node.pose_source import (MessagePoseSource, PoseBuffer, PoseLookupError, TfPoseSource,
                                            TfUnavailable, extrinsic_from_param)
from geopurify_ros.node.sync import ApproximateTimeSync, KeyframeSelector
from geopurify_ros.node.time_guard import TimeJumpGuard
from geopurify_ros.palette import colorize
from geopurify_ros.ros_time import NS_PER_S, ns_to_stamp, sec_to_ns, stamp_to_ns

NODE_NAME = "geopurify_mapping"


@dataclass
class Keyframe:
    stamp_ns: int          # the colour image's header stamp, exactly
    rgb: np.ndarray
    depth: np.ndarray
    cam: Any
    T_world_cam: np.ndarray
    t_in: float            # time.monotonic() when the pair was received


class MapWorker:
    """Runs pipeline work off the executor: keyframes (bounded, drop-oldest) and purify requests."""

    def __init__(self, pipeline: Any, queue_size: int, on_drop: Callable[[str, str], None],
                 on_cloud: Callable[[np.ndarray, int | None], None]) -> None:
        self.pipeline = pipeline
        self.on_drop = on_drop
        self.on_cloud = on_cloud
        self.exec_lock = threading.Lock()      # held while one task runs; services take it to reset/load
        self._frames: deque[Keyframe] = deque()
        self._queue_size = queue_size
        self._cv = threading.Condition()
        self._purify_requested = False
        self._stop = False
        self.changed = False
        self.last_stamp_ns: int | None = None      # newest fused frame: the cloud's stamp
        self.stats = Counter()
        self.timings = {"frame_ms": 0.0, "purify_ms": 0.0, "cloud_ms": 0.0, "queue_wait_ms": 0.0}
        self._thread = threading.Thread(target=self._run, name="geopurify_worker", daemon=True)
        self._thread.start()

    def submit(self, frame: Keyframe) -> None:
        with self._cv:
            self._frames.append(frame)
            while len(self._frames) > self._queue_size:
                old = self._frames.popleft()
                self.on_drop("queue_full", f"worker busy, dropped keyframe {old.stamp_ns / NS_PER_S:.3f}")
            self._cv.notify()

    def request_purify(self) -> None:
        with self._cv:
            self._purify_requested = True
            self._cv.notify()

    def clear(self) -> None:
        with self._cv:
            self._frames.clear()

    def depth(self) -> int:
        return len(self._frames)

    def mark_changed(self) -> None:
        self.changed = True

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._frames or self._purify_requested or self._stop):
                    self._cv.wait()
                if self._stop:
                    return
                purify = self._purify_requested and (self.changed or not self._frames)
                frame = None
                if purify:
                    self._purify_requested = False
                else:
                    frame = self._frames.popleft()
            with self.exec_lock:
                try:
                    if frame is not None:
                        self._fuse(frame)
                    elif self.changed:
                        self._purify_and_publish()
                except Exception as exc:  # the node must survive anything the pipeline raises
                    self.on_drop("worker_error", f"{type(exc).__name__}: {exc}")

    def _fuse(self, frame: Keyframe) -> None:
        t0 = time.monotonic()
        self.timings["queue_wait_ms"] = (t0 - frame.t_in) * 1e3
        self.pipeline.process_frame(frame.rgb, frame.depth, frame.cam, frame.T_world_cam,
                                    frame.stamp_ns / NS_PER_S)
        self.timings["frame_ms"] = (time.monotonic() - t0) * 1e3
        self.stats["frames_fused"] += 1
        self.last_stamp_ns = frame.stamp_ns
        self.changed = True

    def _purify_and_publish(self) -> None:
        self.changed = False
        t0 = time.monotonic()
        try:
            self.pipeline.purify(incremental=True)
        except Exception as exc:  # still publish what the map holds (raw features where not purified)
            self.on_drop("worker_error", f"purify failed: {type(exc).__name__}: {exc}")
        t1 = time.monotonic()
        cloud = self.pipeline.labelled_cloud()
        self.timings["purify_ms"] = (t1 - t0) * 1e3
        self.timings["cloud_ms"] = (time.monotonic() - t1) * 1e3
        self.stats["purify_runs"] += 1
        self.on_cloud(cloud, self.last_stamp_ns)


LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)


class MappingNode(Node):
    """Subscribes RGB-D + CameraInfo + poses, fuses keyframes, publishes the labelled map, answers queries."""

    def __init__(self, pipeline: Any = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self.pcfg, self.cfg = node_params.split_params(node_params.declare_and_read(self))  # ValueError names it
        if self.cfg.torch_threads:
            import torch        # OpenMP workers spin while they wait: more than the free cores slows every frame
            torch.set_num_threads(self.cfg.torch_threads)
        self.counters: Counter = Counter({k: 0 for k in ("frames_in", "keyframes", "skipped_not_keyframe",
                                                         "clouds_published", "time_jumps")})
        self.counters.update({f"dropped.{r}": 0 for r in mc.DROP_REASONS})
        self._last_warn: dict[str, float] = {}
        self._count_lock = threading.Lock()
        self.cam = None
        self.keyframes = KeyframeSelector(self.cfg.keyframe_min_translation_m, self.cfg.keyframe_min_rotation_deg,
                                          self.cfg.keyframe_max_interval_s)
        self.time_guard = TimeJumpGuard(sec_to_ns(self.cfg.max_time_jump_s), self._on_time_jump)
        self._groups = {k: MutuallyExclusiveCallbackGroup() for k in ("sensors", "services", "timers")}
        self.poses = self._make_pose_source()            # before the pipeline: a missing tf2_ros fails fast
        if pipeline is None:
            from geopurify_ros.pipeline import MappingPipeline
            pipeline = MappingPipeline(self.pcfg)
        self.pipeline = pipeline
        self._make_outputs()
        self.worker = MapWorker(self.pipeline, self.cfg.queue_size, self._drop, self._publish_cloud)
        self._sync_backend = self._make_inputs()
        self._make_services_and_timers()
        self.get_logger().info(
            f"ready: pose_source={self.cfg.pose_source} sync={self._sync_backend} qos={self.cfg.sensor_qos} "
            f"device={getattr(self.pipeline, 'device', self.pcfg.device)} backend={self.pcfg.feature_backend}")

    # ------------------------------------------------------------------ construction
    def _sensor_qos(self) -> QoSProfile:
        if self.cfg.sensor_qos == "best_effort":
            return qos_profile_sensor_data
        # reliable = replay: keep a backlog deep enough that a busy executor (the GIL is shared with
        # the torch worker) never overwrites unread images, which would drop their partners too
        return QoSProfile(depth=max(50, self.cfg.sync_queue_size), reliability=ReliabilityPolicy.RELIABLE)

    def _make_pose_source(self) -> Any:
        cfg = self.cfg
        if cfg.pose_source == "tf":
            return TfPoseSource(self, cfg.map_frame, cfg.pose_max_age_s, max(cfg.pose_buffer_s, 1.0))
        source = MessagePoseSource(cfg.pose_source, cfg.map_frame, PoseBuffer(cfg.pose_max_age_s, cfg.pose_buffer_s),
                                   extrinsic_from_param(cfg.base_to_camera))
        msg_type, topic = (PoseStamped, cfg.pose_topic) if cfg.pose_source == "pose" else (Odometry, cfg.odom_topic)
        # Poses: deeper history (high rate), same reliability as the sensors.
        qos = QoSProfile(depth=100, reliability=self._sensor_qos().reliability)
        self.create_subscription(msg_type, topic, self._on_pose, qos, callback_group=self._groups["sensors"])
        return source

    def _make_outputs(self) -> None:
        cfg = self.cfg
        cloud_qos = LATCHED_QOS if cfg.cloud_transient_local else QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        self.cloud_pub = self.create_publisher(PointCloud2, "~/labelled_cloud", cloud_qos)
        self.class_pub = self.create_publisher(ClassList, "~/class_names", LATCHED_QOS)
        self.marker_pub = self.create_publisher(MarkerArray, "~/query_markers", LATCHED_QOS) \
            if cfg.publish_query_markers else None
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10) if cfg.publish_diagnostics else None
        self.class_pub.publish(mc.class_list_msg(self.pipeline.class_names, cfg.map_frame,
                                                 self.get_clock().now().to_msg()))

    def _make_services_and_timers(self) -> None:
        services, timers = self._groups["services"], self._groups["timers"]
        self.create_service(TextQuery, "~/query", self._on_query, callback_group=services)
        self.create_service(MapFile, "~/save_map", self._on_save, callback_group=services)
        self.create_service(MapFile, "~/load_map", self._on_load, callback_group=services)
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=services)
        self.create_timer(self.cfg.purify_period_s, self.worker.request_purify, callback_group=timers)
        self.create_timer(heap.TRIM_PERIOD_S, heap.trim, callback_group=timers)   # freed arena pages back to the OS
        if self.diag_pub is not None:
            self.create_timer(self.cfg.diagnostics_period_s, self._publish_diagnostics, callback_group=timers)

    # ------------------------------------------------------------------ inputs
    def _make_inputs(self) -> str:
        """CameraInfo + colour/depth pairs (message_filters when importable, else sync.ApproximateTimeSync)."""
        cfg, qos, group, image_type = self.cfg, self._sensor_qos(), self._groups["sensors"], Image
        self.create_subscription(CameraInfo, cfg.camera_info_topic, self._on_info, qos, callback_group=group)
        try:
            import message_filters
        except ImportError:
            message_filters = None
        if message_filters is not None:
            subs = [message_filters.Subscriber(self, image_type, t, qos_profile=qos, callback_group=group)
                    for t in (cfg.color_topic, cfg.depth_topic)]
            self._mf_sync = message_filters.ApproximateTimeSynchronizer(subs, cfg.sync_queue_size, cfg.sync_slop_s)
            self._mf_sync.registerCallback(self._on_rgbd)
            return "message_filters"
        self._sync = ApproximateTimeSync(self._on_rgbd, sec_to_ns(cfg.sync_slop_s), cfg.sync_queue_size,
                                         on_drop=lambda detail: self._drop("sync_unmatched", detail))
        for i, (stream, topic) in enumerate((("colour", cfg.color_topic), ("depth", cfg.depth_topic))):
            self.create_subscription(image_type, topic, lambda m, i=i, stream=stream: self._on_image(i, stream, m),
                                     qos, callback_group=group)
        return "builtin"

    def _check_time(self, stream: str, stamp_ns: int) -> bool:
        """Time-jump handling before a stamped message touches any state; False: dropped (far future)."""
        try:
            self.time_guard.check(stream, stamp_ns, self.get_clock().now().nanoseconds)
        except mc.FrameRejected as exc:
            self._drop(exc.reason, exc.detail)
            return False
        return True

    def _on_time_jump(self, reason: str) -> None:
        self.get_logger().warning(f"{reason}: clearing the pose buffer, the synchroniser and the keyframe gate")
        self._clear_inputs()
        self.counters["time_jumps"] += 1

    def _clear_inputs(self) -> None:
        """Forget every time-ordered input state: poses, unpaired images, the keyframe gate."""
        self.poses.clear()
        sync = getattr(self, "_sync", None)
        if sync is not None:
            sync.reset()
        mf = getattr(self, "_mf_sync", None)
        if mf is not None and hasattr(mf, "queues"):      # message_filters' TimeSynchronizer state
            with mf.lock:
                for q in mf.queues:
                    q.clear()
        self.keyframes.reset()

    def _on_image(self, stream_index: int, stream: str, msg: Any) -> None:
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if self._check_time(stream, stamp_ns):
            self._sync.add(stream_index, stamp_ns, msg)

    def _on_info(self, msg: Any) -> None:
        try:
            self.cam = mc.camera_info_to_model(msg)
        except mc.FrameRejected as exc:
            self._drop(exc.reason, exc.detail)

    def _on_pose(self, msg: Any) -> None:
        try:
            stamp_ns = stamp_to_ns(msg.header.stamp)
            if self._check_time("pose", stamp_ns):
                self.poses.on_message(msg)
        except PoseLookupError as exc:
            self._drop(exc.reason, exc.detail)

    def _on_rgbd(self, color: Any, depth: Any) -> None:
        t_in = time.monotonic()
        self.counters["frames_in"] += 1
        stamp_ns = stamp_to_ns(color.header.stamp)
        if not self._check_time("rgbd", stamp_ns):
            return
        p = self.pcfg
        try:
            rgb, d = mc.decode_rgbd(color, depth, self.cam, self.cfg.color_encoding, self.cfg.depth_encoding,
                                    (p.stride, p.min_depth, p.max_depth))
            T = self.poses.lookup(stamp_ns, self.cfg.camera_frame or color.header.frame_id)
        except (mc.FrameRejected, PoseLookupError) as exc:
            self._drop(exc.reason, exc.detail)
            return
        except Exception as exc:  # never let a message kill the node
            self._drop("bad_data", f"{type(exc).__name__}: {exc}")
            return
        stamp_s = stamp_ns / NS_PER_S
        if not self.keyframes.is_keyframe(stamp_s, T):
            self.counters["skipped_not_keyframe"] += 1
            return
        self.keyframes.accept(stamp_s, T)
        self.counters["keyframes"] += 1
        self.worker.submit(Keyframe(stamp_ns, rgb, d, self.cam, T, t_in))

    def _drop(self, reason: str, detail: str) -> None:
        with self._count_lock:                      # called from executor threads and the worker
            self.counters[f"dropped.{reason}"] += 1
            count = self.counters[f"dropped.{reason}"]
            now = time.monotonic()
            warn = now - self._last_warn.get(reason, -1e9) >= self.cfg.warn_throttle_s
            if warn:
                self._last_warn[reason] = now
        if warn:
            self.get_logger().warning(f"dropped ({reason}, {count} so far): {detail}")

    # ------------------------------------------------------------------ outputs
    def _publish_cloud(self, cloud: np.ndarray, stamp_ns: int | None) -> None:
        """Stamp = the newest fused frame's stamp, exactly (the node clock while nothing was fused)."""
        if self.cfg.cloud_color == "semantic":
            cloud = colorize(cloud, len(self.pipeline.class_names))
        stamp = self.get_clock().now().to_msg() if stamp_ns is None else ns_to_stamp(stamp_ns)
        self.cloud_pub.publish(mc.cloud_to_msg(cloud, self.cfg.map_frame, stamp))
        self.counters["clouds_published"] += 1

    def diagnostics(self) -> dict[str, Any]:
        values: dict[str, Any] = dict(sorted(self.counters.items()))
        values["dropped_total"] = sum(v for k, v in self.counters.items() if k.startswith("dropped."))
        values["frames_fused"] = self.worker.stats["frames_fused"]
        values["purify_runs"] = self.worker.stats["purify_runs"]
        values["queue_depth"] = self.worker.depth()
        values.update({f"worker.{k}": v for k, v in self.worker.timings.items()})
        try:
            values.update({f"map.{k}": v for k, v in self.pipeline.stats().items()})
        except Exception as exc:
            values["map.error"] = str(exc)
        return values

    def _publish_diagnostics(self) -> None:
        values = self.diagnostics()
        drops = {k[8:]: v for k, v in values.items() if k.startswith("dropped.")}
        recent = sorted(k for k, v in drops.items() if v > getattr(self, "_last_drops", {}).get(k, 0))
        self._last_drops = drops
        level, message = (1, "dropping input: " + ", ".join(recent)) if recent else (0, "ok")
        self.diag_pub.publish(mc.diagnostics_msg(self.get_name(), str(self.pcfg.device), values,
                                                 self.get_clock().now().to_msg(), level, message))

    # ------------------------------------------------------------------ services
    def _on_query(self, request: Any, response: Any) -> Any:
        stamp = self.get_clock().now().to_msg()
        try:
            result = self.pipeline.query(request.text, negatives=list(request.negative_prompts),
                                         threshold=float(request.threshold) or None,
                                         max_points=int(request.max_points) or None)
            mc.fill_query_response(response, result, self.cfg.map_frame, stamp)
            if self.marker_pub is not None:
                self.marker_pub.publish(mc.query_markers(result.cloud, self.cfg.map_frame, stamp,
                                                         request.text, self.pcfg.voxel_size))
        except Exception as exc:
            response.success = False
            response.message = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ValueError):
                self.get_logger().error(f"query failed: {response.message}")
        return response

    def _on_save(self, request: Any, response: Any) -> Any:
        return self._map_op(response, request.path, lambda p: self.pipeline.save(p), "saved", lock=False)

    def _on_load(self, request: Any, response: Any) -> Any:
        return self._map_op(response, request.path, lambda p: self.pipeline.load(p), "loaded", lock=True)

    def _map_op(self, response: Any, path: str, op: Callable[[str], None], verb: str, lock: bool) -> Any:
        if not path.strip():
            response.success, response.message = False, "path: empty"
            return response
        try:
            if lock:
                with self.worker.exec_lock:
                    self.worker.clear()
                    op(path)
                    self.keyframes.reset()
                    self.worker.mark_changed()
            else:
                op(path)
            response.success, response.message = True, f"{verb} {path}: {self.pipeline.stats().get('voxels')} voxels"
        except Exception as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
        self.get_logger().info(f"{verb if response.success else 'failed'}: {response.message}")
        return response

    def _on_reset(self, request: Any, response: Any) -> Any:
        try:
            with self.worker.exec_lock:
                self.worker.clear()
                self.pipeline.reset()
                self._clear_inputs()
                self.time_guard.reset()
                self.worker.last_stamp_ns = None
                self.worker.mark_changed()
            response.success, response.message = True, \
                "cleared the map, the keyframe queue, the keyframe gate, the pose buffer and the synchroniser"
        except Exception as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
        return response

    def destroy_node(self) -> None:
        worker = getattr(self, "worker", None)   # absent when the constructor failed
        if worker is not None:
            worker.stop()
        super().destroy_node()


def translate_args(argv: list[str]) -> list[str]:
    """`--params FILE` (before any --ros-args) -> `--ros-args --params-file FILE`; the rest passes through."""
    out: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--ros-args":
            out.extend(argv[i:])
            break
        if a == "--params" and i + 1 < len(argv):
            extra += ["--ros-args", "--params-file", argv[i + 1], "--"]
            i += 2
            continue
        if a.startswith("--params="):
            extra += ["--ros-args", "--params-file", a.split("=", 1)[1], "--"]
            i += 1
            continue
        if a in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        out.append(a)
        i += 1
    return extra + out


class _StopSignals:
    """SIGINT/SIGTERM handler that only records the request; it never raises.

    rclpy's own handler (installed by rclpy.init on top of this one, which it chains to) shuts the
    context down, so `spin()` returns. Python's default handler raised KeyboardInterrupt wherever the
    main thread was: `ros2 launch` forwards SIGINT to a node whose process group already got one from
    the terminal, and that second one landed in destroy_node() (traceback, exit -2)."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def _startup_error(message: str, status: int) -> int:
    print(f"[{NODE_NAME}] startup error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Run the node; exit status 0 on a clean stop (SIGINT/SIGTERM), 2 on a bad parameter / argument, 1 on
    another startup failure (e.g. a missing checkpoint)."""
    heap.configure()                       # before the big allocations: flat RSS, no per-frame page faults
    stop = _StopSignals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        return _run(argv, stop)
    finally:
        # Python resets its handlers to the default (die by signal: exit -2 / -15) while it finalizes,
        # which takes a moment with torch loaded; ignored signals stay ignored through that.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _run(argv: list[str] | None, stop: _StopSignals) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    args = translate_args(list(sys.argv[1:] if argv is None else argv))
    for i, a in enumerate(args[:-1]):
        if a == "--params-file":
            from pathlib import Path
            if not Path(args[i + 1]).is_file():
                return _startup_error(f"params file: {args[i + 1]} does not exist", 2)
    try:
        rclpy.init(args=[sys.argv[0]] + args)
    except Exception as exc:                         # e.g. unparsable --ros-args
        return _startup_error(f"{type(exc).__name__}: {exc}", 2)
    try:
        executor = MultiThreadedExecutor(num_threads=4)
        node = MappingNode()
    except Exception as exc:
        rclpy.try_shutdown()
        if stop.requested:                           # stopped while starting: rclpy shut the context down
            return 0
        if isinstance(exc, (ValueError, TfUnavailable)):  # bad parameter / missing tf2_ros: name it, exit 2
            return _startup_error(str(exc), 2)
        return _startup_error(f"{type(exc).__name__}: {exc}", 1)  # e.g. missing checkpoint / backend weights
    try:
        if not stop.requested:
            executor.add_node(node)
            executor.spin()                          # returns once a signal shut the context down
    except ExternalShutdownException:
        pass
    except Exception:
        if not stop.requested:                       # else: the context went away under the requested stop
            raise
    finally:
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
