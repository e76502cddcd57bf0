"""The Ray Train worker side of ``deepfill train``: a small trainer and the hooks that hang off it.

``Trainer.run_step`` only moves data and calls ``models.gan``: ``gan.n_critic`` critic steps, then one
generator step, each on a fresh batch with fresh masks. Everything periodic is a ``Hook``, so adding EMA
weights, a learning-rate schedule or another evaluation is adding a hook, not editing the loop.

The order, on every rank::

    hook.before_train()             for each hook, in list order
    for step in start + 1 .. steps:
        trainer.run_step()
        hook.after_step()           for each hook, in list order
    hook.after_train()              for each hook, in list order (also after a failure: trainer.error)

``default_hooks`` builds the list, in this order:

1. ``FailureInjection``: ``debug.fail_at_step`` (tests only) ends one worker's process abruptly.
2. ``WindowMetrics``: on report steps, the means of the losses since the last report, images/s, the share
   of time spent waiting for data and the step time, into ``trainer.metrics``.
3. ``Checkpointing``: on checkpoint steps, every rank's RNG state and a fingerprint of its parameters are
   gathered (``ddp_param_divergence``, 0 while DDP keeps the ranks in sync); rank 0 writes the checkpoint
   folder (``jobs.train_state``) for the report to carry.
4. ``Validation`` (rank 0): on validation steps, hole L1 / PSNR on the fixed held-out set and a picture grid.
5. ``MLflowLogging`` (rank 0): owns the MLflow run (``jobs.tracking``): starts or resumes it, logs the
   metrics and grids at the generator step, and at the end logs and registers the generator.
6. ``RayReport``: ``ray.train.report`` with the metrics and the checkpoint, then restarts the window.

DDP collectives, in the order every rank makes them (a rank that skips one hangs the others):

- once, before training: ``all_gather`` of the node ids (``train_loop_per_worker``);
- every step: DDP's gradient all-reduce in each backward (``n_critic`` critic, then one generator);
- on checkpoint steps: ``all_gather`` of the RNG states, then of the parameter fingerprints (hook 3);
- on report steps: ``ray.train.report``, a barrier across the workers (hook 6).

Fine-tuning (``init.generator`` / ``init.critics``): a job without a checkpoint of its own starts from those
weights (``start_state``: every rank loads them, at step 0, with fresh optimisers), runs the generator with
their semantics unless ``model.semantics`` says otherwise, and tags its MLflow run with the sources
(``deepfill.init.generator.model_uri`` / ``.model_version`` / ``.sha256``, ...); the references themselves
are params (``init.generator``). A job that resumes from its own checkpoint ignores ``init.*``.

Rank-0-only hooks (4, 5) make no collective. A step is one generator step; one step consumes
``(gan.n_critic + 1) * batch_size`` images per worker.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from jobs.train_config import TrainConfig

log = logging.getLogger("jobs.train")


# ----------------------------------------------------------------------------------------- data

def to_model_batch(batch: dict, device):
    """A pipeline batch -> model tensors on ``device``.

    batch: image uint8 (B, H, W, 3), mask uint8 (B, H, W, 1) 1 = hole, weight float32 (B, H, W, 1).
    Returns image (B, 3, H, W) float in [-1, 1], mask (B, 1, H, W) float {0, 1}, weight (B, 1, H, W) float.
    """
    import torch

    import models

    image = models.to_model_range(torch.as_tensor(batch["image"])).to(device, non_blocking=True)
    mask = torch.as_tensor(batch["mask"]).permute(0, 3, 1, 2).to(device, torch.float32)  # (B, 1, H, W)
    weight = torch.as_tensor(batch["weight"]).permute(0, 3, 1, 2).to(device, torch.float32)  # (B, 1, H, W)
    return image, mask, weight


def endless_batches(shard, batch_size: int, shuffle_buffer: int):
    """Batches from a Ray dataset shard forever, starting a new pass whenever one is used up.

    Each worker takes the same number of batches per step, so every rank starts a new pass at the same time
    (a streaming split needs all its consumers for each pass).
    """
    while True:
        empty = True
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2,
                                              local_shuffle_buffer_size=shuffle_buffer or None):
            empty = False
            yield batch
        if empty:
            raise RuntimeError(f"the training dataset yields no full batch of {batch_size} images per worker")


@dataclass
class Window:
    """Metric sums since the last report (means, throughput and data-wait share over the window)."""

    started: float = field(default_factory=time.perf_counter)
    steps: int = 0
    data_wait: float = 0.0
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def summary(self, images_per_step: int) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        out["images_per_s"] = images_per_step * self.steps / elapsed
        out["data_wait_share"] = self.data_wait / elapsed
        out["step_time_s"] = elapsed / max(self.steps, 1)
        return out


# ----------------------------------------------------------------------------------------- networks

def build_networks(cfg: TrainConfig):
    """(generator, local critic, global critic) on the CPU, initialised from ``cfg.seed``; the generator runs
    with ``model.semantics`` (``auto`` builds the default, torch: ``resolve_init`` makes it concrete)."""
    import torch

    import models
    from models.weights import make_generator

    torch.manual_seed(cfg.seed)
    crop = cfg.data.crop_size
    semantics = "torch" if cfg.model.semantics == "auto" else cfg.model.semantics
    generator = make_generator(cfg.model.cnum, semantics)
    local_critic = models.local_critic(cnum=cfg.model.critic_cnum, size=crop // 2)
    global_critic = models.global_critic(cnum=cfg.model.critic_cnum, size=crop)
    return generator, local_critic, global_critic


# ----------------------------------------------------------------------------------------- initial weights

@dataclass
class InitWeights:
    """What ``init.*`` names, fetched and checked against the config (``load_init``)."""

    generator: dict  # state dict for models.InpaintGenerator(cnum=model.cnum)
    semantics: str  # the generator file's own semantics ("torch" or "tf")
    critics: dict | None = None  # {"local": sd | None, "global": sd | None}; a None side starts fresh
    tags: dict = field(default_factory=dict)  # MLflow run tags linking the job to its sources


def _with_tracking(tracking_uri: str | None, ref: str) -> None:
    if tracking_uri and ref.startswith(("models:/", "runs:/")):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)


def load_init(cfg: TrainConfig, tracking_uri: str | None = None) -> InitWeights | None:
    """Fetch ``init.generator`` (``jobs.serving.fetch_checkpoint``: any model reference or file) and
    ``init.critics`` (``jobs.import_weights.fetch_critics``) and check them against the networks ``cfg``
    builds; None without ``init.generator``. Raises ValueError naming the option: another cnum (both numbers),
    critics of another width or size (the tensor and both shapes), a file that is not ours.
    """
    import hashlib
    import io

    import torch

    from jobs.serving import fetch_checkpoint
    from models import checkpoint, weights
    from pipeline.storage import redact

    ref = cfg.init.generator
    if not ref:
        return None
    _with_tracking(tracking_uri, ref)
    try:
        data, info = fetch_checkpoint(ref)
    except (OSError, ValueError) as err:
        raise ValueError(f"init.generator: cannot fetch {redact(ref)}: {err}") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != checkpoint.FORMAT:
        raise ValueError(f"init.generator: {redact(ref)} is not a {checkpoint.FORMAT} generator file (convert "
                         f"released weights with `deepfill import` first)")
    model, extra = dict(state.get("model", {})), dict(state.get("extra") or {})
    cnum = int(model.get("cnum", 0))
    if cnum != cfg.model.cnum:
        raise ValueError(f"init.generator has cnum {cnum}, but model.cnum is {cfg.model.cnum}: set "
                         f"--set model.cnum={cnum} (the width of the weights)")
    imported = extra.get("import") if isinstance(extra.get("import"), dict) else {}
    semantics = model.get("semantics") or imported.get("semantics") or "torch"
    weights.check_generator_state(state["generator"], cnum, "init.generator")
    tags = {"deepfill.init.generator": redact(ref), "deepfill.init.generator.sha256": hashlib.sha256(data).hexdigest(),
            "deepfill.init.generator.step": str(int(state.get("step", 0))),
            "deepfill.init.generator.semantics": semantics}
    for key in ("model_uri", "model_name", "model_version", "run_id", "checkpoint"):
        if key in info:
            tags[f"deepfill.init.generator.{key}"] = str(info[key])
    for key in ("format", "source_name", "sha256"):
        if imported.get(key):
            tags[f"deepfill.init.generator.import.{key}"] = str(imported[key])
    init = InitWeights(generator=state["generator"], semantics=semantics, tags=tags)
    if cfg.init.critics:
        from jobs.import_weights import fetch_critics

        _with_tracking(tracking_uri, cfg.init.critics)
        try:
            critics, cinfo = fetch_critics(cfg.init.critics)
        except (OSError, ValueError) as err:
            raise ValueError(f"init.critics: {str(err).removeprefix('init.critics: ')}") from None
        init.critics = {"local": critics.get("local"), "global": critics.get("global")}
        for side, net in zip(("local", "global"), _critics_on_meta(cfg)):
            if init.critics[side] is not None:
                weights.load_into_shapes({k: tuple(v.shape) for k, v in net.state_dict().items()},
                                         init.critics[side], f"init.critics ({side} critic; model.critic_cnum="
                                         f"{cfg.model.critic_cnum}, data.crop_size={cfg.data.crop_size})")
        tags["deepfill.init.critics"] = redact(cfg.init.critics)
        tags["deepfill.init.critics.sides"] = ",".join(k for k, v in init.critics.items() if v is not None) or "none"
        for key in ("model_uri", "model_version", "run_id", "checkpoint"):
            if key in cinfo:
                tags[f"deepfill.init.critics.{key}"] = str(cinfo[key])
    return init


def _critics_on_meta(cfg: TrainConfig):
    """(local, global) critics as ``cfg`` builds them, on the meta device (shapes only)."""
    import torch

    import models

    with torch.device("meta"):
        crop = cfg.data.crop_size
        return (models.local_critic(cnum=cfg.model.critic_cnum, size=crop // 2),
                models.global_critic(cnum=cfg.model.critic_cnum, size=crop))


def check_init(cfg: TrainConfig, tracking_uri: str | None = None) -> None:
    """The driver's up-front check of ``init.*`` (``load_init``), as a ConfigError (exit 2), and of the
    semantics the generator will run with."""
    from jobs.options import ConfigError
    from models.weights import make_generator

    try:
        init = load_init(cfg, tracking_uri)
        if init is not None:
            import torch

            with torch.device("meta"):
                make_generator(cfg.model.cnum, resolve_init(cfg, init).model.semantics)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resolve_init(cfg: TrainConfig, init: InitWeights | None, saved_config: dict | None = None) -> TrainConfig:
    """``cfg`` with a concrete ``model.semantics``: an explicit setting wins; ``auto`` takes a resumed
    checkpoint's (``saved_config``), else ``init.generator``'s, else torch. The trainer's saved config (and
    so every checkpoint and the final generator) holds the result."""
    import dataclasses

    semantics = cfg.model.semantics
    if semantics == "auto":
        saved = ((saved_config or {}).get("model") or {}).get("semantics")
        semantics = saved if saved in ("torch", "tf") else (init.semantics if init is not None else "torch")
    if init is not None and cfg.model.semantics not in ("auto", init.semantics):
        log.warning("init.generator was trained with %s semantics; model.semantics=%s runs it with %s",
                    init.semantics, cfg.model.semantics, cfg.model.semantics)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, semantics=semantics))


def apply_init(networks, init: InitWeights) -> None:
    """Load ``init`` into (generator, local critic, global critic), unwrapped; a side without critics keeps
    its seeded random init."""
    from models.gan import unwrap
    from models.weights import load_into

    generator, local, global_ = (unwrap(n) for n in networks)
    load_into(generator, init.generator, "init.generator")
    for side, net in (("local", local), ("global", global_)):
        if init.critics and init.critics.get(side) is not None:
            load_into(net, init.critics[side], f"init.critics ({side} critic)")


def start_state(cfg: TrainConfig, state: dict | None, tracking_uri: str | None = None):
    """Everything a worker starts from, without Ray: (cfg with concrete semantics, networks, start step,
    MLflow run id, InitWeights or None). ``state``: the job's own checkpoint (``train_state``) when it
    resumes: then ``init.*`` is ignored (logged) and the networks hold the checkpoint's weights."""
    init = None
    if state is None:
        init = load_init(cfg, tracking_uri)
    elif cfg.init.generator:
        log.info("resuming from the job's own checkpoint at step %d: init.generator is ignored", int(state["step"]))
    cfg = resolve_init(cfg, init, state.get("config") if state is not None else None)
    networks = build_networks(cfg)
    start_step, run_id = 0, None
    if state is not None:
        for net, key in zip(networks, ("generator", "local_critic", "global_critic")):
            net.load_state_dict(state[key])
        start_step, run_id = int(state["step"]), state["mlflow_run_id"] or None
    elif init is not None:
        apply_init(networks, init)
        log.info("starting from init.generator=%s%s", init.tags["deepfill.init.generator"],
                 f", init.critics={init.tags['deepfill.init.critics']}" if init.critics else "")
    return cfg, networks, start_step, run_id, init


