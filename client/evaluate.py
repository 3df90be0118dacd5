#!/usr/bin/env python3
"""Evaluate a deployment on labelled ISIC images: AUC, partial AUC above 80 % TPR and average precision with
their intervals, overall, per source and per subgroup of the metadata, and clinical operating points.

    python client/evaluate.py --labels train.csv --images jpeg/ [--url http://127.0.0.1:8080]
    python client/evaluate.py --labels isic-download/ --images isic-download/ --offline model_store/melanoma.mar
    python client/evaluate.py --labels 2020/train.csv --labels ISIC_2019_Training_GroundTruth.csv \\
        --labels ISIC_2019_Training_Metadata.csv --images 2020/jpeg --images 2019/ --compare model_store/melanoma.mar

Label files: every layout isic/labels.py reads (SIIM-ISIC 2020 train.csv, ISIC 2019 ground truth and its
metadata, ISIC 2024 train-metadata.csv, an isic-cli download folder), several at once.
Writes OUT/scores.csv (image, target, probability; resumable), OUT/summary.json, OUT/roc.png (ROC with its band
and operating points, and the precision-recall curve) and OUT/reliability.png; --scores-csv a submission file.
Needs the evaluation extra (scikit-learn, matplotlib): pip install 'melanoma-client[evaluation]'.
The demo model's AUC means nothing: it is untrained.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
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
from isic.labels import (  # noqa: F401 (read_label_rows, read_labels, LabelRow: re-exported)
    INDETERMINATE_POLICIES,
    LabelError,
    LabelRow,
    LabelSet,
    find_images,
    read_label_rows,
    read_labels,
    read_sources,
)

EXTRA = ("client/evaluate.py computes its figures with scikit-learn and draws them with matplotlib ({missing} is not "
         "installed): pip install 'melanoma-client[evaluation]', or in the repository's .venv: .venv/bin/pip install "
         "-r requirements-evaluation.txt")


def evaluation_modules() -> tuple[Any, Any]:
    """isic.evaluation and client.figures, or ClientError (one line) saying how to install the extra."""
    try:
        from client import figures
        from isic import evaluation
    except ModuleNotFoundError as e:
        raise ClientError(EXTRA.format(missing=e.name)) from None
    return evaluation, figures


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
    from exporter.checkpoint import ARCHITECTURE, CheckpointError, load_checkpoint, pipeline_config
    from exporter.export import export_torchscript
    from handler.archive import ArchiveMetadata, LoadedArchive, load_model
    from handler.pipeline import Scorer

    try:
        ckpt = load_checkpoint(p)
        cfg, notice = pipeline_config(ckpt, {}, {})  # as build_mar.sh would build it: its recorded preprocessing
    except CheckpointError as e:
        raise ClientError(str(e)) from None
    if notice and ckpt.pipeline is None:
        print(f"evaluate: notice: {notice}", file=sys.stderr)
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


def bootstrap_unit(groups: list[str]) -> str:
    """What the intervals resample: the kinds of group (isic/labels.py: patient, lesion) holding several images,
    else single images."""
    seen: dict[str, int] = {}
    for g in groups:
        seen[g] = seen.get(g, 0) + 1
    kinds = sorted({g.split(":", 1)[0] for g, k in seen.items() if k > 1})
    return "/".join(kinds) or "image"


def summarize(labels: dict[str, int], scores: dict[str, float], threshold: float,
              groups: dict[str, str] | None = None) -> dict[str, Any]:
    """AUC, partial AUC above 80 % TPR and average precision (scikit-learn's) with intervals that resample
    patients or lesions when the label files name them; calibration and operating points."""
    evaluation, _ = evaluation_modules()
    names = [n for n in labels if n in scores]
    y = np.array([labels[n] for n in names])
    p = np.array([scores[n] for n in names])
    out: dict[str, Any] = {"scored": len(names), "positives": int(y.sum()), "negatives": int(len(y) - y.sum())}
    if y.all() or not y.any():
        out["error"] = "AUC needs both melanomas and benign lesions among the scored images"
        return out
    sens, spec = metrics.sens_spec(y, p, threshold)
    g = [groups[n] for n in names] if groups else [f"image:{n}" for n in names]
    unit = bootstrap_unit(g)
    grouped = np.array(g) if unit != "image" else None
    f = evaluation.figures(y, p, grouped)
    sens_ci, spec_ci = metrics.sens_spec_ci(y, p, threshold, groups=grouped)
    out.update({
        "auc": f["auc"], "auc_95ci": f["auc_95ci"], "bootstrap": unit,
        "partial_auc_above_80_tpr": f["pauc_above_80_tpr"],
        "partial_auc_above_80_tpr_95ci": f["pauc_above_80_tpr_95ci"],
        "average_precision": f["average_precision"], "average_precision_95ci": f["average_precision_95ci"],
        "threshold": threshold, "sensitivity_at_threshold": sens, "sensitivity_at_threshold_95ci": list(sens_ci),
        "specificity_at_threshold": spec, "specificity_at_threshold_95ci": list(spec_ci),
        "ece": metrics.expected_calibration_error(y, p), "brier": metrics.brier(y, p),
    })
    for target in (0.95, 0.90):
        t, s, sp = metrics.threshold_for_sensitivity(y, p, target)
        out[f"threshold_for_{int(target * 100)}_sensitivity"] = {"threshold": t, "sensitivity": s,
                                                                 "specificity": sp}
    return out


def write_submission(path: Path, label_set: LabelSet, scores: dict[str, float]) -> None:
    """The challenge's submission layout: SIIM-ISIC 2020's `image_name,target` (the probability as target), or
    `isic_id,target` when every source names images by isic_id (ISIC 2024, isic-cli downloads)."""
    by_isic_id = all(s.layout.name_column == "isic_id" for s in label_set.sources)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["isic_id" if by_isic_id else "image_name", "target"])
        for r in label_set.rows:
            if r.name in scores:
                w.writerow([r.name, f"{scores[r.name]:.10f}"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", required=True, action="append", metavar="CSV_OR_FOLDER",
                    help="a label file, repeatable: SIIM-ISIC 2020 train.csv, ISIC 2019 ground truth (and its metadata "
                    "CSV), ISIC 2024 train-metadata.csv, or an isic-cli download folder")
    ap.add_argument("--images", required=True, action="append", metavar="FOLDER",
                    help="a folder holding the images (searched recursively), repeatable")
    ap.add_argument("--indeterminate", choices=INDETERMINATE_POLICIES, default="exclude",
                    help="isic-cli downloads: Indeterminate diagnoses are excluded (default), benign or malignant")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--offline", metavar="ARCHIVE_OR_CHECKPOINT", help="score in-process, no server")
    mode.add_argument("--compare", metavar="ARCHIVE_OR_CHECKPOINT",
                      help="score served and offline; report the largest |dp|")
    ap.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
    ap.add_argument("--scores-csv", metavar="PATH",
                    help="also write the scores in the challenge's submission layout (image_name,target or "
                    "isic_id,target)")
    add_server_args(ap)
    ap.add_argument("--threshold", type=float, help="operating point to report (default: the archive's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        evaluation, figures = evaluation_modules()
        label_set = read_sources([Path(x) for x in args.labels], args.indeterminate)
    except (LabelError, ClientError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    rows = label_set.rows
    labels = {r.name: r.target for r in rows}
    groups = {r.name: r.group for r in rows}
    folders = [Path(x) for x in args.images]
    for folder in folders:
        if not folder.is_dir():
            print(f"evaluate: error: image folder {folder} does not exist", file=sys.stderr)
            return 2
    images, missing = find_images(folders, list(labels))
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
    if args.scores_csv:
        write_submission(Path(args.scores_csv), label_set, scores)
    threshold = args.threshold if args.threshold is not None else info.get("threshold", 0.5)
    summary = summarize(labels, scores, threshold, groups)
    summary.update({
        "labels": len(labels), "missing_images": len(missing), "missing_names": missing[:50],
        "unreadable_images": len(failed), "unreadable": dict(list(failed.items())[:50]),
        "model": info.get("model"), "tta_views": info.get("tta_views"),
        "mode": "offline" if args.offline else "served",
        "sources": {s.name: {"file": str(s.path), "layout": s.layout.title,
                             "images": sum(r.source == s.name for r in rows),
                             "melanoma": sum(r.target for r in rows if r.source == s.name),
                             "excluded": dict(s.excluded)}
                    for s in label_set.sources if s.layout.key != "2019-metadata"},
        **evaluation.breakdown(rows, scores),
    })
    if compare:
        summary["compare"] = compare
    demo = bool((info.get("model") or {}).get("demo"))
    if demo:
        summary["warning"] = "DEMO MODEL: untrained; this AUC means nothing"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    marks = [(summary["threshold"], "threshold")] if "auc" in summary else []
    marks += [(summary[f"threshold_for_{k}_sensitivity"]["threshold"], f"{k}% sensitivity") for k in ("95", "90")
              if "auc" in summary]
    names = [n for n in labels if n in scores]
    y = np.array([labels[n] for n in names], dtype=int)
    p = np.array([scores[n] for n in names])
    g = np.array([groups[n] for n in names]) if summary.get("bootstrap", "image") != "image" else None
    meaningless = "  (DEMO MODEL: meaningless)" if demo else ""
    figures.roc_png(y, p, g, out / "roc.png", f"{len(names)} images, {int(y.sum())} melanoma{meaningless}", marks,
                    summary.get("auc"), summary.get("average_precision"))
    figures.reliability_png(y, p, out / "reliability.png",
                            f"Reliability, ECE {summary.get('ece', float('nan')):.4f} ({metrics.ECE_BINS} bins)"
                            + meaningless)
    print_report(summary, out, label_set, evaluation)
    if args.scores_csv:
        print(f"wrote {args.scores_csv} (submission layout)")
    # Exit 1 when the report is incomplete: an image could not be scored, or the AUC is undefined.
    if failed:
        print(f"evaluate: {len(failed)} image(s) could not be scored (listed above and in summary.json)",
              file=sys.stderr)
    if "auc" not in summary:
        print(f"evaluate: {summary.get('error', 'no AUC')}", file=sys.stderr)
    return 1 if failed or "auc" not in summary else 0


def print_report(s: dict[str, Any], out: Path, label_set: LabelSet | None = None, evaluation: Any = None) -> None:
    if label_set is not None:
        for line in label_set.table():
            print(line)
    print(f"labels {s['labels']}, scored {s['scored']} ({s['positives']} melanoma, {s['negatives']} benign), "
          f"missing {s['missing_images']}, unreadable {s['unreadable_images']}")
    if s["missing_images"]:
        print(f"  missing: {', '.join(s['missing_names'][:10])}{' …' if s['missing_images'] > 10 else ''}")
    for name, err in list(s["unreadable"].items())[:10]:
        print(f"  unreadable: {name}: {err}")
    if "auc" in s:
        lo, hi = s["auc_95ci"]
        plo, phi = s["partial_auc_above_80_tpr_95ci"]
        alo, ahi = s["average_precision_95ci"]
        print(f"ROC AUC {s['auc']:.4f} (95% CI {lo:.4f}-{hi:.4f}, bootstrap by {s['bootstrap']}); "
              f"partial AUC above 80% TPR {s['partial_auc_above_80_tpr']:.4f} (95% CI {plo:.4f}-{phi:.4f}; max 0.2); "
              f"average precision {s['average_precision']:.4f} (95% CI {alo:.4f}-{ahi:.4f}; prevalence "
              f"{s['positives'] / s['scored']:.4f})")
        (slo, shi), (plo, phi) = s["sensitivity_at_threshold_95ci"], s["specificity_at_threshold_95ci"]
        print(f"at threshold {s['threshold']:.4f}: sensitivity {s['sensitivity_at_threshold']:.3f} (95% CI "
              f"{slo:.3f}-{shi:.3f}), specificity {s['specificity_at_threshold']:.3f} (95% CI {plo:.3f}-{phi:.3f})")
        print(f"calibration: ECE {s['ece']:.4f} ({metrics.ECE_BINS} bins), Brier {s['brier']:.4f}")
        for k in ("95", "90"):
            t = s[f"threshold_for_{k}_sensitivity"]
            print(f"threshold for >= {k}% sensitivity: {t['threshold']:.4f} (sensitivity {t['sensitivity']:.3f}, "
                  f"specificity {t['specificity']:.3f}); choose it on a validation set at build time: ./build_mar.sh "
                  f"CKPT --validation-images DIR --validation-labels CSV --sensitivity 0.{k} --force")
        if evaluation is not None:
            if s.get("per_source"):
                for line in evaluation.table("per source", s["per_source"]):
                    print(line)
            for column, rows in s.get("subgroups", {}).items():
                for line in evaluation.table(evaluation.SUBGROUPS[column], rows):
                    print(line)
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
