#!/usr/bin/env python3
"""Feature backends: ms per 640×480 frame (targets on 1 CPU thread: lseg ≤ 60 ms, ConSE ≤ 120 ms), quality sweeps.

    python bench/bench_features.py                 # speed of every backend that constructs here
    python bench/bench_features.py --quality       # ConSE option sweeps on scikit-image photos (docs/FEATURES.md)
    python bench/bench_features.py --photos lseg,conse   # the same photos, each backend at its defaults
    python bench/bench_features.py --demo DIR[,DIR] [--backend conse]   # closed-set pixel mIoU on demo renders

Timings on shared machines are noisy: the minimum over frames is the figure of merit, the median is printed too.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from geopurify_ros.features import make_backend  # noqa: E402
from geopurify_ros.node import heap  # noqa: E402
from geopurify_ros.query import TextScorer  # noqa: E402

TARGET_MS = {"lseg": 60.0, "conse": 120.0}


def run_rewrites_ab(args) -> None:
    """Paired A/B of `lite_inference.for_inference`: the same backend plain (no rewrites), with every rewrite but
    the padded expansion blocks' kept buffer, and with all of them (the shipped state), in one process, frames
    alternating, so machine load hits all alike. Savings are paired medians against the shipped state."""
    from geopurify_ros.features.lite_inference import PaddedExpansionBlock, Pointwise

    def undo(b, gemm_and_inplace: bool):
        for m in list(b.net.modules()) + list(getattr(b, "head", torch.nn.Module()).modules()):
            for name, child in list(m.named_children()):
                if isinstance(child, PaddedExpansionBlock):
                    child.reuse_buffer = False
                elif not gemm_and_inplace:
                    continue
                elif isinstance(child, Pointwise):
                    setattr(m, name, child.conv)
                elif isinstance(child, (torch.nn.ReLU, torch.nn.ReLU6)):
                    child.inplace = False
        return b

    img = _photo_to(_photos()["cat"], 480, 640)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.frames} rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in ("lseg", "conse"):
        runs = {"plain": undo(make_backend(name, device=args.device), True),
                "no kept buffer": undo(make_backend(name, device=args.device), False),
                "shipped": make_backend(name, device=args.device)}
        ref = runs["shipped"].encode_image(img)
        same = max(float((b.encode_image(img) - ref).abs().max()) for b in runs.values())
        ts = {k: [] for k in runs}
        for i in range(args.frames):
            for k in list(runs)[i % 3:] + list(runs)[:i % 3]:          # rotate the order each round
                t0 = time.perf_counter()
                runs[k].encode_image(img)
                ts[k].append((time.perf_counter() - t0) * 1e3)
        line = " | ".join(f"{k} min {min(v):6.1f} median {np.median(v):6.1f}" for k, v in ts.items())
        save = "; ".join(f"{k} {np.median(np.array(ts[k]) - np.array(ts['shipped'])):+5.1f} ms"
                         for k in ("plain", "no kept buffer"))
        print(f"{name:6s} {line} | paired median cost against shipped: {save}; max |difference| {same:.1e}")


# ------------------------------------------------------------------------------------------------
# speed
def run_speed(args) -> None:
    """Round-robin over backends (one frame each per round) so that load spikes from other processes hit all
    of them alike; report min and median ms per 640×480 frame (wall), and the median CPU time of the calling
    thread (on 1 thread: the work itself, without the time the host gave to others)."""
    configs = [("lseg", {}), ("lseg", {"compile": True}), ("lseg", {"image_width": 320}), ("conse", {}), ("conse", {"image_width": 320}), ("conse", {"image_width": 640}),
               ("conse", {"scales": (1.0, 1.5)}), ("conse", {"upsample": 2}),
               ("conse", {"model": "efficientnet-lite2"}),
               ("open_clip", {"model": "ViT-B-16", "pretrained": args.open_clip_pretrained})]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, {args.frames} rounds, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    img = _photo_to(_photos()["cat"], 480, 640)
    live = []
    for name, opts in configs:
        try:
            b = make_backend(name, device=args.device, **opts)
        except (ImportError, ValueError) as exc:
            print(f"{name:9s} {str(opts):38s} unavailable: {str(exc).splitlines()[0][:100]}")
            continue
        t0 = time.perf_counter()
        b.encode_image(img)                                        # warm-up (allocations, thread pool)
        if opts.get("compile"):                                    # feature_compile: wait for the background build
            ok = b.encoder.wait()
            print(f"{name:9s} {str(opts):38s} compiled in {time.perf_counter() - t0:.0f} s"
                  + ("" if ok else f": failed ({b.encoder.error}), measured eager"))
        live.append((name, opts, b, [], []))
    for _ in range(args.frames):
        for name, opts, b, ts, cpu in live:
            if b.device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.thread_time()
            b.encode_image(img)
            if b.device.type == "cuda":
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.thread_time() - c0) * 1e3)
    for name, opts, b, ts, cpu in live:
        h, w, d = b.encode_image(img).shape
        mn, med = float(np.min(ts)), float(np.median(ts))
        tgt = TARGET_MS.get(name)
        ratio = f"  {mn / tgt:.2f}× target ({tgt:.0f} ms)" if tgt else ""
        print(f"{name:9s} {str(opts):38s} min {mn:7.1f} ms  median {med:7.1f} ms  (thread CPU median "
              f"{float(np.median(cpu)):6.1f})  out {h}×{w}×{d}{ratio}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


# ------------------------------------------------------------------------------------------------
# quality on real photos
def _photos() -> dict[str, np.ndarray]:
    from skimage import data
    from skimage.color import gray2rgb
    return {"cat": data.chelsea(), "cup of coffee": data.coffee(), "rocket": data.rocket(),
            "motorcycle": data.stereo_motorcycle()[0], "astronaut": data.astronaut(),
            "clock": gray2rgb(data.clock()), "coins": gray2rgb(data.coins())}


def _photo_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Cover-resize and centre-crop to uint8 (h, w, 3)."""
    from skimage.transform import resize
    s = max(h / img.shape[0], w / img.shape[1])
    r = resize(img, (int(np.ceil(img.shape[0] * s)), int(np.ceil(img.shape[1] * s))), anti_aliasing=True)
    r = (r * 255).round().astype(np.uint8)
    y, x = (r.shape[0] - h) // 2, (r.shape[1] - w) // 2
    return r[y:y + h, x:x + w]


