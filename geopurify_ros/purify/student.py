"""Student Affinity Network: local geometry (+ colour) -> per-voxel L2-normalised embedding.

Input per voxel (rotation/translation invariant on purpose, so the map frame's up-axis does not matter):
colour, local colour mean and std, curvature, neighbour occupancy. Edge inputs: |offset|, off-plane
distance, |n_i . n_j| and colour difference. Two EdgeConv-style max-aggregation rounds over the
26-voxel hash neighbourhood, so an embedding depends on data within `receptive_hops` = 1 + rounds rings
(1 ring for normals/colour statistics). Affinity between voxels = cosine of embeddings.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .geometry import colors_float, colour_stats, edge_list, normals_curvature

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "student.pt"
N_POINT_FEATURES = 11
N_EDGE_FEATURES = 6


@dataclass
class StudentConfig:
    hidden: int = 32
    embed_dim: int = 32
    rounds: int = 2
    voxel_size: float = 0.05
    feature_dim: int = 0          # D of the fused VLM features it is conditioned on; 0 = geometry-only student
    feature_proj: int = 16        # learned projection of the (L2-normalised) fused feature
    backend: str = ""             # feature backend the checkpoint was distilled with ("" = any: geometry-only)
    feature_weights: str = ""     # that backend's `weights_digest()` ("" = not recorded: older checkpoints)


def point_features(xyz: torch.Tensor, colors: torch.Tensor, neighbours: torch.Tensor,
                   normals: torch.Tensor | None = None, curvature: torch.Tensor | None = None,
                   edges: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel invariant inputs (N, 11) and the normals (N,3) they were computed with.

    edges: `edge_list(neighbours)` if already computed (shared with the rest of a purification pass)."""
    if edges is None:
        edges = edge_list(neighbours)
    if normals is None or curvature is None:
        normals, curvature = normals_curvature(xyz, neighbours, edges=edges)
    c = colors_float(colors)
    mean, std = colour_stats(c, neighbours, edges=edges)
    occ = (neighbours >= 0).float().sum(1, keepdim=True) / 26.0   # constant: tables may be compacted
    feats = torch.cat([c - 0.5, mean - 0.5, std * 4.0, curvature[:, None] * 6.0, occ], 1)
    return feats, normals


