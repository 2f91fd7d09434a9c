"""Geometry-Guided Pooling (GGP): re-aggregate fused VLM features over affinity-weighted neighbourhoods.

One iteration, for every voxel i with neighbours j (the 26-voxel hash neighbourhood):

    a_ij = cos(e_i, e_j)                                    (student embeddings)
    w_ij = gate_ij * exp((a_ij - 1) / T) * [a_ij >= threshold],   w_ii = self_weight
    f_i <- sum_j w_ij f_j / (w_ii + sum_j w_ij)

The weights do not depend on the features, so the operator is built once as a sparse row-stochastic
matrix P (N x N, ~10 non-zeros per row on surfaces) and applied `iterations` times: y = P^t f.
Because row i of P only reads i's 1-ring, the output at i depends on inputs within `iterations` hops,
which is what the incremental mode exploits.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .geometry import expand_hops, local_table

GateArg = torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
NbArg = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]



def affinity_weights(embeddings: torch.Tensor, neighbours: torch.Tensor, temperature: float = 0.1,
                     affinity_threshold: float = 0.5, self_weight: float = 1.0,
                     gates: torch.Tensor | None = None, chunk: int = 65536
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-normalised pooling weights.

    embeddings (N,E) (L2-normalised; normalised here again for safety), neighbours (N,K) long (-1 = none),
    gates (N,K) in [0,1] or None. Returns (w_self (N,), w (N,K)) with w_self + w.sum(1) == 1, w = 0 at -1.
    """
    n, k = neighbours.shape
    emb = torch.nn.functional.normalize(embeddings.float(), dim=1)
    w = torch.zeros(n, k, dtype=torch.float32, device=emb.device)
    valid = neighbours >= 0
    r, c = valid.nonzero(as_tuple=True)           # existing edges only (~9 of 26 slots on surfaces)
    for s in range(0, r.numel(), chunk * 8):
        rr, cc = r[s:s + chunk * 8], c[s:s + chunk * 8]
        cos = (emb[rr] * emb[neighbours[rr, cc]]).sum(-1)
        ws = torch.exp((cos - 1.0) / temperature) * (cos >= affinity_threshold).float()
        if gates is not None:
            ws = ws * gates[rr, cc].float()
        w[rr, cc] = ws
    denom = w.sum(1) + self_weight
    return self_weight / denom, w / denom[:, None]


def pooling_operator(w_self: torch.Tensor, w: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Sparse CSR (N,N) matrix with row i = w_self[i] e_i + sum_k w[i,k] e_{nb[i,k]}."""
    n, k = neighbours.shape
    cols = torch.cat([torch.arange(n, device=neighbours.device)[:, None], neighbours], 1)
    vals = torch.cat([w_self[:, None], w], 1)
    keep = (cols >= 0) & (vals > 0)
    keep[:, 0] = True                                  # self always present (row never empty)
    crow = torch.zeros(n + 1, dtype=torch.long, device=neighbours.device)
    crow[1:] = keep.sum(1).cumsum(0)
    with warnings.catch_warnings():   # "CSR support is beta" / "invariant checks disabled": expected
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols[keep], vals[keep], (n, n))


def geometry_guided_pooling(features: torch.Tensor, embeddings: torch.Tensor, neighbours: torch.Tensor,
                            iterations: int = 3, temperature: float = 0.1, affinity_threshold: float = 0.5,
                            self_weight: float = 1.0, gates: torch.Tensor | None = None) -> torch.Tensor:
    """Iterated affinity-weighted neighbourhood averaging.

    features (N,D) float (float16 accepted, computed in float32), embeddings (N,E), neighbours (N,K) long
    (-1 = none), gates (N,K) in [0,1] aligned with `neighbours` or None. Returns (N,D) float32.
    iterations == 0 returns the features unchanged (as float32).
    """
    if features.shape[0] != neighbours.shape[0] or embeddings.shape[0] != neighbours.shape[0]:
        raise ValueError(f"features/embeddings/neighbours: row counts differ "
                         f"({features.shape[0]}, {embeddings.shape[0]}, {neighbours.shape[0]})")
    if gates is not None and gates.shape != neighbours.shape:
        raise ValueError(f"gates: shape {tuple(gates.shape)} must equal neighbours {tuple(neighbours.shape)}")
    x = features.float()
    if iterations <= 0 or x.shape[0] == 0:
        return x.clone()
    w_self, w = affinity_weights(embeddings, neighbours, temperature, affinity_threshold, self_weight, gates)
    P = pooling_operator(w_self, w, neighbours)
    for _ in range(iterations):
        x = P @ x
    return x


def pooling_region(neighbours: NbArg, changed: torch.Tensor, iterations: int, n: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(affected, support) slots for an incremental pass.

    `changed` = voxels whose feature, embedding, colour, normal or position changed (incl. new ones).
    affected = hops(changed, max(iterations, 1)): every output that can differ from the previous pass.
    support  = hops(affected, iterations): the inputs those outputs read. Both sorted.
    """
    affected = expand_hops(neighbours, changed, max(iterations, 1) if iterations > 0 else 0, n)
    support = expand_hops(neighbours, affected, iterations, n)
    return affected, support


def incremental_pooling(features: torch.Tensor, embeddings: torch.Tensor, neighbours: NbArg,
                        changed: torch.Tensor, iterations: int = 3, temperature: float = 0.1,
                        affinity_threshold: float = 0.5, self_weight: float = 1.0, gates: GateArg = None,
                        n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute GGP only where `changed` can reach; equals the full pass on those rows.

    features (N,D) / embeddings (N,E): whole-map tensors (only the support rows are read).
    neighbours: full (N,K) table or callable slots -> (M,K) (e.g. `VoxelMap.neighbours`).
    gates: None, (N,K) tensor, or callable (slots (M,), neighbour rows (M,K) global) -> (M,K).
    Returns (affected slots (A,), pooled features (A,D) float32).

    Why it is exact: the operator row of voxel i reads only its 1-ring, so after t iterations a value
    is correct wherever its t-ring lies inside the support; the support is `iterations` rings wider
    than the affected set, so boundary truncation never reaches an affected row.
    """
    n = features.shape[0] if n is None else n
    changed = changed.to(torch.long)
    if changed.numel() == 0:
        return changed, features.new_zeros(0, features.shape[1], dtype=torch.float32)
    affected, support = pooling_region(neighbours, changed, iterations, n)
    nb_rows = neighbours[support] if torch.is_tensor(neighbours) else neighbours(support)
    if gates is None:
        g = None
    elif torch.is_tensor(gates):
        g = gates[support]
    else:
        g = gates(support, nb_rows)
    local = local_table(nb_rows, support, n)
    if g is not None:
        g = g * (local >= 0).to(g.dtype)
    out = geometry_guided_pooling(features[support], embeddings[support], local, iterations,
                                  temperature, affinity_threshold, self_weight, g)
    pos = torch.searchsorted(support, affected)
    return affected, out[pos]


def uniform_smoothing(features: torch.Tensor, neighbours: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """Geometry-blind baseline: every neighbour (and self) weighs the same. (N,D) -> (N,D)."""
    n, k = neighbours.shape
    valid = (neighbours >= 0).float()
    denom = valid.sum(1) + 1.0
    P = pooling_operator(1.0 / denom, valid / denom[:, None], neighbours)
    x = features.float()
    for _ in range(iterations):
        x = P @ x
    return x
