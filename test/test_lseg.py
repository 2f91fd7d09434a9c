"""The lseg backend (text-aligned dense head, the offline default): shipped checkpoint, offline loading, labels."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geopurify_ros.config import PipelineConfig
from geopurify_ros.data.classes import class_names
from geopurify_ros.data.make_demo import render_sequence
from geopurify_ros.features import make_backend
from geopurify_ros.features.lseg import DEFAULT_CHECKPOINT, LSegHead, feature_basis, load_head
from geopurify_ros.pipeline import MappingPipeline
from geopurify_ros.query import TextScorer

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter with the hub offline and an empty cache: nothing may be downloaded or pre-cached.
OFFLINE_SCRIPT = r"""
import json, sys
import numpy as np
from geopurify_ros.data.make_demo import render_sequence
from geopurify_ros.features import make_backend
from geopurify_ros.query import TextScorer
from geopurify_ros.data.classes import class_names

names = list(class_names())
scene, cam, frames, _, _ = render_sequence("demo", 0, noise=False, n_frames=8)
bed = names.index("bed")
frame = max(frames, key=lambda f: int((f["labels"] == bed).sum()))
backend = make_backend("lseg", device="cpu")
feats = backend.encode_image(frame["rgb"])                    # (h, w, D)
h, w = feats.shape[:2]
H, W = frame["labels"].shape
rows = ((np.arange(h) + 0.5) * H / h).astype(int)
cols = ((np.arange(w) + 0.5) * W / w).astype(int)
lab = frame["labels"][rows][:, cols].ravel()
sim = TextScorer(backend, names).similarities(feats.reshape(-1, feats.shape[-1])).numpy()
out = {}
for c in ("wall", "floor", "bed"):
    m = lab == names.index(c)
    out[c] = {"cells": int(m.sum()), "mean_sim_argmax": names[int(sim[m].mean(0).argmax())],
              "cell_accuracy": float((sim[m].argmax(1) == names.index(c)).mean())}
print(json.dumps(out))
"""


def test_checkpoint_ships_with_its_record():
    assert DEFAULT_CHECKPOINT.is_file() and DEFAULT_CHECKPOINT.stat().st_size < 20e6
    meta = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())
    assert meta["command"].startswith("geopurify-train-features")
    seeds = [int(s) for part in meta["data"]["train_seeds"].split(",") for s in part.split("-")]
    assert min(seeds) >= 1000                                   # evaluation protocol: training rooms only
    held = {m for r in meta["split"]["roles"].values() for m in r["heldout"]}
    train = {m for r in meta["split"]["roles"].values() for m in r["train"]}
    assert held and train and not held & train


def test_rendered_frame_labels_its_own_classes_offline_with_empty_cache(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GEOPURIFY_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    scores = json.loads(res.stdout.strip().splitlines()[-1])
    for cls, s in scores.items():
        assert s["cells"] > 20, scores
        assert s["mean_sim_argmax"] == cls, scores
        assert s["cell_accuracy"] > 0.5, scores


@pytest.fixture(scope="module")
def backends():
    """(default: features in the head's output subspace, subspace=False: 384-d text-space features)."""
    return make_backend("lseg", device="cpu"), make_backend("lseg", device="cpu", subspace=False)


@pytest.fixture(scope="module")
def demo():
    _, cam, frames, poses, _ = render_sequence("demo", 0, noise=False, n_frames=3)
    return cam, frames, poses


def test_shapes_normalisation_and_text_space(backends):
    sub, full = backends
    img = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    for b in backends:
        f = b.encode_image(img)
        assert f.shape == (40, 56, b.dim) and f.dtype == torch.float32
        assert torch.allclose(f.norm(dim=-1), torch.ones(40, 56), atol=1e-4)
        t = b.encode_text(["a bed", "a wall"])                  # text space, whatever the feature coordinates
        assert t.shape == (2, 384) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-4)
        assert b.name == "lseg"
    assert full.dim == 384 and full.feature_basis is None
    q = sub.feature_basis                                       # rank of [W | b] of the head's 128 → 384 conv
    assert sub.dim == 129 and q.shape == (384, 129) and torch.allclose(q.T @ q, torch.eye(129), atol=1e-5)
    assert torch.equal(q, feature_basis())                      # reproducible: signs fixed


