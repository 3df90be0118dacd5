#!/usr/bin/env bash
# The browser page (client/app.py) against the running server, on http://127.0.0.1:8501.
# Installs the optional web packages (requirements-app.txt) into .venv/ first. Extra arguments go to the
# app, e.g.: scripts/app.sh --url https://host:8443 --cacert ca.pem
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
"$root/scripts/setup.sh" --app
# Loopback unless APP_ADDRESS says otherwise (put HTTPS in front before exposing it).
exec .venv/bin/streamlit run client/app.py --server.address "${APP_ADDRESS:-127.0.0.1}" \
  --server.port "${APP_PORT:-8501}" -- "$@"
