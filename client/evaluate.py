#!/usr/bin/env python3
"""Evaluate a deployment on ISIC-format labelled images: AUC and clinical operating points.

    python client/evaluate.py --labels train.csv --images jpeg/ [--url http://127.0.0.1:8080]
    python client/evaluate.py --labels train.csv --images jpeg/ --offline model_store/melanoma.mar
    python client/evaluate.py --labels train.csv --images jpeg/ --compare model_store/melanoma.mar

Label files: SIIM-ISIC 2020 train.csv (image_name, target) or ISIC 2019 ground truth (image, MEL).
Writes OUT/scores.csv (image, target, probability; resumable), OUT/summary.json, OUT/roc.png (with the
operating points) and OUT/reliability.png.
The demo model's AUC means nothing: it is untrained.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from client.tsclient import (
    AuthError,
    ClientError,
    OfflineScorer,
    add_server_args,
    client_from_args,
    server_module,
)
from isic import metrics
from isic.labels import LabelError, LabelRow, find_images, read_label_rows, read_labels  # noqa: F401 (re-exported)


def load_done(csv_path: Path) -> dict[str, float]:
    if not csv_path.exists():
        return {}
    with open(csv_path, newline="") as f:
        return {r["image"]: float(r["probability"]) for r in csv.DictReader(f) if r.get("probability")}


def make_scorer(args: argparse.Namespace, target: str | None = None) -> Any:
    if target:
        return offline_scorer(target)
    return client_from_args(args)


def offline_scorer(target: str) -> OfflineScorer:
    """A .mar or archive folder through the pipeline; a checkpoint is exported exactly as build_mar.sh does."""
    p = Path(target)
    if p.suffix == ".mar" or p.is_dir():
        return OfflineScorer.from_path(str(p))
    torch = server_module("torch")
    server_module("exporter.export")
    from exporter.checkpoint import ARCHITECTURE, CheckpointError, load_checkpoint
    from exporter.export import export_torchscript
    from handler.archive import ArchiveMetadata, LoadedArchive, load_model
    from handler.pipeline import PipelineConfig, Scorer

    cfg = PipelineConfig()
    try:
        ckpt = load_checkpoint(p)
    except CheckpointError as e:
        raise ClientError(str(e)) from None
    model = load_model(export_torchscript(ckpt, cfg.image_size))
    meta = ArchiveMetadata(version="offline", architecture=ARCHITECTURE, head=ckpt.head, outputs=ckpt.outputs,
                           checkpoint_form=ckpt.form, source_file=p.name, weights_sha256=ckpt.sha256)
    return OfflineScorer(LoadedArchive(Scorer(model, cfg), cfg, meta, torch.get_num_threads(), p))


def model_identity(res: dict[str, Any]) -> dict[str, Any]:
    """What decides a score: the weights, the archive's version, its precision, runtime, TTA views and
    calibration."""
    m = res.get("model") or {}
    return {"name": m.get("name"), "version": m.get("version"), "weights_sha256": m.get("weights_sha256"),
            "precision": m.get("precision", "fp32"), "runtime": m.get("runtime", "torchscript"),
            "tta_views": res.get("tta_views"), "calibration": res.get("calibration", {"method": "none"})}


def score_all(scorer: Any, images: dict[str, Path], done: dict[str, float], out_csv: Path, workers: int,
              progress: bool) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:
    """Score what is not in `done`, appending each result to the CSV as it arrives (resumable). A resume
    continues only with the model that wrote the earlier scores (recorded beside the CSV)."""
    record = out_csv.with_name(out_csv.stem + ".model.json")
    if done and not record.exists():
        raise ClientError(f"{out_csv} holds {len(done)} scores but no record of the model that wrote them "
                          f"({record.name}): use another --out, or delete it to start again")
    scores = dict(done)
    failed: dict[str, str] = {}
    info: dict[str, Any] = {}
    probe: tuple[str, dict[str, Any]] | None = None
    pending = [n for n in images if n not in done]
    for name in [*pending[:3], *[n for n in images if n in done][:3]]:  # who is scoring? (one request)
        try:
            probe = (name, scorer.predict_file(images[name]))
            break
        except ClientError:
            continue
    if probe is not None:
        ident = model_identity(probe[1])
        if done and json.loads(record.read_text()) != ident:
            raise ClientError(f"{out_csv} was written by another model ({record.name}: "
                              f"{json.loads(record.read_text())}); this one is {ident}: use another --out, "
                              "or delete it to start again")
        record.write_text(json.dumps(ident, indent=2) + "\n")
    todo = pending
    new_file = not out_csv.exists()
    bar = _progress_bar(len(todo)) if progress and todo else None
    with open(out_csv, "a", newline="") as f, ThreadPoolExecutor(max(1, workers)) as pool:
        w = csv.writer(f)
        if new_file:
            w.writerow(["image", "target", "probability"])
        futures = {pool.submit(_known_or_score, scorer, images[n], probe, n): n for n in todo}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                res = fut.result()
            except AuthError:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            except ClientError as e:
                failed[name] = str(e)
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            # Results arrive here one at a time (as_completed): no lock needed.
            scores[name] = res["probability"]
            info = {"threshold": res["threshold"], "model": res.get("model", {}), "tta_views": res["tta_views"]}
            w.writerow([name, "", f"{res['probability']:.10f}"])
            f.flush()
    if bar is not None:
        bar.close()
    if not info and probe is not None:  # everything was already scored: the probe says who
        res = probe[1]
        info = {"threshold": res["threshold"], "model": res.get("model", {}), "tta_views": res["tta_views"]}
    return scores, failed, info


def _known_or_score(scorer: Any, path: Path, probe: tuple[str, dict[str, Any]] | None, name: str) -> dict[str, Any]:
    return probe[1] if probe is not None and probe[0] == name else scorer.predict_file(path)


def _progress_bar(total: int) -> Any:
    """tqdm's bar (rate and ETA) where installed; a bare counter in a client-only install."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="scoring", file=sys.stderr)
    except ImportError:
        class Counter:
            n = 0

            def update(self, k: int) -> None:
                self.n += k
                print(f"\r  scored {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def close(self) -> None:
                print(file=sys.stderr)

        return Counter()


def summarize(labels: dict[str, int], scores: dict[str, float], threshold: float,
              groups: dict[str, str] | None = None) -> dict[str, Any]:
    """AUC and operating points; the AUC interval resamples patients when the label file names them."""
    names = [n for n in labels if n in scores]
    y = np.array([labels[n] for n in names])
    p = np.array([scores[n] for n in names])
    out: dict[str, Any] = {"scored": len(names), "positives": int(y.sum()), "negatives": int(len(y) - y.sum())}
    if y.all() or not y.any():
        out["error"] = "AUC needs both melanomas and benign lesions among the scored images"
        return out
    sens, spec = metrics.sens_spec(y, p, threshold)
    g = [groups[n] for n in names] if groups else None
    by_patient = g is not None and len(set(g)) < len(g)
    lo, hi = metrics.bootstrap_auc_ci(y, p, groups=np.array(g) if by_patient else None)
    sens_ci, spec_ci = metrics.sens_spec_ci(y, p, threshold, groups=np.array(g) if by_patient else None)
    out.update({
        "auc": metrics.auc(y, p), "auc_95ci": [lo, hi], "bootstrap": "patient" if by_patient else "image",
        "partial_auc_above_80_tpr": metrics.partial_auc_above_tpr(y, p, 0.8),
        "threshold": threshold, "sensitivity_at_threshold": sens, "sensitivity_at_threshold_95ci": list(sens_ci),
        "specificity_at_threshold": spec, "specificity_at_threshold_95ci": list(spec_ci),
        "ece": metrics.expected_calibration_error(y, p), "brier": metrics.brier(y, p),
    })
    for target in (0.95, 0.90):
        t, s, sp = metrics.threshold_for_sensitivity(y, p, target)
        out[f"threshold_for_{int(target * 100)}_sensitivity"] = {"threshold": t, "sensitivity": s,
                                                                 "specificity": sp}
    return out


class _Plot:
    """A square Pillow chart with [0, 1] axes, frame, diagonal, title and axis names (no plotting library
    needed on the server); the labelled images' targets and scores as arrays."""

    size, m = 480, 50

    def __init__(self, labels: dict[str, int], scores: dict[str, float], title: str, xlabel: str,
                 ylabel: str) -> None:
        from PIL import Image, ImageDraw

        names = [n for n in labels if n in scores]
        self.y = np.array([labels[n] for n in names])
        self.p = np.array([scores[n] for n in names], dtype=np.float64)
        self.img = Image.new("RGB", (self.size, self.size), "white")
        self.d = ImageDraw.Draw(self.img)
        self.d.rectangle([self.xy(0, 1), self.xy(1, 0)], outline="black")
        self.d.line([self.xy(0, 0), self.xy(1, 1)], fill=(180, 180, 180))
        self.d.text((self.m, 15), title, fill="black")
        self.d.text((self.size / 2 - 70, self.size - 30), xlabel, fill="black")
        self.d.text((8, self.m - 20), ylabel, fill="black")

    def xy(self, fx: float, fy: float) -> tuple[float, float]:
        return self.m + fx * (self.size - 2 * self.m), self.size - self.m - fy * (self.size - 2 * self.m)


def reliability_png(labels: dict[str, int], scores: dict[str, float], path: Path, title: str,
                    bins: int = metrics.ECE_BINS) -> None:
    """Reliability diagram: per equal-width probability bin, the observed melanoma frequency against the mean
    predicted probability (on the diagonal when calibrated); each dot's area follows its bin's image count."""
    c = _Plot(labels, scores, title, "mean predicted probability", "observed melanoma frequency")
    y, p = c.y.astype(np.float64), c.p
    if len(p):
        idx = np.minimum((p * bins).astype(int), bins - 1)
        points = []
        for b in range(bins):
            sel = idx == b
            if sel.any():
                cx, cy = c.xy(float(p[sel].mean()), float(y[sel].mean()))
                r = 3 + 12 * np.sqrt(sel.sum() / len(p))
                c.d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(200, 30, 30), width=2)
                points.append((cx, cy))
        if len(points) > 1:
            c.d.line(points, fill=(200, 30, 30), width=2)
    c.img.save(path)


