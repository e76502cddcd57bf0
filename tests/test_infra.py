"""Cluster and services config: ray_cluster.yaml through Ray's own validation, the network rules, the KubeRay
and MLflow manifests (every container locked down, MLflow credentials from Secrets, exact allowed hosts), the
MLflow start command's checks, the AWS bootstrap script's IAM policies, and the Dockerfile (non-root USER).

Nothing here talks to AWS or Kubernetes: the cluster config is validated with the network blocked, and the
AWS bootstrap script runs against a stand-in `aws` that records its calls.
"""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import shlex
import socket
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
BOOTSTRAP = ROOT / "infra" / "aws" / "bootstrap.sh"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
KUBERAY = ROOT / "infra" / "kuberay"
MLFLOW_DIR = ROOT / "infra" / "mlflow"
IMAGE = "ghcr.io/deepfill-ray/deepfill-ray:0.1.0"
WORLD = ("0.0.0.0/0", "::/0")


def load_cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def script_var(path: Path, name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", path.read_text(), re.MULTILINE)
    assert match, f"{name}= not found in {path}"
    return match.group(1)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def walk(node, path=""):
    """Yield (key path, value) for every leaf of a YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, node


# --- ray_cluster.yaml -------------------------------------------------------------------------------------


def test_cluster_config_passes_ray_validation(no_network):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster_config()
    config = prepare_config(copy.deepcopy(raw))  # what `ray up` does first: defaults, docker, min/max workers
    validate_config(config)  # Ray's JSON schema + its cross-field checks

    assert config["provider"]["type"] == "aws"
    head = config["head_node_type"]
    types = config["available_node_types"]
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker type"
    for name in gpu_types:
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] >= 1
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.", "p4d.", "p5."))
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    assert config["docker"]["image"] == IMAGE
    assert config["setup_commands"], "setup commands check the image on every node"
    # Token auth on every node, and the token file shipped to them.
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(gpu_count=4), "Additional properties"),
        (lambda c: c.update(head_node_type="no.such.type"), "head_node_type"),
        (lambda c: c["available_node_types"]["worker.gpu.a10g"].pop("resources"), "resources"),
        (lambda c: c["docker"].update(imagee="x"), "Additional properties"),
    ],
)
def test_cluster_config_validation_rejects_broken_variants(no_network, mutate, message):
    """The validation above is not vacuous: small breakages of the same file are caught."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster_config()
    mutate(raw)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)) as err:
        validate_config(prepare_config(raw))
    assert message in str(err.value)


def test_cluster_config_opens_nothing_to_the_world():
    raw = load_cluster_config()
    for path, value in walk(raw):
        assert not any(w in str(value) for w in WORLD), f"{path} opens to the world: {value!r}"
    # The security group and instance profile are the ones infra/aws/bootstrap.sh creates.
    assert raw["provider"]["security_group"]["GroupName"] == script_var(BOOTSTRAP, "GROUP_NAME")
    assert "IpPermissions" not in raw["provider"]["security_group"]
    head_profile, worker_profile = script_var(BOOTSTRAP, "HEAD_PROFILE"), script_var(BOOTSTRAP, "WORKER_PROFILE")
    for name, t in raw["available_node_types"].items():
        wanted = head_profile if name == raw["head_node_type"] else worker_profile
        assert t["node_config"]["IamInstanceProfile"] == {"Name": wanted}, name
        assert "SecurityGroupIds" not in t["node_config"], name
    assert raw["provider"]["region"] == re.search(r'REGION="\$\{AWS_REGION:-(\S+)\}"', BOOTSTRAP.read_text()).group(1)
    # The dashboard listens on the head's loopback only; reach it through `ray dashboard` (SSH tunnel).
    assert "--dashboard-host=127.0.0.1" in " ".join(raw["head_start_ray_commands"])


class _FakeSecurityGroup:
    def __init__(self, group_id, ip_permissions):
        self.id = group_id
        self.ip_permissions = ip_permissions
        self.authorized = []

    def authorize_ingress(self, IpPermissions):  # noqa: N803 (boto3's spelling)
        self.authorized.extend(IpPermissions)


