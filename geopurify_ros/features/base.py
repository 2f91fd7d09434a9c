"""Feature-backend interface, input validation and the on-disk embedding cache shared by backends."""
from __future__ import annotations

import abc
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..cache import cache_dir as shared_cache_dir


class FeatureBackend(abc.ABC):
    """Dense vision-language features for one RGB frame, and text embeddings in the same space.

    Attributes: `name` (registry name), `dim` (D), `device` (torch.device), `stride` (input pixels per
    output cell, nominal), `feature_basis` (None, or (T, D) orthonormal columns: features are coordinates
    in this basis of a subspace of the T-d text space, and a unit text embedding t scores against them as
    t @ feature_basis, not re-normalised; see `LSegBackend`). Implementations must be safe to call from one
    worker thread while another thread uses `encode_text` (they run under `torch.inference_mode()` and guard
    shared state).
    """

    name: str = "base"
    dim: int = 0
    device: torch.device = torch.device("cpu")
    stride: int = 1
    feature_basis: torch.Tensor | None = None

    @abc.abstractmethod
    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) RGB → float32 (h, w, D) on `device`, each cell L2-normalised.

        Cell (i, j) covers the image uniformly: its centre is pixel ((i + .5) H / h, (j + .5) W / w),
        i.e. resample with `align_corners=False` conventions.
        """

    @abc.abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings → float32 (N, T) on `device`, L2-normalised, in the text space (T = D unless `feature_basis`)."""

    def weights_digest(self) -> str:
        """Hash of the weights that make this backend's features (every torch module it holds). A student
        distilled on one backend's fused features records it, and is refused on features from other weights."""
        return module_digest({k: m for k, m in vars(self).items() if isinstance(m, torch.nn.Module)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device})"


def module_digest(modules: dict) -> str:
    """sha256 hex of named torch modules' weights: names, shapes, Σ|w| (7 significant digits) and Σw / Σ|w| (6
    decimals) per tensor: cheap and specific, and coarse enough that another machine's summation order or
    BatchNorm folding (last-bit differences) gives the same digest, while any retraining changes it."""
    h = hashlib.sha256()
    for attr, module in sorted(modules.items(), key=lambda kv: kv[0]):
        for name, t in module.state_dict().items():
            t = t.detach().cpu().double()
            a = t.abs().sum().item()
            r = round(t.sum().item() / a, 6) + 0.0 if a else 0.0             # + 0.0: no "-0.000000"
            h.update(f"{attr}.{name}{tuple(t.shape)}{a:.6e}{r:.6f}".encode())
    return h.hexdigest()


def check_image(rgb, name: str = "rgb") -> np.ndarray:
    """Validate a colour frame; return it as a C-contiguous uint8 (H, W, 3) array or raise ValueError."""
    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().cpu().numpy()
    if not isinstance(rgb, np.ndarray):
        raise ValueError(f"{name}: expected a numpy uint8 (H, W, 3) array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {rgb.dtype}")
    if rgb.ndim != 3:
        raise ValueError(f"{name}: expected shape (H, W, 3), got {tuple(rgb.shape)}")
    if rgb.shape[2] != 3:
        raise ValueError(f"{name}: expected 3 colour channels (RGB), got {rgb.shape[2]} in shape {tuple(rgb.shape)}")
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise ValueError(f"{name}: image too small {tuple(rgb.shape[:2])} (need at least 8x8)")
    if not rgb.flags.writeable:      # e.g. frames decoded from a bag buffer; torch.from_numpy warns on these
        return rgb.copy()
    return np.ascontiguousarray(rgb)


def check_texts(texts, name: str = "texts") -> list[str]:
    """A list of strings (a bare string is wrapped); ValueError on other types or an empty list."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name}: expected a non-empty list of strings")
    return texts


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Directory of cached embeddings: `override`, else $GEOPURIFY_CACHE/features, else ~/.cache/geopurify/features."""
    return Path(override) if override else shared_cache_dir("features")


def cache_key(*parts) -> str:
    """Stable hash of JSON-serialisable parts (model id, class list, templates, ...)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_tensor(path: Path, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Load a CPU tensor from `path`, or compute and store it atomically. Returns (tensor, from_cache).

    Several processes may share the cache: writes go to a temp file and are renamed into place, and an
    unreadable (e.g. truncated) file is recomputed rather than trusted.
    """
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except Exception:  # corrupt cache entry: fall through and rewrite it
            pass
    value = compute().detach().to("cpu", torch.float32).contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        torch.save(value, tmp)
        os.chmod(tmp, 0o644)            # mkstemp makes 0600; the cache is shared by every user of the checkout
        os.replace(tmp, path)
    except OSError:  # read-only cache: still usable, just not persisted
        pass
    return value, False
