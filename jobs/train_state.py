"""What a training checkpoint holds and how it is named: RNG states, the train state file, the folder names.

A checkpoint is a folder named ``checkpoint_name(step)`` (``checkpoint_step_00001000``) under the run's
storage folder (``<checkpoint.storage_path>/<name>``, local or ``s3://``), holding:

- ``train_state.pt``: plain state dicts of the three networks (unwrapped from DDP), both optimisers, the
  step, every rank's RNG states, the resolved config and the MLflow run id; it loads with
  ``torch.load(..., weights_only=True)`` on a machine without Ray;
- ``generator.pt``: a ``models.checkpoint`` generator file, so inference can load a checkpoint folder;
- ``config.yaml``: the resolved config, for people.

The config is passed through ``pipeline.storage.redact_tree`` before it goes into any of the three files
(``write_generator`` does the same for the generator file the trainer logs to MLflow at the end).

Nothing here needs Ray: ``read_checkpoint_state`` takes any object with Ray Train's ``Checkpoint``
interface (``.path``, ``.filesystem``).
"""

from __future__ import annotations

import io
import random
import re
from pathlib import Path

TRAIN_STATE_FILENAME = "train_state.pt"  # nets, optimisers, step, RNG states, config, MLflow run id
GENERATOR_FILENAME = "generator.pt"  # the generator alone (models.checkpoint), what inference loads
CONFIG_FILENAME = "config.yaml"  # the resolved config, for people
STATE_FORMAT = "deepfill-ray/train-state/1"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken at ``step``: ``checkpoint_step_00001000`` (sorts by step)."""
    return f"checkpoint_step_{int(step):08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (``checkpoint_name``'s inverse), None for any other name."""
    match = _CHECKPOINT_NAME.match(name.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def latest_checkpoint(run_uri: str, options=None) -> str | None:
    """URI of the newest checkpoint folder (by step) holding a generator file in a run folder, or None."""
    from pipeline import storage

    fs, root = storage.filesystem(run_uri, options)
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except (FileNotFoundError, OSError):
        return None
    for step, name in sorted(((checkpoint_step(n), n) for n in names if checkpoint_step(n) is not None),
                             reverse=True):
        if fs.exists(f"{root.rstrip('/')}/{name}/{GENERATOR_FILENAME}"):
            return storage.join(run_uri, name)
    return None


# ----------------------------------------------------------------------------------------- RNG states

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


# ----------------------------------------------------------------------------------------- the state file

def write_generator(path: str | Path, generator, *, step: int, config: dict) -> None:
    """Write a ``models.checkpoint`` generator file at ``path`` (``generator`` may be DDP-wrapped) holding
    ``config`` with credentials removed (``pipeline.storage.redact_tree``)."""
    from models.checkpoint import save_generator
    from models.gan import unwrap
    from pipeline.storage import redact_tree

    save_generator(str(path), unwrap(generator), step=int(step), config=redact_tree(config))


def save_train_state(folder: str | Path, *, generator, local_critic, global_critic, opt_g, opt_d, step: int,
                     rng: list[dict], config: dict, mlflow_run_id: str | None, samples_seen: int = 0,
                     world_size: int = 1, unlogged_metrics: list | None = None) -> None:
    """Write a training checkpoint into ``folder``: ``train_state.pt``, ``generator.pt`` and ``config.yaml``.

    The networks may be DDP-wrapped (their plain modules are saved); ``rng`` holds one ``rng_state()`` per
    rank (informational: a resumed job seeds its random draws per step and rank, whatever its size);
    ``samples_seen`` is the job's place in its training stream (``jobs.train.StreamPosition``) and
    ``world_size`` the workers that trained the last step (an elastic job compares it when it resumes);
    ``unlogged_metrics`` the metric rows ``[step, {name: value}]`` up to ``step`` not yet in MLflow (the
    worker group that resumes the checkpoint logs them: ``jobs.trainer.MLflowLogging``);
    ``config`` is the resolved config as a plain mapping (``jobs.options.to_dict``), saved with credentials
    removed (``pipeline.storage.redact_tree``) in all three files.
    """
    import torch
    import yaml

    from models.gan import unwrap
    from pipeline.storage import redact_tree

    config = redact_tree(config)
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
        "samples_seen": int(samples_seen),
        "world_size": int(world_size),
        "unlogged_metrics": list(unlogged_metrics or []),
    }
    torch.save(state, folder / TRAIN_STATE_FILENAME)
    write_generator(folder / GENERATOR_FILENAME, gen, step=step, config=config)
    (folder / CONFIG_FILENAME).write_text(yaml.safe_dump(config, sort_keys=False))


def load_train_state(folder: str | Path, map_location: str = "cpu") -> dict:
    """Read ``train_state.pt`` from a checkpoint folder (``weights_only=True``: no code runs on load)."""
    import torch

    state = torch.load(Path(folder) / TRAIN_STATE_FILENAME, map_location=map_location, weights_only=True)
    return _checked_state(state, folder)


def read_checkpoint_state(checkpoint, map_location: str = "cpu") -> dict:
    """``train_state.pt`` of a Ray Train checkpoint, read by this process straight from the checkpoint's
    filesystem (local or S3) into memory, then loaded with ``weights_only=True``.

    Not ``Checkpoint.as_directory()``: for a remote checkpoint it downloads into one folder per node shared
    by the node's workers, and a rank resuming while another still wrote the file read a torn zip (seen in
    the S3 resume test).
    """
    import torch

    path = f"{checkpoint.path.rstrip('/')}/{TRAIN_STATE_FILENAME}"
    with checkpoint.filesystem.open_input_stream(path) as f:
        blob = f.read()
    state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    return _checked_state(state, checkpoint.path)


def _checked_state(state: dict, where) -> dict:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: not a deepfill-ray training checkpoint (format {got!r})")
    return state
