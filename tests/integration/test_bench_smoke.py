"""The bench runs and produces every figure (its smoke mode). No assertion on time: benchmarks are not tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.harness import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_smoke(demo_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--archive", str(demo_archive),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [ip["threads"] for ip in res["inprocess"]] == [1, 2]
    for ip in res["inprocess"]:
        assert ip["forward_gflop_8_views"] == pytest.approx(22.7, abs=0.2)
        for k in ("128px", "24MP"):
            assert ip[k]["baseline"]["median_ms"] > 0 and ip[k]["ours"]["median_ms"] > 0
    served = res["served"]
    assert set(served["latency_1_client"]) == {"128px", "24MP"}
    assert served["peak_rss_mib"] > 0 and served["cold_start_s"] > 0
    assert "| served (1 worker)" in proc.stdout
