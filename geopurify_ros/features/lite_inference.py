"""Inference-only rewrites of EfficientNet-Lite (and of the lseg head): same outputs, less work per CPU frame.

* `fold_batchnorm`: every eval-mode BatchNorm folded into its convolution (~25 % faster on CPU).
* `Pointwise`: a 1x1 convolution as one GEMM on the channels-last activation.
* `PaddedExpansionBlock`: a stride-2 MBConv block whose expansion ReLU6 writes straight into a zero-bordered
  buffer, instead of activating in place and then zero-padding a copy for the depthwise convolution.
* `for_inference`: applies the last two and in-place ReLUs to a module.

Measured numbers: docs/FEATURES.md, Speed. The modules can no longer be trained once rewritten.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F


def _fold(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """conv∘bn → conv with bias (eval-mode BN is an affine map per channel)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = torch.nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).detach())
    conv.bias = torch.nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).detach())
    # Symmetric TF-"SAME" padding can be done inside the conv, saving a padded copy of the activation.
    pad = getattr(conv, "static_padding", None)
    if isinstance(pad, torch.nn.ZeroPad2d):
        l, r, t, b = pad.padding
        if l == r and t == b:
            conv.padding = (t, l)
            conv.static_padding = torch.nn.Identity()


def fold_batchnorm(net: torch.nn.Module) -> torch.nn.Module:
    """Fold every BatchNorm of an eval-mode EfficientNet(-Lite) into its convolution (~25% faster on CPU)."""
    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for blk in net._blocks:
        if hasattr(blk, "_expand_conv"):
            pairs.append((blk, "_expand_conv", "_bn0"))
        pairs += [(blk, "_depthwise_conv", "_bn1"), (blk, "_project_conv", "_bn2")]
    with torch.no_grad():
        for mod, conv, bn in pairs:
            _fold(getattr(mod, conv), getattr(mod, bn))
            setattr(mod, bn, torch.nn.Identity())
    return net


class Pointwise(torch.nn.Module):
    """A 1x1, stride-1, ungrouped convolution evaluated as one GEMM on a channels-last activation.

    On one CPU thread torch sends the 1x1 convolutions of a single image to its slow (non-oneDNN) kernel, which
    also fills the output with the bias and copies it; ``addmm`` on the (N*H*W, C) view is the same arithmetic
    (bit-identical on one thread, measured) without those passes: ~2.4x faster for the largest expansion layer of
    EfficientNet-Lite0 at 448x320. Other layouts and devices use the convolution itself."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.register_buffer("weight_t", conv.weight.detach().flatten(1).t().contiguous(), persistent=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("bias", bias.clone(), persistent=False)

    @staticmethod
    def applies(m: torch.nn.Module) -> bool:
        return (isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
                and m.dilation == (1, 1) and m.padding in (0, (0, 0))
                and not isinstance(getattr(m, "static_padding", None), torch.nn.ZeroPad2d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return self.conv(x)
        n, c, h, w = x.shape
        y = torch.addmm(self.bias, x.permute(0, 2, 3, 1).reshape(-1, c), self.weight_t)
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)          # channels-last (N, C, H, W) view


class PaddedExpansionBlock(torch.nn.Module):
    """An EfficientNet-Lite MBConv block (BatchNorm folded, ReLU6, no squeeze-excitation) whose depthwise
    convolution needs TF-"SAME" zero padding on one side only (the stride-2 blocks: right and bottom).

    The block as written activates the expansion in place and then `F.pad`s it: a new tensor, zero-filled and
    copied into, the size of the largest activation of the network. Here the expansion's ReLU6 writes straight
    into the interior of a zero-bordered buffer that is kept between frames (one per thread; the border is never
    written, so it stays zero): the same numbers, one pass instead of three (1.4-3 ms of a 448x320 lseg frame on one
    thread, docs/FEATURES.md). Used in inference mode on CPU; elsewhere (autograd, CUDA, `torch.compile`, which
    fuses the padding itself) the block computes the plain way. Submodule names are the block's own, so state
    dicts, and with them `module_digest`, are unchanged."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        for name in ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_project_conv", "_bn2", "_swish"):
            setattr(self, name, getattr(block, name))
        args = block._block_args
        self.residual = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)
        self.pad = tuple(int(p) for p in self._depthwise_conv.static_padding.padding)      # (left, right, top, bottom)
        self._local = threading.local()
        self.reuse_buffer = True             # False: the plain computation (bench_features --ab-rewrites)

    @staticmethod
    def applies(block: torch.nn.Module) -> bool:
        dw = getattr(block, "_depthwise_conv", None)
        return (hasattr(block, "_expand_conv") and hasattr(block, "_block_args") and not getattr(block, "has_se", True)
                and isinstance(getattr(dw, "static_padding", None), torch.nn.ZeroPad2d)
                and isinstance(getattr(block, "_swish", None), torch.nn.ReLU6)
                and all(isinstance(getattr(block, bn, None), torch.nn.Identity) for bn in ("_bn0", "_bn1", "_bn2")))

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """The expansion, ReLU6-activated, inside its zero border: a view of this thread's buffer."""
        n, c, h, w = x.shape
        left, right, top, bottom = self.pad
        shape = (n, c, h + top + bottom, w + left + right)
        buf = getattr(self._local, "buffer", None)
        if buf is None or buf.shape != shape or buf.dtype != x.dtype:          # a new frame size: one new buffer
            buf = torch.zeros(shape, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
            self._local.buffer = buf
        torch.clamp(x, 0.0, 6.0, out=buf[:, :, top:top + h, left:left + w])
        return buf

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        # drop_connect_rate: accepted as `EfficientNet.extract_features` passes it; drop-connect is training-only
        x = self._bn0(self._expand_conv(inputs))
        dw = self._depthwise_conv
        if (not torch.compiler.is_compiling() and self.reuse_buffer and x.device.type == "cpu"
                and torch.is_inference_mode_enabled() and x.is_contiguous(memory_format=torch.channels_last)):
            x = F.conv2d(self._padded(x), dw.weight, dw.bias, dw.stride, dw.padding, dw.dilation, dw.groups)
        else:
            x = dw(self._swish(x))
        x = self._bn2(self._project_conv(self._swish(self._bn1(x))))
        return x + inputs if self.residual else x


def for_inference(net: torch.nn.Module) -> torch.nn.Module:
    """Inference-only rewrites (the module can no longer be trained): ReLU/ReLU6 in place (no new activation
    tensor per layer), 1x1 convolutions as ``Pointwise`` GEMMs and one-side-padded MBConv blocks as
    ``PaddedExpansionBlock``. Outputs are unchanged."""
    for mod in list(net.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, (torch.nn.ReLU, torch.nn.ReLU6)):
                child.inplace = True
            elif Pointwise.applies(child):
                setattr(mod, name, Pointwise(child))
    for mod in list(net.modules()):                   # after the above: the blocks keep the rewritten children
        for name, child in list(mod.named_children()):
            if PaddedExpansionBlock.applies(child):
                setattr(mod, name, PaddedExpansionBlock(child))
    return net
