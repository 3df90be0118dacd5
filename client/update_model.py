"""Replace the served model without a restart (scripts/update_model.sh).

1. Register the new archive's version beside the running one (management API, loopback, management key;
   only a plain archive name inside the server's model_store: no URL, no path).
2. Wait until its workers are READY, then make it the default: new requests go to it from then on.
3. Drain the old version: a customized describe travels through the old version's job queue like a
   prediction, so once every old worker has answered one, every request it took before has been answered.
4. Unregister the old version. Clients keep their keys (an expired management key is renewed with the
   API key, as every tool here does).

`--rollback` does the same towards the version that was replaced last (recorded in .update_model.json beside
key_file.json). Exit status: 0 done, 1 the server refused or did not answer (what stands is printed),
2 bad usage or an archive that cannot be used (nothing was changed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import requests

from client.tsclient import ROOT, _key_refused, find_key_file, read_key, read_properties, rotate_key, server_message

ARCHIVE_NAME = re.compile(r"[A-Za-z0-9_.-]+\.mar")  # the same shape config.properties' allowed_urls admits
STATE_FILE = ".update_model.json"
PROG = "update_model"


class UpdateError(Exception):
    """The server refused or did not answer; the message says what stands now."""


class UsageError(Exception):
    """Bad usage or an unusable archive; nothing was changed."""


@dataclass(frozen=True)
class Version:
    version: str
    url: str  # the archive's name in model_store, as TorchServe records it


def archive_identity(path: Path) -> tuple[str, str]:
    """(model name, version) from the archive's MAR-INF/MANIFEST.json."""
    try:
        with zipfile.ZipFile(path) as z:
            model = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        return str(model["modelName"]), str(model["modelVersion"])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise UsageError(f"{path.name} is not a TorchServe archive with a model name and version ({e})") from None


def store_archive(arg: str, store: Path) -> Path:
    """The archive as a plain name in the model store; anything else (a URL, a path elsewhere) is refused."""
    if "://" in arg:
        raise UsageError(f"{arg}: URLs are not accepted; copy the archive into {store}/ and give its name")
    path = Path(arg)
    if path.parent != Path("."):  # a path: it must name a file directly inside the store
        if path.resolve().parent != store.resolve():
            raise UsageError(f"{arg} is not in the server's model store {store}/: copy it there first")
        path = Path(path.name)
    if not ARCHIVE_NAME.fullmatch(path.name):
        raise UsageError(f"{arg}: an archive name is letters, digits, '_', '.', '-' and ends in .mar")
    full = store / path.name
    if not full.is_file() or full.is_symlink():
        raise UsageError(f"{full} does not exist (or is not a plain file); build it with "
                         f"./build_mar.sh --version V --output-dir {store}")
    return full


class Management:
    """The loopback management API with the management key; an expired key is rotated with the API key."""

    def __init__(self, url: str, key_file: Path | None, model: str) -> None:
        self.url, self.key_file, self.model = url.rstrip("/"), key_file, model

    def call(self, method: str, path: str, timeout: float = 30, **params: Any) -> requests.Response:
        for _ in range(2):
            key = read_key(self.key_file, "management") if self.key_file else None
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                r = requests.request(method, f"{self.url}{path}", params=params, headers=headers, timeout=timeout)
            except requests.RequestException as e:
                raise UpdateError(f"the management API at {self.url} did not answer ({type(e).__name__}); "
                                  "is TorchServe running (scripts/serve.sh)?") from None
            api = read_key(self.key_file, "API") if self.key_file else None
            if _key_refused(r) and api and rotate_key(self.url, api, "management"):
                continue
            return r
        return r

    def checked(self, method: str, path: str, what: str, timeout: float = 30, **params: Any) -> Any:
        r = self.call(method, path, timeout=timeout, **params)
        if r.status_code != 200:
            raise UpdateError(f"{what}: {server_message(r)}")
        return r.json()

    def versions(self) -> list[dict[str, Any]]:
        return self.checked("GET", f"/models/{self.model}/all", f"describing {self.model}")

    def default(self) -> Version:
        listed = self.checked("GET", "/models", "listing models", limit=1000)
        url = next((m["modelUrl"] for m in listed.get("models", []) if m["modelName"] == self.model), None)
        for d in self.versions():
            if d["modelUrl"] == url:
                return Version(d["modelVersion"], url)
        raise UpdateError(f"TorchServe serves no model named {self.model!r}")

    def workers(self, version: str) -> list[dict[str, Any]]:
        return self.checked("GET", f"/models/{self.model}/{version}", f"describing {version}")[0]["workers"]

    def wait_ready(self, version: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = [w for w in self.workers(version) if w.get("status") == "READY"]
            if len(ready) >= count:
                return
            time.sleep(0.5)
        raise UpdateError(f"version {version} has no {count} READY worker(s) after {timeout:.0f} s")

    def drain(self, version: str, timeout: float) -> None:
        """Return once every worker of `version` has answered a customized describe sent after the switch
        of default: each had finished every prediction it took before."""
        pids = {w["pid"] for w in self.workers(version)}
        seen: set[int] = set()
        deadline = time.monotonic() + timeout

        def barrier(_: int) -> int | None:
            body = self.checked("GET", f"/models/{self.model}/{version}", "draining", timeout=timeout,
                                customized="true")
            return (body[0].get("customizedMetadata") or {}).get("worker_pid")

        with ThreadPoolExecutor(max_workers=len(pids) or 1) as pool:
            while not pids <= seen:
                if time.monotonic() > deadline:
                    raise UpdateError(f"version {version} did not drain within {timeout:.0f} s")
                answered = list(pool.map(barrier, range(len(pids))))
                if None in answered:  # an archive whose handler does not say which worker answered
                    raise UpdateError(f"version {version}'s handler does not name its worker in a customized "
                                      "describe, so its drain cannot be proven")
                seen |= set(answered)


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, path)  # never half-written


