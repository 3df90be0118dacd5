"""Overload: more clients with 24 MP photos than one TorchServe worker can serve. Does it shed cleanly?

    .venv/bin/python bench/overload.py [--archive model_store/melanoma.mar] [--seconds 40] [--factor 4]
                                       [--clients 32] [--report docs/RELIABILITY.md]

Starts real TorchServe with the repository's config.properties (free loopback ports) serving the archive, then:
1. saturation: 1, 2, 3, ... clients, each posting 24 MP JPEGs back to back for --probe-seconds, until the
   throughput stops growing; "saturating" is the fewest clients reaching 90 % of the best throughput;
2. overload: --factor x saturating clients (and --clients) for --seconds each, no retries: every answer counted
   as given (200, 503 shed by the full job queue, timeouts), latencies of each, JVM + worker RSS every 50 ms;
3. recovery: the same number of clients, each scoring --images photos with client/tsclient.Client (retries with
   backoff, as `client/predict.py` does): every image must be scored once the load drops.
Prints a table; --report writes it into that markdown file's "overload" block. Benchmarks are not tests:
nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@dataclass
class Target:
    """Where the clients send: TorchServe itself, or the nginx gateway in front of one instance."""

    name: str
    url: str
    headers: Callable[[], dict[str, str]]
    sampler: Callable[[], Any]           # an RssSampler of the TorchServe behind it
    workers: Callable[[], set[int]]      # its worker pids now
    key_file: Path | None = None
    token: str | None = None


def direct_target(srv: Any) -> Target:
    from testkit.harness import worker_pids
    from testkit.load import RssSampler

    return Target("TorchServe directly", srv.url, srv.headers, lambda: RssSampler(srv.proc.pid, interval=0.05),
                  lambda: set(worker_pids(srv)), srv.key_file, srv.keys()["inference"])


def gateway_target(cluster: Any, cl: Any) -> Target:
    from testkit.load import RssSampler

    inst = cluster.instances[0]
    key = cl.gateway_key(cluster.work)

    def workers() -> set[int]:
        s = RssSampler(workdir=inst.workdir)
        s.current()
        return s.worker_pids

    return Target(f"nginx gateway (--per-instance {cluster.per_instance}), 1 instance pinned to 1 core",
                  f"http://{cluster.listen}", lambda: {"Authorization": f"Bearer {key}"},
                  lambda: RssSampler(workdir=inst.workdir, interval=0.05), workers, None, key)


def probe(srv: Any, mix: list[Any], seconds: float, max_clients: int = 6) -> tuple[int, list[tuple[int, float]]]:
    from testkit.load import run_clients

    curve: list[tuple[int, float]] = []
    for c in range(1, max_clients + 1):
        t = run_clients(srv.url, srv.headers, mix, c, seconds)
        ok = sum(o.status == 200 for o in t.outcomes)
        curve.append((c, ok / t.seconds))
        print(f"  {c} client(s): {ok / t.seconds:.2f} img/s")
        if c >= 2 and curve[-1][1] < 1.1 * max(tp for _, tp in curve[:-1]):
            break
    best = max(tp for _, tp in curve)
    return next(c for c, tp in curve if tp >= 0.9 * best), curve


def overload(srv: Target, mix: list[Any], clients: int, seconds: float, timeout: float) -> dict[str, Any]:
    from testkit.load import latency_summary, run_clients

    before = srv.workers()
    with srv.sampler() as rss:
        t = run_clients(srv.url, srv.headers, mix, clients, seconds, timeout=timeout)
    by: dict[int, list[float]] = {}
    for o in t.outcomes:
        by.setdefault(o.status, []).append(o.seconds)
    n = len(t.outcomes)
    other = {str(k): len(v) for k, v in by.items() if k not in (200, 503)}
    return {"clients": clients, "seconds": t.seconds, "requests": n, "ok": len(by.get(200, [])),
            "shed": len(by.get(503, [])), "other": other, "shed_rate": len(by.get(503, [])) / max(n, 1),
            "throughput": len(by.get(200, [])) / t.seconds, "ok_latency": latency_summary(by.get(200, [])),
            "shed_latency": latency_summary(by.get(503, [])), "peak_rss_mib": rss.peak,
            "peak_parts_mib": rss.peak_parts, "worker_restarted": srv.workers() != before,
            "errors": sorted({o.error for o in t.outcomes if o.status not in (200, 503)})[:3]}


def recovery(srv: Target, mix: list[Any], photo: bytes, reference: float, hammer: int, seconds: float,
             clients: int, images: int) -> dict[str, Any]:
    """`clients` retrying clients (client/tsclient.Client with the CLI's defaults) each score `images` photos
    while `hammer` clients without retries overload the server for `seconds`; then the load drops. Every image
    must be scored, each with the single-request probability."""
    from client.tsclient import Client, ClientError
    from testkit.load import run_clients

    answers: list[float | str] = []
    retried = [0]
    lock = threading.Lock()

    def one(c: int) -> None:
        client = Client(url=srv.url, key_file=srv.key_file, token=srv.token)

        def count(r: Any, *a: Any, **k: Any) -> None:
            if r.status_code != 200:
                with lock:
                    retried[0] += 1

        client.session.hooks["response"].append(count)
        for _ in range(images):
            try:
                p: float | str = client.predict_bytes(photo)["probability"]
            except ClientError as e:
                p = str(e)
            with lock:
                answers.append(p)

    t0 = time.monotonic()
    background = threading.Thread(target=run_clients, args=(srv.url, srv.headers, mix, hammer, seconds))
    background.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))
    done = time.monotonic() - t0
    background.join()
    scored = [a for a in answers if isinstance(a, float)]
    return {"clients": clients, "hammer": hammer, "hammer_seconds": seconds, "images": clients * images,
            "scored": len(scored), "retries": retried[0], "seconds": done,
            "max_dp": max((abs(p - reference) for p in scored), default=None),
            "failures": sorted({a for a in answers if isinstance(a, str)})[:3]}


def config_figures() -> dict[str, str]:
    from client.tsclient import read_properties

    props = read_properties(ROOT / "config.properties")
    return {k: props.get(k, "(default)") for k in ("job_queue_size", "vmargs", "max_request_size")}


def table(res: dict[str, Any]) -> str:
    ms = lambda s: f"{1000 * s:.0f} ms" if s == s else "-"  # noqa: E731 (nan: no such answers)
    lines = [
        "## Overload (bench/overload.py)", "",
        f"Written by `bench/overload.py --seconds {res['args']['seconds']:g} --factor {res['args']['factor']}` on "
        f"{res['when']}, {os.cpu_count()} CPUs; do not edit by hand. Archive: {res['archive']}; 24 MP JPEG of "
        f"{res['photo_mb']:.1f} MB; config.properties: job_queue_size={res['config']['job_queue_size']}, "
        f"`{res['config']['vmargs']}`. Clients without retries send back to back and count every answer as given; "
        "then retrying clients (client/tsclient.Client with the CLI's defaults: 6 retries, backoff 0.5 s doubling "
        "with jitter, ~30 s in all, Retry-After honoured) score a few photos each during a burst of such "
        f"overload ({res['args']['burst']:g} s) and after it. Load generator, nginx and TorchServe share this "
        "machine's cores.", ""]
    for t in res["targets"]:
        lines += [f"### {t['name']}", "",
                  "Saturation (clients: 24 MP img/s): " + ", ".join(f"{c}: {tp:.2f}" for c, tp in t["curve"])
                  + f"; saturating: {t['saturating']} client(s).", "",
                  "| clients, no retries | requests | 200 | 503 (shed) | other | throughput | 200 p50 / p99 | "
                  "503 p50 / p99 | peak JVM + worker RSS | worker restarted |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["overload"]:
            other = ", ".join(f"{k}: {v}" for k, v in r["other"].items()) or "0"
            lines.append(
                f"| {r['clients']} for {r['seconds']:.0f} s | {r['requests']} | {r['ok']} | {r['shed']} "
                f"({100 * r['shed_rate']:.0f} %) | {other} | {r['throughput']:.2f} img/s | "
                f"{ms(r['ok_latency']['p50_s'])} / {ms(r['ok_latency']['p99_s'])} | "
                f"{ms(r['shed_latency']['p50_s'])} / {ms(r['shed_latency']['p99_s'])} | "
                f"{r['peak_rss_mib']:.0f} MiB ({r['peak_parts_mib'][0]:.0f} + {r['peak_parts_mib'][1]:.0f}) | "
                f"{'**yes**' if r['worker_restarted'] else 'no'} |")
        rc = t["recovery"]
        lines += ["", "| retrying clients, beside clients without retries | images | scored | answers retried | "
                  "all answered after | max abs(p - single-request p) |", "|---|---|---|---|---|---|",
                  f"| {rc['clients']} x {rc['images'] // rc['clients']} photos, beside {rc['hammer']} for "
                  f"{rc['hammer_seconds']:g} s | {rc['images']} | {rc['scored']} | {rc['retries']} | "
                  f"{rc['seconds']:.0f} s | "
                  f"{'-' if rc['max_dp'] is None else format(rc['max_dp'], '.1e')} |", ""]
        errors = sorted({e for r in t["overload"] for e in r["errors"]} | set(rc["failures"]))
        if errors:
            lines += ["Errors seen: " + "; ".join(" ".join(e.replace("|", "/").split())[:160] for e in errors[:4]), ""]
    return "\n".join(lines)


def measure(target: Target, mix: list[Any], photo: bytes, reference: float, args: argparse.Namespace) -> dict[str, Any]:
    print(f"{target.name}\nsaturation:")
    saturating, curve = probe(target, mix, args.probe_seconds)
    runs = []
    for n in sorted({args.factor * saturating, *args.clients}):
        print(f"overload: {n} clients for {args.seconds:g} s")
        runs.append(overload(target, mix, n, args.seconds, args.timeout))
        time.sleep(5)  # let the queue drain between runs
    n = max(r["clients"] for r in runs)
    print(f"recovery: {args.retrying} retrying clients beside {n} clients without retries for {args.burst:g} s")
    rec = recovery(target, mix, photo, reference, n, args.burst, args.retrying, args.images)
    return {"name": target.name, "curve": curve, "saturating": saturating, "overload": runs, "recovery": rec}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", type=Path, default=ROOT / "model_store" / "melanoma.mar")
    ap.add_argument("--seconds", type=float, default=40, help="each overload run (default 40)")
    ap.add_argument("--probe-seconds", type=float, default=15, help="each saturation step (default 15)")
    ap.add_argument("--factor", type=int, default=4, help="overload = factor x saturating clients (default 4)")
    ap.add_argument("--clients", type=int, nargs="*", default=[32], help="further client counts (default 32)")
    ap.add_argument("--burst", type=float, default=20,
                    help="seconds of overload beside the retrying clients (default 20: within the ~30 s a client "
                         "keeps retrying with the CLI's defaults)")
    ap.add_argument("--retrying", type=int, default=8, help="retrying clients in the recovery run (default 8)")
    ap.add_argument("--images", type=int, default=3, help="photos per retrying client (default 3)")
    ap.add_argument("--timeout", type=float, default=60, help="client timeout, s (default 60)")
    ap.add_argument("--no-gateway", action="store_true", help="skip the run behind deploy/nginx")
    ap.add_argument("--no-direct", action="store_true", help="skip the run against TorchServe itself")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config.properties setting for this run (e.g. job_queue_size=8)")
    ap.add_argument("--report", type=Path, help="markdown file whose 'overload' block gets the table")
    args = ap.parse_args(argv)
    if not args.archive.is_file():
        print(f"overload: error: no archive at {args.archive}: build one with ./build_mar.sh", file=sys.stderr)
        return 2
    overrides = dict(kv.split("=", 1) for kv in args.set)

    from testkit.harness import serve_archive, stop_server
    from testkit.load import Kind, photo_24mp
    from testkit.report import replace_block

    photo = photo_24mp(seed=3)
    targets = []
    srv = serve_archive(args.archive, "overload-ts.", overrides)
    try:
        ref = srv.predict(photo)
        ref.raise_for_status()
        reference = ref.json()["probability"]
        mix = [Kind("24MP", photo, 200, probability=reference)]
        if not args.no_direct:
            targets.append(measure(direct_target(srv), mix, photo, reference, args))
    finally:
        stop_server(srv)
    if not args.no_gateway:
        targets.append(gateway_run(args, mix, photo, reference))
    res = {"args": vars(args), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "archive": args.archive.name, "photo_mb": len(photo) / 1e6, "config": {**config_figures(), **overrides},
           "targets": targets}
    text = table(res)
    print(text)
    if args.report:
        replace_block(args.report, "overload", text)
    return 0


def gateway_run(args: argparse.Namespace, mix: list[Any], photo: bytes, reference: float) -> dict[str, Any]:
    """deploy/nginx/cluster.py with one instance, started as a user would (its own temp folder and ports)."""
    import shutil
    import tempfile

    from testkit.harness import cluster_module, free_ports

    cl = cluster_module()
    work = Path(tempfile.mkdtemp(prefix="overload-gw."))
    store = work / "model_store"
    store.mkdir()
    (store / "melanoma.mar").symlink_to(args.archive.resolve())
    ports = free_ports(7)
    cpu = sorted(os.sched_getaffinity(0))[0]
    cluster = cl.Cluster(str(work), f"127.0.0.1:{ports[-1]}", str(store),
                         [cl.Instance(0, cpu, *ports[:6], str(work / "ts0"))])
    try:
        cl.start(cluster)
        return measure(gateway_target(cluster, cl), mix, photo, reference, args)
    finally:
        cl.stop(cluster)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
