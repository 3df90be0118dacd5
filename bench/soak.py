"""Soak: an hour of mixed traffic against one real TorchServe, with JVM and worker RSS every minute.

    .venv/bin/python bench/soak.py [--archive model_store/melanoma.mar] [--minutes 60] [--clients 4]
                                   [--report docs/RELIABILITY.md]

Traffic (testkit/load.py): ordinary JPEGs and PNGs, 24 MP phone photos, Grad-CAM explanations, truncated images
and text bodies, from --clients clients back to back; every answer must equal the one that input got alone
(status, and the probability within 1e-6). Memory growth is measured after a warm-up (a tenth of the run) on
JVM + worker together; the target is under 5 %. TorchServe's logs use the repository's log4j2.xml (size-capped,
rotated): their size at the end is reported. Exit 1 when an answer was wrong or the worker restarted.
The reliability tests run the same soak for 60 s (tests/integration/test_reliability.py::test_soak).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
TARGET_GROWTH = 0.05


def table(res: dict[str, Any], args: argparse.Namespace) -> str:
    g = res["growth"]
    counts = ", ".join(f"{k} x {v}" for k, v in res["counts"].items())
    curve = ", ".join(f"{t / 60:.0f}: {j + w:.0f}" for t, j, w in res["series"])
    p99 = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in res["p99_s"].items())
    ok = g and g["end_growth"] < TARGET_GROWTH and not res["wrong_count"] and res["workers_seen"] == 1
    return "\n".join([
        "## Soak (bench/soak.py)", "",
        f"Written by `bench/soak.py --minutes {args.minutes:g} --clients {args.clients}` on {res['when']}, "
        f"{os.cpu_count()} CPUs; do not edit by hand. Archive: {res['archive']}; the repository's config.properties "
        "and log4j2.xml.", "",
        "| figure | value |", "|---|---|",
        f"| duration, clients | {res['seconds'] / 60:.1f} min, {res['clients']} |",
        f"| requests (kind:status) | {res['requests']} ({res['throughput']:.2f}/s): {counts} |",
        f"| answers differing from the input's own answer | {res['wrong_count']} |",
        f"| p99 latency by kind | {p99} |",
        f"| worker processes seen | {res['workers_seen']} (1: never restarted) |",
        f"| JVM + worker RSS after warm-up ({res['warmup_s'] / 60:.0f} min) -> end | "
        + (f"{g['base_mib']:.0f} -> {g['end_mib']:.0f} MiB ({100 * g['end_growth']:+.1f} %); largest "
           f"{g['max_mib']:.0f} MiB ({100 * g['max_growth']:+.1f} %) |" if g else "too short to say |"),
        f"| growth target (< {100 * TARGET_GROWTH:.0f} % after warm-up) | {'met' if ok else '**not met**'} |",
        f"| peak JVM + worker RSS (1 s samples) | {res['peak_mib']:.0f} MiB |",
        f"| TorchServe logs at the end | {res['log_bytes'] / 2**20:.1f} MiB in {res['log_files']} files "
        "(log4j2.xml caps each log at 10 MB x 5 pieces) |",
        f"| JVM + worker RSS by minute (MiB) | {curve} |", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, default=ROOT / "model_store" / "melanoma.mar")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--sample-every", type=float, default=60, help="seconds between RSS rows (default 60)")
    ap.add_argument("--report", type=Path, help="markdown file whose 'soak' block gets the table")
    args = ap.parse_args(argv)
    if not args.archive.is_file():
        print(f"soak: error: no archive at {args.archive}: build one with ./build_mar.sh", file=sys.stderr)
        return 2

    from testkit.harness import serve_archive, stop_server
    from testkit.load import soak
    from testkit.report import replace_block

    srv = serve_archive(args.archive, "soak-ts.")
    try:
        res = soak(srv, 60 * args.minutes, args.clients, args.sample_every,
                   progress=lambda line: print(line, flush=True))
    finally:
        stop_server(srv)
    res.update(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), archive=args.archive.name)
    text = table(res, args)
    print(text)
    for w in res["wrong"]:
        print(f"  wrong: {w}")
    if args.report:
        replace_block(args.report, "soak", text)
    return 1 if res["wrong_count"] or res["workers_seen"] != 1 else 0


if __name__ == "__main__":
    sys.exit(main())