def test_subspace_features_score_exactly_like_384d_ones(backends, demo):
    """Labels, similarities and free-text scores of the 129-d coordinates equal those of the 384-d features, also
    with several templates (the projection comes after the template mean is normalised and is not re-normalised)."""
    sub, full = backends
    names = list(class_names())
    for rgb in (demo[1][0]["rgb"], np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8)):
        g, f = sub.encode_image(rgb), full.encode_image(rgb)
        assert (g @ sub.feature_basis.T - f).abs().max() < 1e-5
        for templates in (None, ["a photo of a {}.", "a {} in a room."]):
            s_sub, s_full = TextScorer(sub, names, templates=templates), TextScorer(full, names, templates=templates)
            assert (s_sub.similarities(g) - s_full.similarities(f)).abs().max() < 1e-4
            assert torch.equal(s_sub.label(g)[0], s_full.label(f)[0])
            for text in ("a bed", "something to sit on"):
                assert (s_sub.query(g, text) - s_full.query(f, text)).abs().max() < 1e-4


def _labels_agree_off_ties(sub, full, f_sub, f_full, tol=2e-3):
    """Maps store float16 rows, rounded in different coordinates: labels must agree wherever the best two class
    similarities are further apart than that rounding, and near-ties must be rare."""
    sim = full.scorer.similarities(f_full)
    top = sim.topk(2, dim=1).values
    tie = top[:, 0] - top[:, 1] < tol
    assert torch.equal(sub.scorer.label(f_sub)[0][~tie], sim.argmax(1)[~tie]) and tie.float().mean() < 0.01


def test_subspace_map_fuses_pools_and_labels_like_the_384d_map(backends, demo, tmp_path, lseg_student_384):
    """Fused running means (and the pooled map, with one 384-d student, folded onto the subspace by the pipeline)
    give the same labels; a 384-d map is refused by the subspace pipeline with the clear dimension error."""
    cam, frames, poses = demo
    pipes = []
    for b in backends:
        p = MappingPipeline(PipelineConfig(device="cpu", student_checkpoint=str(lseg_student_384)), backend=b)
        for i, (fr, T) in enumerate(zip(frames, poses)):
            p.process_frame(fr["rgb"], fr["depth"], cam, T, float(i))
        pipes.append(p)
    sub, full = pipes
    q = sub.backend.feature_basis
    vs, vf = sub.voxel_map, full.voxel_map
    assert vs.features.shape[1] == 129 and torch.equal(vs.xyz, vf.xyz)
    assert (vs.features.float() @ q.T - vf.features.float()).abs().max() < 1e-3         # float16 rows, both
    _labels_agree_off_ties(sub, full, vs.features, vf.features)
    for p in pipes:
        p.purify(incremental=False)
    assert sub.purifier.student.config.feature_dim == 129
    assert (vs.channel("purified").float() @ q.T - vf.channel("purified").float()).abs().max() < 3e-3
    _labels_agree_off_ties(sub, full, vs.channel("purified"), vf.channel("purified"))
    full.save(tmp_path / "full.pt")
    with pytest.raises(ValueError, match="384-d features but backend 'lseg' produces 129-d"):
        sub.load(tmp_path / "full.pt")


def test_shipped_student_goes_with_the_shipped_head_only(backends, tmp_path):
    """The shipped lseg student was distilled on the shipped head's features (its recorded digest is the backend's,
    in 129-d coordinates or 384-d). A retrained head keeps D = 129 but other coordinates: the pipeline then falls
    back to the geometry-only student with a warning, and the shipped student named explicitly is refused."""
    from geopurify_ros.purify.student import DEFAULT_CHECKPOINT as GEOMETRY_ONLY, load_student, shipped_checkpoint

    lseg, lseg384 = backends
    assert load_student(backend="lseg").config.feature_weights == lseg.weights_digest() == lseg384.weights_digest()
    head, meta = load_head()
    with torch.no_grad():
        head.out.bias.add_(0.01)
    other = tmp_path / "retrained.pt"
    torch.save({"config": head.config, "state_dict": head.state_dict(), "meta": meta}, other)
    with pytest.warns(UserWarning, match="student_checkpoint: the shipped student .* other weights"):
        pipe = MappingPipeline(PipelineConfig(device="cpu", feature_backend="lseg", feature_model=str(other)))
    assert pipe.backend.dim == lseg.dim and not pipe.purifier.student.uses_features
    with pytest.raises(ValueError, match="student_checkpoint: .*distilled on features of other 'lseg' weights"):
        MappingPipeline(PipelineConfig(device="cpu", feature_backend="lseg", feature_model=str(other),
                                       student_checkpoint=str(shipped_checkpoint("lseg"))))
    assert shipped_checkpoint("lseg") != GEOMETRY_ONLY


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature_model"):
        load_head(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"nothing": 1}, bad)
    with pytest.raises(ValueError, match="feature_model"):
        load_head(bad)
    ok = tmp_path / "head.pt"
    head = LSegHead(hidden=8, out_dim=16)
    torch.save({"config": head.config, "state_dict": head.state_dict(), "meta": {}}, ok)
    with pytest.raises(ValueError, match="16-d"):
        make_backend("lseg", device="cpu", model=str(ok))


