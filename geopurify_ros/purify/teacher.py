"""3D self-supervised teachers: the interface, an external backbone adapter and the teacher trained here.

Teacher.embed(xyz (N,3), colors (N,3) uint8|[0,1], normals (N,3)|None) -> (N,E) L2-normalised, no grad.
Only the affinities (cosines) of teacher embeddings are used, to supervise the student.

`SSLTeacher` (shipped recipe, docs/GEOPURIFY.md): the student's EdgeConv blocks on two scales — 2 rounds on
the 5 cm voxel graph, pooled to a 3x coarser grid, 2 rounds there, unpooled and 2 more fine rounds — so
its receptive field (~0.5 m) is several times the student's (3 voxels). Trained by PointContrast-style
view-consistency InfoNCE in `train.py`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .geometry import VoxelGrid, colors_float, edge_list, normals_curvature
from .student import EdgeRound, N_POINT_FEATURES, edge_features, point_features

DEFAULT_TEACHER = Path(__file__).resolve().parent.parent / "models" / "teacher.pt"    # the shipped teacher


class Teacher(Protocol):
    embed_dim: int

    def embed(self, xyz: torch.Tensor, colors: torch.Tensor, normals: torch.Tensor | None = None) -> torch.Tensor:
        ...


@dataclass
class TeacherConfig:
    hidden: int = 48
    embed_dim: int = 64
    voxel_size: float = 0.05
    coarse_factor: int = 3


class SSLTeacher(nn.Module):
    """Two-scale EdgeConv network over the voxel graph (N,3) -> (N,E) unit embeddings."""

    def __init__(self, config: TeacherConfig | None = None):
        super().__init__()
        self.config = config or TeacherConfig()
        c = self.config.hidden
        self.stem = nn.Sequential(nn.Linear(N_POINT_FEATURES, c), nn.ReLU(), nn.Linear(c, c))
        self.fine1 = nn.ModuleList([EdgeRound(c), EdgeRound(c)])
        self.coarse = nn.ModuleList([EdgeRound(c), EdgeRound(c)])
        self.fuse = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c))
        self.fine2 = nn.ModuleList([EdgeRound(c), EdgeRound(c)])
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(c, self.config.embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, xyz: torch.Tensor, colors: torch.Tensor, neighbours: torch.Tensor | None = None,
                normals: torch.Tensor | None = None) -> torch.Tensor:
        vs = self.config.voxel_size
        xyz = xyz.float()
        if neighbours is None:
            neighbours = VoxelGrid(xyz, vs).neighbours()
        c01 = colors_float(colors)
        feats, normals = point_features(xyz, c01, neighbours, normals, None)
        src, dst = edge_list(neighbours)
        e = edge_features(xyz, normals, c01, src, dst, vs)
        h = self.stem(feats)
        for r in self.fine1:
            h = r(h, e, src, dst)
        # coarse level: scatter-mean into a 3x grid, EdgeConv there, broadcast back
        cvs = vs * self.config.coarse_factor
        ijk = torch.floor(xyz / cvs).long()
        uniq, parent = torch.unique(ijk, dim=0, return_inverse=True)
        m = uniq.shape[0]
        cnt = torch.zeros(m, device=xyz.device).index_add_(0, parent, torch.ones_like(parent, dtype=torch.float32))
        cxyz = torch.zeros(m, 3, device=xyz.device).index_add_(0, parent, xyz) / cnt[:, None]
        ccol = torch.zeros(m, 3, device=xyz.device).index_add_(0, parent, c01) / cnt[:, None]
        hc = torch.zeros(m, h.shape[1], device=xyz.device).index_add_(0, parent, h) / cnt[:, None]
        cnb = VoxelGrid((uniq.float() + 0.5) * cvs, cvs).neighbours()
        cn, _ = normals_curvature(cxyz, cnb)
        csrc, cdst = edge_list(cnb)
        ce = edge_features(cxyz, cn, ccol, csrc, cdst, cvs)
        for r in self.coarse:
            hc = r(hc, ce, csrc, cdst)
        h = h + self.fuse(torch.cat([h, hc[parent]], 1))
        for r in self.fine2:
            h = r(h, e, src, dst)
        return nn.functional.normalize(self.head(h), dim=1)

    @torch.no_grad()
    def embed(self, xyz, colors, normals=None):
        return self.forward(xyz, colors, None, normals)

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        torch.save({"format": "geopurify-teacher-v1", "config": dataclasses.asdict(self.config),
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                    "meta": meta or {}}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "SSLTeacher":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"teacher checkpoint: {p} does not exist")
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != "geopurify-teacher-v1":
            raise ValueError(f"teacher checkpoint: {p} is not a geopurify teacher checkpoint")
        net = cls(TeacherConfig(**ckpt["config"]))
        net.load_state_dict(ckpt["state_dict"])
        return net.eval()


class ExternalTeacher:
    """Adapter for a pretrained 3D SSL backbone (Sonata / PTv3) from the `sonata` or `pointcept` package.

    Only constructed when asked for (`geopurify-train --teacher sonata --teacher-checkpoint PATH`);
    raises ImportError / FileNotFoundError with the reason when the package or the weights are absent
    (neither is installable offline on the build machines, so the shipped student uses `SSLTeacher`).
    """

    def __init__(self, name: str = "sonata", checkpoint: str | Path | None = None, device: str = "cpu",
                 grid_size: float = 0.02):
        if not checkpoint:
            raise ValueError(f"teacher_checkpoint: a checkpoint path is required for the external teacher '{name}'")
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"teacher_checkpoint: {checkpoint} does not exist")
        try:
            if name == "sonata":
                import sonata  # type: ignore
                self._pkg = sonata
                self.model = sonata.load(str(checkpoint)).to(device).eval()
                self.transform = sonata.transform.default()
            else:
                raise ValueError(f"teacher: unknown external teacher '{name}' (supported: sonata)")
        except ImportError as exc:
            raise ImportError(f"teacher: the '{name}' package is not importable ({exc}); "
                              f"install it (and its spconv/flash-attn deps) or use --teacher ssl") from exc
        self.device = device
        self.grid_size = grid_size
        self.embed_dim = None

    @torch.no_grad()
    def embed(self, xyz, colors, normals=None):
        import numpy as np
        point = {"coord": xyz.cpu().numpy().astype(np.float32),
                 "color": (colors_float(colors).cpu().numpy() * 255).astype(np.float32),
                 "normal": (normals if normals is not None else torch.zeros_like(xyz)).cpu().numpy()}
        point = self.transform(point)
        for k, v in point.items():
            if torch.is_tensor(v):
                point[k] = v.to(self.device)
        out = self.model(point)
        # unpool the hierarchy back to the input resolution (Sonata's documented recipe)
        while "pooling_parent" in out.keys():
            parent = out.pop("pooling_parent")
            inverse = out.pop("pooling_inverse")
            parent.feat = torch.cat([parent.feat, out.feat[inverse]], dim=-1)
            out = parent
        feat = out.feat[point["inverse"]] if "inverse" in point else out.feat
        self.embed_dim = feat.shape[1]
        return nn.functional.normalize(feat.float(), dim=1).to(xyz.device)


def make_teacher(kind: str = "ssl", checkpoint: str | Path | None = None, device: str = "cpu"):
    """'ssl' -> SSLTeacher (from checkpoint if given, else untrained), 'sonata' -> ExternalTeacher."""
    if kind == "ssl":
        return SSLTeacher.load(checkpoint) if checkpoint else SSLTeacher()
    return ExternalTeacher(kind, checkpoint, device)


# ------------------------------------------------------------------------------------------------ v2
@dataclass
class MultiScaleTeacherConfig:
    voxel_size: float = 0.05
    factors: tuple = (3, 3)          # each coarser level: this many times the previous voxel size
    widths: tuple = (32, 64, 96)     # channels per level (fine first)
    coarse_rounds: int = 2           # EdgeConv rounds per coarse level
    embed_dim: int = 64
    gravity: bool = True             # also read |n_z| and height above the cloud's floor (training clouds are z-up)


class _Level:
    """Voxel graph of one coarse level: parent index of each finer voxel, positions, colours, edges."""

    def __init__(self, xyz, c01, size):
        ijk = torch.floor(xyz / size).long()
        uniq, self.parent = torch.unique(ijk, dim=0, return_inverse=True)
        m = uniq.shape[0]
        self.m = m
        self.cnt = torch.zeros(m).index_add_(0, self.parent, torch.ones(xyz.shape[0]))
        self.xyz = self.mean(xyz)
        self.c01 = self.mean(c01)
        nb = VoxelGrid.from_ijk(uniq, size).neighbours()
        self.src, self.dst = edge_list(nb)
        self.normals, _ = normals_curvature(self.xyz, nb, edges=(self.src, self.dst))
        self.edges = edge_features(self.xyz, self.normals, self.c01, self.src, self.dst, size)

    def mean(self, x):
        return torch.zeros(self.m, x.shape[1], dtype=x.dtype).index_add_(0, self.parent, x) / self.cnt[:, None]


class MultiScaleTeacher(nn.Module):
    """U-Net of EdgeConv levels (5 / 15 / 45 cm by default, receptive field ~2 m) -> fine and per-level embeddings.

    `forward` returns the list [fine (N,E), level-1 (M1,E), level-2 (M2,E), ...] of unit embeddings plus the
    coarse-level parent indices, so training can contrast every scale (multi-scale PointContrast / MSC);
    `embed` concatenates, for every fine voxel, the embeddings of all levels it belongs to (Sonata's
    hierarchical unpooling), so affinities and the linear probe see fine detail and ~2 m context at once.
    """

    def __init__(self, config: MultiScaleTeacherConfig | None = None):
        super().__init__()
        self.config = cfg = config or MultiScaleTeacherConfig()
        w = cfg.widths
        if len(w) != len(cfg.factors) + 1:
            raise ValueError("widths: need one entry per level (len(factors) + 1)")
        n_in = N_POINT_FEATURES + (2 if cfg.gravity else 0)
        self.stem = nn.Sequential(nn.Linear(n_in, w[0]), nn.ReLU(), nn.Linear(w[0], w[0]))
        self.fine_in = EdgeRound(w[0])
        self.down = nn.ModuleList(nn.Linear(w[i] + 6, w[i + 1]) for i in range(len(cfg.factors)))
        self.coarse = nn.ModuleList(nn.ModuleList(EdgeRound(w[i + 1]) for _ in range(cfg.coarse_rounds))
                                    for i in range(len(cfg.factors)))
        self.up = nn.ModuleList(nn.Sequential(nn.Linear(w[i] + w[i + 1], w[i]), nn.ReLU(), nn.Linear(w[i], w[i]))
                                for i in range(len(cfg.factors)))
        self.fine_out = EdgeRound(w[0])
        self.heads = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(w[i], cfg.embed_dim)) for i in range(len(w)))

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def forward(self, xyz: torch.Tensor, colors: torch.Tensor, floor_z: float | None = None):
        cfg = self.config
        vs = cfg.voxel_size
        xyz = xyz.float()
        c01 = colors_float(colors)
        nb = VoxelGrid(xyz, vs).neighbours()
        src, dst = edge_list(nb)
        feats, normals = point_features(xyz, c01, nb, edges=(src, dst))
        if cfg.gravity:
            z0 = float(torch.quantile(xyz[:, 2], 0.02)) if floor_z is None else floor_z
            feats = torch.cat([feats, normals[:, 2:3].abs(), (xyz[:, 2:3] - z0) / 2.0 - 0.5], 1)
        e = edge_features(xyz, normals, c01, src, dst, vs)
        h = self.fine_in(self.stem(feats), e, src, dst)
        hs, levels, size, lx, lc = [h], [], vs, xyz, c01
        for i, f in enumerate(cfg.factors):
            size *= f
            lev = _Level(lx, lc, size)
            hc = self.down[i](torch.cat([lev.mean(hs[-1]), lev.normals, lev.c01 - 0.5], 1))
            for r in self.coarse[i]:
                hc = r(hc, lev.edges, lev.src, lev.dst)
            hs.append(hc)
            levels.append(lev)
            lx, lc = lev.xyz, lev.c01
        for i in reversed(range(len(cfg.factors))):         # decoder: coarse context back to finer levels
            hs[i] = hs[i] + self.up[i](torch.cat([hs[i], hs[i + 1][levels[i].parent]], 1))
        hs[0] = self.fine_out(hs[0], e, src, dst)
        z = [nn.functional.normalize(self.heads[i](hs[i]), dim=1) for i in range(len(hs))]
        return z, [lev.parent for lev in levels]

    @torch.no_grad()
    def embed(self, xyz, colors, normals=None):
        z, parents = self.forward(xyz, colors)
        idx, out = torch.arange(z[0].shape[0]), [z[0]]
        for lv, p in enumerate(parents):
            idx = p[idx]
            out.append(z[lv + 1][idx])
        return nn.functional.normalize(torch.cat(out, 1), dim=1)

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        torch.save({"format": "geopurify-teacher-v2", "config": dataclasses.asdict(self.config),
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                    "meta": meta or {}}, str(path))


def load_teacher(path: str | Path):
    """SSLTeacher (v1) or MultiScaleTeacher (v2) checkpoint, in eval mode; errors name teacher_checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"teacher_checkpoint: {p} does not exist")
    ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == "geopurify-teacher-v1":
        return SSLTeacher.load(p)
    if fmt != "geopurify-teacher-v2":
        raise ValueError(f"teacher_checkpoint: {p} is not a geopurify teacher checkpoint")
    cfg = dict(ckpt["config"])
    cfg["factors"], cfg["widths"] = tuple(cfg["factors"]), tuple(cfg["widths"])
    net = MultiScaleTeacher(MultiScaleTeacherConfig(**cfg))
    net.load_state_dict(ckpt["state_dict"])
    net.meta = ckpt.get("meta", {})
    return net.eval()