def _quality_set():
    """Single photos (image-level ranking) and 640×480 side-by-side pairs of the colour photos."""
    photos = _photos()
    names = list(photos)
    colour = names[:5]
    singles = [(n, _photo_to(photos[n], 480, 640)) for n in names]
    pairs = [((a, b), np.concatenate([_photo_to(photos[a], 480, 320), _photo_to(photos[b], 480, 320)], 1))
             for a, b in itertools.combinations(colour, 2)]
    return names, singles, pairs


def evaluate(backend, scorer: TextScorer, names, singles, pairs, logits_cache: dict, generic: bool = False) -> dict:
    """Image-level top-1, 2-way and N-way per-cell accuracy on pairs, and query score in/out of the object.

    `generic`: any backend through `encode_image` (else ConSE's cached logits, so sweeps re-run only the head)."""
    def feats(key, img):
        if generic:
            with torch.inference_mode():
                return backend.encode_image(img)
        if key not in logits_cache:
            with torch.inference_mode():
                logits_cache[key] = backend.dense_logits(img)
        with torch.inference_mode():
            return backend.logits_to_features(logits_cache[key])

    top1 = []
    for n, img in singles:
        f = feats(("single", n), img)
        pooled = F.normalize(f.reshape(-1, f.shape[-1]).mean(0), dim=0)
        top1.append(names[int(scorer.similarities(pooled[None])[0].argmax())] == n)
    acc2, accn, q_in, q_out = [], [], [], []
    for (a, b), img in pairs:
        f = feats(("pair", a, b), img)
        h, w, d = f.shape
        sim = scorer.similarities(f.reshape(-1, d)).view(h, w, -1)
        ia, ib = names.index(a), names.index(b)
        left, right = slice(0, w // 2 - 1), slice(w // 2 + 1, w)          # one cell margin at the seam
        two = sim[..., [ia, ib]].argmax(-1)
        acc2.append(((two[:, left] == 0).float().mean() + (two[:, right] == 1).float().mean()).item() / 2)
        full = sim.argmax(-1)
        accn.append(((full[:, left] == ia).float().mean() + (full[:, right] == ib).float().mean()).item() / 2)
        for t, own, other in ((a, left, right), (b, right, left)):
            q = scorer.query(f.reshape(-1, d), t).view(h, w)
            q_in.append(q[:, own].mean().item())
            q_out.append(q[:, other].mean().item())
    return {"img_top1": float(np.mean(top1)), "pair_2way": float(np.mean(acc2)), "pair_Nway": float(np.mean(accn)),
            "q_in": float(np.mean(q_in)), "q_out": float(np.mean(q_out))}


ENSEMBLE = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "a {} in a room.",
            "there is a {} in the scene.")