def roc_png(labels: dict[str, int], scores: dict[str, float], path: Path, title: str,
            marks: Sequence[tuple[float, str]] = ()) -> None:
    """The ROC curve; `marks`: (threshold, name) operating points, drawn where they sit on the curve."""
    c = _Plot(labels, scores, title, "false positive rate", "sensitivity (TPR)")
    y, p = c.y, c.p
    c.d.line([c.xy(0, 0.8), c.xy(1, 0.8)], fill=(230, 200, 200))
    if y.any() and not y.all():
        r = metrics.roc_curve(y, p)
        c.d.line([c.xy(f, t) for f, t in zip(r.fpr, r.tpr, strict=True)], fill=(200, 30, 30), width=3)
        for i, (threshold, name) in enumerate(marks):
            sens, spec = metrics.sens_spec(y, p, threshold)
            cx, cy = c.xy(1 - spec, sens)
            c.d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], outline=(20, 60, 200), width=2)
            c.d.text((cx + 8, cy + 4 + 12 * i), f"{name} ({threshold:.3g})", fill=(20, 60, 200))
    c.img.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, help="SIIM-ISIC 2020 train.csv or ISIC 2019 ground-truth CSV")
    ap.add_argument("--images", required=True, help="folder holding the images (searched recursively)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--offline", metavar="ARCHIVE_OR_CHECKPOINT", help="score in-process, no server")
    mode.add_argument("--compare", metavar="ARCHIVE_OR_CHECKPOINT",
                      help="score served and offline; report the largest |dp|")
    ap.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    add_server_args(ap)
    ap.add_argument("--threshold", type=float, help="operating point to report (default: the archive's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        rows = read_label_rows(Path(args.labels))
    except LabelError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    labels = {r.name: r.target for r in rows}
    groups = {r.name: r.group for r in rows}
    folder = Path(args.images)
    if not folder.is_dir():
        print(f"evaluate: error: image folder {folder} does not exist", file=sys.stderr)
        return 2
    images, missing = find_images(folder, list(labels))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        served_scorer = make_scorer(args, args.offline)
        csv_path = out / "scores.csv"
        scores, failed, info = score_all(served_scorer, images, load_done(csv_path), csv_path,
                                         1 if args.offline else args.workers, progress)
        compare = None
        if args.compare:
            off_scores, off_failed, _ = score_all(offline_scorer(args.compare), images, load_done(out / "offline.csv"),
                                                  out / "offline.csv", 1, progress)
            common = [n for n in scores if n in off_scores]
            deltas = [abs(scores[n] - off_scores[n]) for n in common]
            compare = {"images": len(common), "max_abs_delta": max(deltas) if deltas else None,
                       "mean_abs_delta": float(np.mean(deltas)) if deltas else None}
    except AuthError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    except ClientError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2

    # Rewrite the CSV with targets, in label order (the appended file only held what arrived).
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "target", "probability"])
        for n in labels:
            if n in scores:
                w.writerow([n, labels[n], f"{scores[n]:.10f}"])
    threshold = args.threshold if args.threshold is not None else info.get("threshold", 0.5)
    summary = summarize(labels, scores, threshold, groups)
    summary.update({
        "labels": len(labels), "missing_images": len(missing), "missing_names": missing[:50],
        "unreadable_images": len(failed), "unreadable": dict(list(failed.items())[:50]),
        "model": info.get("model"), "tta_views": info.get("tta_views"),
        "mode": "offline" if args.offline else "served",
    })
    if compare:
        summary["compare"] = compare
    demo = bool((info.get("model") or {}).get("demo"))
    if demo:
        summary["warning"] = "DEMO MODEL: untrained; this AUC means nothing"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    marks = [(summary["threshold"], "threshold")] if "auc" in summary else []
    marks += [(summary[f"threshold_for_{k}_sensitivity"]["threshold"], f"{k}% sens.") for k in ("95", "90")
              if "auc" in summary]
    roc_png(labels, scores, out / "roc.png", f"ROC, AUC {summary.get('auc', float('nan')):.4f}"
            + ("  (DEMO MODEL: meaningless)" if demo else ""), marks)
    reliability_png(labels, scores, out / "reliability.png",
                    f"Reliability, ECE {summary.get('ece', float('nan')):.4f} ({metrics.ECE_BINS} bins, as drawn)"
                    + ("  (DEMO MODEL: meaningless)" if demo else ""))
    print_report(summary, out)
    # Exit 1 when the report is incomplete: an image could not be scored, or the AUC is undefined.
    if failed:
        print(f"evaluate: {len(failed)} image(s) could not be scored (listed above and in summary.json)",
              file=sys.stderr)
    if "auc" not in summary:
        print(f"evaluate: {summary.get('error', 'no AUC')}", file=sys.stderr)
    return 1 if failed or "auc" not in summary else 0


