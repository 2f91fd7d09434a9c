"""`geopurify-train`: stage 1 teacher self-supervision, stage 2 affinity distillation into the student.

No labels are read anywhere: training scenes are coloured point clouds (procedural rooms, and/or RGB-D
frames of demo recordings back-projected and merged).

Stage 1 (PointContrast-style): two augmented views of the same crop (rotation about z + tilt, scaling,
jitter, colour jitter, independent crops, re-voxelisation with a random grid phase); InfoNCE between the
teacher embeddings of corresponding voxels (same source points), negatives closer than
`neg_exclusion` metres to the positive are masked out so the teacher is not pushed to separate a surface
from itself.
Stage 2: for anchor voxels, candidates = 26-ring ∪ 16 samples of the 5x5x5 ring ∪ 16 random voxels;
loss = KL(softmax(t/τ) || softmax(s/τ)) + λ·MSE(s, t) on the cosine affinities s (student) and t (teacher).
The MSE term pins absolute cosines, which the pooling threshold (`affinity_threshold`) relies on.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .geometry import VoxelGrid, voxel_means
from .scenes import room_points
from .student import DEFAULT_CHECKPOINT, StudentAffinityNet, StudentConfig
from .teacher import SSLTeacher, TeacherConfig, make_teacher


@dataclass
class TrainConfig:
    out: str = str(DEFAULT_CHECKPOINT.parent)
    data: list = field(default_factory=list)      # demo recording dirs (RGB-D frames); [] = procedural only
    procedural: int = 8                            # procedural rooms (seeds 1000 + i)
    seed: int = 0
    voxel_size: float = 0.05
    crop: float = 0.9                              # half-size (m) of the square xy crop per view
    teacher: str = "ssl"                           # ssl | sonata
    teacher_checkpoint: str = ""                   # skip stage 1 and load this teacher (v1 or multi-scale v2)
    feature_backend: str = ""                      # "" = geometry-only student; conse | open_clip | ...: fuse
                                                   # the --data recordings with it and condition the student
    feature_model: str = ""
    feature_pretrained: str = ""                   # open_clip weights (the user's own)
    params: str = "config/mapping.yaml"            # node params used for fusion (keyframe gate, depth range...)
    teacher_steps: int = 120
    student_steps: int = 250
    lr: float = 2e-3
    nce_pairs: int = 1024
    nce_temperature: float = 0.1
    neg_exclusion: float = 0.15
    anchors: int = 4096
    neg_random: int = 48                           # stage 2 negatives per anchor: random voxels of the crop
                                                   # (shared by the step's anchors)
    neg_near: int = 15                             #   + spatially near ones (radius-2 cube): hard negatives
    nce_distill_temperature: float = 0.07
    mse_weight: float = 1.0
    threads: int = 1                              # 2 shared cores: 1 thread is faster than 2 under load
    max_frames: int = 120                          # per demo recording


# ------------------------------------------------------------------------------------------------ data
def demo_points(path: str, max_frames: int = 120, stride: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Merge back-projected RGB-D frames of a recording into one coloured cloud (no labels read)."""
    from ..camera import backproject
    from ..data.sequence import load_sequence

    pts, cols = [], []
    for i, fr in enumerate(load_sequence(path)):
        if i >= max_frames:
            break
        depth = torch.as_tensor(np.asarray(fr.depth, np.float32))
        p, pix, _ = backproject(depth, fr.cam, np.asarray(fr.T_world_cam), stride=stride)
        rgb = np.asarray(fr.rgb)
        pts.append(p.numpy())
        cols.append(rgb[pix[:, 0].numpy(), pix[:, 1].numpy()])
    if not pts:
        raise ValueError(f"data: no frames in {path}")
    p, c = np.concatenate(pts).astype(np.float64), np.concatenate(cols)
    # thin to ~2 cm so every recording weighs about the same
    key = np.floor(p / 0.02).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    return p[first], c[first]


