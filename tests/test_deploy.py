"""The deployment files: cluster.yaml through Ray's own launcher code, the KubeRay and cron examples.

Pure tests: no cluster, no cloud account, no network (a fixture makes every socket connect fail).
`ray up` starts with `prepare_config` (merge the provider's defaults, fill per-type worker
counts) and then `validate_config` (the launcher's JSON schema plus cross-field checks); only
after those does it import the cloud provider and call AWS, which this file never does.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
from ray.autoscaler._private.resource_demand_scheduler import _default_utilization_scorer, get_nodes_for
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WRAPPER = DEPLOY / "cron" / "run-batch-infer.sh"
CATALOG_SECRET = "batch-infer-catalog"  # the Secret kuberay/rayjob.yaml hands to the head pod
# PyIceberg's environment configuration: PYICEBERG_CATALOG__<NAME>__<PROPERTY>
CATALOG_VARIABLE = re.compile(r"PYICEBERG_CATALOG__([A-Z0-9]+(?:_[A-Z0-9]+)*)__([A-Z0-9]+(?:_{1,2}[A-Z0-9]+)*)")

# SPEC "Config keys".
SPEC_KEYS = {
    "model", "input", "output", "features", "passthrough", "keep_features", "prediction_column",
    "activation", "output_activation", "batch_size", "replicas", "gpus_per_replica",
    "cpus_per_replica", "precision", "shard_rows", "max_replicas", "max_attempts", "shard_timeout",
    "shared_storage", "start_timeout", "invalid_rows", "overwrite", "address", "categorical",
    "prune", "input_format", "output_format", "catalog",
}  # fmt: skip
GPU_INSTANCE_FAMILIES = ("g4dn", "g5", "g6", "g6e", "gr6", "p3", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200")
RAY_PORTS = {6379, 8265, 10001}
# Kubernetes fields that name a Secret object (envFrom.secretRef, env.valueFrom.secretKeyRef, a volume's
# secret.secretName): references, not the secret's values (those are scanned like any other setting).
K8S_SECRET_REFERENCES = {"secretRef", "secretKeyRef", "secretName"}

# Names of settings that hold secrets, and secret values wherever they appear (comments included).
SECRET_NAME = re.compile(r"(?i)(secret|passw(or)?d|api_?key|access_?key|private_?key|(^|_)token$|credentials?$)")
SECRET_VALUES = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "literal Ray token": re.compile(r"\bRAY_AUTH_TOKEN=\S"),
    "literal AWS secret": re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*\S"),
    "literal password": re.compile(r"(?i)\bpassw(or)?d\s*[=:]\s*\S"),
}


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"test_deploy must not reach the network: connect{args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def ray_up_config(raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """What `ray up` builds before it talks to the cloud: prepare first, then validate."""
    config = prepare_config(copy.deepcopy(raw if raw is not None else load(ROOT / "cluster.yaml")))
    validate_config(config)
    return config


def ray_pin() -> str:
    pins = re.findall(r"(?m)^ray==(\S+)$", (ROOT / "constraints.txt").read_text())
    assert len(pins) == 1, "constraints.txt should pin ray exactly once"
    return pins[0]


def find_secrets(tree: Any, text: str = "") -> list[str]:
    """Where a config holds a secret: settings named like one with a literal value, or secret-shaped text."""
    found = [f"{label} in the text" for label, pattern in SECRET_VALUES.items() if pattern.search(text)]

    def is_reference(value: Any) -> bool:  # a path to a key file, not the key
        return value in (None, "") or (isinstance(value, str) and value.startswith(("~", "/", "./")))

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            # Kubernetes env entries: {name: AWS_SECRET_ACCESS_KEY, value: ...} must use valueFrom.
            name = node.get("name")
            if isinstance(name, str) and SECRET_NAME.search(name) and not is_reference(node.get("value")):
                found.append(f"{where}: env {name} has a literal value")
            for key, value in node.items():
                key_s = str(key)
                if (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_s) and SECRET_NAME.search(key_s)
                        and key_s not in K8S_SECRET_REFERENCES):
                    if not is_reference(value):
                        found.append(f"{where}.{key_s} holds a literal value")
                walk(value, f"{where}.{key_s}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, str):
            found.extend(f"{where}: {label}" for label, pattern in SECRET_VALUES.items() if pattern.search(node))

    walk(tree, "")
    return found


# --- cluster.yaml -----------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_up_prepare_and_validate() -> None:
    config = ray_up_config()

    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_gpu_worker_type_declares_its_gpus_and_the_head_has_none() -> None:
    config = ray_up_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}

    for name, spec in workers.items():
        family = spec["node_config"]["InstanceType"].split(".")[0]
        declared = spec["resources"].get("GPU", 0)
        if family in GPU_INSTANCE_FAMILIES:
            assert declared >= 1, f"{name} is a {family} GPU instance but declares GPU: {declared}"
        else:
            assert declared == 0, f"{name} declares GPU: {declared} on a {family} instance"
    assert any(spec["resources"].get("GPU", 0) >= 1 for spec in workers.values()), "no GPU worker type"
    # Replicas must not land on the head: no GPUs there, and CPU 0 keeps CPU replicas off it too.
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0


def test_worker_counts_are_consistent() -> None:
    config = ray_up_config()
    types = config["available_node_types"]

    assert types[config["head_node_type"]]["max_workers"] == 0  # filled in by prepare_config
    for name, spec in types.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"], name
    assert sum(spec["min_workers"] for spec in types.values()) <= config["max_workers"]


def gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: spec for name, spec in config["available_node_types"].items()
        if name != config["head_node_type"] and spec["resources"].get("GPU", 0) >= 1
    }  # fmt: skip


def test_gpu_workers_scale_from_zero_and_go_away_when_idle() -> None:
    config = ray_up_config()

    for name, spec in gpu_worker_types(config).items():
        assert spec["min_workers"] == 0, f"{name} keeps {spec['min_workers']} GPU node(s) up between runs"
        assert spec["max_workers"] >= 1, name
    assert 0 < config["idle_timeout_minutes"] <= 30, "idle GPU nodes must go away after the run"


def test_autoscaler_launches_gpu_workers_from_zero_for_replica_demand() -> None:
    """What the autoscaler does with a run's request for replica-shaped bundles on an idle cluster."""
    config = ray_up_config()
    head = config["head_node_type"]
    scorer = functools.partial(_default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary({}))
    gpu_cap = sum(spec["max_workers"] for spec in gpu_worker_types(config).values())
    replica = {"GPU": 1, "CPU": 1}  # gpus_per_replica: 1, cpus_per_replica: 1

    to_add, unmet = get_nodes_for(
        config["available_node_types"], {head: 1}, head, config["max_workers"], [replica] * (gpu_cap + 1), scorer
    )

    assert set(to_add) <= set(gpu_worker_types(config)), to_add
    assert sum(to_add.values()) == gpu_cap and unmet == [replica]


