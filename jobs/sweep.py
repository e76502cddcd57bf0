"""``deepfill sweep``: a grid of training arms, trained at once where the cluster holds them, then compared.

    deepfill sweep --config configs/ablations/base.yaml \\
        --grid gan.loss=wgan_gp,dcgan,lsgan --grid model.attention=contextual,none \\
        --images demo_output/images/held_out [--set key.path=value ...] [--steps N] [--max-concurrent K]

The options are those of ``deepfill train`` (``--config``, ``--set``, ``--steps``: the base every arm starts
from) plus the sweep's own (``SweepOptions``). Each ``--grid KEY=V1,V2,...`` is one axis (repeating the flag
needs ``jobs.options`` to collect every occurrence of a list flag; several axes also fit in one flag:
``KEY=V1,V2,KEY2=W1,W2``: a part with ``KEY=`` starts the next axis, so values cannot hold commas); the
arms are the cross product, first axis outermost, each the base plus ``--set KEY=V`` for its values. An arm
is named by its values (``gan.loss=dcgan,model.attention=none``, the ``deepfill.arm`` tag) and trains as
its own job: its own ``name`` (``<name>-<values>``, also its MLflow run name), its own
checkpoint folder under ``<checkpoint.storage_path>/<name>-<sweep id>/``, its own MLflow run, registered as a
version of ``tracking.registered_model`` (or of ``<name>`` when that is empty; no alias: the arms are compared,
not promoted). The keys the sweep sets for every arm cannot be grid axes: name, checkpoint.storage_path and
tracking.{uri, experiment, registered_model, alias, parent_run_id, tags}.

MLflow: one parent run (``deepfill.job=sweep``, experiment ``tracking.experiment``) with the base config and
the grid as params; each arm's run is its child (tag ``mlflow.parentRunId``, plus ``deepfill.job=sweep-arm``,
``deepfill.arm``, ``deepfill.arm_index``, ``deepfill.sweep_run_id``, ``deepfill.checkpoint``: given to the
training job as ``tracking.parent_run_id`` / ``tracking.tags`` where ``TrackingOptions`` has them, so the run
is a child from its start, and set again on the run when the arm ends); each arm's model
version carries ``deepfill.arm``, ``deepfill.arm_index`` and ``deepfill.sweep_run_id``. The parent gets the
sweep's wall time and the sum of the arms' own wall times (``train_wall_s``, ``arms_wall_s_sum``, their
ratio ``concurrency``), which are also printed, so the gain of training arms at once is visible.

Concurrently: with Ray Tune, one trial per arm, each trial the driver of its arm's Ray Train run. This is
what Ray documents for Train V2 ("Hyperparameter Tuning with Ray Tune", Train V2 user guide: the Tune trial
function builds a ``TorchTrainer`` and calls ``fit``; ``TuneConfig(max_concurrent_trials)`` limits the
Train runs in flight, because a Train run only starts once all its workers' resources can be had at once,
and trials beyond what the cluster holds would only wait). The older ``Tuner(trainer)`` form is deprecated
in V2, and plain threads around ``train()`` would re-implement what Tune gives: a bounded queue of trials,
placement on the cluster, per-trial failure and result records. Each trial reserves only ``TRIAL_CPUS``
(it is a driver that waits on its Train run; Ray's guide notes the default of 1 CPU per trial). How many
arms train at once is the smallest of ``--max-concurrent`` (0 = no limit), the number of arms, and how many
arms' workers plus data pipelines (``jobs.train.check_cluster``'s accounting, with the largest arm's
``scaling.num_workers``) fit in the cluster, or in what its autoscaler can grow to.

One after another (in this process, no Tune): when that number is 1 (a laptop, ``--max-concurrent 1``), and
always with ``scaling.num_workers=0``: Ray Train then runs the loop in the calling process (its local mode),
which refuses to report inside a Tune trial. A failed arm does not stop the others: the sweep evaluates the
arms that finished, then exits with code 1 naming the failed ones.

Then the comparison (``jobs.evaluate`` with ``--sweep <parent run id>``): every finished arm on the same
held-out ``--images`` and masks (``--mask-preset``, default ``masks.kind``; ``--eval-size``, default
``data.crop_size``), with Telea and Navier-Stokes, into ``--output`` (default ``<sweep folder>/report``):
report.md, report.html, metrics.json/csv, grid.png, curves/*.png; logged as an evaluate run (experiment
``--eval-experiment``) tagged with the sweep, and report.md/.html also under the parent's ``report/``.
``--no-report`` skips it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

from jobs.options import ConfigError
from jobs.train_config import TrainConfig

log = logging.getLogger(__name__)

CONFIG_HELP = "the base training config every arm starts from, e.g. configs/ablations/base.yaml"
TRIAL_CPUS = 0.01  # what each Tune trial (the driver of one arm's Ray Train run) reserves
SWEEP_KEYS = ("name", "checkpoint.storage_path", "tracking.uri", "tracking.experiment", "tracking.registered_model",
              "tracking.alias", "tracking.parent_run_id", "tracking.tags")  # set by the sweep for every arm: not axes
_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_PLACEHOLDER_RUN = "0" * 32  # stands in for the parent run id while the options are checked
ARM_RECORD = ("step", "checkpoint", "mlflow_run_id", "wall_s", "started_at", "ended_at")  # what run_arm returns


@dataclass
class SweepOptions(TrainConfig):
    """``deepfill sweep``: the options of ``deepfill train`` (the base every arm starts from), and these."""

    # one axis of the grid, KEY=V1,V2,... (a training option and its values; more axes: more --grid flags,
    #    or KEY=V1,V2,KEY2=W1,W2 in one); the arms are the cross product
    grid: list[str] = field(default_factory=list)
    max_concurrent: int = 0  # arms trained at once at most (0 = as many as the cluster holds; 1 = one after another)
    report: bool = True  # evaluate the arms and write the comparison report when they are trained
    images: str = ""  # the held-out images of the report: folder, file:// or s3:// prefix (needed with --report)
    mask_preset: str = ""  # the report's masks (pipeline.masks presets); default masks.kind
    eval_size: int | None = None  # the report's image size in pixels; default data.crop_size
    eval_seed: int = 0  # the report's mask seed
    max_images: int | None = None  # evaluate only the first N held-out images (sorted keys); default all
    output: str = ""  # folder or s3:// prefix of the report; default <checkpoint.storage_path>/<name>-<sweep id>/report
    bootstrap: int = 1000  # bootstrap resamples for the report's 95% intervals (0 = none)
    eval_experiment: str = "deepfill-evaluate"  # MLflow experiment of the report's evaluate run

    def __post_init__(self):
        super().__post_init__()
        if self.max_concurrent < 0:
            raise ValueError(f"max_concurrent must be >= 0 (0 = as many as the cluster holds), "
                             f"got {self.max_concurrent}")
        axes = parse_grid(self.grid)
        self.grid = [f"{key}={','.join(values)}" for key, values in axes]  # one item per axis (--print-config)
        arms = grid_arms(axes)
        for arm in arms:  # unknown keys and bad values are refused now, naming the arm
            arm_config(self, arm, parent_run_id=_PLACEHOLDER_RUN, tracking_uri="sqlite:///check.db")
        if self.report:
            if not self.images.strip():
                raise ValueError("images must name the held-out images of the report (--images FOLDER), "
                                 "or --no-report")
            eval_options(self, _PLACEHOLDER_RUN, "sqlite:///check.db")


@dataclass
class Arm:
    """One point of the grid."""

    index: int
    values: dict[str, str]  # key path -> value text, in axis order

    @property
    def label(self) -> str:
        """``gan.loss=dcgan,model.attention=none``: the ``deepfill.arm`` tag and the report's row."""
        return ",".join(f"{k}={v}" for k, v in self.values.items())

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.values.items()]


