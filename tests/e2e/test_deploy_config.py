"""The deployment files under server/deploy are valid and agree with the
daemon: the Kubernetes manifests pass a schema validator (strict), Envoy
and nginx accept their configs, every daemon flag the manifests use exists,
and the pod's termination budget covers the daemon's drain."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from envoy_proxy import ENVOY_YAML, find_envoy
from grpcurl_client import REPO_ROOT
from nginx_proxy import NGINX_CONF, find_nginx

K8S = REPO_ROOT / "server" / "deploy" / "k8s" / "forkd.yaml"


def manifests() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S.read_text()) if d]
    return {d["kind"]: d for d in docs}


def forkd_container() -> dict[str, Any]:
    (c,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def flag_values(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args[1:]:
        name, _, value = a.partition("=")
        out[name] = value
    return out


def test_kubernetes_manifests_pass_strict_schema_validation() -> None:
    validator = Path(sys.executable).parent / "kubernetes-validate"
    res = subprocess.run(
        [str(validator), "--strict", "--kubernetes-version", "1.37.0", str(K8S)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for kind in ("deployment/forkd", "service/forkd", "poddisruptionbudget/forkd", "serviceaccount/forkd"):
        assert f"passed for resource {kind}" in res.stdout + res.stderr


def test_manifest_flags_exist_and_match_the_drain(forkd_bin: Path) -> None:
    c = forkd_container()
    assert c["args"][0] == "serve"
    flags = flag_values(c["args"])
    help_text = subprocess.run(
        [str(forkd_bin), "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in flags:
        assert name in help_text, f"{name} is not a `forkd serve` flag"

    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    budget = pre_stop + int(flags["--drain-grace"]) + int(flags["--shutdown-timeout"])
    # Room beyond the drain for stopping every VMM and exiting.
    assert pod["terminationGracePeriodSeconds"] >= budget + 5, (pod["terminationGracePeriodSeconds"], budget)

    # Probes use grpc.health.v1 on the gRPC port, which needs no token.
    port = int(flags["--listen"].rsplit(":", 1)[1])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == port
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port

    # The token comes from the Secret, mounted read-only at the flag's path.
    token_dir = str(Path(flags["--token-file"]).parent)
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["token"]["mountPath"] == token_dir and mounts["token"]["readOnly"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "forkd-token"

    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_service_ports_are_detected_as_grpc_by_meshes() -> None:
    svc = manifests()["Service"]
    (grpc_port,) = [p for p in svc["spec"]["ports"] if p["targetPort"] == "grpc"]
    assert grpc_port["name"].startswith("grpc")  # Istio's name-prefix detection
    assert grpc_port["appProtocol"] == "grpc"  # Linkerd, Istio, Gateway API
    pdb = manifests()["PodDisruptionBudget"]
    assert pdb["spec"]["selector"] == manifests()["Deployment"]["spec"]["selector"]


def test_envoy_accepts_its_config() -> None:
    res = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(ENVOY_YAML), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "OK" in res.stdout + res.stderr, res.stdout + res.stderr


def test_nginx_accepts_its_config(tmp_path: Path) -> None:
    try:
        binary = find_nginx()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    (tmp_path / "tmp").mkdir()
    res = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-c", str(NGINX_CONF)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