def test_validate_config_rejects_more_min_workers_than_max_workers() -> None:
    raw = load(ROOT / "cluster.yaml")
    raw["available_node_types"]["gpu_worker"]["min_workers"] = raw["max_workers"] + 1

    with pytest.raises(ValueError, match="max_workers"):
        ray_up_config(raw)


def test_every_node_installs_batch_infer_from_the_mounted_repo() -> None:
    config = ray_up_config()
    mounts = config["file_mounts"]

    for remote in ("pyproject.toml", "constraints.txt", "pipelines", "workers"):
        assert f"~/batch-infer/{remote}" in mounts, f"file_mounts lacks ~/batch-infer/{remote}"
    for remote, local in mounts.items():
        if remote.startswith("~/batch-infer/"):
            assert (ROOT / local).exists(), f"file_mounts source {local} is not in the repository"
    # prepare_config prepends setup_commands to both per-role lists; each role must end up installing.
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(
            "pip install" in cmd and "-c ~/batch-infer/constraints.txt ~/batch-infer" in cmd
            for cmd in config[role]
        ), f"{role} does not install batch-infer with the pinned constraints"
    # The autoscaler on the head launches workers through boto3.
    assert any("boto3" in cmd for cmd in config["head_setup_commands"])


def test_head_keeps_the_dashboard_private_and_every_node_uses_token_auth() -> None:
    config = ray_up_config()
    head_start = " ; ".join(config["head_start_ray_commands"])
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]

    # Ray's default head command binds the dashboard to 0.0.0.0; ours must replace it.
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token" in cmd, f"ray start without token auth: {cmd}"
    assert "~/.ray/auth_token" in config["file_mounts"], "the token file is not copied to the nodes"
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (public and ports & RAY_PORTS), f"security group opens Ray ports to the internet: {rule}"


