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
