"""TEST-ONLY stand-in for `torchvision`, so `open_clip` can be imported beside the CPU torch of this venv.

Why: open_clip imports torchvision at load time (PIL preprocessing transforms in `open_clip/transform.py`,
`FrozenBatchNorm2d` in `open_clip/utils.py`), but PyPI's torchvision does not load beside the CPU torch pinned
here, and `OpenCLIPBackend` uses none of it (it resizes and normalises tensors itself). This package provides
exactly the names open_clip 3.x imports, and nothing works: every transform or op raises
`TorchvisionShimError` when used, so a code path that starts to need real torchvision fails loudly in the
tests instead of being silently faked.

Only `test/test_open_clip.py` puts `test/shims` on `sys.path`, and only when the real torchvision cannot be
imported; it removes it again afterwards. Production code never sees this package: without torchvision,
`make_backend("open_clip")` raises the ImportError naming `open_clip_torch` (tested). See docs/FEATURES.md.
"""

__version__ = "0.0.0+geopurify-test-shim"
IS_GEOPURIFY_TEST_SHIM = True


class TorchvisionShimError(RuntimeError):
    """Raised when anything of the shim is actually used."""


def unavailable(name: str):
    """A class standing for torchvision's `name`: importable and subclassable, but not constructible."""
    def __init__(self, *args, **kwargs):
        raise TorchvisionShimError(f"torchvision.{name} is not available: test/shims/torchvision is an import "
                                   f"shim for open_clip in tests only")
    return type(name.rsplit(".", 1)[-1], (), {"__init__": __init__, "__module__": __name__})