def test_cluster_yaml_holds_no_secrets() -> None:
    path = ROOT / "cluster.yaml"

    assert find_secrets(load(path), path.read_text()) == []


def test_secret_scan_finds_planted_secrets() -> None:
    raw = load(ROOT / "cluster.yaml")
    raw["provider"]["aws_secret_access_key"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    raw["auth"]["ssh_private_key"] = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEA\n"
    raw["setup_commands"].append("echo export RAY_AUTH_TOKEN=abc123 >> ~/.bashrc")
    env = [{"name": "AWS_ACCESS_KEY_ID", "value": "AKIAIOSFODNN7EXAMPLE"},
           {"name": "PYICEBERG_CATALOG__DEFAULT__CREDENTIAL", "value": "client:s3cr3t"}]

    found = find_secrets({**raw, "env": env, "envFrom": [{"secretRef": {"name": "catalog"}}]})

    assert any("aws_secret_access_key" in f for f in found)
    assert any("ssh_private_key" in f for f in found)
    assert any("literal Ray token" in f for f in found)
    assert any("AWS_ACCESS_KEY_ID" in f for f in found)
    assert any("PYICEBERG_CATALOG__DEFAULT__CREDENTIAL" in f for f in found)
    assert not any("secretRef" in f for f in found)  # a reference to a Secret, not a secret
    assert find_secrets({}, "key: AKIAIOSFODNN7EXAMPLE") == ["AWS access key id in the text"]


# --- KubeRay ----------------------------------------------------------------------------------


def kuberay() -> tuple[dict[str, Any], dict[str, Any]]:
    return load(DEPLOY / "kuberay" / "rayjob.yaml"), load(DEPLOY / "kuberay" / "job-configmap.yaml")


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def test_rayjob_runs_batch_infer_on_the_mounted_configmap_and_shuts_down() -> None:
    job, configmap = kuberay()
    spec = job["spec"]
    head = spec["rayClusterSpec"]["headGroupSpec"]

    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    if argv[:2] == ["batch-infer", "run"]:
        config_path = argv[2]
    else:
        assert argv[:4] == ["python", "-m", "pipelines", "run"], f"unexpected entrypoint {argv}"
        config_path = argv[4]
    # The driver runs on the head pod: the job file must be there, from this ConfigMap.
    volumes = {v["name"]: v for v in head["template"]["spec"].get("volumes", [])}
    mounted = [
        m for c in containers(head) for m in c.get("volumeMounts", [])
        if config_path.startswith(m["mountPath"].rstrip("/") + "/")
    ]  # fmt: skip
    assert mounted, f"{config_path} is not under any volumeMount of the head container"
    source = volumes[mounted[0]["name"]]["configMap"]
    assert source["name"] == configmap["metadata"]["name"]
    assert Path(config_path).name in configmap["data"]


def test_rayjob_gpu_worker_group_requests_nvidia_gpus() -> None:
    job, _ = kuberay()
    cluster = job["spec"]["rayClusterSpec"]

    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in containers(g))
    ]  # fmt: skip
    assert gpu_groups, "no worker group has nvidia.com/gpu in its limits"
    for group in gpu_groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in containers(cluster["headGroupSpec"]))


