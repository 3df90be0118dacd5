#!/usr/bin/env python3
"""What a user would pick instead of TorchServe + TorchScript on a CPU, measured in the same run.

    .venv/bin/python -m pip install -r bench/requirements-runtimes.txt   # bench only, never the server's
    .venv/bin/python bench/runtimes.py [--archive model_store/melanoma.mar] [--bf16 [BF16.mar]]
                                       [--int8 INT8.mar] [--openvino OV.mar] [--openvino-bf16 OV_BF16.mar]
                                       [--threads 1 2] [--repeats 30] [--report docs/PERFORMANCE.md]

The 8-view 128 px forward (the batch the handler runs for one image) through:
- the archive's model exactly as served (handler.archive.load_archive: TorchScript fp32, or the bf16
  AOTInductor package given with --bf16), and the other archives given, each loaded as served (--int8, and
  the opt-in OpenVINO runtime's --openvino and --openvino-bf16: this project's OpenVINO rows, beside
  OpenVINO run directly);
- the archive's model.pt exported to ONNX (the same frozen graph and weights), run by
  ONNX Runtime (fp32) and OpenVINO (f32 with INFERENCE_PRECISION_HINT=f32, which OpenVINO otherwise turns
  into bf16 on CPUs with AVX512-BF16; and bf16 where the CPU has it);
- an AVX2-class column: TorchScript fp32 in a process whose kernels are capped at AVX2 (ONEDNN_MAX_CPU_ISA,
  ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS), what a t2.micro (Haswell/Broadwell) runs, emulated. The ISA
  oneDNN reports in that process is printed with the table, so the cap is seen to hold.

Each thread count runs in its own process (1 thread: pinned to one core, like a t2.micro); runtimes take
turns in blocks so drift on a shared machine hits all of them. Compare ratios within one run only.
Also printed: max |logit difference| of each runtime against the served model on the same batch.
Benchmarks are not tests: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
INSTALL = ".venv/bin/python -m pip install -r bench/requirements-runtimes.txt"


def batch_for(archive: Path) -> np.ndarray:
    """The handler's own 8-view batch for one generated lesion photo (pipeline decode -> preprocess -> TTA)."""
    import zipfile

    from handler.archive import MODEL_CONFIG_FILE, read_model_config
    from handler.pipeline import load_tensor, tta_views
    from testkit.imaging import encode, lesion_rgb

    cfg, _ = read_model_config(zipfile.ZipFile(archive).read(MODEL_CONFIG_FILE).decode())
    x = load_tensor(encode(lesion_rgb(400, 600, seed=2), "JPEG", quality=90), cfg)
    return tta_views(x[None], cfg.tta_views).contiguous().numpy()


def export_onnx(archive: Path, out: Path) -> Path:
    """The archive's own model.pt (traced, frozen) exported to ONNX, opset 17, fixed batch of 8: the very
    graph and weights that are served, before the load-time oneDNN pass (whose ops ONNX cannot express)."""
    import io
    import zipfile

    import torch

    from handler.archive import MODEL_FILE

    frozen = torch.jit.load(io.BytesIO(zipfile.ZipFile(archive).read(MODEL_FILE)), map_location="cpu").eval()
    x = torch.from_numpy(batch_for(archive))
    path = out / "melanoma.onnx"
    with torch.inference_mode():
        torch.onnx.export(frozen, (x,), str(path), input_names=["x"], output_names=["logits"],
                          opset_version=17, dynamo=False)
    return path


