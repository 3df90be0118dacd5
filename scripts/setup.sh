#!/usr/bin/env bash
# Set up everything the project needs, idempotently: Python >= 3.11, Java 17+, and .venv/ with the
# pinned requirements. Usage: scripts/setup.sh [--app | --dev | --openvino]   (--app adds the web page's
# packages, --dev those, OpenVINO and the test and lint tools, --openvino the runtime that archives built
# with ./build_mar.sh --runtime openvino need)
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
usage="usage: scripts/setup.sh [--app | --dev | --openvino]"
case "${1:-}" in ""|--app|--dev|--openvino) ;; *) echo "setup: error: unknown option $1 ($usage)" >&2; exit 2 ;; esac
[[ $# -le 1 ]] || { echo "setup: error: one option at most ($usage)" >&2; exit 2; }
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

reqs=requirements.txt
[[ "${1:-}" == "--app" ]] && reqs=requirements-app.txt
[[ "${1:-}" == "--dev" ]] && reqs=requirements-dev.txt
[[ "${1:-}" == "--openvino" ]] && reqs=requirements-openvino.txt

# Java: TorchServe 0.12's frontend needs Java 17 or newer.
if ! command -v java >/dev/null 2>&1; then
  die "Java 17 is required by TorchServe and was not found. Install it: Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless; Amazon Linux 2023: sudo dnf install -y java-17-amazon-corretto-headless"
fi
java_major=$(java -version 2>&1 | sed -nE '1s/.*version "([0-9]+)(\.[0-9]+)*.*/\1/p')
if [[ -z "$java_major" || "$java_major" -lt 17 ]]; then
  die "Java 17+ is required by TorchServe; found: $(java -version 2>&1 | head -1). Install it: Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless; Amazon Linux 2023: sudo dnf install -y java-17-amazon-corretto-headless"
fi

# Python
py="${PYTHON:-python3}"
command -v "$py" >/dev/null 2>&1 || die "python3 not found; install Python 3.11 or newer"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11+ is required (the pinned numpy 2.4 needs it); found $("$py" --version 2>&1)"
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv/"
  "$py" -m venv .venv || die "could not create .venv (on Debian/Ubuntu: sudo apt-get install -y python3-venv)"
fi

# Install only when the pinned requirements changed since the last successful install.
stamp=.venv/.requirements-$(basename "$reqs" .txt).sha256
want=$(cat requirements.txt requirements.lock requirements-app.txt requirements-openvino.txt requirements-evaluation.txt "$reqs" \
  | sha256sum | cut -d' ' -f1)
# One index per package, never two for one name (the torchtriton kind of mix-up):
#  - torch, the CPU build, from PyTorch's CPU index alone (--isolated: this machine's pip configuration adds no
#    other index), without its dependencies, which are pinned in requirements.txt. The +cpu local version can only
#    be met by a CPU wheel (PyPI accepts no local versions), so it never resolves to PyPI's CUDA build. Where that
#    index is out of reach, pip's own configuration may offer a local copy of the same wheel; with neither,
#    set-up stops here.
#  - the serving set, from PyPI alone, every file checked against requirements.lock's SHA-256
#    (--require-hashes; scripts/lock_requirements.py writes it). A machine whose pip configuration serves its own
#    copies: MELANOMA_PIP_CONFIGURED=1 installs requirements.txt through that configuration, unchecked.
#  - the optional sets (--app, --dev, --openvino) on top, pinned, through pip's configuration.
torch_pin="torch==2.13.0+cpu"
cpu_index=https://download.pytorch.org/whl/cpu
pypi=https://pypi.org/simple
pip=(.venv/bin/python -m pip --disable-pip-version-check)
reachable() { .venv/bin/python -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=5)" "$1" 2>/dev/null; }
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  if ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.__version__ != "2.13.0+cpu")' 2>/dev/null; then
    if reachable "$cpu_index/torch/"; then
      say "installing $torch_pin (the CPU build, ~200 MB) from $cpu_index alone"
      "${pip[@]}" --isolated install --quiet --no-deps --index-url "$cpu_index" "$torch_pin" \
        || die "could not install $torch_pin from $cpu_index"
    else
      say "$cpu_index is out of reach: installing $torch_pin as pip is configured here (a local copy of that wheel)"
      "${pip[@]}" install --quiet --no-deps "$torch_pin" \
        || die "could not install $torch_pin: pip needs PyTorch's CPU wheel index ($cpu_index) or a local copy of that wheel; PyPI alone only has the CUDA build"
    fi
  fi
  if [[ -z "${MELANOMA_PIP_CONFIGURED:-}" ]] && reachable "$pypi/pip/"; then
    say "installing the serving set from $pypi, hash-checked (requirements.lock)"
    "${pip[@]}" --isolated install --quiet --require-hashes --no-deps --index-url "$pypi" -r requirements.lock \
      || die "pip install --require-hashes -r requirements.lock failed (see above): a file that does not match its pinned SHA-256 is refused"
  else
    say "installing the serving set as pip is configured here (not hash-checked${MELANOMA_PIP_CONFIGURED:+: MELANOMA_PIP_CONFIGURED}${MELANOMA_PIP_CONFIGURED:-: $pypi out of reach})"
    "${pip[@]}" install --quiet -r requirements.txt || die "pip install -r requirements.txt failed (see above)"
  fi
  if [[ "$reqs" != requirements.txt ]]; then
    say "installing pinned requirements ($reqs); a few minutes on first run"
    "${pip[@]}" install --quiet -r "$reqs" || die "pip install -r $reqs failed (see above)"
  fi
  "${pip[@]}" check >/dev/null || die "the installed packages do not fit together: $("${pip[@]}" check | head -3)"
  echo "$want" > "$stamp"
fi
# Never a CUDA torch on a machine without a GPU: it would not fit a small instance's disk and cannot run.
.venv/bin/python - <<'PY' || exit 1
import importlib.metadata as md
import os
import sys

import torch

nvidia = [d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("nvidia-")]
if (torch.version.cuda or nvidia) and not os.path.exists("/dev/nvidia0"):
    sys.exit(f"setup: error: this .venv holds a CUDA build of torch ({torch.__version__}; {len(nvidia)} nvidia-* "
             "packages) and this machine has no GPU: rm -rf .venv and run scripts/setup.sh again where "
             "https://download.pytorch.org/whl/cpu is reachable")
PY
# The project's packages (client, exporter, handler, isic, train, testkit) import by name in .venv's Python
# from any folder and any script, with no sys.path edits: one path entry, what `pip install -e .` would write
# (rewritten on every run, so a moved checkout only needs this script again).
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$root" > "$site/melanoma-torchserve.pth"
# --dev: the browser test drives Debian's chromium, the scale-out test runs Debian's nginx, the bf16 tests
# compile with g++. Installed when this user may (root or password-less sudo); otherwise those tests say how
# and are skipped.
if [[ "$reqs" == requirements-dev.txt ]]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
  command -v g++ >/dev/null 2>&1 || need+=(g++)
  if ((${#need[@]})); then
    if [[ "$(id -u)" == 0 ]]; then as_root=(); elif sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(none); fi
    if [[ "${as_root[0]:-}" != none ]] && command -v apt-get >/dev/null 2>&1; then
      say "installing ${need[*]} (Debian packages for the browser, nginx and bf16 tests)"
      apt() { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "$@" >/dev/null 2>&1; }
      apt install -y -q --no-install-recommends "${need[@]}" \
        || { apt update -q && apt install -y -q --no-install-recommends "${need[@]}"; } \
        || say "warning: could not install ${need[*]}; their tests will be skipped (sudo apt-get install -y ${need[*]})"
    else
      say "warning: ${need[*]} not installed and no root: their tests will be skipped (sudo apt-get install -y ${need[*]})"
    fi
  fi
fi
(cd / && "$root/.venv/bin/python" -c 'import torch, ts, albumentations, resnest, client.tsclient, handler.pipeline') 2>/dev/null \
  || die ".venv is broken; remove it (rm -rf .venv) and run this again"
say "ready: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'), Java $java_major"