def test_launcher_adds_no_rules_to_the_prepared_group():
    """Ray's own rule-upsert code, on our config: a pre-populated group is left alone, while a fresh group
    would have received SSH from 0.0.0.0/0 — which is why bootstrap.sh creates the group first."""
    from ray.autoscaler._private.aws import config as aws_config

    raw = load_cluster_config()
    prepared = _FakeSecurityGroup("sg-prepared", [{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}])
    aws_config._upsert_security_group_rules(raw, {t: prepared for t in raw["available_node_types"]})
    assert prepared.authorized == []

    fresh = _FakeSecurityGroup("sg-fresh", [])
    aws_config._upsert_security_group_rules(raw, {t: fresh for t in raw["available_node_types"]})
    cidrs = [r["CidrIp"] for rule in fresh.authorized for r in rule.get("IpRanges", [])]
    assert "0.0.0.0/0" in cidrs


FAKE_AWS = """#!/usr/bin/env python3
# A stand-in for the AWS CLI: records each call (one JSON list per line) and answers the few queries
# bootstrap.sh makes as for a fresh account (no group, no roles yet).
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_AWS_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_AWS_FAIL"):
    sys.exit(1)
if args[:2] == ["ec2", "describe-vpcs"]:
    print("vpc-0123")
elif args[:2] == ["ec2", "describe-security-groups"]:
    print("None")
elif args[:2] == ["ec2", "create-security-group"]:
    print("sg-0123")
elif args[:2] == ["iam", "get-role"]:
    if "--query" not in args:
        sys.exit(1)  # no such role yet
    print("arn:aws:iam::123456789012:role/" + args[args.index("--role-name") + 1])
elif args[:2] == ["iam", "get-instance-profile"]:
    sys.exit(1)
"""
BUCKETS = ("deepfill-ray-data", "deepfill-ray-mlflow")


def run_bootstrap(tmp_path, *args, buckets=" ".join(BUCKETS), fail=False):
    """bootstrap.sh with the fake `aws` first on PATH; returns (process, the recorded aws calls)."""
    fake_aws = tmp_path / "aws"
    fake_aws.write_text(FAKE_AWS)
    fake_aws.chmod(0o755)
    log = tmp_path / "aws-calls.jsonl"
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin", "FAKE_AWS_LOG": str(log), "DEEPFILL_S3_BUCKETS": buckets}
    if fail:
        env["FAKE_AWS_FAIL"] = "1"
    proc = subprocess.run(["bash", str(BOOTSTRAP), *args], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "10.1.2.3", "203.0.113.0/24", "8.0.0.0/8", "10.0.0.0/7",
                                  "172.32.0.0/16", "300.1.2.3/32", "2001:db8::/64", "1.2.3.4/33"])
def test_bootstrap_script_refuses_world_public_and_malformed_cidrs(tmp_path, cidr):
    """Refused before any AWS call (the fake `aws` records whether it ran)."""
    proc, calls = run_bootstrap(tmp_path, cidr)
    assert proc.returncode == 2, proc.stderr
    assert cidr in proc.stderr
    assert calls == []


@pytest.mark.parametrize("cidr", ["203.0.113.7/32", "10.20.0.0/16", "172.16.0.0/12", "192.168.4.0/24", "2001:db8::7/128"])
def test_bootstrap_script_accepts_one_address_or_a_private_range(tmp_path, cidr):
    proc, calls = run_bootstrap(tmp_path, cidr, fail=True)  # every aws call fails: stops at the first
    assert proc.returncode != 2 and calls, proc.stderr


@pytest.mark.parametrize("buckets", ["", "s3://deepfill-ray-data", "deepfill-*", "deepfill-ray-data,*", "Bad_Name"])
def test_bootstrap_script_refuses_missing_or_bad_buckets(tmp_path, buckets):
    proc, calls = run_bootstrap(tmp_path, "203.0.113.7/32", buckets=buckets)
    assert proc.returncode == 2 and calls == [], proc.stderr
    assert "bucket" in proc.stderr.lower(), proc.stderr


def _policy(calls, role):
    (call,) = [c for c in calls if c[:2] == ["iam", "put-role-policy"] and c[c.index("--role-name") + 1] == role]
    return json.loads(call[call.index("--policy-document") + 1])


