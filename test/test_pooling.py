"""Geometry-guided pooling: denoising, boundary preservation, gating, incremental exactness."""
import pytest
import torch

from geopurify_ros.purify.geometry import edge_gates, grid_neighbours, normals_curvature
from geopurify_ros.purify.pooling import geometry_guided_pooling, incremental_pooling, uniform_smoothing
from geopurify_ros.purify.scenes import l_corner, noisy_onehot

VS = 0.05


def test_l_corner_restores_labels_and_beats_uniform_smoothing_at_the_boundary():
    s = l_corner()
    labels = s.instance
    feats = noisy_onehot(labels, 5, 0.3)
    assert (feats.argmax(1) == labels).float().mean() < 0.8
    nb = grid_neighbours(s.xyz, VS)
    normals, _ = normals_curvature(s.xyz, nb)
    gates = edge_gates(s.xyz, s.colors, normals, nb, VS)
    emb = torch.ones(len(labels), 8)                     # geometry-blind embeddings: gates do the work
    out = geometry_guided_pooling(feats, emb, nb, iterations=3, gates=gates)
    uni = uniform_smoothing(feats, nb, iterations=3)
    near = (s.xyz[:, 0] < 2.5 * VS) & (s.xyz[:, 2] < 2.5 * VS)   # within ~2 voxels of the crease
    assert near.sum() > 40
    acc = (out.argmax(1) == labels).float()
    acc_u = (uni.argmax(1) == labels).float()
    assert acc.mean() >= 0.95
    assert acc[near].mean() >= 0.85
    assert acc_u[near].mean() < acc[near].mean() - 0.1     # geometry-blind smoothing bleeds
    # the pooled output is a convex combination: rows still sum to 1
    assert torch.allclose(out.sum(1), torch.ones(len(labels)), atol=1e-4)


def test_affinity_threshold_and_self_weight_semantics():
    xyz = torch.tensor([[0.0, 0, 0], [0.05, 0, 0], [0.10, 0, 0]])
    nb = grid_neighbours(xyz, VS)
    feats = torch.eye(3)
    emb = torch.tensor([[1.0, 0], [1.0, 0], [0.0, 1.0]])          # voxel 2 dissimilar (cos 0)
    out = geometry_guided_pooling(feats, emb, nb, iterations=1, temperature=0.1, affinity_threshold=0.5)
    assert out[2].tolist() == [0.0, 0.0, 1.0]                   # nothing passes the threshold
    assert out[0, 2] == 0 and out[1, 2] == 0
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.equal(geometry_guided_pooling(feats, emb, nb, iterations=0), feats)


def test_incremental_pooling_equals_full_pass_on_affected_rows():
    torch.manual_seed(0)
    s = l_corner(1)
    n = len(s.xyz)
    nb = grid_neighbours(s.xyz, VS)
    feats = torch.randn(n, 16)
    emb = torch.nn.functional.normalize(torch.randn(n, 8) * 0.3 + 1.0, dim=1)
    gates = torch.rand(nb.shape) * (nb >= 0)
    full0 = geometry_guided_pooling(feats, emb, nb, 3, gates=gates)
    changed = torch.randperm(n)[:40]
    feats[changed] = torch.randn(40, 16)
    emb[changed] = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
    full1 = geometry_guided_pooling(feats, emb, nb, 3, gates=gates)
    affected, part = incremental_pooling(feats, emb, nb, changed, 3, gates=gates)
    assert affected.numel() < n
    merged = full0.clone()
    merged[affected] = part
    assert torch.allclose(merged, full1, atol=1e-5)
    # callable neighbour/gate providers (the VoxelMap path) give the same rows
    affected2, part2 = incremental_pooling(feats, emb, lambda s_: nb[s_], changed, 3,
                                           gates=lambda s_, rows: gates[s_], n=n)
    assert torch.equal(affected, affected2) and torch.allclose(part, part2, atol=1e-6)


def test_bad_shapes_raise_value_error():
    nb = torch.full((4, 26), -1)
    with pytest.raises(ValueError, match="gates"):
        geometry_guided_pooling(torch.zeros(4, 3), torch.ones(4, 2), nb, gates=torch.ones(4, 3))
    with pytest.raises(ValueError, match="row counts"):
        geometry_guided_pooling(torch.zeros(5, 3), torch.ones(4, 2), nb)