def load_training_clouds(cfg: TrainConfig) -> list[tuple[np.ndarray, np.ndarray, str]]:
    clouds = []
    for d in cfg.data:
        p, c = demo_points(d, cfg.max_frames)
        meta_path = Path(d) / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        clouds.append((p, c, f"demo:{d} (geopurify-make-demo --size {meta.get('size', '?')} --seed "
                             f"{meta.get('seed', '?')}; {p.shape[0]} points, RGB-D only, labels unused)"))
    for i in range(cfg.procedural):
        p, c = room_points(1000 + i)
        clouds.append((p, c, f"procedural:room_points(seed={1000 + i})"))
    if not clouds:
        raise ValueError("data: no training scenes (give --data DIR or --procedural N > 0)")
    return clouds


# ------------------------------------------------------------------------------------------------ views
@dataclass
class View:
    xyz: torch.Tensor         # (V,3) voxel means in the augmented frame
    colors: torch.Tensor      # (V,3) float [0,1]
    orig: torch.Tensor        # (V,3) voxel means in the original frame (for negative exclusion)
    voxel_of: np.ndarray      # (M,) voxel index of every source point, -1 if cropped away


def _rotation(rng: np.random.Generator, tilt_deg: float = 5.0) -> np.ndarray:
    a = rng.uniform(0, 2 * np.pi)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tx, ty = np.deg2rad(rng.uniform(-tilt_deg, tilt_deg, 2))
    rx = np.array([[1, 0, 0], [0, np.cos(tx), -np.sin(tx)], [0, np.sin(tx), np.cos(tx)]])
    ry = np.array([[np.cos(ty), 0, np.sin(ty)], [0, 1, 0], [-np.sin(ty), 0, np.cos(ty)]])
    return rz @ rx @ ry


def make_view(points: np.ndarray, colors: np.ndarray, centre: np.ndarray, half: float, voxel_size: float,
              rng: np.random.Generator, augment: bool = True) -> View:
    """Crop (jittered square around `centre`), augment, re-voxelise with a random grid phase."""
    h = half * (rng.uniform(0.8, 1.2) if augment else 1.0)
    c = centre + (rng.uniform(-0.25, 0.25, 2) * half if augment else 0)
    keep = np.nonzero((np.abs(points[:, :2] - c) < h).all(1))[0]
    p0 = points[keep]
    col = colors[keep].astype(np.float64) / 255.0
    if augment:
        R = _rotation(rng)
        p = (p0 - p0.mean(0)) @ R.T * rng.uniform(0.9, 1.1) + rng.normal(0, 0.003, p0.shape)
        col = (col - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.uniform(-0.08, 0.08) + rng.normal(0, 0.03, 3)
        col = np.clip(col + rng.normal(0, 0.01, col.shape), 0, 1)
    else:
        p = p0 - p0.mean(0)
    p = p + rng.uniform(0, voxel_size, 3)
    ijk = np.floor(p / voxel_size).astype(np.int64)
    _, inv, cnt = np.unique(ijk, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)

    def mean(x):
        return torch.from_numpy(voxel_means(x, inv, cnt).astype(np.float32))

    voxel_of = np.full(points.shape[0], -1, np.int64)
    voxel_of[keep] = inv
    return View(mean(p), mean(col), mean(p0), voxel_of)


def _crop_centre(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return points[rng.integers(points.shape[0]), :2]


# ------------------------------------------------------------------------------------------------ losses
def info_nce(za: torch.Tensor, zb: torch.Tensor, pos_a: torch.Tensor, temperature: float,
             exclusion: float) -> torch.Tensor:
    """Symmetric InfoNCE over matched rows; negatives within `exclusion` m of the anchor are masked."""
    logits = za @ zb.T / temperature
    near = torch.cdist(pos_a, pos_a) < exclusion
    near.fill_diagonal_(False)
    logits = logits.masked_fill(near, float("-inf"))
    target = torch.arange(za.shape[0])
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.T, target))


