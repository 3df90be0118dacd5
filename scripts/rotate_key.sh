#!/usr/bin/env bash
# Rotate TorchServe's inference key now (the old one is refused at once) and rewrite key_file.json.
# Run on the server, as the user that started TorchServe. Then hand the new key (scripts/token.sh)
# to remote clients. Local clients (client/predict.py) pick it up from key_file.json by themselves.
#   scripts/rotate_key.sh [inference|management]
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kind="${1:-inference}"
[[ "$kind" == inference || "$kind" == management ]] || { echo "rotate_key: error: unknown kind $kind (usage: scripts/rotate_key.sh [inference | management])" >&2; exit 2; }
cd "$root"
.venv/bin/python - "$kind" <<'PY'
import sys
from pathlib import Path

from client.tsclient import management_address, read_key, rotate_key
api = read_key(Path("key_file.json"), "API")
if not api:
    sys.exit("rotate_key: error: key_file.json has no API key here; run this where TorchServe was started")
if not rotate_key(management_address(Path("config.properties")), api, sys.argv[1]):
    sys.exit("rotate_key: error: TorchServe refused or did not answer; is it running (scripts/serve.sh)?")
print(f"rotate_key: new {sys.argv[1]} key written to key_file.json (print it with scripts/token.sh)")
PY
