"""The open_clip backend, for real: open_clip_torch 3.x with a randomly initialised ViT-B-16 (`pretrained=''`;
CLIP weights cannot be downloaded here), plus a tiny ViT config where a checkpoint file has to be written.

scripts/setup.sh installs open_clip_torch without its dependencies. open_clip imports torchvision at load time,
which cannot be installed beside this venv's CPU torch; where the real torchvision does not import, the
TEST-ONLY shim in test/shims/torchvision stands in while this module imports open_clip (see its docstring and
docs/FEATURES.md). The production path never sees it: `test_missing_torchvision_is_a_clear_import_error`.
Forward passes are few and mostly small: the ViT-B-16 is built once and shared.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_demo_dir
from geopurify_ros.config import PipelineConfig
from geopurify_ros.features import make_backend
from geopurify_ros.pipeline import MappingPipeline

SHIMS = Path(__file__).parent / "shims"
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
STATE = {"shim": False}


def _modules(*roots):
    return {n: m for n, m in sys.modules.items() if n.split(".")[0] in roots}


def _purge(*roots):
    for name in _modules(*roots):
        del sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def open_clip():
    """`open_clip`, imported with the real torchvision if that imports, else with the shim; undone afterwards."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.fail("open_clip_torch is not installed: scripts/setup.sh installs it (requirements-test-nodeps.txt)")
    saved = _modules("open_clip", "torchvision")
    _purge("open_clip")             # a failed import elsewhere may have left some of its submodules behind
    try:
        import torchvision  # noqa: F401
    except Exception:               # not installed, or a build that does not load beside this torch
        _purge("torchvision")
        STATE["shim"] = True
        sys.path.insert(0, str(SHIMS))
    try:
        import open_clip as oc
    finally:
        if STATE["shim"]:
            sys.path.remove(str(SHIMS))
    yield oc
    _purge("open_clip", "torchvision")
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def vit():
    """Random-weight ViT-B-16, default options (image_width 448, mode sclip); tests copy it to vary options."""
    torch.manual_seed(0)
    return make_backend("open_clip", device="cpu", model="ViT-B-16", pretrained="")


@pytest.fixture(scope="module")
def tiny_name(open_clip, tmp_path_factory):
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / "geopurify-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d)
    return "geopurify-tiny-vit"


@pytest.fixture(scope="module")
def frame():
    """First frame of the rendered tiny demo (160×120)."""
    from geopurify_ros.data.sequence import load_sequence
    return next(iter(load_sequence(tiny_demo_dir())))


def variant(b, **attrs):
    """The same loaded model with other per-call options (mode, image_width are read at every call)."""
    c = copy.copy(b)
    for k, v in attrs.items():
        setattr(c, k, v)
    return c


def assert_unit_rows(x, atol=1e-4):
    assert torch.isfinite(x).all()
    n = x.norm(dim=-1)
    assert torch.allclose(n, torch.ones_like(n), atol=atol), (n.min(), n.max())


# ------------------------------------------------------------------------------------------- image tower
def test_vit_b16_dense_map_of_a_640x480_frame(vit, frame):
    assert (vit.name, vit.dim, vit.patch, vit.stride, vit.mode) == ("open_clip", 512, 16, 16, "sclip")
    rgb = np.repeat(np.repeat(frame.rgb, 4, axis=0), 4, axis=1)                  # 480×640, rendered content
    f = vit.encode_image(rgb)
    assert f.shape == (21, 28, 512) and f.dtype == torch.float32 and f.device.type == "cpu"  # 448×336 / 16
    assert_unit_rows(f)
    assert not f.is_inference()                                    # the pipeline may modify it in place
    cells = f.reshape(-1, 512)
    assert (cells @ cells.T).min() < 0.99                          # a dense map, not one vector repeated


def test_last_block_modes_match_torch_multihead_attention(vit):
    # Reference for each mode from the block's own nn.MultiheadAttention with its q/k projections swapped:
    # sclip = MHA(q·qᵀ) + MHA(k·kᵀ) − out_proj.bias (out_proj is affine), vv = MHA(v·vᵀ),
    # maskclip = MHA with an identity attention mask. Checks head split, scaling and projections.
    blk = vit.visual.transformer.resblocks[-1]
    attn = blk.attn
    torch.manual_seed(1)
    x = torch.randn(2, 37, attn.embed_dim)
    w, b = attn.in_proj_weight.chunk(3), attn.in_proj_bias.chunk(3)

    def mha(qk, mask=None):
        m = copy.deepcopy(attn)
        with torch.no_grad():
            m.in_proj_weight.copy_(torch.cat([w[qk[0]], w[qk[1]], w[2]]))
            m.in_proj_bias.copy_(torch.cat([b[qk[0]], b[qk[1]], b[2]]))
        y = blk.ln_1(x) if m.batch_first else blk.ln_1(x).transpose(0, 1)
        o = m(y, y, y, need_weights=False, attn_mask=mask)[0]
        return blk.ls_1(o if m.batch_first else o.transpose(0, 1))

    eye = torch.full((37, 37), float("-inf")).fill_diagonal_(0.0)
    ref = {"maskclip": mha((0, 1), eye), "vv": mha((2, 2)),
           "sclip": mha((0, 0)) + mha((1, 1)) - blk.ls_1(attn.out_proj.bias)}
    with torch.no_grad():
        for mode, r in ref.items():
            ours = variant(vit, mode=mode)._last_block(blk, x)
            assert torch.allclose(ours, r, atol=1e-4, rtol=1e-4), (mode, (ours - r).abs().max())
    assert not torch.allclose(ref["sclip"], ref["vv"], atol=1e-2)   # the modes are different operators


