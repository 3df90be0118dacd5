#!/usr/bin/env bash
# Build model_store/melanoma.mar from a checkpoint, or the untrained demo model when none is given.
#   ./build_mar.sh [CHECKPOINT] [--threshold T] [--tta-views {1,2,4,8}] [--version V] [--force] ...
# Run ./build_mar.sh --help for every option.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="$root/.venv/bin/python"
if [[ ! -x "$py" ]]; then
  echo "build_mar: error: $root/.venv is missing; run ./scripts/serve.sh (or ./scripts/setup.sh) first" >&2
  exit 2
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m exporter.build_mar "$@"