Options = SweepOptions  # what `deepfill sweep` reads (jobs.cli)


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["gan.loss=wgan_gp,dcgan", "model.attention=contextual,none"]`` -> [(key, values), ...] in order.

    Each item is split on commas; a part ``KEY=VALUE`` (KEY a dotted name) starts an axis, a part without
    ``=`` is one more value of the axis before it. Raises ValueError naming the problem: no axis, a value
    before any KEY=, an empty value, a key given twice, a value given twice."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            key, sep, value = part.partition("=")
            if sep and _KEY.fullmatch(key.strip()):
                axes.append((key.strip(), [value.strip()]))
            elif axes:
                axes[-1][1].append(part)
            else:
                raise ValueError(f"grid: {item!r} must start with KEY=VALUE (a training option, e.g. "
                                 f"--grid gan.loss=wgan_gp,dcgan)")
    if not axes:
        raise ValueError("grid must give at least one axis: --grid KEY=V1,V2,... (e.g. --grid gan.loss=wgan_gp,dcgan)")
    seen = set()
    for key, values in axes:
        if key in seen:
            raise ValueError(f"grid: {key} is given twice; give all its values in one --grid {key}=V1,V2,...")
        seen.add(key)
        if key in SWEEP_KEYS:
            raise ValueError(f"grid: {key} is set by the sweep for every arm and cannot be an axis")
        if any(not v for v in values):
            raise ValueError(f"grid: {key} has an empty value: {','.join(values)!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"grid: {key} lists a value twice: {','.join(values)!r}")
    return axes


def grid_arms(axes: list[tuple[str, list[str]]]) -> list[Arm]:
    """The cross product of the axes, first axis outermost, as numbered arms."""
    keys = [k for k, _ in axes]
    return [Arm(i, dict(zip(keys, combo))) for i, combo in enumerate(itertools.product(*(v for _, v in axes)))]


def _train_dict(opts: SweepOptions) -> dict:
    """The training part of the options (what ``TrainConfig`` declares) as a plain mapping."""
    from jobs.options import to_dict

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in to_dict(opts).items() if k in names}


