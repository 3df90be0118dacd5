#!/usr/bin/env python3
"""Benchmark: our pipeline against the original approach, in-process and through real TorchServe.

    .venv/bin/python bench/bench.py             # full run (~5 min on 2 cores); table + bench/results/latest.json
    .venv/bin/python bench/bench.py --smoke     # seconds: checks that every figure is produced

Baseline, run in the same process as ours: Pillow full decode, A.Resize(128, 128) (INTER_LINEAR),
A.Normalize(), the eager model, one forward per TTA view (8), sigmoid, mean. Ours: handler/pipeline.py with
the archive's TorchScript model. Runs alternate baseline/ours so that drift on a shared machine hits both.
Benchmarks are not tests: nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from testkit.harness import build_bf16_demo, serve_archive
from testkit.imaging import encode, lesion_rgb
from testkit.load import RssSampler

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


RESULTS = ROOT / "bench" / "results"


def images() -> dict[str, bytes]:
    small = encode(lesion_rgb(128, 128, seed=1), "JPEG", quality=92)
    big = encode(cv2.resize(lesion_rgb(400, 600, seed=2), (6000, 4000), interpolation=cv2.INTER_CUBIC),
                 "JPEG", quality=90)
    return {"128px": small, "24MP": big}


def stats(ts: list[float]) -> dict[str, float]:
    ts = sorted(ts)
    return {"median_ms": 1000 * statistics.median(ts), "p95_ms": 1000 * ts[min(len(ts) - 1, int(0.95 * len(ts)))],
            "n": len(ts)}


def timed(f: Callable[[], Any]) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# In-process (one subprocess per thread count, so affinity and thread pools start clean)
# ---------------------------------------------------------------------------------------------


def inprocess(archive: Path, threads: int, repeats: int) -> dict[str, Any]:
    import albumentations as A
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from exporter.checkpoint import build_model
    from handler.archive import load_archive
    from handler.pipeline import PipelineConfig, decode_image, preprocess, tta_views

    if threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, like a t2.micro
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eager = build_model(1).eval()
    ours = load_archive(archive)
    cfg: PipelineConfig = ours.cfg
    base_tf = A.Compose([A.Resize(cfg.image_size, cfg.image_size), A.Normalize()])

    def baseline(data: bytes) -> float:
        import io

        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        x = torch.from_numpy(base_tf(image=rgb)["image"].transpose(2, 0, 1).copy())[None]
        views = tta_views(x, 8)
        with torch.no_grad():
            return float(torch.stack([torch.sigmoid(eager(v[None]))[0, 0] for v in views]).mean())

    imgs = images()
    for data in imgs.values():  # warm both paths
        baseline(data)
        ours.score(data)
    batch = tta_views(preprocess(decode_image(imgs["128px"], cfg), cfg)[None], 8).contiguous()
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        eager(batch)
    flops = fc.get_total_flops()
    a = torch.randn(2048, 2048)
    out: dict[str, Any] = {"threads": threads, "forward_gflop_8_views": flops / 1e9}
    t_base: dict[str, list[float]] = {k: [] for k in imgs}
    t_ours: dict[str, list[float]] = {k: [] for k in imgs}
    t_fwd, t_mm = [], []
    parts: dict[str, list[float]] = {f"{k}_{p}": [] for k in imgs for p in ("decode", "preprocess")}
    with torch.inference_mode():
        for _ in range(repeats):
            for k, data in imgs.items():
                t_base[k].append(timed(lambda d=data: baseline(d)))
                t_ours[k].append(timed(lambda d=data: ours.score(d)))
                t0 = time.perf_counter()
                rgb = decode_image(data, cfg)
                t1 = time.perf_counter()
                preprocess(rgb, cfg)
                parts[f"{k}_decode"].append(t1 - t0)
                parts[f"{k}_preprocess"].append(time.perf_counter() - t1)
            t_fwd.append(timed(lambda: ours.scorer.model(batch)))
            t_mm.append(timed(lambda: a @ a))
    for k in imgs:
        out[k] = {"baseline": stats(t_base[k]), "ours": stats(t_ours[k]),
                  "speedup": statistics.median(t_base[k]) / statistics.median(t_ours[k])}
    fwd, mm = statistics.median(t_fwd), statistics.median(t_mm)
    out["forward_8_views"] = stats(t_fwd)
    out["forward_gflops"] = flops / fwd / 1e9
    out["matmul_gflops"] = 2 * 2048**3 / mm / 1e9
    out["forward_vs_matmul"] = out["forward_gflops"] / out["matmul_gflops"]
    out["parts_ms"] = {k: 1000 * statistics.median(v) for k, v in parts.items()}
    return out


def precisions(archives: dict[str, Path], threads: int, repeats: int) -> dict[str, Any]:
    """The same images through each archive's pipeline in one process: the 8-view latency of each precision
    side by side (and its agreement figures from the build). Archives take turns in blocks (ABAB...), which
    cancels drift without interleaving single calls: call-by-call alternation between two models measured
    both ~10 % slower here (caches and oneDNN state shared by two sets of weights)."""
    import torch

    from handler.archive import load_archive

    if threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(threads)
    loaded = {name: load_archive(path, threads=threads) for name, path in archives.items()}
    imgs = images()
    for arch in loaded.values():
        for data in imgs.values():
            arch.score(data)
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in imgs} for n in loaded}
    rounds = 3
    with torch.inference_mode():
        for _ in range(rounds):
            for n, arch in loaded.items():
                for data in imgs.values():  # re-warm after the other archive's block
                    arch.score(data)
                for _ in range(max(1, repeats // rounds)):
                    for k, data in imgs.items():
                        times[n][k].append(timed(lambda d=data, a=arch: a.score(d)))
    out: dict[str, Any] = {"threads": threads, "archives": {}}
    for n, arch in loaded.items():
        out["archives"][n] = {"precision": arch.metadata.precision,
                              **{k: stats(v) for k, v in times[n].items()}}
    return out


# ---------------------------------------------------------------------------------------------
# Served: real TorchServe with our config.properties, one worker
# ---------------------------------------------------------------------------------------------


def poster(session: Any, srv: Any) -> Callable[[bytes], float]:
    """post(data) -> seconds for one prediction; raises on anything but 200."""
    url = f"{srv.url}/predictions/melanoma"
    headers = {**srv.headers(), "Content-Type": "application/octet-stream"}

    def post(data: bytes) -> float:
        t = time.perf_counter()
        r = session.post(url, data=data, headers=headers, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t

    return post


def wait_first_prediction(post: Callable[[bytes], float], data: bytes, timeout: float = 120) -> None:
    """/ping answers before the worker is ready: retry a real prediction until it succeeds."""
    deadline = time.time() + timeout
    while True:
        try:
            post(data)
            return
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


def served(archive: Path, repeats: int, load_requests: int) -> dict[str, Any]:
    import requests

    from testkit.harness import stop_server

    imgs = images()
    t0 = time.perf_counter()
    srv = serve_archive(archive)
    try:
        session = requests.Session()
        url = f"{srv.url}/predictions/melanoma"
        headers = {**srv.headers(), "Content-Type": "application/octet-stream"}
        post = poster(session, srv)
        wait_first_prediction(post, imgs["128px"])
        out: dict[str, Any] = {"cold_start_s": time.perf_counter() - t0}

        for data in imgs.values():
            post(data)
        lat: dict[str, list[float]] = {k: [] for k in imgs}
        for _ in range(repeats):
            for k, data in imgs.items():
                lat[k].append(post(data))
        out["latency_1_client"] = {k: stats(v) for k, v in lat.items()}
        out["torchserve_metrics_ms"] = torchserve_split(srv.workdir / "logs")
        out["throughput_4_clients"] = {}
        with RssSampler(srv.proc.pid, interval=0.05) as rss:
            sessions = [requests.Session() for _ in range(4)]
            for k, data in imgs.items():

                def one(i: int, d: bytes = data) -> None:
                    r = sessions[i % 4].post(url, data=d, headers=headers, timeout=300)
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")

                t = time.perf_counter()
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(one, range(load_requests)))
                out["throughput_4_clients"][k] = load_requests / (time.perf_counter() - t)
        out["peak_rss_mib"] = rss.peak
        # Explanations last: the first one loads explain.pt (+~105 MiB), which must not count above.
        explain_url = f"{srv.url}/explanations/melanoma"
        first = timed(lambda: session.post(explain_url, data=imgs["128px"], headers=headers, timeout=120))
        elat: dict[str, list[float]] = {k: [] for k in imgs}
        for _ in range(max(3, repeats // 3)):
            for k, data in imgs.items():
                t = time.perf_counter()
                r = session.post(explain_url, data=data, headers=headers, timeout=120)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                elat[k].append(time.perf_counter() - t)
        out["explain_first_s"] = first
        out["explain_latency_1_client"] = {k: stats(v) for k, v in elat.items()}
        out["rss_after_explanations_mib"] = sum(rss.current())
        return out
    finally:
        stop_server(srv)


def served_precisions(archives: dict[str, Path], repeats: int) -> dict[str, Any]:
    """Each archive in its own real TorchServe (both running, one worker each), one client taking turns in
    blocks: the served 8-view latency of each precision side by side, in the same run."""
    import requests

    from testkit.harness import stop_server

    imgs = images()
    servers = {}
    try:
        for name, path in archives.items():
            servers[name] = serve_archive(path, f"bench-ts-{name}.")
        session = requests.Session()
        posts = {name: poster(session, srv) for name, srv in servers.items()}
        for post in posts.values():
            wait_first_prediction(post, imgs["128px"])
        lat: dict[str, dict[str, list[float]]] = {n: {k: [] for k in imgs} for n in servers}
        rounds = 3
        for _ in range(rounds):
            for name, post in posts.items():
                for data in imgs.values():
                    post(data)
                for _ in range(max(1, repeats // rounds)):
                    for k, data in imgs.items():
                        lat[name][k].append(post(data))
        return {n: {k: stats(v) for k, v in d.items()} for n, d in lat.items()}
    finally:
        for srv in servers.values():
            stop_server(srv)


def torchserve_split(logs: Path) -> dict[str, float]:
    """TorchServe's own view of where a request's time went: the handler (PredictionTime, our code in
    the worker) versus the frontend's whole inference latency (queue + IPC + handler)."""
    import re

    def values(name: str, pattern: str) -> list[float]:
        text = (logs / name).read_text(errors="replace") if (logs / name).exists() else ""
        return [float(v) for v in re.findall(pattern, text)]

    handler = values("model_metrics.log", r"PredictionTime\.ms:([0-9.]+)")
    latency = r"ts_inference_latency_microseconds\.Microseconds:([0-9.]+)"
    frontend = [v / 1000 for v in values("ts_metrics.log", latency)]
    if not handler or not frontend:
        return {}
    return {"handler_median": statistics.median(handler), "frontend_median": statistics.median(frontend),
            "frontend_overhead_median": statistics.median(frontend) - statistics.median(handler)}


