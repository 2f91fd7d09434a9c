"""`feature_compile`: the encoder is compiled in the background, frames never wait and never change."""
import pytest
import torch
from torch import nn

from geopurify_ros.features.compiled import BackgroundCompiled


def tiny_encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                         nn.Conv2d(8, 4, 1)).eval()


def test_frames_run_eager_until_the_compiled_encoder_is_ready_then_match_it(one_thread):
    enc = BackgroundCompiled(tiny_encoder())
    assert enc.status == "waiting"
    x = torch.rand(1, 3, 24, 32)
    with torch.inference_mode():
        first = enc(x)                                   # starts the compile, answers eagerly
        assert enc.shape == (1, 3, 24, 32) and enc.status in ("building", "ready")
        assert enc.wait(600), enc.error
        assert enc.status == "ready"
        again = enc(x)
        assert torch.allclose(first, again, atol=1e-5)
        other = torch.rand(1, 3, 16, 16)                  # another shape: eager, no second compile
        assert torch.allclose(enc(other), enc.module(other), atol=0) and enc.shape == (1, 3, 24, 32)


def test_a_failed_compile_warns_once_and_leaves_frames_eager(monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", broken)
    enc = BackgroundCompiled(tiny_encoder())
    x = torch.rand(1, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="feature_compile: torch.compile failed"):
        with torch.inference_mode():
            out = enc(x)
        assert not enc.wait(60)
    assert enc.error == "RuntimeError: no C++ compiler" and enc.status == "failed: RuntimeError: no C++ compiler"
    with torch.inference_mode():
        assert torch.equal(enc(x), out) and not enc.ready


def test_disabled_never_compiles(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled while disabled"))
    enc = BackgroundCompiled(tiny_encoder(), enabled=False)
    with torch.inference_mode():
        enc(torch.rand(1, 3, 8, 8))
    assert enc.shape is None and not enc.wait(0) and enc.status == "off"


def test_pipeline_passes_feature_compile_to_lseg_only():
    from geopurify_ros.config import PipelineConfig
    from geopurify_ros.pipeline import MappingPipeline

    pipe = MappingPipeline(PipelineConfig(device="cpu", feature_compile=True))
    assert pipe.backend.name == "lseg" and pipe.backend.encoder.enabled and pipe.backend.encoder.shape is None
    assert pipe.stats()["feature_compile"] == "waiting"                 # /diagnostics: map.feature_compile
    eager = MappingPipeline(PipelineConfig(device="cpu"))
    assert not eager.backend.encoder.enabled and eager.stats()["feature_compile"] == "off"
    with pytest.warns(RuntimeWarning, match="only the lseg backend"):
        MappingPipeline(PipelineConfig(device="cpu", feature_backend="conse", feature_compile=True))
