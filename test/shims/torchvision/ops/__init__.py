"""Shim of `torchvision.ops` (see the package docstring)."""
