"""Seeded furnished room: floor, walls, ceiling, a door, a window, a wall picture and real furniture.

World frame: x east, y north, z up; the room spans [0, W] × [0, D] × [0, H]. Furniture from the
Sweet Home 3D libraries keeps its catalog size and is placed against walls (back to the wall) or
around a central table, without footprint overlap. Everything follows from ``seed`` and the preset.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .catalog import ROLES, default_split, models_of, pool
from .classes import IGNORE_LABEL, class_id, class_names
from .furniture import CatalogItem, MeshPart, load_item_parts
from .render import TriangleSoup

@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a room holds. Roles are `catalog.ROLES`; models come from the split chosen by `build_scene`."""

    room: tuple = ((5.2, 6.0), (4.4, 5.0))      # (width range, depth range) in metres
    wall_roles: tuple = ("bed", "sofa", "cabinet", "bookshelf", "desk", "nightstand")  # placed in order
    chairs: int = 3                             # around the central table
    curtain: bool = True
    curtain_roles: tuple = ("curtain",)         # one drawn per room (a draw only when there is a choice)
    clutter: int = 0                            # lamps, plants, books, ... (no ground-truth class)
    randomize: bool = False                     # domain randomisation: wall/floor colours, texture swaps
    posters: tuple = ("astronaut", "coffee", "chelsea", "rocket")   # scikit-image pictures on the wall


PRESETS = {
    "tiny": SceneSpec(room=((4.2, 4.8), (3.6, 4.0)), wall_roles=("sofa", "bookshelf"), chairs=2, curtain=False),
    "demo": SceneSpec(),
    # training rooms: sizes, contents and materials vary; pictures other than the evaluation ones
    "train": SceneSpec(room=((3.6, 7.0), (3.2, 6.0)), wall_roles=("bed", "sofa", "cabinet", "bookshelf", "desk",
                       "nightstand", "sofa", "cabinet"), chairs=4, clutter=6, randomize=True,
                       curtain_roles=("curtain", "shower_curtain"),
                       posters=("camera", "horse", "moon", "page", "hubble_deep_field", "immunohistochemistry",
                                "retina", "brick", "grass", "gravel", "cell", "logo")),
}
ROOM_HEIGHT = 2.6
WALL_CLEARANCE = 0.03  # gap between furniture backs and walls (m)


@dataclasses.dataclass
class Instance:
    id: int
    name: str
    class_name: str | None        # None = no ground truth (ignore)
    label: int                    # label id, IGNORE_LABEL for None
    catalog_id: str = ""
    library: str = ""
    license: str = ""
    creator: str = ""
    position: tuple = (0.0, 0.0, 0.0)
    yaw: float = 0.0
    size: tuple = (0.0, 0.0, 0.0)  # width, depth, height (m)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["position"] = [round(float(x), 4) for x in self.position]
        d["size"] = [round(float(x), 4) for x in self.size]
        d["yaw"] = round(float(self.yaw), 6)
        return d


@dataclasses.dataclass
class Scene:
    width: float
    depth: float
    height: float
    instances: list
    soup: TriangleSoup
    class_names: tuple

    def instance_labels(self) -> np.ndarray:
        """Label id per instance id (index = instance id)."""
        return np.array([i.label for i in self.instances], np.int64)


