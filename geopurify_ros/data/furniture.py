"""Sweet Home 3D furniture libraries (``*.sh3f``): catalog parsing and textured mesh loading.

An ``.sh3f`` file is a zip holding ``PluginFurnitureCatalog.properties`` (Java properties, one
``key#N`` per item) and OBJ+MTL models with their textures. The application's own jar holds its default
catalogue the same way (``DefaultFurnitureCatalog.properties``; `app_catalog`), used as extra training models.
Models are normalised the way Sweet Home 3D does it: apply ``modelRotation``, then centre and scale the bounding box to the catalog's
``width × depth × height`` (cm). We then convert from SH3D model axes (x right, y up, z = front)
to our world (x right, y back, z up), so an item's front faces world −y and its base sits at z=0.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..cache import cache_dir

DEFAULT_LIBRARY_DIR = Path("/usr/share/sweethome3d/furniture")
# The Debian package `sweethome3d` (its jar; `scripts/setup.sh` unpacks it into the cache without the Java stack).
APP_JAR_PATHS = (Path("/usr/share/sweethome3d/sweethome3d.jar"),)
_CATALOG_FILES = ("PluginFurnitureCatalog.properties", "com/eteks/sweethome3d/io/DefaultFurnitureCatalog.properties")

# SH3D model axes (x, y up, z front) → world (x, y back, z up): a proper rotation (det = +1).
_SH3D_TO_WORLD = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


@dataclasses.dataclass(frozen=True)
class CatalogItem:
    """One furniture entry of a library; sizes in metres (catalog stores cm)."""

    library: str          # file stem, e.g. "BlendSwap-CC-0"
    library_path: str
    license: str
    index: int
    id: str
    name: str
    category: str
    tags: tuple[str, ...]
    width: float
    depth: float
    height: float
    model: str            # path inside the zip, without the leading '/'
    model_rotation: tuple[float, ...] | None
    door_or_window: bool
    creator: str


@dataclasses.dataclass
class MeshPart:
    """A single-material triangle mesh. ``uv``/``texture`` are None for plain-coloured parts."""

    vertices: np.ndarray          # (V, 3) float64
    faces: np.ndarray             # (F, 3) int64
    color: np.ndarray             # (3,) uint8 diffuse colour
    uv: np.ndarray | None = None  # (V, 2) float64
    texture: np.ndarray | None = None  # (h, w, 3) uint8

    def transformed(self, T: np.ndarray) -> "MeshPart":
        v = self.vertices @ T[:3, :3].T + T[:3, 3]
        return dataclasses.replace(self, vertices=v)


def _unescape(value: str) -> str:
    # Java .properties are latin-1 with \uXXXX escapes.
    return re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), value).replace("\\:", ":").replace("\\=", "=")


def parse_properties(text: str) -> dict[str, str]:
    props: dict[str, str] = {}
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#!":
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = _unescape(value.strip())
    return props


def read_catalog(path: str | os.PathLike) -> list[CatalogItem]:
    """All items of one ``.sh3f`` library (or of the application jar's default catalogue), in catalog order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"furniture library not found: {path}")
    with zipfile.ZipFile(path) as zf:
        found = [n for n in _CATALOG_FILES if n in zf.namelist()]
        if not found:
            raise ValueError(f"{path}: no furniture catalogue ({' or '.join(_CATALOG_FILES)})")
        props = parse_properties(zf.read(found[0]).decode("latin-1"))
    items = []
    n = 1
    while f"name#{n}" in props:
        g = lambda k, d="": props.get(f"{k}#{n}", d)  # noqa: E731
        rot = g("modelRotation")
        items.append(CatalogItem(
            library=path.stem, library_path=str(path), license=props.get("license", ""), index=n,
            id=g("id"), name=g("name"), category=g("category"),
            tags=tuple(t.strip() for t in g("tags").split(",") if t.strip()),
            width=float(g("width", "100")) / 100.0, depth=float(g("depth", "100")) / 100.0,
            height=float(g("height", "100")) / 100.0, model=g("model").lstrip("/"),
            model_rotation=tuple(float(x) for x in rot.split()) if rot else None,
            door_or_window=g("doorOrWindow") == "true", creator=g("creator")))
        n += 1
    return items


@lru_cache(maxsize=None)
def load_catalogs(library_dir: str | None = None) -> tuple[CatalogItem, ...]:
    """Items of every ``*.sh3f`` in ``library_dir`` (sorted by file name → deterministic order)."""
    d = Path(library_dir) if library_dir else DEFAULT_LIBRARY_DIR
    files = sorted(d.glob("*.sh3f"))
    if not files:
        raise ValueError(f"no *.sh3f furniture libraries in {d} (apt-get install sweethome3d-furniture)")
    return tuple(it for f in files for it in read_catalog(f))


def app_catalog_jar() -> Path | None:
    """The Sweet Home 3D application jar: $GEOPURIFY_SH3D_JAR, the Debian install, or the copy setup.sh unpacked."""
    env = os.environ.get("GEOPURIFY_SH3D_JAR")
    for p in ([Path(env)] if env else []) + list(APP_JAR_PATHS) + [cache_dir("sweethome3d") / "sweethome3d.jar"]:
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=None)
def app_catalog() -> tuple[CatalogItem, ...]:
    """Items of the application's default catalogue (100 models in 7.0); a clear error when it is not installed."""
    jar = app_catalog_jar()
    if jar is None:
        raise ValueError("the Sweet Home 3D default catalogue is not installed: run scripts/setup.sh (it unpacks "
                         "`apt-get download sweethome3d` into the cache) or set GEOPURIFY_SH3D_JAR")
    return tuple(read_catalog(jar))


