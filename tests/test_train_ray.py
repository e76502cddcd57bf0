"""The training job on real Ray Train (tiny config): on S3 end to end, a resuming rerun, an elastic multi-node job.

These are the project's slowest tests (each starts a Ray Train run); they keep to a few steps of a tiny
model (cnum 8, 64x64 crops, 2 images per batch, one critic step per generator step).
"""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest

from jobs import cli
from jobs import train as T
from jobs import train_state as S
from jobs.options import load_config
from tests.conftest import S3_TEST_SECRET
from tests.imaging import copied_photos, split_seed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def train_shards(s3_server, good_images_dir, tmp_path_factory):
    """``s3://<bucket>/shards``: 12 photos (the 4 test photos under 3 keys each), 2 of them in the val split."""
    import ray
    import s3fs

    from pipeline.shards import prepare

    src = tmp_path_factory.mktemp("train_src")
    seed = split_seed(copied_photos(good_images_dir, src, 3), 0.2, 2)
    bucket = f"train-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(bucket)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, object_store_memory=400 * 1024**2, include_dashboard=False)
    manifest = prepare(str(src), f"s3://{bucket}/shards", val_fraction=0.2, min_size=64, seed=seed,
                       progress=False)
    assert manifest["counts"]["train"] == 10 and manifest["counts"]["val"] == 2
    return f"s3://{bucket}/shards"


def _tiny(tmp_path, shards, *sets):
    """The tiny config at batch 1: with 10 training images, 2 workers and steps <= 4, the dataset needs at
    most 2 epochs (each epoch is a branch of the Ray Data union that has to start up)."""
    return load_config(T.TrainConfig, TINY, ["batch_size=1",
        f"data.shards={shards}", f"checkpoint.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.log_model=false", *sets,
    ])


def _runs(uri, experiment):
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def _steps(client, run_id, key="g_loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_cli_trains_on_s3_registers_a_model_that_inpaints_any_size_and_a_rerun_resumes(
        ray_local, train_shards, s3_bucket, tmp_path, monkeypatch):
    """One job on S3 through the CLI, then the same job started again with more steps (the resume case: it
    continues at its last checkpoint in the bucket, in the same MLflow run; one test, to start Ray Train
    once less)."""
    import mlflow
    import torch

    from pipeline import storage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    job = ["train", "--config", str(TINY), "--set", f"data.shards={train_shards}",
           "--set", f"checkpoint.storage_path={s3_bucket}/runs", "--set", f"tracking.uri={uri}",
           "--set", "tracking.registered_model=tiny-e2e", "--set", "name=e2e",
           "--set", "data.decode_pool=actors"]  # the default pool (tiny.yaml uses tasks, to start faster)
    code = cli.main([*job, "--set", "steps=2"])
    assert code == 0

    # checkpoints (with the standalone generator file) are in the bucket
    files = storage.list_files(f"{s3_bucket}/runs/e2e")
    for name in (S.TRAIN_STATE_FILENAME, S.GENERATOR_FILENAME, S.CONFIG_FILENAME):
        assert f"checkpoint_step_00000002/{name}" in files

    client, runs = _runs(uri, "deepfill-tiny")
    assert len(runs) == 1
    run = runs[0]
    for key in ("d_loss", "d_wasserstein", "d_gp", "g_loss", "g_l1", "g_ae", "g_adv", "images_per_s",
                "data_wait_share", "val_hole_l1", "val_hole_psnr", "ddp_param_divergence"):
        assert key in run.data.metrics, key
    assert _steps(client, run.info.run_id) == [1, 2]
    assert run.data.metrics["ddp_param_divergence"] == 0.0
    assert 0.0 <= run.data.metrics["val_hole_l1"] <= 1.0
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "grids")]
    assert "grids/step_0000002.png" in artifacts
    assert run.data.params["gan.gp_weight"] == "10.0" and run.data.params["data.shards"] == train_shards
    logged = " ".join(list(run.data.params.values()) + list(run.data.tags.values()))
    assert S3_TEST_SECRET not in logged

    # the registered model loads by alias and inpaints a picture of another size
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tiny-e2e@candidate")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 72, 100, 3), dtype=np.uint8)
    mask = np.zeros((1, 72, 100, 1), np.uint8)
    mask[0, 20:50, 30:70] = 1
    out = np.asarray(model.predict({"image": image, "mask": mask}))
    assert out.shape == (1, 72, 100, 3) and out.dtype == np.uint8
    assert np.array_equal(out[mask[..., 0] == 0], image[mask[..., 0] == 0])
    assert not np.array_equal(out[mask[..., 0] == 1], image[mask[..., 0] == 1])

    # Ray Train's own record of the run is where the data stream of a restarted job begins
    cfg = load_config(T.TrainConfig, TINY, job[4::2] + ["steps=4"])
    assert T.TrainStream(cfg, T.storage_uri(cfg)).resume_step() == 2

    # started again with more steps, the job resumes at its step-2 checkpoint in the bucket
    assert cli.main([*job, "--set", "steps=4"]) == 0
    client, runs = _runs(uri, "deepfill-tiny")
    assert len(runs) == 1  # one job, one MLflow run
    # steps 1 and 2 were trained once: the second job continued at step 2, it did not start over
    assert _steps(client, run.info.run_id) == [1, 2, 3, 4]
    blob = storage.read_bytes(f"{s3_bucket}/runs/e2e/checkpoint_step_00000004/{S.TRAIN_STATE_FILENAME}")
    state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    assert state["step"] == 4 and state["mlflow_run_id"] == run.info.run_id
    assert int(client.get_model_version_by_alias("tiny-e2e", "candidate").version) == 2  # the alias moved on