def test_bootstrap_script_policies_are_scoped_to_the_buckets_and_the_cluster(tmp_path):
    """The whole script against the fake `aws`: the IAM policies it writes, parsed as JSON."""
    proc, calls = run_bootstrap(tmp_path, "203.0.113.7/32")
    assert proc.returncode == 0, proc.stderr
    head_role, worker_role = script_var(BOOTSTRAP, "HEAD_PROFILE"), script_var(BOOTSTRAP, "WORKER_PROFILE")
    assert not any(c[:2] == ["iam", "attach-role-policy"] for c in calls), "no managed (full-access) policies"
    bucket_arns = {f"arn:aws:s3:::{b}" for b in BUCKETS}
    object_arns = {f"{a}/*" for a in bucket_arns}
    worker_arn = f"arn:aws:iam::123456789012:role/{worker_role}"

    def statements(role):
        for st in _policy(calls, role)["Statement"]:
            assert st["Effect"] == "Allow"
            actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
            resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
            assert not any(a.endswith(":*") or a == "*" for a in actions), (role, actions)
            yield actions, set(resources), st

    for role in (head_role, worker_role):
        for actions, resources, _ in statements(role):
            if any(a.startswith("s3:") for a in actions):
                assert all(a.startswith("s3:") for a in actions)
                assert resources in (bucket_arns, object_arns), (role, resources)
    worker_actions = {a for actions, _, _ in statements(worker_role) for a in actions}
    assert worker_actions and all(a.startswith("s3:") for a in worker_actions), "workers get S3 only"
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= worker_actions

    head = list(statements(head_role))
    for actions, resources, st in head:
        if any(a in ("ec2:TerminateInstances", "ec2:CreateTags") for a in actions) and "Condition" in st:
            cond = st["Condition"]["StringEquals"]
            assert cond.get("ec2:ResourceTag/ray-cluster-name") == "deepfill-ray" or cond.get("ec2:CreateAction") == "RunInstances"
        if "iam:PassRole" in actions:
            assert resources == {worker_arn}
        if "*" in resources:
            assert all(a.startswith("ec2:Describe") for a in actions), actions
    head_actions = {a for actions, _, _ in head for a in actions}
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= head_actions
    (run_instance,) = [st for actions, res, st in head if "ec2:RunInstances" in actions and any("instance/" in r for r in res)]
    assert run_instance["Condition"]["StringEquals"] == {"aws:RequestTag/ray-cluster-name": "deepfill-ray"}
    # The security group: SSH from the one address only.
    (ingress,) = [c for c in calls if c[:2] == ["ec2", "authorize-security-group-ingress"]]
    assert any("CidrIp=203.0.113.7/32" in a for a in ingress) and not any("0.0.0.0/0" in a for a in ingress)


def test_bootstrap_script_rules_are_intra_group_and_admin_ssh_only():
    text = BOOTSTRAP.read_text()
    subprocess.run(["bash", "-n", str(BOOTSTRAP)], check=True)
    rules = re.findall(r'"(IpProtocol=[^"]+)"', text)
    assert rules == [
        "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$SG_ID,Description=intra-cluster}]",
        "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$CIDR,Description=admin-ssh}]",
    ]


# --- KubeRay ----------------------------------------------------------------------------------------------


def load_manifests(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    return docs


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", where
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] == IMAGE, where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == IMAGE, where
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, where
        assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"], where


RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}