# ------------------------------------------------------------------------------------------------ stages
def train_teacher(cfg: TrainConfig, clouds, log: list) -> SSLTeacher:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = SSLTeacher(TeacherConfig(voxel_size=cfg.voxel_size))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(cfg.teacher_steps, 1), pct_start=0.1)
    bar = tqdm(range(cfg.teacher_steps), desc="stage 1 teacher SSL", file=sys.stderr, mininterval=5)
    for step in bar:
        pts, cols, _ = clouds[step % len(clouds)]
        centre = _crop_centre(pts, rng)
        va = make_view(pts, cols, centre, cfg.crop, cfg.voxel_size, rng)
        vb = make_view(pts, cols, centre, cfg.crop, cfg.voxel_size, rng)
        both = np.nonzero((va.voxel_of >= 0) & (vb.voxel_of >= 0))[0]
        if both.size < 64:
            continue
        sel = rng.choice(both, size=min(cfg.nce_pairs * 4, both.size), replace=False)
        a_idx, first = np.unique(va.voxel_of[sel], return_index=True)   # one pair per voxel of view A
        b_idx = vb.voxel_of[sel][first]
        if a_idx.size > cfg.nce_pairs:
            k = rng.choice(a_idx.size, cfg.nce_pairs, replace=False)
            a_idx, b_idx = a_idx[k], b_idx[k]
        za = net(va.xyz, va.colors)[torch.from_numpy(a_idx)]
        zb = net(vb.xyz, vb.colors)[torch.from_numpy(b_idx)]
        loss = info_nce(za, zb, va.orig[torch.from_numpy(a_idx)], cfg.nce_temperature, cfg.neg_exclusion)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            acc = float(((za @ zb.T).argmax(1) == torch.arange(za.shape[0])).float().mean())
        log.append({"stage": "teacher", "step": step, "loss": float(loss), "top1": acc})
        bar.set_postfix(loss=f"{float(loss):.3f}", top1=f"{acc:.2f}")
    return net.eval()


@dataclass
class DistillScene:
    """One stage-2 scene: a voxelised map with (optionally) its fused features and the teacher's embeddings."""
    xyz: torch.Tensor                 # (N,3) voxel positions
    colors: torch.Tensor              # (N,3) uint8 or [0,1]
    features: torch.Tensor | None     # (N,D) fused VLM features (feature-conditioned students) or None
    teacher: torch.Tensor             # (N,T) unit teacher embeddings (frozen, computed once)
    name: str = ""


def near_negatives(grid: VoxelGrid, anchors: torch.Tensor, k: int, radius: int, gen: torch.Generator,
                   n: int) -> torch.Tensor:
    """(A,k) hard negatives: random voxels of each anchor's radius-`radius` cube (spatially near), topped up
    with random voxels of the scene where the cube has fewer than k occupied cells."""
    cube = grid.neighbours(anchors, radius)
    score = torch.rand(cube.shape, generator=gen).masked_fill(cube < 0, -1.0)
    top, idx = score.topk(k, dim=1)
    pick = torch.gather(cube, 1, idx)
    fill = torch.randint(0, n, pick.shape, generator=gen)
    return torch.where(top >= 0, pick, fill)


