"""open_clip dense backend with random weights (runs only where open_clip imports)."""
import json

import numpy as np
import pytest
import torch

try:
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch not installed")
except pytest.skip.Exception:
    raise
except Exception as exc:  # e.g. OSError from a torchvision built against CUDA torch
    pytest.skip(f"open_clip cannot be imported here: {type(exc).__name__}: {exc}", allow_module_level=True)

from geopurify_ros.features import make_backend  # noqa: E402

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc_cfg")
    (d / "geopurify-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(d)
    return "geopurify-tiny-vit"


@pytest.mark.parametrize("mode", ["sclip", "maskclip", "vv"])
def test_dense_shapes_and_normalisation(tiny_name, mode):
    torch.manual_seed(0)
    b = make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=128, mode=mode)
    assert b.name == "open_clip" and b.dim == 32 and b.stride == 16
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    f = b.encode_image(img)
    assert f.shape == (6, 8, 32) and f.dtype == torch.float32      # 96/16 × 128/16 patches, no CLS
    assert torch.allclose(f.norm(dim=-1), torch.ones(6, 8), atol=1e-4)
    assert torch.allclose(b.encode_image(img), f, atol=1e-5)       # deterministic (eval mode)
    t = b.encode_text(["a chair", "a table"])
    assert t.shape == (2, 32) and torch.allclose(t.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_bad_mode_and_image(tiny_name):
    with pytest.raises(ValueError, match="mode"):
        make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", mode="cls")
    b = make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=64)
    with pytest.raises(ValueError, match="rgb"):
        b.encode_image(np.zeros((64, 64), np.uint8))


def test_token_path_matches_open_clip_when_last_block_is_standard(tiny_name):
    # With the unmodified last block, our token pipeline's CLS output must equal open_clip's own encode_image:
    # checks patch order, positional embedding, layout handling and the projection.
    torch.manual_seed(0)
    b = make_backend("open_clip", device="cpu", model=tiny_name, pretrained="", image_width=64)
    b._last_block = lambda blk, x: blk(x)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ours = b.tokens(x)[:, 0]
        ref = b.clip.encode_image(x)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
