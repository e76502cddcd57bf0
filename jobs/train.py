"""``deepfill train``: DeepFill v1 (WGAN-GP) on Ray Train with DDP, checkpointed, resumable, tracked in MLflow.

    deepfill train --config configs/places2.yaml --steps 1000 --set scaling.num_workers=4
    python -m jobs.train --config configs/tiny.yaml

The job in three files: ``jobs.train_config`` (the options), ``jobs.train_state`` (what a checkpoint holds
and how it is named), ``jobs.trainer`` (the worker loop and its hooks). This module is the driver: it
connects to the Ray cluster named by RAY_ADDRESS (or starts a local one) and runs a ``TorchTrainer`` whose
workers run ``jobs.trainer.train_loop_per_worker``.

Resuming: a worker group resumes from ``ray.train.get_checkpoint()`` — after a worker failure, or when the
job is started again with the same ``checkpoint.storage_path`` and ``name``. The training data is a
``TrainStream``, which Ray Train calls each time it starts a worker group: it asks Ray Train's own record of
the run (``ray.train.Result.from_path``) for the step of the checkpoint the workers will resume from, and
starts the data at that step's epoch, so a resumed job draws its own epochs' crops and masks, not epoch 0's
again. The driver itself reads no checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from jobs.train_config import TrainConfig

log = logging.getLogger(__name__)

Options = TrainConfig  # what `deepfill train` reads (jobs.cli)
CONFIG_HELP = "YAML config file, e.g. configs/places2.yaml (default: built-in defaults)"


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


def batches_per_pass(cfg: TrainConfig, train_count: int) -> int:
    """Full per-worker batches in one pass over ``train_count`` training images."""
    return max(train_count // max(cfg.scaling.num_workers, 1) // cfg.batch_size, 1)


def train_epochs(cfg: TrainConfig, train_count: int, start_step: int = 0) -> int:
    """Passes over the training shards that cover steps ``start_step .. steps``."""
    remaining = max(cfg.steps - start_step, 1)
    return max(math.ceil(remaining * (cfg.gan.n_critic + 1) / batches_per_pass(cfg, train_count)), 1)


def start_epoch(cfg: TrainConfig, train_count: int, start_step: int) -> int:
    """The epoch a job that resumes at ``start_step`` is in."""
    return start_step * (cfg.gan.n_critic + 1) // batches_per_pass(cfg, train_count)


class TrainStream:
    """The training dataset as Ray Train builds it at each worker-group start (a dataset factory).

    ``resume_step()`` is the step of the newest checkpoint in Ray Train's own record of the run
    (``ray.train.Result.from_path``: the checkpoint ``ray.train.get_checkpoint()`` hands the workers), 0
    for a new run; the dataset covers the epochs from that step's to the last step's
    (``pipeline.datasets.build_train_dataset``).
    """

    def __init__(self, cfg: TrainConfig, run_uri: str):
        self.cfg, self.run_uri = cfg, run_uri

    def resume_step(self) -> int:
        import ray.train

        from pipeline import storage

        fs, path = storage.pyarrow_filesystem(self.run_uri, self.cfg.data.storage)
        try:
            result = ray.train.Result.from_path(path, storage_filesystem=fs)
        except RuntimeError:  # no run folder, or no checkpoint record in it yet: a new run
            return 0
        return int((result.metrics or {}).get("step", 0)) if result.checkpoint is not None else 0

    def __call__(self):
        from pipeline.datasets import build_train_dataset
        from pipeline.shards import read_manifest

        cfg = self.cfg
        count = int(read_manifest(cfg.data.shards, cfg.data.storage)["counts"]["train"])
        step = self.resume_step()
        log.info("training data from step %d (epoch %d)", step, start_epoch(cfg, count, step))
        return build_train_dataset(cfg.data, cfg.masks, epochs=train_epochs(cfg, count, step),
                                   start_epoch=start_epoch(cfg, count, step))


def train(cfg: TrainConfig, *, dataset=None) -> TrainResult:
    """Run one training job on Ray Train and return where it ended.

    ``dataset`` replaces the training data built from ``data.shards`` (for tests and benchmarks): a Ray
    Dataset, or a function returning one, with the columns of ``pipeline.datasets.build_train_dataset``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.options import to_dict
    from jobs.tracking import resolve_tracking_uri
    from jobs.trainer import train_loop_per_worker
    from pipeline import storage

    connect_ray(cfg)
    if cfg.data.shards and not storage.is_s3(cfg.data.shards):  # Ray Train workers run in their own working directories
        local = os.path.abspath(os.path.expanduser(cfg.data.shards.removeprefix("file://")))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=local))
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    run_uri = storage_uri(cfg)
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
        datasets={"train": dataset if dataset is not None else TrainStream(cfg, run_uri)},
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


def run(cfg: TrainConfig) -> int:
    """``deepfill train`` once its options are resolved (``jobs.cli``)."""
    from pipeline.storage import redact

    result = train(cfg)
    print(f"trained to step {result.step}; last checkpoint {redact(str(result.checkpoint))}; "
          f"MLflow run {result.mlflow_run_id} at {redact(result.tracking_uri)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
