#!/usr/bin/env bash
# One command from a fresh clone to a running server:
#   scripts/serve.sh                      # the untrained DEMO model (built on first run)
#   scripts/serve.sh my.ckpt [options]    # your checkpoint; options go to build_mar.sh
# Sets up .venv (scripts/setup.sh), builds model_store/melanoma.mar if needed, starts TorchServe
# with config.properties from the repo root, and waits until the model answers.
set -euo pipefail
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
"$ts" --start --ts-config config.properties --ncs >/dev/null \
  || { echo "serve: error: torchserve did not start; see logs/ts_log.log" >&2; exit 1; }

url=$(sed -nE 's/^inference_address=(.*)$/\1/p' config.properties)
for _ in $(seq 1 180); do
  key=$(.venv/bin/python -c 'import json; print(json.load(open("key_file.json"))["inference"]["key"])' 2>/dev/null || true)
  if [[ -n "$key" ]] && curl -sf -H "Authorization: Bearer $key" "$url/ping" 2>/dev/null | grep -q Healthy; then
    demo=$(unzip -p model_store/melanoma.mar metadata.json | .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["demo"])')
    echo
    echo "TorchServe is serving 'melanoma' at $url"
    [[ "$demo" == "True" ]] && echo "  !! DEMO MODEL: untrained weights, its scores mean nothing. Serve yours: scripts/serve.sh your.ckpt"
    echo "  curl -H \"Authorization: Bearer \$(scripts/token.sh)\" -T image.jpg $url/predictions/melanoma"
    echo "  .venv/bin/python client/predict.py image.jpg"
    echo "  stop: .venv/bin/torchserve --stop      logs: logs/"
    echo "  NOT A DIAGNOSTIC DEVICE."
    exit 0
  fi
  sleep 1
done
echo "serve: error: the model did not become healthy within 180 s; see logs/model_log.log" >&2
exit 1