def find_item(catalog_id: str, library_dir: str | None = None) -> CatalogItem:
    for it in load_catalogs(library_dir):
        if it.id == catalog_id:
            return it
    raise ValueError(f"catalog id {catalog_id!r} not found in the furniture libraries")


def _extract_model_dir(item: CatalogItem, cache_dir: Path) -> Path:
    """Extract the model's folder from the zip once (trimesh resolves MTL/textures from disk)."""
    folder = item.model.rsplit("/", 1)[0] + "/" if "/" in item.model else ""
    key = hashlib.sha1(f"{item.library_path}:{item.model}".encode()).hexdigest()[:12]
    out = cache_dir / f"{item.library}-{key}"
    obj = out / item.model
    if not obj.exists():
        with zipfile.ZipFile(item.library_path) as zf:
            names = [n for n in zf.namelist() if n.startswith(folder) and not n.endswith("/")]
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            for n in names:
                zf.extract(n, tmp)
            if out.exists():  # another process won the race
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, out)
    return obj


def _material_of(visual) -> tuple[np.ndarray, np.ndarray | None]:
    mat = getattr(visual, "material", None)
    color = np.array([180, 180, 180], np.uint8)
    image = None
    if mat is not None:
        diffuse = getattr(mat, "diffuse", None)
        if diffuse is None:
            diffuse = getattr(mat, "baseColorFactor", None)
        if diffuse is not None:
            color = np.asarray(diffuse, dtype=np.uint8)[:3]
        img = getattr(mat, "image", None)
        if img is None:
            img = getattr(mat, "baseColorTexture", None)
        if img is not None:
            image = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return color, image


def _default_cache() -> Path:
    return cache_dir("sh3f")


def load_item_parts(item: CatalogItem, cache_dir: str | os.PathLike | None = None) -> list[MeshPart]:
    """Textured parts of ``item`` in world axes at real size: centred on x/y, base at z = 0."""
    import trimesh

    obj = _extract_model_dir(item, Path(cache_dir) if cache_dir else _default_cache())
    scene = trimesh.load(str(obj), force="scene", process=False)
    parts: list[MeshPart] = []
    for node in scene.graph.nodes_geometry:
        T, geom_name = scene.graph[node]
        g = scene.geometry[geom_name]
        if not hasattr(g, "faces") or len(g.faces) == 0:
            continue
        v = np.asarray(g.vertices, np.float64) @ T[:3, :3].T + T[:3, 3]
        visual = g.visual
        uv = None
        if visual.kind == "texture":
            color, image = _material_of(visual)
            if image is not None and getattr(visual, "uv", None) is not None and len(visual.uv) == len(v):
                uv = np.asarray(visual.uv, np.float64)
            else:
                image = None
        else:
            image = None
            fc = np.asarray(visual.face_colors)[:, :3] if visual.kind == "face" else None
            color = fc.mean(0).astype(np.uint8) if fc is not None and len(fc) else np.array([180, 180, 180], np.uint8)
        parts.append(MeshPart(v, np.asarray(g.faces, np.int64), color, uv, image))
    if not parts:
        raise ValueError(f"model {item.model} of {item.library} has no triangles")
    # Sweet Home 3D normalisation: rotate, then fit the bbox to the catalog size.
    R = np.eye(3) if item.model_rotation is None else np.asarray(item.model_rotation).reshape(3, 3)
    allv = np.concatenate([p.vertices for p in parts]) @ R.T
    lo, hi = allv.min(0), allv.max(0)
    size_model = np.maximum(hi - lo, 1e-9)
    target = np.array([item.width, item.height, item.depth])  # SH3D x, y(up), z
    scale = target / size_model
    centre = (lo + hi) / 2
    for p in parts:
        m = ((p.vertices @ R.T) - centre) * scale
        w = m @ _SH3D_TO_WORLD.T
        w[:, 2] += item.height / 2
        p.vertices = w
    return parts
