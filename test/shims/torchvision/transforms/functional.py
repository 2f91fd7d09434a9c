"""Shim of `torchvision.transforms.functional` (imported as `F` by open_clip): every attribute raises."""
from .. import TorchvisionShimError


def __getattr__(name):
    raise TorchvisionShimError(f"torchvision.transforms.functional.{name} is not available: "
                               f"test/shims/torchvision is an import shim for open_clip in tests only")
