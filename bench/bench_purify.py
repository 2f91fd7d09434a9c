"""Benchmark: Purifier full vs incremental pass vs map size (synthetic rooms at 5 cm, VoxelMap).

    python bench/bench_purify.py [--sizes 10000 100000 200000] [--dim D] [--dirty 5000] [--threads 1] [--device cpu]
    python bench/bench_purify.py --leakage-only      # poster-on-wall leakage / L-corner accuracy table

"Incremental" = one new frame re-observing a compact patch of `--dirty` voxels (new features), followed by
`purify(incremental=True)`. Targets: full 200k <= 1 s on CPU, incremental >= 10x cheaper than full.
The map's D is the one the node gets from `--backend` (lseg: its 129-d output subspace, the shipped student folded
onto it) unless `--dim` sets another (e.g. `--dim 384`: lseg's full text-space features).
"""
from __future__ import annotations

import argparse
import time

import torch

from geopurify_ros.features import make_backend
from geopurify_ros.node import heap
from geopurify_ros.purify.purifier import Purifier, PurifyConfig
from geopurify_ros.purify.scenes import large_scene
from geopurify_ros.purify.student import DEFAULT_CHECKPOINT, StudentAffinityNet, load_student
from geopurify_ros.voxel_map import VoxelMap


def build_map(n: int, dim: int, seed: int = 0, device: str = "cpu") -> tuple[VoxelMap, torch.Tensor]:
    s = large_scene(n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(len(s.xyz), dim, generator=g), dim=1)
    vm = VoxelMap(voxel_size=0.05, feature_dim=dim, max_voxels=2 * n, device=device)
    vm.fuse(s.xyz, feats, s.colors, stamp=0.0, sensor_origin=s.xyz.mean(0))
    return vm, s.xyz


