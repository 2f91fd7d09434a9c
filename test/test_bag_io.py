"""bag_io: topics/types/counts, consistent headers, writer round trip and clear errors on bad bags."""
import shutil

import numpy as np
import pytest

pytest.importorskip("rosbags")

from geopurify_ros.data import bag_io  # noqa: E402


from conftest import tiny_demo_dir


@pytest.fixture(scope="session")
def tiny_dataset():
    """Same on-disk tiny sequence as test_demo_data.py (conftest.tiny_demo_dir)."""
    from geopurify_ros.data.make_demo import generate

    out = tiny_demo_dir()
    return out, generate(out, "tiny", 0, log=lambda *_: None)

EXPECTED = {
    "/camera/color/image_raw": "sensor_msgs/msg/Image",
    "/camera/depth/image_raw": "sensor_msgs/msg/Image",
    "/camera/color/camera_info": "sensor_msgs/msg/CameraInfo",
    "/camera/pose": "geometry_msgs/msg/PoseStamped",
    "/tf": "tf2_msgs/msg/TFMessage",
    "/camera/labels": "sensor_msgs/msg/Image",
}


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_topics_types_counts(tiny_dataset, storage):
    out, meta = tiny_dataset
    info = bag_io.list_topics(out / f"bag_{storage}")
    assert {t: i.msgtype for t, i in info.items()} == EXPECTED
    assert all(i.count == meta["frames"] for i in info.values())


def test_read_back_with_plain_rosbags(tiny_dataset):
    """Independent of our helpers: rosbags' AnyReader reads the sqlite3 bag with its own typestore."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    out, meta = tiny_dataset
    with AnyReader([out / "bag_sqlite3"], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as r:
        conns = [c for c in r.connections if c.topic == "/camera/depth/image_raw"]
        msgs = [r.deserialize(raw, c.msgtype) for c, _, raw in r.messages(connections=conns)]
    assert len(msgs) == meta["frames"]
    assert msgs[0].encoding == "16UC1" and msgs[0].width == meta["width"] and msgs[0].step == 2 * meta["width"]


def test_headers_consistent(tiny_dataset):
    out, meta = tiny_dataset
    stamps = {}
    for topic, t_bag, msg in bag_io.read_messages(out / "bag_mcap"):
        if topic == "/tf":
            (tr,) = msg.transforms
            assert (tr.header.frame_id, tr.child_frame_id) == ("map", "camera_color_optical_frame")
            s = bag_io.stamp_ns_of(tr)
        else:
            s = bag_io.stamp_ns_of(msg)
            want = "map" if topic == "/camera/pose" else "camera_color_optical_frame"
            assert msg.header.frame_id == want, topic
        assert s == t_bag
        stamps.setdefault(topic, []).append(s)
    ref = stamps["/camera/color/image_raw"]
    assert ref == meta["stamps_ns"] and ref == sorted(ref) and len(set(ref)) == len(ref)
    assert all(v == ref for v in stamps.values())


def test_camera_info_and_pose_messages(tiny_dataset):
    out, meta = tiny_dataset
    msgs = {t: m for t, _, m in bag_io.read_messages(out / "bag_mcap", ["/camera/color/camera_info", "/camera/pose", "/tf"])}
    info = msgs["/camera/color/camera_info"]
    assert info.distortion_model == "plumb_bob" and not np.any(info.d) and len(info.d) == 5
    K = np.asarray(info.k).reshape(3, 3)
    i = meta["intrinsics"]
    assert np.allclose(K, [[i["fx"], 0, i["cx"]], [0, i["fy"], i["cy"]], [0, 0, 1]])
    T_pose = bag_io.pose_of(msgs["/camera/pose"])
    T_tf = bag_io.pose_of(msgs["/tf"].transforms[0])
    assert np.allclose(T_pose, T_tf, atol=1e-9)
    assert np.allclose(T_pose, meta["poses_published"][-1], atol=1e-6)


def test_writer_round_trip(tmp_path):
    from geopurify_ros.camera import CameraModel
    from geopurify_ros.image_codec import encode_depth

    cam = CameraModel(width=4, height=3, fx=2.0, fy=2.0, cx=1.5, cy=1.0)
    depth = np.arange(12, dtype=np.float32).reshape(3, 4) * 0.25 + 0.5
    T = np.eye(4)
    T[:3, 3] = [1, 2, 3]
    for storage in bag_io.STORAGES:
        p = tmp_path / storage
        with bag_io.BagWriter(p, storage) as w:
            for k in range(3):
                t = 10**9 + k
                enc, step, data = encode_depth(depth)
                w.write("/d", t, bag_io.image_msg(t, "cam", enc, 3, 4, step, data))
                w.write("/p", t, bag_io.pose_stamped_msg(t, T))
                w.write("/i", t, bag_io.camera_info_msg(t, "cam", cam))
        info = bag_io.list_topics(p)
        assert {k: (v.msgtype, v.count) for k, v in info.items()} == {
            "/d": ("sensor_msgs/msg/Image", 3), "/p": ("geometry_msgs/msg/PoseStamped", 3),
            "/i": ("sensor_msgs/msg/CameraInfo", 3)}
        got = [m for _, _, m in bag_io.read_messages(p, ["/p"])]
        assert np.allclose(bag_io.pose_of(got[0]), T)
        with pytest.raises(ValueError, match="already exists"):
            bag_io.BagWriter(p, storage)


def test_missing_path_and_not_a_bag(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        bag_io.list_topics(tmp_path / "nope")
    with pytest.raises(ValueError, match="metadata.yaml"):
        bag_io.list_topics(tmp_path)


def test_missing_topic_lists_available(tiny_dataset):
    out, _ = tiny_dataset
    with pytest.raises(ValueError, match=r"\['/no/such'\] not in bag .*'/camera/color/image_raw'"):
        list(bag_io.read_messages(out / "bag_mcap", ["/camera/pose", "/no/such"]))
    with pytest.raises(ValueError, match="/camera/labels"):
        bag_io.require_topics(out / "bag_mcap", ["/odom"])


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_corrupt_bag_raises_value_error(tiny_dataset, tmp_path, storage):
    out, _ = tiny_dataset
    bag = tmp_path / storage
    shutil.copytree(out / f"bag_{storage}", bag)
    (data,) = [p for p in bag.iterdir() if p.suffix in (".mcap", ".db3")]
    raw = data.read_bytes()
    if storage == "mcap":
        data.write_bytes(raw[: len(raw) // 2])  # truncated recording
    else:
        data.write_bytes(raw[:100] + b"\x00garbage" * 64 + raw[612:])  # clobbered sqlite header/pages
    with pytest.raises(ValueError, match="corrupt or truncated"):
        list(bag_io.read_messages(bag))
