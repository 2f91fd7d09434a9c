"""Optional `torch.compile` of an image encoder, built in the background so that no frame waits for it.

Inductor fuses EfficientNet-Lite0's depthwise blocks into C++ loops: on 1 CPU thread the lseg encoder runs
~15 % faster (docs/FEATURES.md, Speed). Compiling takes ~1 min the first time on a 2-core machine (seconds once
inductor's on-disk cache is warm) and needs a C++ compiler, so it is opt-in (`feature_compile`), runs in a daemon
thread on a dummy input of the first frame's shape, and until it has finished, or if it fails, frames go through
the eager module. Only that first shape is compiled: a camera's frames keep their size, and another shape would
make dynamo recompile inline, inside a frame.
"""
from __future__ import annotations

import threading
import warnings

import torch
from torch import nn


class BackgroundCompiled:
    """Callable over an `nn.Module`: eager until a compiled version for the input's shape is ready."""

    def __init__(self, module: nn.Module, enabled: bool = True):
        self.module = module
        self.enabled = bool(enabled)
        self.shape: tuple | None = None          # the shape being / having been compiled
        self.error: str | None = None            # why compiling failed (frames then stay eager)
        self._compiled = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def status(self) -> str:
        """off | waiting (for the first frame) | building | ready | failed: <reason> (reported on /diagnostics)."""
        if not self.enabled:
            return "off"
        if self.error is not None:
            return f"failed: {self.error}"
        if self.ready:
            return "ready"
        return "waiting" if self.shape is None else "building"

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the compiled version is ready (or compiling failed); True when it is ready."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._ready.is_set() and tuple(x.shape) == self.shape:
            return self._compiled(x)
        if self.enabled and self.shape is None:
            self._start(x)
        return self.module(x)

    def _start(self, x: torch.Tensor) -> None:
        with self._start_lock:
            if self.shape is not None:
                return
            self.shape = tuple(x.shape)
            dummy = torch.zeros_like(x)                   # same shape, dtype, device and memory layout
            self._thread = threading.Thread(target=self._compile, args=(dummy,), name="feature-compile", daemon=True)
            self._thread.start()

    def _compile(self, dummy: torch.Tensor) -> None:
        try:
            fn = torch.compile(self.module, dynamic=False)
            with torch.inference_mode():                  # frames run in inference mode: same dynamo guards
                fn(dummy)
            self._compiled = fn
            self._ready.set()
        except Exception as exc:                          # no compiler, unsupported op, ...: stay eager
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            warnings.warn(f"feature_compile: torch.compile failed, frames stay on the eager encoder ({self.error})",
                          RuntimeWarning, stacklevel=1)
