"""TorchServe's logs under the repository's log4j2.xml: cut by size, a fixed number of gzipped pieces kept, so
a small disk never fills however long the server runs. Checked with the same file, its size cut lowered."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testkit.harness import ROOT, read_log, start_server, stop_server
from testkit.imaging import encode, lesion_rgb

pytestmark = pytest.mark.integration
KEEP = 5  # DefaultRolloverStrategy max in log4j2.xml


def test_logs_rotate_and_stay_bounded(demo_store: Path, tmp_path: Path) -> None:
    shipped = (ROOT / "log4j2.xml").read_text()
    assert shipped.count('size="10 MB"') == 5 and shipped.count(f'max="{KEEP}"') == 5
    small = tmp_path / "log4j2.xml"
    small.write_text(shipped.replace('size="10 MB"', 'size="1 KB"'))
    server = start_server(demo_store, tmp_path / "ts", log_config=small)
    try:
        data = encode(lesion_rgb(seed=3))
        for _ in range(20):  # ~3 KB of access log, far more of the others: each rotates, most past KEEP
            assert server.predict(data).status_code == 200
        bad = server.predict(b"not an image")
        assert bad.status_code == 415
    finally:
        stop_server(server)
    logs = tmp_path / "ts" / "logs"
    for name in ("access_log", "model_log", "ts_log"):
        pieces = sorted(p.name for p in logs.glob(f"{name}.*.log.gz"))
        assert pieces and len(pieces) <= KEEP, (name, pieces)  # it rotated, and kept no more than KEEP
        assert all(re.fullmatch(rf"{name}\.[1-{KEEP}]\.log\.gz", p) for p in pieces), pieces
        # a piece is cut at the size (a whole last line may pass it)
        assert (logs / f"{name}.log").stat().st_size < 1024 + 2048
    # nothing is lost from what is kept: the newest lines are still readable through the rotated pieces
    assert "not an image" in read_log(logs) or "415" in read_log(logs, "access_log.log")
    # the console gets warnings and errors only
    console = (tmp_path / "ts" / "torchserve.out").read_text()
    assert not re.search(r"\[INFO ?\]", console), console[-2000:]
