"""Credentials never leave the process: URIs carrying them are refused before anything runs, ``redact``
catches what libraries echo, and every saved or logged config is redacted. No Ray, no S3 server."""

from __future__ import annotations

import importlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import models
from jobs import train_state as S
from jobs.cli import COMMANDS, RedactingFormatter, main
from jobs.options import load_config, to_dict
from jobs.train_config import TrainConfig
from pipeline import storage
from pipeline.storage import has_credentials, redact, redact_tree

# an AWS-shaped secret: '/', '+' and '=' are what slipped past redact() before
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCY="
KEY_ID = "AKIA" + "TESTONLY" + "0000FAKE"  # an access-key-shaped id, built here so no key-like literal is committed
CRED_URI = f"s3://{KEY_ID}:{SECRET}@bucket/x"


# ----------------------------------------------------------------------------------------- refused up front

def _cli_cases(tmp: Path):
    return [
        ("prepare", ["--src", CRED_URI, "--dst", str(tmp / "out")], "src"),
        ("prepare", ["--src", str(tmp), "--dst", f"s3://{KEY_ID}@bucket/out"], "dst"),
        ("train", ["--set", f"tracking.uri=https://mlflow-user:{SECRET}@mlflow.example.com"], "tracking.uri"),
        ("train", ["--set", f"data.shards={CRED_URI}"], "data.shards"),
        ("infer", ["--images", str(tmp / "in"), "--output", str(tmp / "out"), "--mask-preset", "box", "--model",
                   f"s3://{KEY_ID}:{SECRET}@bucket/run/generator.pt"], "model"),
        ("evaluate", ["--images", CRED_URI, "--model", "models:/deepfill@candidate", "--mask-preset", "box",
                      "--output", str(tmp / "out")], "images"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_a_uri_carrying_credentials_is_refused_before_the_job_runs(case, tmp_path, capsys, monkeypatch):
    command, argv, option = _cli_cases(tmp_path)[case]
    module = importlib.import_module(COMMANDS[command][0])

    def must_not_run(opts):
        raise AssertionError("the job ran")

    monkeypatch.setattr(module, "run", must_not_run)
    assert main([command, *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and out == ""
    assert lines[0].startswith(f"deepfill {command}: {option}: a URI must not carry credentials")
    assert "AWS_SECRET_ACCESS_KEY" in lines[0] and "~/.aws" in lines[0] and "MLFLOW_TRACKING_PASSWORD" in lines[0]
    assert SECRET not in err and KEY_ID not in err and "wJal" not in err
    assert not (tmp_path / "out").exists()


def test_an_endpoint_url_carrying_credentials_is_refused(tmp_path, capsys):
    code = main(["prepare", "--src", str(tmp_path), "--dst", str(tmp_path / "out"),
                 "--endpoint-url", f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000"])
    err = capsys.readouterr().err
    assert code == 2 and "endpoint_url" in err and "credentials" in err and SECRET not in err


def test_deepfill_prepare_with_a_credential_uri_leaks_nothing_and_starts_no_ray(tmp_path):
    """The real console script: the secret is in no output and no file, and Ray never starts (Ray's task
    tracebacks, which cannot be filtered, would carry the URI)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp), "DEEPFILL_LOG_LEVEL": "DEBUG"}
    code = ("import sys; from jobs.cli import main; rc = main(sys.argv[1:]); "
            "print('ray started:', 'ray' in sys.modules and sys.modules['ray'].is_initialized()); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "prepare", "--src", CRED_URI, "--dst", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("deepfill prepare: src: a URI must not carry credentials")
    assert "ray started: False" in proc.stdout
    files = [p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file()]
    for text in (proc.stdout, proc.stderr, *files):
        assert SECRET not in text and "wJal" not in text
    assert not (tmp_path / "out").exists() and not list(tmp.iterdir())  # no Ray session folder, no log


def test_storage_refuses_credential_uris_for_library_callers(monkeypatch):
    for open_fs in (storage.filesystem, storage.pyarrow_filesystem):
        for uri in (CRED_URI, f"s3://{KEY_ID}@bucket/x", f"s3://{KEY_ID}:{SECRET}@bucket"):
            with pytest.raises(ValueError, match="must not carry credentials") as err:
                open_fs(uri)
            assert SECRET not in str(err.value) and KEY_ID not in str(err.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{SECRET}@127.0.0.1:9000")
    with pytest.raises(ValueError, match="endpoint URL must not carry credentials") as err:
        storage.filesystem("s3://bucket/x")
    assert SECRET not in str(err.value)


def test_a_tracking_uri_carrying_credentials_is_refused(monkeypatch):
    from jobs.tracking import resolve_tracking_uri

    with pytest.raises(ValueError, match="tracking.uri must not carry credentials"):
        resolve_tracking_uri(f"https://user:{SECRET}@mlflow.example.com")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://user:{SECRET}@mlflow.example.com")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI must not carry credentials") as err:
        resolve_tracking_uri(None)
    assert SECRET not in str(err.value)


@pytest.mark.parametrize("uri", [
    CRED_URI, f"s3://{KEY_ID}@bucket/x", "s3://K:p@ss@bucket/x", f"s3://K:{SECRET}@b",
    "https://user:pw@mlflow.example.com", "https://token@mlflow.example.com/", "http://u:p@127.0.0.1:9000/b",
    "postgresql://mlflow:pa/ss@db.internal:5432/mlflow", "s3://K:ab?cd@bucket/x", f"see s3://K:{SECRET}@b/x",
])
def test_has_credentials(uri):
    assert has_credentials(uri)


@pytest.mark.parametrize("uri", [
    "s3://bucket/photos/a@b.jpg", "models:/deepfill-v1@candidate", "runs:/0123abcd/model", "/data/a@b/c.jpg",
    "http://127.0.0.1:9000/bucket/me@home.png", "http://[::1]:9000/a@b", "sqlite:////tmp/x@y/mlflow.db",
    "file:///tmp/a:b@c", "https://mlflow.example.com:5000", "user@example.com", "ray://head:10001",
])
def test_has_no_credentials(uri):
    assert not has_credentials(uri)


# ----------------------------------------------------------------------------------------- what redact catches

@pytest.mark.parametrize("text, secrets, kept", [
    (CRED_URI, [SECRET, KEY_ID, "wJal"], "s3://***@bucket/x"),
    (f"s3://{KEY_ID}@bucket/x", [KEY_ID], "s3://***@bucket/x"),
    ("s3://K:p@ss-W0rd@bucket/x", ["ss-W0rd"], "@bucket/x"),  # '@' in the password
    (f"http://minio:{SECRET}@127.0.0.1:9000/b?x=1", [SECRET, "wJal"], "127.0.0.1:9000/b?x=1"),
    # botocore: the bucket name without the scheme
    (f'Invalid bucket name "{KEY_ID}:{SECRET}@bucket": Bucket name must match', [SECRET, "wJal"],
     'Invalid bucket name "***@bucket"'),
    # pyarrow
    (f"Expected an S3 object path of the form 'bucket/key...', got a URI: 'KEYID:{SECRET}@bucket/x/y'",
     [SECRET, "wJal"], "'***@bucket/x/y'"),
    (f"Authorization: AWS4-HMAC-SHA256 Credential={KEY_ID}/20260101/us-east-1/s3/aws4_request, "
     "SignedHeaders=host, Signature=0f1e2d3c4b5a", [KEY_ID, "0f1e2d3c4b5a"], "Authorization: ***"),
    ("{'Authorization': b'Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2ln', 'Host': 'h'}", ["eyJhbGciOiJIUzI1NiJ9"],
     "'Host': 'h'"),
    ("401: token rejected: Bearer abcdef123456XYZ", ["abcdef123456XYZ"], "401:"),
    ("https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLEKEY%2F2026"
     "0101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Security-Token=IQoJb3JpZ2luX2Vj%2Bx%3D&X-Amz-Signature=9f8e7d6c5b"
     "&X-Amz-Expires=60", ["AKIAEXAMPLEKEY", "IQoJb3JpZ2luX2Vj", "9f8e7d6c5b"],
     "b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&"),
    ("run password=hunter2 started", ["hunter2"], "started"),
    ('{"password": "hunter two", "steps": 3}', ["hunter", "two"], '"steps": 3'),
    (f"aws_secret_access_key: {SECRET}", [SECRET, "wJal"], "aws_secret_access_key: ***"),
    (f"key {KEY_ID} is not valid", [KEY_ID], "is not valid"),
])
def test_redact_catches_each_echo_form(text, secrets, kept, monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)  # the patterns alone must catch these
    out = redact(text)
    for secret in secrets:
        assert secret not in out, out
    assert kept in out, out
    assert redact(out) == out


def test_redact_removes_secret_values_from_the_environment(monkeypatch):
    from urllib.parse import quote

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-Pw-77")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "dapi0123456789")
    out = redact(f"a {SECRET} b {quote(SECRET, safe='')} c mlflow-Pw-77 d dapi0123456789 e")
    assert out == "a *** b *** c *** d *** e"


@pytest.mark.parametrize("text", [
    "s3://bucket/photos/a@b.jpg", "rejected a@b.jpg (corrupt)", "mail user@example.com",
    "models:/deepfill-v1@candidate", "http://127.0.0.1:9000/bucket/me@home.png", "sqlite:////tmp/x@y/mlflow.db",
    "runs:/0123abcd/model", "[::1]:9000/a@b", "checkpoint_step_00001000 at s3://bucket/run", "ray://head:10001",
    "max_tokens=5, basic settings", "gan.gp_weight: 10.0",
])
def test_redact_leaves_ordinary_text_alone(text):
    assert redact(text) == text


def test_redact_tree_redacts_every_string_and_keeps_the_rest():
    tree = {"name": "run password=hunter2", "steps": 3, "ok": True, "x": None,
            "nested": {"uris": [CRED_URI, ("s3://b/a@b.jpg", 1.5)]}, f"s3://K:{SECRET}@b": "key"}
    out = redact_tree(tree)
    assert "hunter2" not in str(out) and SECRET not in str(out)
    assert out["steps"] == 3 and out["ok"] is True and out["x"] is None
    assert out["nested"]["uris"][1] == ("s3://b/a@b.jpg", 1.5)
    assert tree["name"] == "run password=hunter2"  # a copy: the input is untouched


def test_logged_tracebacks_are_redacted():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("deepfill.test_secrets")
    log.addHandler(handler)
    try:
        try:
            raise OSError(f"cannot open {CRED_URI}")
        except OSError:
            log.error("failed", exc_info=True)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "Traceback" in text and "OSError: cannot open s3://***@bucket/x" in text and SECRET not in text


def test_print_config_is_redacted(capsys):
    assert main(["train", "--set", "name=job password=hunter2", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and yaml.safe_load(out)["name"] == "job password=***"


# ----------------------------------------------------------------------------------------- every sink

ENV_SECRET = "env-secret-Pw77"


def secret_cfg(monkeypatch) -> TrainConfig:
    """A tiny config with secrets in free-form strings: the run name, and a path holding the value of
    MLFLOW_TRACKING_PASSWORD."""
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_SECRET)
    return load_config(TrainConfig, None, [
        "model.cnum=4", "model.critic_cnum=4", "data.crop_size=32", "name=job password=hunter2",
        f"data.shards=/data/{ENV_SECRET}/shards"])


def leaks(obj) -> list[str]:
    text = str(obj)
    return [s for s in ("hunter2", ENV_SECRET) if s in text]


def test_checkpoint_files_hold_the_config_redacted(tmp_path, monkeypatch, one_torch_thread):
    from jobs.trainer import build_networks, build_optimizers

    cfg = secret_cfg(monkeypatch)
    gen, local, glob = build_networks(cfg)
    opt_g, opt_d = build_optimizers(cfg, gen, local, glob)
    S.save_train_state(tmp_path, generator=gen, local_critic=local, global_critic=glob, opt_g=opt_g, opt_d=opt_d,
                       step=1, rng=[S.rng_state()], config=to_dict(cfg), mlflow_run_id="r")
    for name in (S.TRAIN_STATE_FILENAME, S.GENERATOR_FILENAME, S.CONFIG_FILENAME):
        blob = (tmp_path / name).read_bytes()
        assert b"hunter2" not in blob and ENV_SECRET.encode() not in blob, name
    state = S.load_train_state(tmp_path)
    _, meta = models.checkpoint.load_generator(str(tmp_path / S.GENERATOR_FILENAME))
    written = yaml.safe_load((tmp_path / S.CONFIG_FILENAME).read_text())
    for config in (state["config"], meta["config"], written):
        assert not leaks(config)
        assert config["name"] == "job password=***" and config["model"]["cnum"] == 4
