"""Every shipped allowed_urls refuses a model URL that names a host, checked as TorchServe 0.12 applies it: the
value read by java.util.Properties, split on ",", each part compiled with Pattern.CASE_INSENSITIVE and matched
with Matcher.matches() against the whole URL (ArchiveUtils.validateURL). Java fetches a file: URL with a host
over FTP, so such a match would let a management-key holder load (and run) an archive from another machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.harness import ROOT, missing_system_tool

CONFIGS = ["config.properties", "deploy/docker/config.properties", "deploy/sagemaker/config.properties",
           "deploy/kserve/container.properties", "deploy/kserve/config/config.properties"]

# For each URL: does a pattern match, and the host java.net.URL reads from it (what decides FTP or a local file).
CHECK = """
import java.io.FileReader;
import java.net.URL;
import java.util.Properties;
import java.util.regex.Pattern;

public class AllowedUrls {
    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        try (FileReader r = new FileReader(args[0])) { props.load(r); }
        String[] patterns = props.getProperty("allowed_urls", "file://.*|http(s)?://.*").split(",");
        for (int i = 1; i < args.length; i++) {
            boolean matched = false;
            for (String p : patterns) {
                if (Pattern.compile(p, Pattern.CASE_INSENSITIVE).matcher(args[i]).matches()) matched = true;
            }
            String host;
            try { host = new URL(args[i]).getHost(); } catch (Exception e) { host = "<malformed>"; }
            System.out.println((matched ? "match" : "refused") + "\\t" + host + "\\t" + args[i]);
        }
    }
}
"""

HOSTS = ["127.0.0.1", "localhost", "127.0.0.1:21", "[::1]", "user@127.0.0.1", "@127.0.0.1", "LOCALHOST", "x"]
DIRS = ["/srv/melanoma", "/srv/melanoma/../melanoma", ""]


def candidates(store: str) -> list[str]:
    """Model URLs an attacker might try, and a few a user would: every scheme spelling with and without a host."""
    urls = []
    for scheme in ("file", "FILE", "File", "fil"):
        for d in DIRS:
            path = f"{d}/{store}/evil.mar"
            urls += [f"{scheme}://{h}{path}" for h in HOSTS]
            urls += [f"{scheme}://{path}", f"{scheme}:{path}", f"{scheme}:/{path}", f"{scheme}:///{path}",
                     f"{scheme}://{path}?x", f"{scheme}://{path}#@127.0.0.1", f"{scheme}:{path}%00@127.0.0.1"]
    urls += [f"http://127.0.0.1/{store}/evil.mar", f"https://127.0.0.1/{store}/evil.mar",
             f"file:///srv/melanoma/{store}/melanoma-2.mar", f"file:///{store}/a.mar"]
    return sorted(set(urls))


@pytest.fixture(scope="module")
def java_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    javac, java = shutil.which("javac"), shutil.which("java")
    if not (javac and java):
        missing_system_tool("javac (a JDK) is needed to check allowed_urls as Java applies it: "
                            "sudo apt-get install -y openjdk-17-jdk-headless")
    folder = tmp_path_factory.mktemp("allowed-urls")
    (folder / "AllowedUrls.java").write_text(CHECK)
    subprocess.run([javac, "AllowedUrls.java"], cwd=folder, check=True, capture_output=True, timeout=120)
    return folder


def run_check(folder: Path, config: Path, urls: list[str]) -> list[tuple[str, str, str]]:
    out = subprocess.run(["java", "-cp", str(folder), "AllowedUrls", str(config), *urls], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return [tuple(line.split("\t", 2)) for line in out.splitlines()]  # type: ignore[misc]


@pytest.mark.parametrize("config", CONFIGS)
def test_no_shipped_pattern_admits_a_host(config: str, java_check: Path) -> None:
    store = "model-store" if "kserve/config" in config else "model_store"
    results = run_check(java_check, ROOT / config, candidates(store))
    admitted = [(url, host) for verdict, host, url in results if verdict == "match"]
    assert all(host == "" for _, host in admitted), f"{config} admits URLs naming a host: {admitted}"
    # what it is for: an archive by absolute local path still registers
    assert (f"file:///srv/melanoma/{store}/melanoma-2.mar", "") in admitted
    # and the checker can see the danger at all: TorchServe's own default admits every one of them
    default = java_check / "default.properties"
    default.write_text("# no allowed_urls: TorchServe's default\n")
    hosts = [h for v, h, _ in run_check(java_check, default, candidates(store)) if v == "match" and h]
    assert "127.0.0.1" in hosts and "localhost" in hosts
