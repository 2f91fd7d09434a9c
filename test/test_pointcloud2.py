import time
from types import SimpleNamespace

import numpy as np
import pytest

from geopurify_ros import pointcloud2 as pc2

RNG = np.random.default_rng(0)


def small_cloud(n=5):
    xyz = RNG.normal(size=(n, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (n, 3), dtype=np.uint8)
    return pc2.make_cloud(xyz, rgb, label=np.arange(n) % 20, score=RNG.random(n),
                          normal=RNG.normal(size=(n, 3)).astype(np.float32), inst=np.arange(n, dtype=np.int32)), rgb


def test_layout_follows_pointfield_rules():
    cloud, _ = small_cloud()
    fields = pc2.fields_of(cloud.dtype)
    assert [(f.name, f.offset, f.datatype, f.count) for f in fields] == [
        ("x", 0, pc2.FLOAT32, 1), ("y", 4, pc2.FLOAT32, 1), ("z", 8, pc2.FLOAT32, 1), ("rgb", 12, pc2.FLOAT32, 1),
        ("label", 16, pc2.UINT16, 1), ("score", 18, pc2.FLOAT32, 1), ("normal", 22, pc2.FLOAT32, 3),
        ("inst", 34, pc2.INT32, 1)]
    assert cloud.dtype.itemsize == 38


def test_rgb_packing_matches_rviz():
    packed = pc2.pack_rgb(np.array([[255, 128, 1]], np.uint8))
    assert packed.dtype == np.float32
    assert packed.view(np.uint32)[0] == 0x00FF8001
    np.testing.assert_array_equal(pc2.unpack_rgb(packed), [[255, 128, 1]])


def test_to_msg_real_message_fields():
    cloud, rgb = small_cloud()
    msg = pc2.to_msg(cloud, "map", stamp=12.25)
    from sensor_msgs.msg import PointCloud2, PointField
    assert isinstance(msg, PointCloud2) and isinstance(msg.fields[0], PointField)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 5, 38, 190)
    assert msg.is_bigendian is False and msg.is_dense is True
    assert (msg.header.frame_id, msg.header.stamp.sec, msg.header.stamp.nanosec) == ("map", 12, 250_000_000)
    assert [f.offset for f in msg.fields] == [f.offset for f in pc2.fields_of(cloud.dtype)]
    assert msg.fields[6].count == 3 and len(msg.data) == 190
    back = pc2.from_msg(msg)
    assert back.dtype == cloud.dtype and back.tobytes() == cloud.tobytes()
    np.testing.assert_array_equal(pc2.unpack_rgb(back["rgb"]), rgb)


def test_is_dense_false_with_nan():
    xyz = np.zeros((3, 3), np.float32)
    xyz[1, 2] = np.nan
    assert pc2.to_msg(pc2.make_cloud(xyz), "map").is_dense is False


