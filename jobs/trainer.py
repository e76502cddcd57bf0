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

1. ``DebugDelay``: ``debug.step_delay_s`` (tests only) slows every step down.
2. ``Preemption``: every ``checkpoint.preemption_check_every`` steps, asks Ray Train whether a node of the
   job is being drained (a spot reclaim); if so this step takes a just-in-time checkpoint.
3. ``WindowMetrics``: on report steps, the means of the losses since the last report, images/s, the share
   of time spent waiting for data and the step time, ``world_size``, ``lr_scale`` and the share of the
   worker group's time spent checkpointing, into ``trainer.metrics``.
4. ``Validation`` (rank 0): on validation steps, hole L1 / PSNR on the fixed held-out set and a picture grid.
5. ``MLflowLogging`` (rank 0): owns the MLflow run (``jobs.tracking``): resumes the driver's run, records
   start / resize / restart / preemption events, logs the metrics of committed steps (once each) and the
   grids, and at the end logs and registers the generator.
6. ``Checkpointing``: on checkpoint steps, a fingerprint of every rank's parameters is gathered
   (``ddp_param_divergence``, 0 while DDP keeps the ranks in sync); rank 0 writes the checkpoint folder
   (``jobs.train_state``: with ``samples_seen``, the worker count and the metric rows not yet in MLflow)
   for the report to carry.
7. ``RayReport``: ``ray.train.report`` with the metrics and the checkpoint (uploaded in the background
   with ``checkpoint.upload=async``), then restarts the window.

DDP collectives, in the order every rank makes them (a rank that skips one hangs the others):

- once, before training: ``all_gather`` of the node ids (``train_loop_per_worker``);
- every step: DDP's gradient all-reduce in each backward (``n_critic`` critic, then one generator);
- every ``checkpoint.preemption_check_every`` steps: ``ray.train.get_preemption_info``, a barrier (hook 2);
- on checkpoint steps: ``all_gather`` of the parameter fingerprints (hook 6);
- on report steps: ``ray.train.report``, a barrier across the workers (hook 7).

Any world size (elastic jobs, ``scaling.num_workers: [min, max]``): a worker group may resume a checkpoint
another number of workers wrote. Nothing in it is per rank: the random draws of a step come from
(seed, step, rank) (``step_seed``), crops and masks from (masks.seed, epoch, key), the data stream resumes
at the samples taken so far (``jobs.train.TrainStream``), the per-worker batch stays ``batch_size`` and
the learning rates follow ``optim.lr_scaling`` (``scale_learning_rates``).

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
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from jobs.train import samples_per_step
from jobs.train_config import TrainConfig

log = logging.getLogger("jobs.train")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank's random draws at one step (a 63-bit integer from (seed, step, rank))."""
    from pipeline.masks import stable_seed

    return stable_seed("step", int(seed), int(step), int(rank)) % (2**63)


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
    generator = make_generator(cfg.model.cnum, semantics, cfg.model.attention)
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
    attention = model.get("attention", "contextual")
    if attention != cfg.model.attention:
        raise ValueError(f"init.generator has attention {attention}, but model.attention is {cfg.model.attention}: "
                         f"set --set model.attention={attention} (the layout of the weights)")
    weights.check_generator_state(state["generator"], cnum, "init.generator", attention=attention)
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
                make_generator(cfg.model.cnum, resolve_init(cfg, init).model.semantics, cfg.model.attention)
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