class RecordingStream(T.TrainStream):
    """The job's own training stream, also writing down the step each worker-group start resumes at."""

    def __init__(self, cfg, run_uri, record):
        super().__init__(cfg, run_uri)
        self.record = record

    def resume_point(self):
        step, seen = super().resume_point()
        with open(self.record, "a") as f:
            f.write(f"{step} {seen}\n")
        return step, seen


def _wait(what, check, timeout_s=120.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _events(client, run_id):
    import json

    tags = client.get_run(run_id).data.tags
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith("deepfill.event.")]


def test_an_elastic_job_grows_shrinks_on_a_drain_and_logs_every_step_once(train_shards, tmp_path, monkeypatch):
    """``scaling.num_workers=[1, 2]`` on a real multi-node cluster: it starts with the one node that has
    room (1 worker), grows to 2 when a node joins (resuming a 1-worker checkpoint on 2 workers), takes a
    just-in-time checkpoint when that node is drained with the preemption reason through Ray's own drain
    API, and goes on with 1 worker from that checkpoint (a 2-worker checkpoint on 1 worker) when the node
    goes. One MLflow run, every step logged once, in order; ``world_size`` follows the resizes."""
    import threading
    import time

    import mlflow
    import ray
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2

    ray.shutdown()
    # right after a node goes, Ray Train may still count its resources and wait for a worker group that
    # cannot start: a short start timeout (Ray Train's own setting) keeps that wait short here
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    # a node that goes is seen dead within a second (Ray's default health check takes longer)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "_system_config": {
        "health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    cluster.add_node(num_cpus=1, resources={"trainer": 1})
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        steps = 24
        cfg = _tiny(tmp_path, train_shards, f"steps={steps}", "name=elastic", "val_every=0",
                    "scaling.num_workers=[1, 2]", "scaling.resize_interval_s=1", "checkpoint.every=3",
                    "checkpoint.num_to_keep=10", "scaling.custom_resources={trainer: 1}",
                    "scaling.placement_strategy=SPREAD", "debug.step_delay_s=0.6",
                    "checkpoint.max_failures=3", "checkpoint.preemption_check_every=1")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        record = tmp_path / "stream_starts.txt"
        stream = RecordingStream(cfg, T.storage_uri(cfg), str(record))
        out: dict = {}
        job = threading.Thread(target=lambda: out.update(result=T.train(cfg, dataset=stream)), daemon=True)
        job.start()
        client = mlflow.MlflowClient(uri)

        def run_events():
            exp = client.get_experiment_by_name("deepfill-tiny")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return _events(client, runs[0].info.run_id) if runs else []

        def checkpoints():
            return sorted(p.name for p in (tmp_path / "runs" / "elastic").glob("checkpoint_step_*"))

        _wait("a first checkpoint with 1 worker", lambda: checkpoints() and run_events())
        assert [e["world_size"] for e in run_events()] == [1]
        second = cluster.add_node(num_cpus=1, resources={"trainer": 1})  # capacity appears: grow to 2
        grown = _wait("the job to grow to 2 workers", lambda: [e for e in run_events() if e["world_size"] == 2])
        _wait("a checkpoint with 2 workers", lambda: any(S.checkpoint_step(c) > grown[0]["step"] for c in checkpoints()))
        # a spot reclaim: Ray Core drains the node with the preemption reason and a deadline
        deadline = time.time() + 20
        gcs = ray._raylet.GcsClient(address=cluster.address)
        accepted, why = gcs.drain_node(second.node_id,
                                       autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                                       "spot reclaim (test)", int(deadline * 1000))
        assert accepted, why
        seen = _wait("the job to see the drain", lambda: [e for e in run_events() if e["kind"] == "preemption"])
        jit = seen[0]["step"]
        # Ray Train has registered it: the checkpoint a restarted worker group is handed
        _wait("the just-in-time checkpoint", lambda: (T.checkpoint_record(cfg, T.storage_uri(cfg)) or {}).get("step") == jit)
        landed = time.time()
        assert landed < deadline  # it landed before the deadline
        cluster.remove_node(second)  # the node goes
        job.join(timeout=240)
        assert not job.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()

    result = out["result"]
    assert result.step == steps
    events = run_events()
    timeline = [(e["kind"], e["step"], e["world_size"]) for e in events]
    print("elastic timeline:", timeline, "jit checkpoint at step", jit, f"{deadline - landed:.1f} s before the deadline")
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and "resize" in kinds and "preemption" in kinds
    after = events[kinds.index("preemption") + 1]  # the worker group that followed the node's loss
    assert (after["kind"], after["world_size"], after["step"]) == ("resize", 1, jit)  # resumed at the JIT step
    (run,) = client.search_runs([client.get_experiment_by_name("deepfill-tiny").experiment_id])
    assert _steps(client, run.info.run_id) == list(range(1, steps + 1))  # every step once, in order
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "world_size"),
                                          key=lambda m: m.step)]
    assert sizes[0] == 1 and 2 in sizes and sizes[-1] == 1
    assert all(np.isfinite(m.value) for m in client.get_metric_history(run.info.run_id, "g_loss"))
    assert run.data.metrics["ddp_param_divergence"] == 0.0
    # each worker group's data started where the checkpoint it resumed left the stream, not at its epoch's start
    starts = [line.split() for line in record.read_text().splitlines()]
    assert starts[0] == ["0", "0"] and len(starts) >= 3
    for step, seen_samples in starts[1:]:
        assert int(step) > 0 and int(seen_samples) >= 2 * int(step)  # 2 samples a step per worker, >= 1 worker