def build_optimizers(cfg: TrainConfig, generator, local_critic, global_critic):
    """One Adam for the generator, one for both critics (betas from ``optim``)."""
    import torch

    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr_generator, betas=betas)
    critic_params = list(local_critic.parameters()) + list(global_critic.parameters())
    opt_d = torch.optim.Adam(critic_params, lr=cfg.optim.lr_critic, betas=betas)
    return opt_g, opt_d


def param_fingerprint(*modules):
    """float64 (P,): the sum of every parameter tensor of ``modules``; equal across ranks iff DDP kept sync."""
    import torch

    from models.gan import unwrap

    return torch.stack([p.detach().double().sum() for m in modules for p in unwrap(m).parameters()])


def gather_objects(obj, world_size: int) -> list:
    """``obj`` from every rank (a collective: every rank must call it), or ``[obj]`` without a process group."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def validate(generator, val: dict, device, *, grid_rows: int):
    """Hole L1 and PSNR of the inpainted validation set, and a picture grid.

    val: image uint8 (N, H, W, 3), mask uint8 (N, H, W, 1) 1 = hole, fixed masks
    (``pipeline.datasets.load_val_set``). The composites come from ``models.inpaint_uint8`` (the one
    inference path); metrics on [0, 1]: ``val_hole_l1`` (mean absolute error over hole pixels),
    ``val_hole_psnr`` (dB over hole pixels), ``val_psnr`` (dB over the whole composite). The grid (uint8)
    shows the first ``grid_rows`` samples: masked input | coarse | refined composite | ground truth |
    attention (``models.visualize.flow_to_image`` of the offsets).
    """
    import torch

    import models
    from models import metrics, visualize

    generator = generator.eval()
    images, masks = val["image"], val["mask"]
    batch = 8
    composite = np.concatenate([models.inpaint_uint8(generator, images[i:i + batch], masks[i:i + batch])
                                for i in range(0, len(images), batch)])  # (N, H, W, 3) uint8
    out = {
        "val_hole_l1": float(np.nanmean(metrics.l1(composite, images, masks))),
        "val_hole_psnr": float(np.nanmean(metrics.psnr(composite, images, masks))),
        "val_psnr": float(np.mean(metrics.psnr(composite, images))),
    }
    grid = None
    rows = min(grid_rows, len(images))
    if rows > 0:
        with torch.inference_mode():
            x = models.to_model_range(torch.from_numpy(images[:rows])).to(device)  # (rows, 3, H, W)
            m = torch.from_numpy(masks[:rows]).permute(0, 3, 1, 2).to(device, torch.float32)  # (rows, 1, H, W)
            coarse, _, offsets = generator(x, m)
        coarse_u8 = models.to_uint8(coarse.float() * m + x * (1 - m)).cpu().numpy()  # (rows, H, W, 3)
        grid = visualize.picture_grid([visualize.masked_input(images[:rows], masks[:rows]), coarse_u8,
                                       composite[:rows], images[:rows], visualize.flow_to_image(offsets.cpu())])
    generator.train()
    return out, grid


# ----------------------------------------------------------------------------------------- trainer

class Hook:
    """Periodic work around the training steps; every method gets the trainer. See the module docstring."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


