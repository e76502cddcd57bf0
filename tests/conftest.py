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
