"""Student affinity network: shapes, invariances, overfitting, checkpoint loading."""
import math

import numpy as np
import pytest
import torch

from geopurify_ros.purify.geometry import VoxelGrid, grid_neighbours
from geopurify_ros.purify.scenes import _Builder
from geopurify_ros.purify.student import (DEFAULT_CHECKPOINT, StudentAffinityNet, StudentConfig, affinity,
                                          load_student)
from geopurify_ros.purify.teacher import SSLTeacher
from geopurify_ros.purify.train import distill_info_nce, near_negatives

VS = 0.05


def tiny_scene(seed=0, size=1.0):
    b = _Builder(np.random.default_rng(seed), VS / 2.5)
    b.rect((0, 0, 0), (size, 0, 0), (0, size, 0), (200, 180, 150), 0)
    b.rect((0, 0, 0), (0, size, 0), (0, 0, size), (90, 110, 160), 1)
    b.box((0.4 * size, 0.4 * size, 0), (0.7 * size, 0.7 * size, 0.3 * size), (160, 60, 60))
    return b.build(0.003, VS)


def test_embeddings_shape_norm_and_rotation_invariance():
    torch.manual_seed(0)
    s = tiny_scene()
    net = StudentAffinityNet(StudentConfig(embed_dim=16)).eval()
    with torch.no_grad():
        e = net(s.xyz, s.colors, grid_neighbours(s.xyz, VS))
        # 90° about z plus a whole-voxel shift maps the voxel grid onto itself: same graph, same embeddings
        xyz2 = torch.stack([-s.xyz[:, 1], s.xyz[:, 0], s.xyz[:, 2]], 1) + torch.tensor([3.0, -2.0, 1.0]) * VS
        e2 = net(xyz2, s.colors, grid_neighbours(xyz2, VS))
    assert e.shape == (len(s.xyz), 16)
    assert torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-5)
    assert torch.allclose(e, e2, atol=1e-4)
    assert net.receptive_hops == 3


def test_student_overfits_teacher_by_info_nce_on_a_tiny_scene(one_thread):
    torch.manual_seed(0)
    s = tiny_scene(size=0.6)                 # ~600 voxels: keeps the test at a few seconds
    grid = VoxelGrid(s.xyz, VS)
    nb = grid.neighbours()
    teacher = SSLTeacher().eval()
    with torch.no_grad():   # a random teacher still defines fixed, non-trivial targets
        t_emb = teacher.embed(s.xyz, s.colors)
    gen = torch.Generator().manual_seed(0)
    n = len(s.xyz)
    anchors = torch.randperm(n, generator=gen)[:256]
    near = near_negatives(grid, anchors, 15, 2, gen, n)
    # hard negatives really are near: within the radius-2 cube (2 voxels per axis), except the random
    # top-ups of anchors whose cube holds fewer than 15 voxels (scene corners)
    d = (s.xyz[near] - s.xyz[anchors, None]).abs().amax(-1)
    full = (grid.neighbours(anchors, 2) >= 0).sum(1) >= 15
    assert full.float().mean() > 0.5 and float(d[full].max()) < 3 * VS      # voxel means, not centres
    rand = torch.randint(0, n, (48,), generator=gen)
    net = StudentAffinityNet()
    head = torch.nn.Linear(net.embed_dim, t_emb.shape[1])
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3e-3)
    losses, accs = [], []
    for _ in range(60):
        e = torch.nn.functional.normalize(head(net(s.xyz, s.colors, nb)), dim=1)
        loss, acc = distill_info_nce(e, t_emb, anchors, near, rand, 0.07)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        accs.append(acc)
    assert losses[-1] < 0.8 * losses[0], losses[::10]    # floor ~ln(16): near negatives look alike
    assert accs[-1] > accs[0] + 0.1, accs[::10]


