"""Files private from the first byte (issue #40): while a TorchServe instance starts the way deploy/nginx/cluster.py
starts it, every file and folder in its directory (key_file.json, which TorchServe writes and only then sets to
600; its logs; the archive it unpacks, handler code it runs, under its own java.io.tmpdir) is polled, and none is
ever readable, writable or searchable by anyone but its owner. The shipped starters set umask 077 the same way:
scripts/serve.sh, the container's entry point and the systemd units (UMask=0077) are checked as text."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from testkit.harness import ROOT, cluster_module, free_ports

pytestmark = pytest.mark.integration


def poll_modes(folder: Path, stop: threading.Event, seen: dict[str, int]) -> None:
    """Every path under `folder` with the loosest mode it was ever seen with, until `stop` is set."""
    while not stop.is_set():
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    mode = os.lstat(path).st_mode
                except FileNotFoundError:
                    continue
                if not stat.S_ISLNK(mode):
                    seen[path] = seen.get(path, 0) | stat.S_IMODE(mode)


def test_an_instance_never_exposes_its_keys_logs_or_unpacked_archive(demo_store: Path, tmp_path: Path) -> None:
    cl = cluster_module()
    work = tmp_path / "cluster"
    work.mkdir(mode=0o700)
    inst = cl.Instance(0, sorted(os.sched_getaffinity(0))[0], *free_ports(6), str(work / "ts0"))
    cluster = cl.Cluster(str(work), "127.0.0.1:1", str(demo_store), [inst])
    seen: dict[str, int] = {}
    stop = threading.Event()
    poller = threading.Thread(target=poll_modes, args=(work, stop, seen), daemon=True)
    poller.start()
    try:
        cl.start_instance(cluster, inst)
        assert cl.wait_ready(f"http://127.0.0.1:{inst.management}", Path(inst.workdir) / "key_file.json",
                             timeout=240), (Path(inst.workdir) / "torchserve.out").read_text()[-2000:]
    finally:
        stop.set()
        poller.join(timeout=30)
        cl.stop_instance(inst)
    ts = Path(inst.workdir)
    assert str(ts / "key_file.json") in seen, "never saw the key file"
    unpacked = [p for p in seen if p.startswith(str(ts / "models") + os.sep) and p.endswith(".py")]
    assert unpacked, f"never saw the unpacked archive's code under the private java.io.tmpdir: {sorted(seen)[:20]}"
    assert any(p.startswith(str(ts / "logs")) for p in seen)
    loose = {p: oct(m) for p, m in seen.items() if m & 0o077}
    print(f"polled {len(seen)} paths during the start")
    assert not loose, f"readable by others at some moment of the start: {loose}"


@pytest.mark.parametrize("starter,line", [("scripts/serve.sh", "umask 077"),
                                          ("deploy/docker/entrypoint.sh", "umask 077"),
                                          ("deploy/systemd/torchserve-melanoma.service", "UMask=0077"),
                                          ("deploy/nginx/melanoma-cluster.service", "UMask=0077")])
def test_every_starter_sets_the_umask_before_starting(starter: str, line: str) -> None:
    text = (ROOT / starter).read_text()
    start = next(i for i, ln in enumerate(text.splitlines())
                 if ("--start" in ln or ln.startswith("ExecStart=")) and not ln.lstrip().startswith("#"))
    assert any(ln.strip() == line for ln in text.splitlines()[:start]), f"{starter}: no '{line}' before the start"
    if starter == "scripts/serve.sh":  # and its own java.io.tmpdir (TorchServe's launcher reads TEMP)
        assert 'export TEMP="$root/run/tmp"' in text
