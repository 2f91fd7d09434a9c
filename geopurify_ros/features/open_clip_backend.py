"""Dense CLIP features from an open_clip ViT with a MaskCLIP/SCLIP-style last block (optional dependency).

CLIP's patch tokens are poorly localised because the last block's query-key attention mixes every patch
with a few global "sink" tokens. Training-free fixes replace that block's attention:
  maskclip  — value embeddings only (attention = identity)  [MaskCLIP, Zhou et al. 2022]
  sclip     — correlative self-attention softmax(qqᵀ) + softmax(kkᵀ) over the values  [SCLIP, Wang et al. 2024]
  vv        — value-value attention softmax(vvᵀ)
In all modes the last block's residual and MLP are dropped (ClearCLIP found them to add global noise);
ln_post and the visual projection then map every patch token into the text space. No CLS pooling.

`open_clip` is imported lazily: constructing this backend without it raises ImportError naming the package.
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..device import resolve_device
from .base import FeatureBackend, check_image, check_texts

_MODES = ("maskclip", "sclip", "vv")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def import_open_clip():
    """`open_clip` module, or ImportError naming the package (it also fails when torchvision is broken)."""
    try:
        import open_clip
    except Exception as exc:  # ImportError, or OSError from a CUDA-linked torchvision on CPU torch
        raise ImportError(f"the open_clip backend needs the 'open_clip_torch' package importable "
                          f"(pip install open_clip_torch): {type(exc).__name__}: {exc}") from exc
    return open_clip


class OpenCLIPBackend(FeatureBackend):
    """open_clip ViT dense features (D = the model's embed_dim) and text embeddings.

    Options:
      model        open_clip model name (default "ViT-B-16")
      pretrained   open_clip pretrained tag (e.g. "openai", "laion2b_s34b_b88k") or a local checkpoint path;
                   "" = random weights (tests only)
      image_width  encoder input width (height keeps aspect), rounded to a multiple of the patch size (default 448)
      mode         last-block attention: "sclip" (default), "maskclip" or "vv"
    """

    name = "open_clip"

    def __init__(self, device: str | torch.device = "auto", model: str = "ViT-B-16", pretrained: str = "openai",
                 image_width: int = 448, mode: str = "sclip"):
        open_clip = import_open_clip()
        self.device = device if isinstance(device, torch.device) else resolve_device(str(device))
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        if int(image_width) < 32:
            raise ValueError(f"image_width: must be >= 32, got {image_width}")
        try:
            clip = open_clip.create_model(model, pretrained=pretrained or None, device=self.device)
        except Exception as exc:  # noqa: BLE001 - RuntimeError: unknown model / tag, weights not downloadable
            # offline, state-dict mismatch; UnpicklingError/EOFError: a corrupt checkpoint file;
            # FileNotFoundError: a missing 'local-dir:' model. All are bad model/pretrained values.
            raise ValueError(f"model/pretrained: cannot create open_clip model {model!r} with "
                             f"pretrained={pretrained!r}: {type(exc).__name__}: {exc}") from exc
        self.clip = clip.eval()
        visual = clip.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise ValueError(f"model: {model!r} is not a ViT; dense features need a ViT image tower")
        self.visual = visual
        self.model_name, self.pretrained, self.mode = model, pretrained, mode
        self.image_width = int(image_width)
        self.patch = int(visual.conv1.kernel_size[0])
        self.stride = self.patch
        self.dim = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.ln_post.normalized_shape[0])
        mean = getattr(visual, "image_mean", None) or _OPENAI_MEAN
        std = getattr(visual, "image_std", None) or _OPENAI_STD
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.tokenizer = open_clip.get_tokenizer(model)
        self._lock = threading.Lock()

    # -- text --------------------------------------------------------------------------------------
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N strings → (N, D) L2-normalised CLIP text embeddings."""
        texts = check_texts(texts)
        with self._lock, torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.device)
            emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1)
        return emb.clone()              # outside inference mode → an ordinary tensor

    # -- image -------------------------------------------------------------------------------------
    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        """Positional embedding (1 + gh·gw, C): the trained square grid resized bicubically to gh×gw."""
        pos = self.visual.positional_embedding
        cls, grid = pos[:1], pos[1:]
        g = int(math.isqrt(grid.shape[0]))
        if (g, g) == (gh, gw):
            return pos
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pos.dtype)])

    def _last_block(self, blk, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) tokens → (B, N, C) through the modified last block (no residual, no MLP)."""
        attn = blk.attn
        y = blk.ln_1(x)
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        B, N, C = q.shape
        h = attn.num_heads
        q, k, v = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in (q, k, v))   # (B, h, N, c)
        scale = (C // h) ** -0.5
        if self.mode == "maskclip":
            o = v
        elif self.mode == "sclip":
            a = torch.softmax(q @ q.transpose(-2, -1) * scale, -1) + torch.softmax(k @ k.transpose(-2, -1) * scale, -1)
            o = a @ v
        else:  # vv
            o = torch.softmax(v @ v.transpose(-2, -1) * scale, -1) @ v
        o = attn.out_proj(o.transpose(1, 2).reshape(B, N, C))
        return blk.ls_1(o) if hasattr(blk, "ls_1") else o

    def encode_image(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3) → (h, w, D) L2-normalised patch features; h·patch × w·patch ≈ the resized input."""
        rgb = check_image(rgb)
        H, W = rgb.shape[:2]
        pw = max(1, round(self.image_width / self.patch))
        ph = max(1, round(self.image_width * H / W / self.patch))
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1)[None].float()
            if (ph * self.patch, pw * self.patch) != (H, W):
                x = F.interpolate(x, size=(ph * self.patch, pw * self.patch), mode="bilinear", align_corners=False,
                                  antialias=ph * self.patch < H)
            t = self.tokens((x - self._mean) / self._std)
            feats = F.normalize(t[0, 1:].float(), dim=-1).reshape(ph, pw, -1)              # drop CLS
        return feats.clone()            # outside inference mode → an ordinary tensor

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image batch (B, 3, ph·p, pw·p) → (B, 1 + ph·pw, D) tokens in text space (CLS first)."""
        v = self.visual
        x = x.to(v.conv1.weight.dtype)
        t = v.conv1(x)                                                                     # (B, C, ph, pw)
        ph, pw = t.shape[-2:]
        t = t.flatten(2).transpose(1, 2)                                                   # (B, hw, C)
        cls = v.class_embedding.to(t.dtype).view(1, 1, -1).expand(t.shape[0], -1, -1)
        t = torch.cat([cls, t], dim=1) + self._pos_embed(ph, pw).to(t.dtype)
        t = v.ln_pre(v.patch_dropout(t) if hasattr(v, "patch_dropout") else t)
        blocks = list(v.transformer.resblocks)
        batch_first = getattr(v.transformer, "batch_first", False)
        t = t if batch_first else t.transpose(0, 1)
        for blk in blocks[:-1]:
            t = blk(t)
        t = t if batch_first else t.transpose(0, 1)                                        # (B, N, C)
        t = v.ln_post(self._last_block(blocks[-1], t))
        return t @ v.proj if v.proj is not None else t
