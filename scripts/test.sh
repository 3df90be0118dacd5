#!/usr/bin/env bash
# One command from a fresh clone to a full test run: sets up .venv with the pinned test tools,
# checks Java 17, lints (ruff; import cycles), then runs both tiers (unit: no server; integration:
# builds real archives with build_mar.sh and starts real TorchServe on free loopback ports).
#   scripts/test.sh                 # everything (docs/TESTING.md: what it covers and costs)
#   scripts/test.sh --quick         # what protects the main paths on every change (marked quick, not slow)
#   scripts/test.sh -m "not integration"   # extra arguments go to pytest
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
depth=()
if [[ "${1:-}" == "--quick" ]]; then
  shift
  depth=(-m "quick and not slow")
fi
"$root/scripts/setup.sh" --dev
export NO_ALBUMENTATIONS_UPDATE=1
.venv/bin/ruff check .
.venv/bin/python scripts/check_imports.py   # no import cycle between our packages
# One pytest-xdist worker per core (at most 4: each may run its own TorchServe), whole files per worker so a
# module's archive is built once; the session's archives and the trained fixture are built once per run
# (tests/conftest.py). Pass -n 0 to run in one process.
exec .venv/bin/python -m pytest -n auto --maxprocesses 4 --dist loadgroup "${depth[@]}" "$@"
