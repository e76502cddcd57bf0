"""jobs.trainer without Ray: the hooked loop's order, what each periodic hook adds, and failures."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from jobs import train_state
from jobs.options import load_config
from jobs.train_config import TrainConfig
from jobs.trainer import (Checkpointing, Hook, Trainer, Validation, WindowMetrics, build_networks, build_optimizers)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32


def _cfg(**over):
    sets = {"model.cnum": 4, "model.critic_cnum": 4, "data.crop_size": SIZE, "batch_size": 2, "gan.n_critic": 1,
            "steps": 4, "log_every": 3, "checkpoint.every": 2, "val_every": 4, "tracking.grid_rows": 1,
            "data.val_count": 0, **over}  # val_count 0: the test hands Validation its set
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in sets.items()])


def _batches(seed=0):
    """Endless pipeline-format batches: image uint8 (B, S, S, 3), mask uint8 (B, S, S, 1), weight float32."""
    rng = np.random.default_rng(seed)
    while True:
        mask = np.zeros((2, SIZE, SIZE, 1), np.uint8)
        mask[:, 8:20, 10:24] = 1
        yield {"image": rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8), "mask": mask,
               "weight": mask.astype(np.float32)}


class Recorder(Hook):
    """A hook added without touching the loop: records what the hooks before it left on the trainer."""

    def __init__(self):
        self.events = []

    def before_train(self, trainer):
        self.events.append(("before_train", trainer.step))

    def after_step(self, trainer):
        ckpt = None
        if trainer.checkpoint_dir is not None:
            ckpt = train_state.load_train_state(trainer.checkpoint_dir)["step"]
            shutil.rmtree(trainer.checkpoint_dir)
        self.events.append(("after_step", trainer.step, dict(trainer.metrics), ckpt, sorted(trainer.pictures)))

    def after_train(self, trainer):
        self.events.append(("after_train", trainer.step, trainer.error))


def _trainer(cfg, hooks, start_step=0):
    nets = build_networks(cfg)
    return Trainer(cfg, rank=0, world_size=1, device=torch.device("cpu"), networks=nets,
                   optimizers=build_optimizers(cfg, *nets), batches=_batches(), start_step=start_step, hooks=hooks)


def _val_set():
    batch = next(_batches(1))
    return {"image": batch["image"], "mask": batch["mask"]}


def test_hooks_run_in_order_and_report_on_their_steps():
    cfg = _cfg()
    validation = Validation()
    validation.val = _val_set()  # what before_train loads from the shards on rank 0
    recorder = Recorder()
    trainer = _trainer(cfg, [WindowMetrics(), Checkpointing(), validation, recorder])
    before = [p.detach().clone() for p in trainer.generator.parameters()]
    trainer.train()

    events = recorder.events
    assert events[0] == ("before_train", 0) and events[-1] == ("after_train", 4, None)
    steps = {e[1]: e for e in events if e[0] == "after_step"}
    assert sorted(steps) == [1, 2, 3, 4]
    # step 1 reports nothing; 2 checkpoints; 3 logs; 4 (the last) logs, checkpoints and validates
    assert steps[1][2] == {} and steps[1][3] is None
    assert steps[2][3] == 2 and steps[2][2]["ddp_param_divergence"] == 0.0 and "val_hole_l1" not in steps[2][2]
    assert steps[3][3] is None and {"g_loss", "g_l1", "d_loss", "d_gp", "images_per_s"} <= set(steps[3][2])
    assert steps[3][2]["step"] == 3 and steps[3][2]["data_wait_share"] >= 0
    last = steps[4][2]
    assert steps[4][3] == 4 and 0.0 <= last["val_hole_l1"] <= 1.0 and np.isfinite(last["val_psnr"])
    assert steps[4][4] == ["grid"]
    # the window restarts only at a report: step 3's means cover steps 1-3 (no RayReport hook here)
    assert all(np.isfinite(v) for v in last.values() if isinstance(v, float))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.generator.parameters()))


def test_a_resumed_trainer_starts_after_its_step_and_does_nothing_past_the_end():
    recorder = Recorder()
    _trainer(_cfg(), [WindowMetrics(), recorder], start_step=3).train()
    assert [e[1] for e in recorder.events if e[0] == "after_step"] == [4]
    recorder = Recorder()
    _trainer(_cfg(), [recorder], start_step=4).train()
    assert [e[0] for e in recorder.events] == ["before_train", "after_train"]


def test_a_failing_hook_stops_training_and_after_train_sees_the_error():
    class Boom(Hook):
        def after_step(self, trainer):
            if trainer.step == 2:
                raise RuntimeError("boom")

    recorder = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(_cfg(), [Boom(), recorder]).train()
    assert recorder.events[-1][0] == "after_train" and isinstance(recorder.events[-1][2], RuntimeError)
    assert [e[1] for e in recorder.events if e[0] == "after_step"] == [1]


# ----------------------------------------------------------------------------------------- init.* (fine-tuning)

def _init_files(tmp_path, cnum=4, critic_cnum=4, size=SIZE, seed=11):
    """A generator file (as `deepfill import` writes it) and a critics file, from seeded random networks."""
    import models
    from models import checkpoint, weights

    torch.manual_seed(seed)
    generator = models.InpaintGenerator(cnum)
    local, global_ = models.local_critic(critic_cnum, size // 2), models.global_critic(critic_cnum, size)
    gen_path, critics_path = tmp_path / "imported.pt", tmp_path / "imported.critics.pt"
    checkpoint.save_generator(str(gen_path), generator, extra={"import": {"format": "port", "sha256": "ab" * 32,
                                                                         "source_name": "gen_1.pt",
                                                                         "semantics": "torch"}})
    weights.save_critics(str(critics_path), {"local": local.state_dict(), "global": global_.state_dict()},
                         {"cnum": critic_cnum, "local_size": size // 2, "global_size": size})
    return gen_path, critics_path, (generator, local, global_)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_new_job_starts_from_init_and_a_resumed_one_ignores_it(tmp_path):
    from jobs.trainer import start_state

    gen_path, critics_path, source = _init_files(tmp_path)
    cfg = _cfg(**{"init.generator": str(gen_path), "init.critics": str(critics_path)})
    cfg2, nets, step, run_id, init = start_state(cfg, None)
    assert (step, run_id, cfg2.model.semantics) == (0, None, "torch")
    assert all(_same(a, b) for a, b in zip(nets, source))
    assert init.tags["deepfill.init.generator.import.format"] == "port"
    assert init.tags["deepfill.init.critics.sides"] == "local,global"
    # it trains from there, with fresh optimisers
    Trainer(cfg2, rank=0, world_size=1, device=torch.device("cpu"), networks=nets,
            optimizers=build_optimizers(cfg2, *nets), batches=_batches(), hooks=[]).train()
    assert not _same(nets[0], source[0])

    # resuming from the job's own checkpoint: init.* is ignored, the checkpoint's weights and step win
    fresh = build_networks(_cfg())
    folder = tmp_path / "ckpt"
    opts = build_optimizers(cfg2, *fresh)
    train_state.save_train_state(folder, generator=fresh[0], local_critic=fresh[1], global_critic=fresh[2],
                                 opt_g=opts[0], opt_d=opts[1], step=3, rng=[train_state.rng_state()],
                                 config={"model": {"semantics": "torch"}}, mlflow_run_id="run-1")
    _, nets, step, run_id, init = start_state(cfg, train_state.load_train_state(folder))
    assert (step, run_id, init) == (3, "run-1", None)
    assert all(_same(a, b) for a, b in zip(nets, fresh))


def test_init_weights_of_another_width_or_size_are_refused_with_both_numbers(tmp_path):
    from jobs.options import ConfigError
    from jobs.trainer import check_init, load_init

    gen_path, critics_path, _ = _init_files(tmp_path)
    with pytest.raises(ValueError, match=r"init.generator has cnum 4, but model.cnum is 8: set --set model.cnum=4"):
        load_init(_cfg(**{"model.cnum": 8, "init.generator": str(gen_path)}))
    with pytest.raises(ConfigError, match=r"init.critics \(local critic; model.critic_cnum=4, data.crop_size=64\): "
                                          r"linear.weight has shape \(1, 32\), here it needs \(1, 128\)"):
        check_init(_cfg(**{"data.crop_size": 64, "init.generator": str(gen_path), "init.critics": str(critics_path)}))
    with pytest.raises(ConfigError, match="init.generator: cannot fetch"):
        check_init(_cfg(**{"init.generator": str(tmp_path / "missing.pt")}))
    with pytest.raises(ConfigError, match="init.critics needs init.generator"):
        _cfg(**{"init.critics": str(critics_path)})


def test_a_job_started_from_an_imported_model_is_linked_to_its_version(tmp_path, monkeypatch, capsys):
    import json

    import mlflow

    from jobs import cli
    from jobs.trainer import MLflowLogging, start_state
    from tests.test_import import port_generator

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.save(port_generator(4), tmp_path / "gen_00000001.pt")
    assert cli.main(["import", "--source", str(tmp_path / "gen_00000001.pt"), "--register", "port4",
                     "--alias", "imported"]) == 0
    imported = json.loads(capsys.readouterr().out)
    try:
        cfg = _cfg(**{"init.generator": "models:/port4@imported", "tracking.log_model": "false", "steps": 1})
        cfg, nets, _, _, init = start_state(cfg, None, uri)
        assert init.tags["deepfill.init.generator.model_uri"] == "models:/port4/1"
        trainer = Trainer(cfg, rank=0, world_size=1, device=torch.device("cpu"), networks=nets,
                          optimizers=build_optimizers(cfg, *nets), batches=_batches(),
                          hooks=[MLflowLogging(uri, str(tmp_path / "runs"), [])], init_tags=init.tags)
        trainer.train()
        run = mlflow.get_run(trainer.mlflow_run_id)
        assert run.data.params["init.generator"] == "models:/port4@imported"
        assert run.data.tags["deepfill.init.generator.model_version"] == "1"
        assert run.data.tags["deepfill.init.generator.import.sha256"] == imported["sha256"]
        assert run.data.tags["deepfill.init.generator.run_id"] == imported["mlflow_run_id"]
    finally:
        mlflow.set_tracking_uri(None)


def test_the_init_generators_semantics_travel_into_the_trained_generator(tmp_path):
    import models
    from jobs.trainer import start_state

    torch.manual_seed(3)
    models.checkpoint.save_generator(str(tmp_path / "tf.pt"), models.InpaintGenerator(4, semantics="tf"))
    cfg, nets, *_ = start_state(_cfg(**{"init.generator": str(tmp_path / "tf.pt")}), None)
    assert cfg.model.semantics == "tf" and nets[0].semantics == "tf"
    train_state.write_generator(tmp_path / "trained.pt", nets[0], step=4, config={})
    assert models.checkpoint.load_generator(str(tmp_path / "trained.pt"))[1]["model"]["semantics"] == "tf"
    # an explicit model.semantics wins (e.g. to fine-tune TF weights into PyTorch padding)
    cfg, nets, *_ = start_state(_cfg(**{"init.generator": str(tmp_path / "tf.pt"), "model.semantics": "torch"}), None)
    assert cfg.model.semantics == "torch" and nets[0].semantics == "torch"
