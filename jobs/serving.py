"""The generator as an MLflow model, and one loader for every way a user names a model.

- ``InpaintModel``: an MLflow pyfunc whose one artifact, ``"checkpoint"``, is a ``models.checkpoint``
  generator file. ``predict`` runs the one inference path, ``models.inpaint_uint8``.
- ``log_inpaint_model``: log that pyfunc (with a tensor signature) inside the active MLflow run, register it
  and point an alias (e.g. ``candidate``) at the new version.
- ``load_generator`` / ``fetch_checkpoint``: ``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model``,
  a generator file (local or ``s3://``), a training checkpoint folder holding ``generator.pt`` or a Ray
  Train run folder of checkpoint folders (the newest, by ``jobs.train_state`` naming) -> (InpaintGenerator,
  info) or the generator file's bytes.

What runs when a model is loaded (trust):

- The pyfunc is logged from code (MLflow's "models from code"), not pickled: the model folder holds
  ``MLmodel``, the ``checkpoint`` artifact and ``pyfunc_model.py``, a copy of ``jobs/pyfunc_model.py``
  (``from jobs.serving import InpaintModel; set_model(InpaintModel())``), and no ``python_model.pkl``.
  The class itself is not in the model: it is imported from the installed project (``deepfill-ray``), so
  the model loads where this project is installed. ``mlflow.pyfunc.load_model`` still *executes* the
  logged ``pyfunc_model.py``: whoever can write the registry's artifacts can change that file, so load
  registry models through ``mlflow.pyfunc`` only from a registry whose writers you trust. Unlike a pickle,
  the file is plain text a reviewer can read before loading.
- ``fetch_checkpoint`` and ``load_generator`` (used by ``deepfill infer`` and ``deepfill evaluate``) never
  execute model code: for ``models:/`` and ``runs:/`` refs they download the model folder, read
  ``MLmodel`` as YAML (``yaml.safe_load``) to find the ``checkpoint`` artifact and return its bytes; the
  generator is rebuilt by ``models.checkpoint`` with ``torch.load(weights_only=True)`` (tensors and plain
  values only, no pickled objects). Neither ``pyfunc_model.py`` nor an older model's ``python_model.pkl``
  is imported or unpickled, so older pickled registry versions are read the same safe way.
"""

from __future__ import annotations

import logging
import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from jobs.train_state import GENERATOR_FILENAME, latest_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"  # the pyfunc artifact key holding the generator file
# The models-from-code file logged with the pyfunc: it imports InpaintModel from the installed project.
MODEL_CODE_PATH = Path(__file__).with_name("pyfunc_model.py")


try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a project dependency
    _PythonModel = object


class InpaintModel(_PythonModel):
    """MLflow pyfunc around the generator.

    Artifact ``"checkpoint"``: a ``models.checkpoint`` generator file. ``predict`` takes
    ``{"image": uint8 (N, H, W, 3) RGB, "mask": uint8 (N, H, W, 1), nonzero = hole}`` (any H, W; one size
    per call) and returns the inpainted uint8 (N, H, W, 3); known pixels are returned unchanged.
    """

    def __init__(self):
        self.generator = None

    def load_context(self, context):
        import models.checkpoint

        self.generator, _ = models.checkpoint.load_for_inference(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, dict) or "image" not in model_input or "mask" not in model_input:
            raise ValueError('model_input must be a dict {"image": (N, H, W, 3) uint8, "mask": (N, H, W, 1) uint8}')
        image = np.asarray(model_input["image"], dtype=np.uint8)
        mask = np.asarray(model_input["mask"], dtype=np.uint8)
        import models

        return models.inpaint_uint8(self.generator, image, mask)


