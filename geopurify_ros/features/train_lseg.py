"""``geopurify-train-features``: train the `lseg` backend's dense head on labelled renders.

1. Training rooms (seeds >= 1000, training-split catalogue models, domain randomisation) are rendered
   into text-labelled frames (`data.text_frames`: catalogue names + wall/floor/ceiling/poster).
2. The frozen EfficientNet-Lite0 runs once per frame (and its mirror image); its stride-8/16/32 maps
   are kept in memory as float16, so training touches only the small head.
3. The head is trained LSeg-style: per output cell, cross-entropy over the training vocabulary of
   cosine(cell embedding, MiniLM text embedding) / tau, the text encoder frozen. With ``--train-stride32`` the
   backbone's stride-32 stage (`lseg.TrunkTail`) is fine-tuned with it, run on the cached stride-16 maps and
   saved in the checkpoint. With ``--distill`` it also
   learns to match, cell by cell (cosine), the normalised mean of already-trained heads on the same backbone
   maps: one head's pass with most of an ensemble's quality (heads trained apart disagree off the training
   vocabulary, and their mean is the better labeller).
4. Validation: closed-set pixel mIoU with the evaluation class names (config/labels.yaml) on separate
   training-split rooms (seeds `--val-seeds`); evaluation seeds 0-99 are never touched here.
   ``--holdout-names F`` makes it name-disjoint: about F of each class's catalogue names are left out of
   training (their cells ignored, their texts out of the softmax), and validation also reports the cells
   that show them, i.e. how the head does on furniture it never saw (what the evaluation rooms hold).

Writes ``OUT/lseg_head.pt``, ``OUT/lseg_head.json`` (command, data, split, metrics), ``OUT/train_log.jsonl``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.catalog import TRAIN_SEED_MIN, split_table
from ..data.classes import IGNORE_LABEL, class_names as table_class_names
from ..data.text_frames import STRUCTURE_TEXT, cached_text_frames
from ..device import resolve_device
from ..eval.metrics import Scores, confusion_matrix
from .conse import load_efficientnet_lite, network_input_size, normalise_for_lite, shared_text_encoder
from .lseg import (DEFAULT_TEMPLATES, LSegHead, TrunkTail, attach_trunk, backbone_endpoints, load_checkpoint,
                   stride32_start)

def parse_seeds(text: str) -> list[int]:
    """'1000-1159' or '1000,1002' or a mix → sorted seeds."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            out.update(range(a, b + 1))
        elif part:
            out.add(int(part))
    return sorted(out)


