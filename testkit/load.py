"""Load against a real TorchServe: JVM + worker memory sampling, mixed traffic, overload clients.

Shared by bench/soak.py, bench/overload.py, bench/bench.py and the reliability tests, so the figures in
docs/RELIABILITY.md and the assertions in the tests come from one implementation.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import psutil
import requests

from testkit.imaging import encode, lesion_rgb

MIB = 2**20


def phone_photo(width: int, height: int, seed: int = 0, quality: int = 92) -> bytes:
    """A JPEG as large as a camera's: a lesion upscaled plus sensor-like grain (a smooth upscale compresses
    to a fraction of a real photo's size and flatters memory figures)."""
    rgb = cv2.resize(lesion_rgb(400, 600, seed=seed), (width, height), interpolation=cv2.INTER_CUBIC)
    grain = np.random.default_rng(seed).normal(0, 6, rgb.shape)
    return encode(np.clip(rgb + grain, 0, 255).astype(np.uint8), "JPEG", quality=quality)


def photo_24mp(seed: int = 0, quality: int = 92) -> bytes:
    """6000x4000, ~6.4 MB: a phone's photo."""
    return phone_photo(6000, 4000, seed, quality)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(np.ceil(q / 100 * len(s))) - 1))]


class RssSampler:
    """JVM and worker RSS of one TorchServe, sampled every `interval` s in a thread: the peak of their sum,
    and a (seconds, jvm MiB, worker MiB) row every `record_every` s. Follows a restarted worker. The server is
    found from its launcher's pid (started with --foreground), or from its working directory (a daemon)."""

    def __init__(self, launcher_pid: int | None = None, interval: float = 0.1, record_every: float | None = None,
                 workdir: str | None = None) -> None:
        self.root = psutil.Process(launcher_pid) if launcher_pid is not None else None
        self.workdir = workdir
        self.interval = interval
        self.record_every = record_every
        self.peak = 0.0
        self.peak_parts = (0.0, 0.0)
        self.series: list[tuple[float, float, float]] = []
        self.worker_pids: set[int] = set()
        self._procs: dict[str, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _candidates(self) -> list[psutil.Process]:
        if self.root is not None:
            return self.root.children(recursive=True)
        out = []
        for p in psutil.process_iter():
            try:
                if p.cwd() == self.workdir:
                    out += [p, *p.children(recursive=True)]
            except psutil.Error:
                continue
        return out

    def _find(self) -> None:
        self._procs = {}
        for p in self._candidates():
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if "org.pytorch.serve.ModelServer" in cmd:
                self._procs["jvm"] = p
            elif "model_service_worker" in cmd:
                self._procs["worker"] = p
                self.worker_pids.add(p.pid)

    def current(self) -> tuple[float, float]:
        """(JVM, worker) RSS in MiB now; 0 for one that is not running."""
        for _ in range(2):
            try:
                if len(self._procs) < 2:
                    self._find()
                return tuple(self._procs[k].memory_info().rss / MIB if k in self._procs else 0.0
                             for k in ("jvm", "worker"))  # type: ignore[return-value]
            except psutil.Error:
                self._procs = {}
        return (0.0, 0.0)

    def _run(self) -> None:
        t0 = time.monotonic()
        next_record = 0.0
        while not self._stop.is_set():
            jvm, worker = self.current()
            if jvm + worker > self.peak:
                self.peak, self.peak_parts = jvm + worker, (jvm, worker)
            now = time.monotonic() - t0
            if self.record_every is not None and now >= next_record:
                self.series.append((now, jvm, worker))
                next_record += self.record_every
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Kind:
    """One sort of request in a traffic mix: what to send, where, and what the answer must be."""

    name: str
    body: bytes
    status: int                       # the expected HTTP status
    path: str = "predictions"         # or "explanations"
    probability: float | None = None  # the expected probability (single-request reference), for 200s


@dataclass
class Outcome:
    kind: str
    status: int          # 0: no answer (connection error or timeout)
    seconds: float
    probability: float | None
    error: str = ""


@dataclass
class Traffic:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def wrong(self, kinds: dict[str, Kind], tol: float) -> list[str]:
        """Answers that differ from what their kind expects: status, or probability by more than `tol`."""
        bad = []
        for o in self.outcomes:
            k = kinds[o.kind]
            if o.status != k.status:
                bad.append(f"{o.kind}: HTTP {o.status} (expected {k.status}) {o.error[:120]}")
            elif k.probability is not None and (o.probability is None or abs(o.probability - k.probability) > tol):
                bad.append(f"{o.kind}: p {o.probability} (expected {k.probability})")
        return bad

    def counts(self) -> Counter[str]:
        return Counter(f"{o.kind}:{o.status}" for o in self.outcomes)


def post(session: requests.Session, base_url: str, headers: dict[str, str], kind: Kind,
         timeout: float = 120) -> Outcome:
    t = time.perf_counter()
    try:
        r = session.post(f"{base_url}/{kind.path}/melanoma", data=kind.body, timeout=timeout,
                         headers={**headers, "Content-Type": "application/octet-stream"})
    except requests.RequestException as e:
        return Outcome(kind.name, 0, time.perf_counter() - t, None, type(e).__name__)
    took = time.perf_counter() - t
    p = None
    if r.status_code == 200:
        try:
            p = float(r.json()["probability"])
        except (ValueError, KeyError, TypeError):
            return Outcome(kind.name, -1, took, None, f"200 without a probability: {r.text[:120]}")
    return Outcome(kind.name, r.status_code, took, p, "" if r.status_code == 200 else r.text[:200])


def run_clients(base_url: str, headers: Callable[[], dict[str, str]], mix: list[Kind], clients: int,
                seconds: float, timeout: float = 120, on_outcome: Callable[[Outcome], None] | None = None) -> Traffic:
    """`clients` threads, each cycling through `mix` (client c starts at entry c) for `seconds`; one
    Session each, keep-alive, no retries: every answer the server gives is recorded as it was."""
    traffic = Traffic()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(c: int) -> None:
        s = requests.Session()
        for kind in itertools.islice(itertools.cycle(mix), c % len(mix), None):
            if time.monotonic() >= end:
                return
            o = post(s, base_url, headers(), kind, timeout)
            with lock:
                traffic.outcomes.append(o)
            if on_outcome:
                on_outcome(o)

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    traffic.seconds = time.monotonic() - t0
    return traffic


def latency_summary(xs: list[float]) -> dict[str, Any]:
    return {"n": len(xs), "p50_s": percentile(xs, 50), "p99_s": percentile(xs, 99),
            "max_s": max(xs) if xs else float("nan"), "mean_s": statistics.fmean(xs) if xs else float("nan")}


def growth(series: list[tuple[float, float, float]], warmup_s: float) -> dict[str, float]:
    """RSS growth after warm-up: the first row at or after `warmup_s` against the last row and against the
    largest row after it, for JVM + worker together (MiB and fraction)."""
    after = [r for r in series if r[0] >= warmup_s]
    if len(after) < 2:
        return {}
    base = after[0][1] + after[0][2]
    end = after[-1][1] + after[-1][2]
    top = max(r[1] + r[2] for r in after)
    return {"base_mib": base, "end_mib": end, "max_mib": top, "end_growth": end / base - 1,
            "max_growth": top / base - 1}


def mixed_kinds(server: Any, seed: int = 60) -> list[Kind]:
    """The soak's traffic: ordinary and phone-sized photos, explanations, and bad inputs, each with the answer
    the server gave it alone (the reference every later answer must equal)."""
    small = encode(lesion_rgb(seed=seed))
    other = encode(lesion_rgb(300, 400, seed=seed + 1), "PNG")
    big = photo_24mp(seed=seed + 2)
    kinds = [Kind("photo", small, 200), Kind("png", other, 200), Kind("24MP", big, 200),
             Kind("explanation", small, 200, path="explanations"),
             Kind("truncated", small[: len(small) // 3], 400), Kind("text", b"not an image at all", 415)]
    s = requests.Session()
    for k in kinds:
        o = post(s, server.url, server.headers(), k)
        if o.status != k.status:
            raise RuntimeError(f"soak reference for {k.name}: HTTP {o.status}, expected {k.status}: {o.error}")
        k.probability = o.probability
    # Mostly good requests, as in use: each bad input and explanation once per round of eight.
    order = ["photo", "24MP", "photo", "truncated", "png", "explanation", "photo", "text"]
    by = {k.name: k for k in kinds}
    return [by[n] for n in order]


def log_bytes(logs: Any) -> tuple[int, int]:
    """(bytes, files) under TorchServe's log folder, rotated pieces included."""
    files = [f for f in logs.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files), len(files)


def soak(server: Any, seconds: float, clients: int = 4, sample_every: float = 60.0,
         warmup: float | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Mixed traffic from `clients` clients for `seconds` against a started server (testkit.harness.Server):
    every answer checked against its reference, JVM and worker RSS recorded every `sample_every` s, growth
    measured after `warmup` (default: a tenth of the run, at least one sample)."""
    mix = mixed_kinds(server)
    kinds = {k.name: k for k in mix}
    warmup = max(sample_every, seconds / 10) if warmup is None else warmup
    logs = server.workdir / "logs"
    with RssSampler(server.proc.pid, interval=1.0, record_every=sample_every) as rss:
        if progress:
            last = [time.monotonic()]

            def report(o: Outcome) -> None:
                if time.monotonic() - last[0] >= sample_every:
                    last[0] = time.monotonic()
                    row = rss.series[-1] if rss.series else (0.0, 0.0, 0.0)
                    progress(f"{row[0] / 60:.0f} min: JVM {row[1]:.0f} + worker {row[2]:.0f} MiB")
        traffic = run_clients(server.url, server.headers, mix, clients, seconds,
                              on_outcome=report if progress else None)
        time.sleep(0.2)
        rss.series.append((traffic.seconds, *rss.current()))
    wrong = traffic.wrong(kinds, tol=1e-6)
    size, files = log_bytes(logs)
    return {"seconds": traffic.seconds, "clients": clients, "requests": len(traffic.outcomes),
            "counts": dict(sorted(traffic.counts().items())), "wrong": wrong[:5], "wrong_count": len(wrong),
            "throughput": len(traffic.outcomes) / traffic.seconds, "series": rss.series,
            "growth": growth(rss.series, warmup), "warmup_s": warmup, "peak_mib": rss.peak,
            "workers_seen": len(rss.worker_pids), "log_bytes": size, "log_files": files,
            "p99_s": {k: percentile([o.seconds for o in traffic.outcomes if o.kind == k], 99) for k in kinds}}
