"""Fine-tune resnest50_fast_4s1x64d (one logit) on ISIC data; the recipe the seed never published.

    .venv/bin/python -m train --labels train.csv --images jpeg/ --out runs/r1 [--epochs 15]
    .venv/bin/python -m train --labels 2020/train.csv --labels ISIC_2019_Training_GroundTruth.csv \\
        --labels ISIC_2019_Training_Metadata.csv --images 2020/jpeg --images 2019/ --val-source 2020 --out runs/r2
    .venv/bin/python -m train --out runs/r1 --resume          # after an interruption: same result

Label files in every layout isic/labels.py reads (SIIM-ISIC 2020, ISIC 2019 with its metadata, ISIC 2024, an
isic-cli download folder), several at once: each image keeps its source, an image listed twice is used once,
and images sharing a patient or a lesion stay on one side of the split. Starts from the published ImageNet
weights (--init imagenet, the default; through torch hub's cache) or --init scratch or a checkpoint.

What the SIIM-ISIC 2020 solutions did: a patient-grouped, stratified train/validation split; flips,
transpose, shift-scale-rotate, brightness/contrast, hue and coarse-dropout augmentation; BCE on the logit
(optionally weighting the ~1.8 % positives); AdamW with linear warm-up and cosine decay; validation AUC
with the 8-view TTA that serving uses, through handler/pipeline.py. Writes OUT/best.ckpt (highest
validation AUC, Lightning layout: ./build_mar.sh OUT/best.ckpt packs it, with the preprocessing it records) and
OUT/last.ckpt (everything needed to resume, written every --save-every steps and at each epoch's end). Nothing is
downloaded but the ImageNet weights, once, into torch hub's cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from exporter.checkpoint import ARCHITECTURE, CheckpointError, build_model, load_checkpoint  # noqa: E402
from handler.archive import cpu_flags  # noqa: E402
from handler.pipeline import IMAGE_SIZE, PipelineConfig, Scorer  # noqa: E402
from isic import metrics  # noqa: E402
from isic.labels import INDETERMINATE_POLICIES  # noqa: E402
from train.data import (  # noqa: E402
    DataError,
    augmentation,
    build_cache,
    eval_tensors,
    grouped_split,
    load_dataset,
    train_batch,
)
from train.imagenet import InitError, imagenet_model  # noqa: E402

LAST, BEST, PROGRESS, SPLIT = "last.ckpt", "best.ckpt", "progress.json", "split.json"
PREFIX = "model."  # the LightningModule attribute the weights sit under, as in the seed's checkpoint


INITS = ("imagenet", "scratch")  # --init keywords; anything else is a checkpoint's path
START_KEYS = ("init_weights", "init_url", "init_sha256")  # what a checkpoint records about the run's start


@dataclass(frozen=True)
class Settings:
    """Everything that decides the result; stored in every checkpoint and checked on --resume."""

    labels: tuple[str, ...]  # one or several label files (a single str in checkpoints of one file)
    images: tuple[str, ...]
    init: str | None = "imagenet"  # "imagenet", "scratch" or a checkpoint's path; None: scratch (older checkpoints)
    epochs: int = 15
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    pos_weight: float = 1.0
    val_fraction: float = 0.2
    seed: int = 42
    augment: bool = True
    precision: str = "fp32"  # resolved: fp32 or bf16 (autocast)
    device: str = "cpu"  # resolved: cpu or cuda
    image_size: int = IMAGE_SIZE
    # Torch's intra-op threads: they decide the order of the fp32 sums, so the weights to the last bit. A resumed
    # run keeps the interrupted run's count; 0 in checkpoints written before it was recorded.
    threads: int = 0
    val_source: str | None = None  # validate on this source's images only (e.g. "2020")
    indeterminate: str = "exclude"  # isic-cli downloads: what Indeterminate diagnoses count as

    def __post_init__(self) -> None:
        for name in ("labels", "images"):  # one file was a str before several were read
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


def recorded(was: dict[str, Any]) -> dict[str, Any]:
    """An interrupted run's hyper_parameters as Settings fields: a field written before it existed takes its
    default where that default is what the run did (labels as one str, no --val-source, Indeterminate excluded),
    and init None (before --init imagenet) is scratch."""
    out = {k: was[k] for k in Settings.__dataclass_fields__ if k in was}
    for k, f in Settings.__dataclass_fields__.items():
        if k not in out and k not in ("labels", "images", "init"):
            out[k] = f.default
    out["init"] = was.get("init") or "scratch"
    return asdict(Settings(**out))


class TrainError(Exception):
    pass


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but this torch sees no CUDA GPU (a CPU-only torch, or no driver)")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """bf16 autocast where the hardware runs it natively (AVX512-BF16/AMX on CPU, bf16 on CUDA)."""
    if device == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        native = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        print("train: warning: this device has no native bf16: autocast is emulated and slower than fp32",
              file=sys.stderr)
    return precision


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to `base` over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1]).permutation(n)


def lightning_dict(model: nn.Module, settings: Settings, cfg: PipelineConfig, epoch: int, step: int,
                   best_auc: float, extra: dict[str, Any] | None = None,
                   start: dict[str, str] | None = None) -> dict[str, Any]:
    """The layout of a PyTorch Lightning checkpoint (weights under 'model.'), with only plain types in
    it, so that torch.load(weights_only=True) reads it without allow-listing anything. hyper_parameters holds
    the whole pipeline config the network was trained and validated with ("pipeline"): build_mar.sh builds the
    archive from it. `start`: what the run started from (the ImageNet file and its SHA-256)."""
    return {
        "state_dict": {PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
        "epoch": epoch,
        "global_step": step,
        "hyper_parameters": {**asdict(settings), "architecture": ARCHITECTURE, "num_classes": 1,
                             "pipeline": cfg.to_mapping(), **(start or {})},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_auc', 'mode': 'max'}": {"best_model_score": best_auc}},
        **(extra or {}),
    }


def save_atomic(obj: Any, path: Path) -> None:
    """Write next to the target and rename: a kill mid-write leaves the previous file intact."""
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def validate(model: nn.Module, tensors: Sequence[torch.Tensor], cfg: PipelineConfig, device: str,
             batch: int) -> np.ndarray:
    """Probabilities with serving's TTA (handler/pipeline.py's Scorer: all views, mean of sigmoids)."""
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device)).float().cpu()

    scorer = Scorer(forward, cfg)
    out = []
    for i in range(0, len(tensors), batch):
        out += scorer.predict(tensors[i:i + batch])
    model.train()
    return np.array(out)


def initial_model(init: str | None) -> tuple[nn.Module, dict[str, str]]:
    """The network a run starts from, and what to record about that start."""
    if init in (None, "scratch"):
        return build_model(1), {}
    if init == "imagenet":
        try:
            return imagenet_model()
        except InitError as e:
            raise TrainError(str(e)) from None
    try:
        ckpt = load_checkpoint(init)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if ckpt.outputs != 1 or not isinstance(ckpt.module, nn.Module) or isinstance(ckpt.module, torch.jit.ScriptModule):
        raise TrainError(f"{init}: --init needs a one-logit {ARCHITECTURE} checkpoint with its weights by name")
    return ckpt.module, {"init_sha256": ckpt.sha256}


def thread_note(was: dict[str, Any], settings: Settings) -> str | None:
    """The warning a resume on another thread count deserves (it runs: the result is still a trained network)."""
    if was.get("threads", settings.threads) == settings.threads:
        return None
    return (f"train: warning: the interrupted run used {was['threads']} torch thread(s), this one uses "
            f"{settings.threads}: the weights will differ from an uninterrupted run's (the thread count orders the "
            "fp32 sums, and training amplifies the round-off)")


def run(settings: Settings, out: Path, *, resume: bool, save_every: int, workers: int, progress: bool) -> dict:
    cfg = PipelineConfig(image_size=settings.image_size)
    dataset = load_dataset([Path(p) for p in settings.labels], [Path(p) for p in settings.images],
                           settings.indeterminate)
    split = grouped_split(dataset.rows, settings.val_fraction, settings.seed, settings.val_source)
    train_idx, val_idx = split.train, split.validation
    where = {dataset.rows[i].name: side for side, idx in (("train", train_idx), ("validation", val_idx))
             for i in idx}
    if dataset.labels is not None:  # the table, before any training: what was read, kept, excluded, and why
        for line in dataset.labels.table(where):
            print(f"train: {line}", file=sys.stderr)
    if split.unused:
        print(f"train: {len(split.unused)} image(s) of other sources unused: they share a patient or lesion with "
              f"a validation image (--val-source {settings.val_source})", file=sys.stderr)
    if len(train_idx) < settings.batch_size:
        raise DataError(f"only {len(train_idx)} training image(s) for a batch of {settings.batch_size}: "
                        "lower --batch-size or add images")
    out.mkdir(parents=True, exist_ok=True)
    state = None
    if resume:
        if not (out / LAST).exists():
            raise TrainError(f"--resume: {out / LAST} does not exist; start without --resume")
        state = torch.load(out / LAST, map_location="cpu", weights_only=True)
        was = state["hyper_parameters"]
        then = recorded(was)
        changed = [k for k, v in asdict(settings).items() if k != "threads" and then[k] != v]
        if changed:
            raise TrainError(f"--resume: {', '.join(changed)} differ from the interrupted run's; resume with the "
                             "same settings or train into a new --out")
        note = thread_note(was, settings)
        if note:
            print(note, file=sys.stderr)

    # The start before the cache: a refused --init costs seconds, not the decoding of every image first.
    torch.manual_seed(settings.seed)
    if state is None:
        model, start = initial_model(settings.init)
    else:  # the weights come from last.ckpt: the start is not fetched again (the ImageNet file may be gone)
        model, start = build_model(1), {k: v for k, v in state["hyper_parameters"].items() if k in START_KEYS}
    bar = _bar(progress, len(dataset.paths), "caching images")
    cache = build_cache(dataset.paths, cfg, out / "cache", workers, bar.update if bar else None)
    if bar:
        bar.close()
    write_json({"train": [dataset.rows[i].name for i in train_idx],
                "validation": [dataset.rows[i].name for i in val_idx],
                "unused": [dataset.rows[i].name for i in split.unused]}, out / SPLIT)

    model = model.to(settings.device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = len(train_idx) // settings.batch_size  # the last partial batch is dropped (BatchNorm)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup_epochs * steps_per_epoch))
    epoch, step_in_epoch, step, best_auc, history = 0, 0, 0, -1.0, []
    if state is not None:
        model.load_state_dict({k[len(PREFIX):]: v for k, v in state["state_dict"].items()})
        opt.load_state_dict(state["optimizer_states"][0])
        torch.set_rng_state(state["rng_state"])
        epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["global_step"]
        best_auc, history = state["best_auc"], list(state["history"])
        print(f"train: resuming at epoch {epoch + 1}, step {step_in_epoch} of {steps_per_epoch} "
              f"(global step {step})", file=sys.stderr)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([settings.pos_weight], device=settings.device))
    aug = augmentation() if settings.augment else None
    val_tensors = eval_tensors(cache, val_idx, cfg)
    y_train = dataset.targets[train_idx]
    y_val = dataset.targets[val_idx]
    autocast = settings.precision == "bf16"

    def save_last() -> None:
        extra = {"optimizer_states": [opt.state_dict()], "lr_schedulers": [{"warmup": warmup, "total": total}],
                 "step_in_epoch": step_in_epoch, "rng_state": torch.get_rng_state(), "best_auc": best_auc,
                 "history": history}
        save_atomic(lightning_dict(model, settings, cfg, epoch, step, best_auc, extra, start), out / LAST)
        write_json({"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": step,
                    "steps_per_epoch": steps_per_epoch, "best_auc": best_auc}, out / PROGRESS)

    stop = {"now": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while epoch < settings.epochs:
            order = [train_idx[i] for i in epoch_order(len(train_idx), settings.seed, epoch)]
            bar = _bar(progress, steps_per_epoch * settings.batch_size, f"epoch {epoch + 1}/{settings.epochs}",
                       initial=step_in_epoch * settings.batch_size)
            t0, seen, running = time.perf_counter(), 0, None
            while step_in_epoch < steps_per_epoch:
                lo = step_in_epoch * settings.batch_size
                idx = order[lo:lo + settings.batch_size]
                x = train_batch(cache, idx, aug, cfg, settings.seed, epoch, lo).to(settings.device)
                y = torch.tensor(dataset.targets[idx], dtype=torch.float32, device=settings.device)[:, None]
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, warmup, settings.lr)
                with torch.autocast(settings.device, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                if not torch.isfinite(loss):
                    raise TrainError(f"the loss became {float(loss)} at step {step}: lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_in_epoch += 1
                step += 1
                seen += len(idx)
                value = loss.item()
                running = value if running is None else 0.9 * running + 0.1 * value
                if bar:
                    bar.set_postfix(loss=f"{running:.4f}", img_s=f"{seen / (time.perf_counter() - t0):.1f}",
                                    refresh=False)
                    bar.update(len(idx))
                if stop["now"]:
                    save_last()
                    raise TrainError(f"stopped by SIGTERM at epoch {epoch + 1}, step {step_in_epoch}; "
                                     f"{out / LAST} saved: resume with --resume")
                if save_every and step % save_every == 0 and step_in_epoch < steps_per_epoch:
                    save_last()
            if bar:
                bar.close()
            train_rate = seen / (time.perf_counter() - t0) if seen else float("nan")
            p = validate(model, val_tensors, cfg, settings.device, max(1, settings.batch_size // 8))
            auc = metrics.auc(y_val, p)
            record = {"epoch": epoch + 1, "step": step, "train_loss": running, "val_auc": auc,
                      "train_images_per_s": train_rate}
            history.append(record)
            print(f"train: epoch {epoch + 1}/{settings.epochs}: loss {running:.4f}, validation AUC {auc:.4f} "
                  f"({len(y_val)} images, {int(y_val.sum())} melanoma, {cfg.tta_views}-view TTA), "
                  f"{train_rate:.1f} images/s", file=sys.stderr)
            epoch += 1
            step_in_epoch = 0
            if auc > best_auc:
                best_auc = auc
                save_atomic(lightning_dict(model, settings, cfg, epoch, step, best_auc,
                                           {"val_auc": auc, "history": history}, start), out / BEST)
            save_last()
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = {"best_val_auc": best_auc, "history": history, "train_images": len(train_idx),
               "train_positives": int(y_train.sum()), "validation_images": len(val_idx),
               "validation_positives": int(y_val.sum()), "unused_images": len(split.unused),
               "sources": _source_counts(dataset, where), "pipeline": cfg.to_mapping(), **start,
               "settings": asdict(settings)}
    write_json(summary, out / "summary.json")
    return summary


def _source_counts(dataset: Any, where: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per source: images kept, melanomas, train/validation counts, and excluded rows by reason."""
    out: dict[str, dict[str, Any]] = {}
    for s in dataset.labels.sources if dataset.labels is not None else []:
        mine = [r for r in dataset.rows if r.source == s.name]
        if s.layout.key == "2019-metadata":
            continue
        out[s.name] = {"file": str(s.path), "layout": s.layout.title, "images": len(mine),
                       "melanoma": sum(r.target for r in mine),
                       "train": sum(where.get(r.name) == "train" for r in mine),
                       "validation": sum(where.get(r.name) == "validation" for r in mine),
                       "excluded": dict(s.excluded)}
    return out


