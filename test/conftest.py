"""Shared pytest set-up: tests run inside the env written by scripts/setup.sh (build/env.sh)."""
import os

import torch

# Two cores on the CI machines: keep torch from oversubscribing them when pytest runs subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
