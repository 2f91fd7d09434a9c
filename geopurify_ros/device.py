"""Torch device selection, resolved in one place for the node, the evaluator and the CLIs."""
from __future__ import annotations

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """Map a device parameter ("auto", "cpu", "cuda", "cuda:N") to a torch.device.

    "auto" picks CUDA when present. Asking for CUDA on a machine without it is a configuration
    error, reported as ValueError naming the parameter rather than failing later inside torch.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: '{spec}' requested but CUDA is not available (use 'auto' or 'cpu')")
        try:
            dev = torch.device(spec)
        except RuntimeError as exc:
            raise ValueError(f"device: invalid CUDA device '{spec}'") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: '{spec}' but only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise ValueError(f"device: unknown value '{spec}' (expected auto, cpu, cuda or cuda:N)")
