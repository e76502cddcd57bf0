"""The training job's options: one dataclass tree, loaded from YAML, overridden with ``--set``.

Every key path here (``gan.gp_weight``, ``scaling.num_workers``) is the same string in YAML, in ``--set``
and as the MLflow param name; the comment after a field is its ``--help`` text (``jobs.options``). The
``data`` and ``masks`` groups come from ``pipeline.config``, the ``gan`` group (objective, schedule and loss weights) and the ``loss`` group (the reconstruction loss)
from ``models.gan``, so each is declared once, where it is used.

Everything that can be checked from the options alone is checked here, when they load (``--print-config``
included); what needs the world (``data.shards`` given and prepared, a cluster that holds the workers and
the data pipeline) is checked by ``jobs.train.check_data`` and ``check_cluster`` before the job starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from jobs.options import check_name
from models.gan import GanOptions, LossOptions
from pipeline.config import DataConfig, MaskConfig

__all__ = ["TrainConfig", "ModelOptions", "InitOptions", "OptimOptions", "GanOptions", "LossOptions", "ScalingOptions", "CheckpointOptions",
           "TrackingOptions", "DebugOptions", "DataConfig", "MaskConfig"]


@dataclass
class ModelOptions:
    """The networks. The local critic sees a crop half the training size around each hole."""

    cnum: int = 32  # generator base width; 32 is DeepFill v1 (3,601,542 parameters)
    critic_cnum: int = 64  # base width of both WGAN critics; 64 is DeepFill v1
    # how the generator pads and resizes: torch (PyTorch padding, nearest resizes) or tf (the TF release's
    #    SAME padding and align-corners resizes); auto: init.generator's own setting, else torch
    semantics: Literal["auto", "torch", "tf"] = "auto"
    # refinement network: contextual (DeepFill v1) or none (the paper's baseline: the dilated-convolution
    #    branch alone, no contextual attention)
    attention: Literal["contextual", "none"] = "contextual"

    def __post_init__(self):
        if self.cnum < 1:
            raise ValueError(f"model.cnum must be >= 1, got {self.cnum}")
        if self.critic_cnum < 1:
            raise ValueError(f"model.critic_cnum must be >= 1, got {self.critic_cnum}")


@dataclass
class OptimOptions:
    """Adam for each side (generator; both critics together), as in the reference."""

    lr_generator: float = 1e-4  # generator learning rate (with scaling.max_workers workers; see lr_scaling)
    lr_critic: float = 1e-4  # critics' learning rate (with scaling.max_workers workers; see lr_scaling)
    # an elastic job running w of its max workers keeps the per-worker batch (so the global batch is
    #    w * batch_size) and scales both learning rates by sqrt(w / max) (Adam's square-root rule), by
    #    w / max (linear), or not at all (none)
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    beta1: float = 0.5  # Adam beta1 (both sides)
    beta2: float = 0.9  # Adam beta2 (both sides)
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU, which always runs float32)

    def lr_scale(self, world_size: int, max_workers: int) -> float:
        """The factor on both learning rates for ``world_size`` workers of ``max_workers`` (``lr_scaling``)."""
        if self.lr_scaling == "none" or max_workers <= 1 or world_size >= max_workers:
            return 1.0
        ratio = max(world_size, 1) / max_workers
        return ratio ** 0.5 if self.lr_scaling == "sqrt" else ratio

    def __post_init__(self):
        for name in ("lr_generator", "lr_critic"):
            if not getattr(self, name) > 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class ScalingOptions:
    """How many Ray Train workers, and what each one holds."""

    # DDP workers: N, or [min, max] for an elastic job that starts with as many as fit (at least min), grows
    #    when capacity appears and shrinks when a node goes (0 runs the loop in the driver: quick tests only)
    num_workers: int | list[int] = 2
    # an elastic job looks for room to grow this often, in seconds (Ray Train's elastic resize monitor)
    resize_interval_s: float = 60.0
    use_gpu: bool = False  # one CUDA device per worker (NCCL); False trains on CPU (gloo)
    cpus_per_worker: float = 1.0  # logical CPUs reserved per worker (the data tasks need some too)
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # worker placement
    # extra Ray resources each worker needs, e.g. {trainer: 1} to keep workers on nodes that declare it
    custom_resources: dict[str, float] = field(default_factory=dict)
    # refuse to start when the cluster cannot hold the workers plus the data pipeline's CPUs (with an
    #    autoscaler: when its maximum cannot); false skips the check (resources that join by other means)
    check_resources: bool = True

    def __post_init__(self):
        for key, amount in self.custom_resources.items():
            if not key or key in ("CPU", "GPU") or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                raise ValueError(
                    f"scaling.custom_resources.{key} must be a non-negative number of a custom resource "
                    f"(CPU and GPU have their own options), got {amount!r}"
                )
        if isinstance(self.num_workers, (list, tuple)):
            if len(self.num_workers) != 2 or not 1 <= self.num_workers[0] <= self.num_workers[1]:
                raise ValueError(f"scaling.num_workers must be N or [min, max] with 1 <= min <= max, got "
                                 f"{list(self.num_workers)}")
            self.num_workers = [int(n) for n in self.num_workers]
            if self.num_workers[0] == self.num_workers[1]:  # [n, n] is a fixed-size job
                self.num_workers = self.num_workers[0]
        elif self.num_workers < 0:
            raise ValueError(f"scaling.num_workers must be >= 0, got {self.num_workers}")
        if self.resize_interval_s <= 0:
            raise ValueError(f"scaling.resize_interval_s must be > 0, got {self.resize_interval_s}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"scaling.cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"scaling.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.use_gpu and not self.gpus_per_worker > 0:
            raise ValueError(f"scaling.gpus_per_worker must be > 0 with use_gpu, got {self.gpus_per_worker}")

    @property
    def elastic(self) -> bool:
        """Whether the worker count is a [min, max] range."""
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the job runs with: the reference world size of ``optim``'s learning rates."""
        return self.num_workers[1] if self.elastic else self.num_workers

    def ray_num_workers(self) -> int | tuple[int, int]:
        """``ScalingConfig(num_workers=...)``: an int, or a (min, max) tuple for an elastic job."""
        return tuple(self.num_workers) if self.elastic else self.num_workers