def blocks(fns: dict[str, Callable[[], Any]], repeats: int, rounds: int = 3) -> dict[str, float]:
    """Median ms per call of each function, run in blocks (ABC ABC ABC), each block re-warmed."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            f()
            for _ in range(max(1, repeats // rounds)):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def child(archive: Path, onnx: Path | None, bf16: str | None, threads: int, repeats: int,
          avx2: bool, int8: str | None = None, served_ov: dict[str, str] | None = None) -> dict[str, Any]:
    import torch

    from handler.archive import cpu_flags, load_archive

    if threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(threads)
    x_np = batch_for(archive)
    x = torch.from_numpy(x_np)
    served = load_archive(archive, threads=threads)
    fns: dict[str, Callable[[], Any]] = {"torchscript_fp32": lambda: served.scorer.model(x)}
    logits: dict[str, np.ndarray] = {}
    isa = ""
    with torch.inference_mode():
        if avx2:  # what oneDNN says it dispatched to: proof that the cap holds (C stdout -> a file)
            with tempfile.TemporaryFile() as log:
                sys.stdout.flush()
                saved = os.dup(1)
                os.dup2(log.fileno(), 1)
                try:
                    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                        served.scorer.model(x)
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
                log.seek(0)
                text = log.read().decode(errors="replace")
            isa = next((ln.split("isa:", 1)[1].strip() for ln in text.splitlines() if "isa:" in ln), "not reported")
        ref = served.scorer.model(x).float().numpy()
        if bf16 is not None and not avx2:
            b = load_archive(bf16, threads=threads)
            fns["aoti_bf16"] = lambda: b.scorer.model(x)
            logits["aoti_bf16"] = b.scorer.model(x).float().numpy()
        if int8 is not None:  # also capped: oneDNN's int8 kernels dispatch at run time, like fp32's
            q = load_archive(int8, threads=threads)
            fns["aoti_int8"] = lambda: q.scorer.model(x)
            logits["aoti_int8"] = q.scorer.model(x).float().numpy()
        for key, path in (served_ov or {}).items():  # this project's OpenVINO archives, through load_archive
            a = load_archive(path, threads=threads)
            fns[key] = lambda a=a: a.scorer.model(x)
            logits[key] = a.scorer.model(x).float().numpy()
        if onnx is not None and not avx2:
            import onnxruntime as ort
            import openvino as ov

            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            sess = ort.InferenceSession(str(onnx), so, providers=["CPUExecutionProvider"])
            fns["onnxruntime_fp32"] = lambda: sess.run(None, {"x": x_np})
            logits["onnxruntime_fp32"] = sess.run(None, {"x": x_np})[0]
            core = ov.Core()
            net = core.read_model(str(onnx))
            precisions = ["f32"] + (["bf16"] if cpu_flags() & {"avx512_bf16", "amx_bf16"} else [])
            for p in precisions:
                compiled = core.compile_model(net, "CPU", {"INFERENCE_PRECISION_HINT": p,
                                                           "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                           "PERFORMANCE_HINT": "LATENCY"})
                req = compiled.create_infer_request()
                fns[f"openvino_{p}"] = lambda req=req: req.infer({0: x_np})
                logits[f"openvino_{p}"] = next(iter(req.infer({0: x_np}).values())).copy()
        ms = blocks(fns, repeats)
    # Column 0: the logit (the archive's model returns the input checks' pooled features after it).
    diff = {k: float(np.abs(v.reshape(ref.shape)[:, 0] - ref[:, 0]).max()) for k, v in logits.items()}
    return {"threads": threads, "avx2": avx2, "ms": ms, "max_abs_logit_diff": diff, "isa": isa,
            "ref_logit_range": [float(ref[:, 0].min()), float(ref[:, 0].max())]}


def run_child(args: argparse.Namespace, onnx: Path | None, threads: int, avx2: bool,
              others: bool = True) -> dict[str, Any]:
    """One measuring process. others=False: the served TorchScript model alone."""
    env = {**os.environ, **(AVX2_ENV if avx2 else {})}
    cmd = [sys.executable, __file__, "--child", str(threads), "--archive", str(args.archive),
           "--repeats", str(args.repeats)] + (["--avx2-child"] if avx2 else [])
    cmd += ["--onnx", str(onnx)] if onnx and others else []
    cmd += ["--bf16", str(args.bf16)] if args.bf16 and others and not avx2 else []
    # Capped, only an archive built for AVX2: a native one would run AVX-512 code from Inductor beside capped
    # oneDNN kernels, which no t2.micro runs (and whose CPU check would refuse it there).
    int8 = args.int8_avx2 if avx2 else args.int8
    cmd += ["--int8", str(int8)] if int8 and others else []
    for flag, path in (("--openvino", args.openvino), ("--openvino-bf16", args.openvino_bf16)):
        cmd += [flag, str(path)] if path and others and not avx2 else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.exit(f"runtimes: the {threads}-thread{' AVX2' if avx2 else ''} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


LABELS = {"torchscript_fp32": "this project, TorchScript fp32 (default archive)",
          "onnxruntime_fp32": "ONNX Runtime, fp32", "openvino_f32": "OpenVINO, f32 (precision hint f32)",
          "aoti_bf16": "this project, AOTInductor bf16 (--precision bf16)", "openvino_bf16": "OpenVINO, bf16",
          "ov_fp32": "this project, OpenVINO f32 (--runtime openvino)",
          "ov_bf16": "this project, OpenVINO bf16 (--runtime openvino --precision bf16)",
          "aoti_int8": "this project, AOTInductor int8 (--precision int8)"}


def table(res: dict[str, Any], cmd: str) -> str:
    runs = [r for r in res["runs"] if not r["avx2"]]
    avx2 = {r["threads"]: r for r in res["runs"] if r["avx2"]}
    ts = [r["threads"] for r in runs]
    head = " | ".join(f"{t} thread{'s' * (t > 1)}" for t in ts)
    lines = ["## Against other CPU runtimes (bench/runtimes.py)", "",
             f"Written by `{cmd}` on {res['when']}; {res['cpu']}, {os.cpu_count()} CPUs; do not edit by hand. "
             "8-view 128 px forward (one image's TTA batch), median ms; in brackets: time relative to the "
             "runtime it competes with (fp32 against OpenVINO f32, bf16 against OpenVINO bf16, int8 against "
             "our fp32); below 1.00 "
             "is faster. Versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()) + ".", "",
             f"| runtime | {head} | max abs logit diff vs served fp32 |", "|---" * (len(ts) + 2) + "|"]
    rivals = {"torchscript_fp32": "openvino_f32", "onnxruntime_fp32": "openvino_f32", "aoti_bf16": "openvino_bf16",
              "ov_fp32": "openvino_f32", "ov_bf16": "openvino_bf16", "aoti_int8": "torchscript_fp32"}
    for k, label in LABELS.items():
        if k not in runs[0]["ms"]:
            continue
        cells = []
        for r in runs:
            rival = rivals.get(k)
            ratio = f" ({r['ms'][k] / r['ms'][rival]:.2f}x)" if rival in r["ms"] else ""
            cells.append(f"{r['ms'][k]:.0f}{ratio}")
        diff = runs[0]["max_abs_logit_diff"].get(k)
        lines.append(f"| {label} | {' | '.join(cells)} | {'reference' if diff is None else f'{diff:.1e}'} |")
    if avx2:
        cells = []
        for r in runs:
            a = avx2.get(r["threads"])
            if a:
                ref = statistics.fmean(a["uncapped_ms"])
                cells.append(f"{a['ms']['torchscript_fp32']:.0f} ({a['ms']['torchscript_fp32'] / ref:.2f}x uncapped, "
                             f"{'/'.join(f'{v:.0f}' for v in a['uncapped_ms'])} ms before/after)")
            else:
                cells.append("-")
        lines.append(f"| this project, TorchScript fp32, kernels capped at AVX2 (emulated t2.micro) | "
                     f"{' | '.join(cells)} | same model |")
        if any("aoti_int8" in a["ms"] for a in avx2.values()):
            cells = [f"{a['ms']['aoti_int8']:.0f} ({a['ms']['aoti_int8'] / a['ms']['torchscript_fp32']:.2f}x "
                     "capped fp32)" if (a := avx2.get(r["threads"])) else "-" for r in runs]
            diff = next(iter(avx2.values()))["max_abs_logit_diff"].get("aoti_int8", float("nan"))
            lines.append(f"| this project, AOTInductor int8, kernels capped at AVX2 (emulated t2.micro) | "
                         f"{' | '.join(cells)} | {diff:.1e} |")
        isa = next(iter(avx2.values()))["isa"]
        lines += ["", f"AVX2 column: {', '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}; oneDNN reported "
                  f"`{isa}` in that process."]
    lr = runs[0]["ref_logit_range"]
    lines += [f"Served fp32 logits on this batch span {lr[0]:.3f} .. {lr[1]:.3f} (archive: {res['archive']}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, default=ROOT / "model_store" / "melanoma.mar")
    ap.add_argument("--bf16", nargs="?", const="build", metavar="ARCHIVE",
                    help="time a --precision bf16 archive beside OpenVINO bf16 (no ARCHIVE: build a demo one)")
    ap.add_argument("--int8", metavar="ARCHIVE",
                    help="time a --precision int8 archive (of the same weights as --archive) beside fp32")
    ap.add_argument("--int8-avx2", metavar="ARCHIVE",
                    help="for the AVX2 column, an int8 archive built for AVX2 (ATEN_CPU_CAPABILITY=avx2 "
                         "ONEDNN_MAX_CPU_ISA=AVX2 ./build_mar.sh --precision int8 ...; docs/PRECISION.md)")
    ap.add_argument("--openvino", metavar="ARCHIVE",
                    help="time a --runtime openvino archive (of the same weights as --archive) as served")
    ap.add_argument("--openvino-bf16", metavar="ARCHIVE",
                    help="time a --runtime openvino --precision bf16 archive (same weights) as served")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-avx2", action="store_true", help="skip the AVX2-capped column")
    ap.add_argument("--report", type=Path, help="write the table into this markdown file (block --block)")
    ap.add_argument("--block", default="runtimes", help="the report's block name (default runtimes)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--avx2-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        served_ov = {k: v for k, v in (("ov_fp32", args.openvino), ("ov_bf16", args.openvino_bf16)) if v}
        print(json.dumps(child(args.archive, args.onnx, args.bf16, args.child, args.repeats, args.avx2_child,
                               args.int8, served_ov)))
        return 0
    if not args.archive.exists():
        sys.exit(f"runtimes: {args.archive} does not exist: build it with ./build_mar.sh (or pass --archive)")
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import openvino
    except ImportError as e:
        sys.exit(f"runtimes: {e.name} is not installed (bench-only dependencies): {INSTALL}")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if args.bf16 == "build":
            from testkit.harness import build_bf16_demo

            args.bf16 = build_bf16_demo(Path(tmp))
        onnx_path = export_onnx(args.archive, Path(tmp))
        runs = [run_child(args, onnx_path, n, avx2=False) for n in args.threads]
        for n in [] if args.no_avx2 else args.threads:
            # The cap holds for a whole process, so the capped run cannot share one with its reference:
            # uncapped runs just before and after it bracket the drift, and the ratio is to their mean.
            before = run_child(args, None, n, avx2=False, others=False)
            capped = run_child(args, None, n, avx2=True)
            after = run_child(args, None, n, avx2=False, others=False)
            capped["uncapped_ms"] = [r["ms"]["torchscript_fp32"] for r in (before, after)]
            runs.append(capped)
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "archive": args.archive.name,
           "cpu": platform.processor() or cpu_model(), "runs": runs,
           "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "openvino": openvino.__version__.split("-")[0]}}
    cmd = ("bench/runtimes.py" + (" --bf16" if args.bf16 else "") + (" --int8 INT8.mar" if args.int8 else "")
           + (" --int8-avx2 INT8_AVX2.mar" if args.int8_avx2 else "") + (" --openvino OV.mar" if args.openvino else "")
           + (" --openvino-bf16 OV_BF16.mar" if args.openvino_bf16 else ""))
    text = table(res, cmd)
    print(text)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtimes.json").write_text(json.dumps(res, indent=1))
    if args.report:
        from testkit.report import replace_block

        replace_block(args.report, args.block, text)
    return 0


def cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
