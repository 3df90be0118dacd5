"""deploy/nginx/cluster.py refuses, before it starts anything, a gateway that would take its key in clear from the
network; with a certificate it renders an HTTPS listener (served end to end in tests/integration/test_scale_out.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from testkit.harness import ROOT, cluster_module

cl = cluster_module()


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:8000", True), ("127.9.9.9:8000", True), ("localhost:8000", True), ("[::1]:8443", True),
    ("0.0.0.0:8443", False), ("8443", False), ("*:8443", False), ("[::]:8443", False),
    ("10.0.0.5:8000", False), ("melanoma.example.org:8443", False),
])
def test_loopback_is_told_from_the_network(listen: str, loopback: bool) -> None:
    assert cl.is_loopback(listen) is loopback


def _pair(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    return str(cert), str(key)


@pytest.mark.parametrize(("args", "words"), [
    (["--listen", "0.0.0.0:8443"], "reachable from the network"),
    (["--listen", "8443"], "--insecure-http"),
    (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "KEY"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "CERT", "--tls-key", "/nonexistent/server.key"], "not a readable file"),
])
def test_start_refuses_before_starting_anything(args: list[str], words: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cert, _ = _pair(tmp_path)
    work = tmp_path / "cluster"
    argv = ["start", "--workdir", str(work), "--store", str(tmp_path / "no-store"),
            *(cert if a == "CERT" else str(tmp_path / "server.key") if a == "KEY" else a for a in args)]
    assert cl.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cluster: error:") and words in err[0], err
    assert not work.exists()  # nothing started, nothing written


def test_allowed_where_the_key_cannot_leak(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    cl.check_tls(None, None, "127.0.0.1:8000", insecure_http=False)
    cl.check_tls(cert, key, "0.0.0.0:8443", insecure_http=False)
    cl.check_tls(None, None, "0.0.0.0:8000", insecure_http=True)  # told: the user's network, the user's call


def test_tls_renders_an_https_listener(tmp_path: Path) -> None:
    cert, key = _pair(tmp_path)
    inst = cl.Instance(0, 0, 1, 2, 3, 4, 5, 6, str(tmp_path / "ts0"))
    plain = cl.Cluster(str(tmp_path), "127.0.0.1:8000", str(tmp_path), [inst])
    tls = cl.Cluster(str(tmp_path), "0.0.0.0:8443", str(tmp_path), [inst], tls_cert=cert, tls_key=key)
    assert plain.url == "http://127.0.0.1:8000" and tls.url == "https://0.0.0.0:8443"
    (tmp_path / "ts0").mkdir()
    (tmp_path / "ts0" / "key_file.json").write_text('{"inference": {"key": "k"}}')
    cl.render(plain)
    text = (tmp_path / "nginx.conf").read_text()
    assert "listen 127.0.0.1:8000;" in text and "ssl" not in text
    cl.render(tls)
    text = (tmp_path / "nginx.conf").read_text()
    assert "listen 0.0.0.0:8443 ssl;" in text
    assert f"ssl_certificate {cert};" in text and f"ssl_certificate_key {key};" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text and "${" not in text


def test_the_systemd_unit_starts_an_https_gateway() -> None:
    unit = (ROOT / "deploy" / "nginx" / "melanoma-cluster.service").read_text()
    lines = dict(ln.split("=", 1) for ln in unit.splitlines() if "=" in ln and not ln.startswith("#"))
    start, stop = shlex.split(lines["ExecStart"]), shlex.split(lines["ExecStop"])
    assert start[1].endswith("deploy/nginx/cluster.py") and stop[1] == start[1]
    args = cl.parse_args(start[2:])
    assert args.command == "start" and not cl.is_loopback(args.listen)
    assert args.tls_cert and args.tls_key and not args.insecure_http
    assert cl.parse_args(stop[2:]).command == "stop"
    assert lines["User"] == "melanoma" and lines["Type"] == "oneshot" and lines["RemainAfterExit"] == "yes"