def test_three_modes_give_distinct_unit_dense_maps(vit, frame):
    maps = {}
    for mode in ("sclip", "maskclip", "vv"):
        maps[mode] = variant(vit, mode=mode, image_width=160).encode_image(frame.rgb)
        assert maps[mode].shape == (8, 10, 512), mode                   # 160×128 input / 16
        assert_unit_rows(maps[mode])
    for a, b in (("sclip", "maskclip"), ("sclip", "vv"), ("maskclip", "vv")):
        assert (maps[a] - maps[b]).abs().max() > 1e-2, (a, b)
    again = variant(vit, mode="vv", image_width=160).encode_image(frame.rgb)
    assert torch.allclose(again, maps["vv"], atol=1e-5)                # eval mode: deterministic


def test_token_path_reproduces_open_clip_encode_image_with_the_standard_last_block(vit):
    # With the unmodified last block, our token pipeline's CLS output must equal open_clip's own encode_image:
    # patch order, positional embedding, layout handling, ln_post and the projection.
    std = variant(vit, _last_block=lambda blk, x: blk(x))
    torch.manual_seed(2)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        ours = std.tokens(x)[:, 0]
        ref = vit.clip.encode_image(x)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


@pytest.mark.parametrize("mode", ["sclip", "maskclip", "vv"])
def test_constructor_options_and_grid(tiny_name, mode):
    b = make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=128, mode=mode)
    assert (b.mode, b.dim, b.stride, b.image_width) == (mode, 32, 16, 128)
    f = b.encode_image(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    assert f.shape == (6, 8, 32)                                   # 96/16 × 128/16 patches, no CLS
    assert_unit_rows(f)


def test_bad_options_and_image(tiny_name):
    with pytest.raises(ValueError, match="mode"):
        make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", mode="cls")
    with pytest.raises(ValueError, match="image_width"):
        make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=16)
    with pytest.raises(ValueError, match="not a ViT"):
        make_backend("open_clip", device="cpu", model="RN50", pretrained="")
    b = make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=64)
    with pytest.raises(ValueError, match="rgb"):
        b.encode_image(np.zeros((64, 64), np.uint8))


# -------------------------------------------------------------------------------------------- text tower
def test_text_tower(vit):
    texts = ["a chair", "a wooden table", "something to sleep on", " ".join(["chair"] * 200)]  # last: > 77 tokens
    tok = vit.tokenizer(texts)
    assert tok.shape == (4, 77) and tok[0, 0] == 49406 and tok[0, 3] == 49407   # CLIP BPE: <sot> a chair <eot>
    t = vit.encode_text(texts)
    assert t.shape == (4, 512) and t.dtype == torch.float32 and not t.is_inference()
    assert_unit_rows(t)
    assert (t @ t.T).triu(1).max() < 0.9999                                    # distinct rows
    assert torch.allclose(vit.encode_text(texts[1]), t[1:2], atol=1e-5)        # bare string; batch-independent
    with pytest.raises(ValueError, match="texts"):
        vit.encode_text([])


# ------------------------------------------------------------------------------------------ the pipeline
def test_pipeline_fuses_and_labels_a_rendered_frame(vit, frame):
    # Few classes and a 224-px input keep the CPU cost down (the text tower runs once per prompt).
    cfg = PipelineConfig(device="cpu", feature_backend="open_clip", feature_model="ViT-B-16", feature_image_width=224,
                         class_names=["wall", "floor", "bed", "chair"])
    pipe = MappingPipeline(cfg, backend=variant(vit, image_width=224))
    stats = pipe.process_frame(frame.rgb, frame.depth, frame.cam, frame.T_world_cam, frame.stamp)
    n = len(pipe.voxel_map)
    assert stats.new == n > 100 and pipe.voxel_map.feature_dim == 512
    feats = pipe.voxel_map.features_f32()
    assert torch.isfinite(feats).all() and feats.shape == (n, 512)
    cloud = pipe.labelled_cloud()
    assert len(cloud) == n
    assert cloud["label"].max() < len(cfg.class_names) and ((cloud["score"] >= 0) & (cloud["score"] <= 1)).all()
    out = pipe.purify(incremental=False)
    assert out["voxels"] == n
    res = pipe.query("something to sleep on")
    assert len(res.cloud) == len(res.scores) and (np.diff(res.scores) <= 0).all()
    assert set(res.labels) <= set(cfg.class_names)


