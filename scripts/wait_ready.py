#!/usr/bin/env python3
"""Wait until the model's worker is READY, reading addresses from config.properties and keys from
key_file.json. Exit 0 when ready, 1 on timeout. Used by scripts/serve.sh."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.tsclient import management_address, wait_ready

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=str(ROOT / "config.properties"))
    ap.add_argument("--key-file", default=str(ROOT / "key_file.json"))
    ap.add_argument("--model", default="melanoma")
    ap.add_argument("--timeout", type=float, default=180)
    args = ap.parse_args()
    management = management_address(Path(args.config))
    return 0 if wait_ready(management, Path(args.key_file), args.model, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