def distill_info_nce(s_proj: torch.Tensor, t_emb: torch.Tensor, anchors: torch.Tensor, near: torch.Tensor,
                     random: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """InfoNCE of the student's projected embedding of each anchor against the frozen teacher embeddings:
    positive = the anchor's own teacher embedding; negatives = the teacher embeddings of its spatially near
    voxels `near` (A,K) and of `random` (R,) voxels shared by all anchors of the step (in-batch negatives:
    one (A,R) product instead of an (A,R,T) gather). Returns (loss, top-1 accuracy)."""
    q = s_proj[anchors]                                                   # (A,T)
    pos = (q * t_emb[anchors]).sum(-1, keepdim=True)
    hard = torch.einsum("at,akt->ak", q, t_emb[near])
    rand = q @ t_emb[random].T
    logits = torch.cat([pos, hard, rand], 1) / temperature
    same = torch.cat([near == anchors[:, None], random[None, :] == anchors[:, None]], 1)   # the anchor itself
    logits[:, 1:] = logits[:, 1:].masked_fill(same, float("-inf"))
    target = torch.zeros(anchors.numel(), dtype=torch.long)
    acc = float((logits.detach().argmax(1) == 0).float().mean())
    return torch.nn.functional.cross_entropy(logits, target), acc


def crop_scene(sc: DistillScene, half: float, rng: np.random.Generator, min_voxels: int = 256) -> torch.Tensor:
    """Indices of the voxels of a random square xy crop (full height) of a scene."""
    xyz = sc.xyz
    for _ in range(10):
        c = xyz[int(rng.integers(xyz.shape[0])), :2]
        idx = ((xyz[:, :2] - c).abs() < half).all(1).nonzero().squeeze(1)
        if idx.numel() >= min_voxels:
            return idx
    return torch.arange(xyz.shape[0])


def train_student(cfg: TrainConfig, scenes: list[DistillScene], log: list, feature_dim: int = 0,
                  backend: str = "", feature_weights: str = "") -> StudentAffinityNet:
    """Stage 2: InfoNCE distillation of the teacher into the student (+ an affinity-calibration term).

    Per step: a crop of one scene; `anchors` anchor voxels; negatives = `neg_random` random voxels of the crop
    + `neg_near` spatially near ones (radius-2 cube); the student's embedding, through a training-only linear
    head into the teacher's space, must pick its own voxel's teacher embedding (τ = `nce_distill_temperature`).
    The calibration term (MSE between student and teacher cosines on the 26-ring, weight `mse_weight`) keeps
    absolute affinities comparable to the teacher's, which the pooling threshold and temperature rely on.
    """
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    net = StudentAffinityNet(StudentConfig(voxel_size=cfg.voxel_size, feature_dim=feature_dim, backend=backend,
                                           feature_weights=feature_weights))
    t_dim = scenes[0].teacher.shape[1]
    head = torch.nn.Linear(net.embed_dim, t_dim)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(cfg.student_steps, 1), pct_start=0.1)
    bar = tqdm(range(cfg.student_steps), desc="stage 2 distillation", file=sys.stderr, mininterval=5)
    for step in bar:
        sc = scenes[step % len(scenes)]
        idx = crop_scene(sc, cfg.crop, rng)
        xyz, t_emb = sc.xyz[idx].float(), sc.teacher[idx]
        n = xyz.shape[0]
        grid = VoxelGrid(xyz, cfg.voxel_size)
        nb = grid.neighbours()
        feats = sc.features[idx] if feature_dim else None
        s_emb = net(xyz, sc.colors[idx], nb, features=feats)
        s_proj = torch.nn.functional.normalize(head(s_emb), dim=1)
        anchors = torch.randperm(n, generator=gen)[:cfg.anchors]
        near = near_negatives(grid, anchors, cfg.neg_near, 2, gen, n)
        rand = torch.randint(0, n, (cfg.neg_random,), generator=gen)
        nce, acc = distill_info_nce(s_proj, t_emb, anchors, near, rand, cfg.nce_distill_temperature)
        ring = nb[anchors]
        valid = ring >= 0
        rc = ring.clamp(min=0)
        t = (t_emb[anchors, None, :] * t_emb[rc]).sum(-1)
        s_ = (s_emb[anchors, None, :] * s_emb[rc]).sum(-1)
        mse = ((s_ - t) ** 2 * valid).sum() / valid.sum().clamp(min=1)
        loss = nce + cfg.mse_weight * mse
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append({"stage": "student", "step": step, "loss": loss.item(), "nce": nce.item(), "top1": acc,
                    "mse": mse.item()})
        bar.set_postfix(nce=f"{log[-1]['nce']:.3f}", top1=f"{acc:.2f}", mse=f"{log[-1]['mse']:.3f}")
    return net.eval()


