"""Shared fixtures: a real S3 server on 127.0.0.1 (moto), a real local Ray cluster, sample images.

The S3 server is started once per test session and stopped at the end. Its endpoint and dummy
credentials are exported through the standard AWS environment variables *before* Ray starts, so Ray
worker processes reach the same server. Nothing is monkeypatched: every test talks HTTP to it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "WHEN_REQUIRED")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "WHEN_REQUIRED")

from tests.imaging import write_bad_images, write_good_images  # noqa: E402

S3_TEST_KEY_ID = "testing-key-id"
S3_TEST_SECRET = "testing-secret-Zq9wX7vB"  # dummy; tests assert it never reaches logs or MLflow


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Sets AWS_* for this process and Ray."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_VARS}
    os.environ.update(
        AWS_ACCESS_KEY_ID=S3_TEST_KEY_ID,
        AWS_SECRET_ACCESS_KEY=S3_TEST_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket on the test server; yields ``s3://<bucket>``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key=S3_TEST_KEY_ID, secret=S3_TEST_SECRET)
    fs.mkdir(name)
    yield f"s3://{name}"


@pytest.fixture()
def ray_local(s3_server):
    """A real local Ray cluster (4 logical CPUs on this 2-core machine), reused across tests.

    Depends on ``s3_server`` so that Ray's worker processes inherit the S3 endpoint and keys.
    A test that needs its own cluster (multi-node) shuts this one down; the next test starts it again.
    """
    import ray

    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(
                address="local",
                num_cpus=4,
                object_store_memory=400 * 1024**2,
                include_dashboard=False,
                log_to_driver=True,
            )
        except Exception:  # Ray's fixed node start-up deadline can pass on a loaded machine: try again
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray


@pytest.fixture(scope="session")
def good_images_dir(tmp_path_factory) -> Path:
    """A small tree of real photos (scikit-image's demo data) in several formats and sizes."""
    root = tmp_path_factory.mktemp("good_images")
    write_good_images(root)
    return root


@pytest.fixture(scope="session")
def bad_images_dir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of bad or awkward files; yields (folder, {relative key: what it is})."""
    root = tmp_path_factory.mktemp("bad_images")
    return root, write_bad_images(root)


@pytest.fixture()
def one_torch_thread():
    """One intra-op torch thread: tiny tensors run fastest so, and the 2-core test machine is shared."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def serve_app(s3_server, tmp_path_factory):
    """A real ``deepfill serve`` app (``jobs.serve``) on local Ray, started once per session on a free
    127.0.0.1 port with a tiny generator (``torch.manual_seed(0); models.InpaintGenerator(cnum=8)``, step 3);
    yields the base URL, e.g. ``http://127.0.0.1:PORT`` (the API at ``/inpaint``, the page at ``/``). Limits:
    2MB per request, 1024x1024 pixels; batches of up to 8 requests gathered for 0.05 s.

    Joins the ``ray_local`` cluster when it is up, or starts it the same way (4 logical CPUs); the replica
    reserves 0.25 CPU so later tests on the same cluster keep their CPUs. Serve is shut down at the end of
    the session (a test that replaced the cluster in between has already taken Serve with it)."""
    import socket
    import time
    import urllib.request

    import ray
    import torch
    from ray import serve

    import models
    import models.checkpoint
    from jobs.serve import ServeOptions, build_app

    path = tmp_path_factory.mktemp("serve_app") / "generator.pt"
    torch.manual_seed(0)
    models.checkpoint.save_generator(str(path), models.InpaintGenerator(cnum=8), step=3,
                                     extra={"source": "tests/conftest.py serve_app"})
    for attempt in range(3):
        if ray.is_initialized():
            break
        try:
            ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024**2, include_dashboard=False,
                     log_to_driver=True)
        except Exception:  # Ray's fixed node start-up deadline can pass on a loaded machine: try again
            ray.shutdown()
            if attempt == 2:
                raise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    opts = ServeOptions(model=str(path), port=port, num_cpus_per_replica=0.25, max_batch_size=8,
                        batch_wait_timeout_s=0.05, max_bytes="2MB", max_pixels=1024 * 1024, poll_s=0)
    serve.run(build_app(opts), name="deepfill-test", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield url
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - the cluster may be gone with a test that replaced it
                pass