def run_quality(args) -> None:
    names, singles, pairs = _quality_set()
    print(f"{len(singles)} photos ({', '.join(names)}), {len(pairs)} side-by-side pairs; features at 640×480")
    print("| setting | img top-1 | pair 2-way cell acc | pair 7-way cell acc | query in / out |")
    print("|---|---|---|---|---|")

    def row(label, b, tpl=None, **set_attrs):
        for k, v in set_attrs.items():
            setattr(b, k, v)
        s = TextScorer(b, names, templates=tpl)
        key = (b.model_name, b.image_width, b.scales, b.upsample)   # logits depend only on these
        r = evaluate(b, s, names, singles, pairs, caches.setdefault(key, {}))
        print(f"| {label} | {r['img_top1']:.2f} | {r['pair_2way']:.3f} | {r['pair_Nway']:.3f} | "
              f"{r['q_in']:.2f} / {r['q_out']:.2f} |", flush=True)

    caches: dict = {}
    if args.only_resolution:
        return run_resolution(args, row)
    base = make_backend("conse", device=args.device)
    row("default (lite0, w640, k10, T1, 1 template)", base)
    for k in (1, 3, 5, 20, 50, 1000):
        row(f"k={k}", base, topk=k)
    base.topk = 10
    for t in (0.5, 2.0, 4.0):
        row(f"T={t}", base, temperature=t)
    base.temperature = 1.0
    row("templates: bare '{}'", make_backend("conse", device=args.device, templates=["{}"]), tpl=["{}"])
    row("templates: 5-prompt ensemble", make_backend("conse", device=args.device, templates=ENSEMBLE), tpl=ENSEMBLE)
    for w in (320, 448, 960):
        row(f"image_width={w}", make_backend("conse", device=args.device, image_width=w))
    row("scales=(1, 0.5)", make_backend("conse", device=args.device, scales=(1.0, 0.5)))
    row("scales=(1, 1.5)", make_backend("conse", device=args.device, scales=(1.0, 1.5)))
    row("upsample=2", make_backend("conse", device=args.device, upsample=2))
    try:
        row("model=lite2", make_backend("conse", device=args.device, model="efficientnet-lite2"))
    except ImportError as exc:
        print(f"| model=lite2 | unavailable: {exc} |")


def run_photos(args) -> None:
    """The photo set once per backend at its shipped defaults (how a backend trained on renders does on photos)."""
    names, singles, pairs = _quality_set()
    print(f"{len(singles)} photos, {len(pairs)} side-by-side pairs; each backend at its defaults")
    print("| backend | img top-1 | pair 2-way cell acc | pair 7-way cell acc | query in / out |")
    print("|---|---|---|---|---|")
    for name in args.photos.split(","):
        b = make_backend(name, device=args.device)
        r = evaluate(b, TextScorer(b, names), names, singles, pairs, {}, generic=True)
        print(f"| {name} | {r['img_top1']:.2f} | {r['pair_2way']:.3f} | {r['pair_Nway']:.3f} | "
              f"{r['q_in']:.2f} / {r['q_out']:.2f} |", flush=True)


def run_resolution(args, row) -> None:
    """Input-resolution, multi-scale and backbone rows only (the slow part of the sweep)."""
    for w in (320, 448, 512, 640, 960):
        row(f"image_width={w}", make_backend("conse", device=args.device, image_width=w))
    for sc in ((1.0, 0.5), (1.0, 1.5), (1.0, 0.7, 1.4)):
        row(f"image_width=448, scales={sc}", make_backend("conse", device=args.device, image_width=448, scales=sc))
    row("image_width=448, upsample=2", make_backend("conse", device=args.device, image_width=448, upsample=2))
    try:
        row("image_width=448, model=lite2", make_backend("conse", device=args.device, image_width=448,
                                                         model="efficientnet-lite2"))
    except ImportError as exc:
        print(f"| model=lite2 | unavailable: {exc} |")