def embed_texts(texts: list[str], templates, device) -> torch.Tensor:
    enc = shared_text_encoder(str(device))
    prompts = [t.format(x) for x in texts for t in templates]
    emb = enc.encode(prompts).view(len(texts), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


class FeatureSet:
    """Backbone maps (float16, in CPU memory) and per-cell targets of many frames; the backbone runs on `device`.
    ``keep_f32`` False: the stride-32 maps are not kept (``f32`` None), for a run that computes them with a stage
    being trained and has no teacher to feed them to (at 448x320 they are the largest of the three)."""

    def __init__(self, net, seeds, frames_per_scene: int, image_width: int, vocab: list[str], flip: bool, log,
                 device: torch.device = torch.device("cpu"), keep_f32: bool = True, models: str = "train"):
        self.vocab = vocab
        self.device = device
        self.keep_f32 = keep_f32
        self.f8, self.f16, self.f32, self.targets, self.classes = [], [], [], [], []
        t0 = time.perf_counter()
        for n, seed in enumerate(seeds):
            d = cached_text_frames(seed, frames_per_scene, models)
            to_global = np.array([self.vocab_index(v) for v in d["vocab"]] + [-1], np.int64)
            for rgb, ids, cls in zip(d["rgb"], d["ids"], d["classes"]):
                for mirrored in ((False, True) if flip else (False,)):
                    img, lab, cl = (rgb[:, ::-1], ids[:, ::-1], cls[:, ::-1]) if mirrored else (rgb, ids, cls)
                    self._add(net, np.ascontiguousarray(img), to_global[lab], cl, image_width)
            if log and (n + 1) % 10 == 0:
                log(f"features: {n + 1}/{len(seeds)} scenes, {len(self.targets)} frames, "
                    f"{time.perf_counter() - t0:.0f} s")
        self.f8, self.f16 = torch.stack(self.f8), torch.stack(self.f16)
        self.f32 = torch.stack(self.f32) if keep_f32 else None
        self.targets, self.classes = torch.stack(self.targets), torch.stack(self.classes)

    def vocab_index(self, text: str) -> int:
        if text not in self.vocab:
            self.vocab.append(text)
        return self.vocab.index(text)

    @torch.inference_mode()
    def _add(self, net, rgb: np.ndarray, labels: np.ndarray, classes: np.ndarray, image_width: int) -> None:
        H, W = rgb.shape[:2]
        size = network_input_size(H, W, image_width)
        f8, f16, f32 = backbone_endpoints(net, normalise_for_lite(rgb, size, self.device))
        self.f8.append(f8[0].half().cpu().contiguous())
        self.f16.append(f16[0].half().cpu().contiguous())
        if self.keep_f32:
            self.f32.append(f32[0].half().cpu().contiguous())
        gh, gw = f8.shape[-2:]                     # targets at the head's output cells (stride 8)
        rows = ((np.arange(gh) + 0.5) * H / gh).astype(np.int64)      # cell centres, align_corners=False
        cols = ((np.arange(gw) + 0.5) * W / gw).astype(np.int64)
        self.targets.append(torch.from_numpy(labels[rows][:, cols].astype(np.int64)))
        self.classes.append(torch.from_numpy(classes[rows][:, cols].astype(np.int64)))

    def __len__(self) -> int:
        return len(self.targets)


def batch_maps(fs: FeatureSet, idx, device, tail: TrunkTail | None = None) -> tuple[torch.Tensor, ...]:
    """(f8, f16, f32) of frames ``idx``; f32 from ``tail`` (a stride-32 stage being trained) instead of the cache."""
    f8, f16 = (m[idx].to(device).float() for m in (fs.f8, fs.f16))
    return f8, f16, (tail(f16) if tail is not None else fs.f32[idx].to(device).float())


def cell_logits(head, fs: FeatureSet, idx, text_emb: torch.Tensor, tail: TrunkTail | None = None) -> torch.Tensor:
    """(B, V, h, w) cosine similarities of the head's cells to ``text_emb`` (V, D) for frames ``idx``."""
    return torch.einsum("bdhw,vd->bvhw", head(*batch_maps(fs, idx, text_emb.device, tail)), text_emb)


def load_heads(paths, image_width: int, device) -> list[tuple[LSegHead, dict | None]]:
    """Trained heads for ``--init`` / ``--distill`` with their fine-tuned stride-32 stage (or None); they must have
    been trained on this backbone input."""
    heads = []
    for p in paths:
        try:
            head, meta, trunk = load_checkpoint(p)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"--init/--distill: {exc}") from exc
        if int(meta.get("image_width", image_width)) != image_width:
            raise ValueError(f"{p}: trained at image width {meta.get('image_width')}, not {image_width}")
        heads.append((head.to(device).eval().requires_grad_(False), trunk))
    return heads


def ensemble_embedding(heads: list[LSegHead], maps) -> torch.Tensor:
    """Normalised mean of the heads' (unit) cell embeddings: the distillation target."""
    with torch.no_grad():
        return F.normalize(sum(h(*maps) for h in heads), dim=1)


def holdout_names(fs: FeatureSet, class_names: list[str], fraction: float, seed: int) -> list[int]:
    """Vocabulary indices left out of training: per evaluation class with >= 2 catalogue names seen in ``fs``,
    round(fraction n) of them (at least 1), drawn with ``seed``; structural texts (wall, floor, ...) stay in.
    A name's class is the one most of its cells carry."""
    t, c = fs.targets.flatten().numpy(), fs.classes.flatten().numpy()
    keep = (t >= 0) & (c >= 0) & (c < len(class_names))
    counts = np.zeros((len(fs.vocab), len(class_names)), np.int64)
    np.add.at(counts, (t[keep], c[keep]), 1)
    structure = set(STRUCTURE_TEXT.values())
    by_class: dict[int, list[int]] = {}
    for i, name in enumerate(fs.vocab):
        if counts[i].sum() and name not in structure:
            by_class.setdefault(int(counts[i].argmax()), []).append(i)
    rng = np.random.default_rng(seed)
    held = []
    for cls in sorted(by_class):
        ids = sorted(by_class[cls], key=lambda i: fs.vocab[i])
        if len(ids) >= 2:
            k = max(1, int(round(fraction * len(ids))))
            held += [ids[j] for j in rng.choice(len(ids), k, replace=False)]
    return sorted(held)


