"""Placement roles over the whole furniture catalogue and the seeded held-out model split.

A *role* (bed, sofa, chair, ...) is what the scene builder places; its candidates are every catalogue
item whose **name** matches the role's pattern (tags are too loose: "Flower box" is tagged door). Each
role's candidates are split by model, seeded and about 80/20, into `train` and `heldout`:
evaluation scenes (seeds < TRAIN_SEED_MIN) are built from held-out models only, training scenes
(seeds >= TRAIN_SEED_MIN) from training models only, so a learned feature head is always scored on
furniture it never saw. `split_table()` is the file that ships beside a trained checkpoint.
"""
from __future__ import annotations

import dataclasses
import re
from functools import lru_cache

import numpy as np

from .furniture import CatalogItem, app_catalog, load_catalogs

TRAIN_SEED_MIN = 1000          # seeds 0-9 report, 10-99 reserved, >= 1000 training (README, evaluation protocol)
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 20251201
# train_extra: training models plus the application's default catalogue (`furniture.app_catalog`), which is never
# held out and never enters the seeded split, so held-out models and evaluation rooms do not change with it.
SPLITS = ("heldout", "train", "all", "train_extra")


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    class_name: str | None            # ground-truth class (None = no ground truth, e.g. clutter)
    pattern: str                      # searched (case-insensitive) in the item name
    exclude: str = ""                 # names matching this are not candidates
    door_or_window: bool | None = None  # required value of the catalogue flag (None = either)
    categories: tuple[str, ...] = ()  # allowed catalogue categories (empty = any)
    max_size: float = 3.2             # largest footprint side / height in metres that fits a room


_INDOOR = ("Living room", "Bedroom", "Office", "Kitchen", "Miscellaneous", "Bathroom")
ROLES: dict[str, Role] = {r.name: r for r in [
    Role("door", "door", r"\bdoor\b", r"garage|shower|cabinet|gate|french|window", True),
    Role("window", "window", r"window", r"door|shutter|blind", True),
    Role("curtain", "curtain", r"curtain|blind", r"shower"),
    Role("bed", "bed", r"\bbed\b|\bcrib\b", r"bedside|sofa|flower|dog|cat\b|bath", None, _INDOOR),
    Role("sofa", "sofa", r"sofa|couch|futon", r"table|bed", None, _INDOOR),
    Role("bookshelf", "bookshelf", r"bookcase|book shelf|bookshelf|\bshelves\b", r"living room|cabinet|corner|upper",
         None, _INDOOR),
    Role("cabinet", "cabinet", r"wardrobe|cupboard|cabinet|drawers|dresser|chest of|sideboard|buffet",
         r"shelves|armchair|sofa|medicine|television|upper|corner|sink|high|wall", None, _INDOOR),
    Role("desk", "desk", r"\bdesk\b", r"lamp|imac|apple|chair", None, _INDOOR),
    Role("nightstand", "otherfurniture", r"bedside table|nightstand|night table"),
    Role("table", "table", r"\btable\b", r"bedside|night|tennis|pool|football|lamp|fan|desk|technical|changing|"
         r"dressing|baby|garden|picnic|ping|bar|side|tablecloth", None, _INDOOR),
    Role("chair", "chair", r"chair|\bstool\b", r"wheel|deck|high|baby|child|sofa|relax|rocking|garden|office",
         None, _INDOOR, 1.4),
    Role("clutter", None, r"\b(lamp|plant|vase|tv|television|clock|speaker|guitar|basket|bin|radio|piano|"
         r"computer|laptop|books?|fan|globe|cactus|ficus|palm)\b", r"street|outdoor|garden|ceiling|wall|pool|cabinet|table|stand|shelf",
         None, _INDOOR + ("Lights",), 2.2),
    # Training-only fabric beside windows (the `train` preset's curtain alternative): the catalogue has one
    # curtain and one blind, and the blind is the only curtain-role model training may see. Listed last so
    # the seeded split of every role above is what it was before this role existed.
    Role("shower_curtain", "shower curtain", r"shower curtain"),
]}


