"""Start and stop a real TorchServe on free loopback ports, and run build_mar.sh: shared by the
integration tests and the bench. Nothing here is a mock."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import requests

from client.tsclient import instance_properties, wait_ready

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def on_run_cpus() -> None:
    """A subprocess's preexec_fn: run on every CPU of the test run, as without xdist. tests/conftest.py notes
    them (MELANOMA_RUN_CPUS) before it pins a pytest-xdist worker to its share; unpinned, a child already has
    them all. The trained fixture's training uses it for speed only (every worker waits for it): its thread count
    is fixed (--threads 2), so its weights are the same on one core or many. The resume test stays on its
    worker's CPUs: trained on every CPU beside another worker's pinned test, it slowed that test 2.4x."""
    noted = os.environ.get("MELANOMA_RUN_CPUS")
    if noted:
        os.sched_setaffinity(0, {int(c) for c in noted.split(",")})


def run_build(*args: str, output_dir: Path, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """./build_mar.sh exactly as a user runs it."""
    proc = subprocess.run([str(ROOT / "build_mar.sh"), *args, "--output-dir", str(output_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=3600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"build_mar.sh failed ({proc.returncode}): {proc.stderr}")
    return proc


def build_in_process(*args: str, output_dir: Path) -> subprocess.CompletedProcess[str]:
    """build_mar's main() in this process, for the checks that fail fast (bad options, bad checkpoints, refusals):
    the same code as ./build_mar.sh without a fresh Python importing torch for each (4-6 s a build). Returns
    what run_build returns: exit status, stdout and stderr. A few tests still go through the shell script."""
    import contextlib
    import io

    from exporter import build_mar

    out, err = io.StringIO(), io.StringIO()
    argv = [*args, "--output-dir", str(output_dir)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = build_mar.main(argv)
        except SystemExit as e:  # argparse: a bad option
            rc = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["build_mar", *argv], rc, out.getvalue(), err.getvalue())


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Server:
    url: str
    management: str
    metrics: str
    workdir: Path
    proc: subprocess.Popen[bytes]
    props: dict[str, str] = field(default_factory=dict)
    scratch: Path | None = None  # serve_archive's temp folder: stop_server removes it

    def keys(self) -> dict[str, str]:
        data = json.loads((self.workdir / "key_file.json").read_text())
        return {k: v["key"] for k, v in data.items()}

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()['inference']}"}

    def predict(self, body: bytes, model: str = "melanoma", **kw) -> requests.Response:
        h = {"Content-Type": "application/octet-stream", **self.headers(), **kw.pop("headers", {})}
        return requests.post(f"{self.url}/predictions/{model}", data=body, headers=h, timeout=120, **kw)

    def log(self, name: str = "model_log.log") -> str:
        return read_log(self.workdir / "logs", name)


def read_log(logs: Path, name: str = "model_log.log") -> str:
    """A TorchServe log whole, including what it rolled over at midnight (model_log.25-Nov.log.gz)."""
    stem = name.removesuffix(".log")
    parts = [gzip.decompress(f.read_bytes()).decode(errors="replace")
             for f in sorted(logs.glob(f"{stem}.*.log.gz"), key=lambda f: f.stat().st_mtime)]
    current = logs / name
    return "".join(parts) + (current.read_text(errors="replace") if current.exists() else "")


def missing_system_tool(message: str) -> None:
    """A Debian package a test needs is absent: fail in CI (.ci/run sets MELANOMA_REQUIRE_SYSTEM_TOOLS),
    else skip with the message saying how to install it."""
    import pytest

    if os.environ.get("MELANOMA_REQUIRE_SYSTEM_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def server_properties(store: Path, workdir: Path, overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The repo's config.properties, with free loopback ports and a private temp dir (so tests never
    collide with a running server)."""
    props = instance_properties(free_ports(5), store, workdir)
    props.update(overrides or {})
    return props


