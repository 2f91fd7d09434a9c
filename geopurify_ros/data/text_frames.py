"""Colour frames labelled with free text, for training text-aligned dense features.

Each pixel is labelled with the **catalogue name** of what it shows ("Office chair", "Bunk bed",
"Cactus", ...) or the name of a structural surface ("wall", "floor", "ceiling", "poster"), never with a
ScanNet-20 id: the evaluation vocabulary (config/labels.yaml) is not the training vocabulary. Scenes come
from the `train` preset (training-split models, randomised rooms, materials, lighting and camera
effects); seeds must be >= `catalog.TRAIN_SEED_MIN`. One scene = one cached ``.npz``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..cache import cache_dir
from .catalog import TRAIN_SEED_MIN

FRAMES_VERSION = 2           # 2: `train` rooms draw their curtain from ("curtain", "shower_curtain")
STRUCTURE_TEXT = {"floor": "floor", "ceiling": "ceiling", "wall": "wall", "picture": "poster"}
TRAJECTORY_CYCLE = ("loop", "lawnmower", "handheld")


def instance_text(name: str, class_name: str | None) -> str:
    """The training text of a scene instance: catalogue name for furniture, a word for structure."""
    if name.startswith("wall_"):
        return "wall"
    if name.startswith("picture"):
        return STRUCTURE_TEXT["picture"]
    return STRUCTURE_TEXT.get(name, name)


def render_text_frames(seed: int, n_frames: int = 16, models: str = "train", allow_eval_seed: bool = False):
    """Render one randomised training room. Returns (rgb uint8 (N, H, W, 3), text ids int16 (N, H, W) with -1
    where nothing is hit, vocabulary list[str], class ids uint16 (N, H, W) for monitoring only)."""
    from .make_demo import render_sequence

    if seed < TRAIN_SEED_MIN and not allow_eval_seed:
        raise ValueError(f"seed: training scenes use seeds >= {TRAIN_SEED_MIN} (evaluation protocol), got {seed}")
    rng = np.random.default_rng([seed, 505])
    h0 = float(rng.uniform(0.9, 1.5))
    options = dict(models=models, randomize=True, trajectory=TRAJECTORY_CYCLE[seed % len(TRAJECTORY_CYCLE)],
                   height=(h0, h0 + float(rng.uniform(0.1, 0.5))))
    scene, _cam, frames, _p, _q = render_sequence("train", seed, noise=False, n_frames=n_frames, options=options)
    texts = [instance_text(i.name, i.class_name) for i in scene.instances]
    vocab = sorted(set(texts))
    inst_to_text = np.array([vocab.index(t) for t in texts], np.int16)
    rgb = np.stack([f["rgb"] for f in frames])
    inst = np.stack([f["instance"] for f in frames])
    ids = np.where(inst >= 0, inst_to_text[np.maximum(inst, 0)], -1).astype(np.int16)
    classes = np.stack([f["labels"] for f in frames])
    return rgb, ids, vocab, classes


def cached_text_frames(seed: int, n_frames: int = 16, models: str = "train", root: str | os.PathLike | None = None,
                       allow_eval_seed: bool = False) -> dict:
    """`render_text_frames` through an on-disk cache ($GEOPURIFY_CACHE/text_frames/...)."""
    d = Path(root) if root else cache_dir("text_frames")
    path = d / f"v{FRAMES_VERSION}_{models}_n{n_frames}_s{seed}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {"rgb": z["rgb"], "ids": z["ids"], "vocab": [str(v) for v in z["vocab"]], "classes": z["classes"]}
        except Exception:           # truncated by a killed run: render again
            pass
    rgb, ids, vocab, classes = render_text_frames(seed, n_frames, models, allow_eval_seed)
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".npz")
    os.close(fd)
    np.savez_compressed(tmp, rgb=rgb, ids=ids, vocab=np.array(vocab), classes=classes)
    os.replace(tmp, path)
    return {"rgb": rgb, "ids": ids, "vocab": vocab, "classes": classes}
