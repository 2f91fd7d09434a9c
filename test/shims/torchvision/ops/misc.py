"""Shim of `torchvision.ops.misc`: `FrozenBatchNorm2d`, imported by `open_clip/utils.py` (used only to freeze
ResNet towers, never by ViTs)."""
from .. import unavailable

FrozenBatchNorm2d = unavailable("ops.misc.FrozenBatchNorm2d")