def _summary(log: list, stage: str) -> dict:
    rows = [r for r in log if r["stage"] == stage]
    if not rows:
        return {}
    k = max(len(rows) // 10, 1)
    curve = [round(float(np.mean([r["loss"] for r in rows[i:i + k]])), 4) for i in range(0, len(rows), k)]
    last = rows[-k:]
    out = {"steps": len(rows), "loss_curve_deciles": curve}
    for key in rows[0]:
        if key not in ("stage", "step"):
            out[f"final_{key}"] = round(float(np.mean([r[key] for r in last])), 4)
    return out


def fuse_recordings(cfg: TrainConfig, out: Path) -> tuple[list[tuple[object, str]], str]:
    """Fuse every --data recording with the configured feature backend (what the node would map; cached in
    <out>/fused/); returns ([(VoxelMap, description)], the backend's `weights_digest()`). Labels are never read."""
    from ..config import PipelineConfig, load_ros_params
    from ..eval.ablation import fuse_recording, fused_map_path, fusion_fingerprint
    from ..pipeline import MappingPipeline
    from ..voxel_map import VoxelMap
    from .student import ConstantEmbedding

    params = load_ros_params(cfg.params) if cfg.params and Path(cfg.params).is_file() else {}
    params.update({"feature_backend": cfg.feature_backend, "voxel_size": cfg.voxel_size})
    if cfg.feature_model:
        params["feature_model"] = cfg.feature_model
    if cfg.feature_pretrained:
        params["feature_pretrained"] = cfg.feature_pretrained
    pipe = MappingPipeline(PipelineConfig.from_dict(params), student=ConstantEmbedding())
    fingerprint = fusion_fingerprint(pipe, params)
    maps = []
    for k, d in enumerate(cfg.data):
        meta = Path(d) / "meta.json"
        if meta.is_file():                                   # a demo recording: the ablation tool's cache
            m = json.loads(meta.read_text())
            path = fused_map_path(pipe.backend, fingerprint, int(m["seed"]), m["size"])
        else:
            path = out / "fused" / f"{pipe.backend.name}_{k}_{Path(d).name}_{fingerprint}.pt"
        if not path.is_file():
            pipe.reset()
            path.parent.mkdir(parents=True, exist_ok=True)
            fuse_recording(Path(d), pipe, params).save(path)
        vm = VoxelMap.load(path)
        maps.append((vm, f"fused:{d} ({pipe.backend.name}, D={pipe.backend.dim}, {len(vm)} voxels, labels unused)"))
    return maps, pipe.backend.weights_digest()


def distill_scenes(cfg: TrainConfig, teacher, out: Path, clouds_fn) -> tuple[list[DistillScene], int, str, str]:
    """Stage-2 scenes with teacher embeddings: fused maps of the recordings (feature-conditioned student) or
    voxelised training clouds (geometry-only student). Returns (scenes, D, backend, its weights digest)."""
    scenes = []
    if cfg.feature_backend:
        maps, digest = fuse_recordings(cfg, out)
        if not maps:
            raise ValueError("data: a feature-conditioned student needs recordings (--data DIR)")
        for vm, name in maps:
            with torch.no_grad():
                t = teacher.embed(vm.xyz.float(), vm.colors)
            scenes.append(DistillScene(vm.xyz.float(), vm.colors, vm.features, t, name))
        return scenes, int(maps[0][0].features.shape[1]), cfg.feature_backend, digest
    rng = np.random.default_rng(cfg.seed)
    for p, c, name in clouds_fn():
        v = make_view(p, c, p[:, :2].mean(0), 1e9, cfg.voxel_size, rng, augment=False)
        with torch.no_grad():
            t = teacher.embed(v.xyz, v.colors)
        scenes.append(DistillScene(v.xyz, v.colors, None, t, name))
    return scenes, 0, "", ""


def run(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    from .teacher import load_teacher

    torch.set_num_threads(max(1, cfg.threads))
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache: dict = {}

    def clouds_fn():
        if "clouds" not in cache:
            cache["clouds"] = load_training_clouds(cfg)
        return cache["clouds"]

    log: list = []
    if cfg.teacher != "ssl":
        teacher = make_teacher(cfg.teacher, cfg.teacher_checkpoint or None)
        teacher_desc = f"{cfg.teacher} from {cfg.teacher_checkpoint}"
    elif cfg.teacher_checkpoint:
        teacher = load_teacher(cfg.teacher_checkpoint)
        teacher_desc = f"{type(teacher).__name__} from {cfg.teacher_checkpoint}"
    else:
        teacher = train_teacher(cfg, clouds_fn(), log)
        teacher.save(out / "teacher.pt", {"config": asdict(cfg)})
        teacher_desc = "SSLTeacher trained here (stage 1), saved as teacher.pt"
    t1 = time.time()
    scenes, dim, backend, digest = distill_scenes(cfg, teacher, out, clouds_fn)
    student = train_student(cfg, scenes, log, dim, backend, digest)
    t2 = time.time()
    record = {
        "command": "geopurify-train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": asdict(cfg),
        "data": [sc.name for sc in scenes],
        "labels_used": False,
        "teacher": teacher_desc,
        "student": asdict(student.config),
        "feature_backend": backend or None,
        "feature_dim": dim,
        "student_params": sum(p.numel() for p in student.parameters()),
        "time_s": {"teacher": round(t1 - t0, 1), "student": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
        "metrics": {"teacher": _summary(log, "teacher"), "student": _summary(log, "student")},
        "torch": torch.__version__,
    }
    name = f"student_{backend}" if backend else "student"
    student.save(out / f"{name}.pt", {k: record[k] for k in ("command", "data", "teacher", "time_s")})
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in log))
    return record


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    ap = argparse.ArgumentParser(prog="geopurify-train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=d.out, help="output dir for student.pt / student.json / teacher.pt")
    ap.add_argument("--data", action="append", default=[], help="demo recording dir (repeatable); labels are never read")
    ap.add_argument("--procedural", type=int, default=d.procedural, help="number of procedural rooms")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--teacher", default=d.teacher, choices=["ssl", "sonata"])
    ap.add_argument("--teacher-checkpoint", default="", help="pretrained teacher (skips stage 1)")
    ap.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    ap.add_argument("--student-steps", type=int, default=d.student_steps)
    ap.add_argument("--crop", type=float, default=d.crop)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--max-frames", type=int, default=d.max_frames)
    ap.add_argument("--feature-backend", default=d.feature_backend,
                    help="condition the student on this backend's fused features ('' = geometry-only student)")
    ap.add_argument("--feature-model", default=d.feature_model)
    ap.add_argument("--feature-pretrained", default=d.feature_pretrained, help="open_clip weights")
    ap.add_argument("--anchors", type=int, default=d.anchors)
    ap.add_argument("--params", default=d.params, help="node params file used to fuse the recordings")
    ap.add_argument("--mse-weight", type=float, default=d.mse_weight, help="weight of the affinity calibration term")
    a = ap.parse_args(argv)
    return TrainConfig(out=a.out, data=a.data, procedural=a.procedural, seed=a.seed, teacher=a.teacher,
                       teacher_checkpoint=a.teacher_checkpoint, teacher_steps=a.teacher_steps,
                       student_steps=a.student_steps, crop=a.crop, lr=a.lr, threads=a.threads,
                       max_frames=a.max_frames, feature_backend=a.feature_backend, feature_model=a.feature_model,
                       feature_pretrained=a.feature_pretrained, anchors=a.anchors, mse_weight=a.mse_weight,
                       params=a.params)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rec = run(cfg, argv)
    print(json.dumps({"out": cfg.out, "time_s": rec["time_s"], "metrics": rec["metrics"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
