"""Build model_store/melanoma.mar from a checkpoint (or the demo weights). Called by build_mar.sh.

Fails fast with one line on stderr and a non-zero exit, and never leaves a half-written file in
the output folder: everything is staged in a temporary folder and moved in with one rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, NoReturn

import yaml

from exporter.calibration import (
    CalibrationError,
    calibration_record,
    fit_temperature,
    operating_point,
    report,
    score_validation_set,
)
from exporter.checkpoint import ARCHITECTURE, CheckpointError, file_sha256, load_checkpoint, pipeline_config
from exporter.export import (
    EXPLAIN_LAYER,
    ExportError,
    demo_checkpoint,
    export_bf16,
    export_explainer,
    export_int8,
    export_openvino,
    export_torchscript,
    feature_sizes,
)
from exporter.ood import PERCENTILE, OodError
from exporter.ood import fit as fit_ood
from exporter.precision import PrecisionError, calibration_images, load_tensors, measure, split_for_int8
from handler.archive import (
    COMPILED_MODEL_FILE,
    EXPLAIN_FILE,
    EXPLAIN_METHOD,
    METADATA_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    ONNX_MODEL_FILE,
    RUNTIMES,
    ArchiveMetadata,
    load_model,
    release_memory,
)
from handler.checks import OOD_FILE, QualityLimits
from handler.pipeline import IMAGE_SIZE, INTERPOLATIONS, TTA_CHOICES, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
HANDLER_DIR = ROOT / "handler"


def handler_files(folder: Path = HANDLER_DIR) -> list[Path]:
    """The handler package, whole: every module in handler/, so a new one cannot be left out of the .mar
    (a hand-kept list would fail only when served)."""
    return sorted(f for f in folder.glob("*.py") if f.is_file())


class BuildError(Exception):
    pass


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line, like every other build error (argparse would print the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"build_mar: error: {message} (./build_mar.sh --help lists the options)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = OneLineParser(
        prog="build_mar.sh",
        description="Pack a melanoma ResNeSt checkpoint (or, with none, the untrained demo model) "
        "into a TorchServe archive.",
    )
    ap.add_argument("checkpoint", nargs="?", help="Lightning .ckpt, state_dict .pt/.pth or TorchScript file")
    ap.add_argument("--model-name", default="melanoma", help="archive and endpoint name (default: melanoma)")
    ap.add_argument("--version", default=None, help="model version (default: 1.0, or 0.0-demo for the demo)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="decision threshold for the label (default 0.5; or chosen by --sensitivity/--specificity)")
    ap.add_argument("--tta-views", type=int, choices=TTA_CHOICES, default=8, help="TTA views (default 8)")
    pre = ap.add_argument_group("preprocessing (taken from the checkpoint's record; these only for a checkpoint "
                                "without one, and refused when they contradict it)")
    pre.add_argument("--image-size", type=int, metavar="PX",
                     help=f"the model's input side (default: the checkpoint's record, else {IMAGE_SIZE})")
    pre.add_argument("--interpolation", choices=tuple(INTERPOLATIONS),
                     help="the resize's OpenCV interpolation (INTER_AREA when shrinking either way; default: the "
                          f"checkpoint's record, else {PipelineConfig().interpolation})")
    ap.add_argument("--output-dir", default=str(ROOT / "model_store"), help="where the .mar goes")
    ap.add_argument("--force", action="store_true", help="overwrite an existing archive")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow a pickle that needs code execution (only for files you trust)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="TorchServe batchSize (default 1: on CPU a bigger batch is slower per image)")
    ap.add_argument("--max-batch-delay", type=int, default=5, help="TorchServe maxBatchDelay in ms (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the worker (0: all usable CPUs)")
    ap.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                    help="fp32 (default); bf16: ~2x faster on CPUs with AVX512-BF16/AMX; int8: static, calibrated "
                    "on a quarter of --validation-images. Both measured against fp32 on --validation-images "
                    "first (int8 on the images it was not calibrated on); compiled for this CPU and torch (needs g++)")
    ap.add_argument("--runtime", choices=("torchscript", "openvino"), default="torchscript",
                    help="what runs the model: torchscript (default; bf16 and int8: AOTInductor) or openvino "
                         "(opt-in, fp32 or bf16, faster on the CPUs measured; needs scripts/setup.sh --openvino)")
    val = ap.add_argument_group("your labelled validation set (ISIC folder + CSV; never the images you test on)")
    val.add_argument("--validation-images", metavar="DIR",
                     help="your images: a reduced precision is measured on them; with --validation-labels the "
                          "out-of-distribution check is fitted on them, and --calibrate and "
                          "--sensitivity/--specificity are possible")
    val.add_argument("--validation-labels", metavar="CSV",
                     help="their labels: any layout isic/labels.py reads (SIIM-ISIC 2020, ISIC 2019, ISIC 2024, an "
                          "isic-cli download folder)")
    val.add_argument("--calibrate", choices=("none", "temperature"), default="none",
                     help="temperature: fit temperature scaling so that the served probability is calibrated "
                          "(the raw TTA score is served beside it as raw_score); default none")
    val.add_argument("--ood-percentile", type=float, default=PERCENTILE, metavar="P",
                     help="with --validation-labels, the out-of-distribution check flags images farther from the "
                          "validation set than this percentile of its own (out-of-fold) images (default "
                          f"{PERCENTILE:g})")
    pick = val.add_mutually_exclusive_group()
    pick.add_argument("--sensitivity", type=float, metavar="S",
                      help="choose the threshold that reaches this validation sensitivity (e.g. 0.95)")
    pick.add_argument("--specificity", type=float, metavar="S",
                      help="choose the threshold that reaches this validation specificity")
    # The names before the validation set served calibration too: kept working, with a notice.
    ap.add_argument("--calibration-dir", help=argparse.SUPPRESS)
    ap.add_argument("--calibration-labels", help=argparse.SUPPRESS)
    ap.add_argument("--max-delta", type=float, default=0.02,
                    help="refuse a reduced-precision archive whose max |dp| vs fp32 exceeds this (default 0.02)")
    ap.add_argument("--compile-cache", default=os.environ.get("MELANOMA_COMPILE_CACHE"), metavar="DIR",
                    help="keep compiled bf16/int8 packages in this private folder and reuse one when the weights, "
                    "torch, compiler and CPU are the same (default: $MELANOMA_COMPILE_CACHE, else off)")
    ap.add_argument("--force-precision", action="store_true",
                    help="write the reduced-precision archive even when its agreement with fp32 is above "
                         "--max-delta; never when the compiled package fails the export check (it does not compute "
                         "what the network computes at that precision)")
    chk = ap.add_argument_group("input-check limits (docs/INPUT_CHECKS.md; they flag images, never change a score)")
    chk.add_argument("--min-side", type=int, default=None, metavar="PX",
                     help="flag photos whose shorter side is below this (default: the model's input size)")
    chk.add_argument("--min-sharpness", type=float, default=QualityLimits.min_sharpness, metavar="V",
                     help="flag images whose Laplacian variance at the model's input size is below this (default "
                          f"{QualityLimits.min_sharpness:g})")
    chk.add_argument("--max-clipped", type=float, default=QualityLimits.max_clipped, metavar="F",
                     help="flag images with more than this share of clipped highlights, in (0, 1] (default "
                          f"{QualityLimits.max_clipped:g})")
    chk.add_argument("--median-luminance", type=float, nargs=2, metavar=("LOW", "HIGH"),
                     default=(QualityLimits.min_median, QualityLimits.max_median),
                     help="flag images whose median luminance (0-255) is outside this range (default "
                          f"{QualityLimits.min_median:g} {QualityLimits.max_median:g})")
    ap.add_argument("--no-explain", action="store_true",
                    help="leave out explain.pt (LayerCAM heatmaps for /explanations): a ~105 MiB smaller archive")
    args = ap.parse_args(argv)
    for old, new in (("calibration_dir", "validation_images"), ("calibration_labels", "validation_labels")):
        if getattr(args, old):
            if getattr(args, new):
                ap.error(f"--{old.replace('_', '-')} is the old name of --{new.replace('_', '-')}; give one")
            print(f"build_mar: notice: --{old.replace('_', '-')} is now --{new.replace('_', '-')}", file=sys.stderr)
            setattr(args, new, getattr(args, old))
    return args


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "resnest", "albumentations", "torchserve", "torch-model-archiver", "pillow", "numpy"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def model_config(args: argparse.Namespace, cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": args.batch_size,
        "maxBatchDelay": args.max_batch_delay,
        "responseTimeout": 60,
        "startupTimeout": 120,
        "handler": {**cfg.to_mapping(), "threads": args.threads},
    }


def build(args: argparse.Namespace) -> Path:
    out_dir = Path(args.output_dir)
    target = out_dir / f"{args.model_name}.mar"
    if target.exists() and not args.force:
        raise BuildError(f"{target} exists; pass --force to overwrite it")
    if not out_dir.is_dir():
        raise BuildError(f"output folder {out_dir} does not exist")
    if not 0 < args.max_delta < 1:
        raise BuildError("--max-delta must be between 0 and 1")
    if args.batch_size < 1 or args.max_batch_delay < 0 or args.threads < 0:
        raise BuildError("--batch-size must be >= 1, --max-batch-delay and --threads >= 0")
    serving = {"tta_views": args.tta_views, "threshold": 0.5 if args.threshold is None else args.threshold}
    explicit = {"image_size": args.image_size, "interpolation": args.interpolation}
    try:
        PipelineConfig(**serving, **{k: v for k, v in explicit.items() if v is not None})  # fail before any work
    except ValueError as e:
        raise BuildError(str(e)) from None
    try:  # the limits too (min_side is final once the input size is known, below)
        QualityLimits(min_side=1 if args.min_side is None else args.min_side, min_sharpness=args.min_sharpness,
                      max_clipped=args.max_clipped, min_median=args.median_luminance[0],
                      max_median=args.median_luminance[1])
    except ValueError as e:
        raise BuildError(f"input-check limits: {e}") from None
    goal = "sensitivity" if args.sensitivity is not None else "specificity" if args.specificity is not None else None
    fits = args.calibrate != "none" or goal is not None
    if fits and not (args.validation_images and args.validation_labels):
        raise BuildError("--calibrate, --sensitivity and --specificity need your labelled validation set: "
                         "--validation-images DIR --validation-labels CSV")
    if goal is not None and args.threshold is not None:
        raise BuildError(f"--threshold and --{goal} both set the threshold; give one")
    if not 50 <= args.ood_percentile < 100:
        raise BuildError("--ood-percentile must be in [50, 100)")
    if goal is not None and not 0 < getattr(args, goal) < 1:
        raise BuildError(f"--{goal} must be between 0 and 1")
    if args.validation_images and not Path(args.validation_images).is_dir():
        raise BuildError(f"--validation-images {args.validation_images} does not exist (or is not a folder)")
    if args.validation_labels and not Path(args.validation_labels).exists():
        raise BuildError(f"--validation-labels {args.validation_labels} does not exist")
    archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or shutil.which(
        "torch-model-archiver"
    )
    if archiver is None:
        raise BuildError("torch-model-archiver not found; run the README's set-up first")

    demo = args.checkpoint is None
    if demo:
        ckpt = demo_checkpoint(args.image_size or IMAGE_SIZE)
        source = "demo (seed-initialised, untrained)"
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ckpt = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
        for w in caught:
            print(f"WARNING: {w.message}", file=sys.stderr)
        source = Path(args.checkpoint).name
    print(f"checkpoint: {source}: {ckpt.form}, head {ckpt.head} ({ckpt.outputs} output(s))", file=sys.stderr)
    for note in ckpt.notes:
        print(f"  note: {note}", file=sys.stderr)
    # The preprocessing the network was trained with travels from its checkpoint into the archive.
    cfg, notice = pipeline_config(ckpt, explicit, serving)
    if notice:
        print(f"  {'note' if ckpt.pipeline is not None else 'notice'}: {notice}", file=sys.stderr)
    try:
        limits = QualityLimits(min_side=cfg.image_size if args.min_side is None else args.min_side,
                               min_sharpness=args.min_sharpness, max_clipped=args.max_clipped,
                               min_median=args.median_luminance[0], max_median=args.median_luminance[1])
    except ValueError as e:
        raise BuildError(f"input-check limits: {e}") from None

    if args.runtime != "torchscript" and args.runtime not in RUNTIMES[args.precision]:  # torchscript: the default
        serves = " and ".join(p for p, r in RUNTIMES.items() if args.runtime in r)
        raise BuildError(f"--runtime {args.runtime} serves {serves} only; a {args.precision} archive runs on "
                         f"{RUNTIMES[args.precision][0]} (--precision {args.precision} without --runtime)")
    if args.precision != "fp32" and not args.validation_images:
        raise BuildError(f"--precision {args.precision} needs --validation-images: its scores must be measured "
                         "against fp32 on your own images before it is served")
    if args.precision != "fp32":
        measured = calibration_images(Path(args.validation_images))  # a wrong folder fails now, not after the compile
        calibrated_on = 0
        # Compile (a minute or two) before anything else is exported, so that a machine without a
        # compiler fails in seconds.
        if args.precision == "int8":
            calibrate, measured = split_for_int8(measured)
            tensors = load_tensors(calibrate, cfg)[0]
            calibrated_on = len(tensors)
            reduced, compiled = export_int8(ckpt, cfg.image_size, tensors, args.compile_cache)
        elif args.runtime == "torchscript":
            reduced, compiled = export_bf16(ckpt, cfg.image_size, args.compile_cache)
    precision: dict[str, Any] = {"name": "fp32"}
    model_file = MODEL_FILE
    if args.runtime == "openvino":
        model_bytes, info = export_openvino(ckpt, cfg.image_size, args.precision, cfg.tta_views)
        model_file = ONNX_MODEL_FILE
        if args.precision == "fp32":
            precision = {**precision, **info}
        else:  # one ONNX file: OpenVINO runs it in f32 for the reference and in bf16 for the archive
            reduced, compiled = model_bytes, info
    else:
        model_bytes = export_torchscript(ckpt, cfg.image_size)
    if args.precision != "fp32":
        labels = Path(args.validation_labels) if args.validation_labels else None
        agreement = measure(model_bytes, reduced, args.precision, cfg, measured, labels, calibrated_on,
                            "openvino" if args.runtime == "openvino" else None)
        print(agreement.report(args.precision), file=sys.stderr)
        if agreement.max_abs_dp > args.max_delta:
            if not args.force_precision:
                raise BuildError(f"agreement: {args.precision} itself is too far from fp32 on your validation "
                                 f"images: up to {agreement.max_abs_dp:.4f} in probability (> --max-delta "
                                 f"{args.max_delta}); nothing written (--force-precision writes it anyway)")
            print(f"WARNING: --force-precision: writing the {args.precision} archive although it differs from fp32 "
                  f"by up to {agreement.max_abs_dp:.4f} in probability (> --max-delta {args.max_delta}); "
                  "metadata.json records both", file=sys.stderr)
        precision = {"name": args.precision, "bound": args.max_delta, **agreement.to_mapping(), **compiled}
        model_bytes = reduced
        model_file = ONNX_MODEL_FILE if args.runtime == "openvino" else COMPILED_MODEL_FILE
    calibration = op = ood = None
    sizes = feature_sizes(ckpt)
    checks: dict[str, Any] = {"limits": limits.to_mapping(), "features": sizes, "ood": None}
    if args.validation_images and args.validation_labels:
        # On the model exactly as it will be served: its precision, its runtime, its load path.
        served = load_model(model_bytes, precision["name"], str(precision.get("format", "torchscript")),
                            cfg.tta_views)
        scores = score_validation_set(served, cfg, Path(args.validation_images), Path(args.validation_labels),
                                      limits)
        del served
        release_memory()
        if scores.features is None:
            print("out-of-distribution check: not available: this checkpoint is a TorchScript file without "
                  "ResNeSt's stages, so its model returns the logit alone", file=sys.stderr)
        else:
            ood, checks["ood"] = fit_ood(scores.features, list(sizes), list(sizes.values()), scores.groups,
                                         args.ood_percentile)
            checks["ood"]["file"] = OOD_FILE
            print(f"out-of-distribution check: fitted on {len(scores.names)} validation images, flags a distance "
                  f"above {checks['ood']['threshold']:.3f} (the {args.ood_percentile:g}th percentile out of fold)",
                  file=sys.stderr)
        checks["validation_flagged"] = scores.quality_flagged
        print("input checks on the validation images: " + ", ".join(
            f"{k} flags {v}" for k, v in scores.quality_flagged.items()) + f" of {len(scores.names)}", file=sys.stderr)
        if any(v > 0.05 * len(scores.names) for v in scores.quality_flagged.values()):
            print("WARNING: an input check flags more than 5 % of your validation images: its limit may not suit "
                  "your photos; look at the flagged ones, then set it with --min-side, --min-sharpness, "
                  "--max-clipped or --median-luminance (docs/INPUT_CHECKS.md)", file=sys.stderr)
    if fits:
        temperature = fit_temperature(scores) if args.calibrate == "temperature" else 1.0
        calibration = calibration_record(scores, temperature) if args.calibrate == "temperature" else None
        op = operating_point(scores, temperature, goal, getattr(args, goal)) if goal else None
        cfg = dataclasses.replace(cfg, temperature=temperature, threshold=op["threshold"] if op else cfg.threshold)
        for line in report(scores, calibration, op):
            print(line, file=sys.stderr)
    explain_bytes = None if args.no_explain else export_explainer(ckpt, cfg.image_size, EXPLAIN_LAYER)
    version = args.version or ("0.0-demo" if demo else "1.0")

    with tempfile.TemporaryDirectory(prefix="build_mar.") as tmp_s:
        tmp = Path(tmp_s)
        model_path = tmp / model_file
        model_path.write_bytes(model_bytes)
        meta = ArchiveMetadata(
            name=args.model_name,
            version=version,
            architecture=ARCHITECTURE,
            head=ckpt.head,
            outputs=ckpt.outputs,
            checkpoint_form=ckpt.form,
            source_file=source,
            weights_sha256=ckpt.sha256,
            model_file=model_file,
            model_sha256=file_sha256(model_path),
            demo=demo,
            precision=precision,
            explain=None if explain_bytes is None else {"file": EXPLAIN_FILE, "method": EXPLAIN_METHOD,
                                                        "layer": EXPLAIN_LAYER},
            calibration=calibration,
            operating_point=op,
            checks=checks,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            versions=versions(),
        ).to_mapping()  # the reader's own record: what it cannot load is never written
        extra_files = [tmp / "extra", tmp / METADATA_FILE]
        if explain_bytes is not None:
            (tmp / EXPLAIN_FILE).write_bytes(explain_bytes)
            extra_files.append(tmp / EXPLAIN_FILE)
        if ood is not None:
            (tmp / OOD_FILE).write_bytes(ood.to_bytes())
            extra_files.append(tmp / OOD_FILE)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / MODEL_CONFIG_FILE).write_text(yaml.safe_dump(model_config(args, cfg), sort_keys=False))
        pkg = tmp / "extra" / "handler"  # packed as a package so the handler imports handler.pipeline
        pkg.mkdir(parents=True)
        for f in handler_files():
            shutil.copy2(f, pkg / f.name)
        export = tmp / "export"
        export.mkdir()
        cmd = [
            archiver, "--model-name", args.model_name, "--version", version,
            "--serialized-file", str(model_path),
            "--handler", str(pkg / "melanoma_handler.py"),
            "--extra-files", ",".join(str(f) for f in extra_files),
            "--config-file", str(tmp / MODEL_CONFIG_FILE),
            "--export-path", str(export),
        ]
        # The archiver stages in $TMPDIR/<model name>: point it at this build's own folder, so that two builds
        # at once (a user's and a test's, or two tests) cannot write into each other's staging.
        staging = tmp / "archiver-tmp"
        staging.mkdir()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": str(staging)})
        built = export / f"{args.model_name}.mar"
        if proc.returncode != 0 or not built.is_file():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise BuildError(f"torch-model-archiver failed: {msg[-1] if msg else proc.returncode}")
        # Same-folder temp file + rename: the archive appears whole or not at all.
        fd, partial = tempfile.mkstemp(prefix=f".{args.model_name}.", suffix=".partial", dir=out_dir)
        os.close(fd)
        try:
            shutil.copyfile(built, partial)
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = build(args)
    except (BuildError, CheckpointError, ExportError, PrecisionError, CalibrationError, OodError) as e:
        print(f"build_mar: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # an unexpected failure still gets one line; the traceback on request
        if os.environ.get("BUILD_MAR_DEBUG"):
            raise
        print(f"build_mar: error: {type(e).__name__}: {e} (BUILD_MAR_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("build_mar: interrupted; nothing was written", file=sys.stderr)
        return 130
    size = target.stat().st_size / 2**20
    print(f"wrote {target} ({size:.0f} MiB)")
    if args.checkpoint is None:
        print("NOTE: this is the untrained DEMO model; its scores mean nothing. "
              "Build from your checkpoint: ./build_mar.sh path/to/your.ckpt --force")
    return 0


if __name__ == "__main__":
    sys.exit(main())
