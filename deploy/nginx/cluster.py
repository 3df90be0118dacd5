#!/usr/bin/env python3
"""N TorchServe instances (one worker each, each pinned to a core) behind nginx, on one machine.

    deploy/nginx/cluster.py start [--instances N] [--listen 127.0.0.1:8000]   # then:
    curl -H "Authorization: Bearer $(deploy/nginx/cluster.py key)" -T lesion.jpg http://127.0.0.1:8000/predictions/melanoma
    # on a network, over HTTPS (the gateway key must never cross it in clear):
    deploy/nginx/cluster.py start --listen 0.0.0.0:8443 --tls-cert certs/server.pem --tls-key certs/server.key
    deploy/nginx/cluster.py refresh     # every minute (melanoma-cluster-refresh.timer): renew keys, reload nginx
    deploy/nginx/cluster.py stop

Clients present one gateway key (made at first start, kept in <workdir>/gateway_key, mode 600). nginx checks
it and each hop injects its instance's own, current TorchServe inference key (TorchServe 0.12 gives every
instance different keys and has no way to preset one). TorchServe's token auth stays on behind nginx.
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from client.tsclient import instance_properties, rotate_key, wait_ready
from client.tsclient import is_loopback as tsclient_is_loopback

ROOT = Path(__file__).resolve().parents[2]

HERE = Path(__file__).resolve().parent
RENEW_BEFORE = dt.timedelta(hours=2)  # rotate an instance's key when it expires sooner than this


class ClusterError(Exception):
    pass


@dataclass
class Instance:
    index: int
    cpu: int
    inference: int
    management: int
    metrics: int
    hop: int
    grpc_inference: int
    grpc_management: int
    workdir: str


@dataclass
class Cluster:
    workdir: str
    listen: str
    store: str
    instances: list[Instance]
    per_instance: int = 4  # requests in flight per instance before nginx sheds with 503 (see nginx.conf.template)
    tls_cert: str | None = None  # PEM chain and key: nginx terminates HTTPS on `listen`
    tls_key: str | None = None
    worker_user: str = "nobody"  # nginx's workers when the gateway is started by root (never root itself)
    max_connections: int = 64  # connections one client address may hold open (nginx.conf.template)
    rate: int = 20  # requests a second one client address may start, with a burst of twice that
    worker_temp: str | None = None  # root starts: the workers' own folder for buffered bodies (make_worker_temp)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_cert else 'http'}://{self.listen}"

    @property
    def work(self) -> Path:
        return Path(self.workdir)

    def save(self) -> None:
        write_secret(self.work / "cluster.json", json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, workdir: Path) -> Cluster:
        try:
            d = json.loads((workdir / "cluster.json").read_text())
        except OSError:
            raise ClusterError(f"no cluster in {workdir} (run: cluster.py start)") from None
        return cls(d["workdir"], d["listen"], d["store"], [Instance(**i) for i in d["instances"]],
                   d.get("per_instance", 4), d.get("tls_cert"), d.get("tls_key"), d.get("worker_user", "nobody"),
                   d.get("max_connections", 64), d.get("rate", 20), d.get("worker_temp"))


def is_loopback(listen: str) -> bool:
    """Whether nginx's `listen` (host:port, [v6]:port, or a bare port: every address) stays on this machine."""
    return ":" in listen and tsclient_is_loopback(listen.rsplit(":", 1)[0])


def check_tls(cert: str | None, key: str | None, listen: str, insecure_http: bool) -> None:
    """Refuse, before anything starts, a gateway that would take keys in clear from the network."""
    if bool(cert) != bool(key):
        raise ClusterError("--tls-cert and --tls-key go together (the certificate chain and its private key, PEM)")
    for name, path in (("--tls-cert", cert), ("--tls-key", key)):
        if path and not os.access(path, os.R_OK):
            raise ClusterError(f"{name} {path}: not a readable file")
    if not cert and not is_loopback(listen) and not insecure_http:
        raise ClusterError(f"--listen {listen} is reachable from the network, where the gateway key would travel in "
                           "clear: give --tls-cert and --tls-key (scripts/make_cert.sh makes a throwaway pair), or "
                           "--insecure-http on a network you trust")


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if not found:
        raise ClusterError("nginx not found: sudo apt-get install -y nginx-light (or nginx)")
    return found