class Trainer:
    """One rank's training loop: networks and optimisers (already DDP-wrapped), a batch iterator and hooks.

    State the hooks read and write: ``step`` (the generator step just done), ``start_step``, ``metrics``
    (this step's report, empty on steps that report nothing), ``checkpoint_dir`` (a folder rank 0 wrote for
    this step's report, or None), ``pictures`` (name -> uint8 picture for this step), ``mlflow_run_id``,
    ``window`` (metric sums since the last report), ``error`` (set when training failed), ``init_tags``
    (the MLflow tags naming the ``init.*`` weights a new job started from, ``InitWeights.tags``).
    """

    def __init__(self, cfg: TrainConfig, *, rank: int, world_size: int, device, networks, optimizers, batches,
                 start_step: int = 0, mlflow_run_id: str | None = None, hooks: list[Hook] = (),
                 init_tags: dict | None = None):
        import torch

        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.generator, self.local_critic, self.global_critic = networks
        self.opt_g, self.opt_d = optimizers
        self.batches = batches
        self.amp_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.optim.bf16) else None
        self.start_step = self.step = start_step
        self.mlflow_run_id = mlflow_run_id
        self.init_tags = dict(init_tags or {})  # MLflow tags naming the init.* sources (a new job only)
        self.hooks = list(hooks)
        self.window = Window()
        self.metrics: dict = {}
        self.checkpoint_dir: str | None = None
        self.pictures: dict = {}
        self.error: BaseException | None = None

    # the schedule ------------------------------------------------------------------------------------
    @property
    def is_last(self) -> bool:
        return self.step == self.cfg.steps

    @property
    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.checkpoint.every == 0 or self.is_last

    @property
    def validation_due(self) -> bool:
        return bool(self.cfg.val_every) and (self.step % self.cfg.val_every == 0 or self.is_last)

    @property
    def report_due(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.checkpoint_due or self.validation_due

    # the loop ----------------------------------------------------------------------------------------
    def next_batch(self):
        t = time.perf_counter()
        batch = next(self.batches)
        self.window.data_wait += time.perf_counter() - t
        return to_model_batch(batch, self.device)

    def run_step(self) -> None:
        """``gan.n_critic`` critic steps, then one generator step, each on a fresh batch."""
        from models.gan import critic_step, generator_step

        cfg, nets = self.cfg, (self.generator, self.local_critic, self.global_critic)
        local_size = cfg.data.crop_size // 2
        for _ in range(cfg.gan.n_critic):
            image, mask, _ = self.next_batch()
            self.window.add(critic_step(*nets, self.opt_d, image, mask, local_size=local_size, gan=cfg.gan,
                                        amp_dtype=self.amp_dtype))
        image, mask, weight = self.next_batch()
        self.window.add(generator_step(*nets, self.opt_g, image, mask, weight, local_size=local_size,
                                       gan=cfg.gan, amp_dtype=self.amp_dtype))
        self.window.steps += 1

    def train(self) -> None:
        try:
            for hook in self.hooks:
                hook.before_train(self)
            if self.start_step >= self.cfg.steps:
                log.info("step %d already reached (steps=%d): nothing to train", self.start_step, self.cfg.steps)
            for self.step in range(self.start_step + 1, self.cfg.steps + 1):
                self.metrics, self.checkpoint_dir, self.pictures = {}, None, {}
                self.run_step()
                for hook in self.hooks:
                    hook.after_step(self)
        except BaseException as err:
            self.error = err
            raise
        finally:
            for hook in self.hooks:
                hook.after_train(self)


# ----------------------------------------------------------------------------------------- hooks

class FailureInjection(Hook):
    """TEST ONLY (``debug.fail_at_step``): rank 1 (rank 0 alone) ends its process abruptly at that step,
    once per job. A marker file under the run's storage folder records that it happened, so the worker group
    Ray Train restarts from the last checkpoint runs through the step."""

    def __init__(self, storage_uri: str):
        self.storage_uri = storage_uri

    def after_step(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if cfg.debug.fail_at_step != trainer.step or trainer.rank != (1 if trainer.world_size > 1 else 0):
            return
        from pipeline import storage

        marker = storage.join(self.storage_uri, f".debug-failed-at-step-{trainer.step}")
        if storage.exists(marker, cfg.data.storage):
            return
        storage.write_bytes_atomic(marker, b"1", cfg.data.storage)
        # Ray Train's controller registers a reported checkpoint asynchronously; dying right after the report
        # could make it restart from the checkpoint before. Give it time, so the test exercises a real resume.
        time.sleep(10)
        log.warning("debug.fail_at_step=%d: this worker exits now (test hook)", trainer.step)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(17)


class WindowMetrics(Hook):
    """On report steps: the window's means, images/s (all workers and per worker), data-wait share, step time."""

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.report_due:
            return
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        cfg, world = trainer.cfg, max(trainer.world_size, 1)
        images_per_step = world * cfg.batch_size * (cfg.gan.n_critic + 1)
        trainer.metrics.update({"step": trainer.step, **trainer.window.summary(images_per_step)})
        trainer.metrics["images_per_s_per_worker"] = trainer.metrics["images_per_s"] / world


class Checkpointing(Hook):
    """On checkpoint steps: gather RNG states and parameter fingerprints (collectives), rank 0 writes the
    checkpoint folder into a temporary directory that ``RayReport`` hands to Ray Train and then removes."""

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.checkpoint_due:
            return
        from jobs import train_state
        from jobs.options import to_dict

        nets = (trainer.generator, trainer.local_critic, trainer.global_critic)
        rng = gather_objects(train_state.rng_state(), trainer.world_size)
        prints = gather_objects(param_fingerprint(*nets).cpu(), trainer.world_size)
        trainer.metrics["ddp_param_divergence"] = max(float((p - prints[0]).abs().max()) for p in prints)
        if trainer.rank == 0:
            folder = tempfile.mkdtemp(prefix="deepfill-ckpt-")
            train_state.save_train_state(folder, generator=nets[0], local_critic=nets[1], global_critic=nets[2],
                                         opt_g=trainer.opt_g, opt_d=trainer.opt_d, step=trainer.step, rng=rng,
                                         config=to_dict(trainer.cfg), mlflow_run_id=trainer.mlflow_run_id)
            trainer.checkpoint_dir = folder


class Validation(Hook):
    """Rank 0, on validation steps: ``validate`` on the fixed held-out set (loaded once, before training)."""

    def __init__(self):
        self.val = None

    def before_train(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if trainer.rank != 0 or not (cfg.val_every and cfg.data.val_count):
            return
        from pipeline.datasets import load_val_set

        self.val = load_val_set(cfg.data, cfg.masks, cfg.data.val_count)
        if len(self.val["image"]) == 0:
            log.warning("no validation images under %s/val: validation is off", cfg.data.shards)
            self.val = None

    def after_step(self, trainer: Trainer) -> None:
        if self.val is None or not trainer.validation_due:
            return
        from models.gan import unwrap

        metrics, grid = validate(unwrap(trainer.generator), self.val, trainer.device,
                                 grid_rows=trainer.cfg.tracking.grid_rows)
        trainer.metrics.update(metrics)
        if grid is not None:
            trainer.pictures["grid"] = grid


class MLflowLogging(Hook):
    """Rank 0: the job's one MLflow run (resumed from the checkpoint's run id), its metrics and grids at the
    generator step, and at the end the generator as a registered pyfunc model."""

    def __init__(self, tracking_uri: str, storage_uri: str, node_ids: list[str]):
        self.tracking_uri, self.storage_uri, self.node_ids = tracking_uri, storage_uri, node_ids
        self.tracker = None

    def before_train(self, trainer: Trainer) -> None:
        if trainer.rank != 0:
            return
        from jobs.options import flatten, to_dict
        from jobs.tracking import Tracker

        cfg = trainer.cfg
        self.tracker = Tracker.start(
            self.tracking_uri, cfg.tracking.experiment, cfg.name, flatten(to_dict(cfg)),
            run_id=trainer.mlflow_run_id,
            tags={"ray.worker_node_ids": ",".join(self.node_ids), "ray.num_workers": str(trainer.world_size),
                  "ray.device": trainer.device.type, "storage": self.storage_uri, **trainer.init_tags},
        )
        trainer.mlflow_run_id = self.tracker.run_id

    def after_step(self, trainer: Trainer) -> None:
        if self.tracker is None:
            return
        if "grid" in trainer.pictures:
            self.tracker.log_grid(trainer.pictures["grid"], trainer.step)
        if trainer.metrics:
            self.tracker.log_metrics({k: v for k, v in trainer.metrics.items() if k != "step"}, trainer.step)

    def after_train(self, trainer: Trainer) -> None:
        if self.tracker is None:
            return
        if trainer.error is not None:
            self.tracker.finish("FAILED")
            return
        cfg = trainer.cfg
        if cfg.tracking.log_model and trainer.step > trainer.start_step:
            from jobs.options import to_dict
            from jobs.train_state import GENERATOR_FILENAME, write_generator

            with tempfile.TemporaryDirectory(prefix="deepfill-model-") as folder:
                path = os.path.join(folder, GENERATOR_FILENAME)
                write_generator(path, trainer.generator, step=cfg.steps, config=to_dict(cfg))  # redacted
                self.tracker.log_model(path, cfg.tracking.registered_model, cfg.tracking.alias)
        self.tracker.finish()


class RayReport(Hook):
    """On report steps: ``ray.train.report`` (a barrier) with the metrics, the MLflow run id, the workers'
    nodes and rank 0's checkpoint folder; then the window restarts (report-time work is not step time)."""

    def __init__(self, node_ids: list[str]):
        self.node_ids = node_ids

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.metrics:
            return
        import ray.train

        from jobs.train_state import checkpoint_name

        metrics = {**trainer.metrics, "mlflow_run_id": trainer.mlflow_run_id or "",
                   "worker_node_ids": ",".join(self.node_ids)}
        try:
            if trainer.checkpoint_dir is not None:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(trainer.checkpoint_dir),
                                 checkpoint_dir_name=checkpoint_name(trainer.step))
            else:
                ray.train.report(metrics)
        finally:
            if trainer.checkpoint_dir is not None:
                shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
                trainer.checkpoint_dir = None
        if trainer.rank == 0:
            log.info("step %d/%d %s", trainer.step, trainer.cfg.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        trainer.window = Window()


def default_hooks(*, storage_uri: str, tracking_uri: str, node_ids: list[str]) -> list[Hook]:
    """The hooks of a training job, in the order the module docstring gives."""
    return [FailureInjection(storage_uri), WindowMetrics(), Checkpointing(), Validation(),
            MLflowLogging(tracking_uri, storage_uri, node_ids), RayReport(node_ids)]


# ----------------------------------------------------------------------------------------- the worker

def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker function (every rank runs it). ``loop_config``: {"config", "tracking_uri",
    "storage_uri"}. Builds the networks (same init on every rank; DDP also broadcasts rank 0's), restores
    ``ray.train.get_checkpoint()`` if there is one, wraps for DDP, and runs a ``Trainer``."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from jobs import train_state
    from jobs.options import from_dict

    cfg = from_dict(TrainConfig, loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = train_state.read_checkpoint_state(checkpoint)
        log.info("rank %d resumes from step %d", rank, int(state["step"]))
    # a new job starts from init.* when given (every rank loads the same weights); a resumed one from state
    cfg, networks, start_step, run_id, init = start_state(cfg, state, loop_config["tracking_uri"])
    networks = tuple(ray.train.torch.prepare_model(net) for net in networks)
    opt_g, opt_d = build_optimizers(cfg, *networks)
    if state is not None:
        opt_g.load_state_dict(state["opt_generator"])
        opt_d.load_state_dict(state["opt_critic"])
        saved_rng = state["rng"]
        train_state.set_rng_state(saved_rng[rank] if rank < len(saved_rng) else saved_rng[0])
        if rank >= len(saved_rng):  # more workers than when saved: decorrelate the new ranks
            torch.manual_seed(cfg.seed + 7919 * (rank + 1) + start_step)
    else:
        torch.manual_seed(cfg.seed + 7919 * (rank + 1))  # gradient-penalty interpolation differs per rank
    del state

    node_ids = gather_objects(ray.get_runtime_context().get_node_id(), world)  # collective
    from pipeline.datasets import stall_message, watch_stream

    batches = endless_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.data.shuffle_buffer)
    # a starved or stuck pipeline fails this worker after data.stall_timeout_s instead of hanging the job
    batches = watch_stream(batches, cfg.data.stall_timeout_s, stall_message(cfg.data, cfg.data.stall_timeout_s))
    hooks = default_hooks(storage_uri=loop_config["storage_uri"], tracking_uri=loop_config["tracking_uri"],
                          node_ids=node_ids)
    Trainer(cfg, rank=rank, world_size=world, device=device, networks=networks, optimizers=(opt_g, opt_d),
            batches=batches, start_step=start_step, mlflow_run_id=run_id, hooks=hooks,
            init_tags=init.tags if init is not None else None).train()