def test_rayjob_gpu_worker_group_autoscales_from_zero() -> None:
    job, configmap = kuberay()
    cluster = job["spec"]["rayClusterSpec"]
    options = cluster["autoscalerOptions"]
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in containers(g))
    ]  # fmt: skip

    assert cluster["enableInTreeAutoscaling"] is True
    assert options.get("upscalingMode", "Default") in ("Default", "Aggressive", "Conservative")
    assert isinstance(options["idleTimeoutSeconds"], int) and 0 < options["idleTimeoutSeconds"] <= 1800
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0, f"{group['groupName']} keeps GPU pods up between runs"
        assert group["replicas"] == 0, f"{group['groupName']} starts GPU pods before the run asks for them"
        assert 1 <= group["maxReplicas"] <= 64
    # The job file's replicas fit the groups' GPUs at their maximum.
    job_file = yaml.safe_load(configmap["data"]["job.yaml"])
    gpus = sum(
        g["maxReplicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"]) for g in gpu_groups for c in containers(g)
    )  # fmt: skip
    wanted = max(job_file.get("replicas") or 0, job_file.get("max_replicas") or 0)
    assert wanted * job_file.get("gpus_per_replica", 1) <= gpus


def test_rayjob_is_private_authenticated_and_on_the_pinned_ray() -> None:
    job, configmap = kuberay()
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    images = {c["image"] for g in [head, *cluster["workerGroupSpecs"]] for c in containers(g)}
    dockerfile = (DEPLOY / "kuberay" / "Dockerfile").read_text()

    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head.get("enableIngress") is not True
    assert cluster["authOptions"]["mode"] == "token"
    assert len(images) == 1, f"head and workers must run one image (same Ray, same Python): {images}"
    assert cluster["rayVersion"] == ray_pin()
    assert re.search(rf"(?m)^FROM rayproject/ray:{re.escape(ray_pin())}-py3\d+-gpu\b", dockerfile)
    for path, tree in (("rayjob.yaml", job), ("job-configmap.yaml", configmap)):
        text = (DEPLOY / "kuberay" / path).read_text()
        assert find_secrets(tree, text) == [], path


def configmap_jobs() -> dict[str, dict[str, Any]]:
    _, configmap = kuberay()
    return {name: yaml.safe_load(text) for name, text in configmap["data"].items()}


def test_configmap_job_files_use_spec_config_keys() -> None:
    jobs = configmap_jobs()

    assert {"job.yaml", "iceberg.yaml"} <= set(jobs)
    for name, job in jobs.items():
        assert {"model", "input", "output"} <= set(job), name
        assert set(job) <= SPEC_KEYS, f"{name}: not SPEC config keys: {sorted(set(job) - SPEC_KEYS)}"
        assert find_secrets(job) == [], name


@pytest.mark.parametrize("name", ["job.yaml", "iceberg.yaml"])
def test_configmap_job_file_builds_a_job_config(name: str) -> None:
    from pipelines import JobConfig

    cfg = JobConfig.from_dict(configmap_jobs()[name], source=f"job-configmap.yaml: {name}")

    assert cfg.replicas == 2 and cfg.gpus_per_replica == 1


def test_dockerfile_copies_every_package_it_installs() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = set(re.findall(r"(?m)^COPY --chown=\S+ (\w+) \./\1$", (DEPLOY / "kuberay" / "Dockerfile").read_text()))

    assert {package.split(".")[0] for package in packages} <= copied  # pip install . needs each one


def test_cluster_yaml_mounts_every_package_it_installs() -> None:
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    mounts = yaml.safe_load((ROOT / "cluster.yaml").read_text())["file_mounts"]

    # setup_commands pip-install ~/batch-infer: a package left unmounted breaks `ray up` on every node
    assert {f"~/batch-infer/{package.split('.')[0]}" for package in packages} <= set(mounts)


