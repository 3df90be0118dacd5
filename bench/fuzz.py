"""A longer run of the pipeline fuzzer (testkit/fuzz.py) than the unit tier's 2 x 600 inputs.

    .venv/bin/python bench/fuzz.py [--inputs 20000] [--seed 0] [--report docs/RELIABILITY.md]

Prints the outcome counts and the slowest input; any finding (an exception other than the pipeline's
InputError, a wrong shape, non-finite values, or an input slower than TIME_LIMIT_S) is written to
bench/results/fuzz/ to be kept as a regression case. Exit 1 when there is one. --report puts the counts in
that markdown file's "fuzz" block (the reliability tests keep their own block in the same file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

from testkit.fuzz import TIME_LIMIT_S, fuzz, seeds
from testkit.report import replace_block

OUT = Path(__file__).resolve().parent / "results" / "fuzz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", type=Path, help="markdown file whose 'fuzz' block gets the counts")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow's notes on corrupt data are expected here
    t0 = time.perf_counter()
    report = fuzz(args.inputs, seed=args.seed)
    took = time.perf_counter() - t0
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items()))
    print(f"{args.inputs} inputs (seed {args.seed}) in {took:.0f} s: {counts}; slowest {report.slowest_s:.3f} s "
          f"(limit {TIME_LIMIT_S} s); findings {len(report.findings)}")
    if args.report:
        per_seed = ", ".join(f"{name} ({len(data)} B)" for name, data in sorted(seeds().items()))
        replace_block(args.report, "fuzz", "\n".join([
            "## Fuzzing (bench/fuzz.py)", "",
            f"Written by `bench/fuzz.py --inputs {args.inputs} --seed {args.seed}` on "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs; do not edit by hand.",
            "Each input is a seed image mutated 1-3 times (bit flips, header bytes, truncation, duplicated or deleted "
            "chunks, inserted junk, huge sizes) and run through decode + preprocess.", "",
            "| figure | value |", "|---|---|",
            f"| inputs | {args.inputs} ({took:.0f} s) |",
            *[f"| outcome: {k} | {v} |" for k, v in sorted(report.outcomes.items())],
            f"| findings (exception other than InputError, bad tensor, > {TIME_LIMIT_S} s) | {len(report.findings)} |",
            f"| slowest input | {report.slowest_s:.3f} s |",
            f"| seeds | {per_seed} |", ""]))
    for name, problem, data in report.findings:
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{name}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        print(f"  finding from {name}: {problem} -> {path}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