def restrict_classes(fs: FeatureSet, names: list[int]) -> FeatureSet:
    """A view of ``fs`` whose class ids are ignored except on cells showing one of vocabulary ``names``."""
    view = copy.copy(fs)
    view.classes = torch.where(torch.isin(fs.targets, torch.tensor(names, dtype=fs.targets.dtype)), fs.classes,
                               torch.full_like(fs.classes, IGNORE_LABEL))
    return view


def text_smoothing(text_emb: torch.Tensor, eps: float, tau: float) -> torch.Tensor:
    """(V, V) target distributions: 1 - eps on the cell's own text, eps spread over the other texts by their
    text-to-text softmax (cosine / tau), so a "Bookcase" cell is also pulled toward "Shelves" more than "Sofa"."""
    sim = text_emb @ text_emb.T / tau
    sim.fill_diagonal_(float("-inf"))
    return (1 - eps) * torch.eye(len(text_emb), device=text_emb.device) + eps * sim.softmax(1)


def label_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of (B, V, h, w) logits against text ids (B, h, w) (-1 ignored), one-hot or ``smooth`` rows."""
    if smooth is None:
        return F.cross_entropy(logits, targets, ignore_index=-1)
    valid = targets >= 0
    q = smooth[targets[valid]]                                     # (N, V)
    return -(q * logits.permute(0, 2, 3, 1)[valid].log_softmax(1)).sum(1).mean()


def file_record(path) -> dict:
    return {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


@torch.no_grad()
def closed_set_scores(head, fs: FeatureSet, class_emb: torch.Tensor, names: list[str], batch: int = 16,
                      tail: TrunkTail | None = None) -> Scores:
    """Pixel (cell) confusion of argmax-cosine labels against the frames' class ids."""
    modules = [m for m in (head, tail) if m is not None]
    for m in modules:
        m.eval()
    cm = np.zeros((len(names), len(names) + 1), np.int64)
    for i in range(0, len(fs), batch):
        idx = torch.arange(i, min(i + batch, len(fs)))
        pred = cell_logits(head, fs, idx, class_emb, tail).argmax(1)
        cm += confusion_matrix(fs.classes[idx].numpy(), pred.cpu().numpy(), len(names), IGNORE_LABEL)
    for m in modules:
        m.train()
    return Scores(cm, names)