# ------------------------------------------------------------------------------------------------
# closed-set accuracy on rendered demo sequences
def run_demo(args) -> None:
    from geopurify_ros.data.sequence import load_sequence
    import yaml
    labels_yaml = os.path.join(os.path.dirname(__file__), "..", "config", "labels.yaml")
    with open(labels_yaml) as fh:
        lab = yaml.safe_load(fh)
    classes, ignore = lab["classes"], int(lab["ignore_label"])
    opts = {k: v for k, v in (("image_width", args.image_width), ("temperature", args.temperature),
                              ("topk", args.topk), ("templates", args.templates)) if v}
    if args.backend != "conse":
        opts = {k: v for k, v in opts.items() if k == "image_width"}
    b = make_backend(args.backend, device=args.device, **opts)
    scorer = TextScorer(b, classes)          # class text in the backend's template context (text_templates)
    print(f"{args.backend} options {opts or 'defaults'}, class templates {list(scorer.templates)}")
    conf = np.zeros((len(classes), len(classes)), np.int64)
    n = 0
    frames = (fr for d in args.demo.split(",") for k, fr in enumerate(load_sequence(d))
              if k % args.every == 0 and k // args.every < args.max_frames)
    for frame in frames:
        if frame.labels is None:
            continue
        n += 1
        f = b.encode_image(frame.rgb)                                                 # (h, w, D)
        H, W = frame.labels.shape
        h, w, d = f.shape
        pred, _ = scorer.label(f.reshape(-1, d))
        # nearest-cell lookup for every pixel (align_corners=False convention)
        rows = np.minimum((np.arange(H) + 0.5) * h / H, h - 1).astype(int)
        cols = np.minimum((np.arange(W) + 0.5) * w / W, w - 1).astype(int)
        pix = pred.view(h, w).cpu().numpy()[rows[:, None], cols[None, :]]
        gt = frame.labels.astype(np.int64)
        ok = gt != ignore
        np.add.at(conf, (gt[ok], pix[ok]), 1)
    tot = conf.sum(1)
    print(f"{args.demo}: {n} frames, pixel accuracy {np.trace(conf) / max(1, conf.sum()):.3f}")
    print("| class | GT pixels | accuracy | most predicted as |")
    print("|---|---|---|---|")
    for c, name in enumerate(classes):
        if tot[c]:
            print(f"| {name} | {tot[c]} | {conf[c, c] / tot[c]:.3f} | {classes[int(conf[c].argmax())]} |")
    valid = tot > 0
    iou = np.diag(conf) / np.maximum(1, tot + conf.sum(0) - np.diag(conf))
    print(f"mean class accuracy {np.mean(np.diag(conf)[valid] / tot[valid]):.3f}, mIoU {iou[valid].mean():.3f} "
          f"over {valid.sum()} classes present")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target machine has 2 cores)")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--photos", default="", metavar="BACKEND,...",
                    help="photo set at each backend's defaults, e.g. lseg,conse")
    ap.add_argument("--only-resolution", action="store_true", help="with --quality: resolution/scale rows only")
    ap.add_argument("--demo", default="", help="geopurify-make-demo output directories (comma-separated, pooled)")
    ap.add_argument("--backend", default="lseg", help="--demo: feature backend")
    ap.add_argument("--every", type=int, default=1, help="--demo: use every N-th frame")
    ap.add_argument("--max-frames", type=int, default=40, help="--demo: frames used per directory")
    ap.add_argument("--image-width", type=int, default=0, help="--demo: ConSE image_width (0 = default)")
    ap.add_argument("--temperature", type=float, default=0.0, help="--demo: ConSE temperature (0 = default)")
    ap.add_argument("--topk", type=int, default=0, help="--demo: ConSE topk (0 = default)")
    ap.add_argument("--templates", action="append", default=[],
                    help="--demo: ConSE class-name template (repeatable; also used for the class text)")
    ap.add_argument("--open-clip-pretrained", default="openai")
    ap.add_argument("--ab-rewrites", action="store_true",
                    help="paired A/B of the inference rewrites (in-place ReLU6, 1x1 convs as GEMMs, padded "
                         "expansion blocks), --frames rounds")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    heap.configure()        # the node's heap settings: a frame costs here what it costs in the node
    if args.ab_rewrites:
        run_rewrites_ab(args)
    elif args.quality:
        run_quality(args)
    elif args.photos:
        run_photos(args)
    elif args.demo:
        run_demo(args)
    else:
        run_speed(args)


if __name__ == "__main__":
    main()