def start_server(store: Path, workdir: Path, overrides: dict[str, str] | None = None,
                 timeout: float = 240, props: dict[str, str] | None = None,
                 log_config: Path | None = None) -> Server:
    """Start TorchServe in `workdir` with the repository's log4j2.xml (or `log_config`); `props` (e.g. a stopped
    server's) reuses its ports."""
    workdir.mkdir(parents=True, exist_ok=True)
    props = props or server_properties(store, workdir, overrides)
    cfg = workdir / "config.properties"
    cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    (workdir / "key_file.json").unlink(missing_ok=True)  # never mistake a stale key file for readiness
    env = {**os.environ, "TMPDIR": str(workdir), "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    log = open(workdir / "torchserve.out", "ab")
    proc = subprocess.Popen([str(VENV_BIN / "torchserve"), "--start", "--foreground", "--ncs",
                             "--ts-config", str(cfg), "--log-config", str(log_config or ROOT / "log4j2.xml")],
                            cwd=workdir, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)  # as every starter
    server = Server(props["inference_address"], props["management_address"],
                    props["metrics_address"], workdir, proc, props)
    if wait_ready(server.management, server.key_file, timeout=timeout, alive=lambda: proc.poll() is None):
        return server
    stop_server(server)
    raise RuntimeError(f"torchserve not ready within {timeout} s (exit {proc.returncode}): "
                       f"{(workdir / 'torchserve.out').read_text()[-3000:]}")


def serve_archive(archive: Path, prefix: str = "bench-ts.", overrides: dict[str, str] | None = None) -> Server:
    """Real TorchServe (repo config, free loopback ports) serving `archive` as melanoma.mar from a fresh temp
    folder, which stop_server removes."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    store = work / "model_store"
    store.mkdir()
    (store / "melanoma.mar").symlink_to(archive.resolve())
    try:
        server = start_server(store, work / "run", overrides)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    server.scratch = work
    return server


def cluster_module():  # noqa: ANN201 (a module loaded from a file)
    """deploy/nginx/cluster.py as a module (it is a script, not a package member), loaded once."""
    import importlib.util
    import sys

    if "cluster" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cluster", ROOT / "deploy" / "nginx" / "cluster.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules["cluster"] = module  # dataclasses look their module up while the class is created
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules["cluster"]


def worker_pids(server: Server) -> list[int]:
    import psutil

    try:
        procs = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.Error:
        return []
    return [p.pid for p in procs if "model_service_worker" in " ".join(p.cmdline())]


def stop_server(server: Server, timeout: float = 30) -> None:
    """Stop the launcher, the JVM and the worker, and wait until every one of them is gone, so that
    a restart in the same folder never meets the old server (or its pid file)."""
    import psutil

    try:
        pgid = os.getpgid(server.proc.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None and pgid == os.getpgrp():  # never signal our own group
        raise RuntimeError("torchserve shares the test runner's process group")
    members = []
    if pgid is not None:
        members = [p for p in psutil.process_iter() if _pgid(p) == pgid]
        os.killpg(pgid, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=timeout)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    (server.workdir / ".model_server.pid").unlink(missing_ok=True)
    if server.scratch is not None:  # its extracted model (~60-200 MB) and key file would outlive every run
        shutil.rmtree(server.scratch, ignore_errors=True)


def _pgid(p: object) -> int | None:
    try:
        return os.getpgid(p.pid)  # type: ignore[attr-defined]
    except (ProcessLookupError, PermissionError):
        return None


def build_bf16_demo(work: Path) -> Path:
    """A demo bf16 archive, measured on 40 generated photos (bench only; real use: your own images)."""
    from testkit.imaging import encode, lesion_rgb

    cal = work / "calibration"
    cal.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (cal / f"img{i:03d}.jpg").write_bytes(encode(lesion_rgb(seed=3000 + i)))
    out = work / "bf16"
    out.mkdir(exist_ok=True)
    run_build("--precision", "bf16", "--validation-images", str(cal), "--no-explain", output_dir=out)
    return out / "melanoma.mar"
