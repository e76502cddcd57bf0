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

    want = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker) + max(2, cfg.data.decode_cpus)
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
    workers = max(cfg.scaling.num_workers, 1)
    if count < workers * cfg.batch_size:
        raise ConfigError(
            f"data.shards holds {count} training image(s), fewer than one batch per worker (batch_size="
            f"{cfg.batch_size} x scaling.num_workers={workers} = {workers * cfg.batch_size}): lower "
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
    bundle = {k: a for k, a in worker_resources(cfg).items() if a > 0}
    workers = {k: sc.num_workers * a for k, a in bundle.items()} if sc.num_workers else {}
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
        reserve = (f"the {sc.num_workers} training worker(s) reserve {_amounts(workers)} (scaling.num_workers="
                   f"{sc.num_workers} x {per_worker})" if workers else "the training loop runs in the driver")
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
    if cluster.max_total is None and not _placeable(bundle, sc.num_workers, sc.placement_strategy, cluster.nodes):
        nodes = "; ".join(_amounts({k: n.get(k, 0.0) for k in bundle}) for n in cluster.nodes)
        return (f"the cluster's nodes cannot take {sc.num_workers} training worker(s) of {_amounts(bundle)} each "
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
    fs, path = storage.pyarrow_filesystem(cfg.checkpoint.storage_path, cfg.data.storage)
    resources = worker_resources(cfg)
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
