"""Shared fixtures: archives built with the real build_mar.sh, real TorchServe on free loopback ports, and a
network trained by train/ (the trained fixture) so that every numeric check also runs on trained weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.tsclient import wait_ready
from testkit import fixture_cache
from testkit.archives import BATCHED, BATCHED_CONFIG, variant
from testkit.harness import ROOT, Server, on_run_cpus, run_build, start_server, stop_server
from testkit.once import once
from train.synthetic import write_dataset

# The trained fixture: resnest50_fast_4s1x64d trained from scratch by `python -m train` (all layers, BatchNorm
# statistics updated) on train.synthetic's task (irregular two-tone lesions vs round even ones), fp32 so the
# result does not depend on this CPU's bf16 support. ~3 minutes on 2 cores; reaches validation AUC 1.0.
# It is NOT a melanoma model: the label is a drawn property. Two torch threads whatever the machine: the thread
# count orders the fp32 sums, so with torch's default (one per core) a 1-, 2- and 4-core machine each trained
# another network and every figure measured on it could move. Its weights now depend on the CPU's instruction set
# (the kernels oneDNN picks) and the torch version only.
FIXTURE_TRAIN_ARGS = ("--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--warmup-epochs", "0.5",
                      "--precision", "fp32", "--device", "cpu", "--seed", "7", "--save-every", "0", "--threads", "2",
                      "--init", "scratch")  # from random weights: no ImageNet download in tests
FIXTURE_IMAGES, HELDOUT_IMAGES = 400, 96
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... under pytest-xdist; None in one process


def _pin_xdist_worker() -> None:
    """Under pytest-xdist (scripts/test.sh), worker k gets its own share of this machine's CPUs. Its torch, and
    all it starts (builds, training, TorchServe and its worker), inherit the affinity and size their threads to
    it (handler.archive.usable_cpus), so workers never run more compute threads than there are cores: OpenMP
    threads oversubscribed 2:1 made the suite slower than one process."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not XDIST_WORKER or count < 2 or not hasattr(os, "sched_setaffinity"):  # affinity is Linux-only
        return
    cpus = sorted(os.sched_getaffinity(0))
    if count > len(cpus):
        return
    os.environ["MELANOMA_RUN_CPUS"] = ",".join(map(str, cpus))  # testkit.harness.on_run_cpus
    share = len(cpus) // count
    k = int(XDIST_WORKER.removeprefix("gw"))
    os.sched_setaffinity(0, cpus[k * share:(k + 1) * share])
    if "torch" in sys.modules:  # imported before this conftest: it sized its threads to every CPU
        sys.modules["torch"].set_num_threads(share)


_pin_xdist_worker()


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 or int8 package is compiled once per run per weights and CPU class: every build_mar.sh here runs
    with a private --compile-cache of this run's own (never the user's), shared by the xdist workers (a build
    that finds another compiling the same package waits for it: exporter.export.export_compiled)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if XDIST_WORKER else base) / "compile-cache"
    path.mkdir(mode=0o700, exist_ok=True)
    os.environ["MELANOMA_COMPILE_CACHE"] = str(path)
    return path


def _once(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], object]) -> Path:
    """`make` once per test run, in the run's shared basetemp (each xdist worker has its own below it)."""
    base = factory.getbasetemp()
    return once(base.parent if XDIST_WORKER else base, name, make)


def _require_java() -> None:
    if shutil.which("java") is None:
        pytest.fail("Java 17 is required for the integration tests (sudo apt-get install openjdk-17-jre-headless)")


def _test_store(factory: pytest.TempPathFactory, name: str, *checkpoint: str) -> Path:
    """A model store holding the archive built from `checkpoint` (none: the demo) with the shipped settings, and
    its batched variant (BATCHED, the same archive with BATCHED_CONFIG). Built once per run; the session's
    servers serve both, other tests start TorchServe on it with the archive alone."""
    def make(folder: Path) -> None:
        store = folder / "model_store"
        store.mkdir()
        run_build(*checkpoint, output_dir=store)
        variant(store / "melanoma.mar", store, name=BATCHED, config=BATCHED_CONFIG)

    return _once(factory, f"{name}-store", make) / "model_store"


def _serve(store: Path, factory: pytest.TempPathFactory, name: str) -> Iterator[Server]:
    """TorchServe on `store` with both its models."""
    _require_java()
    srv = start_server(store, factory.mktemp(name), {"load_models": f"melanoma=melanoma.mar,{BATCHED}={BATCHED}.mar"})
    if not wait_ready(srv.management, srv.key_file, BATCHED, timeout=240):
        stop_server(srv)
        raise RuntimeError(f"{BATCHED} did not become ready: {srv.log()[-3000:]}")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _test_store(tmp_path_factory, "demo")


@pytest.fixture(scope="session")
def demo_archive(demo_store: Path) -> Path:
    return demo_store / "melanoma.mar"


