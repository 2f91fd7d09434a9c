"""Text scoring of per-voxel (or per-pixel) features: closed-set labels and calibrated free-text queries.

Closed set: cosine similarity to prompt-ensembled class embeddings, softmax over classes.
Free text (LERF-style relevancy): for each canonical/user negative n, the pairwise softmax
exp(s_q/T) / (exp(s_q/T) + exp(s_n/T)) = sigmoid((s_q - s_n)/T); the score is the minimum over negatives,
so 0.5 means "as similar to the query as to the closest generic phrase" — a backend-independent threshold.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F

# Prompt templates for class names and queries of backends without `text_templates` (ConSE has its own).
# `prompt_templates` in config/mapping.yaml overrides them (empty there = backend default). docs/FEATURES.md.
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
CANONICAL_NEGATIVES: tuple[str, ...] = ("object", "things", "stuff", "texture")
# Label-table names that are not words: the text actually embedded for them.
CLASS_ALIASES = {"otherfurniture": "furniture", "otherprop": "object", "otherstructure": "structure"}
# Per-backend defaults: MiniLM/ConSE cosine gaps are small (~0.05-0.3), CLIP ones similar after L2-norm.
# lseg: its head was trained with a softmax over cosines at tau = 0.07, so that is its label temperature.
DEFAULT_QUERY_TEMPERATURE = {"lseg": 0.05, "conse": 0.05, "open_clip": 0.05}
DEFAULT_LABEL_TEMPERATURE = {"lseg": 0.07, "conse": 0.05, "open_clip": 0.01}
# Text embeddings kept (least recently used dropped first): every distinct free-text query adds one, and a
# long-running node must not grow with the number of distinct queries it was asked.
MAX_CACHED_TEXTS = 1024


class TextScorer:
    """Score features (N, D) against class names and free-text queries embedded by `backend.encode_text`.

    Args:
        backend: a FeatureBackend (uses `encode_text`, `device`, `name`).
        class_names: closed-set classes (index = label id).
        templates: prompt templates with one "{}"; None → `backend.text_templates` if the backend has them
            (ConSE: its class-name templates, so both sides share one context), else DEFAULT_TEMPLATES. Each text
            is embedded as the normalised mean over templates, then mapped into the features' coordinates by
            `backend.feature_basis` when the backend has one (lseg).
        negatives: extra canonical negatives for `query` (the four CANONICAL_NEGATIVES are always used).
        temperature: query softmax temperature (None → per-backend default).
        label_temperature: temperature of the class softmax whose max is the `label` score.
        debias: subtract from each class similarity its mean similarity over the backend's feature support
            (`backend.support_embeddings`, e.g. ConSE's 1000 ImageNet class embeddings): generic names such as
            "picture" are close to every feature and would otherwise win everywhere (hubness). No-op for
            backends without a support set.
        chunk_size: rows processed at once, bounds temporary memory to ~chunk_size × (D + C) floats.
    """

    def __init__(self, backend, class_names: Sequence[str], templates: Sequence[str] | None = None,
                 negatives: Sequence[str] | None = None, temperature: float | None = None,
                 label_temperature: float | None = None, chunk_size: int = 65536, debias: bool = True):
        names = [c for c in (class_names or [])]
        if len(names) < 1 or not all(isinstance(c, str) and c.strip() for c in names):
            raise ValueError("class_names: need a non-empty list of non-empty strings")
        # None → the backend's own `text_templates` (ConSE: those of its ImageNet support), else DEFAULT_TEMPLATES
        templates = tuple(templates) if templates else tuple(getattr(backend, "text_templates", None) or DEFAULT_TEMPLATES)
        if not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError(f"templates: every template needs a '{{}}' placeholder, got {list(templates)}")
        bname = getattr(backend, "name", "")
        self.temperature = float(temperature if temperature is not None else DEFAULT_QUERY_TEMPERATURE.get(bname, 0.05))
        self.label_temperature = float(label_temperature if label_temperature is not None
                                       else DEFAULT_LABEL_TEMPERATURE.get(bname, 0.05))
        if self.temperature <= 0 or self.label_temperature <= 0:
            raise ValueError("temperature: must be > 0")
        if chunk_size < 1:
            raise ValueError("chunk_size: must be >= 1")
        self.backend = backend
        self.class_names = [c.strip() for c in names]
        self.templates = templates
        self.negatives = _dedupe(list(CANONICAL_NEGATIVES) + [n.strip() for n in (negatives or []) if n and n.strip()])
        self.chunk_size = int(chunk_size)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()    # text → (D,) embedding, LRU order
        self._basis = getattr(backend, "feature_basis", None)            # (T, D) or None: see `embed`
        self._lock = threading.Lock()
        self.class_embeddings = self.embed([CLASS_ALIASES.get(c.lower(), c) for c in self.class_names])  # (C, D)
        support = getattr(backend, "support_embeddings", None) if debias else None
        self.class_bias = (F.normalize(support.float(), dim=-1).to(self.class_embeddings.device)
                           @ self.class_embeddings.T).mean(0) if support is not None \
            else torch.zeros(len(self.class_names), device=self.class_embeddings.device)      # (C,)

    # -- text embeddings ---------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → (N, D) prompt-ensembled, L2-normalised embeddings; each distinct text is encoded once."""
        texts = list(texts)
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            new = {}
            if missing:
                prompts = [tpl.format(t) for t in missing for tpl in self.templates]
                emb = self.backend.encode_text(prompts).float()
                emb = F.normalize(emb.view(len(missing), len(self.templates), -1).mean(1), dim=-1)
                if self._basis is not None:     # after normalising, not re-normalised: g·(Qᵀt) = (Q g)·t exactly
                    emb = emb @ self._basis.to(emb)
                new = {t: e.clone() for t, e in zip(missing, emb)}    # own storage, not views of `emb`
            out = torch.stack([new[t] if t in new else self._cache[t] for t in texts])
            for t in texts:
                if t in new:
                    self._cache[t] = new[t]
                self._cache.move_to_end(t)
            while len(self._cache) > MAX_CACHED_TEXTS:
                self._cache.popitem(last=False)
            return out

    # -- closed set --------------------------------------------------------------------------------
    def similarities(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N, C) cosine similarities to the classes minus `class_bias` (float32, features' device)."""
        feats = _check_features(features, self.class_embeddings.shape[1])
        cls, bias = self.class_embeddings.to(feats.device), self.class_bias.to(feats.device)
        out = torch.empty(len(feats), len(self.class_names), device=feats.device)
        with torch.inference_mode():
            for f, rows in _float_blocks(feats, self.chunk_size):
                torch.sub(_normalise(f) @ cls.T, bias, out=out[rows])
        return out

    def label(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) → labels LongTensor (N,), scores FloatTensor (N,) = class-softmax probability of the label."""
        feats = _check_features(features, self.class_embeddings.shape[1])
        cls, bias = self.class_embeddings.to(feats.device), self.class_bias.to(feats.device)
        labels = torch.empty(len(feats), dtype=torch.long, device=feats.device)
        scores = torch.empty(len(feats), dtype=torch.float32, device=feats.device)
        with torch.inference_mode():
            for f, rows in _float_blocks(feats, self.chunk_size):
                sim = _normalise(f) @ cls.T - bias
                torch.max(torch.softmax(sim / self.label_temperature, dim=1), dim=1, out=(scores[rows], labels[rows]))
        return labels, scores

    # -- free text ---------------------------------------------------------------------------------
    def query(self, features: torch.Tensor, text: str, negatives: Sequence[str] = (),
              stats: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) → relevancy (N,) float32 in [0, 1]: min over negatives of sigmoid((s_text - s_neg) / T).

        Features may be float16 (as stored in the map) or float32. With s = f·e / |f| and sigmoid monotonic, the score
        is sigmoid(min_n f·(e_text - e_n) / (T |f|)): one small matrix product per block of rows (M differences
        instead of M + 1 similarities), the norm, and one sigmoid per row; no normalised copy of the features.
        `stats`: `negative_stats(features)` computed earlier for these same features; then only f·e_text (and f·e
        of negatives beyond the canonical ones) is computed per row.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("text: empty query")
        text = text.strip()
        feats = _check_features(features, self.class_embeddings.shape[1])
        negs = [n for n in _dedupe(self.negatives + [n.strip() for n in negatives if n and n.strip()])
                if n.lower() != text.lower()]
        if stats is not None:
            return self._query_with_stats(feats, text, negs, stats)
        emb = self.embed([text] + negs).to(feats.device)                     # (1 + M, D)
        cosine = emb.shape[0] == 1                                           # no negatives: rescaled cosine
        coeff = emb if cosine else (emb[:1] - emb[1:]) / self.temperature    # (M, D)
        out = torch.empty(len(feats), dtype=torch.float32, device=feats.device)
        with torch.inference_mode():
            for f, rows in _float_blocks(feats, self.chunk_size):
                d = torch.mm(coeff, f.t())                                   # (M, n)
                norm = torch.linalg.vector_norm(f, dim=1).clamp_(min=_EPS)
                if cosine:
                    out[rows] = d[0].div_(norm).add_(1).mul_(0.5)
                else:
                    torch.sigmoid(d.amin(0).div_(norm), out=out[rows])
        return out

    def negative_stats(self, features: torch.Tensor) -> torch.Tensor:
        """(N, D) → (N, 2 + K) float32: 1 / |f|, max_n f·e_n, and f·e_n for the K canonical negatives
        (`self.negatives`, in order).

        They do not depend on the query text: a caller whose features do not change (the map's purified rows between
        two purification passes) keeps them and passes them to `query(..., stats=...)`, which then needs one dot
        product per row (min_n (s_text - s_n) = s_text - max_n s_n).
        """
        feats = _check_features(features, self.class_embeddings.shape[1])
        emb = self.embed(self.negatives).to(feats.device)                   # (K, D)
        out = torch.empty(len(feats), 2 + len(emb), dtype=torch.float32, device=feats.device)
        with torch.inference_mode():
            for f, rows in _float_blocks(feats, self.chunk_size):
                blk = out[rows]
                torch.mm(f, emb.t(), out=blk[:, 2:])
                torch.amax(blk[:, 2:], 1, out=blk[:, 1])
                torch.reciprocal(torch.linalg.vector_norm(f, dim=1).clamp_(min=_EPS), out=blk[:, 0])
        return out

    def _query_with_stats(self, feats, text: str, negs: list[str], stats: torch.Tensor) -> torch.Tensor:
        if stats.shape != (len(feats), 2 + len(self.negatives)):
            raise ValueError(f"stats: expected ({len(feats)}, {2 + len(self.negatives)}), got {tuple(stats.shape)}")
        canon = {n.lower(): i for i, n in enumerate(self.negatives)}
        used = [canon[n.lower()] for n in negs if n.lower() in canon]
        cols = None if len(used) == len(canon) else torch.tensor(used, dtype=torch.long, device=feats.device) + 2
        extra = [n for n in negs if n.lower() not in canon]
        emb = self.embed([text] + extra).to(feats.device)                   # (1 + E, D)
        q, ext = emb[0], emb[1:]
        out = torch.empty(len(feats), dtype=torch.float32, device=feats.device)
        with torch.inference_mode():
            for f, rows in _float_blocks(feats, self.chunk_size):
                st = stats[rows]
                s_text = torch.mv(f, q)
                if not negs:                                                 # rescaled cosine
                    out[rows] = s_text.mul_(st[:, 0]).add_(1).mul_(0.5)
                    continue
                s_neg = st[:, 1] if cols is None else (st.index_select(1, cols).amax(1) if len(cols) else None)
                if len(ext):
                    s_ext = torch.mm(ext, f.t()).amax(0)
                    s_neg = s_ext if s_neg is None else torch.maximum(s_neg, s_ext)
                torch.sigmoid(s_text.sub_(s_neg).mul_(st[:, 0]).div_(self.temperature), out=out[rows])
        return out


_EPS = 1e-6            # as F.normalize(eps=1e-6): all-zero rows score as if every similarity were 0
_CPU_BLOCK_ROWS = 2048  # float32 rows per block on CPU: the block stays cache-resident across its passes


def _float_blocks(feats: torch.Tensor, chunk_size: int):
    """Yield (float32 block, slice) over the rows of `feats`; float16 rows are converted one block at a time into a
    reused buffer, so the full (N, D) float32 copy is never materialised."""
    n = len(feats)
    step = chunk_size if feats.device.type != "cpu" else min(chunk_size, _CPU_BLOCK_ROWS)
    convert = feats.dtype != torch.float32 or not feats.is_contiguous()
    buf = torch.empty((min(step, n), feats.shape[1]), device=feats.device) if convert else None
    for i in range(0, n, step):
        blk = feats[i:i + step]
        if convert:
            blk = buf[:len(blk)].copy_(blk)
        yield blk, slice(i, i + len(blk))


def _dedupe(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for x in items:
        if x.lower() not in seen:
            seen.add(x.lower())
            out.append(x)
    return out


def _check_features(features, dim: int) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"features: expected a torch.Tensor (N, {dim}), got {type(features).__name__}")
    if features.dim() == 3:                       # (h, w, D) maps are accepted and flattened
        features = features.reshape(-1, features.shape[-1])
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"features: expected shape (N, {dim}), got {tuple(features.shape)}")
    return features


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """float32 rows of unit length (fused running means are shorter than 1; all-zero rows stay zero)."""
    return F.normalize(x.float(), dim=-1, eps=1e-6)
