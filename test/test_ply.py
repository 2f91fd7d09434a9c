"""PLY writer: the columns viewers read, checked by reading the files back with trimesh."""
import numpy as np
import pytest

from geopurify_ros.ply import VERTEX_DTYPE, write_ply
from geopurify_ros.pointcloud2 import make_cloud

trimesh = pytest.importorskip("trimesh")


def test_round_trip_through_trimesh(tmp_path):
    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(300, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (300, 3)).astype(np.uint8)
    lab = rng.integers(0, 65535, 300).astype(np.uint16)
    score = rng.random(300).astype(np.float32)
    path = tmp_path / "c.ply"
    assert write_ply(path, make_cloud(xyz, rgb, lab, score), comments=("map test.pt",)) == 300
    pc = trimesh.load(path)
    assert isinstance(pc, trimesh.PointCloud)
    np.testing.assert_array_equal(np.asarray(pc.vertices, np.float32), xyz)
    np.testing.assert_array_equal(np.asarray(pc.colors)[:, :3], rgb)
    rows = pc.metadata["_ply_raw"]["vertex"]["data"]
    np.testing.assert_array_equal(rows["label"], lab)
    np.testing.assert_array_equal(rows["score"], score)
    head = path.read_bytes().split(b"end_header\n")[0].decode()
    assert "format binary_little_endian 1.0" in head and "comment map test.pt" in head
    assert [ln.split()[-1] for ln in head.splitlines() if ln.startswith("property")] == list(VERTEX_DTYPE.names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ply"]       # no temporary file left


def test_missing_fields_get_defaults_and_empty_clouds_write(tmp_path):
    write_ply(tmp_path / "xyz.ply", make_cloud(np.ones((2, 3), np.float32)))
    rows = trimesh.load(tmp_path / "xyz.ply").metadata["_ply_raw"]["vertex"]["data"]
    assert rows["red"].tolist() == [128, 128] and rows["label"].tolist() == [0, 0]
    assert write_ply(tmp_path / "empty.ply", make_cloud(np.zeros((0, 3), np.float32))) == 0
    assert b"element vertex 0\n" in (tmp_path / "empty.ply").read_bytes()
    with pytest.raises(ValueError, match="x, y, z"):
        write_ply(tmp_path / "bad.ply", np.zeros(3, dtype=[("a", "f4")]))