def torchserve_binary() -> str:
    venv = ROOT / ".venv" / "bin" / "torchserve"
    found = str(venv) if venv.exists() else shutil.which("torchserve")
    if not found:
        raise ClusterError("torchserve not found: run scripts/setup.sh first")
    return found


def instance_env(inst: Instance) -> dict[str, str]:
    # TMPDIR: TorchServe's pid file; java.io.tmpdir (vmargs): worker sockets. Private per instance.
    bin_dir = str(Path(torchserve_binary()).parent)
    return {**os.environ, "TMPDIR": inst.workdir, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}


def write_instance_config(cluster: Cluster, inst: Instance) -> Path:
    ports = (inst.inference, inst.management, inst.metrics, inst.grpc_inference, inst.grpc_management)
    props = instance_properties(ports, cluster.store, inst.workdir)
    path = Path(inst.workdir) / "config.properties"
    write_secret(path, "".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def start_instance(cluster: Cluster, inst: Instance) -> None:
    Path(inst.workdir).mkdir(mode=0o700, parents=True, exist_ok=True)
    (Path(inst.workdir) / "key_file.json").unlink(missing_ok=True)
    cfg = write_instance_config(cluster, inst)
    # taskset pins the JVM and its worker to one core; the worker then uses 1 torch thread
    # (handler/archive.usable_cpus reads the affinity and the cgroup quota), so instances do not fight over cores.
    cmd = ["taskset", "-c", str(inst.cpu), torchserve_binary(), "--start", "--ncs", "--ts-config", str(cfg),
           "--log-config", str(ROOT / "log4j2.xml")]
    log = os.fdopen(os.open(Path(inst.workdir) / "torchserve.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
    # umask 077: key_file.json (TorchServe writes it, then sets 600), logs and the unpacked archive (in the
    # instance's private java.io.tmpdir) are private from their first byte.
    subprocess.run(cmd, cwd=inst.workdir, env=instance_env(inst), stdout=log, stderr=subprocess.STDOUT, check=True,
                   umask=0o077)


def stop_instance(inst: Instance) -> None:
    subprocess.run([torchserve_binary(), "--stop"], cwd=inst.workdir, env=instance_env(inst),
                   capture_output=True, timeout=60)


def instance_key(inst: Instance, kind: str = "inference") -> tuple[str, dt.datetime | None]:
    data = json.loads((Path(inst.workdir) / "key_file.json").read_text())
    entry = data[kind]
    when = entry.get("expiration time")
    expires = dt.datetime.fromisoformat(when[:26].rstrip("Z") + "+00:00") if when else None
    return entry["key"], expires


def render(cluster: Cluster) -> None:
    """nginx.conf from the template, and one key include per instance (mode 600)."""
    work = cluster.work
    upstream = "\n".join(f"        server 127.0.0.1:{i.hop} max_fails=1 fail_timeout=5s;" for i in cluster.instances)
    hops = "\n".join(
        f"    server {{  # instance {i.index}: adds its key\n"
        f"        listen 127.0.0.1:{i.hop};\n"
        f"        location / {{\n"
        f"            include {work}/keys/instance{i.index}.conf;\n"
        f"            proxy_pass http://127.0.0.1:{i.inference};\n"
        f"            proxy_http_version 1.1;\n"
        f"            proxy_set_header Connection \"\";\n"
        f"            proxy_connect_timeout 2s;\n"
        f"            proxy_read_timeout 65s;\n"
        f"        }}\n"
        f"    }}" for i in cluster.instances)
    # Started by root, nginx's workers (which parse every request) must not run as root: they run as an
    # unprivileged user (--worker-user), and buffer bodies over 1 MB in a folder of that user's own (worker_temp),
    # since this private one may sit where they cannot reach. Started by anyone else, nginx cannot switch users
    # and its workers run as that user, in work/tmp.
    user = ""
    if os.geteuid() == 0:
        owner = pwd.getpwnam(cluster.worker_user)
        user = f"user {owner.pw_name} {grp.getgrgid(owner.pw_gid).gr_name};\n"
    text = (HERE / "nginx.conf.template").read_text()
    inflight = str(cluster.per_instance * len(cluster.instances))
    tls = ""
    if cluster.tls_cert:
        tls = (f"        ssl_certificate {cluster.tls_cert};\n"
               f"        ssl_certificate_key {cluster.tls_key};\n"
               "        ssl_protocols TLSv1.2 TLSv1.3;\n")
    per_client = str(max(1, cluster.per_instance * len(cluster.instances) // 2))
    listen = cluster.listen + (" ssl" if cluster.tls_cert else "")
    for name, value in {"work": str(work), "temp": cluster.worker_temp or str(work / "tmp"), "listen": listen,
                        "tls": tls, "upstream_servers": upstream, "hops": hops, "user": user,
                        "max_inflight": inflight, "max_inflight_per_client": per_client,
                        "max_connections": str(cluster.max_connections), "rate": str(cluster.rate),
                        "burst": str(2 * cluster.rate)}.items():
        text = text.replace("${" + name + "}", value)  # nginx's own $variables stay as they are
    write_secret(work / "nginx.conf", text)
    write_keys(cluster)


def make_worker_temp(cluster: Cluster) -> None:
    """Started by root: a folder (mode 700) of the unprivileged worker user's own for nginx's buffered bodies, in
    the system temp folder (this gateway's own folder and its parents may be closed to that user). Removed by
    stop. Not started by root: the workers are this user and buffer in the gateway's own tmp/."""
    if os.geteuid() != 0:
        return
    owner = pwd.getpwnam(cluster.worker_user)
    cluster.worker_temp = tempfile.mkdtemp(prefix="melanoma-gateway-")
    os.chown(cluster.worker_temp, owner.pw_uid, owner.pw_gid)


def write_secret(path: Path, text: str) -> bool:
    """Write with mode 600 (atomically); True if the content changed."""
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def gateway_key(work: Path) -> str:
    path = work / "gateway_key"
    if not path.exists():
        write_secret(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


def write_keys(cluster: Cluster) -> bool:
    work = cluster.work
    (work / "keys").mkdir(mode=0o700, exist_ok=True)
    changed = write_secret(work / "gateway_key.conf",
                           "map $http_authorization $gateway_ok {\n    default 0;\n"
                           f"    \"Bearer {gateway_key(work)}\" 1;\n}}\n")
    for inst in cluster.instances:
        key, _ = instance_key(inst)
        changed |= write_secret(work / "keys" / f"instance{inst.index}.conf",
                                f"proxy_set_header Authorization \"Bearer {key}\";\n")
    return changed


def nginx(cluster: Cluster, *args: str) -> None:
    cmd = [nginx_binary(), "-p", str(cluster.work), "-e", str(cluster.work / "logs" / "nginx_error.log"),
           "-c", str(cluster.work / "nginx.conf"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, umask=0o077)
    if proc.returncode != 0:
        raise ClusterError(f"nginx {' '.join(args) or 'start'} failed: {proc.stderr.strip()[-500:]}")


def start(cluster: Cluster, timeout: float = 240) -> None:
    """Every file the gateway and its instances make (key files, logs, unpacked archives, buffered bodies) is
    private from its first byte: written 0600 here, and TorchServe and nginx run under umask 077."""
    work = cluster.work
    for sub in ("logs", "tmp"):
        (work / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    for inst in cluster.instances:  # the JVMs start in parallel; their workers load while we wait
        start_instance(cluster, inst)
    for inst in cluster.instances:
        mgmt = f"http://127.0.0.1:{inst.management}"
        if not wait_ready(mgmt, Path(inst.workdir) / "key_file.json", timeout=timeout):
            raise ClusterError(f"instance {inst.index} not ready within {timeout:.0f} s; see {inst.workdir}/logs")
    make_worker_temp(cluster)
    cluster.save()
    render(cluster)
    nginx(cluster, "-t")
    nginx(cluster)


def refresh(cluster: Cluster) -> bool:
    """Renew inference keys that expire soon (or were replaced by a restart) and reload nginx if any
    key changed. Requests in flight finish on the old nginx workers, with the keys they were sent with."""
    now = dt.datetime.now(dt.timezone.utc)
    for inst in cluster.instances:
        _, expires = instance_key(inst)
        if expires is not None and expires - now < RENEW_BEFORE:
            api, _ = instance_key(inst, "API")
            if not rotate_key(f"http://127.0.0.1:{inst.management}", api, "inference"):
                print(f"cluster: warning: could not rotate instance {inst.index}'s key", file=sys.stderr)
    if write_keys(cluster):
        nginx(cluster, "-s", "reload")
        return True
    return False


def stop(cluster: Cluster) -> None:
    pid_file = cluster.work / "nginx.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGQUIT)  # graceful: finish in-flight requests
        except (ValueError, ProcessLookupError):
            pass
    for inst in cluster.instances:
        stop_instance(inst)
    deadline = time.monotonic() + 10
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if cluster.worker_temp:
        shutil.rmtree(cluster.worker_temp, ignore_errors=True)


def plan(workdir: Path, store: Path, n: int, listen: str, first_port: int, per_instance: int = 4) -> Cluster:
    cpus = sorted(os.sched_getaffinity(0))
    instances = []
    for i in range(n):
        base = first_port + 10 * i
        instances.append(Instance(i, cpus[i % len(cpus)], base, base + 1, base + 2, base + 3, base + 4, base + 5,
                                  str(workdir / f"ts{i}")))
    return Cluster(str(workdir), listen, str(store), instances, per_instance)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["start", "stop", "refresh", "key"])
    ap.add_argument("--workdir", default=str(ROOT / "run" / "cluster"), help="state, logs and keys")
    ap.add_argument("--instances", type=int, default=len(os.sched_getaffinity(0)), help="default: one per core")
    ap.add_argument("--listen", default="127.0.0.1:8000", help="nginx's address (default 127.0.0.1:8000)")
    ap.add_argument("--store", default=str(ROOT / "model_store"), help="folder holding melanoma.mar")
    ap.add_argument("--first-port", type=int, default=8100, help="instance i uses first-port + 10*i .. +5")
    ap.add_argument("--per-instance", type=int, default=4,
                    help="requests in flight per instance before nginx answers 503 + Retry-After (default 4)")
    ap.add_argument("--tls-cert", help="PEM certificate chain: nginx serves HTTPS on --listen")
    ap.add_argument("--tls-key", help="the certificate's private key (PEM)")
    ap.add_argument("--insecure-http", action="store_true",
                    help="allow plain HTTP on a --listen address other than loopback (keys in clear)")
    ap.add_argument("--max-connections", type=int, default=64,
                    help="connections one client address may hold open (default 64)")
    ap.add_argument("--rate", type=int, default=20,
                    help="requests a second one client address may start, burst twice that (default 20)")
    ap.add_argument("--worker-user", default="nobody",
                    help="user nginx's workers run as when the gateway is started by root (default nobody)")
    args = ap.parse_args(argv)
    if args.per_instance < 1 or args.max_connections < 1 or args.rate < 1:
        ap.error("--per-instance, --max-connections and --rate must be at least 1")
    if args.worker_user == "root":
        ap.error("--worker-user must not be root: nginx's workers parse every request")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.umask(0o077)  # whatever this command writes is this user's alone
    work = Path(args.workdir).resolve()
    try:
        if args.command == "start":
            check_tls(args.tls_cert, args.tls_key, args.listen, args.insecure_http)
            if not (Path(args.store) / "melanoma.mar").exists():
                raise ClusterError(f"{args.store}/melanoma.mar not found: build it with ./build_mar.sh")
            work.mkdir(parents=True, exist_ok=True)
            os.chmod(work, 0o700)
            cluster = plan(work, Path(args.store).resolve(), args.instances, args.listen, args.first_port,
                           args.per_instance)
            cluster.worker_user, cluster.max_connections, cluster.rate = (args.worker_user, args.max_connections,
                                                                          args.rate)
            if args.tls_cert:  # absolute: `refresh` renders the config again from wherever it runs
                cluster.tls_cert = str(Path(args.tls_cert).resolve())
                cluster.tls_key = str(Path(args.tls_key).resolve())
            start(cluster)
            print(f"serving on {cluster.url}: {args.instances} instance(s); key: cluster.py key")
        elif args.command == "key":
            print(gateway_key(work))
        elif args.command == "refresh":
            print("reloaded" if refresh(Cluster.load(work)) else "keys unchanged")
        else:
            stop(Cluster.load(work))
    except (ClusterError, subprocess.CalledProcessError) as e:
        print(f"cluster: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
