"""A small client for the melanoma endpoint, shared by predict.py and the other tools.

Only `requests` is needed to talk to a server; torch is imported only for offline scoring.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_URL = "http://127.0.0.1:8080"
from isic.labels import IMAGE_SUFFIXES  # noqa: E402 (one list for the client and evaluation)

RETRY_STATUS = {429, 502, 503, 504, 507}  # rate-limited (the gateway), worker busy, restarting or out of memory


class ClientError(Exception):
    """One image could not be scored; `status` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def read_properties(path: Path) -> dict[str, str]:
    """TorchServe's config.properties as a dict (key=value lines; # comments)."""
    props: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


def instance_properties(ports: Sequence[int], store: str | Path, private_dir: str | Path,
                        base: Path | None = None) -> dict[str, str]:
    """The repository's config.properties for one of several TorchServe instances on this machine:
    `ports` = inference, management, metrics, gRPC inference, gRPC management (all loopback), and a
    private java.io.tmpdir, where TorchServe puts its worker sockets (shared, they would collide)."""
    props = read_properties(base or ROOT / "config.properties")
    inf, mgmt, met, g1, g2 = ports
    props.update({
        "inference_address": f"http://127.0.0.1:{inf}",
        "management_address": f"http://127.0.0.1:{mgmt}",
        "metrics_address": f"http://127.0.0.1:{met}",
        "grpc_inference_port": str(g1),
        "grpc_management_port": str(g2),
        "model_store": str(store),
        "vmargs": props["vmargs"] + f" -Djava.io.tmpdir={private_dir}",
    })
    return props


def management_address(config: Path) -> str:
    return read_properties(config).get("management_address", "http://127.0.0.1:8081")


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
    """True once a worker of `model` is READY (TorchServe's /ping says Healthy before that).
    An expired management key is rotated with the API key from the same file."""
    for _ in range(2):
        key = read_key(key_file, "management")
        if not key and key_file.exists():
            return False  # being written
        # No key file at all: token auth may be off (the SageMaker/KServe configs); then no header.
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            r = requests.get(f"{management_url.rstrip('/')}/models/{model}", headers=headers, timeout=5)
        except requests.RequestException:
            return False
        if _key_refused(r):
            api = read_key(key_file, "API")
            if not api or not rotate_key(management_url, api, "management"):
                return False
            continue
        try:
            workers = r.json()[0]["workers"] if r.status_code == 200 else []
        except (ValueError, KeyError, IndexError, TypeError):
            return False
        return any(w.get("status") == "READY" for w in workers)
    return False