def model_signature():
    """Tensor signature: image uint8 (-1, -1, -1, 3), mask uint8 (-1, -1, -1, 1) -> uint8 (-1, -1, -1, 3)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    u8 = np.dtype(np.uint8)
    inputs = Schema([TensorSpec(u8, (-1, -1, -1, 3), "image"), TensorSpec(u8, (-1, -1, -1, 1), "mask")])
    outputs = Schema([TensorSpec(u8, (-1, -1, -1, 3), "inpainted")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example() -> dict[str, np.ndarray]:
    """A small valid input, logged with the model (MLflow shows it and checks it against the signature):
    one 16x16 grey image with a 4x4 hole in the middle."""
    mask = np.zeros((1, 16, 16, 1), np.uint8)
    mask[:, 6:10, 6:10] = 1
    return {"image": np.full((1, 16, 16, 3), 128, np.uint8), "mask": mask}


def _pip_requirements() -> list[str]:
    """The runtime packages the pyfunc imports (pinned to what logged it); the project itself must be installed."""
    reqs = []
    for name in ("torch", "numpy", "mlflow"):
        try:
            version = metadata.version(name).split("+", 1)[0]
            reqs.append(f"{name}=={version}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_inpaint_model(generator_checkpoint_path: str, *, name: str = "model",
                      registered_model_name: str | None = None, alias: str | None = None):
    """Log the generator file as an ``InpaintModel`` pyfunc in the active MLflow run, from code
    (``jobs/pyfunc_model.py``; no pickle, see the module docstring).

    generator_checkpoint_path: a local ``models.checkpoint`` generator file (or an ``s3://`` URI; it is
    copied locally first). With ``registered_model_name`` the model is registered, and with ``alias`` that
    alias is set on the new version. Returns MLflow's ModelInfo (``.registered_model_version`` is the
    version number, or None when not registered).
    """
    import mlflow
    from mlflow import MlflowClient

    if mlflow.active_run() is None:
        raise RuntimeError("log_inpaint_model must be called inside an active MLflow run")
    if alias and not registered_model_name:
        raise ValueError("alias needs registered_model_name")
    with tempfile.TemporaryDirectory() as tmp:
        local = generator_checkpoint_path
        if "://" in str(local) and not str(local).startswith("file://"):
            from pipeline import storage

            local = os.path.join(tmp, GENERATOR_FILENAME)
            with open(local, "wb") as f:
                f.write(storage.read_bytes(generator_checkpoint_path))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(MODEL_CODE_PATH),  # models from code: no pickle in the model
            artifacts={CHECKPOINT_ARTIFACT: str(local)},
            signature=model_signature(),
            input_example=input_example(),
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
        )
    version = getattr(info, "registered_model_version", None)
    if registered_model_name and alias and version is not None:
        MlflowClient().set_registered_model_alias(registered_model_name, alias, str(version))
        log.info("registered %s version %s as @%s", registered_model_name, version, alias)
    return info


def _parse_models_uri(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = ref[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, None, alias
    if "/" in body:
        name, version = body.rsplit("/", 1)
        return name, version, None
    raise ValueError(f"model URI must be models:/<name>@<alias> or models:/<name>/<version>, got {ref!r}")


def resolve_model_version(ref: str) -> dict:
    """Registry facts for a ``models:/`` URI: {"model_name", "model_version", "run_id", "model_uri"}."""
    from mlflow import MlflowClient

    name, version, alias = _parse_models_uri(ref)
    client = MlflowClient()
    mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    return {"model_name": mv.name, "model_version": str(mv.version), "run_id": mv.run_id,
            "model_uri": f"models:/{mv.name}/{mv.version}", "alias": alias}


def _checkpoint_in_model_dir(model_dir: str) -> str:
    """Path of the generator file inside a downloaded pyfunc model folder (read from its MLmodel)."""
    from mlflow.models import Model

    conf = Model.load(os.path.join(model_dir, "MLmodel")).flavors.get("python_function", {})
    artifact = conf.get("artifacts", {}).get(CHECKPOINT_ARTIFACT)
    if not artifact:
        raise ValueError("the MLflow model has no 'checkpoint' artifact: not a deepfill InpaintModel")
    return os.path.join(model_dir, artifact["path"])


def fetch_checkpoint(ref: str) -> tuple[bytes, dict]:
    """The raw generator file behind any model reference (see ``load_generator``), and facts about it.

    Returns (bytes of a ``models.checkpoint`` generator file, info dict with "ref" and, for ``models:/``
    refs, "model_name", "model_version", "run_id"; for ``runs:/`` refs "run_id").
    """
    info: dict = {"ref": ref}
    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        if ref.startswith("models:/"):
            info.update(resolve_model_version(ref))
            uri = info["model_uri"]
        else:
            info["run_id"] = ref[len("runs:/"):].split("/", 1)[0]
            uri = ref
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            with open(_checkpoint_in_model_dir(model_dir), "rb") as f:
                return f.read(), info
    from pipeline import storage

    fs, path = storage.filesystem(ref)
    if fs.isdir(path):
        path = f"{path.rstrip('/')}/{GENERATOR_FILENAME}"
        if not fs.exists(path):  # a Ray Train run folder: its newest checkpoint (jobs.train_state naming)
            newest = latest_checkpoint(ref)
            if newest is None:
                raise FileNotFoundError(f"no {GENERATOR_FILENAME} in the checkpoint folder {storage.redact(ref)}")
            info["checkpoint"] = newest.rstrip("/").rsplit("/", 1)[-1]
            path = storage.filesystem(storage.join(newest, GENERATOR_FILENAME))[1]
    elif not fs.exists(path):
        raise FileNotFoundError(f"no model checkpoint at {storage.redact(ref)}")
    with fs.open(path, "rb") as f:
        return f.read(), info


def load_generator(ref: str, *, device: str | torch.device | None = None):
    """Load a generator from any model reference for inference; returns (InpaintGenerator, info dict).

    The generator is in eval mode with channels_last weights (``models.for_inference``).

    ref: ``models:/name@alias`` | ``models:/name/<version>`` | ``runs:/<run_id>/<path>`` | a generator file
    (path, ``file://`` or ``s3://``) | a folder holding ``generator.pt`` (a training checkpoint) | a Ray Train
    run folder of checkpoint folders (the newest by step holding a generator: ``jobs.train_state``). ``device``
    defaults to CUDA when present, else CPU. info holds "ref" plus registry facts for ``models:/`` refs
    ("model_name", "model_version", "run_id") and the checkpoint's "step".
    """
    import models.checkpoint

    data, info = fetch_checkpoint(ref)
    generator, meta = models.checkpoint.load_for_inference(data, device=device)
    info["step"] = int(meta.get("step", 0)) if isinstance(meta, dict) else 0
    return generator, info