def test_feature_conditioned_student_checks_dimension(tmp_path, one_thread):
    torch.manual_seed(0)
    s = tiny_scene(size=0.6)
    nb = grid_neighbours(s.xyz, VS)
    net = StudentAffinityNet(StudentConfig(feature_dim=12, backend="fake")).eval()
    f = torch.randn(len(s.xyz), 12)
    with torch.no_grad():
        e = net(s.xyz, s.colors, nb, features=f)
        e_other = net(s.xyz, s.colors, nb, features=torch.randn(len(s.xyz), 12))
    assert e.shape == (len(s.xyz), net.embed_dim) and net.uses_features
    assert not torch.allclose(e, e_other)            # the fused features really enter the embedding
    big = torch.randn(5000, 12).half() * 3
    with torch.no_grad():                            # blocked inference projection == the plain formula
        fast = net.project(big, block=700)
    with torch.enable_grad():
        ref = net.project(big).detach()
    assert torch.allclose(fast, ref, atol=1e-5)
    with pytest.raises(ValueError, match="student_checkpoint"):
        net(s.xyz, s.colors, nb, features=torch.randn(len(s.xyz), 7))
    path = tmp_path / "student_fake.pt"
    net.save(path)
    assert load_student(path, feature_dim=12).config.feature_dim == 12
    with pytest.raises(ValueError, match="student_checkpoint.*12-d features of backend 'fake'.*384-d"):
        load_student(path, feature_dim=384)


def test_lseg_student_folded_onto_the_feature_subspace_is_exact(lseg_student_384):
    """A lseg student distilled on 384-d features, used on subspace coordinates g = Qᵀf with its projection folded
    to W Q, embeds the voxels exactly as on f = Q g; fused rows are shorter than 1 (the L2 normalisation must agree).
    The shipped student is distilled on the coordinates themselves and loads as it is."""
    from geopurify_ros.features.lseg import feature_basis

    q = feature_basis()                                                     # (384, 129)
    assert load_student(backend="lseg", feature_dim=q.shape[1], feature_basis=q).config.feature_dim == q.shape[1]
    full = load_student(lseg_student_384, feature_dim=384)
    sub = load_student(lseg_student_384, feature_dim=q.shape[1], feature_basis=q)
    assert full.config.feature_dim == 384 and sub.config.feature_dim == q.shape[1] and sub.config.backend == "lseg"
    s = tiny_scene(2)
    nb = grid_neighbours(s.xyz, VS)
    g = torch.nn.functional.normalize(torch.randn(len(s.xyz), q.shape[1], generator=torch.Generator().manual_seed(0)),
                                      dim=1) * torch.rand(len(s.xyz), 1).add(0.3)
    f = g @ q.T
    with torch.no_grad():
        e_sub, e_full = sub(s.xyz, s.colors, nb, features=g), full(s.xyz, s.colors, nb, features=f)
        e_other = full(s.xyz, s.colors, nb, features=f.roll(1, 0))
    assert (e_sub - e_full).abs().max() < 1e-4 < (e_other - e_full).abs().max()
    with torch.enable_grad():                                               # the training-time formula too
        assert (sub.project(g) - full.project(f)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="student_checkpoint.*384-d features of backend 'lseg'.*200-d"):
        load_student(lseg_student_384, feature_dim=200)
    with pytest.raises(ValueError, match="student_checkpoint.*384-d features.*129-d"):   # a basis of another space
        load_student(lseg_student_384, feature_dim=129, feature_basis=torch.eye(512)[:, :129])


