#!/usr/bin/env python3
"""A health endpoint that needs no key and reveals nothing, for load balancers and systemd.

TorchServe 0.12's /ping needs the inference key, which expires; a load balancer cannot send it.
This sidecar answers GET /healthz with 200 {"status": "ok"} while the model has a READY worker and
503 {"status": "unavailable"} otherwise: no model names, versions, keys or counts. It reads the
management key from key_file.json (same machine, same user) and renews it with the API key.

    .venv/bin/python scripts/health.py [--bind 127.0.0.1] [--port 8083]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from client.tsclient import management_address, model_ready

ROOT = Path(__file__).resolve().parents[1]


class Checker:
    """Asks TorchServe at most once a second, however often the load balancer polls."""

    def __init__(self, management_url: str, key_file: Path, model: str, ttl: float = 1.0) -> None:
        self.args = (management_url, key_file, model)
        self.ttl = ttl
        self.lock = threading.Lock()
        self.when = 0.0
        self.ok = False

    def healthy(self) -> bool:
        with self.lock:
            if time.monotonic() - self.when > self.ttl:
                self.ok = model_ready(*self.args)
                self.when = time.monotonic()
            return self.ok


def make_handler(checker: Checker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "health"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path.split("?")[0] not in ("/healthz", "/"):
                self._send(404, {"status": "not found"})
            elif checker.healthy():
                self._send(200, {"status": "ok"})
            else:
                self._send(503, {"status": "unavailable"})

        do_HEAD = do_GET

        def _send(self, code: int, body: dict[str, str]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, *args: object) -> None:  # health polls would flood the journal
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8083, help="port (default 8083)")
    ap.add_argument("--config", default=str(ROOT / "config.properties"))
    ap.add_argument("--key-file", default=str(ROOT / "key_file.json"))
    ap.add_argument("--model", default="melanoma")
    args = ap.parse_args(argv)
    checker = Checker(management_address(Path(args.config)), Path(args.key_file), args.model)
    server = ThreadingHTTPServer((args.bind, args.port), make_handler(checker))
    print(f"health: http://{args.bind}:{server.server_port}/healthz", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
