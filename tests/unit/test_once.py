"""testkit.once: what the test run makes once (archives, the trained fixture, data sets) is made by one process,
read by the others, and a failure is reported to the others instead of being repeated."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from testkit.once import once


def _make(folder: Path) -> None:
    with open(folder.parent / "calls", "a") as f:
        f.write("x")
    (folder / "data").write_text("made")


def _ask(base: str) -> str:
    return (once(Path(base), "thing", _make) / "data").read_text()


def test_made_once_whoever_asks(tmp_path: Path) -> None:
    with ProcessPoolExecutor(4) as pool:
        assert list(pool.map(_ask, [str(tmp_path)] * 8)) == ["made"] * 8
    assert (tmp_path / "calls").read_text() == "x"


def test_a_failure_is_reported_not_repeated(tmp_path: Path) -> None:
    calls = []

    def broken(folder: Path) -> None:
        calls.append(folder)
        (folder / "half").write_text("")
        raise AssertionError("training the fixture failed: loss nan")

    with pytest.raises(AssertionError, match="loss nan"):
        once(tmp_path, "run", broken)
    with pytest.raises(pytest.fail.Exception, match="another worker failed to make it: AssertionError: .*loss nan"):
        once(tmp_path, "run", broken)
    assert len(calls) == 1 and not (tmp_path / "run.done").exists()
