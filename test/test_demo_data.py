"""Demo data generator: determinism, depth ↔ mesh consistency, label images, ground truth, cache, CLI."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rosbags")
pytest.importorskip("trimesh")
if not Path("/usr/share/sweethome3d/furniture").is_dir():
    pytest.skip("sweethome3d-furniture not installed", allow_module_level=True)

from geopurify_ros.data import bag_io  # noqa: E402
from conftest import tiny_demo_dir  # noqa: E402
from geopurify_ros.data.classes import IGNORE_LABEL, class_of_item, class_names  # noqa: E402
from geopurify_ros.data.make_demo import generate, main, render_sequence  # noqa: E402
from geopurify_ros.data.sequence import load_ground_truth, load_sequence  # noqa: E402

SEED = 0


@pytest.fixture(scope="session")
def tiny_dataset():
    """The shared tiny sequence (conftest.tiny_demo_dir) and its meta."""
    out = tiny_demo_dir()
    return out, generate(out, "tiny", SEED, log=lambda *_: None)


@pytest.fixture(scope="module")
def clean_frames():
    """Noise-free in-memory render of the same tiny scene (exact depth, triangle ids)."""
    return render_sequence("tiny", SEED, noise=False)


def test_tiny_is_small_and_complete(tiny_dataset):
    out, meta = tiny_dataset
    assert (meta["width"], meta["height"], meta["frames"]) == (160, 120, 12)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size < 10e6
    assert meta["seconds"]["total"] < 60  # "seconds" on a loaded 2-core box
    # at least: structure + chair, table, a sofa/bed, a bookshelf and the wall picture
    assert {"wall", "floor", "door", "window", "picture", "chair", "table", "bookshelf"} <= set(meta["classes_present"])
    assert {"sofa", "bed"} & set(meta["classes_present"])
    libs = {i["library"] for i in meta["items"] if i["catalog_id"]}
    assert libs and all(i["license"] for i in meta["items"] if i["catalog_id"])
    assert libs <= {p.stem for p in Path("/usr/share/sweethome3d/furniture").glob("*.sh3f")}


def test_cache_is_reused_and_force_regenerates(tiny_dataset, tmp_path):
    out, meta = tiny_dataset
    before = (out / "meta.json").stat().st_mtime_ns
    assert generate(out, "tiny", SEED, log=lambda *_: None)["seed"] == SEED
    assert (out / "meta.json").stat().st_mtime_ns == before  # nothing rewritten


def test_same_seed_identical_different_seed_differs(tiny_dataset, tmp_path):
    out, _ = tiny_dataset
    copy = tmp_path / "again"
    assert main(["--size", "tiny", "--seed", str(SEED), "--out", str(copy), "--force"]) == 0

    def payloads(d):
        return [(t, s, bytes(m.data)) for t, s, m in bag_io.read_messages(
            d / "bag_mcap", ["/camera/color/image_raw", "/camera/depth/image_raw", "/camera/labels"])]

    assert payloads(out) == payloads(copy)
    a, b = load_ground_truth(out), load_ground_truth(copy)
    for k in ("xyz", "labels", "instance", "observed"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert json.loads((out / "meta.json").read_text())["poses_published"] == \
        json.loads((copy / "meta.json").read_text())["poses_published"]
    other = render_sequence("tiny", SEED + 1, noise=False, n_frames=2)[2]
    assert not np.array_equal(other[0]["rgb"], render_sequence("tiny", SEED, noise=False, n_frames=2)[2][0]["rgb"])


def _point_triangle_distance(p, tri):
    import trimesh

    closest = trimesh.triangles.closest_point(tri, p)
    return np.linalg.norm(closest - p, axis=1)


def test_clean_depth_backprojects_onto_rendered_surface(clean_frames):
    """Noise-free depth (as stored: 16UC1 mm) + pose + intrinsics → each pixel lands on its triangle (< 1 cm)."""
    from geopurify_ros.camera import backproject
    from geopurify_ros.image_codec import decode_depth, encode_depth

    scene, cam, frames, poses, poses_pub = clean_frames
    for T, T_pub in zip(poses, poses_pub):
        assert np.array_equal(T, T_pub)  # noise=False publishes the exact pose
    for fr, T in list(zip(frames, poses))[::3]:
        enc, step, data = encode_depth(fr["depth"])
        depth = decode_depth(data, enc, cam.height, cam.width, step)
        assert np.isfinite(depth).mean() > 0.99  # a closed room: (almost) every pixel hits a surface
        pts, pix, _ = backproject(depth, cam, T, min_depth=0.05, max_depth=20.0)
        face = fr["face"][pix[:, 0].numpy(), pix[:, 1].numpy()]
        assert (face >= 0).all()
        err = _point_triangle_distance(pts.numpy().astype(np.float64), scene.soup.tris[face])
        assert err.max() < 0.01, err.max()
        assert np.median(err) < 0.001


def test_noisy_bag_depth_close_to_truth(tiny_dataset, clean_frames):
    out, meta = tiny_dataset
    _, _, frames, poses, _ = clean_frames
    seq = list(load_sequence(out))
    for fr, clean in zip(seq, frames):
        d, t = fr.depth, clean["depth"]
        ok = np.isfinite(d) & np.isfinite(t)
        assert 0.8 < ok.mean() < 0.999  # realistic dropouts, but mostly valid
        err = np.abs(d[ok] - t[ok])
        assert 0.0005 < np.median(err) < 0.01
        assert np.array_equal(fr.rgb, clean["rgb"]) and np.array_equal(fr.labels, clean["labels"])
    # published poses drift a little from the truth (both stored in meta)
    drift = [np.linalg.norm(np.subtract(a, b)[:3, 3]) for a, b in zip(meta["poses_true"], meta["poses_published"])]
    assert drift[0] == 0 and 0 < max(drift) < 0.05
    assert np.allclose(seq[-1].T_world_cam, meta["poses_published"][-1], atol=1e-6)


def test_label_images_match_object_classes(clean_frames):
    scene, _, frames, _, _ = clean_frames
    names = class_names()
    by_inst = {i.id: i for i in scene.instances}
    for fr in frames:
        hit = fr["face"] >= 0
        inst = scene.soup.instance[fr["face"][hit]]
        assert np.array_equal(fr["instance"][hit], inst)
        want = np.array([by_inst[i].label for i in range(len(scene.instances))])[inst]
        assert np.array_equal(fr["labels"][hit], want)
        assert (fr["labels"][~hit] == IGNORE_LABEL).all()
    for inst in scene.instances:  # classes come from the shipped mapping table
        if inst.catalog_id:
            assert inst.class_name == class_of_item(inst.name)
        expect = None if inst.class_name is None else names.index(inst.class_name)
        assert inst.label == (IGNORE_LABEL if expect is None else expect)
    assert [i.class_name for i in scene.instances if i.name.startswith("wall")] == ["wall"] * 4


def test_ground_truth_on_surfaces_with_labels(tiny_dataset, clean_frames):
    out, meta = tiny_dataset
    scene = clean_frames[0]
    gt = load_ground_truth(out)
    assert gt.xyz.dtype == np.float32 and gt.labels.dtype == np.uint16 and gt.class_names == class_names()
    assert len(gt.xyz) == meta["ground_truth_points"] and 0.2 < gt.observed.mean() < 1.0
    assert np.array_equal(gt.labels, scene.instance_labels()[gt.instance])
    rng = np.random.default_rng(0)
    idx = rng.choice(len(gt.xyz), 300, replace=False)
    # each sampled point lies on a triangle of its own instance
    for i in idx[:40]:
        tris = scene.soup.tris[scene.soup.instance == gt.instance[i]]
        assert _point_triangle_distance(np.repeat(gt.xyz[i:i + 1].astype(np.float64), len(tris), 0), tris).min() < 1e-4
    room = np.array([scene.width, scene.depth, scene.height])
    inside = np.all((gt.xyz >= -1e-3) & (gt.xyz <= room + 1e-3), 1)
    assert np.allclose(gt.xyz[inside].min(0), 0, atol=1e-3) and np.allclose(gt.xyz[inside].max(0), room, atol=1e-3)
    # only doors/windows (set into the zero-thickness walls) reach outside; "observed" (a depth test with
    # a 2 cm + 1 % tolerance) can only include the few cm just behind the wall surface
    outside_classes = {gt.class_names[c] for c in np.unique(gt.labels[~inside])}
    assert outside_classes <= {"door", "window"}
    beyond = np.maximum(np.maximum(-gt.xyz, gt.xyz - room), 0).max(1)
    assert beyond[gt.observed].max() < 0.06
    present = {gt.class_names[c] for c in np.unique(gt.labels[gt.observed]) if c != IGNORE_LABEL}
    assert present == set(meta["classes_present"])


def test_load_sequence_topics_and_errors(tiny_dataset, tmp_path):
    out, meta = tiny_dataset
    frames = list(load_sequence(out / "bag_sqlite3"))
    assert len(frames) == meta["frames"]
    f = frames[0]
    assert f.rgb.shape == (120, 160, 3) and f.depth.dtype == np.float32 and f.labels.dtype == np.uint16
    assert f.cam.width == 160 and np.isclose(f.stamp, meta["stamps_ns"][0] * 1e-9)
    # pose from /tf when the PoseStamped topic is not used
    via_tf = list(load_sequence(out, topics={"pose": "/not/recorded"}))
    assert np.allclose(via_tf[3].T_world_cam, frames[3].T_world_cam, atol=1e-9)
    no_labels = next(load_sequence(out, topics={"labels": "/none"}))
    assert no_labels.labels is None
    with pytest.raises(ValueError, match="not in bag"):
        next(load_sequence(out, topics={"depth": "/camera/aligned_depth"}))
    with pytest.raises(ValueError, match="does not exist"):
        next(load_sequence(tmp_path / "missing"))
    with pytest.raises(ValueError, match="ground truth not found"):
        load_ground_truth(tmp_path)


def test_cli_rejects_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["--size", "huge"])


def test_catalog_parsing_real_sizes_and_class_map():
    from geopurify_ros.data.furniture import find_item, load_catalogs, load_item_parts, parse_properties

    assert parse_properties("a#1=x\\u00e9\n# c\nb#1 = 2,\\\n 3\n") == {"a#1": "xé", "b#1": "2,3"}
    items = load_catalogs()
    assert len(items) > 500 and {"BlendSwap-CC-0", "Scopia"} <= {i.library for i in items}
    it = find_item("Blend Swap CC-0#bookcase")
    assert (it.name, it.width, it.depth, it.height) == ("Bookcase", 0.919, 0.365, 1.472)
    v = np.concatenate([p.vertices for p in load_item_parts(it)])
    # Sweet Home 3D normalisation: bbox = catalog size (m), x = width, y = depth, z = height, base on the floor
    assert np.allclose(v.max(0) - v.min(0), [0.919, 0.365, 1.472], atol=1e-6)
    assert np.allclose(v.min(0)[2], 0) and np.allclose((v.max(0) + v.min(0))[:2], 0)
    assert any(p.texture is not None and p.uv is not None for p in load_item_parts(it))
    cases = {"Oak chair": "chair", "Corner sofa": "sofa", "Bookcase": "bookshelf", "Wardrobe": "cabinet",
             "Bedside table": "otherfurniture", "Coffee table": "table", "Desk": "desk", "Desk lamp": None,
             "Double-hung window": "window", "Exterior door": "door", "Bed": "bed", "Cupboard": "cabinet"}
    assert {n: class_of_item(n) for n in cases} == cases


def test_opening_wider_than_its_wall_is_centred():
    from geopurify_ros.data.scene import _along_wall, build_scene

    rng = np.random.default_rng(0)
    assert all(1.0 <= _along_wall(rng, 4.0, 1.2, 0.4) <= 3.0 for _ in range(50))
    assert _along_wall(rng, 2.0, 1.6, 0.4) == 1.0          # does not fit with its margins: centred, no crash
    # training room 1312 draws a window wider than its wall allows (raised ValueError before)
    scene = build_scene(1312, "train")
    assert any(i.class_name == "window" for i in scene.instances)


def test_training_rooms_vary_the_curtain_and_evaluation_rooms_never_see_the_training_only_fabric():
    """`train` rooms draw their curtain from (curtain, shower_curtain); the shower curtain is a training-only
    model (one model: nothing held out), and the roles listed before it keep their seeded split."""
    from geopurify_ros.data.catalog import ROLES, split_models
    from geopurify_ros.data.scene import build_scene

    assert list(ROLES)[-1] == "shower_curtain"          # appended last: earlier roles' split draws unchanged
    split = split_models()
    assert [i.name for i in split["shower_curtain"]["train"]] == ["Shower curtain"]
    assert not split["shower_curtain"]["heldout"]
    assert [i.name for i in split["curtain"]["heldout"]] == ["Curtain"]

    def curtains(seed, preset, models=None):
        return [i.name for i in build_scene(seed, preset, models=models).instances
                if i.class_name in ("curtain", "shower curtain")]

    seen = {n for s in range(1000, 1002) for n in curtains(s, "train")}
    assert seen == {"Window blind", "Shower curtain"}
    assert curtains(3, "demo") == ["Curtain"]
    assert curtains(3, "train") == ["Curtain"]           # evaluation seeds: held-out models, no training-only fabric


def test_default_catalogue_adds_training_only_models(tmp_path, monkeypatch):
    """`train_extra` = training split + the application jar's default catalogue: more models per role, never held
    out, never in evaluation rooms (whose split does not depend on it); a missing jar is a clear error; a zip with
    no catalogue is refused."""
    import zipfile

    from geopurify_ros.data import furniture
    from geopurify_ros.data.catalog import models_of, split_models, split_table
    from geopurify_ros.data.scene import build_scene

    bad = tmp_path / "empty.jar"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("README", "no catalogue")
    with pytest.raises(ValueError, match="no furniture catalogue"):
        furniture.read_catalog(bad)
    if furniture.app_catalog_jar() is None:
        pytest.skip("Sweet Home 3D's jar is not unpacked (scripts/setup.sh)")
    app = furniture.app_catalog()
    assert len(app) >= 90 and {i.library for i in app} == {"sweethome3d"}
    extra = [i.name for i in models_of("curtain", "train_extra")]
    assert extra[:1] == ["Window blind"] and "Curtains" in extra
    assert {"Bookcase", "Filled bookcase"} <= {i.name for i in models_of("bookshelf", "train_extra")
                                                if i.library == "sweethome3d"}
    assert all(i.library != "sweethome3d" for r in split_models().values() for k in ("train", "heldout") for i in r[k])
    table = split_table(extra=True)["roles"]["curtain"]
    assert "sweethome3d#eTeks#curtains (Curtains)" in table["train_extra_only"]
    assert {k: v for k, v in table.items() if k != "train_extra_only"} == split_table()["roles"]["curtain"]
    libraries = {i.library for s in (1000, 1001, 1002) for i in build_scene(s, "train", models="train_extra").instances}
    assert "sweethome3d" in libraries
    assert all(i.library != "sweethome3d" for s in (0, 3) for i in build_scene(s, "demo").instances)
    furniture.app_catalog.cache_clear()
    monkeypatch.setenv("GEOPURIFY_SH3D_JAR", str(tmp_path / "none.jar"))
    monkeypatch.setattr(furniture, "APP_JAR_PATHS", ())
    monkeypatch.setenv("GEOPURIFY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="setup.sh"):
        furniture.app_catalog()
    furniture.app_catalog.cache_clear()