def test_train_features_cli_writes_a_loadable_head_and_its_record(tmp_path):
    """A few steps of geopurify-train-features on one tiny room: checkpoint, JSON record, per-step log."""
    from geopurify_ros.features.train_lseg import main

    out = tmp_path / "head"
    argv = ["--out", str(out), "--seeds", "1000", "--val-seeds", "1001", "--frames", "2", "--steps", "4",
            "--batch", "2", "--val-every", "2", "--image-width", "160", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    head, meta = load_head(out / "lseg_head.pt")
    assert meta["command"] == "geopurify-train-features " + " ".join(argv)
    record = json.loads((out / "lseg_head.json").read_text())
    assert record["data"]["train_frames"] == 4 and record["data"]["val_frames"] == 2     # 2 frames, mirrored
    assert record["machine"]["device"] == "cpu" and 0.0 <= record["metrics"]["val_cell_miou"] <= 1.0
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    backend = make_backend("lseg", device="cpu", model=str(out / "lseg_head.pt"))
    f = backend.encode_image(np.zeros((120, 160, 3), np.uint8))
    assert f.shape[-1] == backend.dim == 129 and torch.allclose(f.norm(dim=-1), torch.ones(f.shape[:2]), atol=1e-4)


def test_train_features_distils_from_trained_heads(tmp_path, capsys):
    """--init / --distill: a head started from a teacher and never moved (lr 0) matches the teachers' mean exactly;
    the record names each teacher by hash; a teacher trained at another input width is refused."""
    from geopurify_ros.features.train_lseg import main

    common = ["--seeds", "1000", "--val-seeds", "1001", "--frames", "2", "--batch", "2", "--val-every", "2",
              "--image-width", "160", "--device", "cpu", "--no-progress"]
    assert main(["--out", str(tmp_path / "a"), "--steps", "2"] + common) == 0
    teacher = tmp_path / "a" / "lseg_head.pt"
    out = tmp_path / "b"
    assert main(["--out", str(out), "--steps", "2", "--lr", "0", "--init", str(teacher),
                 "--distill", str(teacher), str(teacher)] + common) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["teacher_cos"] for r in log] == pytest.approx([1.0, 1.0], abs=1e-5)
    for a, b in zip(load_head(teacher)[0].state_dict().values(), load_head(out / "lseg_head.pt")[0].state_dict().values()):
        assert torch.equal(a, b)
    record = json.loads((out / "lseg_head.json").read_text())
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert [t["sha256"] for t in record["distill"]["teachers"]] == [digest, digest]
    assert record["init"]["sha256"] == digest
    capsys.readouterr()
    assert main(["--out", str(out), "--steps", "1", "--distill", str(teacher)] + common[:-5] +
                ["--image-width", "192", "--device", "cpu", "--no-progress"]) == 2
    assert "image width" in capsys.readouterr().err


def test_train_features_fine_tunes_the_stride32_stage(tmp_path, capsys):
    """--train-stride32: the checkpoint carries the trained stage, the backend loads it into its backbone (only that
    stage differs, and so does the weights digest), and such a head cannot be --init without the flag or be a
    --distill teacher."""
    from geopurify_ros.features.lseg import load_checkpoint
    from geopurify_ros.features.train_lseg import main

    common = ["--seeds", "1000", "--val-seeds", "1001", "--frames", "2", "--batch", "2", "--val-every", "2",
              "--image-width", "160", "--device", "cpu", "--no-progress"]
    assert main(["--out", str(tmp_path / "frozen"), "--steps", "2"] + common) == 0
    frozen = tmp_path / "frozen" / "lseg_head.pt"
    out = tmp_path / "tuned"
    assert main(["--out", str(out), "--steps", "2", "--init", str(frozen), "--train-stride32",
                 "--trunk-lr", "1e-2"] + common) == 0
    head, meta, trunk = load_checkpoint(out / "lseg_head.pt")
    assert trunk["first_block"] == 11 and any(k.startswith("conv_head.") for k in trunk["state_dict"])
    assert load_checkpoint(frozen)[2] is None
    record = json.loads((out / "lseg_head.json").read_text())
    assert record["trunk"]["lr"] == 1e-2
    a = make_backend("lseg", device="cpu", model=str(frozen))
    b = make_backend("lseg", device="cpu", model=str(out / "lseg_head.pt"))
    assert a.weights_digest() != b.weights_digest()
    assert float((a.net._conv_head.conv.weight - b.net._conv_head.conv.weight).abs().max()) > 0
    assert torch.equal(a.net._blocks[10]._project_conv.conv.weight, b.net._blocks[10]._project_conv.conv.weight)
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "c"), "--steps", "1", "--init", str(out / "lseg_head.pt")] + common) == 2
    assert "--train-stride32" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "d"), "--steps", "1", "--distill", str(out / "lseg_head.pt")] + common) == 2
    assert "frozen backbone" in capsys.readouterr().err


