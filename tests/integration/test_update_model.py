"""scripts/update_model.sh on real TorchServe: a new version and a rollback while clients keep sending, with no
request lost, no key changed, and every answer scored by the version it names."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from handler.archive import load_archive
from testkit.harness import ROOT, Server, start_server, stop_server
from testkit.imaging import encode, lesion_rgb
from testkit.tolerance import SAME_ARCHIVE_DP

pytestmark = [pytest.mark.integration, pytest.mark.quick]  # part of scripts/test.sh --quick
CLIENTS = 3
# One version's answers agree within testkit.tolerance's bound; the two versions differ by far more (asserted below).
SAME_MODEL = SAME_ARCHIVE_DP


@pytest.fixture(scope="module")
def updatable(demo_archive: Path, trained_archive: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Server]:
    """A server of its own (it is changed here), started on the demo archive, with the trained one beside it."""
    shutil.which("java") or pytest.fail("Java 17 is required for the integration tests")
    store = tmp_path_factory.mktemp("update") / "model_store"
    store.mkdir()
    shutil.copy(demo_archive, store / "melanoma.mar")
    shutil.copy(trained_archive, store / "melanoma-trained.mar")
    srv = start_server(store, tmp_path_factory.mktemp("ts-update"))
    yield srv
    stop_server(srv)


def update(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "update_model.sh"), *args,
                           "--config", str(server.workdir / "config.properties"), "--key-file", str(server.key_file)],
                          capture_output=True, text=True, timeout=600, cwd=server.workdir)


def registered(server: Server) -> list[str]:
    h = {"Authorization": f"Bearer {server.keys()['management']}"}
    r = requests.get(f"{server.management}/models/melanoma/all", headers=h, timeout=10)
    return sorted(d["modelVersion"] for d in r.json())


class Load:
    """CLIENTS threads sending one image in a loop until stopped; every answer is kept with its time."""

    def __init__(self, server: Server, body: bytes) -> None:
        self.server, self.body, self.stop = server, body, threading.Event()
        self.arrived = threading.Condition()
        self.answers: list[tuple[float, int, dict]] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self.run) for _ in range(CLIENTS)]

    def run(self) -> None:
        with requests.Session() as s:
            h = {"Content-Type": "application/octet-stream", **self.server.headers()}
            while not self.stop.is_set():
                try:
                    r = s.post(f"{self.server.url}/predictions/melanoma", data=self.body, headers=h, timeout=120)
                except requests.RequestException as e:
                    self.errors.append(repr(e))
                    continue
                try:
                    body = r.json()
                except ValueError:
                    body = {"text": r.text}
                with self.arrived:
                    self.answers.append((time.monotonic(), r.status_code, body))
                    self.arrived.notify_all()

    def wait_answers(self, since: float, n: int = CLIENTS, timeout: float = 300) -> None:
        """Until `n` answers have arrived after `since` (an event, not a sleep: a slow machine just takes longer)."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: sum(t > since for t, _, _ in self.answers) >= n, timeout), \
                f"fewer than {n} answers within {timeout} s"

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)


def test_update_and_rollback_under_load(updatable: Server, demo_archive: Path, trained_archive: Path) -> None:
    body = encode(lesion_rgb(seed=11))
    expected = {}
    for archive in (demo_archive, trained_archive):
        answer = load_archive(archive).score(body)
        expected[answer["model"]["version"]] = answer["probability"]
    old, new = "0.0-demo", "1.0"
    assert set(expected) == {old, new} and abs(expected[old] - expected[new]) > 100 * SAME_MODEL, expected
    keys = updatable.keys()

    def step(arg: str, serving: str, since: float) -> tuple[float, float]:
        """Run update_model.sh under the load, once answers have arrived after `since` (from the version before);
        (start, end) times; afterwards only `serving` is registered."""
        load.wait_answers(since)
        start = time.monotonic()
        proc = update(updatable, arg)
        assert proc.returncode == 0, proc.stderr
        end = time.monotonic()
        assert registered(updatable) == [serving]
        return start, end

    with Load(updatable, body) as load:
        t_update, t_updated = step("melanoma-trained.mar", new, time.monotonic())
        t_rollback, t_back = step("--rollback", old, t_updated + 0.5)
        load.wait_answers(t_back + 0.5)

    assert not load.errors, load.errors[:3]
    statuses = [status for _, status, _ in load.answers]
    assert statuses and set(statuses) == {200}, [a for a in load.answers if a[1] != 200][:3]
    for _, _, answer in load.answers:  # every answer names its version and is that version's score
        version = answer["model"]["version"]
        assert abs(answer["probability"] - expected[version]) <= SAME_MODEL, (version, answer["probability"])
    during = [a["model"]["version"] for t, _, a in load.answers if t_update <= t]
    assert new in during and old in [a["model"]["version"] for t, _, a in load.answers if t < t_update]
    between = [a["model"]["version"] for t, _, a in load.answers if t_updated + 0.5 < t < t_rollback]
    assert between and set(between) == {new}  # once the update returned, only the new version answered
    assert [a["model"]["version"] for t, _, a in load.answers if t > t_back + 0.5] == \
        [old] * len([t for t, _, _ in load.answers if t > t_back + 0.5])
    # the last answers came from the version rolled back to
    assert [a["model"]["version"] for _, _, a in load.answers[-CLIENTS:]] == [old] * CLIENTS
    assert updatable.keys() == keys  # clients keep their keys
    state = json.loads((updatable.workdir / ".update_model.json").read_text())
    assert state["current"] == {"version": old, "url": "melanoma.mar"}
    assert state["previous"] == {"version": new, "url": "melanoma-trained.mar"}
    # unregistering never deletes an archive from the store
    assert {p.name for p in Path(updatable.props["model_store"]).iterdir()} >= {"melanoma.mar", "melanoma-trained.mar"}


def test_refusals_change_nothing(updatable: Server, tmp_path: Path) -> None:
    before = registered(updatable)
    outside = tmp_path / "melanoma-x.mar"
    outside.write_bytes(b"PK")
    for args, words in [(["https://example.invalid/m.mar"], "URLs are not accepted"),
                        ([str(outside)], "is not in the server's model store"),
                        (["../melanoma.mar"], "is not in the server's model store"),
                        (["melanoma.mar"], "already registered"),
                        (["nothing.mar"], "does not exist")]:
        proc = update(updatable, *args)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert registered(updatable) == before
    # the model API is on for update_model.sh, and still only for archives in the store
    h = {"Authorization": f"Bearer {updatable.keys()['management']}"}
    for url in ("https://example.invalid/evil.mar", "file:///etc/passwd"):
        r = requests.post(f"{updatable.management}/models", params={"url": url}, headers=h, timeout=30)
        assert r.status_code in (400, 404), (url, r.status_code, r.text)
    r = requests.post(f"{updatable.management}/models", params={"url": "melanoma-trained.mar"}, timeout=30)
    assert r.status_code in (400, 401) and "InvalidKeyException" in r.text  # no key, no registration
    assert registered(updatable) == before
