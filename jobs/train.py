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

Before anything starts, the driver checks what the options alone cannot (a refusal is one line and exit
code 2 through ``deepfill train``):

- ``data.shards`` is given, its ``manifest.json`` reads, and it holds at least one batch per worker
  (``check_data``);
- the cluster can hold the workers AND the data pipeline (``check_cluster``, a pure function of the
  cluster's resources and the options): the workers reserve ``scaling.num_workers`` bundles of
  ``scaling.cpus_per_worker`` CPUs (+ GPUs, custom resources), placed by ``scaling.placement_strategy``,
  and Ray Data only gets what they leave, so the decode stage needs ``data.decode_cpus`` more CPUs (one per
  actor of a fixed ``data.decode_workers`` pool, else one). Without that, Ray Data's budget is 0 CPUs and
  the job waits forever with nothing printed. A cluster with an autoscaler is checked against the
  autoscaler's maximum (what it can grow to), one without against what it has now;
  ``scaling.check_resources=false`` skips the check.

While training, a worker that waits ``data.stall_timeout_s`` for a batch stops with a message
(``pipeline.datasets.watch_stream``) instead of waiting forever.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field

from jobs.options import ConfigError
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
    so at least two (or ``data.decode_cpus``) more than the workers reserve are declared (logical CPUs,
    shared by the OS).
    """
    from pipeline.cluster import connect

    want = math.ceil(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker) + max(2, cfg.data.decode_cpus)
    connect(num_cpus=max(os.cpu_count() or 1, want))


# ----------------------------------------------------------------------------------------- up-front checks

def check_data(cfg: TrainConfig) -> dict:
    """``data.shards`` names a prepared shard folder with at least one batch per worker; returns its
    manifest. Raises ConfigError naming the option."""
    from pipeline import storage
    from pipeline.shards import read_manifest

    shards = cfg.data.shards
    if not shards:
        raise ConfigError("missing option data.shards: the folder or s3:// URI of a `deepfill prepare` output "
                          "(--set data.shards=URI, or data.shards in the --config file)")
    try:
        manifest = read_manifest(shards, cfg.data.storage)
        count = int(manifest["counts"]["train"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        where = storage.redact(storage.join(shards, "manifest.json"))
        raise ConfigError(f"data.shards: cannot read {where} ({type(err).__name__}: {err}); "
                          f"is it a `deepfill prepare` output?") from None
    workers = max(cfg.scaling.max_workers, 1)
    if count < workers * cfg.batch_size:
        raise ConfigError(
            f"data.shards holds {count} training image(s), fewer than one batch per worker (batch_size="
            f"{cfg.batch_size} x {_workers_option(cfg)} = {workers * cfg.batch_size}): lower "
            f"batch_size or scaling.num_workers, or prepare more images")
    return manifest


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """The Ray resources each training worker reserves (its placement-group bundle)."""
    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.custom_resources}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


@dataclass
class ClusterResources:
    """What ``check_cluster`` sees of a Ray cluster."""

    nodes: list[dict[str, float]]  # logical resources of each alive node, now
    max_total: dict[str, float] | None = None  # the autoscaler's ceiling per resource; None: no autoscaler

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for key, amount in node.items():
                out[key] = out.get(key, 0.0) + float(amount)
        return out


def cluster_resources() -> ClusterResources:
    """The connected cluster's alive nodes, and its autoscaler's maximum if it has one (the cluster config
    an autoscaler publishes in the GCS: what Ray Train's own worker check reads)."""
    import ray

    nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
    try:
        from ray._private.state import state

        ceiling = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, the cluster counts as fixed
        ceiling = None
    return ClusterResources(nodes, {k: float(v) for k, v in ceiling.items()} if ceiling else None)


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {key}" for key, amount in resources.items())


def _placeable(bundle: dict[str, float], count: int, strategy: str, nodes: list[dict[str, float]]) -> bool:
    """Whether ``count`` bundles (positive amounts) fit on ``nodes`` under a placement strategy (PACK and
    SPREAD are soft: any spread of the bundles over the nodes will do)."""
    if count == 0 or not bundle:
        return True
    fits = [min(math.floor(node.get(k, 0.0) / a + 1e-9) for k, a in bundle.items()) for node in nodes]
    if strategy == "STRICT_PACK":
        return max(fits, default=0) >= count
    if strategy == "STRICT_SPREAD":
        return sum(f >= 1 for f in fits) >= count
    return sum(fits) >= count


def _workers_option(cfg: TrainConfig) -> str:
    """``scaling.num_workers=N``, or ``scaling.num_workers=[min, max]: at least min`` for an elastic job."""
    sc = cfg.scaling
    if sc.elastic:
        return f"scaling.num_workers=[{sc.min_workers}, {sc.max_workers}]"
    return f"scaling.num_workers={sc.num_workers}"


def _option(resource: str) -> str:
    """The per-worker option that reserves ``resource``."""
    return {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker"}.get(
        resource, f"scaling.custom_resources.{resource}")


def check_cluster(cfg: TrainConfig, cluster: ClusterResources) -> str | None:
    """Why ``cluster`` cannot hold this job's workers plus its data pipeline, or None when it can.

    Workers: ``scaling.num_workers`` bundles of ``worker_resources`` (none with ``num_workers=0``: the loop
    runs in the driver). Data: ``data.decode_cpus`` CPUs beyond the workers'. A cluster with an autoscaler
    is measured by its maximum (never less than what it has now), one without by its alive nodes, whose
    shapes must also take the bundles under ``scaling.placement_strategy``. (Not checked: CPUs left free
    in fragments too small for one decode task, e.g. 0.5 on each of two nodes.)
    """
    sc, data = cfg.scaling, cfg.data
    count = sc.min_workers  # an elastic job starts with min and grows: min is what the cluster must hold
    bundle = {k: a for k, a in worker_resources(cfg).items() if a > 0}
    workers = {k: count * a for k, a in bundle.items()} if count else {}
    need = {**workers, "CPU": workers.get("CPU", 0.0) + data.decode_cpus}
    now = cluster.total
    if cluster.max_total is not None:
        have = {k: max(cluster.max_total.get(k, 0.0), now.get(k, 0.0)) for k in need}
        has = "can grow to at most (its autoscaler's maximum)"
    else:
        have = {k: now.get(k, 0.0) for k in need}
        has = "has"
    per_worker = " + ".join(f"{_option(k)}={a:g}" for k, a in bundle.items())
    off = "scaling.check_resources=false skips this check (for resources that join by other means)"
    short = [k for k in need if need[k] > have[k] + 1e-9]
    if short:
        if data.decode_pool == "tasks":
            data_why = "data.decode_pool=tasks: one decode task at a time"
        elif data.decode_workers:
            data_why = f"data.decode_workers={data.decode_workers} decode actors of 1 CPU"
        else:
            data_why = "data.decode_workers=0: at least one decode actor of 1 CPU"
        reserve = (f"the {count} training worker(s) reserve {_amounts(workers)} ({_workers_option(cfg)} x "
                   f"{per_worker})" if workers else "the training loop runs in the driver")
        levers = ["scaling.num_workers"]
        levers += [_option(k) + (" (fractions work, e.g. 0.5)" if k == "CPU" else "") for k in short]
        if "CPU" in short and data.decode_pool == "actors" and data.decode_workers > 1:
            levers.append("data.decode_workers")
        if cluster.max_total is not None:
            grow = f"Let the autoscaler add more {' and '.join(short)} (its node types' max_workers)"
        else:
            grow = f"Add {' and '.join(short)} to the cluster{' (ray start --num-cpus=N)' if 'CPU' in short else ''}"
        return (f"the cluster cannot hold this job: it {has} {_amounts(have)}; {reserve}, and the data pipeline "
                f"needs {data.decode_cpus:g} CPU more ({data_why}): {_amounts(need)} in all. {grow}, "
                f"or lower {', '.join(levers)}; {off}")
    if cluster.max_total is None and not _placeable(bundle, count, sc.placement_strategy, cluster.nodes):
        nodes = "; ".join(_amounts({k: n.get(k, 0.0) for k in bundle}) for n in cluster.nodes)
        return (f"the cluster's nodes cannot take {count} training worker(s) of {_amounts(bundle)} each "
                f"(scaling.placement_strategy={sc.placement_strategy}): its nodes have {nodes}. Lower "
                f"{per_worker} or scaling.num_workers, or use scaling.placement_strategy=PACK; {off}")
    return None



def storage_uri(cfg: TrainConfig) -> str:
    """The run's folder: ``<checkpoint.storage_path>/<name>`` (an absolute local path or s3://...)."""
    from pipeline import storage

    base = cfg.checkpoint.storage_path
    if not storage.is_s3(base):
        base = os.path.abspath(os.path.expanduser(base.removeprefix("file://")))
    return storage.join(base, cfg.name)


def samples_per_step(cfg: TrainConfig, world_size: int) -> int:
    """Training samples one generator step takes from the stream: each of ``world_size`` workers takes
    ``gan.n_critic + 1`` batches of ``batch_size`` (the per-worker batch stays fixed when an elastic job
    resizes; ``optim.lr_scaling`` scales the learning rates instead)."""
    return max(world_size, 1) * cfg.batch_size * (cfg.gan.n_critic + 1)


@dataclass(frozen=True)
class StreamPosition:
    """Where a job is in its training stream: ``samples`` taken so far in all (``epoch``, ``rows`` into it)."""

    samples: int
    train_count: int

    @property
    def epoch(self) -> int:
        return self.samples // max(self.train_count, 1)

    @property
    def rows(self) -> int:
        return self.samples % max(self.train_count, 1)


def train_epochs(cfg: TrainConfig, position: StreamPosition, start_step: int = 0) -> int:
    """Passes over the training shards, from ``position.epoch`` on, that cover steps ``start_step .. steps``
    even if every step runs with ``scaling.max_workers`` workers."""
    remaining = max(cfg.steps - start_step, 1) * samples_per_step(cfg, cfg.scaling.max_workers) + position.rows
    return max(math.ceil(remaining / max(position.train_count, 1)), 1)


def checkpoint_record(cfg: TrainConfig, run_uri: str) -> dict | None:
    """The metrics reported with the newest checkpoint in Ray Train's own record of the run in ``run_uri``
    (``ray.train.Result.from_path``: the checkpoint ``ray.train.get_checkpoint()`` hands the workers), or
    None for a run without one."""
    import ray.train

    from pipeline import storage

    fs, path = storage.pyarrow_filesystem(run_uri, cfg.data.storage)
    try:
        result = ray.train.Result.from_path(path, storage_filesystem=fs)
    except RuntimeError:  # no run folder, or no checkpoint record in it yet: a new run
        return None
    return dict(result.metrics or {}) if result.checkpoint is not None else None


class TrainStream:
    """The training dataset as Ray Train builds it at each worker-group start (a dataset factory).

    ``resume_point()`` is (step, samples taken) of the newest checkpoint in Ray Train's own record of the
    run (``ray.train.Result.from_path``: the checkpoint ``ray.train.get_checkpoint()`` hands the workers),
    (0, 0) for a new run. The workers count the samples they take (``samples_seen``, saved with every
    checkpoint and reported with it), so the position does not depend on how many workers took them: a job
    that resumes at another size continues in the same epoch, after the shards already consumed
    (``pipeline.datasets.build_train_dataset``'s ``skip_rows``), repeating at most the rest of the one
    shard it stopped in and skipping none. A checkpoint from before ``samples_seen`` existed counts as
    ``step * samples_per_step(max_workers)``.
    """

    def __init__(self, cfg: TrainConfig, run_uri: str):
        self.cfg, self.run_uri = cfg, run_uri

    def resume_point(self) -> tuple[int, int]:
        metrics = checkpoint_record(self.cfg, self.run_uri)
        if metrics is None:
            return 0, 0
        step = int(metrics.get("step", 0))
        seen = metrics.get("samples_seen")
        return step, int(seen) if seen is not None else step * samples_per_step(self.cfg, self.cfg.scaling.max_workers)

    def resume_step(self) -> int:
        return self.resume_point()[0]

    def __call__(self):
        from pipeline.datasets import build_train_dataset
        from pipeline.shards import read_manifest

        cfg = self.cfg
        manifest = read_manifest(cfg.data.shards, cfg.data.storage)
        step, seen = self.resume_point()
        position = StreamPosition(seen, int(manifest["counts"]["train"]))
        log.info("training data from step %d: sample %d, epoch %d row %d", step, seen, position.epoch,
                 position.rows)
        return build_train_dataset(cfg.data, cfg.masks, epochs=train_epochs(cfg, position, step),
                                   start_epoch=position.epoch, skip_rows=position.rows,
                                   shard_rows=(manifest.get("shard_rows") or {}).get("train"))


def job_run_id(cfg: TrainConfig, tracking_uri: str, run_uri: str) -> str:
    """The job's one MLflow run, made by the driver before any worker starts, so that every worker group
    (the first, each elastic resize, each restart) logs into it even before the first checkpoint: the run
    of the newest checkpoint in Ray Train's record (``checkpoint_record``) for a job that continues, else a
    new run (``jobs.tracking.Tracker.create``)."""
    from jobs.options import flatten, to_dict
    from jobs.tracking import Tracker

    run_id = (checkpoint_record(cfg, run_uri) or {}).get("mlflow_run_id")
    if run_id:
        return str(run_id)
    tags = {"storage": run_uri, **cfg.tracking.tags}
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return Tracker.create(tracking_uri, cfg.tracking.experiment, cfg.name, flatten(to_dict(cfg)), tags=tags)


def end_run_if_running(tracking_uri: str, run_id: str, status: str) -> None:
    """Mark the job's MLflow run ``status`` unless a worker already ended it."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 - reporting the job's own error matters more
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, err)


def train(cfg: TrainConfig, *, dataset=None) -> TrainResult:
    """Run one training job on Ray Train and return where it ended.

    ``dataset`` replaces the training data built from ``data.shards`` (for tests and benchmarks): a Ray
    Dataset, or a function returning one, with the columns of ``pipeline.datasets.build_train_dataset``.
    Raises ConfigError, before any worker starts, when ``check_data`` or ``check_cluster`` refuses.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.options import to_dict
    from jobs.tracking import resolve_tracking_uri
    from jobs.trainer import train_loop_per_worker
    from pipeline import storage

    if dataset is None:
        check_data(cfg)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)  # refuses credentials (also from the environment) before Ray starts
    if cfg.init.generator or cfg.init.critics:  # weights to start from: refused up front when they cannot load
        from jobs.train_state import latest_checkpoint
        from jobs.trainer import check_init

        if latest_checkpoint(storage_uri(cfg), cfg.data.storage) is None:  # a resumed job ignores init.*
            check_init(cfg, tracking_uri)
    connect_ray(cfg)
    if cfg.scaling.check_resources:
        cluster = cluster_resources()
        problem = check_cluster(cfg, cluster)
        if problem:
            raise ConfigError(problem)
        if cluster.max_total is not None and check_cluster(cfg, ClusterResources(cluster.nodes)):
            log.info("the cluster has %s now, its autoscaler can grow to %s: the job waits for nodes",
                     _amounts(cluster.total), _amounts(cluster.max_total))
    if cfg.data.shards and not storage.is_s3(cfg.data.shards):  # Ray Train workers run in their own working directories
        local = os.path.abspath(os.path.expanduser(cfg.data.shards.removeprefix("file://")))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=local))
    run_uri = storage_uri(cfg)
    run_id = job_run_id(cfg, tracking_uri, run_uri)
    fs, path = storage.pyarrow_filesystem(cfg.checkpoint.storage_path, cfg.data.storage)
    resources = worker_resources(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "tracking_uri": tracking_uri, "storage_uri": run_uri,
                           "mlflow_run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.ray_num_workers(), use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources, placement_strategy=cfg.scaling.placement_strategy,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
        ),
        datasets={"train": dataset if dataset is not None else TrainStream(cfg, run_uri)},
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=fs if storage.is_s3(cfg.checkpoint.storage_path) else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.checkpoint.max_failures,
                max_preemption_failures=cfg.checkpoint.max_preemption_failures,
                preemption_grace_s=cfg.checkpoint.preemption_grace_s),
        ),
    )
    log.info("training %s: %d steps on %s worker(s), checkpoints in %s, MLflow run %s at %s", cfg.name,
             cfg.steps, "-".join(map(str, cfg.scaling.ray_num_workers())) if cfg.scaling.elastic
             else cfg.scaling.num_workers, storage.redact(run_uri), run_id, storage.redact(tracking_uri))
    try:
        result = trainer.fit()
    except BaseException:
        end_run_if_running(tracking_uri, run_id, "FAILED")  # a job that never got going leaves no RUNNING run
        raise
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
    """``deepfill train`` once its options are resolved (``jobs.cli``, which turns an up-front refusal,
    a ConfigError from ``train``, into one line and exit code 2)."""
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
