"""Shared fixtures: archives built with the real build_mar.sh, and real TorchServe on free loopback ports."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Server, run_build, start_server, stop_server


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the demo archive, with batchSize 4 and a maxBatchDelay long enough for
    concurrent requests in the tests to be batched together by TorchServe (the shipped default is 1)."""
    store = tmp_path_factory.mktemp("demo") / "model_store"
    store.mkdir()
    run_build("--batch-size", "4", "--max-batch-delay", "300", output_dir=store)
    return store


@pytest.fixture(scope="session")
def demo_archive(demo_store: Path) -> Path:
    return demo_store / "melanoma.mar"


@pytest.fixture(scope="session")
def server(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if shutil.which("java") is None:
        pytest.fail("Java 17 is required for the integration tests (sudo apt-get install openjdk-17-jre-headless)")
    srv = start_server(demo_store, tmp_path_factory.mktemp("ts"))
    yield srv
    stop_server(srv)