def test_one_million_points_round_trip_fast():
    n = 1_000_000
    xyz = RNG.normal(size=(n, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (n, 3), dtype=np.uint8)
    lab = RNG.integers(0, 20, n).astype(np.uint16)
    score = RNG.random(n).astype(np.float32)
    t = time.perf_counter()
    msg = pc2.to_msg(pc2.make_cloud(xyz, rgb, lab, score), "map")
    back = pc2.from_msg(msg)
    elapsed = time.perf_counter() - t
    np.testing.assert_array_equal(np.stack([back["x"], back["y"], back["z"]], 1), xyz)
    np.testing.assert_array_equal(pc2.unpack_rgb(back["rgb"]), rgb)
    np.testing.assert_array_equal(back["label"], lab)
    np.testing.assert_array_equal(back["score"], score)
    assert elapsed < 5.0  # vectorised: ~0.2 s here; a per-point loop takes minutes


def test_from_msg_big_endian_padding_and_rows():
    """Hand-built organised cloud: big-endian, fields out of order, padded points and rows."""
    h, w, point_step, row_step = 2, 3, 16, 3 * 16 + 5
    xyz = RNG.normal(size=(h * w, 3)).astype(np.float32)
    lab = np.arange(h * w, dtype=np.uint16) + 1000
    data = bytearray(row_step * h)
    for i in range(h * w):
        r, c = divmod(i, w)
        base = r * row_step + c * point_step
        data[base + 0:base + 2] = np.array([lab[i]], ">u2").tobytes()
        data[base + 4:base + 16] = xyz[i].astype(">f4").tobytes()
    F = SimpleNamespace
    msg = F(height=h, width=w, point_step=point_step, row_step=row_step, is_bigendian=True, data=bytes(data),
            fields=[F(name="label", offset=0, datatype=pc2.UINT16, count=1), F(name="x", offset=4, datatype=7, count=1),
                    F(name="y", offset=8, datatype=7, count=1), F(name="z", offset=12, datatype=7, count=1)])
    out = pc2.from_msg(msg)
    assert out.dtype.names == ("label", "x", "y", "z") and out.dtype.isnative
    np.testing.assert_array_equal(out["label"], lab)
    np.testing.assert_array_equal(np.stack([out["x"], out["y"], out["z"]], 1), xyz)


def test_duck_typed_msg_cls():
    class Msg:
        pass

    cloud, _ = small_cloud(4)
    msg = pc2.to_msg(cloud, "odom", stamp=(3, 7), msg_cls=Msg)
    assert msg.header.frame_id == "odom" and (msg.header.stamp.sec, msg.header.stamp.nanosec) == (3, 7)
    assert msg.fields[3].name == "rgb" and msg.row_step == 4 * 38
    assert pc2.from_msg(msg).tobytes() == cloud.tobytes()


def test_bad_input_raises():
    with pytest.raises(ValueError, match="xyz"):
        pc2.make_cloud(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="rgb"):
        pc2.make_cloud(np.zeros((3, 3)), rgb=np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="label"):
        pc2.make_cloud(np.zeros((1, 3)), label=np.array([70000]))
    with pytest.raises(ValueError, match="big"):
        pc2.make_cloud(np.zeros((1, 3)), big=np.zeros(1, np.int64))
    msg = pc2.to_msg(pc2.make_cloud(np.zeros((2, 3))), "map", msg_cls=type("M", (), {}))
    msg.data = msg.data[:-1]
    with pytest.raises(ValueError, match="data"):
        pc2.from_msg(msg)
    msg.fields[0].datatype = 42
    with pytest.raises(ValueError, match="'x'"):
        pc2.from_msg(msg)


def test_flat_fields_is_sensor_msgs_py_layout_of_multi_count_fields():
    cloud, _ = small_cloud(10)
    flat = pc2.flat_fields(cloud)
    assert flat.dtype.names == ("x", "y", "z", "rgb", "label", "score", "normal_0", "normal_1", "normal_2", "inst")
    assert [flat.dtype.fields[f"normal_{i}"][1] for i in range(3)] == [22, 26, 30]
    assert flat.dtype.itemsize == cloud.dtype.itemsize and np.shares_memory(flat, cloud)    # a view
    for i in range(3):
        np.testing.assert_array_equal(flat[f"normal_{i}"], cloud["normal"][:, i])
    np.testing.assert_array_equal(flat["inst"], cloud["inst"])
    plain = pc2.make_cloud(np.zeros((2, 3), np.float32), label=np.array([1, 2]))
    assert pc2.flat_fields(plain).dtype == plain.dtype                  # nothing to split: same layout
    # the flat layout written as count-1 fields reads back as the same bytes
    back = pc2.from_msg(pc2.to_msg(flat, "map"))
    assert back.tobytes() == cloud.tobytes() and "normal_1" in back.dtype.names


def test_cross_check_sensor_msgs_py():
    point_cloud2 = pytest.importorskip("sensor_msgs_py.point_cloud2")
    cloud, _ = small_cloud(10)
    msg = pc2.to_msg(cloud, "map")
    ref = point_cloud2.read_points(msg)                                 # every field, normal as normal_0..2
    flat = pc2.flat_fields(pc2.from_msg(msg))
    assert ref.dtype.names == flat.dtype.names
    for name in flat.dtype.names:
        np.testing.assert_array_equal(ref[name], flat[name])
    ref_msg = point_cloud2.create_cloud(msg.header, msg.fields, pc2.flat_fields(cloud))
    assert pc2.from_msg(ref_msg).tobytes() == cloud.tobytes()
