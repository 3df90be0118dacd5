#!/usr/bin/env python3
"""What decoding the costliest accepted image of each format costs (issue #40): peak RSS rise and CPU seconds of
handler.pipeline.prepare (decode -> resize -> tensor), each input in a fresh Python process (as a fresh worker),
after every decoder has been loaded once. The inputs are testkit/worst.py's;
tests/integration/test_worker_input_costs.py measures the same inputs' RSS in a real TorchServe worker.

    .venv/bin/python bench/decode_cost.py [--only SUBSTRING] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, os, sys, time
from handler.pipeline import InputError, PipelineConfig, prepare
from testkit.imaging import encode, lesion_rgb

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

cfg = PipelineConfig()
for fmt in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF"):
    prepare(encode(lesion_rgb(64, 64, seed=0), fmt), cfg)
data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")
before, cpu = status("VmRSS"), time.process_time()
try:
    out = f"decoded {prepare(data, cfg).size}"
except InputError as e:
    out = f"{e.status}: {str(e)[:60]}"
print(json.dumps({"rss_mib": status("VmHWM") - before, "cpu_s": time.process_time() - cpu, "result": out}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="measure only the inputs whose name contains this")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    from testkit.worst import worst_inputs

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in worst_inputs().items():
            if args.only and args.only not in name:
                continue
            path = Path(tmp) / "input"
            data = make()
            path.write_bytes(data)
            proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True,
                                  cwd=ROOT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}, timeout=600)
            if proc.returncode != 0:
                print(f"{name}: measurement failed: {proc.stderr[-500:]}", file=sys.stderr)
                return 1
            rows.append((name, len(data), json.loads(proc.stdout.strip().splitlines()[-1])))
            if not args.markdown:
                r = rows[-1][2]
                print(f"{name:45s} {len(data):>10} B  +{r['rss_mib']:6.1f} MiB  {r['cpu_s']:5.2f} s CPU  {r['result']}")
    if args.markdown:
        print("| input | bytes | RSS rise (MiB) | CPU (s) | result |\n|---|---|---|---|---|")
        for name, size, r in rows:
            print(f"| {name} | {size:,} | {r['rss_mib']:.0f} | {r['cpu_s']:.2f} | {r['result']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