def frame_patch(vm: VoxelMap, k: int, seed: int) -> torch.Tensor:
    """k voxels nearest to a random voxel: the footprint of one new RGB-D frame."""
    g = torch.Generator().manual_seed(seed)
    c = vm.xyz[torch.randint(len(vm), (1,), generator=g)]
    return torch.topk((vm.xyz - c).norm(dim=1), k, largest=False).indices


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 200_000])
    ap.add_argument("--dim", type=int, default=0, help="feature D of the map (default: that of --backend)")
    ap.add_argument("--dirty", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mode", default="pooled", choices=["pooled", "purified", "raw"])
    ap.add_argument("--leakage", action="store_true", help="also print the poster / L-corner leakage table")
    ap.add_argument("--leakage-only", action="store_true")
    ap.add_argument("--student", default="", help="student checkpoint (default: the one shipped for --backend)")
    ap.add_argument("--backend", default="lseg", help="feature backend whose shipped student is used (default: the default backend)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]: map, student and pooling on this device")
    ap.add_argument("--iterations", type=int, default=PurifyConfig.iterations)
    ap.add_argument("--radius", type=int, default=PurifyConfig.radius)
    ap.add_argument("--temperature", type=float, default=PurifyConfig.temperature)
    ap.add_argument("--threshold", type=float, default=PurifyConfig.affinity_threshold)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    heap.configure()        # the node's heap settings: a pass costs here what it costs in the node
    basis = None
    if not a.dim:
        backend = make_backend(a.backend, device="cpu")
        a.dim, basis = backend.dim, backend.feature_basis
    student = load_student(a.student or None, backend=a.backend, feature_dim=a.dim, feature_basis=basis) \
        if (a.student or DEFAULT_CHECKPOINT.is_file()) else StudentAffinityNet().eval()
    cfg = PurifyConfig(iterations=a.iterations, radius=a.radius, temperature=a.temperature,
                       affinity_threshold=a.threshold)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    print(f"torch {torch.__version__}, threads {a.threads}, device {a.device}, D={a.dim}, mode={a.mode}, "
          f"student={getattr(student, 'meta', {}).get('command', 'random-init')} "
          f"(feature_dim={student.config.feature_dim}), iterations={cfg.iterations}, radius={cfg.radius}, "
          f"T={cfg.temperature}, threshold={cfg.affinity_threshold}")
    if a.leakage or a.leakage_only:
        leakage_table(student, cfg, a.dim)
        if a.leakage_only:
            return
    print(f"{'voxels':>8} {'full ms':>9} {'(embed':>7} {'pool)':>7} {'inc ms':>8} {'(embed':>7} {'pool)':>7} "
          f"{'embedded':>8} {'updated':>8} {'full/inc':>8}")
    for n in a.sizes:
        vm, _ = build_map(n, a.dim, device=a.device)
        p = Purifier(student, cfg, device=a.device)
        fulls, incs = [], []
        for r in range(a.repeats):
            sync()
            t = time.perf_counter()
            sf = p.purify(vm, mode=a.mode, incremental=False)
            sync()
            fulls.append((time.perf_counter() - t, sf))
        for r in range(a.repeats):
            slots = frame_patch(vm, min(a.dirty, len(vm) // 2), r)
            new = torch.nn.functional.normalize(torch.randn(slots.numel(), a.dim), dim=1)
            vm.fuse(vm.xyz[slots], new, vm.colors[slots], stamp=1.0 + r)
            sync()
            t = time.perf_counter()
            si = p.purify(vm, mode=a.mode, incremental=True)
            sync()
            incs.append((time.perf_counter() - t, si))
        tf, sf = min(fulls, key=lambda x: x[0])
        ti, si = min(incs, key=lambda x: x[0])
        assert si.incremental
        print(f"{len(vm):>8} {tf * 1e3:>9.0f} {sf.ms_embed:>7.0f} {sf.ms_pool:>7.0f} {ti * 1e3:>8.0f} "
              f"{si.ms_embed:>7.0f} {si.ms_pool:>7.0f} {si.embedded:>8} {si.updated:>8} {tf / ti:>8.1f}x")



def leakage_table(student, cfg: PurifyConfig, dim: int) -> None:
    """Poster-on-wall leakage and L-corner boundary accuracy for each variant (printed as a table).

    The simulated fused features are noisy one-hots of 8 classes; a feature-conditioned student sees them
    mapped into its D-dim feature space by fixed random unit class vectors (like text embeddings)."""
    from geopurify_ros.purify.geometry import edge_gates, grid_neighbours, normals_curvature
    from geopurify_ros.purify.pooling import geometry_guided_pooling, uniform_smoothing
    from geopurify_ros.purify.scenes import l_corner, leakage, noisy_onehot, poster_features, poster_wall

    vs = 0.05
    rows = []
    class_vectors = torch.nn.functional.normalize(torch.randn(8, dim, generator=torch.Generator().manual_seed(7)), dim=1)
    for seed in range(3):
        pw = poster_wall(seed)
        feats, poster = poster_features(pw, seed=seed)
        lc = l_corner(seed)
        lf = noisy_onehot(lc.instance, 8, 0.3, seed)
        near = (lc.xyz[:, 0] < 2.5 * vs) & (lc.xyz[:, 2] < 2.5 * vs)
        res = {}
        for name, (s, f) in {"poster": (pw, feats), "corner": (lc, lf)}.items():
            nb = grid_neighbours(s.xyz, vs)
            nrm, _ = normals_curvature(s.xyz, nb)
            kw = {"features": f @ class_vectors} if student.uses_features else {}
            with torch.no_grad():
                emb = student(s.xyz, s.colors, nb, **kw)
            ones = torch.ones(len(s.xyz), 4)
            g_all = edge_gates(s.xyz, s.colors, nrm, nb, vs)
            g_geo = edge_gates(s.xyz, s.colors, nrm, nb, vs, color_sigma=None)
            it, pk = cfg.iterations, {"temperature": cfg.temperature, "affinity_threshold": cfg.affinity_threshold}
            out = {
                "raw (fused)": f,
                f"uniform smoothing x{it}": uniform_smoothing(f, nb, it),
                f"GGP student, no gates x{it}": geometry_guided_pooling(f, emb, nb, it, **pk),
                "purified (student, 1 iter)": geometry_guided_pooling(f, emb, nb, 1, **pk),
                "GGP no student, normal+depth gates": geometry_guided_pooling(f, ones, nb, it, gates=g_geo, **pk),
                "GGP student, normal+depth gates": geometry_guided_pooling(f, emb, nb, it, gates=g_geo, **pk),
                "pooled: student + all gates (default)": geometry_guided_pooling(f, emb, nb, it, gates=g_all, **pk),
            }
            for k, v in out.items():
                if name == "poster":
                    res.setdefault(k, {})["poster leakage"] = leakage(v, poster)
                else:
                    acc = (v.argmax(1) == lc.instance % 8).float()
                    res.setdefault(k, {})["corner acc"] = float(acc.mean())
                    res[k]["corner acc near crease"] = float(acc[near].mean())
        rows.append(res)
    print(f"\n{'variant (mean of 3 seeds)':<40} {'poster leak':>11} {'corner acc':>10} {'near crease':>11}")
    for k in rows[0]:
        m = {c: sum(r[k][c] for r in rows) / len(rows) for c in rows[0][k]}
        print(f"{k:<40} {m['poster leakage']:>11.3f} {m['corner acc']:>10.3f} {m['corner acc near crease']:>11.3f}")


if __name__ == "__main__":
    main()