# ---------------------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    lines = []
    add = lines.append
    add(f"Machine: {res['machine']}")
    add("")
    if res["inprocess"]:
        add("| in-process | threads | baseline median (p95) | ours median (p95) | speed-up |")
        add("|---|---|---|---|---|")
        for ip in res["inprocess"]:
            for k in ("128px", "24MP"):
                b, o = ip[k]["baseline"], ip[k]["ours"]
                add(f"| {k} JPEG | {ip['threads']} | {b['median_ms']:.0f} ms ({b['p95_ms']:.0f}) | "
                    f"{o['median_ms']:.0f} ms ({o['p95_ms']:.0f}) | {ip[k]['speedup']:.2f}x |")
        add("")
        add("| 8-view forward | threads | time | GFLOP/s | same-run fp32 matmul | ratio |")
        add("|---|---|---|---|---|---|")
        for ip in res["inprocess"]:
            add(f"| {ip['forward_gflop_8_views']:.1f} GFLOP | {ip['threads']} | "
                f"{ip['forward_8_views']['median_ms']:.0f} ms | {ip['forward_gflops']:.0f} | "
                f"{ip['matmul_gflops']:.0f} GFLOP/s | {100 * ip['forward_vs_matmul']:.0f} % |")
        add("")
        add("| where the time goes (ours, ms) | threads | " + " | ".join(res["inprocess"][0]["parts_ms"]) + " |")
        add("|---|---|" + "---|" * len(res["inprocess"][0]["parts_ms"]))
        for ip in res["inprocess"]:
            add(f"| | {ip['threads']} | " + " | ".join(f"{v:.1f}" for v in ip["parts_ms"].values()) + " |")
    for pr in res.get("precisions", []):
        add("")
        add(f"| precision, {pr['threads']} thread(s) | 128px JPEG median (p95) | 24MP JPEG median (p95) | "
            "vs fp32 | max / mean abs dp at build |")
        add("|---|---|---|---|---|")
        base = pr["archives"]["fp32"]["128px"]["median_ms"]
        for name, a in pr["archives"].items():
            prec = a["precision"]
            agree = (f"{prec['max_abs_dp']:.4f} / {prec['mean_abs_dp']:.4f} ({prec['images']} images)"
                     if "max_abs_dp" in prec else "reference")
            add(f"| {name} | {a['128px']['median_ms']:.0f} ms ({a['128px']['p95_ms']:.0f}) | "
                f"{a['24MP']['median_ms']:.0f} ms ({a['24MP']['p95_ms']:.0f}) | "
                f"{base / a['128px']['median_ms']:.2f}x | {agree} |")
    sp = res.get("served_precisions")
    if sp:
        add("")
        add("| served precision (1 worker each, 1 client) | 128px JPEG p50 (p95) | 24MP JPEG p50 (p95) | vs fp32 |")
        add("|---|---|---|---|")
        for name, a in sp.items():
            add(f"| {name} | {a['128px']['median_ms']:.0f} ms ({a['128px']['p95_ms']:.0f}) | "
                f"{a['24MP']['median_ms']:.0f} ms ({a['24MP']['p95_ms']:.0f}) | "
                f"{sp['fp32']['128px']['median_ms'] / a['128px']['median_ms']:.2f}x, 24MP "
                f"{sp['fp32']['24MP']['median_ms'] / a['24MP']['median_ms']:.2f}x |")
    sv = res.get("served")
    if sv:
        ip2 = next(ip for ip in res["inprocess"] if ip["threads"] == max(i["threads"] for i in res["inprocess"]))
        add("")
        add("| served (1 worker) | p50 (p95), 1 client | vs in-process | throughput, 4 clients | vs in-process |")
        add("|---|---|---|---|---|")
        for k in ("128px", "24MP"):
            lat = sv["latency_1_client"][k]
            inproc = ip2[k]["ours"]["median_ms"]
            thr = sv["throughput_4_clients"][k]
            add(f"| {k} JPEG | {lat['median_ms']:.0f} ms ({lat['p95_ms']:.0f}) | {lat['median_ms'] / inproc:.2f}x | "
                f"{thr:.2f} img/s | {thr * inproc / 1000:.2f}x |")
        split = sv.get("torchserve_metrics_ms") or {}
        if split:
            add("")
            add(f"TorchServe's own metrics, all served requests: handler (our code, PredictionTime) median "
                f"{split['handler_median']:.0f} ms; frontend inference latency median "
                f"{split['frontend_median']:.0f} ms "
                f"(frontend + IPC: {split['frontend_overhead_median']:.1f} ms).")
        if "explain_latency_1_client" in sv:
            add("")
            add("| /explanations (Grad-CAM, 8 views) | p50 (p95), 1 client | vs served prediction |")
            add("|---|---|---|")
            for k in ("128px", "24MP"):
                e, lat = sv["explain_latency_1_client"][k], sv["latency_1_client"][k]
                add(f"| {k} JPEG | {e['median_ms']:.0f} ms ({e['p95_ms']:.0f}) | "
                    f"{e['median_ms'] / lat['median_ms']:.2f}x |")
            add(f"\nFirst explanation (loads explain.pt): {sv['explain_first_s']:.1f} s; JVM + worker RSS after "
                f"explanations: {sv['rss_after_explanations_mib']:.0f} MiB.")
        add("")
        add(f"Peak RSS, JVM + worker, under 4-client load: {sv['peak_rss_mib']:.0f} MiB. "
            f"Cold start (torchserve --start to first prediction): {sv['cold_start_s']:.1f} s.")
    return "\n".join(lines)