@pytest.fixture(scope="session")
def server(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(demo_store, tmp_path_factory, "ts")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _once(tmp_path_factory, "synthetic", lambda root: write_dataset(root, FIXTURE_IMAGES, seed=0))


@pytest.fixture(scope="session")
def heldout_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Images the fixture never saw (another seed): train.csv + jpeg/."""
    return _once(tmp_path_factory, "heldout", lambda root: write_dataset(root, HELDOUT_IMAGES, seed=1))


@pytest.fixture(scope="session")
def trained_run(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of `python -m train`, exactly as a user runs it (trained once per run, or restored from an
    earlier run on this machine with the same code, packages and CPU: testkit.fixture_cache)."""
    def make(folder: Path) -> None:
        name = f"trained-{fixture_cache.key(FIXTURE_TRAIN_ARGS, FIXTURE_IMAGES)}"
        if fixture_cache.restore(folder / "run", name):
            return
        cmd = [sys.executable, "-m", "train", "--labels", str(synthetic_data / "train.csv"),
               "--images", str(synthetic_data / "jpeg"), "--out", str(folder / "run"), *FIXTURE_TRAIN_ARGS,
               "--no-progress"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600, preexec_fn=on_run_cpus)
        assert proc.returncode == 0, f"training the fixture failed: {proc.stderr[-3000:]}"
        fixture_cache.keep(folder / "run", name)

    return _once(tmp_path_factory, "trained-run", make) / "run"


SERVERS = {"server", "server_of", "trained_server"}  # the session's read-only TorchServes
# The modules that read from those servers. Under `--dist loadfile` (scripts/test.sh) they run on one worker as if
# they were one file, so each server starts once per run, not once per worker; every other module runs whole on
# one worker (pytest_xdist_make_scheduler below). Kept by hand because the scheduler, in the controller, sees only
# node ids; pytest_collection_modifyitems refuses a run where a module reading them is missing here.
SERVED = frozenset({"tests/integration/test_serving.py", "tests/integration/test_explanations.py",
                    "tests/integration/test_evaluate.py", "tests/integration/test_train.py",
                    "tests/integration/test_web_app.py", "tests/integration/test_worker_input_costs.py",
                    "tests/integration/test_model_urls.py"})


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile`, with the SERVED modules as one file. (xdist's own `--dist loadgroup` would do it with
    marks, but under pytest 9 it no longer groups: the node id it rewrites is not the one pytest reports.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "served modules" if path in SERVED else path

    return ByModule(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The unit tier joins --quick; every integration test has its marker; every module reading the session's
    servers is in SERVED."""
    unmarked = [item.nodeid for item in items if "integration" in item.path.parts
                and item.get_closest_marker("integration") is None]
    if unmarked:  # `-m "not integration"` (the unit tier alone) would run them without saying so
        raise pytest.UsageError(f"tests under tests/integration without the integration marker: {unmarked[:5]}")
    for item in items:  # the unit tier is part of --quick unless a test is slow (scripts/test.sh)
        if "unit" in item.path.parts:
            item.add_marker(pytest.mark.quick)
    readers = {item.nodeid.split("::", 1)[0] for item in items if SERVERS & set(getattr(item, "fixturenames", ()))}
    if readers - SERVED:
        raise pytest.UsageError(f"{sorted(readers - SERVED)} read the session's servers: add them to SERVED in "
                                "tests/conftest.py, or each worker starts those servers")


def _needs_trained(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return "trained_run" in getattr(item, "fixturenames", ()) or params.get("weights") == "trained"


@pytest.fixture(scope="session", autouse=True)
def _train_first(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist, when any test of the run needs the trained fixture, every worker asks for it before
    its first test: one trains on every core while the others wait, instead of training two threads beside a
    busy worker (measured: 424 s instead of ~100 s, and the worker beside it slowed as much)."""
    if XDIST_WORKER and any(_needs_trained(i) for i in request.session.items):
        request.getfixturevalue("trained_run")


@pytest.fixture(scope="session")
def trained_checkpoint(trained_run: Path) -> Path:
    return trained_run / "best.ckpt"


@pytest.fixture(scope="session")
def trained_store(trained_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _test_store(tmp_path_factory, "trained", str(trained_checkpoint))


@pytest.fixture(scope="session")
def trained_archive(trained_store: Path) -> Path:
    return trained_store / "melanoma.mar"


@pytest.fixture(scope="session")
def trained_server(trained_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(trained_store, tmp_path_factory, "ts-trained")


WEIGHTS = ["demo", "trained"]


@pytest.fixture(params=WEIGHTS)
def weights(request: pytest.FixtureRequest) -> str:
    """Parametrises a numeric test over the demo and the trained fixture."""
    return request.param


@pytest.fixture
def archive_of(weights: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{weights}_archive")


@pytest.fixture
def checkpoint_of(weights: str, request: pytest.FixtureRequest):  # noqa: ANN201 (torch imported lazily)
    """The LoadedCheckpoint of the demo or of the trained fixture (trained on first use)."""
    from exporter.checkpoint import load_checkpoint
    from exporter.export import demo_checkpoint

    return demo_checkpoint() if weights == "demo" else load_checkpoint(request.getfixturevalue("trained_checkpoint"))


@pytest.fixture
def server_of(weights: str, request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue("server" if weights == "demo" else "trained_server")


_LOADED: dict[Path, object] = {}


@pytest.fixture
def offline_of(archive_of: Path) -> object:
    """The in-process pipeline over the same archive the server serves (loaded once per session)."""
    from handler.archive import load_archive

    if archive_of not in _LOADED:
        _LOADED[archive_of] = load_archive(archive_of)
    return _LOADED[archive_of]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Tests whose path depends on this CPU or on the weights record which one they took
    (record_property("branch", ...)); the run ends by listing them, so a green run says what it checked."""
    rows = sorted({f"{rep.nodeid}: {value}" for key in ("passed", "failed")
                   for rep in terminalreporter.stats.get(key, []) if rep.when == "call"
                   for name, value in rep.user_properties if name == "branch"})
    if rows:
        terminalreporter.section("branches taken (outcomes that depend on this CPU or on the weights)")
        for row in rows:
            terminalreporter.line(row)