def test_pipeline_builds_open_clip_from_config_with_a_local_checkpoint(tiny_name, tmp_path, frame):
    torch.manual_seed(1)
    ref = make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=64)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(ref.clip.state_dict(), ckpt)
    torch.manual_seed(2)            # a different random init: only loading the file makes the weights equal
    pipe = MappingPipeline(PipelineConfig(device="cpu", feature_backend="open_clip", feature_model=tiny_name,
                                          feature_pretrained=str(ckpt), feature_image_width=64))
    b = pipe.backend
    assert (b.name, b.model_name, b.pretrained, b.image_width) == ("open_clip", tiny_name, str(ckpt), 64)
    assert torch.equal(b.visual.conv1.weight, ref.visual.conv1.weight)
    assert torch.allclose(b.encode_image(frame.rgb), ref.encode_image(frame.rgb), atol=1e-6)
    pipe.process_frame(frame.rgb, frame.depth, frame.cam, frame.T_world_cam, frame.stamp)
    assert len(pipe.voxel_map) > 100 and pipe.voxel_map.feature_dim == 32


def test_bad_checkpoints_are_clear_value_errors(tiny_name, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(2000))
    wrong = tmp_path / "wrong_keys.pt"
    torch.save({"foo": torch.zeros(3)}, wrong)
    for model, pretrained in ((tiny_name, str(tmp_path / "missing.pt")), (tiny_name, str(corrupt)),
                              (tiny_name, str(wrong)), ("no-such-model", ""),
                              (f"local-dir:{tmp_path / 'missing'}", "")):
        with pytest.raises(ValueError, match="model/pretrained: cannot create open_clip model") as e:
            make_backend("open_clip", device="cpu", model=model, pretrained=pretrained)
        assert repr(pretrained) in str(e.value) and repr(model) in str(e.value)


def test_unavailable_weights_are_a_clear_error_not_a_hang(tmp_path):
    # The node's route (PipelineConfig → make_backend) with a pretrained tag, the hub offline and an empty cache,
    # in a fresh interpreter so the hub settings are read as a user's process reads them.
    hf = tmp_path / "hf"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf),
               HF_HUB_CACHE=str(hf / "hub"), HUGGINGFACE_HUB_CACHE=str(hf / "hub"), XDG_CACHE_HOME=str(hf))
    if STATE["shim"]:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIMS), env.get("PYTHONPATH")]))
    code = ("import json\n"
            "from geopurify_ros.config import PipelineConfig\n"
            "from geopurify_ros.pipeline import MappingPipeline\n"
            "try:\n"
            "    MappingPipeline(PipelineConfig(device='cpu', feature_backend='open_clip', feature_model='ViT-B-16',"
            " feature_pretrained='openai'))\n"
            "    print(json.dumps(['built', '']))\n"
            "except Exception as exc:\n"
            "    print(json.dumps([type(exc).__name__, str(exc)]))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("building open_clip with pretrained='openai' offline hung for 180 s instead of failing")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, msg = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kind == "ValueError", (kind, msg)
    assert "'ViT-B-16'" in msg and "pretrained='openai'" in msg and "download" in msg.lower()
    assert not any(hf.rglob("*.bin")) and not any(hf.rglob("*.safetensors"))


# ------------------------------------------------------------------------------ production path, the shim
def test_missing_torchvision_is_a_clear_import_error():
    # What a user without torchvision gets: the backend imports the real open_clip, never the test shim.
    saved = _modules("open_clip", "torchvision")
    _purge("open_clip", "torchvision")
    sys.modules["torchvision"] = None                            # `import torchvision` → ImportError
    try:
        with pytest.raises(ImportError, match="open_clip_torch.*torchvision"):
            make_backend("open_clip", device="cpu", pretrained="")
    finally:
        _purge("open_clip", "torchvision")
        sys.modules.update(saved)
    assert str(SHIMS) not in sys.path


def test_shim_only_imports_it_does_not_fake_torchvision(open_clip):
    if not STATE["shim"]:
        pytest.skip("the real torchvision imports here; the shim is not used")
    import torchvision
    assert torchvision.IS_GEOPURIFY_TEST_SHIM
    with pytest.raises(torchvision.TorchvisionShimError, match="tests only"):
        open_clip.image_transform(224, is_train=False)               # PIL preprocessing needs the real one