def print_report(s: dict[str, Any], out: Path) -> None:
    print(f"labels {s['labels']}, scored {s['scored']} ({s['positives']} melanoma, {s['negatives']} benign), "
          f"missing {s['missing_images']}, unreadable {s['unreadable_images']}")
    if s["missing_images"]:
        print(f"  missing: {', '.join(s['missing_names'][:10])}{' …' if s['missing_images'] > 10 else ''}")
    for name, err in list(s["unreadable"].items())[:10]:
        print(f"  unreadable: {name}: {err}")
    if "auc" in s:
        lo, hi = s["auc_95ci"]
        print(f"ROC AUC {s['auc']:.4f} (95% CI {lo:.4f}-{hi:.4f}, bootstrap by {s['bootstrap']}); "
              f"partial AUC above 80% TPR {s['partial_auc_above_80_tpr']:.4f} (max 0.2)")
        (slo, shi), (plo, phi) = s["sensitivity_at_threshold_95ci"], s["specificity_at_threshold_95ci"]
        print(f"at threshold {s['threshold']:.4f}: sensitivity {s['sensitivity_at_threshold']:.3f} (95% CI "
              f"{slo:.3f}-{shi:.3f}), specificity {s['specificity_at_threshold']:.3f} (95% CI {plo:.3f}-{phi:.3f})")
        print(f"calibration: ECE {s['ece']:.4f} ({metrics.ECE_BINS} bins), Brier {s['brier']:.4f}")
        for k in ("95", "90"):
            t = s[f"threshold_for_{k}_sensitivity"]
            print(f"threshold for >= {k}% sensitivity: {t['threshold']:.4f} (sensitivity {t['sensitivity']:.3f}, "
                  f"specificity {t['specificity']:.3f}); choose it on a validation set at build time: ./build_mar.sh "
                  f"CKPT --validation-images DIR --validation-labels CSV --sensitivity 0.{k} --force")
    else:
        print(s.get("error", ""))
    if "compare" in s:
        c = s["compare"]
        print(f"served vs offline on {c['images']} images: max |dp| {c['max_abs_delta']:.2e}")
    if s.get("warning"):
        print(f"WARNING: {s['warning']}")
    print(f"wrote {out / 'scores.csv'}, {out / 'summary.json'}, {out / 'roc.png'}, {out / 'reliability.png'}")


def cli() -> None:
    """Console-script entry point (pip install .)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
