#!/usr/bin/env bash
# The browser page (client/app.py) against the running server, on http://127.0.0.1:8501.
# Installs the optional web packages (requirements-app.txt) into .venv/ first. Extra arguments go to the
# app, e.g.: scripts/app.sh --url https://host:8443 --cacert ca.pem
# The page scores with the server's key for whoever reaches it, so it listens on loopback only: APP_ADDRESS
# (default 127.0.0.1) may name another address only together with --allow-remote, once HTTPS and a login stand
# in front of it (docs/SECURITY.md, "The web page"). APP_PORT sets the port (default 8501).
set -euo pipefail
# --help (or -h) prints this header and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;; esac
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
address="${APP_ADDRESS:-127.0.0.1}"
case "$address" in
  127.*|localhost|::1|'[::1]') ;;
  *) [[ " $* " == *" --allow-remote "* ]] || {
       echo "app: error: APP_ADDRESS=$address is reachable from the network and the page holds the inference key;" \
            "serve it on 127.0.0.1 behind HTTPS and a login, or pass --allow-remote once that is in place" >&2
       exit 2; } ;;
esac
"$root/scripts/setup.sh" --app
exec .venv/bin/streamlit run client/app.py --server.address "$address" \
  --server.port "${APP_PORT:-8501}" -- "$@"
