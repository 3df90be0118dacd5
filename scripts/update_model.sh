#!/usr/bin/env bash
# Serve a new archive without a restart or new keys, and go back if needed:
#   scripts/update_model.sh melanoma-2.mar   # an archive in model_store/, built with another --version
#   scripts/update_model.sh --rollback       # back to the version replaced last
# Registers the new version beside the running one through the loopback management API (management key from
# key_file.json), waits for its worker, makes it the default, drains the old one and unregisters it. Only a
# plain archive name in model_store/ is accepted: no URL, no path. Run it where TorchServe was started.
# Options: --model-name, --config, --key-file, --timeout (see --help). Exit 0 done, 1 server refused, 2 usage.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# --help (or -h) prints this header and the options, and does nothing else.
case "${1:-}" in -h|--help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
  [[ ! -x "$root/.venv/bin/python" ]] || { echo; cd "$root" && .venv/bin/python -m client.update_model --help; }
  exit 0 ;; esac
[[ -x "$root/.venv/bin/python" ]] || { echo "update_model: error: no .venv here; run scripts/serve.sh first" >&2; exit 2; }
exec "$root/.venv/bin/python" -m client.update_model "$@"