def wait_ready(management_url: str, key_file: Path, model: str = "melanoma", timeout: float = 180,
               alive: Callable[[], bool] = lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if model_ready(management_url, key_file, model):
            return True
        time.sleep(0.5)
    return False


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The options every tool that calls the endpoint takes."""
    ap.add_argument("--url", default=DEFAULT_URL, help=f"inference address (default {DEFAULT_URL})")
    ap.add_argument("--model", default="melanoma", help="model name (default melanoma)")
    ap.add_argument("--token", help="inference key (default: $TS_TOKEN, else key_file.json)")
    ap.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json, then the repo's)")
    ap.add_argument("--management-url",
                    help="management address, to rotate an expired key with the API key from the key file "
                    "(default: port 8081 on the same host when --url is loopback http)")
    ap.add_argument("--cacert", help="CA bundle to verify an https:// server (for a private CA)")
    ap.add_argument("--insecure-http", action="store_true",
                    help="allow sending the key over plain http:// to a non-loopback host")
    ap.add_argument("--workers", type=int, default=4, help="images in flight at once (default 4)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    ap.add_argument("--retries", type=int, default=6,
                    help="retries on 429/502/503/504/507, a worker that died mid-request and connection errors, "
                         "backing off 0.5, 1, 2 ... 16 s (default 6: ~30 s)")


def client_from_args(args: argparse.Namespace) -> Client:
    token = resolve_token(args.token, args.key_file)
    # Renewal reads the key file: the one named, or the one the key came from.
    from_file = args.key_file or not (args.token or os.environ.get("TS_TOKEN"))
    return Client(args.url, args.model, token, args.timeout, args.retries,
                  key_file=find_key_file(args.key_file) if from_file else None,
                  management_url=args.management_url or default_management_url(args.url),
                  cacert=args.cacert, insecure_http=args.insecure_http)


def iter_images(paths: Sequence[str]) -> Iterator[Path]:
    """Files as given; folders expanded (sorted, recursively) to the image files they hold."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield p


class AuthError(ClientError):
    """The key was refused and could not be renewed: no point trying other images."""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_management_url(url: str) -> str | None:
    """Key rotation needs the management API, which stays on loopback: only guess it for a local server."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}:8081" if u.scheme == "http" and is_loopback(u.hostname) else None


@dataclass
class Client:
    url: str = DEFAULT_URL
    model: str = "melanoma"
    token: str | None = None
    timeout: float = 60.0
    retries: int = 6  # backoff 0.5 s doubling: ~30 s of refusals (an overload burst) before giving up
    backoff: float = 0.5
    key_file: Path | None = None  # re-read when the key is refused; holds the API key on the server machine
    management_url: str | None = None  # where to rotate an expired inference key (loopback only)
    cacert: str | None = None  # a private CA bundle for https:// URLs
    insecure_http: bool = False  # allow sending the key over plain http to a non-loopback host

    def __post_init__(self) -> None:
        u = urlsplit(self.url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ClientError(f"bad --url {self.url!r}: expected http(s)://host:port")
        if u.scheme == "http" and not is_loopback(u.hostname) and self.token:
            if not self.insecure_http:
                raise ClientError(
                    f"refusing to send the inference key in clear text to {u.hostname} over http://; "
                    "use an https:// URL (see README, HTTPS) or pass --insecure-http if the network is yours"
                )
            print(f"WARNING: sending the inference key to {u.hostname} over plain http://", file=sys.stderr)
        self.session = requests.Session()
        # Passed with every request: a session-level verify loses to REQUESTS_CA_BUNDLE in the environment.
        self.verify: str | bool = self.cacert or True
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._key_lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"{self.url.rstrip('/')}/predictions/{self.model}"

    @property
    def explain_endpoint(self) -> str:
        return f"{self.url.rstrip('/')}/explanations/{self.model}"

    def predict_bytes(self, data: bytes, explain: bool = False) -> dict[str, Any]:
        """The prediction; with `explain`, from /explanations with a heatmap and PNG overlay."""
        last: ClientError | None = None
        renewed = False
        attempt = 0
        wait = 0.0  # the server's Retry-After, when it sent one
        while attempt <= self.retries:
            if attempt:
                # Exponential backoff with jitter, so retrying clients do not arrive in lock-step; never
                # sooner than the server asked (the nginx gateway's 503 says Retry-After: 2).
                delay = self.backoff * 2 ** (attempt - 1) * (0.5 + random.random())
                time.sleep(max(delay, wait * (1 + 0.5 * random.random())))
            attempt += 1
            token = self.token
            headers = {"Content-Type": "application/octet-stream"}
            if explain:
                headers["X-Overlay"] = "true"
            if token:
                headers["Authorization"] = f"Bearer {token}"
            try:
                r = self.session.post(self.explain_endpoint if explain else self.endpoint, data=data,
                                      headers=headers, timeout=self.timeout, verify=self.verify)
            except requests.exceptions.SSLError as e:
                raise ClientError(
                    f"TLS certificate verification failed for {self.url} ({_reason(e)}); "
                    "for a private CA pass --cacert ca.pem"
                ) from None
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
            if _key_refused(r):
                if renewed or not self.renew_key(token):
                    raise AuthError(
                        "the inference key was refused (expired or rotated): get the current one on the "
                        "server with scripts/token.sh and pass it with --token or TS_TOKEN", r.status_code)
                renewed = True
                attempt -= 1  # a renewed key is not a retry
                continue
            last = ClientError(server_message(r), r.status_code)
            if r.status_code not in RETRY_STATUS and not worker_died(r):
                break
            wait = retry_after(r)
        assert last is not None
        raise last

    def renew_key(self, refused: str | None) -> bool:
        """After a refusal: take a newer key from the key file, or rotate it with the API key when this
        machine can read it. Threads share one renewal; the key itself is never printed."""
        with self._key_lock:
            if self.token != refused:
                return True  # another thread already renewed it
            if self.key_file is None:
                return False
            fresh = _read_key_retrying(self.key_file, "inference")
            if fresh and fresh != refused:
                self.token = fresh
                return True
            api = _read_key_retrying(self.key_file, "API")
            if not api or not self.management_url:
                return False
            if not rotate_key(self.management_url, api, "inference", self.cacert):
                return False
            fresh = _read_key_retrying(self.key_file, "inference")
            if fresh and fresh != refused:
                self.token = fresh
                return True
            return False

    def predict_file(self, path: Path, explain: bool = False) -> dict[str, Any]:
        return self.predict_bytes(read_image_file(path), explain)


def read_image_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read {path}: {e.strerror}") from None


def rotate_key(management_url: str, api_key: str, kind: str = "inference", cacert: str | None = None) -> bool:
    """TorchServe 0.12: GET <management>/token?type=KIND with the API key issues a new key and
    rewrites key_file.json; the old key is refused from then on."""
    try:
        r = requests.get(f"{management_url.rstrip('/')}/token", params={"type": kind},
                         headers={"Authorization": f"Bearer {api_key}"}, timeout=10, verify=cacert or True)
    except requests.RequestException:
        return False
    return r.status_code == 200


def _read_key_retrying(key_file: Path, kind: str) -> str | None:
    for _ in range(5):  # TorchServe may be rewriting the file right now
        key = read_key(key_file, kind)
        if key:
            return key
        time.sleep(0.1)
    return None


def _key_refused(r: requests.Response) -> bool:
    return r.status_code in (400, 401, 403) and "InvalidKeyException" in r.text


def _reason(e: Exception) -> str:
    text = str(e)
    for marker in ("certificate verify failed", "hostname mismatch", "self-signed certificate",
                   "unable to get local issuer certificate"):
        if marker in text:
            return marker
    return text[:160]


def worker_died(r: requests.Response) -> bool:
    """TorchServe's own 500 for a request whose worker died under it (a restart, kill -9, out of memory): a
    prediction is idempotent, so it is retried like a 503. The handler's own 500s are not."""
    return r.status_code == 500 and "Worker died" in r.text


def retry_after(r: requests.Response, cap: float = 30.0) -> float:
    """Seconds from a Retry-After header given in seconds (0 without one; capped, so a server cannot park us)."""
    try:
        return min(max(float(r.headers.get("Retry-After", 0)), 0.0), cap)
    except ValueError:  # an HTTP date: not sent by nginx's or TorchServe's answers here
        return 0.0


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
    if r.status_code == 413 and not r.text.strip():
        return "HTTP 413: the request is larger than the server's max_request_size (26 MiB by default)"
    return f"HTTP {r.status_code}: {r.text.strip()[:300] or r.reason}"


def server_module(name: str) -> Any:
    """A module of the server side, for offline mode only: a client-only install (pip install .) has none."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ClientError(f"offline mode needs the server's packages ({e.name} is not installed): run it with the "
                          "repository's .venv (scripts/setup.sh), or score through a server") from None


class OfflineScorer:
    """Scores in-process through handler/pipeline.py with the model from a .mar: the same code the
    server runs, for checking a deployment without one."""

    def __init__(self, loaded: Any) -> None:
        self.archive = loaded
        self._input_error = server_module("handler.pipeline").InputError
        self._explainer: Any = None

    @classmethod
    def from_path(cls, archive: str, threads: int | None = None) -> OfflineScorer:
        ar = server_module("handler.archive")
        try:
            return cls(ar.load_archive(archive, threads=threads))
        except (ar.ArchiveError, OSError) as e:  # OSError: no such file, or not an archive
            raise ClientError(str(e) if str(archive) in str(e) else f"{archive}: {e}") from None

    def predict_file(self, path: Path, explain: bool = False) -> dict[str, Any]:
        data = read_image_file(path)
        try:
            if not explain:
                return self.archive.score(data)
            import handler.explain as ex  # the handler's own explanation code

            if self._explainer is None:
                self._explainer = ex.load_explainer(self.archive)
            score = self.archive.scorer.score_bytes(data)
            return ex.explain_images(self._explainer, [data], [score], self.archive.metadata, [True])[0]
        except self._input_error as e:
            raise ClientError(str(e), e.status) from None
