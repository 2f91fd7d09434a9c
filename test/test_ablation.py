"""GeoPurify ablation helpers: variants mean what their names say, tables, seed protocol."""
import numpy as np
import pytest
import torch

from geopurify_ros.eval.ablation import Variant, default_variants, markdown, parse_seeds, run_variant
from geopurify_ros.purify.purifier import PurifyConfig
from geopurify_ros.purify.rooms import check_training_seed
from geopurify_ros.purify.scenes import room_scene
from geopurify_ros.purify.student import StudentAffinityNet, StudentConfig
from geopurify_ros.voxel_map import VoxelMap


@pytest.fixture(scope="module")
def vmap():
    torch.manual_seed(0)
    s = room_scene(3, size=(2.0, 2.0), n_objects=2, n_posters=1)
    feats = torch.nn.functional.one_hot(s.instance % 6, 6).float() + 0.3 * torch.rand(len(s.xyz), 6)
    vm = VoxelMap(voxel_size=0.05, feature_dim=6, max_voxels=4 * len(s.xyz))
    vm.fuse(s.xyz, feats, s.colors, stamp=0.0, sensor_origin=torch.tensor([0.6, 0.6, 1.5]))
    return vm


def test_constant_affinities_without_gates_is_uniform_smoothing(vmap):
    cfg = PurifyConfig(iterations=3, affinity_threshold=-1.0)
    student = StudentAffinityNet(StudentConfig()).eval()
    const = run_variant(Variant("c", "ggp", student="constant", gates=False), vmap, student, cfg)
    uni = run_variant(Variant("u", "uniform"), vmap, student, cfg)
    raw = run_variant(Variant("raw", "raw"), vmap, student, cfg)
    assert torch.allclose(const, uni, atol=2e-3)                 # float16 storage of the pooled output
    assert not torch.allclose(uni, raw, atol=1e-2)
    gated = run_variant(Variant("g", "ggp", student="constant", gates=True), vmap, student, cfg)
    assert not torch.allclose(gated, uni, atol=1e-2)            # the gates change the result


def test_paper_like_variant_uses_wider_neighbourhood_and_more_iterations(vmap):
    v = default_variants(3)[-1]
    assert v.overrides["iterations"] == 18 and v.overrides["radius"] == 2 and not v.gates
    student = StudentAffinityNet(StudentConfig()).eval()
    cfg = PurifyConfig()
    a = run_variant(v, vmap, student, cfg)
    b = run_variant(Variant("x", "ggp", gates=False), vmap, student, cfg)
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)


def test_markdown_tables_and_seed_parsing():
    res = {s: {"raw": {"miou": 0.1 + s / 100, "per_class": {"wall": {"iou": 0.5}}},
               "pooled": {"miou": 0.2 + s / 100, "per_class": {"wall": {"iou": 0.4}}}} for s in (0, 1, 2)}
    md = markdown(res, ["wall", "floor"], [0, 1, 2])
    assert "| pooled | 20.0 | +10.0 | 21.5 | +10.0 |" in md
    assert "| wall | 50.0 | 40.0 ↓ |" in md and "floor" not in md.split("Per-class")[1]
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]


def test_training_seeds_exclude_evaluation_and_reserved_ranges():
    for bad in (0, 9, 10, 99, 999):
        with pytest.raises(ValueError, match="seed"):
            check_training_seed(bad)
    assert check_training_seed(1000) == 1000


def test_fused_map_cache_key_follows_weights_and_fusion_config():
    """A retrained head or another fusion setting must never be served a map fused before the change."""
    from types import SimpleNamespace

    from geopurify_ros.config import PipelineConfig
    from geopurify_ros.eval.ablation import fused_map_path, fusion_fingerprint

    backend = SimpleNamespace(name="fake", dim=4, head=torch.nn.Linear(4, 4))

    def key(params=None, **cfg):
        return fusion_fingerprint(SimpleNamespace(backend=backend, config=PipelineConfig(device="cpu", **cfg)),
                                  params or {})

    k = key()
    assert key() == k and key(class_names=["a", "b"]) == k          # labels do not change the fused features
    assert key(voxel_size=0.04) != k
    assert key({"keyframe_min_translation_m": 0.3}) != k
    with torch.no_grad():
        backend.head.weight[0, 0] += 1e-3
    assert key() != k
    pipe = SimpleNamespace(backend=backend, config=PipelineConfig(device="cpu"))
    assert fused_map_path(pipe.backend, fusion_fingerprint(pipe, {}), 3).name == f"fake_4_demo_3_{key()}.pt"