def plain_rows(rows) -> list:
    """Metric rows [(step, {name: value})] as plain lists of finite floats, for a checkpoint."""
    import math

    out = []
    for step, metrics in rows:
        values = {k: float(v) for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        out.append([int(step), values])
    return out


def scale_learning_rates(cfg: TrainConfig, optimizers, world_size: int) -> float:
    """Set (generator, critic) optimisers' learning rates for ``world_size`` workers: ``optim.lr_*`` times
    ``optim.lr_scale(world_size, scaling.max_workers)`` (a restored optimiser state carries the rate it was
    saved with: this replaces it). Returns the factor."""
    scale = cfg.optim.lr_scale(world_size, cfg.scaling.max_workers)
    for optimizer, lr in zip(optimizers, (cfg.optim.lr_generator, cfg.optim.lr_critic)):
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
    return scale


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
                 init_tags: dict | None = None, samples_seen: int = 0, previous_world_size: int | None = None,
                 unlogged: list = ()):
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
        self.samples_seen = int(samples_seen)  # samples the job has taken from its stream (all ranks, all sizes)
        self.previous_world_size = previous_world_size  # the size that trained the checkpoint resumed from
        self.force_checkpoint = False  # set by a hook (a preemption): checkpoint at this step
        self.committed_step = start_step  # the newest checkpoint Ray Train holds for sure (RayReport)
        self.unlogged: list[tuple[int, dict]] = list(unlogged)  # (step, metrics) rank 0 has not logged yet
        self.events: list[dict] = []  # resize / restart / preemption events for MLflowLogging to record
        self.checkpoint_seconds = 0.0  # time this worker group spent writing and reporting checkpoints
        self.started = time.perf_counter()

    # the schedule ------------------------------------------------------------------------------------
    @property
    def is_last(self) -> bool:
        return self.step == self.cfg.steps

    @property
    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.checkpoint.every == 0 or self.is_last or self.force_checkpoint

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

        import torch

        cfg, nets = self.cfg, (self.generator, self.local_critic, self.global_critic)
        local_size = cfg.data.crop_size // 2
        # the step's random draws (the gradient penalty's interpolation) depend on (seed, step, rank) only, so
        # a job resumed at any world size draws as a fresh one would: no per-rank RNG state to carry over
        torch.manual_seed(step_seed(cfg.seed, self.step, self.rank))
        for _ in range(cfg.gan.n_critic):
            image, mask, _ = self.next_batch()
            self.window.add(critic_step(*nets, self.opt_d, image, mask, local_size=local_size, gan=cfg.gan,
                                        amp_dtype=self.amp_dtype))
        image, mask, weight = self.next_batch()
        self.window.add(generator_step(*nets, self.opt_g, image, mask, weight, local_size=local_size,
                                       gan=cfg.gan, loss=cfg.loss, amp_dtype=self.amp_dtype))
        self.window.steps += 1
        self.samples_seen += samples_per_step(cfg, self.world_size)

    def train(self) -> None:
        try:
            for hook in self.hooks:
                hook.before_train(self)
            if self.start_step >= self.cfg.steps:
                log.info("step %d already reached (steps=%d): nothing to train", self.start_step, self.cfg.steps)
            for self.step in range(self.start_step + 1, self.cfg.steps + 1):
                self.metrics, self.checkpoint_dir, self.pictures = {}, None, {}
                self.force_checkpoint = False
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

class DebugDelay(Hook):
    """TEST ONLY (``debug.step_delay_s``): every rank sleeps after each step, so a test can resize, drain or
    stop a job while it is still training."""

    def after_step(self, trainer: Trainer) -> None:
        if trainer.cfg.debug.step_delay_s:
            time.sleep(trainer.cfg.debug.step_delay_s)


class WindowMetrics(Hook):
    """On report steps: the window's means, images/s (all workers and per worker), data-wait share, step time."""

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.report_due:
            return
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        cfg, world = trainer.cfg, max(trainer.world_size, 1)
        trainer.metrics.update({"step": trainer.step, **trainer.window.summary(samples_per_step(cfg, world))})
        trainer.metrics["images_per_s_per_worker"] = trainer.metrics["images_per_s"] / world
        elapsed = max(time.perf_counter() - trainer.started, 1e-9)
        trainer.metrics.update({
            "world_size": world, "lr_scale": cfg.optim.lr_scale(world, cfg.scaling.max_workers),
            # this worker group's time writing and reporting checkpoints, as a share of its wall time so far
            "checkpoint_time_share": trainer.checkpoint_seconds / elapsed,
        })