def _pose(yaw: float, xyz) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    T = np.eye(4)
    T[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    T[:3, 3] = xyz
    return T


def _quad(p0, eu, ev, color, texture=None, uv_scale=(1.0, 1.0)) -> MeshPart:
    """Rectangle p0 + a*eu + b*ev, a,b ∈ [0,1]; uv spans uv_scale."""
    p0, eu, ev = (np.asarray(x, np.float64) for x in (p0, eu, ev))
    v = np.stack([p0, p0 + eu, p0 + eu + ev, p0 + ev])
    uv = np.array([[0, 0], [uv_scale[0], 0], [uv_scale[0], uv_scale[1]], [0, uv_scale[1]]], np.float64)
    return MeshPart(v, np.array([[0, 1, 2], [0, 2, 3]]), np.asarray(color, np.uint8),
                    uv if texture is not None else None, texture)


def _noise_texture(rng, base, size=64, amp=10.0) -> np.ndarray:
    n = rng.normal(0, amp, (size, size, 1))
    return np.clip(np.asarray(base, np.float64) + n, 0, 255).astype(np.uint8)


def _tinted(part: MeshPart, rng: np.random.Generator) -> MeshPart:
    """Texture swap for domain randomisation: a random per-channel tint of the part's colour and texture."""
    gain = rng.uniform(0.6, 1.4, 3)
    tint = lambda a: np.clip(a.astype(np.float64) * gain, 0, 255).astype(np.uint8)  # noqa: E731
    return dataclasses.replace(part, color=tint(part.color),
                               texture=None if part.texture is None else tint(part.texture))


def _floor_texture(rng, randomize: bool) -> np.ndarray:
    """Wood planks; with ``randomize`` also tiles or carpet in random tones."""
    kind = int(rng.integers(3)) if randomize else 0
    if kind == 0:
        return _wood_texture(rng)
    base = rng.integers(60, 230, 3)
    if kind == 1:                   # tiles: grout lines every 1/4 of the texture
        img = _noise_texture(rng, base, size=128, amp=6).astype(np.float64)
        img[::32] *= 0.6
        img[:, ::32] *= 0.6
        return img.astype(np.uint8)
    return _noise_texture(rng, base, size=64, amp=18)      # carpet


def _wood_texture(rng, size=128) -> np.ndarray:
    """Planks: alternating board tones with grain streaks (tiled, 1 texture per 1.2 m)."""
    base = np.array([150, 105, 65], np.float64) * rng.uniform(0.85, 1.1)
    boards = 6
    tone = rng.uniform(0.85, 1.1, boards)[np.arange(size) * boards // size]
    grain = 0.06 * np.sin(np.linspace(0, 40, size)[:, None] + rng.normal(0, 1.5, (1, size)))
    img = base[None, None] * (tone[None, :, None] + grain[:, :, None])
    img[:, (np.arange(size) % (size // boards)) == 0] *= 0.55  # board gaps
    return np.clip(img, 0, 255).astype(np.uint8)


def _poster_parts(image: np.ndarray, w: float, h: float, thickness=0.025) -> list:
    """A framed picture, ``thickness`` deep, facing −y (like catalog items), base at z = 0, centred on x/y.

    The image (with a painted frame border) textures the front face; the sides are plain frame colour."""
    frame = np.array([60, 42, 30], np.uint8)
    img = image.copy()
    b = max(2, int(0.06 * min(img.shape[:2])))
    img[:b], img[-b:], img[:, :b], img[:, -b:] = frame, frame, frame, frame  # frame border
    t2 = thickness / 2
    parts = [_quad((-w / 2, -t2, 0), (w, 0, 0), (0, 0, h), frame, img)]  # front face (faces −y)
    for p0, eu, ev in [((-w / 2, -t2, 0), (0, thickness, 0), (0, 0, h)), ((w / 2, -t2, 0), (0, thickness, 0), (0, 0, h)),
                       ((-w / 2, -t2, h), (w, 0, 0), (0, thickness, 0)), ((-w / 2, -t2, 0), (w, 0, 0), (0, thickness, 0))]:
        parts.append(_quad(p0, eu, ev, frame))
    return parts


class _Builder:
    def __init__(self, names, randomize_rng: np.random.Generator | None = None):
        self.names = names
        self.rng = randomize_rng        # set: items get random material tints (domain randomisation)
        self.instances: list[Instance] = []
        self.parts: list[tuple[int, MeshPart]] = []

    def add(self, name, cls, parts, T=None, **kw) -> Instance:
        inst = Instance(id=len(self.instances), name=name, class_name=cls,
                        label=class_id(cls, self.names) if cls else IGNORE_LABEL, **kw)
        self.instances.append(inst)
        for p in parts:
            self.parts.append((inst.id, p.transformed(T) if T is not None else p))
        return inst

    def add_item(self, item: CatalogItem, role: str, yaw, xyz, parts):
        """Place ``item`` playing ``role`` (its ground-truth class is the role's)."""
        if self.rng is not None and self.rng.random() < 0.5:
            parts = [_tinted(p, self.rng) for p in parts]
        return self.add(item.name, ROLES[role].class_name, parts, _pose(yaw, xyz),
                        catalog_id=item.id, library=item.library, license=item.license, creator=item.creator,
                        position=tuple(xyz), yaw=yaw, size=(item.width, item.depth, item.height))

    def soup(self) -> TriangleSoup:
        tris, uvs, tex_ids, colors, inst, textures = [], [], [], [], [], []
        for iid, p in self.parts:
            F = len(p.faces)
            tris.append(p.vertices[p.faces])
            colors.append(np.broadcast_to(p.color, (F, 3)))
            inst.append(np.full(F, iid, np.int64))
            if p.texture is not None:
                uvs.append(p.uv[p.faces].astype(np.float32))
                tex_ids.append(np.full(F, len(textures), np.int64))
                textures.append(np.ascontiguousarray(p.texture))
            else:
                uvs.append(np.zeros((F, 3, 2), np.float32))
                tex_ids.append(np.full(F, -1, np.int64))
        return TriangleSoup(np.concatenate(tris), np.concatenate(uvs), np.concatenate(tex_ids),
                            np.concatenate(colors).astype(np.uint8), np.concatenate(inst), textures)


# Walls: index → (yaw placing an item's back against it, wall length axis)
def _wall_frame(k: int, W: float, D: float):
    """(yaw, origin of the wall line, unit direction along the wall, inward normal, length)."""
    return [
        (np.pi, np.array([0.0, 0.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]), W),    # south, y = 0
        (-np.pi / 2, np.array([W, 0.0]), np.array([0.0, 1.0]), np.array([-1.0, 0.0]), D),  # east, x = W
        (0.0, np.array([0.0, D]), np.array([1.0, 0.0]), np.array([0.0, -1.0]), W),        # north, y = D
        (np.pi / 2, np.array([0.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0]), D),  # west, x = 0
    ][k]


def _footprint(cx, cy, w, d, yaw):
    """Axis-aligned footprint (xmin, ymin, xmax, ymax) for yaw multiple of 90°."""
    if abs(np.sin(yaw)) > 0.5:
        w, d = d, w
    return (cx - w / 2, cy - d / 2, cx + w / 2, cy + d / 2)


def _overlaps(a, b, margin=0.05) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _along_wall(rng, L: float, width: float, margin: float) -> float:
    """Centre of an opening of `width` on a wall of length L, `margin` from both corners; centred when the
    opening does not fit with its margins (a wide window on a short wall in randomised rooms)."""
    lo, hi = margin + width / 2, L - margin - width / 2
    return float(rng.uniform(lo, hi)) if hi >= lo else L / 2


def build_scene(seed: int = 0, preset: str | SceneSpec = "tiny", library_dir: str | None = None,
                models: str | None = None) -> Scene:
    """Build the seeded room for ``preset`` ('tiny' | 'demo' | 'train' or a SceneSpec).

    ``models``: which catalogue models may appear ('heldout' | 'train' | 'all' | 'train_extra'); default by seed
    (`catalog.default_split`): evaluation seeds get held-out models, training seeds training models.
    """
    if isinstance(preset, SceneSpec):
        cfg = preset
    elif preset in PRESETS:
        cfg = PRESETS[preset]
    else:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    split = models or default_split(seed)
    rng = np.random.default_rng(seed)
    names = class_names()
    W = float(round(rng.uniform(*cfg.room[0]), 2))
    D = float(round(rng.uniform(*cfg.room[1]), 2))
    H = ROOM_HEIGHT
    b = _Builder(names, rng if cfg.randomize else None)

    def pick(role: str) -> tuple[CatalogItem, list]:
        """A random model for ``role`` from the split, with its parts (models that fail to load are skipped)."""
        items = list(pool(role, split, library_dir))
        for _ in range(8):
            item = items[int(rng.integers(len(items)))]
            try:
                return item, load_item_parts(item)
            except Exception:                       # a broken model in a user's library: try another
                continue
        raise ValueError(f"no loadable '{split}' model for role '{role}'")

    # --- shell: floor (wood), 4 walls (painted plaster), ceiling (no GT class)
    wall_choices = np.array([[222, 214, 196], [200, 214, 222], [226, 208, 200], [214, 222, 200]])
    wall_rgb = rng.choice(wall_choices) if not cfg.randomize else rng.integers(90, 250, 3)
    b.add("floor", "floor", [_quad((0, 0, 0), (W, 0, 0), (0, D, 0), (150, 110, 70), _floor_texture(rng, cfg.randomize),
                                   (W / 1.2, D / 1.2))])
    for k in range(4):
        yaw, o, e, n, L = _wall_frame(k, W, D)
        p0 = np.array([o[0], o[1], 0.0])
        b.add(f"wall_{['south', 'east', 'north', 'west'][k]}", "wall",
              [_quad(p0, (e[0] * L, e[1] * L, 0), (0, 0, H), wall_rgb, _noise_texture(rng, wall_rgb, amp=6), (L, H))])
    b.add("ceiling", None, [_quad((0, 0, H), (W, 0, 0), (0, D, 0), (240, 240, 236))])

    footprints: list[tuple] = []   # floor occupancy (incl. door swing clearance)
    wall_spans: dict[int, list] = {k: [] for k in range(4)}  # (a0, a1, zmin, zmax) used on each wall

    def wall_point(k, a, inset):
        yaw, o, e, n, L = _wall_frame(k, W, D)
        xy = o + e * a + n * inset
        return yaw, xy

    # --- door (floor standing, half embedded in the wall) and window on two different walls
    walls = rng.permutation(4)
    door, door_parts = pick("door")
    k = int(walls[0]); L = _wall_frame(k, W, D)[4]
    a = _along_wall(rng, L, door.width, 0.3)
    yaw, xy = wall_point(k, a, 0.0)
    b.add_item(door, "door", yaw, (xy[0], xy[1], 0.0), door_parts)
    wall_spans[k].append((a - door.width / 2, a + door.width / 2, 0.0, 2.2))
    _, cxy = wall_point(k, a, 0.5)
    footprints.append(_footprint(cxy[0], cxy[1], door.width + 0.2, 1.0, _wall_frame(k, W, D)[0]))

    win, win_parts = pick("window")
    kw = int(walls[1]); L = _wall_frame(kw, W, D)[4]
    a = _along_wall(rng, L, win.width, 0.4)
    sill = float(min(0.9, H - 0.25 - win.height))
    yaw, xy = wall_point(kw, a, 0.0)
    b.add_item(win, "window", yaw, (xy[0], xy[1], sill), win_parts)
    wall_spans[kw].append((a - win.width / 2, a + win.width / 2, sill, sill + win.height))
    if cfg.curtain:
        roles = [r for r in cfg.curtain_roles if models_of(r, split, library_dir)]
        if not roles:
            raise ValueError(f"no '{split}' catalogue models for the curtain roles {cfg.curtain_roles}")
        role = roles[int(rng.integers(len(roles)))] if len(cfg.curtain_roles) > 1 else roles[0]
        cur, cur_parts = pick(role)
        side = 1 if a + win.width / 2 + cur.width * 0.4 < L - 0.1 else -1
        ac = a + side * (win.width / 2 + cur.width * 0.3)
        yaw, xy = wall_point(kw, ac, WALL_CLEARANCE + cur.depth / 2 + 0.09)
        b.add_item(cur, role, yaw, (xy[0], xy[1], 0.02), cur_parts)
        wall_spans[kw].append((ac - cur.width / 2, ac + cur.width / 2, 0.0, H))
        footprints.append(_footprint(xy[0], xy[1], cur.width, cur.depth + 0.15, yaw))

    # --- furniture backed against walls
    def place_on_wall(role: str, item: CatalogItem, parts: list) -> bool:
        for _ in range(60):
            k = int(rng.integers(4))
            yaw, o, e, n, L = _wall_frame(k, W, D)
            if item.width + 0.2 > L:
                continue
            a = float(rng.uniform(0.1 + item.width / 2, L - 0.1 - item.width / 2))
            _, xy = wall_point(k, a, WALL_CLEARANCE + item.depth / 2)
            fp = _footprint(xy[0], xy[1], item.width, item.depth, yaw)
            if any(_overlaps(fp, f) for f in footprints):
                continue
            if any(a0 - 0.05 < a + item.width / 2 and a - item.width / 2 < a1 + 0.05 and z0 < item.height
                   for a0, a1, z0, z1 in wall_spans[k]):
                continue
            footprints.append(fp)
            wall_spans[k].append((a - item.width / 2, a + item.width / 2, 0.0, item.height))
            b.add_item(item, role, yaw, (xy[0], xy[1], 0.0), parts)
            return True
        return False

    for role in cfg.wall_roles:
        place_on_wall(role, *pick(role))

    # --- picture on a free stretch of wall, centred ~1.5 m high (thin and nearly co-planar with the wall)
    from skimage import data as skdata

    img_name = cfg.posters[int(rng.integers(len(cfg.posters)))]
    img = getattr(skdata, img_name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:                                   # greyscale pictures (training set) → RGB
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3])
    pw = float(round(rng.uniform(0.8, 1.1), 2))
    ph = float(round(pw * img.shape[0] / img.shape[1], 3))
    for _ in range(60):
        k = int(rng.integers(4))
        yaw, o, e, n, L = _wall_frame(k, W, D)
        a = float(rng.uniform(0.2 + pw / 2, L - 0.2 - pw / 2))
        z0 = float(rng.uniform(1.15, 1.35))
        if any(a0 - 0.05 < a + pw / 2 and a - pw / 2 < a1 + 0.05 and z0 < zz1 and zz0 < z0 + ph
               for a0, a1, zz0, zz1 in wall_spans[k]):
            continue
        _, xy = wall_point(k, a, 0.0125 + 0.002)
        b.add(f"picture ({img_name})", "picture", _poster_parts(img, pw, ph), _pose(yaw, (xy[0], xy[1], z0)),
              library="scikit-image data", license=f"skimage.data.{img_name} (see docs/ATTRIBUTION.md)",
              position=(xy[0], xy[1], z0), yaw=yaw, size=(pw, 0.025, ph))
        wall_spans[k].append((a - pw / 2, a + pw / 2, z0, z0 + ph))
        break

    # --- central table with chairs facing it
    table, table_parts = pick("table")
    chair, chair_parts = pick("chair")
    for _ in range(60):
        cx = float(W / 2 + rng.uniform(-0.4, 0.4)); cy = float(D / 2 + rng.uniform(-0.3, 0.3))
        tfp = _footprint(cx, cy, table.width, table.depth, 0.0)
        if not any(_overlaps(tfp, f) for f in footprints):
            break
    footprints.append(tfp)
    b.add_item(table, "table", 0.0, (cx, cy, 0.0), table_parts)
    # sides: (offset direction, chair yaw making its front face the table)
    sides = [((0, 1), 0.0), ((0, -1), np.pi), ((1, 0), -np.pi / 2), ((-1, 0), np.pi / 2)]
    order = rng.permutation(4)
    placed = 0
    for s in order:
        if placed >= cfg.chairs:
            break
        (dx, dy), yaw = sides[s]
        half = table.depth / 2 if dy else table.width / 2
        dist = half + chair.depth * 0.25
        px, py = cx + dx * dist, cy + dy * dist
        fp = _footprint(px, py, chair.width, chair.depth, yaw)
        if any(_overlaps(fp, f, 0.02) for f in footprints[:-1]) or not (0.1 < fp[0] and fp[2] < W - 0.1 and 0.1 < fp[1] and fp[3] < D - 0.1):
            continue
        b.add_item(chair, "chair", float(yaw), (px, py, 0.0), [dataclasses.replace(p) for p in chair_parts])
        placed += 1

    # --- clutter (no ground truth): small items on the table top, larger ones against the walls
    for _ in range(cfg.clutter):
        item, parts = pick("clutter")
        if item.height < 0.6 and max(item.width, item.depth) < 0.6 * min(table.width, table.depth):
            ox = rng.uniform(-0.5, 0.5) * (table.width - item.width)
            oy = rng.uniform(-0.5, 0.5) * (table.depth - item.depth)
            b.add_item(item, "clutter", float(rng.uniform(0, 2 * np.pi)), (cx + ox, cy + oy, table.height), parts)
        else:
            place_on_wall("clutter", item, parts)

    return Scene(W, D, H, b.instances, b.soup(), names)