def test_student_is_bound_to_the_feature_weights_it_was_distilled_on(tmp_path):
    """A feature-conditioned student records its backend's weights digest: the same digest loads, another is a
    clear error for an explicit checkpoint (its projection would read other features' coordinates), and a
    checkpoint that recorded none (older files) is taken as it is."""
    net = StudentAffinityNet(StudentConfig(feature_dim=12, backend="fake", feature_weights="a" * 64))
    path = tmp_path / "student_fake.pt"
    net.save(path)
    assert load_student(path, feature_dim=12, feature_weights="a" * 64).config.feature_weights == "a" * 64
    with pytest.raises(ValueError, match="student_checkpoint.*other 'fake' weights.*aaaaaaaaaaaa.*bbbbbbbbbbbb"):
        load_student(path, feature_dim=12, feature_weights="b" * 64)
    StudentAffinityNet(StudentConfig(feature_dim=12, backend="fake")).save(path)
    assert load_student(path, feature_dim=12, feature_weights="b" * 64).uses_features


def test_shipped_conse_student_is_bound_to_the_conse_weights():
    from geopurify_ros.features import make_backend

    assert load_student(backend="conse").config.feature_weights == make_backend("conse", device="cpu").weights_digest()


def test_backend_without_shipped_student_falls_back_with_one_warning():
    import warnings

    from geopurify_ros.purify import student as st

    st._WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = load_student(backend="no_such_backend", feature_dim=512)
        b = load_student(backend="no_such_backend", feature_dim=512)
    msgs = [str(x.message) for x in w if "student_checkpoint" in str(x.message)]
    assert len(msgs) == 1 and "no_such_backend" in msgs[0] and "geopurify-train" in msgs[0]
    assert not a.uses_features and not b.uses_features


def test_affinity_helper_masks_missing_neighbours():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), dim=1)
    nb = torch.tensor([[1, -1], [0, -1]])
    a = affinity(e, nb)
    assert a[0, 1] == 0 and math.isclose(float(a[0, 0]), math.sqrt(0.5), rel_tol=1e-5)


def test_shipped_checkpoint_loads_and_embeds():
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("no shipped checkpoint yet")
    net = load_student()
    assert not net.training
    s = tiny_scene(1)
    with torch.no_grad():
        e = net(s.xyz, s.colors, grid_neighbours(s.xyz, VS))
    assert e.shape == (len(s.xyz), net.embed_dim) and torch.isfinite(e).all()
    assert DEFAULT_CHECKPOINT.stat().st_size < 1_000_000