def _absolute(path: str) -> str:
    """A local path made absolute (Tune runs each trial in its own working directory); URIs unchanged."""
    from pipeline import storage

    if not path or storage.is_s3(path) or ("://" in path and not path.startswith("file://")):
        return path
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def sweep_root(opts: SweepOptions, parent_run_id: str) -> str:
    """The sweep's folder: ``<checkpoint.storage_path>/<name>-<first 8 characters of the parent run id>``."""
    from pipeline import storage

    return storage.join(_absolute(opts.checkpoint.storage_path), f"{opts.name}-{parent_run_id[:8]}")


def registered_model(opts: SweepOptions) -> str:
    """The registered model the arms become versions of ("" when ``tracking.log_model`` is off)."""
    return (opts.tracking.registered_model or opts.name) if opts.tracking.log_model else ""


def arm_name(opts: SweepOptions, arm: Arm) -> str:
    """``<name>-<values>``, e.g. ``ablation-gan.loss-dcgan_model.attention-none``: the arm's ``name``."""
    from jobs.evaluate import slug

    return f"{opts.name}-{slug(arm.label)}"


def arm_config(opts: SweepOptions, arm: Arm, *, parent_run_id: str, tracking_uri: str) -> TrainConfig:
    """The arm's training job: the base, its grid values, then what the sweep sets (name, checkpoint folder,
    tracking URI, registered model, no alias; the parent run and the arm's tags where ``TrackingOptions``
    takes them). Raises ConfigError naming the arm for an unknown key or a bad value."""
    from jobs.options import apply_overrides, from_dict, set_path

    try:
        data = apply_overrides(_train_dict(opts), arm.overrides, TrainConfig)
    except ConfigError as err:
        raise ConfigError(f"grid arm {arm.label}: {err}") from None
    fixed = {"name": arm_name(opts, arm), "checkpoint.storage_path": sweep_root(opts, parent_run_id),
             "data.shards": _absolute(data["data"]["shards"]), "tracking.uri": tracking_uri,
             "tracking.registered_model": registered_model(opts), "tracking.alias": ""}
    tracking_fields = {f.name for f in dataclasses.fields(type(opts.tracking))}
    if "parent_run_id" in tracking_fields:  # the arm's run is made a child of the sweep's when it is created
        fixed["tracking.parent_run_id"] = parent_run_id
    if "tags" in tracking_fields:
        fixed["tracking.tags"] = {**opts.tracking.tags, **arm_tags(arm, parent_run_id)}
    for key, value in fixed.items():
        set_path(data, key.split("."), value, TrainConfig)
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as err:
        raise ConfigError(f"grid arm {arm.label}: {err}") from None