def dockerfile_user() -> str:
    users = re.findall(r"^USER\s+(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert users, "the Dockerfile sets no USER: the container would run as root"
    return users[-1]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """Every pod spec in a manifest: (where, spec)."""
    spec = doc["spec"]
    if doc["kind"] == "Deployment":
        return [("deployment", spec["template"]["spec"])]
    found = []
    if doc["kind"] == "RayJob":
        found.append(("submitter", spec["submitterPodTemplate"]["spec"]))
        spec = spec["rayClusterSpec"]
    if doc["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    found.append(("head", spec["headGroupSpec"]["template"]["spec"]))
    found += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return found


def check_locked_down(doc: dict, where: str) -> None:
    """Every container (and the autoscaler sidecar) runs as the image's non-root UID, no escalation, no caps."""
    uid = int(dockerfile_user().split(":")[0])
    contexts = [(f"{where}:{p}/{c['name']}", c.get("securityContext", {}))
                for p, spec in pod_specs(doc) for c in spec.get("containers", []) + spec.get("initContainers", [])]
    if doc["kind"] != "Deployment":
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"].get("rayClusterConfig", doc["spec"]))
        if cluster.get("enableInTreeAutoscaling"):
            contexts.append((f"{where}:autoscaler", cluster.get("autoscalerOptions", {}).get("securityContext", {})))
    assert contexts, where
    for name, ctx in contexts:
        assert RESTRICTED.items() <= ctx.items(), (name, ctx)
        assert ctx.get("runAsUser") == uid and ctx.get("runAsGroup") == uid and not ctx.get("privileged"), name


def check_mlflow_credentials(doc: dict, where: str) -> None:
    """The Ray containers sign in to MLflow with a Secret's user, never a literal (nor in runtimeEnvYAML)."""
    assert "MLFLOW_TRACKING_PASSWORD" not in doc["spec"].get("runtimeEnvYAML", ""), where
    for p, spec in pod_specs(doc):
        if p == "submitter":
            continue
        (container,) = spec["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert "value" not in env[var], (where, p, var)
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-jobs", "key": key}, (where, p, var)


def test_kuberay_raycluster_manifest():
    (doc,) = load_manifests(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], "raycluster.yaml")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    check_locked_down(doc, "raycluster.yaml")
    check_mlflow_credentials(doc, "raycluster.yaml")


def test_kuberay_rayservice_manifest():
    """The RayService: the same cluster conventions, and a serve config Serve's own schema accepts whose
    application args are valid `deepfill serve` options."""
    from ray.serve.schema import ServeDeploySchema

    from jobs.options import from_dict
    from jobs.serve import ServeOptions

    (doc,) = load_manifests(KUBERAY / "rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    check_ray_cluster_spec(doc["spec"]["rayClusterConfig"], "rayservice.yaml")
    check_locked_down(doc, "rayservice.yaml")
    check_mlflow_credentials(doc, "rayservice.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.import_path == "jobs.serve:app_builder"
    opts = from_dict(ServeOptions, dict(app.args))
    assert opts.model.startswith("models:/") and opts.use_gpu


@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-infer.yaml", "infer")])
def test_kuberay_rayjob_manifests(name, command):
    from jobs import cli

    (doc,) = load_manifests(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], name)
    check_locked_down(doc, name)
    check_mlflow_credentials(doc, name)
    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never" and submitter["containers"][0]["image"] == IMAGE
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"

    # The entrypoint is a real `deepfill` command: its subcommand and every flag parse.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["deepfill", command]
    image_configs = "/opt/deepfill-ray/configs/"  # baked into the image (infra/docker/Dockerfile)
    args, _, opts = cli.parse([a.replace(image_configs, f"{ROOT}/configs/") for a in argv[1:]])
    assert args.command == command
    places2 = yaml.safe_load((ROOT / "configs" / "places2.yaml").read_text())
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    if command == "train":
        # Configs are baked into the image at /opt/deepfill-ray/configs (infra/docker/Dockerfile).
        assert f"{image_configs}places2.yaml" in argv and args.config == str(ROOT / "configs" / "places2.yaml")
        # The cluster has exactly the GPUs the config's Ray Train workers ask for.
        assert gpus == places2["scaling"]["num_workers"] * places2["scaling"].get("gpus_per_worker", 1)
    else:
        # It reads the model the training job registers, by alias, and uses every GPU.
        tracking = places2["tracking"]
        assert opts.model == f"models:/{tracking['registered_model']}@{tracking['alias']}"
        assert opts.use_gpu and opts.num_actors == gpus


# --- MLflow -----------------------------------------------------------------------------------------------


def mlflow_server_flags() -> set[str]:
    from mlflow.cli import server

    return {opt for p in server.params for opt in p.opts if opt.startswith("--")}


def test_mlflow_manifest():
    docs = load_manifests(MLFLOW_DIR / "mlflow.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "Deployment", "Service"}
    deployment, service = kinds["Deployment"], kinds["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    assert service["spec"]["type"] == "ClusterIP" and service["metadata"]["name"] == "mlflow"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["command"] == ["mlflow", "server"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"])
    assert set(args) <= mlflow_server_flags()
    assert args["--backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert args["--artifacts-destination"].startswith("s3://")
    hosts = args["--allowed-hosts"].split(",")
    assert "mlflow:5000" in hosts
    check_exact_hosts(hosts)
    assert args["--app-name"] == "basic-auth", "authentication on"
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert "valueFrom" in env["PGPASSWORD"], "the database password comes from a Secret"
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin", var
    check_locked_down(deployment, "mlflow.yaml")
    # The auth config: mounted from the ConfigMap, the same settings as infra/mlflow/basic_auth.ini.
    config_map = kinds["ConfigMap"]
    (mount,) = container["volumeMounts"]
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"] and mount["name"] == volume["name"]
    (filename,) = config_map["data"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == f"{mount['mountPath']}/{filename}"
    assert auth_settings(config_map["data"][filename]) == auth_settings((MLFLOW_DIR / "basic_auth.ini").read_text())


def auth_settings(text: str) -> dict:
    """The [mlflow] section of a basic-auth config, checked for what least privilege needs."""
    parser = configparser.ConfigParser()
    parser.read_string(text)
    settings = dict(parser["mlflow"])
    assert settings["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in settings, "the admin password comes from a Secret, never from the repo"
    assert settings["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    return settings


def check_exact_hosts(hosts: list[str]) -> None:
    """Allowed Host headers are exact host:port names: fnmatch patterns would admit e.g. mlflow.attacker.example."""
    for host in hosts:
        assert not set(host) & set("*?[]"), f"pattern in --allowed-hosts: {host}"
        assert re.fullmatch(r"[a-z0-9.-]+:\d+", host), f"allowed host without an exact port: {host}"


def test_mlflow_start_script_flags_exist():
    text = (MLFLOW_DIR / "start.sh").read_text()
    subprocess.run(["bash", "-n", str(MLFLOW_DIR / "start.sh")], check=True)
    used = set(re.findall(r"^\s+(--[a-z-]+)", text, re.MULTILINE))
    assert {"--backend-store-uri", "--artifacts-destination", "--host", "--allowed-hosts", "--app-name"} <= used
    assert used <= mlflow_server_flags()
    assert re.search(r"^\s+--app-name basic-auth \\$", text, re.MULTILINE)
    default = re.search(r'^ALLOWED_HOSTS="\$\{MLFLOW_ALLOWED_HOSTS:-(\S+)\}"$', text, re.MULTILINE).group(1)
    check_exact_hosts(default.replace("${PORT}", "5000").split(","))
    auth_settings((MLFLOW_DIR / "basic_auth.ini").read_text())


START_ENV = {"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/a",
             "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-admin-password", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}


@pytest.mark.parametrize("change, message", [
    ({"MLFLOW_AUTH_ADMIN_PASSWORD": None}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
    ({"MLFLOW_FLASK_SERVER_SECRET_KEY": None}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),
    ({"MLFLOW_ALLOWED_HOSTS": "mlflow.*"}, "no patterns"),
    ({"MLFLOW_ALLOWED_HOSTS": "mlflow:5000,10.*"}, "no patterns"),
])
def test_mlflow_start_script_refuses_missing_secrets_and_host_patterns(tmp_path, change, message):
    """Refused before the server starts: a stand-in `mlflow` on PATH records whether it ran."""
    marker = tmp_path / "mlflow-called"
    fake = tmp_path / "mlflow"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({k: v for k, v in {**START_ENV, **change}.items() if v is not None}, PATH=f"{tmp_path}:/usr/bin:/bin")
    proc = subprocess.run(["bash", str(MLFLOW_DIR / "start.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not marker.exists()
    # The same environment without the change reaches `mlflow server` (the test can tell the difference).
    env.pop("MLFLOW_ALLOWED_HOSTS", None)
    env.update(START_ENV)
    proc = subprocess.run(["bash", str(MLFLOW_DIR / "start.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and marker.exists(), proc.stderr


# The real start command (auth on, artifacts proxied into S3) is run against a live server in
# tests/test_mlflow_auth.py.


# --- Dockerfile -------------------------------------------------------------------------------------------


def test_dockerfile_pins_cuda_torch_and_installs_the_project():
    text = DOCKERFILE.read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:") and "cudnn" in base
    assert "FROM ${CUDA_IMAGE}" in lines

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (torch_pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    major, minor = re.search(r"cuda:(\d+)\.(\d+)", base).groups()
    torch_line = next(ln for ln in lines if "pip install torch" in ln)
    assert f"pip install {torch_pin} --index-url https://download.pytorch.org/whl/cu{major}{minor}" in torch_line

    # The project is installed (not editable) after torch, from the packages pyproject lists, plus configs/.
    install = next(i for i, ln in enumerate(lines) if re.search(r"pip install \.( |$)", ln))
    assert lines.index(torch_line) < install
    copied = {m.group(1) for ln in lines if (m := re.match(r"COPY (\S+) \./\1$", ln))}
    assert set(pyproject["tool"]["setuptools"]["packages"]) | {"configs"} <= copied
    assert any(ln.startswith("COPY pyproject.toml") for ln in lines[:install])
    # What Ray's launcher and KubeRay need inside the container.
    for tool in ("rsync", "openssh-client", "wget"):
        assert tool in text
    # It runs as a fixed non-root UID with its own home, set after every install step.
    user = dockerfile_user()
    assert re.fullmatch(r"\d+(:\d+)?", user) and all(int(i) != 0 for i in user.split(":")), user
    uid = user.split(":")[0]
    assert re.search(rf"useradd --uid {uid} .*--create-home --home-dir (\S+)", text)
    home = re.search(r"--home-dir (\S+)", text).group(1)
    assert lines[-3:-1] == [f"WORKDIR {home}", f"USER {user}"], lines[-3:]
    assert not any(ln.startswith("RUN") for ln in lines[lines.index(f"USER {user}"):])
    assert IMAGE in text, "the build command in the Dockerfile names the image the manifests use"


# --- README -----------------------------------------------------------------------------------------------

README = ROOT / "README.md"
PATH_PREFIXES = ("configs/", "infra/", "benchmarks/", "jobs/", "ray_cluster.yaml")


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"^\s*```{lang}\n(.*?)^\s*```", README.read_text(), re.MULTILINE | re.DOTALL)


def readme_commands() -> list[list[str]]:
    """Every shell command in the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in readme_blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line, comments=True))
    return commands


def check_deepfill(argv: list[str]) -> None:
    """Parse ``deepfill ...`` with the real parser and resolve its options (config file, flags, --set)."""
    from jobs import cli

    assert argv[0] in cli.COMMANDS, argv
    argv = [str(ROOT / a) if prev in ("--config", "-c") else a for prev, a in zip([""] + argv, argv)]
    try:
        cli.parse(argv)
    except SystemExit as err:
        if err.code == 0 and "--help" in argv:  # help printed, as asked
            return
        raise AssertionError(f"README: `deepfill {shlex.join(argv)}` does not parse") from err


def check_click(group, argv: list[str]) -> None:
    """Parse a click command line (ray, mlflow) without running it."""
    import click

    command = group
    while isinstance(command, click.Group):
        name, argv = argv[0], argv[1:]
        command = command.get_command(click.Context(command), name)
        assert command is not None, f"README: unknown subcommand {name!r}"
    try:
        command.make_context(command.name, list(argv), resilient_parsing=False)
    except click.exceptions.Exit:
        pass
    except click.UsageError as err:
        raise AssertionError(f"README: {err}") from err


def test_readme_commands_exist_and_parse():
    from ray.scripts.scripts import cli as ray_cli

    makefile = (ROOT / "Makefile").read_text()
    seen = set()
    for argv in readme_commands():
        if argv[0] == "export":
            continue
        while argv and re.match(r"^[A-Z_]+=", argv[0]):  # VAR=value prefixes
            argv = argv[1:]
        if argv and argv[-1] == "&":
            argv = argv[:-1]
        if not argv:
            continue
        program = argv[0].removeprefix(".venv/bin/")
        seen.add(program)
        for token in argv:
            if token.startswith(PATH_PREFIXES) and "://" not in token:
                assert (ROOT / token).exists(), f"README names a missing file: {token}"
        if program == "deepfill":
            check_deepfill(argv[1:])
        elif program == "make":
            for target in argv[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), f"no make target {target}"
        elif program == "ray":
            if "--" in argv:
                i = argv.index("--")
                assert argv[i + 1] == "deepfill"
                check_deepfill(argv[i + 2 :])
            check_click(ray_cli, argv[1:])
        elif program == "mlflow":
            from mlflow.cli import cli as mlflow_cli

            check_click(mlflow_cli, argv[1:])
        elif program == "python":
            from jobs import demo

            if argv[1] == "-c":  # a one-line program: it must at least compile
                compile(argv[2], "README.md", "exec")
                continue
            assert argv[1:3] == ["-m", "jobs.demo"]
            demo.parse_args(argv[3:])
    assert {"deepfill", "make", "ray", "mlflow"} <= seen


def test_readme_inline_demo_command_and_python_snippets():
    from jobs import demo

    for cmd in re.findall(r"`\.venv/bin/python -m jobs\.demo([^`]*)`", README.read_text()):
        demo.parse_args(shlex.split(cmd))
    for block in readme_blocks("python"):
        compile(block.replace("\n  ", "\n").strip(), "README.md", "exec")
    assert (ROOT / "infra" / "docs" / "demo_grid.png").is_file()
