"""Replay a bag through the real mapping node over ROS topics and collect its final labelled cloud.

The node runs as a subprocess (`geopurify-mapping`, the console script users deploy) with
`use_sim_time`, reliable sensor QoS and the evaluator's class table. We publish `/clock` and the
bag's colour / depth / CameraInfo messages unchanged (raw CDR); poses go out as PoseStamped of the
camera optical frame, converted from whatever the bag has (PoseStamped, Odometry, /tf), so every
pose source works even where tf2_ros is not installed.

Pacing: `rate=None` ("fast") keeps at most FAST_WINDOW frames in flight: it sends the next frame once the
node's /diagnostics counters show that all but FAST_WINDOW - 1 of the frames sent were paired, gated and fused
(or skipped), so the node's worker never waits for the round trip (fewer in flight than the node's queue:
no queue drops, deterministic frames);
`rate=R` publishes at R x recorded speed and lets the node drop what it cannot keep up with.
At the end the clock is advanced one purify period so the node purifies everything and publishes
the final cloud. In fast mode the node's `purify_period_s` is set to FAST_PURIFY_PERIOD_S, so, as the
offline replay, it fuses every frame and purifies once at the end: the periodic passes a live node runs
(every `purify_period_s` of sim time, 0.5-3.7 s each on the demo bag on 2 busy cores) would otherwise
dominate the replay time without changing the final map (an incremental pass equals a full one). With
`rate=R` the user's period is kept, as on a robot. The other purify modes are scored on the same fused map: `~/save_map`, then
`MappingPipeline.load` + purify per mode in-process (fuse once, purify three ways).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import EvalError
from ..data.bag_source import BagSource
from .replay import MODES, ReplayResult, _on_worker_thread

NODE = "geopurify_mapping"
EVAL_POSE_TOPIC = "/geopurify_eval/camera_pose"
DIAG_PERIOD_S = 0.002           # sim seconds; every /clock step we send then yields one diagnostics message
FAST_PURIFY_PERIOD_S = 3600.0   # fast mode: no periodic purification (the node's maximum period)
FAST_WINDOW = 2                 # fast mode: frames in flight (capped below the node's queue_size)
MAX_POLL_S = 0.05               # longest wait between two acknowledgement polls (each one costs the node a
FRAME_POLL_S = 0.025            # diagnostics message); first poll after sending a frame
_CDR_STAMP_END = 12             # CDR encapsulation (4 bytes) + header.stamp (sec, nanosec): what follows is the content


def node_command() -> list[str]:
    exe = shutil.which("geopurify-mapping")
    return [exe] if exe else [sys.executable, "-m", "geopurify_ros.node.mapping_node"]


def stop_node_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGINT (rclpy shuts the node down cleanly), `timeout_s` to exit, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def node_threads(params: dict[str, Any]) -> int:
    """The node's CPU threads in a replay: the user's `torch_threads`, else one core fewer than the machine has.

    The replaying process runs beside the node; OpenMP workers spin while they wait, so a node with a thread
    per core made every frame ~1.5x slower on 2 cores (bench/bench_replay.py)."""
    return int(params.get("torch_threads") or max(1, (os.cpu_count() or 2) - 1))


def write_node_params(path: Path, params: dict[str, Any], class_names: list[str], fast: bool = False) -> None:
    """The user's params plus what replay needs: sim time, reliable QoS, poses from our PoseStamped topic;
    `fast` (acknowledged pacing): purification only when the replay advances the clock at the end."""
    import yaml

    p = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
    if fast:
        p["purify_period_s"] = FAST_PURIFY_PERIOD_S
    p["torch_threads"] = node_threads(params)
    p.update(use_sim_time=True, sensor_qos="reliable", pose_source="pose", pose_topic=EVAL_POSE_TOPIC,
             class_names=list(class_names), diagnostics_period_s=DIAG_PERIOD_S, publish_diagnostics=True,
             color_encoding="", depth_encoding="")
    # Poses we publish are already the camera optical frame in map_frame: no extrinsic to apply.
    p.pop("base_to_camera", None)
    path.write_text(yaml.safe_dump({NODE: {"ros__parameters": p}}, sort_keys=False))


class _Listener:
    """Our side of the graph: publishers for inputs, subscribers for diagnostics and the cloud."""

    def __init__(self, node, topics: dict[str, Any]) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2

        self.node = node
        rel = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.clock = node.create_publisher(Clock, "/clock", 10)
        self.pubs = {topics["color"]: node.create_publisher(Image, topics["color"], rel),
                     topics["depth"]: node.create_publisher(Image, topics["depth"], rel),
                     topics["camera_info"]: node.create_publisher(CameraInfo, topics["camera_info"], rel)}
        self.pose = node.create_publisher(PoseStamped, EVAL_POSE_TOPIC, QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
        self._lock = threading.Lock()
        self.diag: dict[str, str] = {}
        self.diag_count = 0
        self.clouds: list[Any] = []
        self.now = -np.inf
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        node.create_subscription(PointCloud2, f"/{NODE}/labelled_cloud", self._on_cloud, latched)

    def _on_diag(self, msg) -> None:
        for st in msg.status:
            if st.name.startswith(NODE):
                with self._lock:
                    self.diag = {kv.key: kv.value for kv in st.values}
                    self.diag_count += 1

    def _on_cloud(self, msg) -> None:
        with self._lock:
            self.clouds.append(msg)

    def snapshot(self) -> tuple[int, dict[str, str]]:
        with self._lock:
            return self.diag_count, dict(self.diag)

    def tick(self, t: float | None = None) -> float:
        """Publish /clock: at least `t` (a frame stamp), else a small step ahead; never backwards.

        Each step longer than the diagnostics period makes the node publish one diagnostics message, so
        waiting costs a little sim time; the clock catches up with the bag again at the next stamp gap.
        """
        from rosgraph_msgs.msg import Clock

        from geopurify_ros.ros_time import sec_to_stamp

        step = self.now + DIAG_PERIOD_S * 1.1
        self.now = step if t is None else max(step, t)
        self.clock.publish(Clock(clock=sec_to_stamp(self.now)))
        return self.now

    def publish_pose(self, t: float, T: np.ndarray, frame: str) -> None:
        from geopurify_ros.node.msg_convert import pose_stamped_msg, sec_to_stamp

        self.pose.publish(pose_stamped_msg(T, sec_to_stamp(t), frame))


def _i(d: dict[str, str], key: str) -> int:
    try:
        return int(float(d.get(key, 0)))
    except ValueError:
        return 0


def _completed(d: dict[str, str]) -> int:
    """Pairs the node is done with: paired (frames_in) minus keyframes still queued or being fused."""
    pending = _i(d, "keyframes") - _i(d, "frames_fused") - _i(d, "dropped.queue_full") - _i(d, "dropped.worker_error")
    return _i(d, "frames_in") - pending


def _settled(d: dict[str, str], pairs_sent: int) -> bool:
    """All pairs sent so far reached the node and every accepted keyframe was fused (or dropped)."""
    done = _i(d, "frames_fused") + _i(d, "dropped.queue_full") + _i(d, "dropped.worker_error")
    return _i(d, "frames_in") >= pairs_sent and done >= _i(d, "keyframes") and _i(d, "queue_depth") == 0


class _Quiet:
    """Condition: worker idle and the frame counters unchanged over several diagnostics messages."""

    KEYS = ("frames_in", "keyframes", "frames_fused", "dropped_total")

    def __init__(self, polls: int = 10) -> None:
        self.polls, self.last, self.same = polls, None, 0

    def __call__(self, d: dict[str, str]) -> bool:
        now = tuple(_i(d, k) for k in self.KEYS)
        self.same = self.same + 1 if now == self.last else 0
        self.last = now
        return self.same >= self.polls and _settled(d, 0)


class _NodeProcess:
    def __init__(self, params_file: Path, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(node_command() + ["--params", str(params_file)], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise EvalError(f"mapping node exited with status {self.proc.returncode}: {self.tail()}")

    def tail(self, n: int = 3) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-n:])[-600:]

    def stop(self) -> None:
        stop_node_process(self.proc, 10)
        self._log.close()


def replay_ros(source: BagSource, params: dict[str, Any], class_names: list[str],
               modes=MODES, max_frames: int | None = None, rate: float | None = None, timeout: float = 120.0,
               progress: bool = True, domain_id: int | None = None, workdir: str | Path | None = None) -> ReplayResult:
    """Run the node on the bag's frames; returns the node's final cloud(s) and throughput."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from tqdm import tqdm

    if rate is not None and rate <= 0:
        raise EvalError(f"--rate: must be > 0 (got {rate})")
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="geopurify_eval_"))
    tmp.mkdir(parents=True, exist_ok=True)
    params_file = tmp / "node_params.yaml"
    write_node_params(params_file, params, class_names, fast=rate is None)
    # A private DDS domain (30..99: RTPS ports stay below the Linux ephemeral range) on localhost:
    # our /clock must never reach anyone else's nodes. GEOPURIFY_EVAL_DOMAIN_ID pins it.
    domain = domain_id if domain_id is not None else int(os.environ.get("GEOPURIFY_EVAL_DOMAIN_ID", os.getpid() % 70 + 30))
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
    env.setdefault("OMP_NUM_THREADS", str(node_threads(params)))   # also the thread pools torch does not own
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

    t = source.topics
    topics = {"color": params.get("color_topic", t.color), "depth": params.get("depth_topic", t.depth),
              "camera_info": params.get("camera_info_topic", t.camera_info)}
    map_frame = params.get("map_frame", t.map_frame)
    period = FAST_PURIFY_PERIOD_S if rate is None else float(params.get("purify_period_s", 1.0))
    bag_to_node = {t.color: topics["color"], t.depth: topics["depth"], t.camera_info: topics["camera_info"]}
    retype = _encoding_rewriter(source)
    pose_stamps, pose_mats = source.pose_samples()

    node_proc = _NodeProcess(params_file, env, tmp / "node.log")
    import torch
    replayer_threads = torch.get_num_threads()
    torch.set_num_threads(1)        # this process streams bytes meanwhile: its OpenMP pool must not compete
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=domain)
    executor = None
    try:
        me = rclpy.create_node("geopurify_eval_replay", context=ctx)
        lis = _Listener(me, topics)
        executor = SingleThreadedExecutor(context=ctx)
        executor.add_node(me)
        spin = threading.Thread(target=executor.spin, daemon=True)
        spin.start()

        frames = source.frames(max_frames=max_frames, decode=False)
        first = next(frames, None)
        if first is None:
            raise EvalError(f"bag {source.path}: no posed frame could be assembled ({source.skipped})")
        t_start = first.stamp - 0.05
        _wait_ready(lis, node_proc, t_start, timeout)

        total = source.connections[t.color].msgcount
        total = min(total, max_frames) if max_frames else total
        bar = tqdm(total=total, desc="ros replay", unit="frame", disable=not progress, leave=False)
        sent = pose_i = fused_seen = 0
        last_info = None
        window = max(1, min(FAST_WINDOW, int(params.get("queue_size", FAST_WINDOW))))
        frame_ms: list[float] = []
        wall0 = time.perf_counter()
        stamp0 = first.stamp
        fr = first
        while fr is not None:
            if rate is not None:                      # real time x rate
                delay = wall0 + (fr.stamp - stamp0) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            lis.tick(fr.stamp)
            # Poses up to a little past this frame, so the node can interpolate at its stamp.
            while pose_i < len(pose_stamps) and pose_stamps[pose_i] <= fr.stamp + 0.5:
                lis.publish_pose(pose_stamps[pose_i], pose_mats[pose_i], map_frame)
                pose_i += 1
            # CameraInfo and poses first, then a breath when the node must see a new CameraInfo before the
            # images: DDS does not order messages across topics.
            info = fr.raw[t.camera_info][1]
            lis.pubs[bag_to_node[t.camera_info]].publish(info)
            if not sent:
                time.sleep(0.2)
            elif rate is None and info[_CDR_STAMP_END:] != last_info[_CDR_STAMP_END:]:
                time.sleep(0.005)
            last_info = info
            for topic in (t.color, t.depth):
                lis.pubs[bag_to_node[topic]].publish(retype(topic, fr.raw[topic][1]))
            sent += 1
            if rate is None:
                _, d = _wait_for(lis, node_proc, lambda d: _completed(d) > sent - window, timeout,
                                 f"node did not process frame {sent - window + 1} (sent {sent}, stamp "
                                 f"{fr.stamp:.3f})", poll_s=FRAME_POLL_S)
                if _i(d, "frames_fused") > fused_seen:        # the node's own time for this keyframe
                    fused_seen = _i(d, "frames_fused")
                    frame_ms.append(float(d.get("worker.frame_ms", "nan")))
            bar.update(1)
            fr = next(frames, None)
        bar.close()
        # Let the node drain, then one purify period so the final purify covers every fused frame.
        # (Paced by rate, the node may have dropped pairs: then wait for its counters to stop moving.)
        done = (lambda d: _settled(d, sent)) if rate is None else _Quiet()
        _, d = _wait_for(lis, node_proc, done, timeout, "node did not finish fusing")
        replay_s = time.perf_counter() - wall0
        runs0 = _i(d, "purify_runs")
        lis.tick(lis.now + period)
        _, d = _wait_for(lis, node_proc, lambda d: _i(d, "purify_runs") > runs0 and _i(d, "clouds_published") > 0,
                         timeout, "node did not purify the final map")
        want = _i(d, "clouds_published")
        deadline = time.monotonic() + timeout
        while len(lis.clouds) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(lis.clouds) < want:
            raise EvalError(f"final ~/labelled_cloud not received ({len(lis.clouds)} of {want} clouds)")
        from geopurify_ros.pointcloud2 import from_msg

        node_mode = params.get("purify_mode", "pooled")
        clouds = {node_mode: from_msg(lis.clouds[-1])}
        others = [m for m in modes if m != node_mode]
        extra = {"node_purify_mode": node_mode, "domain_id": domain, "diagnostics": d, "skipped": dict(source.skipped),
                 "node_log": str(tmp / "node.log")}
        if others:
            clouds.update(_relabel_saved_map(me, tmp / "map.pt", params, class_names, others, timeout))
            extra["modes_from_saved_map"] = others
        frames_read = sent
        fused = _i(d, "frames_fused")
        extra["dropped_total"] = _i(d, "dropped_total")
        if frame_ms:
            extra["node_frame_ms_mean"] = float(np.nanmean(frame_ms))
        if fused == 0:
            raise EvalError(f"the node fused no frame ({_drops(d)}); node log: {node_proc.tail()}")
        return ReplayResult(clouds={m: clouds[m] for m in modes if m in clouds}, frames_read=frames_read,
                            frames_fused=fused, seconds=replay_s, source="ros", extra=extra)
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        rclpy.try_shutdown(context=ctx)
        node_proc.stop()
        torch.set_num_threads(replayer_threads)