def catalog_variables() -> dict[str, str]:
    """The KEY=value lines of kuberay/catalog.env.example, what the catalog Secret is created from."""
    lines = (DEPLOY / "kuberay" / "catalog.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_rayjob_takes_the_iceberg_catalog_from_a_secret_not_the_yaml() -> None:
    job, configmap = kuberay()
    cluster = job["spec"]["rayClusterSpec"]
    head = containers(cluster["headGroupSpec"])
    refs = [source["secretRef"] for c in head for source in c.get("envFrom", []) if "secretRef" in source]
    variables = catalog_variables()

    # The driver runs on the head: the Secret's variables are its environment; the Parquet job runs without it.
    assert [ref["name"] for ref in refs] == [CATALOG_SECRET] and refs[0]["optional"] is True
    assert f"kubectl create secret generic {CATALOG_SECRET} --from-env-file=" in (
        DEPLOY / "kuberay" / "catalog.env.example").read_text()
    # The job names the table only: no catalog properties in the ConfigMap, so PyIceberg's own
    # configuration (the environment) supplies catalog "default".
    iceberg = configmap_jobs()["iceberg.yaml"]
    assert iceberg["input_format"] == "iceberg" and "catalog" not in iceberg
    assert variables and all(CATALOG_VARIABLE.fullmatch(key) for key in variables), sorted(variables)
    assert {CATALOG_VARIABLE.fullmatch(key).group(1) for key in variables} == {"DEFAULT"}  # type: ignore[union-attr]
    assert {"PYICEBERG_CATALOG__DEFAULT__TYPE", "PYICEBERG_CATALOG__DEFAULT__URI"} <= set(variables)
    # The example holds no secret: secret-named variables are left empty, to be filled in a copy.
    assert all(value == "" for key, value in variables.items() if SECRET_NAME.search(key.rsplit("__", 1)[1]))
    for c in head + [c for g in cluster["workerGroupSpecs"] for c in containers(g)]:
        assert not [e for e in c.get("env", []) if e["name"].startswith("PYICEBERG_")], "catalog config in YAML"


def test_iceberg_job_loads_its_catalog_from_the_secrets_variables(tmp_path: Path) -> None:
    """The Secret's variable names, given a real SQLite catalog's values, configure the catalog that
    `batch-infer run iceberg.yaml` (no `catalog` key) reads its input table from: PyIceberg 0.12's
    PYICEBERG_CATALOG__DEFAULT__* environment, read by `load_catalog("default")`."""
    import numpy as np
    from conftest import cli, feature_table, save_mlp
    from pyiceberg.catalog import load_catalog

    job = configmap_jobs()["iceberg.yaml"]
    values = {"TYPE": "sql", "URI": f"sqlite:///{tmp_path}/catalog.db", "WAREHOUSE": f"file://{tmp_path}/wh"}
    secret = {key: values[key.rsplit("__", 1)[1]] for key in catalog_variables() if key.rsplit("__", 1)[1] in values}
    assert len(secret) == 3, sorted(catalog_variables())
    catalog = load_catalog("default", **{key.rsplit("__", 1)[1].lower(): v for key, v in secret.items()})
    namespace = job["input"].split(".")[0]
    catalog.create_namespace(namespace)
    table = catalog.create_table(job["input"], schema=feature_table(np.arange(1), 4, 0).schema)
    table.append(feature_table(np.arange(300), 4, 1))
    save_mlp(tmp_path / "m.pt", [4, 1])
    (tmp_path / "iceberg.yaml").write_text(yaml.safe_dump(job))
    isolated = {"PYICEBERG_HOME": str(tmp_path), "HOME": str(tmp_path)}  # no ~/.pyiceberg.yaml

    def local(output: str) -> list[str]:  # no GPU and no cluster here; the output is a Parquet directory
        settings = {"model": tmp_path / "m.pt", "output": tmp_path / output, "output_format": "parquet",
                    "gpus_per_replica": 0, "precision": "fp32", "replicas": "auto", "cpus_per_replica": "auto"}
        return [word for key, value in settings.items() for word in ("--set", f"{key}={value}")]

    result = cli("run", str(tmp_path / "iceberg.yaml"), *local("out"), "--json", env={**isolated, **secret})

    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["rows_out"] == 300
    manifest = yaml.safe_load((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["source"]["table"] == job["input"] and manifest["config"]["catalog"] is None
    assert manifest["source"]["snapshot_id"] == catalog.load_table(job["input"]).current_snapshot().snapshot_id
    # Without the Secret's variables there is no catalog: exit 2 before any work, naming it.
    missing = cli("run", str(tmp_path / "iceberg.yaml"), *local("o2"), env=isolated)
    assert missing.returncode == 2 and "Iceberg catalog 'default'" in missing.stderr
    assert not (tmp_path / "o2").exists()


# --- cron ---------------------------------------------------------------------------------------


def test_cron_wrapper_is_strict_valid_bash() -> None:
    text = WRAPPER.read_text()

    assert os.access(WRAPPER, os.X_OK), "run-batch-infer.sh is not executable"
    assert re.search(r"(?m)^set -euo pipefail$", text)
    subprocess.run(["bash", "-n", str(WRAPPER)], check=True)


def cron_lines(path: Path) -> list[str]:
    """The job lines of a cron.d file (no comments, blank lines or VAR=value settings)."""
    return [
        line for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not re.match(r"^[A-Z_]+=", line)
    ]  # fmt: skip


def cron_command(line: str) -> tuple[dict[str, str], list[str]]:
    """A cron.d line's command: the variables it sets before the wrapper, and the wrapper's argv."""
    minute, hour, day, month, weekday, user, command = line.split(None, 6)
    assert minute.isdigit() and 0 <= int(minute) <= 59, line
    assert (hour, day, month, weekday) == ("*", "*", "*", "*"), f"not hourly: {line}"
    assert re.fullmatch(r"[a-z_][a-z0-9_-]*", user), "cron.d lines name the user in field six"
    assert "%" not in command, "cron turns % into a newline"
    words = shlex.split(command.split(">>")[0])
    settings = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        key, _, value = words.pop(0).partition("=")
        settings[key] = value
    return settings, words


def test_crontab_runs_the_wrapper_hourly() -> None:
    lines = cron_lines(DEPLOY / "cron" / "batch-infer.cron")

    assert len(lines) == 1, lines
    settings, argv = cron_command(lines[0])
    assert settings == {} and Path(argv[0]).name == WRAPPER.name


def test_table_crontab_runs_each_table_job_hourly_through_the_same_wrapper() -> None:
    lines = cron_lines(DEPLOY / "cron" / "batch-infer-tables.cron")
    jobs = {}
    for line in lines:
        settings, argv = cron_command(line)
        assert Path(argv[0]).name == WRAPPER.name and len(argv) == 1, line
        assert set(settings) == {"BATCH_INFER_CONFIG"}, line
        config = Path(settings["BATCH_INFER_CONFIG"])
        assert config.parent == Path("/etc/batch-infer") and (DEPLOY / "cron" / config.name).exists(), line
        jobs[config.name] = load(DEPLOY / "cron" / config.name)

    assert sorted(jobs) == ["delta-to-delta.yaml", "iceberg-to-iceberg.yaml"]
    assert len({line.split()[0] for line in lines}) == len(lines), "stagger the minutes"
    assert len({line.split(">>")[1].split()[0] for line in lines}) == len(lines), "one log per job"
    iceberg, delta = jobs["iceberg-to-iceberg.yaml"], jobs["delta-to-delta.yaml"]
    assert (iceberg["input_format"], iceberg["output_format"]) == ("iceberg", "iceberg")
    assert re.fullmatch(r"\w+\.\w+", iceberg["input"]) and re.fullmatch(r"\w+\.\w+", iceberg["output"])
    assert iceberg["catalog"]["type"] == "sql" and iceberg["catalog"]["uri"].startswith("sqlite:///")
    assert delta["output_format"] == "delta" and delta.get("input_format", "auto") in ("auto", "delta")


@pytest.mark.parametrize("path", ["cron/iceberg-to-iceberg.yaml", "cron/delta-to-delta.yaml"])
def test_cron_table_job_files_build_a_job_config(path: str) -> None:
    from pipelines import JobConfig

    raw = load(DEPLOY / path)

    assert set(raw) <= SPEC_KEYS, f"not SPEC config keys: {sorted(set(raw) - SPEC_KEYS)}"
    assert find_secrets(raw, (DEPLOY / path).read_text()) == []
    cfg = JobConfig.from_dict(raw, source=path)
    assert cfg.output_format == raw["output_format"] and not cfg.overwrite and not cfg.prune


def test_cron_line_hands_its_job_file_to_the_wrapper(fake_install: dict[str, str]) -> None:
    for line in cron_lines(DEPLOY / "cron" / "batch-infer-tables.cron"):
        settings, _ = cron_command(line)
        env = {**fake_install, **settings}

        result = subprocess.run(["bash", str(WRAPPER)], env=env, capture_output=True, text=True, timeout=30)

        assert result.returncode == 0, result.stdout + result.stderr
        assert (Path(env["FAKE_OUT"]) / "args").read_text().split() == ["run", settings["BATCH_INFER_CONFIG"]]
        assert settings["BATCH_INFER_CONFIG"] in result.stdout  # the log names the job


@pytest.fixture
def fake_install(tmp_path: Path) -> dict[str, str]:
    """A venv whose `batch-infer` records its arguments and RAY_ADDRESS and exits with $FAKE_RC."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"; export PATH\n')
    fake = bin_dir / "batch-infer"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'printf "%s\\n" "$@" > "$FAKE_OUT/args"\n'
        'printf "%s" "${RAY_ADDRESS-<unset>}" > "$FAKE_OUT/ray_address"\n'
        'env > "$FAKE_OUT/environment"\n'
        'exit "$FAKE_RC"\n'
    )
    fake.chmod(0o755)
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BATCH_INFER_VENV": str(tmp_path / "venv"),
        "BATCH_INFER_CONFIG": str(tmp_path / "job.yaml"),
        "BATCH_INFER_ENV_FILE": str(tmp_path / "env"),  # absent unless a test writes it
        "FAKE_OUT": str(tmp_path),
        "FAKE_RC": "0",
    }


@pytest.mark.parametrize(
    ("batch_infer_rc", "wrapper_rc"),
    [(0, 0), (1, 1), (2, 2), (3, 0), (130, 130)],
    ids=["ok", "shards-failed", "config-error", "lock-held", "interrupted"],
)
def test_cron_wrapper_maps_exit_codes(fake_install: dict[str, str], batch_infer_rc: int, wrapper_rc: int) -> None:
    env = {**fake_install, "FAKE_RC": str(batch_infer_rc)}

    result = subprocess.run(["bash", str(WRAPPER)], env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == wrapper_rc, result.stdout + result.stderr
    out = Path(env["FAKE_OUT"])
    assert (out / "args").read_text().split() == ["run", env["BATCH_INFER_CONFIG"]]
    assert (out / "ray_address").read_text() == "<unset>"
    if batch_infer_rc == 3:
        assert "another run holds the output's lock" in result.stdout


@pytest.mark.parametrize("where", ["environment", "env-file"])
def test_cron_wrapper_passes_ray_address(fake_install: dict[str, str], where: str) -> None:
    env = dict(fake_install)
    if where == "environment":
        env["RAY_ADDRESS"] = "10.0.0.5:6379"
    else:
        Path(env["BATCH_INFER_ENV_FILE"]).write_text("RAY_ADDRESS=10.0.0.5:6379\n")

    result = subprocess.run(["bash", str(WRAPPER)], env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (Path(env["FAKE_OUT"]) / "ray_address").read_text() == "10.0.0.5:6379"


def test_cron_wrapper_exports_the_env_files_catalog_variables(fake_install: dict[str, str]) -> None:
    """An Iceberg job's catalog (REST, Glue: with secrets) can come from the env file, not the job file."""
    settings = "PYICEBERG_CATALOG__DEFAULT__URI=https://catalog.example.com/api\n"
    Path(fake_install["BATCH_INFER_ENV_FILE"]).write_text(settings + "PYICEBERG_CATALOG__DEFAULT__CREDENTIAL=id:s\n")

    result = subprocess.run(["bash", str(WRAPPER)], env=fake_install, capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stdout + result.stderr
    seen = (Path(fake_install["FAKE_OUT"]) / "environment").read_text().splitlines()
    assert "PYICEBERG_CATALOG__DEFAULT__URI=https://catalog.example.com/api" in seen
    assert "PYICEBERG_CATALOG__DEFAULT__CREDENTIAL=id:s" in seen
    assert "id:s" not in result.stdout + result.stderr  # the wrapper's log does not print it


def test_cron_wrapper_without_its_virtualenv_is_a_config_error(fake_install: dict[str, str]) -> None:
    env = {**fake_install, "BATCH_INFER_VENV": fake_install["HOME"] + "/no-such-venv"}

    result = subprocess.run(["bash", str(WRAPPER)], env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 2, result.stdout + result.stderr
    assert not (Path(env["FAKE_OUT"]) / "args").exists()
