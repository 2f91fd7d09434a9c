"""Teacher pre-training and geopurify-train end to end (label-free), on training seeds only (>= 1000)."""
import json

import pytest
import torch

from geopurify_ros.purify.pretrain import PretrainConfig, main as pretrain_main, pretrain
from geopurify_ros.purify.student import load_student
from geopurify_ros.purify.teacher import MultiScaleTeacher, load_teacher


def tiny_training_recording():
    from geopurify_ros.cache import cache_dir
    from geopurify_ros.data.make_demo import generate

    out = cache_dir("demo_tiny_1000")
    generate(out, "tiny", 1000, log=lambda *_: None)
    return out


def test_pretrain_writes_a_reproducible_record_and_a_loadable_teacher(tmp_path, one_thread):
    rec = pretrain(PretrainConfig(out=str(tmp_path), rooms=1, steps=3, save_every=2, crop=0.8), ["--test"],
                   progress=False)
    assert rec["steps_done"] >= 1 and rec["labels_used"] is False and rec["seeds"] == [1000]
    doc = json.loads((tmp_path / "teacher.json").read_text())
    assert doc["command"].startswith("geopurify-pretrain-teacher") and "final" in doc
    t = load_teacher(tmp_path / "teacher.pt")
    assert isinstance(t, MultiScaleTeacher)
    xyz = torch.rand(500, 3) * torch.tensor([1.0, 1.0, 0.05])
    e = t.embed(xyz, torch.full((500, 3), 128, dtype=torch.uint8))
    assert e.shape == (500, 3 * t.embed_dim) and torch.allclose(e.norm(dim=1), torch.ones(500), atol=1e-5)
    assert pretrain_main(["--out", str(tmp_path / "x"), "--first-seed", "5"]) == 2   # evaluation seeds refused


def test_pretrain_fine_tunes_a_teacher_with_segment_contrast(tmp_path, one_thread):
    pretrain(PretrainConfig(out=str(tmp_path / "a"), rooms=1, steps=1, crop=0.8), [], progress=False)
    rec = pretrain(PretrainConfig(out=str(tmp_path / "b"), rooms=1, steps=3, crop=0.8, lr=0.0,
                                  init=str(tmp_path / "a" / "teacher.pt"), segment_weight=1.0), [], progress=False)
    assert rec["config"]["init"].endswith("teacher.pt") and rec["labels_used"] is False
    assert "seg" in rec["final"] and rec["final"]["seg"] > 0
    a, b = load_teacher(tmp_path / "a" / "teacher.pt"), load_teacher(tmp_path / "b" / "teacher.pt")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):   # lr 0: started from --init, unchanged
        assert torch.equal(x, y), k


def test_geopurify_train_feature_conditioned_end_to_end(tmp_path, one_thread):
    from geopurify_ros.purify.train import main

    teacher = tmp_path / "teacher.pt"
    MultiScaleTeacher().save(teacher)
    rc = main(["--out", str(tmp_path / "out"), "--data", str(tiny_training_recording()), "--feature-backend", "conse",
               "--teacher-checkpoint", str(teacher), "--student-steps", "2", "--anchors", "128"])
    assert rc == 0
    rec = json.loads((tmp_path / "out" / "student_conse.json").read_text())
    assert rec["labels_used"] is False and rec["feature_dim"] == 384 and rec["feature_backend"] == "conse"
    net = load_student(tmp_path / "out" / "student_conse.pt", feature_dim=384)
    assert net.uses_features and net.config.backend == "conse"
    from geopurify_ros.features import make_backend
    assert net.config.feature_weights == make_backend("conse", device="cpu").weights_digest()   # bound to them
    with pytest.raises(ValueError, match="student_checkpoint"):
        load_student(tmp_path / "out" / "student_conse.pt", feature_dim=512)


def test_probe_pieces_handmade_features_and_linear_fit():
    from geopurify_ros.purify.probe import fit_linear, handmade_features, miou

    g = torch.Generator().manual_seed(0)
    floor = torch.rand(400, 3, generator=g) * torch.tensor([2.0, 2.0, 0.0])
    wall = torch.rand(400, 3, generator=g) * torch.tensor([2.0, 0.0, 2.0])
    xyz = torch.cat([floor, wall])
    col = torch.full((800, 3), 150, dtype=torch.uint8)
    f = handmade_features(xyz, col)
    assert f.shape == (800, 15) and torch.isfinite(f).all()
    y = torch.cat([torch.zeros(400, dtype=torch.long), torch.ones(400, dtype=torch.long)])
    lin, mu, sd = fit_linear(f, y, 2, epochs=100)
    pred = lin((f - mu) / sd).argmax(1)
    conf = torch.zeros(2, 2, dtype=torch.long).index_put_((y, pred), torch.ones(800, dtype=torch.long), accumulate=True)
    m, iou = miou(conf.numpy())
    assert m > 0.9           # floor vs wall: separable from |n_z| and height