def _drops(d: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items() if k.startswith("dropped.") and v not in ("0", "0.000")) or "no drops"


def _wait_ready(lis: _Listener, node_proc: _NodeProcess, t_start: float, timeout: float) -> None:
    """Node up: subscribed to all our inputs and publishing diagnostics and the cloud (created last in its init)."""
    deadline = time.monotonic() + timeout
    lis.tick(max(t_start, 0.0))
    while time.monotonic() < deadline:
        node_proc.check()
        subs_ok = all(p.get_subscription_count() > 0 for p in list(lis.pubs.values()) + [lis.pose, lis.clock])
        pubs_ok = all(lis.node.count_publishers(t) > 0 for t in ("/diagnostics", f"/{NODE}/labelled_cloud"))
        if subs_ok and pubs_ok:
            return
        time.sleep(0.1)
    raise EvalError(f"mapping node not ready after {timeout:.0f} s (its subscriptions never appeared); "
                    f"node log: {node_proc.tail()}")


def _wait_for(lis: _Listener, node_proc: _NodeProcess, cond, timeout: float, what: str,
              poll_s: float = 0.01) -> tuple[int, dict[str, str]]:
    """Step the sim clock (one diagnostics message per step) until fresh diagnostics satisfy `cond`."""
    deadline = time.monotonic() + timeout
    k0 = lis.snapshot()[0]
    while time.monotonic() < deadline:
        lis.tick()
        time.sleep(poll_s)
        n, d = lis.snapshot()
        if n > k0 and cond(d):
            return n, d
        node_proc.check()
        poll_s = min(poll_s * 1.15, MAX_POLL_S)   # back off: fewer sim-time steps while the node is busy
    n, d = lis.snapshot()
    raise EvalError(f"{what} within {timeout:.0f} s ({_drops(d)}); node log: {node_proc.tail()}")


