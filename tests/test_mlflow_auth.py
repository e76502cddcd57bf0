"""The real MLflow server as infra/mlflow/start.sh starts it: basic-auth app with our auth config, exact
allowed hosts, artifacts proxied into the S3 test server. One server for the module (SQLite stores in a
temporary folder instead of PostgreSQL); every client talks HTTP to it."""

from __future__ import annotations

import base64
import configparser
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "infra" / "mlflow" / "start.sh"
ADMIN, ADMIN_PASSWORD = "admin", "test-admin-Pw-7qk2L9"  # dummies for this throwaway server
JOBS, JOBS_PASSWORD = "deepfill-jobs", "test-jobs-Pw-3vX8m1"
READER, READER_PASSWORD = "reader", "test-reader-Pw-9hT4c6"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """Start infra/mlflow/start.sh; yields {"url", "bucket"}; stops the server at the end."""
    import s3fs

    from tests.conftest import S3_TEST_KEY_ID, S3_TEST_SECRET

    tmp = tmp_path_factory.mktemp("mlflow-auth")
    bucket = f"auth-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_server, key=S3_TEST_KEY_ID, secret=S3_TEST_SECRET).mkdir(bucket)
    # Our auth config, with the users database moved into the temporary folder.
    config = configparser.ConfigParser()
    config.read(ROOT / "infra" / "mlflow" / "basic_auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{tmp / 'auth.db'}"
    with open(tmp / "basic_auth.ini", "w") as f:
        config.write(f)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/artifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3_server,
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    })
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(["bash", str(START)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # ~30 s on an idle 2-core machine
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "MLflow server did not come up"
            time.sleep(0.3)
        yield {"url": url, "bucket": bucket, "s3": s3fs.S3FileSystem(endpoint_url=s3_server)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _get(url: str, path: str, user: str | None = None, password: str | None = None, host: str | None = None):
    """GET url+path; returns (status, body text)."""
    request = urllib.request.Request(url + path)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if host is not None:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:  # PBKDF2 checks are slow on a loaded machine
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=10"


@pytest.fixture()
def as_user(server, monkeypatch):
    """Sign the MLflow client in through the environment, as the jobs do (MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    import mlflow

    def sign_in(user, password):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server["url"])
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        mlflow.set_tracking_uri(server["url"])

    yield sign_in
    mlflow.set_tracking_uri(None)


def test_anonymous_and_wrong_password_are_refused(server):
    assert _get(server["url"], "/health")[0] == 200  # the probes' endpoint stays open
    assert _get(server["url"], SEARCH)[0] == 401
    assert _get(server["url"], SEARCH, ADMIN, "not-the-password")[0] == 401
    assert _get(server["url"], SEARCH, "nobody", ADMIN_PASSWORD)[0] == 401
    status, body = _get(server["url"], SEARCH, ADMIN, ADMIN_PASSWORD)
    assert status == 200 and "experiments" in json.loads(body)


def test_host_header_must_be_listed_exactly(server):
    port = server["url"].rsplit(":", 1)[1]
    assert _get(server["url"], SEARCH, ADMIN, ADMIN_PASSWORD, host=f"127.0.0.1:{port}")[0] == 200
    for host in ("mlflow.attacker.example", f"mlflow.attacker.example:{port}", f"10.0.0.1:{port}", "127.0.0.1"):
        status, body = _get(server["url"], SEARCH, ADMIN, ADMIN_PASSWORD, host=host)
        assert status == 403 and "Invalid Host header" in body, host


def test_jobs_user_tracks_through_our_tracker_and_others_only_read(server, as_user, tmp_path):
    """The admin creates the jobs' non-admin user (as the README says); signed in as it, jobs.tracking's
    Tracker creates a run, logs a param and an artifact (proxied into S3). Another user may read that run
    (default_permission = READ) but not write to it."""
    import mlflow
    from mlflow.server import get_app_client

    from jobs.tracking import Tracker

    as_user(ADMIN, ADMIN_PASSWORD)
    auth = get_app_client("basic-auth", tracking_uri=server["url"])
    auth.create_user(JOBS, JOBS_PASSWORD)
    auth.create_user(READER, READER_PASSWORD)

    as_user(JOBS, JOBS_PASSWORD)
    tracker = Tracker.start(server["url"], "auth-test", "run-1", {"gan.gp_weight": 10.0})
    (tmp_path / "note.txt").write_text("hello from deepfill-ray")
    mlflow.log_artifact(str(tmp_path / "note.txt"))
    run = mlflow.get_run(tracker.run_id)
    mlflow.end_run()
    assert run.data.params["gan.gp_weight"] == "10.0"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    fs = server["s3"]
    stored = [p for p in fs.find(f"{server['bucket']}/artifacts") if p.endswith("note.txt")]
    assert len(stored) == 1 and fs.cat(stored[0]) == b"hello from deepfill-ray"

    as_user(READER, READER_PASSWORD)
    client = mlflow.MlflowClient(server["url"])
    assert client.get_run(tracker.run_id).data.params["gan.gp_weight"] == "10.0"
    with pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION_DENIED|403|Permission denied"):
        client.log_param(tracker.run_id, "sneaky", "1")