def test_train_features_refuses_evaluation_seeds_and_missing_cuda(tmp_path, capsys):
    from geopurify_ros.features.train_lseg import main

    assert main(["--out", str(tmp_path), "--seeds", "5"]) == 2
    assert "seeds" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--out", str(tmp_path), "--seeds", "1000", "--device", "cuda"]) == 2
        assert "device" in capsys.readouterr().err


def test_holdout_names_draws_per_class_and_keeps_structure():
    """--holdout-names: per evaluation class with >= 2 names, round(F n) (>= 1) of them, seeded; a name's class is
    its cells' majority; structural texts and single-name classes stay in; the validation view scores only the
    held-out names' cells."""
    from geopurify_ros.data.classes import IGNORE_LABEL
    from geopurify_ros.features.train_lseg import FeatureSet, holdout_names, restrict_classes

    names = ["wall", "chair", "table", "bed"]
    fs = FeatureSet.__new__(FeatureSet)
    fs.vocab = ["wall", "Oak chair", "Office chair", "Folding chair", "Stool", "Table", "Coffee table", "Bed"]
    cls_of = [0, 1, 1, 1, 1, 2, 2, 3]
    t = torch.arange(len(fs.vocab)).repeat_interleave(3).reshape(1, 1, -1)
    fs.targets, fs.classes = t, torch.tensor(cls_of)[t]
    fs.classes[0, 0, 4] = 2                             # one stray cell does not change "Office chair"'s class
    held = holdout_names(fs, names, 0.25, seed=7)
    assert held == holdout_names(fs, names, 0.25, seed=7)
    by_class = {c: [i for i in held if cls_of[i] == c] for c in range(4)}
    assert len(by_class[1]) == 1 and len(by_class[2]) == 1 and not by_class[0] and not by_class[3]
    assert len(holdout_names(fs, names, 0.5, seed=7)) == 3
    view = restrict_classes(fs, held)
    shown = torch.isin(fs.targets, torch.tensor(held))
    assert torch.equal(view.classes[shown], fs.classes[shown])
    assert (view.classes[~shown] == IGNORE_LABEL).all() and fs.classes.ne(IGNORE_LABEL).all()


def test_train_features_holdout_names_records_the_split_and_its_score(tmp_path):
    from geopurify_ros.features.train_lseg import main

    out = tmp_path / "h"
    assert main(["--out", str(out), "--seeds", "1000", "--val-seeds", "1001", "--frames", "2", "--steps", "2",
                 "--batch", "2", "--val-every", "2", "--image-width", "160", "--device", "cpu", "--no-progress",
                 "--holdout-names", "0.5"]) == 0
    record = json.loads((out / "lseg_head.json").read_text())
    held = record["heldout_names"]
    assert held["fraction"] == 0.5 and held["texts"] and 0.0 <= held["val_cell_miou"] <= 1.0
    assert not {"wall", "floor"} & set(held["texts"])
    assert "val_heldout_miou" in json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])


def test_text_smoothing_targets_follow_text_similarity():
    """--text-smoothing: rows are distributions with 1 - eps on the own text and more of eps on closer texts;
    eps 0 is the plain cross-entropy, and ignored cells (-1) do not count."""
    import torch.nn.functional as F

    from geopurify_ros.features.train_lseg import label_loss, text_smoothing

    t = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    q = text_smoothing(t, 0.2, 0.07)
    assert torch.allclose(q.sum(1), torch.ones(3)) and torch.allclose(q.diag(), torch.full((3,), 0.8))
    assert q[0, 1] > q[0, 2] > 0
    logits, targets = torch.randn(2, 3, 4, 5), torch.randint(-1, 3, (2, 4, 5))
    assert torch.allclose(label_loss(logits, targets, text_smoothing(t, 0.0, 0.07)),
                          F.cross_entropy(logits, targets, ignore_index=-1))
    target = torch.zeros(1, 1, 1, dtype=torch.long)              # a cell of text 0: a near miss costs less
    near, far = torch.tensor([3.0, 2.0, 0.0]), torch.tensor([3.0, 0.0, 2.0])
    assert label_loss(near.view(1, 3, 1, 1), target, q) < label_loss(far.view(1, 3, 1, 1), target, q)
    assert label_loss(near.view(1, 3, 1, 1), target, None) == label_loss(far.view(1, 3, 1, 1), target, None)