class Preemption(Hook):
    """Every rank, every ``checkpoint.preemption_check_every`` steps: ``ray.train.get_preemption_info()``
    (a barrier: every rank asks, the same number of times). When Ray Core reports a drain of one of the
    job's nodes (a spot reclaim), this step takes a just-in-time checkpoint (``trainer.force_checkpoint``)
    and training goes on; when the node goes, Ray Train restarts the workers at the size that fits, from
    that checkpoint. One checkpoint per drain: a drain already answered does not checkpoint again."""

    def __init__(self):
        self.answered: set[str] = set()

    def after_step(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        if not cfg.checkpoint.on_preemption or trainer.step % cfg.checkpoint.preemption_check_every:
            return
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        nodes = ",".join(info.preempted_node_ids)
        if nodes in self.answered:
            return
        self.answered.add(nodes)
        trainer.force_checkpoint = True
        left = (info.deadline_ms / 1000.0 - time.time()) if info.deadline_ms else None
        trainer.events.append({"kind": "preemption", "step": trainer.step, "world_size": trainer.world_size,
                               "nodes": nodes, "ranks": ",".join(map(str, info.preempted_ranks)),
                               "deadline_in_s": round(left, 1) if left is not None else None})
        if trainer.rank == 0:
            log.warning("node(s) %s are being preempted (ranks %s, deadline in %s s): checkpoint at step %d",
                        nodes, info.preempted_ranks, f"{left:.1f}" if left is not None else "?", trainer.step)


class Checkpointing(Hook):
    """On checkpoint steps: gather parameter fingerprints (a collective), rank 0 writes the checkpoint
    folder into a temporary directory that ``RayReport`` hands to Ray Train (which removes it)."""

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.checkpoint_due:
            return
        from jobs import train_state
        from jobs.options import to_dict

        t = time.perf_counter()
        nets = (trainer.generator, trainer.local_critic, trainer.global_critic)
        prints = gather_objects(param_fingerprint(*nets).cpu(), trainer.world_size)
        trainer.metrics["ddp_param_divergence"] = max(float((p - prints[0]).abs().max()) for p in prints)
        trainer.metrics["samples_seen"] = trainer.samples_seen
        if trainer.rank == 0:
            folder = tempfile.mkdtemp(prefix="deepfill-ckpt-")
            train_state.save_train_state(folder, generator=nets[0], local_critic=nets[1], global_critic=nets[2],
                                         opt_g=trainer.opt_g, opt_d=trainer.opt_d, step=trainer.step,
                                         rng=[train_state.rng_state()], config=to_dict(trainer.cfg),
                                         mlflow_run_id=trainer.mlflow_run_id, samples_seen=trainer.samples_seen,
                                         world_size=trainer.world_size, unlogged_metrics=plain_rows(trainer.unlogged))
            trainer.checkpoint_dir = folder
        trainer.checkpoint_seconds += time.perf_counter() - t


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
    """Rank 0: the job's one MLflow run (made by the driver, ``jobs.train.job_run_id``; resumed by every
    worker group), its metrics and grids at the generator step, its events, and at the end the generator as
    a registered pyfunc model.

    Metrics are held back (``trainer.unlogged``) until a checkpoint at or after their step is committed
    (``trainer.committed_step``, set by ``RayReport``): a worker group that dies is followed by one that
    trains on from the last checkpoint, redoing the steps past it, so logging those at once would log them
    twice, the second time with other values. Each checkpoint carries the rows not yet logged up to its step
    (``Checkpointing``), and the group that resumes it logs them first. So every step is logged once, in
    increasing order, whichever group dies when; the cost is that metrics reach MLflow one checkpoint late
    (``checkpoint.every``; a preemption's just-in-time checkpoint counts). A resumed group also skips any
    step MLflow already has (a group that died between reporting a checkpoint and Ray Train registering it).

    Events are MLflow tags ``deepfill.event.NNNN`` (JSON: kind, time, step, world sizes, nodes), logged at
    once: ``start``, ``resize`` (another worker count than the checkpoint's), ``restart`` (same count) and
    ``preemption`` (a drain seen, with the just-in-time checkpoint's step). ``world_size`` is a metric.
    """

    EVENT_TAG = "deepfill.event."

    def __init__(self, tracking_uri: str, storage_uri: str, node_ids: list[str]):
        self.tracking_uri, self.storage_uri, self.node_ids = tracking_uri, storage_uri, node_ids
        self.tracker = None
        self.logged_until = 0  # steps up to here are in MLflow already
        self.events_logged = 0

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
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        run = client.get_run(self.tracker.run_id)
        self.events_logged = sum(k.startswith(self.EVENT_TAG) for k in run.data.tags)
        self.logged_until = max((m.step for m in client.get_metric_history(self.tracker.run_id, "world_size")),
                                default=0)
        if self.logged_until > trainer.start_step:
            log.warning("MLflow has steps up to %d, the checkpoint is at step %d: steps %d..%d are not logged "
                        "again", self.logged_until, trainer.start_step, trainer.start_step + 1, self.logged_until)
        previous = trainer.previous_world_size
        kind = "start" if trainer.start_step == 0 and previous is None else (
            "resize" if previous is not None and previous != trainer.world_size else "restart")
        trainer.events.insert(0, {"kind": kind, "step": trainer.start_step, "world_size": trainer.world_size,
                                  "world_size_before": previous, "nodes": ",".join(sorted(set(self.node_ids)))})
        self._log_events(trainer)
        self._flush(trainer, trainer.start_step)  # what the checkpoint carried: its steps not yet in MLflow

    def _log_events(self, trainer: Trainer) -> None:
        import json

        import mlflow

        for event in trainer.events:
            self.events_logged += 1
            body = {"time": round(time.time(), 3), **{k: v for k, v in event.items() if v is not None}}
            mlflow.set_tag(f"{self.EVENT_TAG}{self.events_logged:04d}", json.dumps(body, sort_keys=True))
            log.info("event %s", body)
        trainer.events.clear()

    def _flush(self, trainer: Trainer, until: int) -> None:
        """Log the held-back metrics (``trainer.unlogged``) of steps up to ``until`` that MLflow lacks."""
        keep = []
        for step, metrics in trainer.unlogged:
            if step > until:
                keep.append((step, metrics))
            elif step > self.logged_until:
                self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
                self.logged_until = step
        trainer.unlogged = keep

    def after_step(self, trainer: Trainer) -> None:
        if self.tracker is None:
            trainer.events.clear()
            return
        if trainer.events:
            self._log_events(trainer)
        if "grid" in trainer.pictures:
            self.tracker.log_grid(trainer.pictures["grid"], trainer.step)
        if trainer.metrics:  # the same dict: what Checkpointing adds to this step's metrics comes along
            trainer.unlogged.append((trainer.step, trainer.metrics))
        self._flush(trainer, trainer.committed_step)

    def after_train(self, trainer: Trainer) -> None:
        if self.tracker is None:
            return
        if trainer.error is not None:
            self._flush(trainer, trainer.committed_step)
            self.tracker.finish("FAILED")
            return
        self._flush(trainer, trainer.step)  # finished: the last step's checkpoint is the run's last word
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
    nodes and rank 0's checkpoint folder; then the window restarts (report-time work is not step time).

    ``checkpoint.upload=async`` hands the folder to Ray Train's background upload
    (``CheckpointUploadMode.ASYNC``, which deletes it once uploaded) and goes on training; Ray Train
    registers reports in order, so the next report returns only after that upload finished: then the
    checkpoint counts as committed (``trainer.committed_step``). ``sync`` waits for the upload in the
    reporting step. The time of both goes into ``trainer.checkpoint_seconds``.
    """

    def __init__(self, node_ids: list[str]):
        self.node_ids = node_ids
        self.in_flight: int | None = None  # the step of an async checkpoint not known to be committed yet

    def after_step(self, trainer: Trainer) -> None:
        if not trainer.metrics:
            return
        import ray.train

        from jobs.train_state import checkpoint_name

        metrics = {**trainer.metrics, "mlflow_run_id": trainer.mlflow_run_id or "",
                   "worker_node_ids": ",".join(self.node_ids)}
        upload = (ray.train.CheckpointUploadMode.ASYNC if trainer.cfg.checkpoint.upload == "async"
                  else ray.train.CheckpointUploadMode.SYNC)
        checkpointing = trainer.checkpoint_due  # on every rank (rank 0 alone holds the folder)
        t = time.perf_counter()
        try:
            if trainer.checkpoint_dir is not None:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(trainer.checkpoint_dir),
                                 checkpoint_dir_name=checkpoint_name(trainer.step), checkpoint_upload_mode=upload)
            else:
                ray.train.report(metrics)
        finally:
            if trainer.checkpoint_dir is not None and upload == ray.train.CheckpointUploadMode.SYNC:
                shutil.rmtree(trainer.checkpoint_dir, ignore_errors=True)
            trainer.checkpoint_dir = None
        if checkpointing:
            trainer.checkpoint_seconds += time.perf_counter() - t
        if self.in_flight is not None:  # this report returned: the one before it is registered
            trainer.committed_step = max(trainer.committed_step, self.in_flight)
            self.in_flight = None
        if checkpointing:
            if upload == ray.train.CheckpointUploadMode.ASYNC:
                self.in_flight = trainer.step
            else:
                trainer.committed_step = trainer.step
        if trainer.rank == 0:
            log.info("step %d/%d %s", trainer.step, trainer.cfg.steps,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        trainer.window = Window()


def default_hooks(*, storage_uri: str, tracking_uri: str, node_ids: list[str]) -> list[Hook]:
    """The hooks of a training job, in the order the module docstring gives."""
    return [DebugDelay(), Preemption(), WindowMetrics(), Validation(),
            MLflowLogging(tracking_uri, storage_uri, node_ids), Checkpointing(), RayReport(node_ids)]


# ----------------------------------------------------------------------------------------- the worker

def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker function (every rank runs it). ``loop_config``: {"config", "tracking_uri",
    "storage_uri", "mlflow_run_id"}. Builds the networks (same init on every rank; DDP also broadcasts rank
    0's), restores ``ray.train.get_checkpoint()`` if there is one (whatever worker count saved it), sets
    the learning rates for this worker count (``scale_learning_rates``), wraps for DDP, and runs a
    ``Trainer``."""
    import ray
    import ray.train
    import ray.train.torch

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
    run_id = run_id or loop_config.get("mlflow_run_id")  # the driver's run for the job (jobs.train.job_run_id)
    networks = tuple(ray.train.torch.prepare_model(net) for net in networks)
    opt_g, opt_d = build_optimizers(cfg, *networks)
    samples_seen, previous_world, unlogged = 0, None, []
    if state is not None:
        opt_g.load_state_dict(state["opt_generator"])
        opt_d.load_state_dict(state["opt_critic"])
        previous_world = int(state.get("world_size") or len(state.get("rng") or [])) or None
        samples_seen = int(state.get("samples_seen")
                           or start_step * samples_per_step(cfg, previous_world or cfg.scaling.max_workers))
        unlogged = [(int(step), dict(values)) for step, values in state.get("unlogged_metrics") or []]
    del state
    scale_learning_rates(cfg, (opt_g, opt_d), world)

    node_ids = gather_objects(ray.get_runtime_context().get_node_id(), world)  # collective
    from pipeline.datasets import stall_message, watch_stream

    batches = endless_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.data.shuffle_buffer)
    # a starved or stuck pipeline fails this worker after data.stall_timeout_s instead of hanging the job
    batches = watch_stream(batches, cfg.data.stall_timeout_s, stall_message(cfg.data, cfg.data.stall_timeout_s))
    hooks = default_hooks(storage_uri=loop_config["storage_uri"], tracking_uri=loop_config["tracking_uri"],
                          node_ids=node_ids)
    Trainer(cfg, rank=rank, world_size=world, device=device, networks=networks, optimizers=(opt_g, opt_d),
            batches=batches, start_step=start_step, mlflow_run_id=run_id, hooks=hooks,
            init_tags=init.tags if init is not None else None, samples_seen=samples_seen,
            previous_world_size=previous_world, unlogged=unlogged if rank == 0 else ()).train()