def geometry_features(source, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`point_features` for a VoxelMap-like object (`.xyz`, `.colors`) or an (xyz, colors) tuple."""
    if isinstance(source, (tuple, list)):
        xyz, colors = source[0], source[1]
    else:
        xyz, colors = source.xyz, source.colors
    return point_features(xyz.float(), colors, neighbours)


def edge_features(xyz: torch.Tensor, normals: torch.Tensor, colors01: torch.Tensor, src: torch.Tensor,
                  dst: torch.Tensor, voxel_size: float, block: int = 1 << 16) -> torch.Tensor:
    """(E,6) invariant descriptors of directed edges src -> dst (dst is a neighbour of src)."""
    if torch.is_grad_enabled() or src.numel() <= block:
        return _edge_features(xyz, normals, colors01, src, dst, voxel_size)
    # inference: cache-sized blocks (no (E,3) temporaries) and one packed [xyz | normal | colour] row gather
    # per endpoint instead of three
    out = xyz.new_empty(src.numel(), N_EDGE_FEATURES)
    packed = torch.cat([xyz, normals.to(xyz.dtype), colors01.to(xyz.dtype)], 1)
    for s in range(0, src.numel(), block):
        pi, pj = packed.index_select(0, src[s:s + block]), packed.index_select(0, dst[s:s + block])
        ob = out[s:s + block]
        d = (pj[:, 0:3] - pi[:, 0:3]) / voxel_size
        ni, nj = pi[:, 3:6], pj[:, 3:6]
        ob[:, 0] = d.norm(dim=-1) - 1.2
        ob[:, 1] = (d * ni).sum(-1).abs()
        ob[:, 2] = 1.0 - (ni * nj).sum(-1).abs()
        ob[:, 3:6] = (pj[:, 6:9] - pi[:, 6:9]).abs().mul_(3.0)
    return out


def _edge_features(xyz, normals, colors01, src, dst, voxel_size) -> torch.Tensor:
    d = (xyz.index_select(0, dst) - xyz.index_select(0, src)) / voxel_size
    ni, nj = normals.index_select(0, src), normals.index_select(0, dst)
    dist = d.norm(dim=-1, keepdim=True)
    off = (d * ni).sum(-1, keepdim=True).abs()
    ndot = (ni * nj).sum(-1, keepdim=True).abs()
    dc = (colors01.index_select(0, dst) - colors01.index_select(0, src)).abs() * 3.0
    return torch.cat([dist - 1.2, off, 1.0 - ndot, dc], -1)


class EdgeRound(nn.Module):
    """h_i <- h_i + MLP([h_i, max_j relu(A h_j + B h_i + G e_ij)]), max over neighbours j ∪ {self}.

    Works on a flat edge list (only existing neighbours), so cost scales with the ~8 real neighbours
    of a surface voxel rather than the 26 hash slots.
    """

    def __init__(self, c: int):
        super().__init__()
        self.a = nn.Linear(c, c, bias=False)
        self.b = nn.Linear(c, c)
        self.g = nn.Linear(N_EDGE_FEATURES, c, bias=False)
        self.out = nn.Sequential(nn.Linear(2 * c, c), nn.ReLU(), nn.Linear(c, c))

    def forward(self, h: torch.Tensor, edges: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                block: int = 1 << 15) -> torch.Tensor:
        ah, bh = self.a(h), self.b(h)          # linearity: A h_j computed once per voxel, then gathered
        if torch.is_grad_enabled() or src.numel() <= block:      # training (autograd) / small graphs
            agg = torch.relu(ah + bh)          # self edge (zero edge features); messages are >= 0
            if src.numel():
                # index_select + in-place adds: ~2x less memory traffic than fancy indexing on CPU
                m = ah.index_select(0, dst).add_(bh.index_select(0, src)).add_(self.g(edges)).relu_()
                agg = agg.scatter_reduce(0, src[:, None].expand(-1, m.shape[1]), m, "amax", include_self=True)
            return h + self.out(torch.cat([h, agg], 1))
        # Inference. B h_i is constant over i's neighbours and relu / "+ const" are monotone, so
        #   max_j relu(A h_j + B h_i + G e_ij) = relu(B h_i + max_j (A h_j + G e_ij)),
        # which drops the per-edge B h_i gather and relu. Messages go in cache-sized edge blocks, so the
        # (E, c) message tensor is never materialised; max is exact and order-independent.
        gw, c = self.g.weight.t(), ah.shape[1]
        mx = ah.clone()                        # self edge: A h_i + G 0
        for s in range(0, src.numel(), block):
            ss = src[s:s + block]
            m = torch.addmm(ah.index_select(0, dst[s:s + block]), edges[s:s + block], gw)
            mx.scatter_reduce_(0, ss[:, None].expand(-1, c), m, "amax", include_self=True)
        agg = mx.add_(bh).relu_()
        return h + self.out(torch.cat([h, agg], 1))


class StudentAffinityNet(nn.Module):
    """Small point network over the voxel graph -> (N, embed_dim) unit embeddings."""

    def __init__(self, config: StudentConfig | None = None):
        super().__init__()
        self.config = config or StudentConfig()
        c, d = self.config.hidden, self.config.feature_dim
        self.proj = nn.Linear(d, self.config.feature_proj) if d > 0 else None
        n_in = N_POINT_FEATURES + (self.config.feature_proj if d > 0 else 0)
        self.stem = nn.Sequential(nn.Linear(n_in, c), nn.ReLU(), nn.Linear(c, c))
        self.rounds = nn.ModuleList(EdgeRound(c) for _ in range(self.config.rounds))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(c, self.config.embed_dim))

    @property
    def receptive_hops(self) -> int:
        """Rings of raw map data an embedding depends on (1 for normals/colour stats + 1 per round)."""
        return 1 + self.config.rounds

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def uses_features(self) -> bool:
        return self.config.feature_dim > 0

    def forward(self, xyz: torch.Tensor, colors: torch.Tensor, neighbours: torch.Tensor,
                normals: torch.Tensor | None = None, curvature: torch.Tensor | None = None,
                edges: tuple[torch.Tensor, torch.Tensor] | None = None,
                features: torch.Tensor | None = None) -> torch.Tensor:
        """xyz (N,3) metres, colors (N,3) uint8 or [0,1], neighbours (N,K) long (-1 none) -> (N,E) unit.

        edges: `edge_list(neighbours)` if the caller already has it (a purification pass shares it).
        features: (N,D) fused VLM features (any float dtype), required when `uses_features`."""
        xyz = xyz.float()
        src, dst = edge_list(neighbours) if edges is None else edges
        feats, normals = point_features(xyz, colors, neighbours, normals, curvature, edges=(src, dst))
        edges = edge_features(xyz, normals, colors_float(colors), src, dst, self.config.voxel_size)
        if self.proj is not None:
            feats = torch.cat([feats, self.project(features)], 1)
        h = self.stem(feats)
        for r in self.rounds:
            h = r(h, edges, src, dst)
        return nn.functional.normalize(self.head(h), dim=1)

    embed = forward

    def project(self, features: torch.Tensor | None, block: int = 4096) -> torch.Tensor:
        """Learned projection of the L2-normalised fused features, (N,D) -> (N,feature_proj).

        Inference goes in cache-sized row blocks and uses linearity, W (f/|f|) + b = (W f)/|f| + b, so a float16
        map is read once per block and never copied or normalised as a whole (~3x faster at 200k x 384)."""
        d = self.config.feature_dim
        if features is None or features.dim() != 2 or features.shape[1] != d:
            got = "none" if features is None else f"{tuple(features.shape)}"
            raise ValueError(f"student_checkpoint: this student is conditioned on {d}-d fused features "
                             f"(backend '{self.config.backend}'), got {got}")
        if torch.is_grad_enabled():
            return self.proj(nn.functional.normalize(features.float(), dim=1))
        w, b = self.proj.weight.t(), self.proj.bias
        out = torch.empty(features.shape[0], self.config.feature_proj, dtype=torch.float32, device=features.device)
        for s in range(0, features.shape[0], block):
            x = features[s:s + block].float()
            out[s:s + block] = torch.addcdiv(b, x @ w, x.norm(dim=1, keepdim=True).clamp_(min=1e-12))
        return out

    def fold_feature_basis(self, basis: torch.Tensor) -> None:
        """Take coordinates g = Qᵀ f in `basis` Q (D × r, orthonormal columns spanning every feature f) instead of f:
        the projection becomes W Q, since W f = W Q g, and |g| = |f| keeps its L2 normalisation exact."""
        d, r = basis.shape
        if d != self.config.feature_dim:
            raise ValueError(f"feature_basis: expected {self.config.feature_dim} rows, got {d}")
        proj = nn.Linear(r, self.config.feature_proj).to(self.proj.weight)
        with torch.no_grad():
            proj.weight.copy_(self.proj.weight.double() @ basis.double().to(self.proj.weight.device))
            proj.bias.copy_(self.proj.bias)
        self.proj = proj
        self.config = dataclasses.replace(self.config, feature_dim=r)

    def save(self, path: str | Path, meta: dict | None = None) -> None:
        """Checkpoint = {format, config, state_dict (float32), meta}."""
        state = {k: v.detach().cpu().float() for k, v in self.state_dict().items()}
        torch.save({"format": "geopurify-student-v1", "config": dataclasses.asdict(self.config),
                    "state_dict": state, "meta": meta or {}}, str(path))


class ConstantEmbedding(nn.Module):
    """Ablation stand-in for a student: the same embedding everywhere (affinity 1 to every neighbour), so
    geometry-guided pooling reduces to the gates alone."""

    receptive_hops = 0
    embed_dim = 1
    uses_features = False

    def forward(self, xyz, colors, neighbours, normals=None, curvature=None, edges=None):
        return xyz.new_ones(xyz.shape[0], 1)


class FixedEmbedding(nn.Module):
    """Ablation stand-in for a student: given per-voxel embeddings (N, E) of the map it will be called on, in its
    voxel order (the teacher's own embeddings, or one-hot ground-truth labels as an oracle of perfect affinity)."""

    receptive_hops = 0
    uses_features = False

    def __init__(self, embeddings: torch.Tensor):
        super().__init__()
        self.embeddings = embeddings.float()
        self.embed_dim = embeddings.shape[1]

    def forward(self, xyz, colors, neighbours, normals=None, curvature=None, edges=None):
        if xyz.shape[0] != self.embeddings.shape[0]:
            raise ValueError(f"FixedEmbedding: holds {self.embeddings.shape[0]} voxels, called on {xyz.shape[0]}")
        return self.embeddings.to(xyz.device)


def affinity(embeddings: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Cosine affinity to each neighbour: (N,E), (N,K) -> (N,K), 0 at -1."""
    e = nn.functional.normalize(embeddings.float(), dim=1)
    a = (e[neighbours.clamp(min=0)] * e[:, None, :]).sum(-1)
    return a * (neighbours >= 0).float()


def shipped_checkpoint(backend: str | None) -> Path:
    """The shipped student for a feature backend (models/student_<backend>.pt), else the geometry-only one."""
    if backend:
        p = DEFAULT_CHECKPOINT.with_name(f"student_{backend}.pt")
        if p.is_file():
            return p
    return DEFAULT_CHECKPOINT


def load_student(path: str | Path | None = None, device: str | torch.device = "cpu", backend: str | None = None,
                 feature_dim: int | None = None, feature_basis: torch.Tensor | None = None,
                 feature_weights: str | None = None) -> StudentAffinityNet:
    """Load a student checkpoint in eval mode.

    path None -> the shipped student for `backend` (`models/student_<backend>.pt`), or, when that backend has
    none, the geometry-only `models/student.pt` with one warning. With `feature_dim` given, a feature-conditioned
    checkpoint must have been distilled on D = feature_dim features (else ValueError naming student_checkpoint).
    `feature_basis`: the backend's (T, D) basis (`FeatureBackend.feature_basis`); a student distilled on the T-d
    features is folded onto their D coordinates (exact, `StudentAffinityNet.fold_feature_basis`).
    `feature_weights`: the backend's `weights_digest()`. A student that recorded another digest was distilled on
    features from other weights (e.g. a retrained lseg head): its affinities would read the wrong coordinates,
    so an explicit `path` is a ValueError, and the automatic choice (path None) falls back to the geometry-only
    student with one warning.
    Raises FileNotFoundError if missing and ValueError if the file is not a valid student checkpoint.
    """
    p = Path(path) if path else shipped_checkpoint(backend)
    if path is None and backend and p == DEFAULT_CHECKPOINT:
        _warn_once(backend, "no student is shipped for feature backend '{b}'")
    if not p.is_file():
        raise FileNotFoundError(f"student_checkpoint: {p} does not exist "
                                f"(train one with `geopurify-train --out {p.parent}`)")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"student_checkpoint: {p} is not a readable torch checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "geopurify-student-v1":
        raise ValueError(f"student_checkpoint: {p} is not a geopurify student checkpoint (format tag missing)")
    try:
        fields = {f.name for f in dataclasses.fields(StudentConfig)}
        cfg = StudentConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})
        net = StudentAffinityNet(cfg)
        net.load_state_dict(ckpt["state_dict"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ValueError(f"student_checkpoint: {p} does not match StudentAffinityNet ({exc})") from exc
    if feature_weights and cfg.feature_weights and cfg.feature_weights != feature_weights:
        if path is None:
            _warn_once(backend, "the shipped student for feature backend '{b}' was distilled on other weights "
                                "than the configured feature_model's")
            return load_student(DEFAULT_CHECKPOINT, device)
        raise ValueError(f"student_checkpoint: {p} was distilled on features of other '{cfg.backend}' weights "
                         f"(digest {cfg.feature_weights[:12]}, this backend's is {feature_weights[:12]}); train a "
                         f"student for them (`geopurify-train --feature-backend {cfg.backend} --feature-model ...`)")
    if feature_basis is not None and cfg.feature_dim and cfg.feature_dim == feature_basis.shape[0]:
        net.fold_feature_basis(feature_basis)
        cfg = net.config
    if feature_dim is not None and cfg.feature_dim and cfg.feature_dim != feature_dim:
        raise ValueError(f"student_checkpoint: {p} was distilled on {cfg.feature_dim}-d features of backend "
                         f"'{cfg.backend}', but the map has {feature_dim}-d features; use that backend's student "
                         f"or train one (`geopurify-train --feature-backend ...`)")
    net.meta = ckpt.get("meta", {})
    return net.to(device).eval()


_WARNED: set = set()


def _warn_once(backend: str, why: str) -> None:
    if (backend, why) in _WARNED:
        return
    _WARNED.add((backend, why))
    import warnings

    warnings.warn(f"student_checkpoint: {why.format(b=backend)}; using the geometry-only student "
                  f"({DEFAULT_CHECKPOINT.name}). Train one from your own bags with "
                  f"`geopurify-train --feature-backend {backend} --data BAG ...` (README)", stacklevel=3)


def checkpoint_info(path: str | Path | None = None) -> dict:
    """The JSON record shipped next to a checkpoint (student.json), or {} if absent."""
    p = (Path(path) if path else DEFAULT_CHECKPOINT).with_suffix(".json")
    return json.loads(p.read_text()) if p.is_file() else {}
