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

from .geometry import VoxelGrid
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
    teacher_checkpoint: str = ""                   # skip stage 1 and load this teacher
    teacher_steps: int = 120
    student_steps: int = 250
    lr: float = 2e-3
    nce_pairs: int = 1024
    nce_temperature: float = 0.1
    neg_exclusion: float = 0.15
    anchors: int = 2048
    distill_temperature: float = 0.1
    mse_weight: float = 2.0
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
    m = cnt.shape[0]

    def mean(x):
        out = np.zeros((m, x.shape[1]))
        np.add.at(out, inv, x)
        return torch.from_numpy((out / cnt[:, None]).astype(np.float32))

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


def distill_loss(s: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, temperature: float,
                 mse_weight: float) -> tuple[torch.Tensor, dict]:
    """s, t: (B,C) student / teacher cosines to candidates, valid (B,C) bool."""
    neg = float("-inf")
    lp = torch.log_softmax((t / temperature).masked_fill(~valid, neg), 1)
    lq = torch.log_softmax((s / temperature).masked_fill(~valid, neg), 1)
    p = lp.exp()
    kl = (p * (lp - lq)).masked_fill(~valid, 0).sum(1).mean()
    mse = ((s - t) ** 2 * valid).sum() / valid.sum().clamp(min=1)
    agree = (((s >= 0.5) == (t >= 0.5)) & valid).sum() / valid.sum().clamp(min=1)
    return kl + mse_weight * mse, {"kl": kl.item(), "mse": mse.item(), "agree@0.5": agree.item()}


def _candidates(grid: VoxelGrid, anchors: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    ring1 = grid.neighbours(anchors, 1)
    ring2 = grid.neighbours(anchors, 2)
    pick = torch.randint(0, ring2.shape[1], (anchors.numel(), 16), generator=gen)
    far = torch.randint(0, n, (anchors.numel(), 16), generator=gen)
    return torch.cat([ring1, torch.gather(ring2, 1, pick), far], 1)


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


def train_student(cfg: TrainConfig, clouds, teacher, log: list) -> StudentAffinityNet:
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    net = StudentAffinityNet(StudentConfig(voxel_size=cfg.voxel_size))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=max(cfg.student_steps, 1), pct_start=0.1)
    bar = tqdm(range(cfg.student_steps), desc="stage 2 distillation", file=sys.stderr, mininterval=5)
    for step in bar:
        pts, cols, _ = clouds[step % len(clouds)]
        v = make_view(pts, cols, _crop_centre(pts, rng), cfg.crop, cfg.voxel_size, rng)
        n = v.xyz.shape[0]
        grid = VoxelGrid(v.xyz, cfg.voxel_size)
        nb = grid.neighbours()
        with torch.no_grad():
            t_emb = teacher.embed(v.xyz, v.colors)
        s_emb = net(v.xyz, v.colors, nb)
        anchors = torch.randperm(n, generator=gen)[:cfg.anchors]
        cand = _candidates(grid, anchors, n, gen)
        valid = (cand >= 0) & (cand != anchors[:, None])
        ci = cand.clamp(min=0)
        t = (t_emb[anchors, None, :] * t_emb[ci]).sum(-1)
        s = (s_emb[anchors, None, :] * s_emb[ci]).sum(-1)
        loss, parts = distill_loss(s, t, valid, cfg.distill_temperature, cfg.mse_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        log.append({"stage": "student", "step": step, "loss": float(loss), **parts})
        bar.set_postfix(loss=f"{float(loss):.3f}", agree=f"{parts['agree@0.5']:.2f}")
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


def run(cfg: TrainConfig, argv: list[str] | None = None) -> dict:
    torch.set_num_threads(max(1, cfg.threads))
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clouds = load_training_clouds(cfg)
    log: list = []
    if cfg.teacher_checkpoint or cfg.teacher != "ssl":
        teacher = make_teacher(cfg.teacher, cfg.teacher_checkpoint or None)
        teacher_desc = f"{cfg.teacher} from {cfg.teacher_checkpoint}"
    else:
        teacher = train_teacher(cfg, clouds, log)
        teacher.save(out / "teacher.pt", {"config": asdict(cfg)})
        teacher_desc = "SSLTeacher trained here (stage 1), saved as teacher.pt"
    t1 = time.time()
    student = train_student(cfg, clouds, teacher, log)
    t2 = time.time()
    record = {
        "command": "geopurify-train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": asdict(cfg),
        "data": [name for _, _, name in clouds],
        "labels_used": False,
        "teacher": teacher_desc,
        "student": asdict(student.config),
        "student_params": sum(p.numel() for p in student.parameters()),
        "time_s": {"teacher": round(t1 - t0, 1), "student": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
        "metrics": {"teacher": _summary(log, "teacher"), "student": _summary(log, "student")},
        "torch": torch.__version__,
    }
    student.save(out / "student.pt", {k: record[k] for k in ("command", "data", "teacher", "time_s")})
    (out / "student.json").write_text(json.dumps(record, indent=1))
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
    ap.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    ap.add_argument("--mse-weight", type=float, default=d.mse_weight)
    a = ap.parse_args(argv)
    return TrainConfig(out=a.out, data=a.data, procedural=a.procedural, seed=a.seed, teacher=a.teacher,
                       teacher_checkpoint=a.teacher_checkpoint, teacher_steps=a.teacher_steps,
                       student_steps=a.student_steps, crop=a.crop, lr=a.lr, threads=a.threads,
                       max_frames=a.max_frames, distill_temperature=a.distill_temperature,
                       mse_weight=a.mse_weight)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rec = run(cfg, argv)
    print(json.dumps({"out": cfg.out, "time_s": rec["time_s"], "metrics": rec["metrics"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