def arm_tags(arm: Arm, parent_run_id: str) -> dict[str, str]:
    """The tags that make an arm's MLflow run a child of the sweep's and name its arm."""
    return {"mlflow.parentRunId": parent_run_id, "deepfill.job": "sweep-arm", "deepfill.arm": arm.label,
            "deepfill.arm_index": str(arm.index), "deepfill.sweep_run_id": parent_run_id}


def eval_options(opts: SweepOptions, parent_run_id: str, tracking_uri: str):
    """The report's ``jobs.evaluate.EvaluateOptions`` (``--sweep`` = the parent run)."""
    from jobs.evaluate import EvaluateOptions
    from pipeline import storage

    try:
        return EvaluateOptions(
            images=opts.images, mask_preset=opts.mask_preset or opts.masks.kind,
            output=opts.output or storage.join(sweep_root(opts, parent_run_id), "report"), sweep=parent_run_id,
            seed=opts.eval_seed, max_images=opts.max_images, size=opts.eval_size or opts.data.crop_size,
            bootstrap=opts.bootstrap, experiment=opts.eval_experiment, tracking_uri=tracking_uri)
    except ValueError as err:
        raise ConfigError(f"report: {err}") from None


# ----------------------------------------------------------------------------------------- how many at once

def arm_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one arm holds while it trains: its workers' bundles (``scaling.num_workers``, the maximum of an
    elastic range), the data pipeline's CPUs (``data.decode_cpus``) and its Tune trial (``TRIAL_CPUS``)."""
    from jobs.train import worker_resources

    workers = cfg.scaling.max_workers
    need = {k: workers * a for k, a in worker_resources(cfg).items() if a > 0}
    need["CPU"] = need.get("CPU", 0.0) + cfg.data.decode_cpus + TRIAL_CPUS
    return need


def arms_at_once(configs: list[TrainConfig], cluster, max_concurrent: int = 0) -> tuple[int, str]:
    """How many arms to train at once, and why: the smallest of ``max_concurrent`` (0 = no limit), the
    number of arms and how many of the largest arm's ``arm_resources`` fit in ``cluster`` (a
    ``jobs.train.ClusterResources``: its autoscaler's maximum when it has one, else what it has). 1 with
    ``scaling.num_workers=0`` (the loop runs in this process)."""
    from jobs.train import _amounts

    if len(configs) <= 1:
        return 1, "one arm"
    if max_concurrent == 1:
        return 1, "--max-concurrent 1"
    if any(c.scaling.max_workers == 0 for c in configs):
        return 1, ("scaling.num_workers=0 runs each arm's loop in this process (Ray Train's local mode), "
                   "which cannot run inside a Tune trial")
    need: dict[str, float] = {}
    for cfg in configs:
        for k, amount in arm_resources(cfg).items():
            need[k] = max(need.get(k, 0.0), amount)
    now = cluster.total
    have = ({k: max(cluster.max_total.get(k, 0.0), now.get(k, 0.0)) for k in need}
            if cluster.max_total is not None else {k: now.get(k, 0.0) for k in need})
    fit = min(math.floor(have[k] / need[k] + 1e-9) for k in need if need[k] > 0)
    count = max(1, min(fit, len(configs), max_concurrent or len(configs)))
    why = f"the cluster ({_amounts(have)}) holds {fit} arm(s) of {_amounts(need)} at once"
    if max_concurrent and max_concurrent < fit:
        why += f"; --max-concurrent {max_concurrent}"
    return count, why


