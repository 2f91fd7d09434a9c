"""MappingPipeline under concurrency: purification computes on a StagedMap (same result as in place), queries run
while a pass computes and wait at most one commit block, and the fast query path equals the reference formula."""
import contextlib
import threading
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geopurify_ros import staged_map
from geopurify_ros.camera import CameraModel, pose_to_matrix
from geopurify_ros.config import PipelineConfig
from geopurify_ros.pipeline import MappingPipeline
from geopurify_ros.purify.purifier import Purifier
from geopurify_ros.staged_map import StagedMap
from geopurify_ros.voxel_map import VoxelMap

D = 16
CAM = CameraModel(80, 60, 60.0, 60.0, 39.5, 29.5)


class WordBackend:
    """Each word embeds as a fixed random unit vector; an image encodes as a smooth field of two words' vectors."""

    name = "toy"
    dim = D
    device = torch.device("cpu")

    def encode_text(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(zlib.crc32(t.rstrip(".").split()[-1].encode()))
            out.append(F.normalize(torch.randn(D, generator=g), dim=0))
        return torch.stack(out)

    def encode_image(self, rgb):
        a, b = self.encode_text(["chair", "wall"])
        h, w = rgb.shape[0] // 8, rgb.shape[1] // 8
        t = torch.linspace(0, 1, w)[None, :, None].expand(h, w, 1)
        return F.normalize(t * a + (1 - t) * b, dim=-1)


def frame(i):
    rng = np.random.default_rng(i)
    depth = (1.5 + 0.4 * rng.random((CAM.height, CAM.width))).astype(np.float32)
    rgb = rng.integers(0, 255, (CAM.height, CAM.width, 3), dtype=np.uint8)
    return rgb, depth, CAM, pose_to_matrix([0.08 * i, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]), float(i)


@pytest.fixture
def pipe():
    p = MappingPipeline(PipelineConfig(device="cpu", class_names=["chair", "wall", "table"]), backend=WordBackend())
    for i in range(3):
        p.process_frame(*frame(i))
    return p


def channels(vm):
    """The Purifier's channels (the pipeline adds its own query statistics)."""
    return {n: vm.channel(n).clone() for n in vm.channel_names() if n.startswith("purif")}


@contextlib.contextmanager
def stalled(obj, method: str, run, *args, enter_timeout: float = 10):
    """Run `run(*args)` on a thread whose call of `obj.<method>` blocks on entry until the block ends; yields
    the thread once it is blocked there, then releases it, joins it and restores the method."""
    entered, release = threading.Event(), threading.Event()
    real = getattr(obj, method)

    def slow(*a, **kw):
        entered.set()
        assert release.wait(10)
        return real(*a, **kw)

    setattr(obj, method, slow)
    th = threading.Thread(target=run, args=args)
    th.start()
    try:
        assert entered.wait(enter_timeout)
        yield th
    finally:
        release.set()
        th.join(30)
        setattr(obj, method, real)


def test_staged_purify_equals_purify_in_place(pipe, tmp_path):
    pipe.voxel_map.save(tmp_path / "m.pt")
    ref_map = VoxelMap.load(tmp_path / "m.pt")
    ref = Purifier(student=pipe.purifier.student, config=pipe.purifier.config)
    pipe.purify(incremental=True)                        # first pass: channels created, full
    ref.purify(ref_map, mode="pooled", incremental=True)
    got, want = channels(pipe.voxel_map), channels(ref_map)
    assert set(got) == set(want) == {"purified", "purify_embedding", "purify_normal"}
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert pipe.voxel_map.dirty_slots().numel() == 0
    # An incremental pass after a new frame, committed in many small blocks.
    pipe.process_frame(*frame(3))
    pipe.voxel_map.save(tmp_path / "m2.pt")
    ref_map2 = VoxelMap.load(tmp_path / "m2.pt")
    ref2 = Purifier(student=pipe.purifier.student, config=pipe.purifier.config)
    ref2.purify(ref_map2, mode="pooled", incremental=False)
    staged_map.COMMIT_BLOCK_ROWS, old = 97, staged_map.COMMIT_BLOCK_ROWS
    try:
        out = pipe.purify(incremental=True)
    finally:
        staged_map.COMMIT_BLOCK_ROWS = old
    assert out["stats"].incremental and 0 < out["stats"].updated < len(pipe.voxel_map)
    for name, want in channels(ref_map2).items():   # incremental == full, as Purifier guarantees in place
        assert torch.allclose(pipe.voxel_map.channel(name).float(), want.float(), atol=2e-3), name


def test_commit_blocks_apply_rows_in_order_and_clear_dirty_last():
    vm = VoxelMap(0.05, 4)
    vm.fuse(torch.rand(50, 3) * 10, torch.randn(50, 4))
    vm.add_channel("out", (4,), torch.float16)
    st = StagedMap(vm)
    st.set_channel("out", torch.arange(35), torch.ones(35, 4))
    assert st.channel("out")[:35].eq(1).all() and vm.channel("out").eq(0).all()   # staged, map untouched
    st.clear_dirty()
    assert st.dirty_slots().numel() == 0 and vm.dirty_slots().numel() == 50
    blocks = st.commit_blocks(block_rows=10)
    next(blocks)
    assert vm.channel("out")[:10].eq(1).all() and vm.channel("out")[10:].eq(0).all()
    assert vm.dirty_slots().numel() == 50
    assert sum(1 for _ in blocks) == 3                   # 3 more blocks, then the dirty set is cleared
    assert vm.channel("out")[:35].eq(1).all() and vm.channel("out")[35:].eq(0).all()
    assert vm.dirty_slots().numel() == 0


def test_query_runs_while_a_purification_pass_computes(pipe):
    pipe.purify()
    pipe.process_frame(*frame(3))                        # dirty voxels: the query reads raw features for those
    before = pipe.query("chair", threshold=0.01)
    with stalled(pipe.purifier, "purify", pipe.purify) as th:
        t0 = time.monotonic()
        during = pipe.query("chair", threshold=0.01)      # must not wait for the pass
        cloud = pipe.labelled_cloud()
        assert time.monotonic() - t0 < 5 and th.is_alive()
    np.testing.assert_array_equal(during.cloud, before.cloud)   # the pass had not committed: same map
    assert len(cloud) == len(pipe.voxel_map)
    assert pipe.voxel_map.dirty_slots().numel() == 0


def test_query_equals_reference_formula(pipe):
    pipe.purify()
    pipe.query("chair")                                  # query statistics computed for the purified rows ...
    pipe.process_frame(*frame(3))
    pipe.purify()                                        # ... and invalidated where this pass rewrote them
    pipe.process_frame(*frame(4))                        # some voxels dirty: raw features for those
    vm = pipe.voxel_map
    feats = vm.channel("purified").float()
    dirty = vm.dirty_slots()
    feats[dirty] = vm.features.float()[dirty]
    emb = pipe.scorer.embed(["chair"] + pipe.scorer.negatives)
    sim = F.normalize(feats, dim=-1, eps=1e-6) @ emb.T
    ref = torch.sigmoid((sim[:, :1] - sim[:, 1:]) / pipe.scorer.temperature).min(1).values
    # A threshold in a clear gap of the reference scores, near the median (no borderline voxels).
    v = torch.sort(ref).values
    k = len(v) // 2 + int(torch.argmax((v[len(v) // 2 + 1:] - v[len(v) // 2:-1] > 1e-4).int()))
    threshold = float(v[k] + v[k + 1]) / 2
    res = pipe.query("chair", threshold=threshold)
    idx = torch.nonzero(ref >= threshold).flatten()
    idx = idx[torch.argsort(ref[idx], descending=True)]
    assert 0 < len(idx) < len(vm) and len(res.scores) == len(idx)
    np.testing.assert_allclose(res.scores, ref[idx].numpy(), atol=1e-5)
    np.testing.assert_allclose(res.cloud["x"], vm.xyz[idx, 0].numpy())
    labels_ref = (F.normalize(feats, dim=-1, eps=1e-6) @ pipe.scorer.class_embeddings.T
                  - pipe.scorer.class_bias).argmax(1)
    assert res.cloud["label"].tolist() == labels_ref[idx].tolist()


def test_mode_change_during_a_pass_makes_the_next_pass_full(pipe):
    pipe.purify()
    pipe.process_frame(*frame(3))
    with stalled(pipe.purifier, "purify", pipe.purify):
        pipe.set_purify_mode("purified")                 # arrives while the (pooled, incremental) pass computes
    # Until a pass in the new mode commits, readers see the raw fused features, not the old mode's output.
    _, raw_scores = pipe.scorer.label(pipe.voxel_map.features)
    _, pooled_scores = pipe.scorer.label(pipe.voxel_map.channel("purified"))
    assert not torch.allclose(raw_scores, pooled_scores)
    np.testing.assert_allclose(pipe.labelled_cloud()["score"], raw_scores.numpy(), rtol=1e-6)
    out = pipe.purify(incremental=True)
    assert out["stats"].mode == "purified" and not out["stats"].incremental and out["stats"].updated == len(pipe.voxel_map)


def test_cached_negative_statistics_give_the_same_scores(pipe):
    feats = pipe.voxel_map.features
    stats = pipe.scorer.negative_stats(feats)
    for text, negs in (("chair", ()), ("chair", ("wall", "lamp")), ("stuff", ()), ("table", ("chair",))):
        torch.testing.assert_close(pipe.scorer.query(feats, text, negs, stats=stats),
                                   pipe.scorer.query(feats, text, negs), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="stats"):
        pipe.scorer.query(feats, "chair", stats=stats[:5])


def test_loaded_map_recomputes_query_statistics(pipe, tmp_path):
    pipe.purify()
    pipe.query("chair")
    pipe.voxel_map.channel("query_stats")[:] = 0.0          # as if computed with other negatives
    pipe.save(tmp_path / "m.pt")
    other = MappingPipeline(PipelineConfig(device="cpu", class_names=["chair", "wall", "table"]),
                            backend=WordBackend())
    other.load(tmp_path / "m.pt")
    other.purify()
    got = other.query("chair", threshold=0.01)
    ref = pipe.scorer.query(other.voxel_map.channel("purified"), "chair")
    np.testing.assert_allclose(np.sort(got.scores), np.sort(ref[ref >= 0.01].numpy()), atol=1e-5)


def test_stats_do_not_wait_for_a_fusion(pipe):
    before = pipe.stats()
    with stalled(pipe.voxel_map, "fuse_frame", pipe.process_frame, *frame(5), enter_timeout=30):
        t0 = time.monotonic()                            # the worker holds the write side now
        during = pipe.stats()
        assert time.monotonic() - t0 < 1.0 and during["frames_fused"] == before["frames_fused"]
    after = pipe.stats()
    assert after["frames_fused"] == before["frames_fused"] + 1 and after["voxels"] == len(pipe.voxel_map)
    assert after["dirty_voxels"] == pipe.voxel_map.dirty_slots().numel() > 0
