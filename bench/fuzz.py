"""A longer run of the pipeline fuzzer (testkit/fuzz.py) than the unit tier's 2 x 600 inputs.

    .venv/bin/python bench/fuzz.py [--inputs 20000] [--seed 0]

Prints the outcome counts and the slowest input; any finding (an exception other than the pipeline's
InputError, a wrong shape, non-finite values, or an input slower than TIME_LIMIT_S) is written to
bench/results/fuzz/ to be kept as a regression case. Exit 1 when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import warnings
from pathlib import Path

from testkit.fuzz import TIME_LIMIT_S, fuzz

OUT = Path(__file__).resolve().parent / "results" / "fuzz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # Pillow's notes on corrupt data are expected here
    t0 = time.perf_counter()
    report = fuzz(args.inputs, seed=args.seed)
    took = time.perf_counter() - t0
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items()))
    print(f"{args.inputs} inputs (seed {args.seed}) in {took:.0f} s: {counts}; slowest {report.slowest_s:.3f} s "
          f"(limit {TIME_LIMIT_S} s); findings {len(report.findings)}")
    for name, problem, data in report.findings:
        OUT.mkdir(parents=True, exist_ok=True)
        path = OUT / f"{name}-{hashlib.sha256(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        print(f"  finding from {name}: {problem} -> {path}")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
