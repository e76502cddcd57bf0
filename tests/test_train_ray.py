"""The training job on real Ray Train (2 CPU workers, tiny config): end to end on S3, resume, fault, multi-node.

These are the project's slowest tests (each starts a Ray Train run); they keep to a few steps of a tiny
model (cnum 8, 64x64 crops, 2 images per batch, one critic step per generator step).
"""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from jobs import cli
from jobs import train as T
from jobs import train_state as S
from jobs.options import load_config
from tests.conftest import S3_TEST_SECRET

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def train_shards(s3_server, good_images_dir, tmp_path_factory):
    """``s3://<bucket>/shards``: 12 photos (the 4 test photos under 3 keys each), 2 of them in the val split."""
    import ray
    import s3fs

    from pipeline.shards import prepare, split_of

    src = tmp_path_factory.mktemp("train_src")
    for copy in range(3):
        for f in sorted(good_images_dir.rglob("*.*")):
            target = src / f"copy{copy}" / f.relative_to(good_images_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, target)
    keys = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))
    seed = next(s for s in range(1000) if sum(split_of(k, 0.2, s) == "val" for k in keys) == 2)
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

    def resume_step(self):
        step = super().resume_step()
        with open(self.record, "a") as f:
            f.write(f"{step}\n")
        return step


def test_a_worker_that_dies_is_replaced_and_the_run_resumes_from_the_last_checkpoint(ray_local, train_shards,
                                                                                     tmp_path):
    cfg = _tiny(tmp_path, train_shards, "steps=4", "name=fault", "debug.fail_at_step=3", "val_every=0")
    record = tmp_path / "stream_starts.txt"
    result = T.train(cfg, dataset=RecordingStream(cfg, T.storage_uri(cfg), str(record)))
    assert result.step == 4
    # Ray Train built the stream twice: for the new run, then for the restarted worker group at step 2
    assert record.read_text().split() == ["0", "2"]
    assert (tmp_path / "runs" / "fault" / ".debug-failed-at-step-3").exists()  # the hook did kill rank 1
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "deepfill-tiny")
    assert len(runs) == 1
    steps = _steps(client, runs[0].info.run_id)
    # restarted from the step-2 checkpoint: steps 1, 2 once; step 3 may be logged by rank 0 before the failure
    assert steps.count(1) == 1 and steps.count(2) == 1 and steps.count(4) == 1 and 3 in steps
    assert runs[0].data.metrics["ddp_param_divergence"] == 0.0


def test_two_workers_on_two_nodes_keep_identical_parameters(train_shards, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}) for _ in range(2)]
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        cfg = _tiny(tmp_path, train_shards, "steps=2", "name=multinode", "val_every=0",
                    "scaling.custom_resources={trainer: 1}", "scaling.placement_strategy=SPREAD")
        result = T.train(cfg)
        assert result.step == 2
        worker_nodes = result.metrics["worker_node_ids"].split(",")
        assert len(worker_nodes) == 2 and len(set(worker_nodes)) == 2
        assert set(worker_nodes) == {n.node_id for n in nodes}
        assert result.metrics["ddp_param_divergence"] == 0.0  # DDP kept the ranks' parameters identical
    finally:
        ray.shutdown()
        cluster.shutdown()