def role_candidates(role: str, library_dir: str | None = None,
                    items: tuple[CatalogItem, ...] | None = None) -> tuple[CatalogItem, ...]:
    """Catalogue items (default: the libraries') that can play `role` (name match, flags, category, size), in
    catalogue order."""
    r = ROLES[role]
    rx, ex = re.compile(r.pattern, re.I), re.compile(r.exclude, re.I) if r.exclude else None
    out = []
    for it in (load_catalogs(library_dir) if items is None else items):
        if not rx.search(it.name) or (ex and ex.search(it.name)):
            continue
        if r.door_or_window is not None and it.door_or_window != r.door_or_window:
            continue
        if r.categories and it.category not in r.categories:
            continue
        if max(it.width, it.depth, it.height) > r.max_size or min(it.width, it.depth, it.height) <= 0:
            continue
        out.append(it)
    return tuple(out)


def model_key(item: CatalogItem) -> str:
    """Identity of a 3D model (the same model can appear under several catalogue entries)."""
    return f"{item.library}:{item.model}"


@lru_cache(maxsize=None)
def split_models(library_dir: str | None = None, seed: int = SPLIT_SEED,
                 fraction: float = HELDOUT_FRACTION) -> dict[str, dict[str, tuple[CatalogItem, ...]]]:
    """{role: {"train": items, "heldout": items, "all": items}} — per role, models shuffled with `seed`
    and the first round(fraction * n) (at least 1 when n >= 2) held out. A model listed under several
    roles is held out everywhere if it is held out anywhere, so no held-out mesh is ever trained on."""
    rng = np.random.default_rng(seed)
    held: set[str] = set()
    per_role = {}
    for role in ROLES:                       # fixed role order → deterministic
        items = role_candidates(role, library_dir)
        keys = sorted({model_key(i) for i in items})
        order = [keys[j] for j in rng.permutation(len(keys))]
        n_held = 0 if len(keys) < 2 else max(1, int(round(fraction * len(keys))))
        held.update(order[:n_held])
        per_role[role] = items
    return {role: {"heldout": tuple(i for i in items if model_key(i) in held),
                   "train": tuple(i for i in items if model_key(i) not in held),
                   "all": items}
            for role, items in per_role.items()}


def default_split(seed: int) -> str:
    """Evaluation seeds build from held-out models, training seeds from training models."""
    return "train" if seed >= TRAIN_SEED_MIN else "heldout"


def models_of(role: str, split: str, library_dir: str | None = None) -> tuple[CatalogItem, ...]:
    """The models `role` may use in `split` (possibly none)."""
    if split not in SPLITS:
        raise ValueError(f"models: expected one of {SPLITS}, got {split!r}")
    if split == "train_extra":
        return split_models(library_dir)[role]["train"] + role_candidates(role, items=app_catalog())
    return split_models(library_dir)[role][split]


def pool(role: str, split: str, library_dir: str | None = None) -> tuple[CatalogItem, ...]:
    items = models_of(role, split, library_dir)
    if not items:
        raise ValueError(f"no '{split}' catalogue models for role '{role}'")
    return items


def split_table(library_dir: str | None = None, extra: bool = False) -> dict:
    """JSON-ready description of the split (ships with trained checkpoints); ``extra``: each role also lists the
    default catalogue's training-only models (`train_extra`)."""
    s = split_models(library_dir)

    def names(items) -> list[str]:
        return sorted(f"{i.library}#{i.id} ({i.name})" for i in items)

    return {"seed": SPLIT_SEED, "heldout_fraction": HELDOUT_FRACTION, "train_seed_min": TRAIN_SEED_MIN,
            "roles": {role: {k: names(v[k]) for k in ("train", "heldout")}
                      | ({"train_extra_only": names(role_candidates(role, items=app_catalog()))} if extra else {})
                      for role, v in s.items()}}