@dataclass
class CheckpointOptions:
    """Where Ray Train keeps checkpoints, how often, how many, and how many failures it survives."""

    storage_path: str = "ray_results"  # local folder or s3://bucket/prefix (endpoint: data.storage / AWS env)
    every: int = 1000  # checkpoint every this many steps (and always at the last step)
    num_to_keep: int = 3  # newest checkpoints kept in storage
    max_failures: int = 3  # worker-group restarts (from the last checkpoint) before the job fails
    # restarts after node preemptions (spot reclaims, Ray node drains), counted apart from max_failures; -1 = no limit
    max_preemption_failures: int = -1
    # seconds the surviving workers may keep running past a preemption deadline (to finish a checkpoint upload)
    preemption_grace_s: float = 0.0
    # on a drain of one of the job's nodes, every worker takes part in a just-in-time checkpoint (Ray Train's
    #    get_preemption_info, asked every preemption_check_every steps: a barrier across the workers)
    on_preemption: bool = True
    # steps between preemption checks: each is a barrier through a Ray actor (0.1 s a step on 2 busy CPU
    #    cores, benchmarks/checkpoint.py); 10 steps answer a 2-minute spot notice in seconds
    preemption_check_every: int = 10
    # async: the upload to checkpoint.storage_path runs in the background while training goes on (the step
    #    that reports waits only for the local write); sync: the reporting step waits for the upload
    upload: Literal["async", "sync"] = "async"

    def __post_init__(self):
        if not self.storage_path:
            raise ValueError("checkpoint.storage_path must not be empty")
        if self.every < 1:
            raise ValueError(f"checkpoint.every must be >= 1, got {self.every}")
        if self.num_to_keep < 1:
            raise ValueError(f"checkpoint.num_to_keep must be >= 1, got {self.num_to_keep}")
        if self.max_failures < -1:
            raise ValueError(f"checkpoint.max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.max_preemption_failures < -1:
            raise ValueError(f"checkpoint.max_preemption_failures must be >= -1 (-1 = unlimited), got "
                             f"{self.max_preemption_failures}")
        if self.preemption_grace_s < 0:
            raise ValueError(f"checkpoint.preemption_grace_s must be >= 0, got {self.preemption_grace_s}")
        if self.preemption_check_every < 1:
            raise ValueError(f"checkpoint.preemption_check_every must be >= 1, got {self.preemption_check_every}")


@dataclass
class TrackingOptions:
    """MLflow: where, which experiment, and the registered model the job produces."""

    uri: str | None = None  # tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "deepfill"  # MLflow experiment name (may be a workspace path: /Users/me/deepfill)
    registered_model: str = "deepfill-v1"  # registry name of the final generator ("" = log, do not register)
    alias: str = "candidate"  # alias set on the registered version ("" = none)
    log_model: bool = True  # log the final generator as a pyfunc MLflow model
    grid_rows: int = 4  # validation samples shown in each picture grid
    parent_run_id: str = ""  # MLflow run this job's run is a child of (tag mlflow.parentRunId); deepfill sweep sets it
    tags: dict[str, str] = field(default_factory=dict)  # extra tags on the job's MLflow run (deepfill sweep: the arm)

    def __post_init__(self):
        check_name(self.experiment, "tracking.experiment", forbid="")
        if len(self.experiment) > 500:
            raise ValueError(f"tracking.experiment must be at most 500 characters, got {len(self.experiment)}")
        # MLflow refuses '/' and ':' in model names; '@' would break the models:/name@alias URI
        check_name(self.registered_model, "tracking.registered_model", allow_empty=True, forbid="/\\:@")
        if self.alias and (not re.fullmatch(r"[\w\-]+", self.alias) or self.alias.lower() == "latest"
                           or re.fullmatch(r"[vV]\d+", self.alias)):
            raise ValueError(f"tracking.alias must be letters, digits, '_' and '-' (not 'latest' or v<N>: "
                             f"MLflow reserves them), got {self.alias!r}")
        if self.alias and not self.registered_model:
            raise ValueError("tracking.alias needs tracking.registered_model")
        if self.grid_rows < 0:
            raise ValueError(f"tracking.grid_rows must be >= 0, got {self.grid_rows}")


@dataclass
class DebugOptions:
    """TEST-ONLY hooks. Leave at their defaults for real training."""

    step_delay_s: float = 0.0  # TEST ONLY: every rank sleeps this long after each step (to watch a job resize)

    def __post_init__(self):
        if self.step_delay_s < 0:
            raise ValueError(f"debug.step_delay_s must be >= 0, got {self.step_delay_s}")


@dataclass
class InitOptions:
    """Fine-tuning: a NEW job starts from these weights (at step 0, with fresh optimisers). A job that resumes
    from its own checkpoint (same checkpoint.storage_path and name) ignores them: it continues its run."""

    # the generator to start from: models:/name@alias, models:/name/N, runs:/<id>/model, a generator file or
    #    a checkpoint folder (local or s3://), e.g. what `deepfill import` registered or wrote; "" = random init
    generator: str = ""
    # the critics to start from: a critics file (deepfill import --critics-output), a training checkpoint or
    #    run folder, runs:/<id>/critics/critics.pt, or models:/... (the critics its import run logged); "" = random
    critics: str = ""

    def __post_init__(self):
        for name in ("generator", "critics"):
            value = getattr(self, name)
            if value != value.strip():
                raise ValueError(f"init.{name} must not start or end with whitespace, got {value!r}")
        if self.critics and not self.generator:
            raise ValueError("init.critics needs init.generator (trained critics against a random generator "
                             "would only slow it down)")


@dataclass
class TrainConfig:
    """One training job. Every key path here is a ``--set`` override and an MLflow param name."""

    name: str = "deepfill"  # Ray Train run name (folder under checkpoint.storage_path) and MLflow run name
    steps: int = 150_000  # generator steps in total (a resumed job continues up to this count)
    batch_size: int = 16  # images per worker per critic or generator step
    seed: int = 0  # seed of weight init and of the gradient-penalty draws, per (step, rank) (masks: masks.seed)
    log_every: int = 100  # report losses, images/s and data-wait share every this many steps
    val_every: int = 1000  # validate (hole L1, PSNR, picture grid) every this many steps; 0 = never
    model: ModelOptions = field(default_factory=ModelOptions)
    init: InitOptions = field(default_factory=InitOptions)
    data: DataConfig = field(default_factory=DataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimOptions = field(default_factory=OptimOptions)
    gan: GanOptions = field(default_factory=GanOptions)
    loss: LossOptions = field(default_factory=LossOptions)
    scaling: ScalingOptions = field(default_factory=ScalingOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    tracking: TrackingOptions = field(default_factory=TrackingOptions)
    debug: DebugOptions = field(default_factory=DebugOptions)

    def __post_init__(self):
        check_name(self.name, "name", forbid="/\\")  # a folder under checkpoint.storage_path
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
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