def test_load_student_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="student_checkpoint"):
        load_student(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="student_checkpoint"):
        load_student(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "something-else"}, wrong)
    with pytest.raises(ValueError, match="format"):
        load_student(wrong)
    ok = tmp_path / "ok.pt"
    StudentAffinityNet(StudentConfig(hidden=8, embed_dim=4)).save(ok, {"note": "x"})
    net = load_student(ok)
    assert net.embed_dim == 4 and net.meta == {"note": "x"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_student_runs_on_gpu():
    s = tiny_scene()
    net = StudentAffinityNet().cuda().eval()
    with torch.no_grad():
        e = net(s.xyz.cuda(), s.colors.cuda(), grid_neighbours(s.xyz, VS).cuda())
    assert e.is_cuda and e.shape[0] == len(s.xyz)


def test_teacher_interface_and_external_teacher_errors(tmp_path, one_thread):
    from geopurify_ros.purify.teacher import ExternalTeacher, SSLTeacher, make_teacher
    s = tiny_scene(size=0.5)
    t = make_teacher("ssl")
    z = t.embed(s.xyz, s.colors)
    assert z.shape == (len(s.xyz), t.embed_dim) and not z.requires_grad
    t.save(tmp_path / "t.pt")
    assert torch.allclose(SSLTeacher.load(tmp_path / "t.pt").embed(s.xyz, s.colors), z, atol=1e-6)
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        ExternalTeacher("sonata", None)
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        ExternalTeacher("sonata", tmp_path / "nope.pth")
    (tmp_path / "w.pth").write_bytes(b"x")
    with pytest.raises((ImportError, ValueError), match="teacher"):
        ExternalTeacher("sonata", tmp_path / "w.pth")      # package absent here -> clear ImportError


def _reference_student_forward(net, xyz, colors, nb):
    """The straightforward (pre-optimisation) forward: PCA normals by generic eigh, flat messages."""
    from geopurify_ros.purify.geometry import colors_float, edge_list
    xyz = xyz.float()
    n = xyz.shape[0]
    src, dst = edge_list(nb)
    rel = xyz[dst] - xyz[src]
    cnt = torch.ones(n).index_add_(0, src, torch.ones(src.numel()))
    s1 = torch.zeros(n, 3).index_add_(0, src, rel)
    s2 = torch.zeros(n, 9).index_add_(0, src, (rel[:, :, None] * rel[:, None, :]).reshape(-1, 9))
    mean = s1 / cnt[:, None]
    cov = s2.view(n, 3, 3) / cnt[:, None, None] - mean[:, :, None] * mean[:, None, :] + 1e-10 * torch.eye(3)
    evals, evecs = torch.linalg.eigh(cov)
    nrm, evals = evecs[..., 0].clone(), evals.clamp(min=0)
    curv = evals[:, 0] / evals.sum(1).clamp(min=1e-12)
    nrm[cnt < 3] = 0.0
    curv[cnt < 3] = 1.0 / 3.0
    c = colors_float(colors)
    cm = c.clone().index_add_(0, src, c[dst]) / cnt[:, None]
    var = ((c - cm) ** 2).index_add_(0, src, (c[dst] - cm[src]) ** 2) / cnt[:, None]
    occ = (nb >= 0).float().sum(1, keepdim=True) / 26.0
    feats = torch.cat([c - 0.5, cm - 0.5, var.clamp(min=0).sqrt() * 4.0, curv[:, None] * 6.0, occ], 1)
    d = (xyz[dst] - xyz[src]) / net.config.voxel_size
    ni, nj = nrm[src], nrm[dst]
    edges = torch.cat([d.norm(dim=-1, keepdim=True) - 1.2, (d * ni).sum(-1, keepdim=True).abs(),
                       1.0 - (ni * nj).sum(-1, keepdim=True).abs(), (c[dst] - c[src]).abs() * 3.0], -1)
    h = net.stem(feats)
    for r in net.rounds:
        ah, bh = r.a(h), r.b(h)
        m = torch.relu(ah[dst] + bh[src] + r.g(edges))
        agg = torch.relu(ah + bh).scatter_reduce(0, src[:, None].expand(-1, m.shape[1]), m, "amax",
                                                 include_self=True)
        h = h + r.out(torch.cat([h, agg], 1))
    return torch.nn.functional.normalize(net.head(h), dim=1)


@pytest.mark.parametrize("shipped", [False, True])
def test_fast_inference_path_matches_reference_forward(shipped):
    """The blocked, closed-form-normals inference path equals the plain formulation on random data."""
    if shipped and not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("no shipped checkpoint")
    torch.manual_seed(3)
    net = load_student() if shipped else StudentAffinityNet(StudentConfig()).eval()
    # a random voxel cloud (dense clumps: all neighbour counts) plus a plane (degenerate-free normals)
    ijk = torch.unique(torch.randint(0, 40, (60000, 3)), dim=0)
    plane = torch.stack(torch.meshgrid(torch.arange(60), torch.arange(60), indexing="ij"), -1).reshape(-1, 2)
    ijk = torch.unique(torch.cat([ijk, torch.cat([plane, torch.full((3600, 1), 50)], 1)]), dim=0)
    xyz = (ijk.float() + 0.5 + 0.2 * torch.rand(ijk.shape)) * VS
    colors = torch.randint(0, 256, (len(xyz), 3), dtype=torch.uint8)
    nb = grid_neighbours(xyz, VS)
    assert (nb >= 0).sum() > 70000                      # large enough to take the blocked code paths
    with torch.no_grad():
        fast = net(xyz, colors, nb)
        ref = _reference_student_forward(net, xyz, colors, nb)
    assert torch.allclose(fast, ref, atol=2e-5), (fast - ref).abs().max()