def test_paper_scale_variant_keeps_the_gates(vmap):
    v = default_variants(3)[-2]
    assert v.overrides == {"iterations": 18, "radius": 2} and v.gates and v.student == "student"


def test_scale_sweep_grid_and_cli_refuses_evaluation_seeds(capsys):
    from geopurify_ros.eval.ablation import main, scale_sweep_variants

    v = {x.name: x for x in scale_sweep_variants()}
    assert v["raw"].kind == "raw" and len(v) == len(scale_sweep_variants())          # names are unique
    assert v["student + gates it=18 r=2"].overrides == {"iterations": 18, "radius": 2} and v["student + gates it=18 r=2"].gates
    assert not v["student, no gates it=10 r=2"].gates
    assert v["constant + gates it=10 r=2"].student == "constant"
    assert v["student + normal/depth gates it=3 r=2"].overrides["color_gate"] is False
    assert v["uniform it=6 r=1"].kind == "uniform"
    assert main(["--sweep", "scale", "--seeds", "0-1", "--out", "/nonexistent/x"]) == 2
    assert "seed" in capsys.readouterr().err


def test_ceiling_rows_teacher_and_oracle_affinities(capsys):
    """--sweep ceiling: the oracle's one-hot ground-truth embeddings pool only within a class, so its labels beat raw
    and uniform smoothing on a noisy map; the teacher row runs the shipped teacher; both need their embeddings."""
    from geopurify_ros.eval.ablation import ceiling_embeddings, ceiling_variants, main

    rows = {v.name: v for v in ceiling_variants()}
    assert len(rows) == len(ceiling_variants()) and rows["oracle, no gates at paper scale"].overrides["radius"] == 2
    s = room_scene(3, size=(2.0, 2.0), n_objects=2, n_posters=1)
    truth = s.instance % 6
    g = torch.Generator().manual_seed(1)
    wrong = torch.rand(len(truth), generator=g) < 0.35                 # 35 % of the points carry another class
    noisy = torch.where(wrong, (truth + torch.randint(1, 6, truth.shape, generator=g)) % 6, truth)
    vm = VoxelMap(voxel_size=0.05, feature_dim=6, max_voxels=4 * len(s.xyz))
    vm.fuse(s.xyz, torch.nn.functional.one_hot(noisy, 6).float(), s.colors, stamp=0.0,
            sensor_origin=torch.tensor([0.6, 0.6, 1.5]))
    fixed = ceiling_embeddings(vm, s.xyz.numpy(), truth.numpy(), 6, radius=0.075)
    assert fixed["oracle"].shape == (len(vm), 7) and fixed["teacher"].shape[0] == len(vm)
    labels = fixed["oracle"].argmax(1)
    cfg, student = PurifyConfig(iterations=3), StudentAffinityNet(StudentConfig()).eval()
    acc = {name: (run_variant(rows[name], vm, student, cfg, fixed).argmax(1) == labels).float().mean().item()
           for name in ("raw", "oracle, no gates", "teacher, no gates")}
    acc["uniform"] = (run_variant(Variant("u", "uniform"), vm, student, cfg).argmax(1) == labels).float().mean().item()
    assert acc["raw"] < 0.9 and acc["oracle, no gates"] > max(acc["raw"], acc["uniform"]) + 0.02
    with pytest.raises(ValueError, match="oracle embeddings"):
        run_variant(rows["oracle, no gates"], vm, student, cfg)
    assert main(["--sweep", "ceiling", "--seeds", "5", "--out", "/nonexistent/x"]) == 2
    assert "seed" in capsys.readouterr().err
