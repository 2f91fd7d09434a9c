"""Shared pytest set-up: tests run inside the env written by scripts/setup.sh (build/env.sh)."""
import os

import pytest
import torch

# Two cores on the CI machines: keep torch from oversubscribing them when pytest runs subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids synchronisation overhead on the shared 2-core runners."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_demo_dir():
    """The tiny demo sequence (seed 0), generated once into the cache and shared by every test module.

    `generate` is a no-op when the directory already holds the same size/seed, and it is lock-protected,
    so concurrent pytest processes (and the node's subprocesses) see one consistent copy."""
    from geopurify_ros.cache import cache_dir
    from geopurify_ros.data.make_demo import generate

    out = cache_dir("demo_tiny_0")
    generate(out, "tiny", 0, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def lseg_student_384(tmp_path_factory):
    """A feature-conditioned lseg student checkpoint on 384-d text-space features (seeded random weights), as
    distilled before lseg's subspace coordinates or with `LSegBackend(subspace=False)`: what `load_student` must fold
    onto the 129-d coordinates exactly. (The shipped `student_lseg.pt` is distilled on the coordinates directly.)"""
    from geopurify_ros.purify.student import StudentAffinityNet, StudentConfig

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("student") / "student_lseg_384.pt"
    StudentAffinityNet(StudentConfig(feature_dim=384, backend="lseg")).save(path)
    return path
