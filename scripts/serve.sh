#!/usr/bin/env bash
# One command from a fresh clone to a running server:
#   scripts/serve.sh                      # the untrained DEMO model (built on first run)
#   scripts/serve.sh my.ckpt [options]    # your checkpoint; options go to build_mar.sh
# Sets up .venv (scripts/setup.sh), builds model_store/melanoma.mar if needed, starts TorchServe
# with config.properties from the repo root, and waits until the model answers.
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh"
export NO_ALBUMENTATIONS_UPDATE=1

if [[ $# -gt 0 ]]; then
  ./build_mar.sh "$@" --force
elif [[ ! -f model_store/melanoma.mar ]]; then
  ./build_mar.sh
fi

ts=.venv/bin/torchserve
"$ts" --stop >/dev/null 2>&1 || true   # restart cleanly if one is already running
rm -f key_file.json                      # a fresh key file, never a stale key
# Everything the server writes is private from its first byte: TorchServe writes key_file.json and only then sets
# mode 600, and unpacks the archive (whose handler it runs) under java.io.tmpdir, by default the system temp
# folder's shared models/, which another local user could create first and fill. Ours: run/tmp (TEMP is what
# TorchServe's launcher passes as java.io.tmpdir).
umask 077
mkdir -p logs run/tmp
chmod 700 run/tmp
rm -rf run/tmp/models
export TEMP="$root/run/tmp"
# The daemon keeps whatever streams it is given: hand it a file, not this terminal or a pipe.
"$ts" --start --ts-config config.properties --log-config log4j2.xml --ncs >logs/torchserve.out 2>&1 </dev/null \
  || { echo "serve: error: torchserve did not start; see logs/torchserve.out" >&2; exit 1; }

url=$(sed -nE 's/^inference_address=(.*)$/\1/p' config.properties)
if ! .venv/bin/python scripts/wait_ready.py --timeout 180; then
  echo "serve: error: the model did not become ready within 180 s; see logs/model_log.log" >&2
  exit 1
fi
demo=$(.venv/bin/python -c 'import json, zipfile; print(json.loads(zipfile.ZipFile("model_store/melanoma.mar").read("metadata.json"))["demo"])')
echo
echo "TorchServe is serving 'melanoma' at $url"
[[ "$demo" != "True" ]] || echo "  !! DEMO MODEL: untrained weights, its scores mean nothing. Serve yours: scripts/serve.sh your.ckpt"
echo "  curl -H \"Authorization: Bearer \$(scripts/token.sh)\" -T image.jpg $url/predictions/melanoma"
echo "  .venv/bin/python client/predict.py image.jpg"
echo "  stop: .venv/bin/torchserve --stop      logs: logs/"
echo "  NOT A DIAGNOSTIC DEVICE."
