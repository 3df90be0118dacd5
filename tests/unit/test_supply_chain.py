"""Where the packages come from (issue #40): torch from PyTorch's CPU index alone, the serving set from PyPI alone
and hash-checked against requirements.lock, never two indexes for one name (the torchtriton kind of substitution).
Checked offline: the install commands of scripts/setup.sh and the lock against requirements.txt."""

from __future__ import annotations

import re

from testkit.harness import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;#\\]+)", re.M)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_setup_never_mixes_indexes_and_checks_the_serving_set() -> None:
    text = (ROOT / "scripts" / "setup.sh").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "--extra-index-url" not in code
    torch_lines = [ln for ln in code.splitlines() if '"$torch_pin"' in ln and "install" in ln]
    assert torch_lines and all("--no-deps" in ln for ln in torch_lines)  # its dependencies come from PyPI, pinned
    assert any('--isolated install --quiet --no-deps --index-url "$cpu_index"' in ln for ln in torch_lines)
    assert '--isolated install --quiet --require-hashes --no-deps --index-url "$pypi" -r requirements.lock' in code
    assert "requirements.lock" in code.split("want=", 1)[1].split("\n", 1)[0]  # a new lock reinstalls


def test_the_lock_pins_every_serving_package_but_torch_with_hashes() -> None:
    wanted = {normalize(n): v for n, v in PIN.findall((ROOT / "requirements.txt").read_text())}
    lock = (ROOT / "requirements.lock").read_text()
    locked = {normalize(n): v for n, v in PIN.findall(lock)}
    assert wanted.pop("torch") == "2.13.0" and "torch" not in locked  # torch: the CPU index, not the lock
    assert locked == wanted, set(locked.items()) ^ set(wanted.items())
    for entry in re.split(r"\n(?=[A-Za-z])", lock.split("\n\n", 1)[-1].strip()):
        if entry.startswith("#"):
            continue
        hashes = re.findall(r"--hash=sha256:([0-9a-f]+)", entry)
        assert hashes and all(len(h) == 64 for h in hashes), entry[:80]