def _bar(enabled: bool, total: int, desc: str, initial: int = 0) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True, file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Settings("", "")
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", action="append", metavar="CSV_OR_FOLDER",
                    help="a label file, repeatable: SIIM-ISIC 2020 train.csv, ISIC 2019 ground truth (and its "
                    "metadata CSV for the lesions), ISIC 2024 train-metadata.csv, or an isic-cli download folder "
                    "(its metadata.csv); told apart by their columns. Not needed with --resume")
    ap.add_argument("--images", action="append", metavar="FOLDER",
                    help="a folder holding the images (searched recursively), repeatable")
    ap.add_argument("--out", required=True, help="run folder: best.ckpt, last.ckpt, summary.json, cache/")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    ap.add_argument("--init", metavar="imagenet|scratch|CKPT",
                    help="imagenet (default): the published ImageNet weights through torch hub's cache, with a new "
                    "one-logit head; scratch: random weights; or a checkpoint (any form build_mar.sh reads)")
    ap.add_argument("--image-size", type=int, default=d.image_size,
                    help=f"the model's input side in pixels (default {d.image_size}, the seed's); recorded in the "
                    "checkpoint, so build_mar.sh builds the archive at it")
    ap.add_argument("--val-source", metavar="SOURCE",
                    help="validate on this source's images only (a layout's name in the table: 2020, 2019, 2024, "
                    "archive), as the 2020 winners did; its --val-fraction goes to validation")
    ap.add_argument("--indeterminate", choices=INDETERMINATE_POLICIES, default=d.indeterminate,
                    help="isic-cli downloads: Indeterminate diagnoses are excluded (default), benign or malignant")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    ap.add_argument("--pos-weight", default="1",
                    help="BCE weight of melanoma images: a number, or 'auto' for negatives/positives in the labels")
    ap.add_argument("--val-fraction", type=float, default=d.val_fraction)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--no-augment", action="store_true", help="train on the served pixels only")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="bf16 autocast where the CPU (AVX512-BF16/AMX) or GPU runs it natively (default auto)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--save-every", type=int, default=100, help="write last.ckpt every N steps (default 100)")
    ap.add_argument("--workers", type=int, default=0, help="decode threads for the cache (0: every CPU)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default; with --resume, the interrupted run's count)")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    last = Path(args.out) / LAST
    was = None
    if args.resume and last.exists():
        was = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    # --threads, else the interrupted run's count (on one core torch's default is 1, and a run trained with 2
    # then resumed with 1 came out other weights), else torch's default for this process's CPUs.
    threads = args.threads or (was or {}).get("threads") or torch.get_num_threads()
    if was is not None and not args.labels:
        # Everything but the run folder and the thread count comes from the interrupted run.
        return Settings(**{**recorded(was), "threads": threads})
    if not args.labels or not args.images:
        raise TrainError("--labels and --images are required (except with --resume)")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0:
        raise TrainError("--lr must be positive, --weight-decay and --warmup-epochs >= 0")
    try:
        PipelineConfig(image_size=args.image_size)
    except ValueError as e:
        raise TrainError(f"--image-size: {e}") from None
    device = resolve_device(args.device)
    labels = tuple(str(Path(p).resolve()) for p in args.labels)
    images = tuple(str(Path(p).resolve()) for p in args.images)
    if args.pos_weight == "auto":
        rows = load_dataset([Path(p) for p in labels], [Path(p) for p in images], args.indeterminate).rows
        pos = sum(r.target for r in rows)
        pos_weight = (len(rows) - pos) / pos
    else:
        try:
            pos_weight = float(args.pos_weight)
        except ValueError:
            raise TrainError(f"--pos-weight must be a number or 'auto', got {args.pos_weight}") from None
        if pos_weight <= 0:
            raise TrainError("--pos-weight must be positive")
    # --init: a keyword, or a checkpoint's path; left out, the interrupted run's start (a resume that names its
    # labels again), else ImageNet.
    init = args.init or (recorded(was)["init"] if was is not None else INITS[0])
    return Settings(
        labels=labels, images=images, init=init if init in INITS else str(Path(init).resolve()),
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, pos_weight=pos_weight, val_fraction=args.val_fraction,
        seed=args.seed, augment=not args.no_augment, precision=resolve_precision(args.precision, device),
        device=device, image_size=args.image_size, threads=threads, val_source=args.val_source,
        indeterminate=args.indeterminate)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
        torch.set_num_threads(settings.threads)
        print(f"train: {ARCHITECTURE}, {settings.image_size} px, {settings.device}, {settings.precision}, "
              f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
        summary = run(settings, Path(args.out), resume=args.resume, save_every=args.save_every,
                      workers=args.workers, progress=not args.no_progress and sys.stderr.isatty())
    except (DataError, TrainError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"train: interrupted; resume with: python -m train --out {args.out} --resume", file=sys.stderr)
        return 130
    best = Path(args.out) / BEST
    print(f"best validation AUC {summary['best_val_auc']:.4f}: {best}")
    print(f"serve it: scripts/serve.sh {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
