"""A small client for the melanoma endpoint, shared by predict.py and the other tools.

Only `requests` is needed to talk to a server; torch is imported only for offline scoring.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:8080"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".mpo"}
RETRY_STATUS = {502, 503, 504, 507}  # worker busy, restarting or out of memory: worth another try


class ClientError(Exception):
    """One image could not be scored; `status` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def find_key_file(explicit: str | None = None) -> Path | None:
    """key_file.json is written where torchserve was started: look there, then in the repo root."""
    if explicit:
        return Path(explicit)
    for candidate in (Path.cwd() / "key_file.json", ROOT / "key_file.json"):
        if candidate.is_file():
            return candidate
    return None


def read_key(key_file: Path, kind: str = "inference") -> str | None:
    try:
        return json.loads(key_file.read_text())[kind]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_token(token: str | None, key_file: str | None) -> str | None:
    """--token, else TS_TOKEN, else the inference key from key_file.json."""
    if token:
        return token
    if os.environ.get("TS_TOKEN"):
        return os.environ["TS_TOKEN"]
    path = find_key_file(key_file)
    return read_key(path) if path else None


def model_ready(management_url: str, key_file: Path, model: str = "melanoma") -> bool:
    """True once a worker of `model` is READY (TorchServe's /ping says Healthy before that)."""
    key = read_key(key_file, "management")
    if not key:
        return False
    try:
        r = requests.get(f"{management_url.rstrip('/')}/models/{model}",
                         headers={"Authorization": f"Bearer {key}"}, timeout=5)
        workers = r.json()[0]["workers"] if r.status_code == 200 else []
    except (requests.RequestException, ValueError, KeyError, IndexError):
        return False
    return any(w.get("status") == "READY" for w in workers)


def wait_ready(management_url: str, key_file: Path, model: str = "melanoma", timeout: float = 180,
               alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if model_ready(management_url, key_file, model):
            return True
        time.sleep(0.5)
    return False


def iter_images(paths: Sequence[str]) -> Iterator[Path]:
    """Files as given; folders expanded (sorted, recursively) to the image files they hold."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


@dataclass
class Client:
    url: str = DEFAULT_URL
    model: str = "melanoma"
    token: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 0.5

    def __post_init__(self) -> None:
        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    @property
    def endpoint(self) -> str:
        return f"{self.url.rstrip('/')}/predictions/{self.model}"

    def predict_bytes(self, data: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/octet-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: ClientError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                # Exponential backoff with jitter, so retrying clients do not arrive in lock-step.
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                r = self.session.post(self.endpoint, data=data, headers=headers, timeout=self.timeout)
            except requests.exceptions.ConnectionError:
                last = ClientError(f"cannot connect to {self.url} (is TorchServe running?)")
                continue
            except requests.exceptions.Timeout:
                last = ClientError(f"no answer from {self.url} within {self.timeout:g} s")
                continue
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    raise ClientError(f"the server answered 200 but not JSON: {r.text[:200]!r}") from None
            last = ClientError(server_message(r), r.status_code)
            if r.status_code not in RETRY_STATUS:
                break
        assert last is not None
        raise last

    def predict_file(self, path: Path) -> dict[str, Any]:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ClientError(f"cannot read {path}: {e.strerror}") from None
        return self.predict_bytes(data)


def server_message(r: requests.Response) -> str:
    """The server's own words: our handler's {"error"}, TorchServe's {"message"}, or the text."""
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        msg = body.get("error") or body.get("message") or json.dumps(body)
        if body.get("type") == "InvalidKeyException":
            msg += " (send the inference key: --token, TS_TOKEN, or --key-file pointing at key_file.json)"
        return f"HTTP {r.status_code}: {msg}"
    return f"HTTP {r.status_code}: {r.text.strip()[:300] or r.reason}"


class OfflineScorer:
    """Scores in-process through handler/pipeline.py with the model from a .mar: the same code the
    server runs, for checking a deployment without one."""

    def __init__(self, archive: str, threads: int | None = None) -> None:
        import sys

        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from handler.pipeline import InputError, load_archive

        self._input_error = InputError
        self.archive = load_archive(archive, threads=threads)

    def predict_file(self, path: Path) -> dict[str, Any]:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ClientError(f"cannot read {path}: {e.strerror}") from None
        try:
            return self.archive.score(data)
        except self._input_error as e:
            raise ClientError(str(e), e.status) from None
