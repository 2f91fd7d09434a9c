"""The fused CPU kernels (geopurify_ros/fusion_kernels.py) give the torch path's map, and a kernel failure falls back."""
import numpy as np
import pytest
import torch

from geopurify_ros import fusion_kernels
from geopurify_ros.camera import CameraModel
from geopurify_ros.voxel_map import KEY_MAX, VoxelMap

from test_voxel_map import CAM, VS, look_down_pose

needs_numba = pytest.mark.skipif(not fusion_kernels.ENABLED, reason="numba not installed (torch path only)")


ODD_CAM = CameraModel(161, 119, 140.0, 140.0, 80.0, 59.0)   # sizes no stride divides


def run_sequence(use_kernels: bool, monkeypatch, max_voxels: int, weighting: str, D: int = 7, cam=CAM,
                 strides=(1, 2), guide: float = 0.0):
    """Five moving frames with holes, NaN/out-of-range depth, one frame straddling the key limit, an aux channel."""
    monkeypatch.setattr(fusion_kernels, "ENABLED", use_kernels)
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(15, 20, D, generator=g)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (cam.height, cam.width, 3), dtype=np.uint8)
    vm = VoxelMap(VS, D, max_voxels=max_voxels)
    vm.add_channel("tag", (), torch.int32, fill=-3)
    stats = []
    for i in range(5):
        depth = (0.8 + 0.3 * rng.random((cam.height, cam.width))).astype(np.float32)
        depth[rng.random(depth.shape) < 0.05] = np.nan
        depth[rng.random(depth.shape) < 0.02] = 50.0        # beyond max_depth
        T = look_down_pose(1.2 + 0.05 * i)
        T[:3, 3] += [0.07 * i, -0.03 * i, 0.0]
        if i == 4:
            T[:3, 3] = [(KEY_MAX + 0.5) * VS, 0.0, 1.0]       # half of this frame is outside the key range
        st = vm.fuse_frame(depth, fmap, rgb, cam, T, stamp=float(i), stride=strides[i % len(strides)],
                           weighting=weighting, guide_sigma=guide)
        stats.append((st.new, st.updated, st.evicted, st.points))
        if i == 2:
            vm.clear_dirty()
    return vm, stats


@needs_numba
@pytest.mark.parametrize("max_voxels,weighting,cam,strides,guide", [
    (100_000, "depth", CAM, (1, 2), 0.0), (700, "depth", CAM, (1, 2), 0.0), (100_000, "uniform", CAM, (1, 2), 0.0),
    (100_000, "depth", ODD_CAM, (3, 2, 1), 0.0), (100_000, "depth", CAM, (1, 2), 0.05),
    (700, "uniform", ODD_CAM, (3, 2, 1), 0.02)])
def test_kernels_match_torch_path(monkeypatch, max_voxels, weighting, cam, strides, guide):
    a, sa = run_sequence(True, monkeypatch, max_voxels, weighting, cam=cam, strides=strides, guide=guide)
    assert fusion_kernels.available(), fusion_kernels._BROKEN
    b, sb = run_sequence(False, monkeypatch, max_voxels, weighting, cam=cam, strides=strides, guide=guide)
    assert sa == sb
    # Same voxels in the same slots (the kernels sort keys like the torch path), same integer fields.
    for name in ("keys", "counts", "last_seen"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.dirty_slots(), b.dirty_slots()) and torch.equal(a.channel("tag"), b.channel("tag"))
    # Float sums differ only in summation order: float32 rounding, then one float16 ulp at most.
    np.testing.assert_allclose(a.weights.numpy(), b.weights.numpy(), rtol=1e-5)
    np.testing.assert_allclose(a.xyz.numpy(), b.xyz.numpy(), atol=1e-5, rtol=1e-6)   # 1e-6: the frame at ~52 km
    np.testing.assert_allclose(a.features_f32().numpy(), b.features_f32().numpy(), atol=2e-3, rtol=2e-3)
    assert int((a.colors.int() - b.colors.int()).abs().max()) <= 1
    probe = torch.cat((a.keys[:50], a.keys[:50] + 1))
    assert torch.equal(a.lookup(probe), b.lookup(probe))
    if max_voxels == 700:
        assert len(a) == 700 and any(s[2] for s in sa)      # eviction ran


@needs_numba
def test_kernel_failure_falls_back_to_torch_path_once(monkeypatch, caplog):
    """A compiler failure is found when availability is first asked (before any map is touched), logged once."""
    monkeypatch.setattr(fusion_kernels, "_BROKEN", [])
    monkeypatch.setattr(fusion_kernels, "_READY", [])
    ref, _ = run_sequence(False, monkeypatch, 100_000, "depth")

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM says no")

    monkeypatch.setattr(fusion_kernels, "_compile_all", broken)
    with caplog.at_level("WARNING"):
        got, _ = run_sequence(True, monkeypatch, 100_000, "depth")
    assert not fusion_kernels.available() and "LLVM says no" in fusion_kernels._BROKEN[0]
    assert sum("fusion kernels disabled" in r.message for r in caplog.records) == 1
    assert torch.equal(got.keys, ref.keys) and torch.equal(got.features, ref.features)


def test_torch_path_without_kernels(monkeypatch):
    """GEOPURIFY_FUSION_KERNELS=0 / no numba: the torch path alone builds the map (what CUDA always uses)."""
    vm, stats = run_sequence(False, monkeypatch, 100_000, "depth")
    assert len(vm) > 0 and all(s[3] > 0 for s in stats)


@needs_numba
@pytest.mark.parametrize("grid,guide", [((1, 1), 0.0), ((1, 7), 0.0), ((5, 1), 0.0), ((1, 7), 0.05), ((5, 1), 0.05)])
def test_degenerate_feature_grids_and_empty_frames_match(monkeypatch, grid, guide):
    """1-cell-wide feature maps (coinciding bilinear corners) and a frame without valid depth, both paths."""
    rng = np.random.default_rng(5)
    fmap = torch.randn(*grid, 4, generator=torch.Generator().manual_seed(5))
    rgb = rng.integers(0, 256, (CAM.height, CAM.width, 3), dtype=np.uint8)
    depth = (0.8 + 0.3 * rng.random((CAM.height, CAM.width))).astype(np.float32)
    maps = []
    for use in (True, False):
        monkeypatch.setattr(fusion_kernels, "ENABLED", use)
        vm = VoxelMap(VS, 4)
        st = vm.fuse_frame(np.full_like(depth, np.nan), fmap, rgb, CAM, look_down_pose(1.0))
        assert (st.new, st.points) == (0, 0) and len(vm) == 0 and vm.origin is not None
        vm.fuse_frame(depth, fmap, rgb, CAM, look_down_pose(1.2), stride=2, guide_sigma=guide)
        maps.append(vm)
    a, b = maps
    assert torch.equal(a.keys, b.keys) and torch.equal(a.counts, b.counts)
    np.testing.assert_allclose(a.features_f32().numpy(), b.features_f32().numpy(), atol=2e-3, rtol=2e-3)
