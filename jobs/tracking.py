"""MLflow tracking of a training job: the one module that talks to MLflow during training.

Only rank 0 of the Ray Train worker group creates a ``Tracker``. One training job is one MLflow run: the run
id travels in every checkpoint, so a worker group restarted after a failure, or a job started again on the
same storage path and name, resumes the same run and keeps logging at the right step.

The tracking URI is resolved on the driver (``resolve_tracking_uri``) and passed to the workers, because
Ray worker processes do not share the driver's working directory or its later environment changes.

What is logged:
- params: the flattened config (``gan.gp_weight``: the same key paths as ``--set``), values passed through
  ``pipeline.storage.redact``; the config never holds S3 keys in the first place (the CLI refuses URIs
  carrying credentials); the run name, the experiment name and every tag (keys and values) are redacted too;
- metrics: losses, images/s, data-wait share, validation hole L1 / PSNR, at the generator step;
- artifacts: a picture grid every validation (masked input | coarse | refined | ground truth | attention);
- at the end, the generator as a pyfunc model (``jobs.serving.log_inpaint_model``), registered under a name
  with an alias such as ``candidate``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_DB = "mlflow.db"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def resolve_tracking_uri(configured: str | None = None, cwd: str | Path | None = None) -> str:
    """The tracking URI for a job: ``tracking.uri`` if set, else MLFLOW_TRACKING_URI, else a SQLite file.

    The default is ``sqlite:///<absolute cwd>/mlflow.db`` (absolute so that Ray workers, whose working
    directory differs from the driver's, write to the same database). A URI carrying credentials
    (``https://user:pw@host``) is refused: they go in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
    """
    from pipeline.storage import check_no_credentials

    if configured:
        check_no_credentials(configured, "tracking.uri")
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        check_no_credentials(env, "MLFLOW_TRACKING_URI")
        return env
    folder = Path(cwd or os.getcwd()).resolve()
    return f"sqlite:///{folder / DEFAULT_DB}"


def _param_value(value: Any) -> str:
    from pipeline.storage import redact

    text = redact("" if value is None else str(value))
    return text[:MAX_PARAM_CHARS]


def _tags(tags: dict[str, Any] | None) -> dict[str, str]:
    """Tags as MLflow stores them (strings), keys and values redacted."""
    return {_param_value(k)[:250]: _param_value(v) for k, v in (tags or {}).items()}


class Tracker:
    """The MLflow run of one training job, used on rank 0 only.

    ``Tracker.start`` creates the run, or resumes ``run_id`` when the job continues from a checkpoint.
    The run stays the active fluent run of this process until ``finish``.
    """

    def __init__(self, uri: str, run_id: str, resumed: bool):
        self.uri = uri
        self.run_id = run_id
        self.resumed = resumed

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, params: dict[str, Any],
              run_id: str | None = None, tags: dict[str, str] | None = None) -> Tracker:
        """Start a new run (``run_id`` None) or resume an existing one; log the params it lacks."""
        import mlflow

        mlflow.set_tracking_uri(uri)
        if mlflow.active_run() is not None:
            mlflow.end_run()
        tags = _tags(tags)
        if run_id is None:
            exp = mlflow.set_experiment(_param_value(experiment))
            run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=_param_value(run_name), tags=tags)
            tracker = cls(uri, run.info.run_id, resumed=False)
        else:
            run = mlflow.start_run(run_id=run_id)
            if tags:
                mlflow.set_tags(tags)
            tracker = cls(uri, run.info.run_id, resumed=True)
        tracker._log_params(params)
        log.info("MLflow run %s (%s) at %s", tracker.run_id, "resumed" if tracker.resumed else "new",
                 _param_value(uri))
        return tracker

    @staticmethod
    def create(uri: str, experiment: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str] | None = None) -> str:
        """Create a run (RUNNING, not made active in this process) with its params; returns its id. The
        training driver makes the job's run this way and its workers resume it (``start(run_id=...)``)."""
        import mlflow

        client = mlflow.MlflowClient(uri)
        name = _param_value(experiment)
        exp = client.get_experiment_by_name(name)
        experiment_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run = client.create_run(experiment_id, run_name=_param_value(run_name), tags=_tags(tags))
        items = sorted({_param_value(k): _param_value(v) for k, v in params.items()}.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i:i + 100]])
        return run.info.run_id

    def _log_params(self, params: dict[str, Any]) -> None:
        """Log params; on a resumed run, keep the first values and record changed ones as a tag.

        MLflow refuses to change a logged param, and a resumed job may legitimately differ (for example a
        larger ``steps``). The tag ``resume.changed_params`` lists ``key: old -> new`` for those.
        """
        import mlflow

        wanted = {_param_value(k): _param_value(v) for k, v in params.items()}
        existing = mlflow.get_run(self.run_id).data.params if self.resumed else {}
        new = {k: v for k, v in wanted.items() if k not in existing}
        changed = [f"{k}: {existing[k]} -> {v}" for k, v in wanted.items() if k in existing and existing[k] != v]
        items = sorted(new.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i:i + 100]))
        if changed:
            mlflow.set_tag("resume.changed_params", _param_value("; ".join(changed)))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        """Log the finite numeric entries of ``metrics`` at generator step ``step`` (others are ignored)."""
        import mlflow

        numeric = {}
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                continue
            if math.isfinite(float(v)):
                numeric[k] = float(v)
        if numeric:
            mlflow.log_metrics(numeric, step=int(step))

    def log_grid(self, grid: np.ndarray, step: int) -> str:
        """Log a uint8 (H, W, 3) picture grid as ``grids/step_<step>.png``; returns the artifact path."""
        import mlflow

        path = f"grids/step_{int(step):07d}.png"
        mlflow.log_image(grid, artifact_file=path)
        return path

    def log_model(self, generator_path: str, registered_model: str | None, alias: str | None):
        """Log the generator file as the pyfunc model ``model`` and register it with ``alias``."""
        from jobs.serving import log_inpaint_model

        info = log_inpaint_model(str(generator_path), name="model", registered_model_name=registered_model or None,
                                 alias=alias or None)
        log.info("logged the generator as an MLflow model%s",
                 f" registered as {registered_model}@{alias}" if registered_model else "")
        return info

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
