"""Shim of `torchvision.transforms`: the names `open_clip/transform.py` imports (see the package docstring)."""
from enum import Enum

from .. import unavailable


class InterpolationMode(Enum):
    """Values only: open_clip uses `InterpolationMode.BICUBIC` as a default argument at import time."""
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


Normalize = unavailable("transforms.Normalize")
Compose = unavailable("transforms.Compose")
RandomResizedCrop = unavailable("transforms.RandomResizedCrop")
ToTensor = unavailable("transforms.ToTensor")          # subclassed by open_clip's MaybeToTensor
Resize = unavailable("transforms.Resize")
CenterCrop = unavailable("transforms.CenterCrop")
ColorJitter = unavailable("transforms.ColorJitter")
Grayscale = unavailable("transforms.Grayscale")