# ----------------------------------------------------------------------------------------- training the arms

def run_arm(config: dict) -> dict:
    """Train one arm (``jobs.train.train`` on its resolved config mapping); returns what the sweep records:
    step, checkpoint, mlflow_run_id, wall_s (the arm's own wall time), started_at and ended_at (epoch
    seconds). Runs in a Tune trial or in the sweep's process."""
    from jobs.options import from_dict
    from jobs.train import train

    cfg = from_dict(TrainConfig, config)
    started_at, started = time.time(), time.perf_counter()
    result = train(cfg)
    return {"step": result.step, "checkpoint": result.checkpoint or "", "mlflow_run_id": result.mlflow_run_id or "",
            "wall_s": time.perf_counter() - started, "started_at": started_at, "ended_at": time.time()}


def _tune_trial(config: dict, arms: list[dict]) -> None:
    """A Tune trial: the driver of arm ``config["arm"]``'s Ray Train run; reports ``run_arm``'s record once."""
    import ray.tune

    ray.tune.report({**run_arm(arms[config["arm"]]), "arm": config["arm"]})


def _error_line(err: BaseException) -> str:
    from pipeline.storage import redact

    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return redact(f"{type(err).__name__}: {lines[-1] if lines else ''}")


def train_on_tune(configs: list[dict], at_once: int, root: str, storage_options=None) -> list[dict]:
    """Every arm as a Tune trial (at most ``at_once`` in flight), Tune's records under ``<root>/tune``;
    returns one record per arm, in order: ``run_arm``'s, or {"error": one line} for a failed trial."""
    import ray.tune

    from pipeline import storage

    fs, path = storage.pyarrow_filesystem(root, storage_options)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_tune_trial, arms=configs), {"cpu": TRIAL_CPUS})
    tuner = ray.tune.Tuner(
        trainable,
        param_space={"arm": ray.tune.grid_search(list(range(len(configs))))},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=at_once),
        run_config=ray.tune.RunConfig(name="tune", storage_path=path,
                                      storage_filesystem=fs if storage.is_s3(root) else None, verbose=1),
    )
    records: list[dict] = [{"error": "the trial did not report"} for _ in configs]
    for result in tuner.fit():
        index = int(result.config["arm"])
        if result.error is not None:
            records[index] = {"error": _error_line(result.error)}
        else:
            records[index] = {k: result.metrics[k] for k in ARM_RECORD}
    return records


def train_in_turn(configs: list[dict]) -> list[dict]:
    """Every arm in this process, one after another; a failed arm is recorded and the next one starts."""
    records = []
    for i, config in enumerate(configs):
        log.info("arm %d/%d: %s", i + 1, len(configs), config["name"])
        try:
            records.append(run_arm(config))
        except Exception as err:  # noqa: BLE001 - one arm's failure is the sweep's record, not its end
            log.error("arm %s failed: %s", config["name"], _error_line(err))
            records.append({"error": _error_line(err)})
    return records


# ----------------------------------------------------------------------------------------- the sweep

def _arm_run_id(client, experiment_id: str, record: dict, cfg: TrainConfig) -> str | None:
    """The arm's MLflow run: the one ``train`` returned, else (a failed arm) the run tagged with its
    checkpoint folder (``storage``, as the training job tags it)."""
    from jobs.train import storage_uri

    if record.get("mlflow_run_id"):
        return record["mlflow_run_id"]
    where = storage_uri(cfg)
    if "'" in where:  # not expressible in an MLflow filter string
        return None
    runs = client.search_runs([experiment_id], filter_string=f"tags.storage = '{where}'", max_results=1)
    return runs[0].info.run_id if runs else None