def switch(mgmt: Management, archive: Path, state_path: Path, timeout: float,
           say: Any = print) -> Version:
    """Serve `archive` (a plain file in the model store) instead of the current default. Returns the old version."""
    name, version = archive_identity(archive)
    if name != mgmt.model:
        raise UsageError(f"{archive.name} was built as model {name!r}, not {mgmt.model!r} "
                         f"(./build_mar.sh --model-name {mgmt.model})")
    old = mgmt.default()
    if version in {d["modelVersion"] for d in mgmt.versions()}:
        raise UsageError(f"version {version} of {mgmt.model} is already registered ({old.url} serves "
                         f"{old.version}); build the new archive with another --version")
    workers = max(1, len(mgmt.workers(old.version)))
    say(f"{PROG}: registering {archive.name} (version {version}) beside {old.version} with {workers} worker(s)")
    mgmt.checked("POST", "/models", f"registering {archive.name}", timeout=timeout, url=archive.name,
                 model_name=mgmt.model, initial_workers=workers, synchronous="true")
    try:
        mgmt.wait_ready(version, workers, timeout)
        mgmt.checked("PUT", f"/models/{mgmt.model}/{version}/set-default", f"making {version} the default")
    except UpdateError:
        mgmt.call("DELETE", f"/models/{mgmt.model}/{version}", timeout=timeout)  # leave the old one serving
        raise
    write_state(state_path, {"model": mgmt.model, "current": {"version": version, "url": archive.name},
                             "previous": {"version": old.version, "url": old.url}})
    say(f"{PROG}: {version} is the default; draining {old.version}")
    try:
        mgmt.drain(old.version, timeout)
        mgmt.checked("DELETE", f"/models/{mgmt.model}/{old.version}", f"unregistering {old.version}",
                     timeout=timeout, synchronous="true")
    except UpdateError as e:
        raise UpdateError(f"{e} ({version} serves; {old.version} is still registered)") from None
    say(f"{PROG}: serving {mgmt.model} {version} from {archive.name}; {old.version} ({old.url}) unregistered "
        f"(back to it: scripts/update_model.sh --rollback)")
    return old


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (scripts/update_model.sh --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = OneLineParser(prog="scripts/update_model.sh", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("archive", nargs="?", help="the new archive's name in model_store/ (e.g. melanoma-2.mar)")
    ap.add_argument("--rollback", action="store_true", help="go back to the version replaced last")
    ap.add_argument("--model-name", default="melanoma", help="the endpoint to update (default: melanoma)")
    ap.add_argument("--config", default=str(ROOT / "config.properties"),
                    help="the server's config.properties (default: the repository's)")
    ap.add_argument("--key-file", help="the server's key_file.json (default: ./key_file.json, then the repo's)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for each step (default 300)")
    args = ap.parse_args(argv)
    if bool(args.archive) == args.rollback:
        ap.error("give either an archive name or --rollback")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = Path(args.config)
    try:
        props = read_properties(config)
    except OSError as e:
        print(f"{PROG}: error: cannot read {config}: {e.strerror}", file=sys.stderr)
        return 2
    store = Path(props.get("model_store", "model_store"))
    store = store if store.is_absolute() else config.resolve().parent / store
    key_file = find_key_file(args.key_file)
    mgmt = Management(props.get("management_address", "http://127.0.0.1:8081"), key_file, args.model_name)
    state_path = (key_file.parent if key_file else Path.cwd()) / STATE_FILE
    try:
        if args.rollback:
            state = read_state(state_path)
            if state.get("model") != args.model_name or "previous" not in state:
                raise UsageError(f"nothing to roll back to: {state_path} records no earlier update of "
                                 f"{args.model_name}")
            target = store_archive(state["previous"]["url"], store)
        else:
            target = store_archive(args.archive, store)
        switch(mgmt, target, state_path, args.timeout)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except UpdateError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
