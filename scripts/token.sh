#!/usr/bin/env bash
# Print the current inference key from key_file.json (written where torchserve started), for curl:
#   curl -H "Authorization: Bearer $(scripts/token.sh)" -T image.jpg http://127.0.0.1:8080/predictions/melanoma
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ "${1:-}" != -* ]] || { echo "token: error: unknown option $1 (usage: scripts/token.sh [KEY_FILE])" >&2; exit 2; }
[[ $# -le 1 ]] || { echo "token: error: one key file at most (usage: scripts/token.sh [KEY_FILE])" >&2; exit 2; }
file="${1:-$root/key_file.json}"
[[ -f "$file" ]] || { echo "token: error: $file not found; start the server with scripts/serve.sh" >&2; exit 1; }
python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["inference"]["key"])' "$file"