def train(args, log=print) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_seeds, val_seeds = parse_seeds(args.seeds), parse_seeds(args.val_seeds)
    if min(train_seeds + val_seeds) < TRAIN_SEED_MIN:
        raise ValueError(f"seeds: training and validation rooms use seeds >= {TRAIN_SEED_MIN}; "
                         "0-9 are for reporting, 10-99 reserved")
    if set(train_seeds) & set(val_seeds):
        raise ValueError("val-seeds: must not overlap the training seeds")
    templates = tuple(args.templates) if args.templates else DEFAULT_TEMPLATES
    device = resolve_device(args.device)
    log(f"device: {device}")
    teachers = load_heads(args.distill, args.image_width, device)      # checked before the long data step
    if any(trunk is not None for _, trunk in teachers):
        raise ValueError("--distill: teachers must use the frozen backbone (their stride-32 maps are the cached ones)")
    teachers = [h for h, _ in teachers]
    init, init_trunk = load_heads([args.init], args.image_width, device)[0] if args.init else (None, None)
    if init_trunk is not None and not args.train_stride32:
        raise ValueError("--init: its backbone stage was fine-tuned; continue with --train-stride32")
    net = load_efficientnet_lite(args.backbone).to(device, memory_format=torch.channels_last)
    tail = None
    if args.train_stride32:                      # a trainable copy of the network, of which the stage is trained
        plain = load_efficientnet_lite(args.backbone, inference=False).to(device)
        tail = (attach_trunk(plain, init_trunk) if init_trunk is not None
                else TrunkTail(plain, stride32_start(plain))).train()
    t0 = time.perf_counter()
    vocab: list[str] = []
    train_set = FeatureSet(net, train_seeds, args.frames, args.image_width, vocab, flip=True, log=log, device=device,
                           keep_f32=tail is None or bool(teachers),       # teachers read the frozen stage's maps
                           models=args.models)
    val_set = FeatureSet(net, val_seeds, args.frames, args.image_width, vocab, flip=False, log=None, device=device,
                         keep_f32=tail is None)
    t_data = time.perf_counter() - t0
    log(f"data: {len(train_set)} training frames ({len(train_seeds)} rooms, mirrored), {len(val_set)} validation "
        f"frames, vocabulary {len(vocab)} texts, {t_data:.0f} s")
    text_emb = embed_texts(vocab, templates, "cpu").to(device)              # (V, 384), frozen
    names = list(table_class_names(args.labels))
    targets, held, held_val = train_set.targets, [], None
    if args.holdout_names:
        seen = set(np.unique(train_set.targets.numpy()).tolist())
        held = sorted(set(holdout_names(train_set, names, args.holdout_names, args.holdout_seed))
                      | {i for i in range(len(vocab)) if i not in seen})          # val-only names: never trained
        kept = [i for i in range(len(vocab)) if i not in held]
        remap = torch.full((len(vocab) + 1,), -1, dtype=torch.int64)            # index -1 (no hit) stays -1
        remap[kept] = torch.arange(len(kept))
        targets, text_emb = remap[train_set.targets], text_emb[kept]
        held_val = restrict_classes(val_set, held)
        log(f"held out {len(held)} of {len(vocab)} texts: " + ", ".join(vocab[i] for i in held))
    from ..query import CLASS_ALIASES
    class_emb = embed_texts([CLASS_ALIASES.get(c.lower(), c) for c in names], templates, "cpu").to(device)

    smooth = text_smoothing(text_emb, args.text_smoothing, args.tau) if args.text_smoothing else None
    if init is None:
        head = LSegHead(hidden=args.hidden, out_dim=text_emb.shape[1]).to(device)
    else:                                                    # its decoder width wins over --hidden
        head = LSegHead(**init.config).to(device)
        head.load_state_dict(init.state_dict())
    groups = [{"params": list(head.parameters()), "lr": args.lr}]
    if tail is not None:
        groups.append({"params": list(tail.parameters()), "lr": args.trunk_lr})
    opt = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    logf = open(out / "train_log.jsonl", "w")
    try:
        from tqdm import tqdm
        bar = tqdm(range(args.steps), desc="train-features", file=sys.stderr, disable=not args.progress)
    except ImportError:                                   # pragma: no cover - tqdm ships with sentence-transformers
        bar = range(args.steps)
    def validate() -> tuple[Scores, Scores | None]:
        """Scores on all validation cells and, with --holdout-names, on the held-out names' cells."""
        return (closed_set_scores(head, val_set, class_emb, names, tail=tail),
                closed_set_scores(head, held_val, class_emb, names, tail=tail) if held_val is not None else None)

    t1 = time.perf_counter()
    history = []
    scores = None                                  # the latest validation: the last step's scores the final weights
    for step in bar:
        idx = torch.from_numpy(rng.choice(len(train_set), args.batch, replace=False))
        maps = batch_maps(train_set, idx, device, tail)               # f32 from the stage being trained, if any
        emb = head(*maps)
        logits = torch.einsum("bdhw,vd->bvhw", emb, text_emb) / args.tau       # (B, V, gh, gw)
        loss = label_loss(logits, targets[idx].to(device), smooth)
        rec = {"step": step + 1, "loss": round(loss.item(), 5)}
        if teachers:
            frozen = maps if tail is None else batch_maps(train_set, idx, device)     # teachers: the frozen stage
            cos = (emb * ensemble_embedding(teachers, frozen)).sum(1).mean()
            loss = loss + args.distill_weight * (1 - cos)
            rec["teacher_cos"] = round(cos.item(), 5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        rec.update(lr=round(sched.get_last_lr()[0], 7), s=round(time.perf_counter() - t1, 1))
        if (step + 1) % args.val_every == 0 or step + 1 == args.steps:
            scores = validate()
            rec.update(val_miou=round(scores[0].miou, 4), val_macc=round(scores[0].macc, 4))
            if scores[1] is not None:
                rec.update(val_heldout_miou=round(scores[1].miou, 4))
            history.append(rec)
            log(json.dumps(rec))
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
    logf.close()
    t_train = time.perf_counter() - t1
    final, hs = scores if scores is not None else validate()

    def per_class(sc: Scores) -> dict:
        return {n: (None if np.isnan(v) else round(float(v), 4))
                for n, v, present in zip(names, sc.iou, sc.present) if present}

    heldout = None
    if hs is not None:
        heldout = {"fraction": args.holdout_names, "seed": args.holdout_seed, "texts": [vocab[i] for i in held],
                   "val_cell_miou": round(hs.miou, 4), "val_cell_macc": round(hs.macc, 4),
                   "val_per_class_iou": per_class(hs)}
    meta = {
        "what": "LSeg-style dense head for the lseg feature backend (EfficientNet-Lite0, "
                + ("stride-32 stage fine-tuned" if tail is not None else "frozen") + ", + MiniLM text space)",
        "command": "geopurify-train-features " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        "backbone": args.backbone, "image_width": args.image_width, "templates": list(templates),
        "config": head.config, "tau": args.tau, "text_smoothing": args.text_smoothing, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
        "trunk": ({"trained": f"blocks {tail.first}.. + conv_head (the stride-32 stage)", "lr": args.trunk_lr}
                  if tail is not None else None),
        "init": file_record(args.init) if args.init else None,
        "distill": {"teachers": [file_record(p) for p in args.distill], "weight": args.distill_weight,
                    "target": "normalised mean of the teachers' cell embeddings, cosine loss"} if args.distill else None,
        "data": {"generator": "geopurify_ros.data.text_frames (train preset, domain randomisation)",
                 "train_seeds": args.seeds, "train_models": args.models, "val_seeds": args.val_seeds,
                 "frames_per_room": args.frames,
                 "train_frames": len(train_set), "val_frames": len(val_set), "mirrored": True,
                 "labels": "catalogue names + wall/floor/ceiling/poster; ScanNet ids only for validation scores",
                 "vocabulary": vocab},
        "split": split_table(extra=args.models == "train_extra"),
        "metrics": {"val_cell_miou": round(final.miou, 4), "val_cell_macc": round(final.macc, 4),
                    "val_per_class_iou": per_class(final), "history": history},
        "heldout_names": heldout,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1)},
        "machine": {"device": str(device), "threads": args.threads, "torch": torch.__version__,
                    "platform": platform.platform()},
    }
    ckpt = {"config": head.config, "state_dict": {k: v.cpu() for k, v in head.state_dict().items()},
            "meta": {k: meta[k] for k in ("backbone", "image_width", "templates", "command")}}
    if tail is not None:
        ckpt["trunk"] = {"first_block": tail.first, "state_dict": {k: v.cpu() for k, v in tail.state_dict().items()}}
    torch.save(ckpt, out / "lseg_head.pt")
    (out / "lseg_head.json").write_text(json.dumps(meta, indent=1))
    log(f"wrote {out / 'lseg_head.pt'}: validation cell mIoU {final.miou:.3f}, train {t_train:.0f} s")
    return meta


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="geopurify-train-features", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seeds", default="1000-1159", help="training room seeds (>= 1000), e.g. 1000-1159")
    ap.add_argument("--val-seeds", default="1900-1907", help="validation room seeds (>= 1000, disjoint)")
    ap.add_argument("--frames", type=int, default=16, help="frames rendered per room")
    ap.add_argument("--models", choices=("train", "train_extra"), default="train",
                    help="catalogue models of the training rooms: the training split, or it plus Sweet Home 3D's "
                         "default catalogue (training-only; needs scripts/setup.sh to have unpacked it); validation "
                         "rooms always use the training split")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--tau", type=float, default=0.07, help="softmax temperature on cosine similarities")
    ap.add_argument("--hidden", type=int, default=128, help="decoder channels")
    ap.add_argument("--image-width", type=int, default=448)
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--init", default="", help="start from this trained head checkpoint (same image width)")
    ap.add_argument("--train-stride32", action="store_true",
                    help="also fine-tune the backbone's stride-32 stage (saved in the checkpoint)")
    ap.add_argument("--trunk-lr", type=float, default=1e-4, help="learning rate of the stride-32 stage")
    ap.add_argument("--distill", nargs="*", default=[], metavar="HEAD",
                    help="trained head checkpoints whose normalised mean embedding the head also learns to match")
    ap.add_argument("--distill-weight", type=float, default=10.0,
                    help="weight of the cosine distillation loss against the label cross-entropy")
    ap.add_argument("--text-smoothing", type=float, default=0.0, metavar="EPS",
                    help="move EPS of each cell's target onto the other training texts, by text similarity; "
                         "0 = one-hot")
    ap.add_argument("--templates", nargs="*", default=None, help="text templates (default: 'a photo of a {}.')")
    ap.add_argument("--labels", default=None, help="labels.yaml for validation scores (default config/labels.yaml)")
    ap.add_argument("--holdout-names", type=float, default=0.0, metavar="F",
                    help="leave about F of each class's catalogue names out of training and report validation on "
                         "their cells too (name-disjoint validation: furniture the head never saw); 0 = off")
    ap.add_argument("--holdout-seed", type=int, default=7, help="seed of the --holdout-names draw")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        train(args)
    except ValueError as exc:
        print(f"geopurify-train-features: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