def _link_arm(client, parent_run_id: str, arm: Arm, run_id: str, record: dict) -> str | None:
    """Tag the arm's run as the parent's child and its model version with the arm; returns the version."""
    tags = {**arm_tags(arm, parent_run_id), "deepfill.checkpoint": record.get("checkpoint", "")}
    for key, value in tags.items():
        if value:
            client.set_tag(run_id, key, value)
    if "wall_s" in record:
        client.log_metric(run_id, "arm_wall_s", float(record["wall_s"]))
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    for mv in versions:
        for key in ("deepfill.arm", "deepfill.arm_index", "deepfill.sweep_run_id"):
            client.set_model_version_tag(mv.name, mv.version, key, tags[key])
    return str(max(int(v.version) for v in versions)) if versions else None


def sweep(opts: SweepOptions) -> dict:
    """Run the sweep (see the module docstring); returns its summary: parent_run_id, arms (label, name,
    step, wall_s, mlflow_run_id, model_version or error), at_once, the wall times, report (the evaluate
    result, or None). Raises ConfigError, before anything trains, when an arm's data or the cluster refuses."""
    import mlflow

    from jobs.options import flatten, to_dict
    from jobs.tracking import MAX_PARAM_CHARS, resolve_tracking_uri
    from jobs.train import check_cluster, check_data, cluster_resources, connect_ray
    from pipeline.storage import redact

    started = time.perf_counter()
    arms = grid_arms(parse_grid(opts.grid))
    tracking_uri = resolve_tracking_uri(opts.tracking.uri)
    checks = [arm_config(opts, arm, parent_run_id=_PLACEHOLDER_RUN, tracking_uri=tracking_uri) for arm in arms]
    for shards in sorted({c.data.shards for c in checks}):
        check_data(next(c for c in checks if c.data.shards == shards))
    connect_ray(max(checks, key=lambda c: arm_resources(c)["CPU"]))
    cluster = cluster_resources()
    for cfg in checks:
        problem = check_cluster(cfg, cluster) if cfg.scaling.check_resources else None
        if problem:
            raise ConfigError(f"grid arm {cfg.name}: {problem}")
    at_once, why = arms_at_once(checks, cluster, opts.max_concurrent)

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(opts.tracking.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(opts.tracking.experiment)
    axes = parse_grid(opts.grid)
    parent = client.create_run(experiment_id, run_name=f"{opts.name}-sweep", tags={
        "deepfill.job": "sweep", "deepfill.grid": " x ".join(f"{k}={','.join(v)}" for k, v in axes)[:5000],
        "deepfill.arms": str(len(arms))})
    parent_id = parent.info.run_id
    status = "FAILED"
    try:
        params = {k: redact(str(v))[:MAX_PARAM_CHARS] for k, v in flatten(to_dict(opts)).items()}
        params.update({"sweep.arms": str(len(arms)), "sweep.at_once": str(at_once)})
        items = sorted(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(parent_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
        model_name = registered_model(opts)
        if model_name:  # made once here, so that arms registering at once do not race to create it
            try:
                client.get_registered_model(model_name)
            except mlflow.exceptions.MlflowException:
                client.create_registered_model(model_name)
        configs = [arm_config(opts, arm, parent_run_id=parent_id, tracking_uri=tracking_uri) for arm in arms]
        root = sweep_root(opts, parent_id)
        print(f"sweep {opts.name}: {len(arms)} arm(s), {at_once} at a time ({why}); MLflow parent run {parent_id}; "
              f"checkpoints in {redact(root)}", flush=True)
        train_started = time.perf_counter()
        dicts = [to_dict(c) for c in configs]
        if at_once > 1:
            records = train_on_tune(dicts, at_once, root, opts.data.storage)
        else:
            records = train_in_turn(dicts)
        train_wall = time.perf_counter() - train_started

        summary_arms = []
        for arm, cfg, record in zip(arms, configs, records):
            entry = {"label": arm.label, "name": cfg.name, **record}
            run_id = _arm_run_id(client, experiment_id, record, cfg)
            if run_id:
                entry["mlflow_run_id"] = run_id
                version = _link_arm(client, parent_id, arm, run_id, record)
                if version:
                    entry["model_version"] = version
            summary_arms.append(entry)
        arms_wall = sum(float(a.get("wall_s", 0.0)) for a in summary_arms)
        failed = [a for a in summary_arms if "error" in a]
        gain = arms_wall / train_wall if train_wall > 0 else math.nan
        print(f"sweep {opts.name}: {len(arms)} arm(s) trained in {train_wall:.1f} s wall, {at_once} at a time; "
              f"the arms' own wall times add up to {arms_wall:.1f} s ({gain:.2f}x)"
              + (f"; {len(failed)} failed" if failed else ""), flush=True)
        client.log_batch(parent_id, metrics=[
            mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
            for k, v in {"train_wall_s": train_wall, "arms_wall_s_sum": arms_wall, "concurrency": gain,
                         "arms_at_once": at_once, "arms_failed": len(failed)}.items() if math.isfinite(v)])
        summary = {"parent_run_id": parent_id, "experiment_id": experiment_id, "root": root, "arms": summary_arms,
                   "at_once": at_once, "train_wall_s": train_wall, "arms_wall_s_sum": arms_wall, "report": None}
        if opts.report and len(failed) < len(arms):
            summary["report"] = _report(opts, client, parent_id, tracking_uri)
        summary["sweep_wall_s"] = time.perf_counter() - started
        client.log_metric(parent_id, "sweep_wall_s", summary["sweep_wall_s"])
        status = "FINISHED" if not failed else "FAILED"
        return summary
    finally:
        client.set_terminated(parent_id, status)


def _report(opts: SweepOptions, client, parent_id: str, tracking_uri: str) -> dict:
    """The comparison of the finished arms (``jobs.evaluate``), linked to the parent run."""
    import tempfile

    from jobs.evaluate import evaluate
    from pipeline import storage

    eopts = eval_options(opts, parent_id, tracking_uri)
    started = time.perf_counter()
    result = evaluate(eopts)
    client.log_metric(parent_id, "eval_wall_s", time.perf_counter() - started)
    client.set_tag(parent_id, "deepfill.report", storage.redact(eopts.output))
    if result.get("mlflow_run_id"):
        client.set_tag(parent_id, "deepfill.evaluate_run_id", result["mlflow_run_id"])
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("report.md", "report.html", "metrics.csv"):
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(storage.read_bytes(storage.join(eopts.output, name)))
            client.log_artifact(parent_id, path, artifact_path="report")
    result["output"] = eopts.output
    return result


def run(opts: SweepOptions) -> int:
    """``deepfill sweep`` once its options are resolved (``jobs.cli``): prints a table of the arms and where
    the report is; exit code 1 when an arm failed."""
    from pipeline.storage import redact

    summary = sweep(opts)
    width = max(len(a["label"]) for a in summary["arms"])
    print(f"\n{'arm':<{width}}  {'step':>6}  {'wall s':>7}  {'version':>7}  MLflow run / error")
    for a in summary["arms"]:
        print(f"{a['label']:<{width}}  {a.get('step', '-'):>6}  {a.get('wall_s', math.nan):>7.1f}  "
              f"{a.get('model_version', '-'):>7}  {a.get('error') or a.get('mlflow_run_id', '')}")
    if summary["report"] is not None:
        print(f"\nreport: {redact(summary['report']['output'])}/report.html (and report.md)")
    print(f"sweep wall time {summary['sweep_wall_s']:.1f} s; MLflow parent run {summary['parent_run_id']}")
    failed = [a for a in summary["arms"] if "error" in a]
    if failed:
        print(f"deepfill sweep: {len(failed)} of {len(summary['arms'])} arm(s) failed: "
              + "; ".join(f"{a['label']}: {a['error']}" for a in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
