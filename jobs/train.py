"""``deepfill train``: DeepFill v1 (WGAN-GP) on Ray Train with DDP, checkpointed, resumable, tracked in MLflow.

    deepfill train --config configs/places2.yaml --set steps=1000 --set scaling.num_workers=4
    python -m jobs.train --config configs/tiny.yaml

The driver connects to the Ray cluster named by RAY_ADDRESS (or starts a local one), builds the training
dataset (``pipeline.datasets.build_train_dataset``) and runs a ``TorchTrainer``. Each worker:

- builds the generator and the two critics, wraps each for DDP (``prepare_model``), one Adam per side;
- per generator step, runs ``gan.n_critic`` critic steps then one generator step (``models.gan``), each on a
  fresh batch with fresh masks, under bf16 autocast on CUDA;
- calls ``ray.train.report`` every ``log_every`` steps (losses, images/s, data-wait share), with a
  checkpoint every ``checkpoint.every`` steps and at the end;
- resumes from ``ray.train.get_checkpoint()``: after a worker-group restart or when the job is started again
  with the same ``checkpoint.storage_path`` and ``name``.

Rank 0 also validates every ``val_every`` steps on a fixed held-out set with fixed masks (hole L1, PSNR and a
picture grid) and owns the MLflow run (``jobs.tracking``); at the end it logs the generator as a pyfunc model
and registers it as ``tracking.registered_model@tracking.alias``.

A step is one generator step; one step consumes ``(gan.n_critic + 1) * batch_size`` images per worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobs.config import ConfigError, dump_yaml, flatten, from_dict, load_config, to_dict
from pipeline.config import DataConfig, MaskConfig

log = logging.getLogger(__name__)

TRAIN_STATE_FILENAME = "train_state.pt"  # nets, optimisers, step, RNG states, config, MLflow run id
GENERATOR_FILENAME = "generator.pt"  # the generator alone (models.checkpoint), what inference loads
CONFIG_FILENAME = "config.yaml"  # the resolved config, for people
STATE_FORMAT = "deepfill-ray/train-state/1"


# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelOptions:
    """The networks. The local critic sees a crop half the training size around each hole."""

    cnum: int = 32  # generator base width; 32 is DeepFill v1 (3,601,542 parameters)
    critic_cnum: int = 64  # base width of both WGAN critics; 64 is DeepFill v1

    def __post_init__(self):
        if self.cnum < 1:
            raise ValueError(f"model.cnum must be >= 1, got {self.cnum}")
        if self.critic_cnum < 1:
            raise ValueError(f"model.critic_cnum must be >= 1, got {self.critic_cnum}")


@dataclass
class OptimOptions:
    """Adam for each side (generator; both critics together), as in the reference."""

    lr_generator: float = 1e-4  # generator learning rate
    lr_critic: float = 1e-4  # critics' learning rate
    beta1: float = 0.5  # Adam beta1 (both sides)
    beta2: float = 0.9  # Adam beta2 (both sides)
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, which always runs float32)

    def __post_init__(self):
        for name in ("lr_generator", "lr_critic"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class GanOptions:
    """WGAN-GP schedule and loss weights (the reference's inpaint.yml)."""

    n_critic: int = 5  # critic steps per generator step, each on a fresh batch
    l1_weight: float = 1.2  # weight of the spatially discounted hole L1 in the generator loss
    ae_weight: float = 1.2  # weight of the known-pixel (auto-encoder) L1
    gan_weight: float = 0.001  # weight of the adversarial term -(D_local(fake) + D_global(fake))
    gp_weight: float = 10.0  # weight of the gradient penalty in the critic loss
    coarse_weight: float = 1.2  # weight of the coarse stage inside the L1 and AE losses (refined has 1)

    def __post_init__(self):
        if self.n_critic < 1:
            raise ValueError(f"gan.n_critic must be >= 1, got {self.n_critic}")
        for name in ("l1_weight", "ae_weight", "gan_weight", "gp_weight", "coarse_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"gan.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ScalingOptions:
    """How many Ray Train workers, and what each one holds."""

    num_workers: int = 2  # DDP workers (0 runs the loop in the driver process: for quick tests only)
    use_gpu: bool = False  # one CUDA device per worker (NCCL); False trains on CPU (gloo)
    cpus_per_worker: float = 1.0  # logical CPUs reserved per worker (the data tasks need some too)
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # worker placement
    # extra Ray resources each worker needs, e.g. {trainer: 1} to keep workers on nodes that declare it
    custom_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for key, amount in self.custom_resources.items():
            if key in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                raise ValueError(
                    f"scaling.custom_resources.{key} must be a non-negative number of a custom resource "
                    f"(CPU and GPU have their own options), got {amount!r}"
                )
        if self.num_workers < 0:
            raise ValueError(f"scaling.num_workers must be >= 0, got {self.num_workers}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"scaling.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"scaling.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")


@dataclass
class CheckpointOptions:
    """Where Ray Train keeps checkpoints, how often, how many, and how many failures it survives."""

    storage_path: str = "ray_results"  # local folder or s3://bucket/prefix (endpoint: data.storage / AWS env)
    every: int = 1000  # checkpoint every this many steps (and always at the last step)
    num_to_keep: int = 3  # newest checkpoints kept in storage
    max_failures: int = 3  # worker-group restarts (from the last checkpoint) before the job fails

    def __post_init__(self):
        if not self.storage_path:
            raise ValueError("checkpoint.storage_path must not be empty")
        if self.every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {self.every}")
        if self.num_to_keep < 1:
            raise ValueError(f"checkpoint.num_to_keep must be >= 1, got {self.num_to_keep}")
        if self.max_failures < -1:
            raise ValueError(f"checkpoint.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")


@dataclass
class TrackingOptions:
    """MLflow: where, which experiment, and the registered model the job produces."""

    uri: str | None = None  # tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "deepfill"  # MLflow experiment name
    registered_model: str = "deepfill-v1"  # registry name of the final generator ("" = log, do not register)
    alias: str = "candidate"  # alias set on the registered version ("" = none)
    log_model: bool = True  # log the final generator as a pyfunc MLflow model
    grid_rows: int = 4  # validation samples shown in each picture grid

    def __post_init__(self):
        if not self.experiment:
            raise ValueError("tracking.experiment must not be empty")
        if self.alias and not self.registered_model:
            raise ValueError("tracking.alias needs tracking.registered_model")
        if self.grid_rows < 0:
            raise ValueError(f"tracking.grid_rows must be >= 0, got {self.grid_rows}")


@dataclass
class DebugOptions:
    """TEST-ONLY hooks. Leave at their defaults for real training."""

    fail_at_step: int = 0  # TEST ONLY: rank 1 (rank 0 with one worker) exits its process at this step, once per job; 0 = off

    def __post_init__(self):
        if self.fail_at_step < 0:
            raise ValueError(f"debug.fail_at_step must be >= 0, got {self.fail_at_step}")


@dataclass
class TrainConfig:
    """One training job. Every key path here is a ``--set`` override and an MLflow param name."""

    name: str = "deepfill"  # Ray Train run name (folder under checkpoint.storage_path) and MLflow run name
    steps: int = 150_000  # generator steps in total (a resumed job continues up to this count)
    batch_size: int = 16  # images per worker per critic or generator step
    seed: int = 0  # seed of weight init and of the gradient-penalty interpolation (masks: masks.seed)
    log_every: int = 100  # report losses, images/s and data-wait share every this many steps
    val_every: int = 1000  # validate (hole L1, PSNR, picture grid) every this many steps; 0 = never
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimOptions = field(default_factory=OptimOptions)
    gan: GanOptions = field(default_factory=GanOptions)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    debug: DebugOptions = field(default_factory=DebugOptions)

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '/', got {self.name!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.val_every < 0:
            raise ValueError(f"val_every must be >= 0, got {self.val_every}")
        if self.data.crop_size % 16:
            raise ValueError(
                f"data.crop_size must be a multiple of 16 for training (the local critic sees half of it), "
                f"got {self.data.crop_size}"
            )
        if self.scaling.use_gpu and self.scaling.num_workers == 0:
            raise ValueError("scaling.use_gpu needs scaling.num_workers >= 1")


# ---------------------------------------------------------------------------------------------------------
# Per-worker pieces (importable and testable without Ray)


def build_networks(cfg: TrainConfig):
    """(generator, local critic, global critic) on the CPU, initialised from ``cfg.seed``."""
    import torch

    import models

    torch.manual_seed(cfg.seed)
    crop = cfg.data.crop_size
    generator = models.InpaintGenerator(cnum=cfg.model.cnum)
    local_critic = models.LocalCritic(cnum=cfg.model.critic_cnum, size=crop // 2)
    global_critic = models.GlobalCritic(cnum=cfg.model.critic_cnum, size=crop)
    return generator, local_critic, global_critic


def build_optimizers(cfg: TrainConfig, generator, local_critic, global_critic):
    """One Adam for the generator, one for both critics (betas from ``optim``)."""
    import torch

    betas = (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.optim.lr_generator, betas=betas)
    critic_params = list(local_critic.parameters()) + list(global_critic.parameters())
    opt_d = torch.optim.Adam(critic_params, lr=cfg.optim.lr_critic, betas=betas)
    return opt_g, opt_d


def loss_weights(cfg: TrainConfig):
    from models.gan import LossWeights

    g = cfg.gan
    return LossWeights(l1=g.l1_weight, ae=g.ae_weight, gan=g.gan_weight, gp=g.gp_weight, coarse=g.coarse_weight)


def rng_state() -> dict:
    """This process's RNG states as torch tensors / primitives (loadable with ``weights_only=True``)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),  # (version, tuple of ints, None)
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(folder: str | Path, *, generator, local_critic, global_critic, opt_g, opt_d, step: int,
                     rng: list[dict], config: dict, mlflow_run_id: str | None) -> None:
    """Write a training checkpoint into ``folder``: ``train_state.pt``, ``generator.pt`` and ``config.yaml``.

    ``train_state.pt`` holds plain state dicts (the unwrapped modules), both optimisers, the step, the RNG
    states of every rank, the resolved config and the MLflow run id; it loads with
    ``torch.load(..., weights_only=True)`` on a machine without Ray. ``generator.pt`` is a
    ``models.checkpoint`` generator file, so inference can load a checkpoint folder directly.
    """
    import torch
    import yaml

    from models.checkpoint import save_generator
    from models.gan import unwrap

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = unwrap(generator)
    state = {
        "format": STATE_FORMAT,
        "step": int(step),
        "generator": gen.state_dict(),
        "local_critic": unwrap(local_critic).state_dict(),
        "global_critic": unwrap(global_critic).state_dict(),
        "opt_generator": opt_g.state_dict(),
        "opt_critic": opt_d.state_dict(),
        "rng": rng,
        "config": config,
        "mlflow_run_id": mlflow_run_id or "",
    }
    torch.save(state, folder / TRAIN_STATE_FILENAME)
    save_generator(str(folder / GENERATOR_FILENAME), gen, step=int(step), config=config)
    (folder / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False))


def load_train_state(folder: str | Path, map_location: str = "cpu") -> dict:
    """Read ``train_state.pt`` from a checkpoint folder (``weights_only=True``: no code runs on load)."""
    import torch

    state = torch.load(Path(folder) / TRAIN_STATE_FILENAME, map_location=map_location, weights_only=True)
    return _checked_state(state, folder)


def _checked_state(state: dict, where) -> dict:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{where}: not a deepfill-ray training checkpoint (format {state.get('format')!r})")
    return state


def read_checkpoint_state(checkpoint, map_location: str = "cpu") -> dict:
    """``train_state.pt`` of a Ray Train checkpoint, read by this process straight from the checkpoint's
    filesystem (local or S3) into memory, then loaded with ``weights_only=True``.

    Not ``Checkpoint.as_directory()``: for a remote checkpoint it downloads into one folder per node shared
    by the node's workers, and a rank resuming while another still wrote the file read a torn zip (seen in
    the S3 resume test).
    """
    import io

    import torch

    path = f"{checkpoint.path.rstrip('/')}/{TRAIN_STATE_FILENAME}"
    with checkpoint.filesystem.open_input_stream(path) as f:
        blob = f.read()
    state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    return _checked_state(state, checkpoint.path)


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


def validate(generator, val: dict, device, *, grid_rows: int, amp_dtype=None):
    """Hole L1 and PSNR of the inpainted validation set, and a picture grid.

    val: ``pipeline.datasets.load_val_set`` output, image uint8 (N, H, W, 3), mask uint8 (N, H, W, 1), fixed
    masks. Metrics on the composite through ``models.inpaint`` (the one inference path), on [0, 1]:
    ``val_hole_l1`` (mean absolute error over hole pixels), ``val_hole_psnr`` (dB over hole pixels),
    ``val_psnr`` (dB over the whole composite). The grid (uint8) shows the first ``grid_rows`` samples:
    masked input | coarse | refined composite | ground truth | attention (flow_to_image of the offsets).
    """
    import numpy as np
    import torch

    import models
    from models import metrics
    from jobs.tracking import picture_grid

    generator = generator.eval()
    images, masks = val["image"], val["mask"]
    composites = []
    batch = 8
    for i in range(0, len(images), batch):
        x = models.to_model_range(torch.from_numpy(images[i:i + batch])).to(device)  # (b, 3, H, W)
        m = torch.from_numpy(masks[i:i + batch]).permute(0, 3, 1, 2).to(device, torch.float32)  # (b, 1, H, W)
        composites.append(models.to_uint8(models.inpaint(generator, x, m).float()).cpu().numpy())
    composite = np.concatenate(composites)  # (N, H, W, 3) uint8
    out = {
        "val_hole_l1": float(np.nanmean(metrics.l1(composite, images, masks))),
        "val_hole_psnr": float(np.nanmean(metrics.psnr(composite, images, masks))),
        "val_psnr": float(np.mean(metrics.psnr(composite, images))),
    }
    grid = None
    rows = min(grid_rows, len(images))
    if rows > 0:
        with torch.inference_mode():
            x = models.to_model_range(torch.from_numpy(images[:rows])).to(device)
            m = torch.from_numpy(masks[:rows]).permute(0, 3, 1, 2).to(device, torch.float32)
            coarse, _, offsets = generator(x, m)
        masked = images[:rows] * (1 - masks[:rows]) + 255 * masks[:rows]  # holes shown white
        coarse_u8 = models.to_uint8((coarse.float() * m + x * (1 - m))).cpu().numpy()
        grid = picture_grid(masked.astype(np.uint8), coarse_u8, composite[:rows], images[:rows],
                            models.flow_to_image(offsets.cpu()))
    generator.train()
    return out, grid


def param_fingerprint(*modules):
    """float64 (P,): the sum of every parameter tensor of ``modules``; equal across ranks iff DDP kept sync."""
    import torch

    from models.gan import unwrap

    return torch.stack([p.detach().double().sum() for m in modules for p in unwrap(m).parameters()])


def _gather_objects(obj, world_size: int) -> list:
    """``obj`` from every rank (a collective: every rank must call it), or ``[obj]`` without a process group."""
    import torch.distributed as dist

    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _debug_fail_once(cfg: TrainConfig, storage_uri: str, step: int) -> None:
    """TEST ONLY (``debug.fail_at_step``): end this worker's process abruptly, once per job.

    A marker file under the run's storage folder records that the failure happened, so the worker group
    that Ray Train restarts from the last checkpoint runs through this step.
    """
    from pipeline import storage

    marker = storage.join(storage_uri, f".debug-failed-at-step-{step}")
    if storage.exists(marker, cfg.data.storage):
        return
    storage.write_bytes_atomic(marker, b"1", cfg.data.storage)
    # Ray Train's controller registers a reported checkpoint asynchronously; dying right after the report
    # could make it restart from the checkpoint before. Give it time, so the test exercises a real resume.
    time.sleep(10)
    log.warning("debug.fail_at_step=%d: this worker exits now (test hook)", step)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(17)


def train_loop_per_worker(loop_config: dict) -> None:
    """The Ray Train worker loop (every rank runs it). ``loop_config``: {"config", "tracking_uri", "storage_uri"}."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from jobs.tracking import Tracker
    from models.gan import critic_step, generator_step, unwrap

    cfg = from_dict(TrainConfig, loop_config["config"])
    config_dict = to_dict(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.optim.bf16) else None
    weights = loss_weights(cfg)
    local_size = cfg.data.crop_size // 2

    # networks: same init on every rank (DDP also broadcasts rank 0's parameters), then the checkpoint if any
    generator, local_critic, global_critic = build_networks(cfg)
    state, start_step, run_id = None, 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = read_checkpoint_state(checkpoint)
        generator.load_state_dict(state["generator"])
        local_critic.load_state_dict(state["local_critic"])
        global_critic.load_state_dict(state["global_critic"])
        start_step, run_id = int(state["step"]), state["mlflow_run_id"] or None
        log.info("rank %d resumes from step %d", rank, start_step)
    generator = ray.train.torch.prepare_model(generator)
    local_critic = ray.train.torch.prepare_model(local_critic)
    global_critic = ray.train.torch.prepare_model(global_critic)
    opt_g, opt_d = build_optimizers(cfg, generator, local_critic, global_critic)
    if state is not None:
        opt_g.load_state_dict(state["opt_generator"])
        opt_d.load_state_dict(state["opt_critic"])
        saved_rng = state["rng"]
        set_rng_state(saved_rng[rank] if rank < len(saved_rng) else saved_rng[0])
        if rank >= len(saved_rng):  # more workers than when saved: decorrelate the new ranks
            torch.manual_seed(cfg.seed + 7919 * (rank + 1) + start_step)
    else:
        torch.manual_seed(cfg.seed + 7919 * (rank + 1))  # gradient-penalty interpolation differs per rank
    del state

    node_ids = _gather_objects(ray.get_runtime_context().get_node_id(), world)
    tracker, val = None, None
    if rank == 0:
        tracker = Tracker.start(
            loop_config["tracking_uri"], cfg.tracking.experiment, cfg.name, flatten(config_dict), run_id=run_id,
            tags={"ray.worker_node_ids": ",".join(node_ids), "ray.num_workers": str(world),
                  "ray.device": device.type, "storage": loop_config["storage_uri"]},
        )
        run_id = tracker.run_id
        if cfg.val_every and cfg.data.val_count:
            from pipeline.datasets import load_val_set

            val = load_val_set(cfg.data, cfg.masks, cfg.data.val_count)
            if len(val["image"]) == 0:
                log.warning("no validation images under %s/val: validation is off", cfg.data.shards)
                val = None

    if start_step >= cfg.steps:
        log.info("step %d already reached (steps=%d): nothing to train", start_step, cfg.steps)
        if tracker is not None:
            tracker.finish()
        return

    shard = ray.train.get_dataset_shard("train")
    batches = endless_batches(shard, cfg.batch_size, cfg.data.shuffle_buffer)
    world_images = max(world, 1) * cfg.batch_size * (cfg.gan.n_critic + 1)
    fail_rank = 1 if world > 1 else 0

    def next_batch(window: Window):
        t = time.perf_counter()
        batch = next(batches)
        window.data_wait += time.perf_counter() - t
        return to_model_batch(batch, device)

    try:
        window = Window()
        for step in range(start_step + 1, cfg.steps + 1):
            for _ in range(cfg.gan.n_critic):
                image, mask, _ = next_batch(window)
                window.add(critic_step(generator, local_critic, global_critic, opt_d, image, mask,
                                       local_size=local_size, weights=weights, amp_dtype=amp_dtype))
            image, mask, weight = next_batch(window)
            window.add(generator_step(generator, local_critic, global_critic, opt_g, image, mask, weight,
                                      local_size=local_size, weights=weights, amp_dtype=amp_dtype))
            window.steps += 1

            if cfg.debug.fail_at_step == step and rank == fail_rank:
                _debug_fail_once(cfg, loop_config["storage_uri"], step)

            last = step == cfg.steps
            save = step % cfg.checkpoint.every == 0 or last
            if not (step % cfg.log_every == 0 or save or (cfg.val_every and step % cfg.val_every == 0)):
                continue
            if device.type == "cuda":
                torch.cuda.synchronize()
            metrics = {"step": step, **window.summary(world_images)}
            metrics["images_per_s_per_worker"] = metrics["images_per_s"] / max(world, 1)
            rng = param_sync = None
            if save:  # collectives: every rank takes part
                rng = _gather_objects(rng_state(), world)
                prints = _gather_objects(param_fingerprint(generator, local_critic, global_critic).cpu(), world)
                param_sync = max(float((p - prints[0]).abs().max()) for p in prints)
                metrics["ddp_param_divergence"] = param_sync
            if rank == 0 and val is not None and (step % cfg.val_every == 0 or last):
                val_metrics, grid = validate(unwrap(generator), val, device, grid_rows=cfg.tracking.grid_rows)
                metrics.update(val_metrics)
                if grid is not None:
                    tracker.log_grid(grid, step)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step)
            metrics["mlflow_run_id"] = run_id or ""
            metrics["worker_node_ids"] = ",".join(node_ids)
            if save and rank == 0:
                with tempfile.TemporaryDirectory(prefix="deepfill-ckpt-") as folder:
                    save_train_state(folder, generator=generator, local_critic=local_critic,
                                     global_critic=global_critic, opt_g=opt_g, opt_d=opt_d, step=step, rng=rng,
                                     config=config_dict, mlflow_run_id=run_id)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                     checkpoint_dir_name=f"checkpoint_step_{step:08d}")
            else:
                ray.train.report(metrics)
            if rank == 0:
                log.info("step %d/%d %s", step, cfg.steps,
                         " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            window = Window()

        if tracker is not None and cfg.tracking.log_model:
            from models.checkpoint import save_generator

            with tempfile.TemporaryDirectory(prefix="deepfill-model-") as folder:
                path = os.path.join(folder, GENERATOR_FILENAME)
                save_generator(path, unwrap(generator), step=cfg.steps, config=config_dict)
                tracker.log_model(path, cfg.tracking.registered_model, cfg.tracking.alias)
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.finish()


# ---------------------------------------------------------------------------------------------------------
# Driver


@dataclass
class TrainResult:
    """What ``train`` returns: the final step, the last checkpoint's URI, the MLflow run and last metrics."""

    step: int
    checkpoint: str | None
    mlflow_run_id: str | None
    tracking_uri: str
    metrics: dict = field(default_factory=dict)


def connect_ray(cfg: TrainConfig) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray with enough logical CPUs.

    Locally, each worker reserves ``scaling.cpus_per_worker`` logical CPUs and the data tasks need some too,
    so at least two more than the workers reserve are declared (logical CPUs, shared by the OS).
    """
    from pipeline.cluster import connect

    want = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) + 2
    connect(num_cpus=max(os.cpu_count() or 1, want))


def storage_uri(cfg: TrainConfig) -> str:
    """The run's folder: ``<checkpoint.storage_path>/<name>`` (an absolute local path or s3://...)."""
    from pipeline import storage

    base = cfg.checkpoint.storage_path
    if not storage.is_s3(base):
        base = os.path.abspath(os.path.expanduser(base.removeprefix("file://")))
    return storage.join(base, cfg.name)


def _batches_per_pass(cfg: TrainConfig) -> int:
    """Full per-worker batches in one pass over the training shards (from the shards' manifest)."""
    import json

    from pipeline import storage

    manifest = json.loads(storage.read_bytes(storage.join(cfg.data.shards, "manifest.json"), cfg.data.storage))
    count = _train_count(manifest)
    return max(count // max(cfg.scaling.num_workers, 1) // cfg.batch_size, 1)


def train_epochs(cfg: TrainConfig, start_step: int = 0) -> int:
    """Passes over the training shards that cover steps ``start_step .. steps`` (the dataset is built for
    this many epochs)."""
    remaining = max(cfg.steps - start_step, 1)
    return max(math.ceil(remaining * (cfg.gan.n_critic + 1) / _batches_per_pass(cfg)), 1)


def start_epoch(cfg: TrainConfig, start_step: int) -> int:
    """The epoch a job that resumes at ``start_step`` is in, so its crops and masks are not epoch 0's again."""
    return start_step * (cfg.gan.n_critic + 1) // _batches_per_pass(cfg)


def latest_checkpoint_step(run_uri: str, options=None) -> int:
    """The step of the newest ``checkpoint_step_*`` folder in a run's storage folder (0 if none)."""
    from pipeline import storage

    fs, path = storage.filesystem(run_uri, options)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, OSError):
        return 0
    steps = [int(n.removeprefix("checkpoint_step_")) for n in names
             if n.startswith("checkpoint_step_") and n.removeprefix("checkpoint_step_").isdigit()]
    return max(steps, default=0)


def _train_count(manifest: dict) -> int:
    for key in ("train_count", "num_train"):
        if key in manifest:
            return int(manifest[key])
    counts = manifest.get("counts", {})
    if isinstance(counts, dict) and "train" in counts:
        return int(counts["train"])
    raise ValueError("the shards' manifest.json has no train count")


def train(cfg: TrainConfig, *, dataset=None) -> TrainResult:
    """Run one training job on Ray Train and return where it ended.

    ``dataset`` replaces the training dataset built from ``data.shards`` (for tests and benchmarks); it must
    yield the columns of ``pipeline.datasets.build_train_dataset``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.tracking import resolve_tracking_uri
    from pipeline import storage

    connect_ray(cfg)
    if cfg.data.shards and not storage.is_s3(cfg.data.shards):  # Ray Train workers run in their own working directories
        local = os.path.abspath(os.path.expanduser(cfg.data.shards.removeprefix("file://")))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=local))
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    run_uri = storage_uri(cfg)
    if dataset is None:
        from pipeline.datasets import build_train_dataset

        step0 = latest_checkpoint_step(run_uri, cfg.data.storage)  # a rerun resumes there (Ray Train)
        dataset = build_train_dataset(cfg.data, cfg.masks, epochs=train_epochs(cfg, step0),
                                      start_epoch=start_epoch(cfg, step0))
    fs, path = storage.pyarrow_filesystem(cfg.checkpoint.storage_path, cfg.data.storage)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.custom_resources}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tracking_uri": tracking_uri, "storage_uri": run_uri},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs if storage.is_s3(cfg.checkpoint.storage_path) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=cfg.checkpoint.max_failures),
        ),
    )
    log.info("training %s: %d steps on %d worker(s), checkpoints in %s, MLflow at %s", cfg.name, cfg.steps,
             cfg.scaling.num_workers, storage.redact(run_uri), storage.redact(tracking_uri))
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    ckpt = None
    if result.checkpoint is not None:
        ckpt = result.checkpoint.path
        if storage.is_s3(cfg.checkpoint.storage_path) and "://" not in ckpt:
            ckpt = "s3://" + ckpt.lstrip("/")
    return TrainResult(step=int(metrics.get("step", 0)), checkpoint=ckpt,
                       mlflow_run_id=metrics.get("mlflow_run_id") or None, tracking_uri=tracking_uri,
                       metrics=metrics)


# ---------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (default: built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override one option, e.g. --set gan.n_critic=2 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from pipeline.storage import redact

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"deepfill train: {redact(str(err))}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    result = train(cfg)
    print(f"trained to step {result.step}; last checkpoint {redact(str(result.checkpoint))}; "
          f"MLflow run {result.mlflow_run_id} at {redact(result.tracking_uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
