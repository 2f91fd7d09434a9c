"""Coloured point clouds sampled straight from the demo generator's furnished rooms (no rendering).

Teacher pre-training wants far more geometry than a few rendered recordings: `build_scene(seed)` places real
catalogue meshes in a randomised room in ~a second, and area-weighted surface samples with their shaded
albedo (the renderer's own `shade`, seen from the room centre) give a coloured cloud without any raster
pass. Training must use seeds >= 1000 only (seeds 0-9 are evaluation scenes, 10-99 reserved);
`build_scene` picks the catalogue split that belongs to a seed, so training rooms use training-split
models once the generator has one.

Labels are returned for the linear probe only (`probe.py`); `geopurify-train` never reads them.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

TRAIN_SEED_MIN = 1000          # evaluation: 0-9, reserved: 10-99
EVAL_SEEDS = tuple(range(10))


def check_training_seed(seed: int) -> int:
    """Raise if a seed belongs to the evaluation (0-9) or reserved (10-99) range."""
    if seed < TRAIN_SEED_MIN:
        raise ValueError(f"seed: training/tuning scenes must use seeds >= {TRAIN_SEED_MIN} "
                         f"(0-9 are evaluation scenes, 10-99 reserved); got {seed}")
    return seed


@lru_cache(maxsize=4)
def _scene(seed: int, preset: str):
    from ..data.scene import build_scene

    return build_scene(seed, preset)


def room_cloud(seed: int, preset: str = "demo", density: float = 1500.0, jitter: float = 0.002,
               include_ceiling: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Surface samples of the generator's room `seed`: (xyz (M,3) float64, rgb (M,3) uint8, label (M,) int64).

    density: samples per m^2 of surface (1500 ~ 2.6 cm spacing, several per 5 cm voxel). The ceiling has no
    ground-truth class and is never seen from the robot's height in the recordings, so it is left out by
    default. label: class id, IGNORE_LABEL where the generator has no class.
    """
    from ..data.render import shade

    scene = _scene(int(seed), preset)
    soup = scene.soup
    rng = np.random.default_rng([int(seed), 404])
    labels_of_inst = scene.instance_labels()
    keep = np.ones(len(soup.area), bool)
    if not include_ceiling:
        ceiling = [i.id for i in scene.instances if i.name == "ceiling"]
        keep &= ~np.isin(soup.instance, ceiling)
    area = np.where(keep, soup.area, 0.0)
    n = int(area.sum() * density)
    f = rng.choice(len(area), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    bary = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    xyz = np.einsum("nk,nkj->nj", bary, soup.tris[f]) + rng.normal(0, jitter, (n, 3))
    eye = np.eye(4)
    eye[:3, 3] = (scene.width / 2, scene.depth / 2, 1.4)       # light/view point: the room centre
    rgb, _ = shade(soup, f[None], bary[None], eye)
    return xyz, rgb[0], labels_of_inst[soup.instance[f]].astype(np.int64)


def voxel_labels(xyz: np.ndarray, labels: np.ndarray, voxel_size: float, ignore: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(voxel index of every point (M,), majority label per voxel (V,)) on a grid at the origin."""
    ijk = np.floor(xyz / voxel_size).astype(np.int64)
    _, inv = np.unique(ijk, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    lab = np.where(labels == ignore, -1, labels)
    ncls = int(lab.max()) + 2 if lab.size else 1
    votes = np.zeros((inv.max() + 1 if inv.size else 0, ncls), np.int64)
    np.add.at(votes, (inv, lab + 1), 1)
    votes[:, 0] = 0                                   # ignore only wins when nothing else is there
    best = votes.argmax(1) - 1
    best[votes.max(1) == 0] = -1
    return inv, np.where(best < 0, ignore, best)