def scratch(prefix: str) -> Path:
    """A temp folder for an archive built for this run, removed when the run ends (each is ~100 MB)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default=str(ROOT / "model_store" / "melanoma.mar"),
                    help="archive to measure (built as the demo if absent)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--load-requests", type=int, default=24, help="requests per image in the 4-client load")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--smoke", action="store_true", help="seconds-long run: every figure, few repeats")
    ap.add_argument("--no-served", action="store_true", help="skip the TorchServe part")
    ap.add_argument("--precisions-only", action="store_true",
                    help="with --bf16/--int8: only the side-by-side precision figures (in-process and served)")
    ap.add_argument("--out", default=str(RESULTS / "latest.json"))
    ap.add_argument("--bf16", nargs="?", const="build", metavar="ARCHIVE",
                    help="also time a bf16 archive against the fp32 one, side by side (built from the demo "
                         "with generated calibration photos when no path is given)")
    ap.add_argument("--int8", metavar="ARCHIVE",
                    help="also time this --precision int8 archive against the fp32 one (--archive: the same weights "
                         "in fp32), side by side")
    ap.add_argument("--inprocess-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precision-child", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.repeats, args.load_requests = 2, 4
    archive = Path(args.archive)

    if args.inprocess_child:
        print(json.dumps(inprocess(archive, args.inprocess_child, args.repeats)))
        return 0
    if args.precision_child:
        others = {k: Path(v) for k, v in (("bf16", args.bf16), ("int8", args.int8)) if v}
        print(json.dumps(precisions({"fp32": archive, **others}, args.precision_child, args.repeats)))
        return 0

    if not archive.exists():
        from testkit.harness import run_build

        tmp = scratch("bench-mar.")
        run_build(output_dir=tmp)
        archive = tmp / "melanoma.mar"
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {cpu_model()}, Python "
                   f"{platform.python_version()}",
        "archive": str(archive),
        "inprocess": [],
    }
    for n in [] if args.precisions_only else args.threads:
        proc = subprocess.run([sys.executable, __file__, "--archive", str(archive), "--repeats", str(args.repeats),
                               "--inprocess-child", str(n)], capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        res["inprocess"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.bf16 or args.int8:
        others: dict[str, Path] = {}
        if args.bf16:
            others["bf16"] = build_bf16_demo(scratch("bench-bf16.")) if args.bf16 == "build" \
                else Path(args.bf16)
        if args.int8:
            others["int8"] = Path(args.int8)
        res["precisions"] = []
        for n in args.threads:
            proc = subprocess.run([sys.executable, __file__, "--archive", str(archive), "--repeats",
                                   str(args.repeats), "--precision-child", str(n),
                                   *(a for k, v in others.items() for a in (f"--{k}", str(v)))],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            res["precisions"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if not args.no_served:
            res["served_precisions"] = served_precisions({"fp32": archive, **others}, args.repeats)
    if not args.no_served and not args.precisions_only:
        res["served"] = served(archive, args.repeats, args.load_requests)
    res["table"] = table(res)
    print(res["table"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
