"""Fast tests of the training job's pieces: checkpoint files and names, RNG state, the data plan, MLflow tracking."""

from __future__ import annotations

import io
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models
from jobs import train as T
from jobs import train_state as S
from jobs.options import flatten, from_dict, load_config, to_dict
from jobs.tracking import Tracker, resolve_tracking_uri
from jobs.train_config import TrainConfig
from jobs.trainer import Window, build_networks, build_optimizers, to_model_batch
from tests.conftest import S3_TEST_SECRET
from tests.test_secrets import ENV_SECRET, KEY_ID, SECRET, leaks, secret_cfg


def _tiny_cfg(**over):
    sets = ["model.cnum=4", "model.critic_cnum=4", "data.crop_size=32"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(TrainConfig, None, sets)


def test_ray_checkpoints_are_read_in_memory_from_a_folder_and_from_s3(tmp_path, s3_bucket):
    """read_checkpoint_state reads train_state.pt through the checkpoint's own filesystem (no shared
    download folder), from a local Ray Train checkpoint and from one in the S3 test server."""
    import ray.train

    from pipeline import storage

    cfg = _tiny_cfg()
    gen, local, glob = build_networks(cfg)
    opt_g, opt_d = build_optimizers(cfg, gen, local, glob)
    S.save_train_state(tmp_path / "ck", generator=gen, local_critic=local, global_critic=glob, opt_g=opt_g,
                       opt_d=opt_d, step=3, rng=[S.rng_state()], config=to_dict(cfg), mlflow_run_id="r1")
    state = S.read_checkpoint_state(ray.train.Checkpoint.from_directory(str(tmp_path / "ck")))
    assert state["step"] == 3 and state["mlflow_run_id"] == "r1"
    uri = f"{s3_bucket}/ck/checkpoint_step_00000003"
    for name in (S.TRAIN_STATE_FILENAME, S.GENERATOR_FILENAME):
        storage.write_bytes_atomic(f"{uri}/{name}", (tmp_path / "ck" / name).read_bytes())
    fs, path = storage.pyarrow_filesystem(uri)
    remote = S.read_checkpoint_state(ray.train.Checkpoint(path=path, filesystem=fs))
    assert remote["step"] == 3
    for a, b in zip(state["generator"].values(), remote["generator"].values()):
        assert torch.equal(a, b)


def test_train_state_round_trips_and_loads_weights_only(tmp_path):
    cfg = _tiny_cfg()
    gen, local, glob = build_networks(cfg)
    opt_g, opt_d = build_optimizers(cfg, gen, local, glob)
    # one real update so the optimisers have state (exp_avg, step) to save
    gen(torch.zeros(1, 3, 32, 32), torch.ones(1, 1, 32, 32))[1].sum().backward()
    opt_g.step()
    torch.manual_seed(123)
    rng = [S.rng_state(), S.rng_state()]
    expected_draw = torch.rand(3)
    S.save_train_state(tmp_path, generator=gen, local_critic=local, global_critic=glob, opt_g=opt_g, opt_d=opt_d,
                       step=7, rng=rng, config=to_dict(cfg), mlflow_run_id="abc123")

    raw = torch.load(tmp_path / S.TRAIN_STATE_FILENAME, weights_only=True)  # no code runs on load
    assert raw["step"] == 7 and raw["mlflow_run_id"] == "abc123"
    assert from_dict(TrainConfig, raw["config"]) == cfg
    state = S.load_train_state(tmp_path)
    gen2, local2, glob2 = build_networks(_tiny_cfg(seed=5))
    gen2.load_state_dict(state["generator"])
    local2.load_state_dict(state["local_critic"])
    glob2.load_state_dict(state["global_critic"])
    for a, b in zip(gen.state_dict().values(), gen2.state_dict().values()):
        assert torch.equal(a, b)
    opt_g2, _ = build_optimizers(cfg, gen2, local2, glob2)
    opt_g2.load_state_dict(state["opt_generator"])
    assert int(opt_g2.state_dict()["state"][0]["step"]) == 1

    S.set_rng_state(state["rng"][1])
    assert torch.equal(torch.rand(3), expected_draw)

    # the standalone generator file next to it is what inference loads
    loaded, meta = models.checkpoint.load_generator(str(tmp_path / S.GENERATOR_FILENAME))
    assert meta["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), loaded.state_dict().values()))
    assert (tmp_path / S.CONFIG_FILENAME).read_text().startswith("name:")


def test_rng_state_restores_torch_python_and_numpy():
    state = S.rng_state()
    draws = (torch.rand(2), random.random(), np.random.rand())
    S.set_rng_state(state)
    again = (torch.rand(2), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_to_model_batch_converts_pipeline_batches():
    batch = {
        "image": np.full((2, 16, 16, 3), 255, np.uint8),
        "mask": np.zeros((2, 16, 16, 1), np.uint8),
        "weight": np.ones((2, 16, 16, 1), np.float32),
    }
    batch["mask"][1, 4:8, 4:8] = 1
    image, mask, weight = to_model_batch(batch, torch.device("cpu"))
    assert image.shape == (2, 3, 16, 16) and torch.allclose(image, torch.ones_like(image))
    assert mask.shape == (2, 1, 16, 16) and mask.dtype == torch.float32 and mask[1].sum() == 16
    assert weight.shape == (2, 1, 16, 16)


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite MLflow store for this module's tests (creating its tables takes seconds); each test uses
    its own experiment. The process's tracking URI is restored afterwards."""
    import mlflow

    saved = mlflow.get_tracking_uri()
    yield f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(saved)


def test_tracker_resumes_one_run_and_never_logs_secrets(mlflow_uri, monkeypatch):
    import mlflow

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_TEST_SECRET)
    uri = mlflow_uri
    params = flatten(_tiny_cfg())
    params["data.shards"] = f"s3://key:{S3_TEST_SECRET}@bucket/shards"  # a URL carrying a secret
    tracker = Tracker.start(uri, "exp", "job", params)
    tracker.log_metrics({"g_loss": 1.5, "note": "text", "bad": float("nan")}, step=1)
    tracker.finish()

    params["steps"] = 99  # a resumed job may change a param: kept, the change recorded as a tag
    again = Tracker.start(uri, "exp", "job", params, run_id=tracker.run_id)
    again.log_metrics({"g_loss": 1.0}, step=2)
    again.finish()

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["gan.gp_weight"] == "10.0"
    assert run.data.params["steps"] == str(_tiny_cfg().steps)
    assert "steps" in run.data.tags["resume.changed_params"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "g_loss")] == [1, 2]
    assert "note" not in run.data.metrics and "bad" not in run.data.metrics
    everything = " ".join(list(run.data.params.values()) + list(run.data.tags.values()))
    assert S3_TEST_SECRET not in everything


def test_mlflow_params_tags_and_the_logged_generator_are_redacted(mlflow_uri, monkeypatch, one_torch_thread):
    """The trainer's MLflow hook on a SQLite store: params, tags, run name, and the generator file it
    logs as the model (log_model is replaced by a copy of the file, the model logging has its own tests)."""
    import mlflow

    from jobs.trainer import MLflowLogging

    cfg = secret_cfg(monkeypatch)
    logged = {}

    def capture(self, path, registered_model, alias):
        logged["generator"] = Path(path).read_bytes()

    monkeypatch.setattr(Tracker, "log_model", capture)
    hook = MLflowLogging(mlflow_uri, f"s3://{KEY_ID}:{SECRET}@bucket/run", ["node-1"])
    trainer = SimpleNamespace(rank=0, cfg=cfg, mlflow_run_id=None, world_size=1, device=torch.device("cpu"),
                              error=None, step=1, start_step=0, generator=build_networks(cfg)[0], init_tags={},
                              previous_world_size=None, events=[], pictures={}, metrics={}, committed_step=0,
                              unlogged=[])
    hook.before_train(trainer)
    hook.after_train(trainer)
    resumed = Tracker.start(mlflow_uri, cfg.tracking.experiment, cfg.name, flatten(cfg),
                            run_id=trainer.mlflow_run_id,
                            tags={"note": f"password=hunter2 {ENV_SECRET}",
                                  "storage": f"s3://{KEY_ID}:{SECRET}@bucket/run"})
    resumed.finish()
    run = mlflow.MlflowClient(mlflow_uri).get_run(trainer.mlflow_run_id)
    everything = [run.info.run_name, mlflow.MlflowClient(mlflow_uri).get_experiment(run.info.experiment_id).name,
                  *run.data.params.items(), *run.data.tags.items()]
    assert not leaks(everything) and SECRET not in str(everything) and KEY_ID not in str(everything)
    assert run.data.params["name"] == "job password=***" and run.data.tags["storage"] == "s3://***@bucket/run"
    assert run.data.params["data.shards"] == "/data/***/shards" and ENV_SECRET not in run.data.tags["note"]
    _, meta = models.checkpoint.load_generator(io.BytesIO(logged["generator"]))
    assert not leaks(meta["config"]) and meta["config"]["data"]["shards"] == "/data/***/shards"


def test_window_summary():
    w = Window()
    w.add({"g_loss": 1.0})
    w.add({"g_loss": 3.0})
    w.steps = 2
    w.data_wait = 0.0
    out = w.summary(images_per_step=8)
    assert out["g_loss"] == 2.0 and out["images_per_s"] > 0 and out["data_wait_share"] == 0.0


def test_the_loop_config_round_trips_through_the_worker_payload():
    cfg = _tiny_cfg(steps=3)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


@pytest.mark.parametrize("steps, n_critic, workers, batch, count, expected", [
    (4, 1, 2, 2, 12, 3),  # 4 steps x 2 workers x 2 batches of 2 = 32 samples: 3 passes over 12
    (10, 5, 1, 16, 1000, 1),
    (4, 1, [1, 2], 2, 12, 3),  # an elastic job covers its steps at its largest size
])
def test_train_epochs_cover_the_steps(steps, n_critic, workers, batch, count, expected):
    cfg = _tiny_cfg(steps=steps, **{"gan.n_critic": n_critic, "scaling.num_workers": workers,
                                    "batch_size": batch})
    assert T.train_epochs(cfg, T.StreamPosition(0, count)) == expected


def test_a_resumed_job_starts_its_data_where_it_stopped():
    cfg = _tiny_cfg(steps=10, **{"gan.n_critic": 1, "scaling.num_workers": 2, "batch_size": 2})
    assert T.samples_per_step(cfg, 2) == 8 and T.samples_per_step(cfg, 1) == 4
    position = T.StreamPosition(6 * 8, 12)  # 6 steps at 2 workers: 48 samples = 4 passes over 12
    assert (position.epoch, position.rows) == (4, 0)
    assert T.train_epochs(cfg, position, 6) == 3  # 4 steps left = 32 samples = 3 passes
    position = T.StreamPosition(6 * 8 + 5 * 4, 12)  # then 5 steps at 1 worker: 20 more
    assert (position.epoch, position.rows) == (5, 8)


def test_a_new_run_streams_from_step_zero(tmp_path):
    """With no run folder (or one without Ray Train's checkpoint record) the stream starts at step 0."""
    cfg = _tiny_cfg()
    assert T.TrainStream(cfg, str(tmp_path / "no-such-run")).resume_step() == 0
    (tmp_path / "run" / S.checkpoint_name(6)).mkdir(parents=True)  # a folder is not Ray Train's record
    assert T.TrainStream(cfg, str(tmp_path / "run")).resume_step() == 0


def test_checkpoint_folder_names_and_the_newest_checkpoint(tmp_path):
    assert S.checkpoint_name(6) == "checkpoint_step_00000006"
    assert S.checkpoint_step("checkpoint_step_00000006") == 6
    assert S.checkpoint_step("s3://b/run/checkpoint_step_00012000/") == 12000
    assert S.checkpoint_step("checkpoint_tmp_x") is None and S.checkpoint_step("checkpoint_step_6") is None
    run = tmp_path / "run"
    assert S.latest_checkpoint(str(run)) is None  # no run folder yet
    for step in (2, 10, 6):
        (run / S.checkpoint_name(step)).mkdir(parents=True)
        (run / S.checkpoint_name(step) / S.GENERATOR_FILENAME).write_bytes(b"x")
    (run / S.checkpoint_name(12)).mkdir()  # newest by step, but holds no generator (an unfinished upload)
    (run / "checkpoint_tmp_x").mkdir()
    assert S.latest_checkpoint(str(run)) == f"{run}/{S.checkpoint_name(10)}"
