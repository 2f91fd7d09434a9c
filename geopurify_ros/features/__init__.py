"""Dense vision-language feature backends.

`make_backend("lseg")` (default: a text-aligned dense head trained here) and `make_backend("conse")` work fully
offline on CPU; `make_backend("open_clip", model=...,
pretrained=...)` needs the optional `open_clip_torch` package and is imported only when asked for.
"""
from __future__ import annotations

import torch

from ..device import resolve_device
from .base import FeatureBackend, check_image

BACKENDS = ("lseg", "conse", "open_clip")

__all__ = ["BACKENDS", "FeatureBackend", "backend_key", "check_image", "make_backend"]


def backend_key(name: str) -> str:
    """The canonical name (one of BACKENDS) of a backend spelled as users may ('' = lseg, any case, '-' for '_',
    'openclip' / 'clip'); ValueError for an unknown one."""
    key = (name or "lseg").strip().lower().replace("-", "_")
    key = "open_clip" if key in ("openclip", "clip") else key
    if key not in BACKENDS:
        raise ValueError(f"feature_backend: unknown backend '{name}' (expected one of {', '.join(BACKENDS)})")
    return key


def make_backend(name: str = "lseg", device: str | torch.device = "auto", **options) -> FeatureBackend:
    """Construct a feature backend by name; `options` go to its constructor (see the backend docstring).

    Unknown names → ValueError; a backend whose optional dependency is missing → ImportError naming it.
    """
    key = backend_key(name)
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    if key == "lseg":
        from .lseg import LSegBackend
        return LSegBackend(device=dev, **options)
    if key == "conse":
        from .conse import ConSEBackend
        return ConSEBackend(device=dev, **options)
    from .open_clip_backend import OpenCLIPBackend
    return OpenCLIPBackend(device=dev, **options)
