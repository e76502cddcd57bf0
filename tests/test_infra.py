"""Cluster and services config: ray_cluster.yaml through Ray's own validation, the network rules, the KubeRay
and MLflow manifests, the MLflow start command (run for real against S3), and the Dockerfile.

Nothing here talks to AWS or Kubernetes: the cluster config is validated with the network blocked, and the
AWS bootstrap script is run only on inputs it must refuse before any `aws` call.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
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
    profile = script_var(BOOTSTRAP, "PROFILE_NAME")
    for name, t in raw["available_node_types"].items():
        assert t["node_config"]["IamInstanceProfile"] == {"Name": profile}, name
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


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "10.1.2.3"])
def test_bootstrap_script_refuses_world_and_malformed_cidrs(tmp_path, cidr):
    """Refused before any AWS call: a stand-in `aws` on PATH records whether it ran."""
    marker = tmp_path / "aws-called"
    fake_aws = tmp_path / "aws"
    fake_aws.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_aws.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(BOOTSTRAP), cidr], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert cidr in proc.stderr
    assert not marker.exists()


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


def test_kuberay_raycluster_manifest():
    (doc,) = load_manifests(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    check_ray_cluster_spec(doc["spec"], "raycluster.yaml")
    assert doc["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-infer.yaml", "infer")])
def test_kuberay_rayjob_manifests(name, command):
    from jobs import cli

    (doc,) = load_manifests(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    check_ray_cluster_spec(spec["rayClusterSpec"], name)
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
    assert set(kinds) == {"Deployment", "Service"}
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
    assert "mlflow:5000" in args["--allowed-hosts"].split(",")
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert "valueFrom" in env["PGPASSWORD"], "the database password comes from a Secret"


def test_mlflow_start_script_flags_exist():
    text = (MLFLOW_DIR / "start.sh").read_text()
    subprocess.run(["bash", "-n", str(MLFLOW_DIR / "start.sh")], check=True)
    used = set(re.findall(r"^\s+(--[a-z-]+)", text, re.MULTILINE))
    assert {"--backend-store-uri", "--artifacts-destination", "--host", "--allowed-hosts"} <= used
    assert used <= mlflow_server_flags()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_start_script_serves_artifacts_to_s3(tmp_path, s3_bucket, s3_server):
    """The real start command: a server (SQLite store here instead of PostgreSQL) that proxies artifacts into
    the S3 test server; a client logs through HTTP only and the file lands in the bucket."""
    import mlflow
    import s3fs

    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": f"{s3_bucket}/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        ["bash", str(MLFLOW_DIR / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "MLflow server did not come up"
            time.sleep(0.5)

        mlflow.set_tracking_uri(url)
        try:
            mlflow.set_experiment("infra-test")
            (tmp_path / "note.txt").write_text("hello from deepfill-ray")
            with mlflow.start_run() as run:
                mlflow.log_param("gan.gp_weight", 10.0)
                mlflow.log_artifact(str(tmp_path / "note.txt"))
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        finally:
            mlflow.set_tracking_uri(None)
        fs = s3fs.S3FileSystem(endpoint_url=s3_server)
        stored = [p for p in fs.find(f"{s3_bucket}/artifacts") if p.endswith("note.txt")]
        assert len(stored) == 1
        assert fs.cat(stored[0]) == b"hello from deepfill-ray"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


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
