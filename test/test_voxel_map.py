import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geopurify_ros.camera import CameraModel, backproject, pose_to_matrix
from geopurify_ros.voxel_map import KEY_MAX, KEY_MIN, VoxelMap, pack_keys, unpack_keys

VS = 0.05
CAM = CameraModel(160, 120, 140.0, 140.0, 79.5, 59.5)


def look_down_pose(height):
    """Camera at (0.3, -0.2, height) looking straight down (optical z = world -z)."""
    T = np.eye(4)
    T[:3, :3] = np.diag([1.0, -1.0, -1.0])
    T[:3, 3] = [0.3, -0.2, height]
    return T


def render_box(cam, T, lo, hi):
    """Depth (z in the optical frame) of an axis-aligned box by ray casting (slab test); NaN on miss."""
    r, c = np.mgrid[0:cam.height, 0:cam.width].astype(np.float64)
    d_cam = np.stack([(c - cam.cx) / cam.fx, (r - cam.cy) / cam.fy, np.ones_like(r)], -1)
    d = d_cam @ T[:3, :3].T
    o = T[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    tn = np.nanmax(np.minimum(t1, t2), -1)
    tf = np.nanmin(np.maximum(t1, t2), -1)
    hit = (tn <= tf) & (tn > 0)
    return np.where(hit, tn, np.nan).astype(np.float32)  # t along d_cam whose z is 1 -> t is the depth


def box_surface_distance(p, lo, hi):
    inside = np.all((p >= lo) & (p <= hi), 1)
    out = np.linalg.norm(np.maximum(np.maximum(lo - p, p - hi), 0), axis=1)
    inner = np.min(np.minimum(p - lo, hi - p), 1)
    return np.where(inside, inner, out)


def assert_in_own_cell(vm):
    """Every mean position lies inside its voxel's cell (a mean of points in a convex cell)."""
    lo = unpack_keys(vm.keys).double() * vm.voxel_size
    p = vm.xyz.double()
    assert bool(((p >= lo - 1e-6) & (p <= lo + vm.voxel_size + 1e-6)).all())


def frame(vm, depth, T, D=None, stamp=0.0, stride=1, fmap=None):
    D = D or vm.feature_dim
    fmap = torch.ones(15, 20, D) if fmap is None else fmap
    rgb = np.full((CAM.height, CAM.width, 3), 100, np.uint8)
    return vm.fuse_frame(depth, fmap, rgb, CAM, T, stamp=stamp, stride=stride)


def test_key_packing_round_trip_and_range():
    ijk = torch.tensor([[0, 0, 0], [KEY_MIN, KEY_MAX, -1], [KEY_MAX, KEY_MIN, 5], [-3, 7, -11]])
    keys = pack_keys(ijk)
    assert bool((keys >= 0).all())
    assert torch.equal(unpack_keys(keys), ijk)
    vm = VoxelMap(VS, 2)
    st = vm.fuse(torch.tensor([[0.0, 0, 0], [1e6, 0, 0], [float("nan"), 0, 0]]), torch.ones(3, 2))
    assert (st.new, st.points) == (1, 1)  # out-of-range and NaN points are dropped


def test_plane_lands_in_right_voxels():
    vm = VoxelMap(VS, 4)
    T = look_down_pose(1.5 + 0.012)  # floor at world z = 0.012 inside voxel layer k = 0
    depth = np.full((CAM.height, CAM.width), 1.5, np.float32)
    st = frame(vm, depth, T)
    assert st.points == CAM.height * CAM.width and st.new == len(vm)
    ijk = unpack_keys(vm.keys)
    assert bool((ijk[:, 2] == 0).all())
    np.testing.assert_allclose(vm.xyz[:, 2].numpy(), 0.012, atol=1e-4)
    assert_in_own_cell(vm)
    # Footprint of the image on the floor: 1.5 m * 160 / 140 wide around x = 0.3.
    half_w = 1.5 * 80 / 140
    assert abs(float(vm.xyz[:, 0].min()) - (0.3 - half_w)) < VS
    assert abs(float(vm.xyz[:, 0].max()) - (0.3 + half_w)) < VS


def test_box_from_two_poses():
    lo, hi = np.array([-0.31, -0.21, 0.012]), np.array([0.262, 0.313, 0.413])
    vm = VoxelMap(VS, 4)
    T1 = look_down_pose(2.0)
    T2 = pose_to_matrix([1.8, 0.1, 1.2], [0, 0, 0, 1]) @ np.eye(4)
    # Second pose: looking along world -x from x = 1.8, tilted: build from a rotation matrix.
    z = np.array([-1.0, 0.0, -0.5])
    z /= np.linalg.norm(z)
    x = np.array([0.0, -1.0, 0.0])
    y = np.cross(z, x)
    T2[:3, :3] = np.stack([x, y, z], 1)
    for i, T in enumerate((T1, T2)):
        depth = render_box(CAM, T, lo, hi)
        assert np.isfinite(depth).sum() > 1000
        frame(vm, depth, T, stamp=i)
        pts, _, _ = backproject(torch.from_numpy(depth), CAM, T, min_depth=0.1, max_depth=8)
        assert box_surface_distance(pts.double().numpy(), lo, hi).max() < 1e-4
    err = box_surface_distance(vm.xyz.double().numpy(), lo, hi)
    assert err.max() < VS
    assert_in_own_cell(vm)
    # Both top face (seen from T1) and the +x face (seen from T2) are present.
    assert bool((vm.xyz[:, 2] > 0.4).any()) and bool((vm.xyz[:, 0] > 0.25).any())


def test_fuse_same_frame_twice_keeps_means_doubles_counts():
    vm = VoxelMap(VS, 8)
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(15, 20, 8, generator=g)
    depth = (1.0 + 0.5 * np.random.default_rng(0).random((CAM.height, CAM.width))).astype(np.float32)
    T = look_down_pose(1.7)
    frame(vm, depth, T, fmap=fmap, stride=2)
    snap = {k: getattr(vm, k).clone() for k in ("keys", "xyz", "features", "colors", "weights", "counts")}
    st = frame(vm, depth, T, fmap=fmap, stride=2)
    assert st.new == 0 and st.updated == len(vm)
    assert torch.equal(vm.keys, snap["keys"])
    assert torch.equal(vm.counts, 2 * snap["counts"])
    np.testing.assert_allclose(vm.weights.numpy(), 2 * snap["weights"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(vm.xyz.numpy(), snap["xyz"].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(vm.features.float().numpy(), snap["features"].float().numpy(), atol=2e-3, rtol=0)
    assert torch.equal(vm.colors, snap["colors"])


def test_fuse_frame_matches_grid_sample_and_fuse():
    D = 6
    fmap = torch.randn(15, 20, D, generator=torch.Generator().manual_seed(1))
    depth = (0.8 + np.random.default_rng(1).random((CAM.height, CAM.width))).astype(np.float32)
    depth[::7, ::5] = np.nan
    T = look_down_pose(1.9)
    a = VoxelMap(VS, D)
    frame(a, depth, T, fmap=fmap, stride=2)
    pts, pix, z = backproject(torch.from_numpy(depth), CAM, T, stride=2)
    grid = torch.stack(((pix[:, 1] + 0.5) / CAM.width * 2 - 1, (pix[:, 0] + 0.5) / CAM.height * 2 - 1), 1)
    feats = F.grid_sample(fmap.permute(2, 0, 1)[None], grid[None, None].float(), mode="bilinear",
                          padding_mode="border", align_corners=False)[0, :, 0].T
    b = VoxelMap(VS, D)
    b.fuse(pts, feats, torch.full((pts.shape[0], 3), 100, dtype=torch.uint8), 1.0 / z**2, 0.0, T[:3, 3])
    assert torch.equal(a.keys, b.keys)
    np.testing.assert_allclose(a.features.float().numpy(), b.features.float().numpy(), atol=2e-3, rtol=0)
    np.testing.assert_allclose(a.xyz.numpy(), b.xyz.numpy(), atol=1e-5)
    np.testing.assert_allclose(a.weights.numpy(), b.weights.numpy(), rtol=1e-5)


def test_pixel_centre_convention():
    """A single valid pixel samples the low-res ramp at ((row+.5)*h/H - .5, (col+.5)*w/W - .5)."""
    h, w = 15, 20
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    fmap = torch.stack((xx, yy), -1)
    for row, col in ((50, 101), (0, 0), (119, 159)):
        depth = np.full((CAM.height, CAM.width), np.nan, np.float32)
        depth[row, col] = 1.0
        vm = VoxelMap(VS, 2)
        frame(vm, depth, np.eye(4), fmap=fmap)
        ex = min(max((col + 0.5) * w / CAM.width - 0.5, 0), w - 1)
        ey = min(max((row + 0.5) * h / CAM.height - 0.5, 0), h - 1)
        np.testing.assert_allclose(vm.features_f32()[0].numpy(), [ex, ey], atol=1e-2)


def _line_points(n, step=0.1):
    x = torch.arange(n, dtype=torch.float32) * step + step / 2
    return torch.stack((x, torch.zeros(n), torch.zeros(n)), 1)


@pytest.mark.parametrize("policy", ["farthest", "lru"])
def test_eviction_bounds_memory(policy):
    vm = VoxelMap(0.1, 2, max_voxels=5, eviction=policy)
    vm.add_channel("tag", (), torch.int64, fill=-1)
    pts = _line_points(10)  # voxels 0..9 along x
    for i in range(5):
        vm.fuse(pts[i:i + 1], torch.full((1, 2), float(i)), stamp=float(i), sensor_origin=[0.0, 0, 0])
    vm.set_channel("tag", torch.arange(5), unpack_keys(vm.keys)[:, 0])
    vm.clear_dirty()
    cap_bytes = vm.nbytes()
    # Touch voxel 4 (farthest, but newest) and 0, then add voxels 5 and 6, seen from origin at x = 0.
    st = vm.fuse(pts[[0, 4, 5, 6]], torch.zeros(4, 2), stamp=10.0, sensor_origin=[0.0, 0, 0])
    assert len(vm) == 5 and st.evicted + (4 - st.updated - st.new) == 2
    ii = sorted(unpack_keys(vm.keys)[:, 0].tolist())
    if policy == "farthest":
        assert ii == [0, 1, 2, 3, 4] and st.new == 0  # the new far voxels lose
    else:
        assert ii == [0, 3, 4, 5, 6] and st.evicted == 2  # oldest untouched (1, 2) go
    # Channels and the dirty set moved with their voxels.
    tag, i_now = vm.channel("tag"), unpack_keys(vm.keys)[:, 0]
    old = tag >= 0
    assert torch.equal(tag[old], i_now[old]) and bool((tag[~old] == -1).all() if policy == "lru" else True)
    dirty = sorted(unpack_keys(vm.keys[vm.dirty_slots()])[:, 0].tolist())
    assert dirty == ([0, 4] if policy == "farthest" else [0, 4, 5, 6])
    assert torch.equal(vm.lookup(vm.keys), torch.arange(5))
    assert vm.nbytes() == cap_bytes  # bounded: no growth beyond max_voxels


@pytest.mark.parametrize("policy", ["farthest", "lru"])
def test_frame_larger_than_map_keeps_nearest(policy):
    vm = VoxelMap(0.1, 2, max_voxels=3, eviction=policy)
    st = vm.fuse(_line_points(6), torch.zeros(6, 2), sensor_origin=torch.tensor([0.0, 0, 0]))
    assert (st.new, st.evicted, len(vm)) == (3, 0, 3)
    assert sorted(unpack_keys(vm.keys)[:, 0].tolist()) == [0, 1, 2]


def test_evict_margin_frees_extra_untouched_voxels():
    vm = VoxelMap(0.1, 2, max_voxels=10, eviction="farthest", evict_margin=0.3)
    vm.fuse(_line_points(10), torch.zeros(10, 2), sensor_origin=[0.0, 0, 0])
    st = vm.fuse(torch.tensor([[-0.45, 0.0, 0.0]]), torch.zeros(1, 2), sensor_origin=[0.0, 0, 0])
    # One voxel had to go; the margin evicts 3 more, all among the farthest untouched ones.
    assert (st.new, st.evicted, len(vm)) == (1, 4, 7)
    assert sorted(unpack_keys(vm.keys)[:, 0].tolist()) == [-5, 0, 1, 2, 3, 4, 5]


def test_farthest_eviction_uses_latest_origin_and_many_rounds():
    vm = VoxelMap(0.1, 3, max_voxels=50, eviction="farthest")
    g = torch.Generator().manual_seed(3)
    for it in range(20):
        o = torch.tensor([it * 0.5, 0.0, 0.0])
        pts = o + torch.rand(30, 3, generator=g) * 2 - 1
        vm.fuse(pts, torch.randn(30, 3, generator=g), stamp=it, sensor_origin=o)
        assert len(vm) <= 50
        assert torch.equal(vm.lookup(vm.keys), torch.arange(len(vm)))
        assert torch.equal(torch.sort(vm.keys).values.unique_consecutive(), torch.sort(vm.keys).values)
    # Survivors are all nearer to the final origin than any voxel that was ever dropped would be.
    d = (vm.xyz - torch.tensor([9.5, 0, 0])).norm(dim=1)
    assert float(d.max()) < 3.0


def test_neighbours():
    vm = VoxelMap(1.0, 1)
    ijk = torch.stack(torch.meshgrid(*(torch.arange(3),) * 3, indexing="ij"), -1).reshape(-1, 3)
    vm.fuse(ijk.float() + 0.5, torch.zeros(27, 1))
    centre = vm.lookup(pack_keys(torch.tensor([[1, 1, 1]])))
    corner = vm.lookup(pack_keys(torch.tensor([[0, 0, 0]])))
    nb = vm.neighbours(torch.cat((centre, corner)))
    assert nb.shape == (2, 26)
    assert bool((nb[0] >= 0).all()) and int((nb[1] >= 0).sum()) == 7
    assert torch.equal(torch.sort(nb[0]).values, torch.sort(torch.tensor([s for s in range(27) if s != centre]))[0])
    assert vm.neighbours(centre, radius=2).shape == (1, 124)
    with pytest.raises(ValueError, match="slots"):
        vm.neighbours(torch.tensor([27]))


def test_save_load_bit_exact(tmp_path):
    vm = VoxelMap(VS, 8, max_voxels=10_000, eviction="lru")
    vm.add_channel("purified", (8,), torch.float16)
    vm.add_channel("label", (), torch.int16, fill=-1)
    fmap = torch.randn(15, 20, 8, generator=torch.Generator().manual_seed(2))
    frame(vm, np.full((CAM.height, CAM.width), 1.3, np.float32), look_down_pose(1.3), fmap=fmap, stride=2)
    vm.set_channel("purified", torch.arange(len(vm)), torch.randn(len(vm), 8).half())
    vm.clear_dirty()
    frame(vm, np.full((CAM.height, CAM.width), 1.1, np.float32), look_down_pose(1.0), fmap=fmap, stamp=1.0, stride=4)
    path = tmp_path / "map.pt"
    vm.save(path)
    wm = VoxelMap.load(path)
    assert len(wm) == len(vm) and wm.eviction == "lru" and wm.channel_names() == ["purified", "label"]
    for k in ("keys", "xyz", "features", "colors", "weights", "counts", "last_seen"):
        a, b = getattr(vm, k), getattr(wm, k)
        assert a.dtype == b.dtype and torch.equal(a, b), k
    for name in ("purified", "label"):
        assert torch.equal(vm.channel(name), wm.channel(name))
    assert torch.equal(vm.dirty_slots(), wm.dirty_slots()) and 0 < len(wm.dirty_slots()) < len(wm)
    assert torch.equal(wm.lookup(wm.keys), torch.arange(len(wm)))
    # Keeps working after load.
    st = frame(wm, np.full((CAM.height, CAM.width), 1.1, np.float32), look_down_pose(1.0), fmap=fmap, stride=4)
    assert st.new == 0 and st.updated > 0


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="path"):
        VoxelMap.load(bad)
    vm = VoxelMap(VS, 2)
    vm.fuse(torch.zeros(1, 3), torch.ones(1, 2))
    p = tmp_path / "v.pt"
    vm.save(p)
    state = torch.load(p, weights_only=True)
    state["version"] = 99
    torch.save(state, p)
    with pytest.raises(ValueError, match="version"):
        VoxelMap.load(p)
    with pytest.raises(ValueError, match="path"):
        VoxelMap.load(tmp_path / "missing.pt")


def test_reset_and_nbytes_per_voxel():
    n = 4096
    vm = VoxelMap(VS, 384, max_voxels=n)
    pts = torch.stack((torch.arange(n) * VS + VS / 2, torch.zeros(n), torch.zeros(n)), 1)
    vm.fuse(pts, torch.randn(n, 384))
    assert len(vm) == n
    assert vm.nbytes() / n <= 1024
    vm.reset()
    assert len(vm) == 0 and len(vm.dirty_slots()) == 0 and vm.nbytes() == 0


def test_bad_inputs_raise_value_error():
    vm = VoxelMap(VS, 4)
    depth = np.ones((CAM.height, CAM.width), np.float32)
    rgb = np.zeros((CAM.height, CAM.width, 3), np.uint8)
    with pytest.raises(ValueError, match=r"depth: expected \(120, 160\)"):
        vm.fuse_frame(np.ones((10, 10), np.float32), torch.zeros(3, 4, 4), rgb, CAM, np.eye(4))
    with pytest.raises(ValueError, match=r"rgb: expected uint8 \(120, 160, 3\) to match depth"):
        vm.fuse_frame(depth, torch.zeros(3, 4, 4), rgb[:10], CAM, np.eye(4))
    with pytest.raises(ValueError, match="feature_map"):
        vm.fuse_frame(depth, torch.zeros(3, 4, 5), rgb, CAM, np.eye(4))
    with pytest.raises(ValueError, match="T_world_cam"):
        vm.fuse_frame(depth, torch.zeros(3, 4, 4), rgb, CAM, np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="weighting"):
        vm.fuse_frame(depth, torch.zeros(3, 4, 4), rgb, CAM, np.eye(4), weighting="cubic")
    with pytest.raises(ValueError, match="features"):
        vm.fuse(torch.zeros(2, 3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="features: contains NaN"):
        vm.fuse(torch.zeros(1, 3), torch.full((1, 4), float("nan")))
    with pytest.raises(ValueError, match="feature_map: contains NaN"):
        vm.fuse_frame(depth, torch.full((3, 4, 4), float("inf")), rgb, CAM, np.eye(4))
    with pytest.raises(ValueError, match="depth: expected float metres, got torch.uint16"):
        vm.fuse_frame(torch.ones((CAM.height, CAM.width), dtype=torch.uint16), torch.zeros(3, 4, 4), rgb, CAM,
                      np.eye(4))
    with pytest.raises(ValueError, match="eviction"):
        VoxelMap(eviction="random")
    # NaN depth is "no measurement", not an error.
    depth[:60] = np.nan
    st = vm.fuse_frame(depth, torch.zeros(3, 4, 4), rgb, CAM, np.eye(4), stride=1)
    assert st.points == 60 * 160
    assert math.isfinite(float(vm.xyz.sum()))


@pytest.mark.parametrize("spread", [5, 2000, KEY_MAX])  # int32 pair keys, int64 pair keys, two sorts
def test_group_pairs_matches_two_sort_reference(spread):
    from geopurify_ros.voxel_map import _group_pairs
    g = torch.Generator().manual_seed(4)
    ijk = torch.randint(-spread, spread + 1, (500, 3), generator=g)
    ijk[::3] = ijk[1::3][: len(ijk[::3])]  # repeated voxels
    cell = torch.randint(0, 6, (500,), generator=g)
    ukeys, pvox, pcell, pinv = _group_pairs(ijk, cell, 6)
    ref_keys, vinv = torch.unique(pack_keys(ijk), return_inverse=True)
    assert torch.equal(ukeys, ref_keys)
    assert torch.equal(ukeys[pvox[pinv]], pack_keys(ijk)) and torch.equal(pcell[pinv], cell)
    pairs = pvox * 6 + pcell
    assert bool((pairs[1:] > pairs[:-1]).all())  # unique and sorted by (voxel, cell)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tmp_path):
    fmap = torch.randn(15, 20, 8, generator=torch.Generator().manual_seed(5))
    depth = (0.8 + np.random.default_rng(5).random((CAM.height, CAM.width))).astype(np.float32)
    maps = {}
    for dev in ("cpu", "cuda"):
        vm = VoxelMap(VS, 8, max_voxels=300, device=dev)
        for i, h in enumerate((1.5, 1.2)):
            frame(vm, depth, look_down_pose(h), fmap=fmap, stamp=i, stride=2)
        vm.save(tmp_path / f"{dev}.pt")
        maps[dev] = VoxelMap.load(tmp_path / f"{dev}.pt")
    a, b = maps["cpu"], maps["cuda"]
    assert torch.equal(torch.sort(a.keys).values, torch.sort(b.keys).values)
    ia, ib = torch.argsort(a.keys), torch.argsort(b.keys)
    np.testing.assert_allclose(a.features_f32()[ia].numpy(), b.features_f32()[ib].numpy(), atol=2e-3)
    np.testing.assert_allclose(a.xyz[ia].numpy(), b.xyz[ib].numpy(), atol=1e-5)


@pytest.mark.parametrize("max_voxels", [100_000, 700])
def test_fuse_frame_sequence_matches_per_point_reference(max_voxels):
    """Several moving frames (existing + new voxels, eviction): fuse_frame == fuse of grid_sample'd points."""
    D = 5
    g = torch.Generator().manual_seed(7)
    fmap = torch.randn(15, 20, D, generator=g)
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (CAM.height, CAM.width, 3), dtype=np.uint8)
    a, b = VoxelMap(VS, D, max_voxels=max_voxels), VoxelMap(VS, D, max_voxels=max_voxels)
    for vm in (a, b):
        vm.add_channel("tag", (), torch.int32, fill=-3)
    for i in range(4):
        depth = (0.8 + 0.3 * rng.random((CAM.height, CAM.width))).astype(np.float32)
        depth[rng.random(depth.shape) < 0.05] = np.nan
        T = look_down_pose(1.2 + 0.05 * i)
        T[:3, 3] += [0.07 * i, -0.03 * i, 0.0]
        sa = a.fuse_frame(depth, fmap, rgb, CAM, T, stamp=float(i), stride=2)
        pts, pix, z = backproject(torch.from_numpy(depth), CAM, T, stride=2, min_depth=0.1, max_depth=8.0)
        grid = torch.stack(((pix[:, 1] + 0.5) / CAM.width * 2 - 1, (pix[:, 0] + 0.5) / CAM.height * 2 - 1), 1)
        feats = F.grid_sample(fmap.permute(2, 0, 1)[None], grid[None, None].float(), mode="bilinear",
                              padding_mode="border", align_corners=False)[0, :, 0].T
        cols = torch.from_numpy(rgb)[pix[:, 0], pix[:, 1]]
        sb = b.fuse(pts, feats, cols, 1.0 / z**2, float(i), T[:3, 3])
        assert (sa.new, sa.updated, sa.evicted, sa.points) == (sb.new, sb.updated, sb.evicted, sb.points)
        assert torch.equal(a.keys, b.keys)
        assert torch.equal(a.counts, b.counts) and torch.equal(a.last_seen, b.last_seen)
        assert torch.equal(a.dirty_slots(), b.dirty_slots())
        assert torch.equal(a.channel("tag"), b.channel("tag"))
        np.testing.assert_allclose(a.weights.numpy(), b.weights.numpy(), rtol=1e-5)
        np.testing.assert_allclose(a.xyz.numpy(), b.xyz.numpy(), atol=1e-5)
        np.testing.assert_allclose(a.features_f32().numpy(), b.features_f32().numpy(), atol=2e-3, rtol=0)
        assert int((a.colors.int() - b.colors.int()).abs().max()) <= 1
        probe = torch.cat((a.keys[:50], a.keys[:50] + 1))
        assert torch.equal(a.lookup(probe), b.lookup(probe))
        if i == 1:
            a.clear_dirty()
            b.clear_dirty()
    if max_voxels == 700:
        assert len(a) == 700


def test_fuse_frame_rejects_nonfinite_feature_map_anywhere():
    depth = np.ones((CAM.height, CAM.width), np.float32)
    rgb = np.zeros((CAM.height, CAM.width, 3), np.uint8)
    for bad in (float("nan"), float("inf"), -float("inf")):
        fmap = torch.zeros(15, 20, 4)
        fmap[14, 19, 3] = bad  # a cell no pixel samples still makes the map invalid
        with pytest.raises(ValueError, match="feature_map: contains NaN"):
            VoxelMap(VS, 4).fuse_frame(depth, fmap, rgb, CAM, np.eye(4))


def test_fuse_frame_drops_out_of_range_points_like_fuse():
    depth = np.full((CAM.height, CAM.width), 1.0, np.float32)
    T = look_down_pose(1.0)
    T[:3, 3] = [(KEY_MAX + 0.5) * VS, 0.0, 1.0]  # the frame straddles the +x key limit
    fmap = torch.ones(15, 20, 3)
    a, b = VoxelMap(VS, 3), VoxelMap(VS, 3)
    sa = frame(a, depth, T, fmap=fmap, stride=2)
    pts, _, z = backproject(torch.from_numpy(depth), CAM, T, stride=2)
    sb = b.fuse(pts, torch.ones(pts.shape[0], 3), torch.full((pts.shape[0], 3), 100, dtype=torch.uint8), 1.0 / z**2,
                0.0, T[:3, 3])
    assert 0 < sa.points < pts.shape[0] and (sa.new, sa.points) == (sb.new, sb.points)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.counts, b.counts)
    np.testing.assert_allclose(a.xyz.numpy(), b.xyz.numpy(), atol=1e-2)  # float32 at ~52 km: mm resolution


@pytest.mark.parametrize("dim", [1, 3, 4, 8, 384])
def test_row_views_move_float16_bits_exactly(dim):
    """The float64 / complex128 row views used for the storage gather/scatter are bit-exact for any fp16 bits."""
    from geopurify_ros.voxel_map import _row_view
    g = torch.Generator().manual_seed(dim)
    store = torch.randint(-2 ** 15, 2 ** 15, (50, dim), dtype=torch.int16, generator=g).view(torch.float16)
    store[0, 0] = float("nan")
    rows = torch.tensor([7, 0, 31, 2])
    got = _row_view(store, torch.float64).index_select(0, rows).view(torch.float16)
    assert torch.equal(got.view(torch.int16), store[rows].view(torch.int16))
    new = torch.randint(-2 ** 15, 2 ** 15, (4, dim), dtype=torch.int16, generator=g).view(torch.float16)
    ref = store.clone()
    ref[rows] = new
    _row_view(store, torch.complex128).index_copy_(0, rows, _row_view(new, torch.complex128))
    assert torch.equal(store.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("max_voxels", [100_000, 700])
def test_feature_fold_block_size_does_not_change_the_map(monkeypatch, max_voxels):
    """The blocked feature fold (blocks mixing existing / new / evicted voxels) is bit-identical to one block."""
    import geopurify_ros.voxel_map as vmod
    D = 6
    fmap = torch.randn(15, 20, D, generator=torch.Generator().manual_seed(9))
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (CAM.height, CAM.width, 3), dtype=np.uint8)
    depths = [(0.8 + 0.3 * rng.random((CAM.height, CAM.width))).astype(np.float32) for _ in range(4)]
    maps = []
    for block_bytes in (1 << 30, 4 * D * 7):          # one block; 7 voxels per block
        monkeypatch.setattr(vmod, "_LERP_BLOCK_BYTES", block_bytes)
        vm = VoxelMap(VS, D, max_voxels=max_voxels)
        for i, depth in enumerate(depths):
            T = look_down_pose(1.2 + 0.05 * i)
            T[:3, 3] += [0.07 * i, -0.03 * i, 0.0]
            vm.fuse_frame(depth, fmap, rgb, CAM, T, stamp=float(i), stride=2)
        maps.append(vm)
    a, b = maps
    for name in ("keys", "features", "xyz", "colors", "weights", "counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    if max_voxels == 700:
        assert len(a) == 700


def guided_reference_features(depth, fmap, pix, z, sigma):
    """Per-point depth-guided samples written out directly: bilinear corners (border-clamped as grid_sample), each
    times (1 - d^2 / 2048)^1024 (≈ exp(-d^2 / 2)) for d = (z - z_cell) / (sigma z), z_cell the depth at the pixel
    nearest the cell centre."""
    H, W = depth.shape
    h, w, _ = fmap.shape
    out = []
    for (row, col), zp in zip(pix.tolist(), z.tolist()):
        fy = min(max((row + 0.5) * h / H - 0.5, 0), h - 1)
        fx = min(max((col + 0.5) * w / W - 0.5, 0), w - 1)
        y0, x0 = min(int(math.floor(fy)), h - 2), min(int(math.floor(fx)), w - 2)
        acc, tot = 0, 0.0
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            b = (1 - abs(fx - xx)) * (1 - abs(fy - yy))
            zc = float(depth[min(int((yy + 0.5) * H / h), H - 1), min(int((xx + 0.5) * W / w), W - 1)])
            g = max(1 - ((zp - zc) / (sigma * zp)) ** 2 / 2048, 0.0) ** 1024 if math.isfinite(zc) else 0.0
            acc = acc + b * max(g, 1e-4) * fmap[yy, xx]
            tot += b * max(g, 1e-4)
        out.append(acc / tot)
    return torch.stack(out)


@pytest.mark.parametrize("kernels", [False, True])
def test_depth_guided_sampling_matches_per_point_reference(monkeypatch, kernels):
    """fuse_frame(guide_sigma) == fuse of per-point depth-guided samples (both fusion paths)."""
    from geopurify_ros import fusion_kernels
    monkeypatch.setattr(fusion_kernels, "ENABLED", kernels and fusion_kernels.ENABLED)
    D, sigma = 4, 0.05
    fmap = torch.randn(15, 20, D, generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(2)
    depth = np.where(rng.random((CAM.height, CAM.width)) < 0.5, 1.0, 1.08).astype(np.float32)   # rough surface
    depth[::9, ::4] = np.nan                                                                   # some cell centres too
    T = look_down_pose(1.9)
    a = VoxelMap(VS, D)
    a.fuse_frame(depth, fmap, np.full((CAM.height, CAM.width, 3), 100, np.uint8), CAM, T, stride=3,
                 guide_sigma=sigma)
    pts, pix, z = backproject(torch.from_numpy(depth), CAM, T, stride=3)
    b = VoxelMap(VS, D)
    b.fuse(pts, guided_reference_features(depth, fmap, pix, z, sigma), torch.full((pts.shape[0], 3), 100, dtype=torch.uint8),
           1.0 / z**2, 0.0, T[:3, 3])
    assert torch.equal(a.keys, b.keys)
    np.testing.assert_allclose(a.features_f32().numpy(), b.features_f32().numpy(), atol=3e-3, rtol=0)


@pytest.mark.parametrize("kernels", [False, True])
def test_depth_guidance_keeps_an_objects_feature_off_the_wall_behind_it(monkeypatch, kernels):
    """A step edge: the near half of the image sees feature A, the far half B. Bilinear sampling smears A onto far
    voxels at the silhouette; depth-guided sampling keeps every far voxel's A share under 1 %."""
    from geopurify_ros import fusion_kernels
    monkeypatch.setattr(fusion_kernels, "ENABLED", kernels and fusion_kernels.ENABLED)
    h, w = 15, 20
    edge = 86                                        # depth step just right of a cell centre (col 84)
    depth = np.full((CAM.height, CAM.width), 2.0, np.float32)
    depth[:, :edge] = 1.0
    cell_cols = (np.arange(w) + 0.5) * CAM.width / w
    fmap = torch.zeros(h, w, 2)
    fmap[:, cell_cols < edge, 0] = 1.0               # A: cells whose centre sees the near surface
    fmap[:, cell_cols >= edge, 1] = 1.0              # B: the far surface
    rgb = np.full((CAM.height, CAM.width, 3), 100, np.uint8)
    far_share = {}
    for sigma in (0.0, 0.02):
        vm = VoxelMap(VS, 2)
        vm.fuse_frame(depth, fmap, rgb, CAM, np.eye(4), stride=1, guide_sigma=sigma)
        far = vm.xyz[:, 2] > 1.5
        f = vm.features_f32()[far]
        far_share[sigma] = float((f[:, 0] / f.sum(1)).max())
    assert far_share[0.0] > 0.2 and far_share[0.02] < 0.01, far_share


def test_depth_affinity_is_a_gaussian_with_a_floor():
    from geopurify_ros.voxel_map import GUIDE_FLOOR, depth_affinity
    d = torch.linspace(0, 4.2, 50)
    np.testing.assert_allclose(depth_affinity(d).numpy(), np.maximum(np.exp(-0.5 * d.numpy() ** 2), GUIDE_FLOOR),
                               rtol=0.03, atol=1e-5)
    assert depth_affinity(torch.tensor([float("nan"), 1e3])).tolist() == pytest.approx([GUIDE_FLOOR] * 2)


def test_guide_sigma_must_be_finite_and_non_negative():
    vm = VoxelMap(VS, 2)
    depth = np.ones((CAM.height, CAM.width), np.float32)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="guide_sigma"):
            vm.fuse_frame(depth, torch.ones(15, 20, 2), np.zeros((CAM.height, CAM.width, 3), np.uint8), CAM, np.eye(4),
                          guide_sigma=bad)
    assert len(vm) == 0