def _relabel_saved_map(me, path: Path, params: dict[str, Any], class_names: list[str], modes, timeout: float):
    """Ask the node to save its map, then label it in-process once per remaining purify mode."""
    from geopurify_ros.config import PipelineConfig
    from geopurify_ros.pipeline import MappingPipeline
    from geopurify_ros.srv import MapFile

    cli = me.create_client(MapFile, f"/{NODE}/save_map")
    if not cli.wait_for_service(timeout_sec=min(timeout, 30.0)):
        raise EvalError(f"node service /{NODE}/save_map not available")
    fut = cli.call_async(MapFile.Request(path=str(path)))
    deadline = time.monotonic() + timeout
    while not fut.done() and time.monotonic() < deadline:
        time.sleep(0.05)
    res = fut.result() if fut.done() else None
    if res is None or not res.success:
        raise EvalError(f"node could not save its map: {getattr(res, 'message', 'timeout')}")
    try:
        pipe = MappingPipeline(PipelineConfig.from_dict(dict(params, class_names=list(class_names))))
        pipe.load(str(path))
    except (ValueError, OSError) as exc:
        raise EvalError(f"cannot re-label the node's saved map {path}: {exc}") from None

    def relabel():
        out = {}
        for mode in modes:
            pipe.set_purify_mode(mode)
            pipe.purify(incremental=False)
            out[mode] = pipe.labelled_cloud()
        return out

    return _on_worker_thread(relabel)


def _encoding_rewriter(source: BagSource):
    """Raw bytes unchanged, unless the user overrode an image encoding: then re-serialise with it."""
    t = source.topics
    overrides = {t.color: t.color_encoding, t.depth: t.depth_encoding}
    if not any(overrides.values()):
        return lambda topic, raw: raw

    def rewrite(topic: str, raw: bytes) -> bytes:
        enc = overrides.get(topic)
        if not enc:
            return raw
        msg = source.typestore.deserialize_cdr(raw, "sensor_msgs/msg/Image")
        msg.encoding = enc
        return bytes(source.typestore.serialize_cdr(msg, "sensor_msgs/msg/Image"))

    return rewrite
