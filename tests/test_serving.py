"""jobs.serving: the pyfunc model logged from code, registered, loaded by alias, and every load_generator ref;
our loaders never execute model code."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import yaml
import pytest
import torch

import models
import models.checkpoint
from jobs import serving
from jobs.train_state import GENERATOR_FILENAME, checkpoint_name


@pytest.fixture()
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    generator = models.InpaintGenerator(cnum=8).eval()
    path = tmp_path / "gen" / GENERATOR_FILENAME
    path.parent.mkdir()
    models.checkpoint.save_generator(str(path), generator, step=7)
    return path, generator


@pytest.fixture()
def sqlite_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    # Artifacts under tmp_path too (the default would be ./mlruns in the working directory).
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("serving-test",
                                                                  artifact_location=str(tmp_path / "artifacts")))
    yield mlflow
    mlflow.set_tracking_uri(None)


def _odd_input(seed=0, h=37, w=53):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    mask = np.zeros((1, h, w, 1), np.uint8)
    mask[:, 10:25, 12:40] = 1
    return image, mask


def _stored_model_dir(mlflow, info) -> Path:
    """The logged model's folder in the (local) artifact store."""
    return Path(mlflow.get_logged_model(info.model_id).artifact_location.removeprefix("file://"))


class _TouchOnUnpickle:
    """Unpickling this creates ``path``: a stand-in for code hidden in a pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pyfunc_logged_registered_and_loaded_by_alias(tiny_checkpoint, sqlite_mlflow):
    mlflow = sqlite_mlflow
    path, generator = tiny_checkpoint
    with mlflow.start_run() as run:
        info = serving.log_inpaint_model(str(path), registered_model_name="tiny-inpaint", alias="candidate")
    assert str(info.registered_model_version) == "1"

    # Logged from code: no pickle; the code file is the project's tiny one, and MLflow's code loader reads it.
    stored = _stored_model_dir(mlflow, info)
    files = {p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()}
    assert not any(f.endswith(".pkl") for f in files), files
    assert {"MLmodel", "pyfunc_model.py", f"artifacts/{GENERATOR_FILENAME}"} <= files
    assert (stored / "pyfunc_model.py").read_text() == serving.MODEL_CODE_PATH.read_text()
    assert "set_model(InpaintModel())" in serving.MODEL_CODE_PATH.read_text()
    flavor = yaml.safe_load((stored / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "pyfunc_model.py" and "python_model" not in flavor
    mv = mlflow.MlflowClient().get_model_version_by_alias("tiny-inpaint", "candidate")
    assert str(mv.version) == "1" and mv.run_id == run.info.run_id

    pyfunc = mlflow.pyfunc.load_model("models:/tiny-inpaint@candidate")
    sig = pyfunc.metadata.signature
    assert [s.name for s in sig.inputs.inputs] == ["image", "mask"]
    assert sig.inputs.inputs[0].shape == (-1, -1, -1, 3)

    image, mask = _odd_input()
    out = pyfunc.predict({"image": image, "mask": mask})
    assert out.shape == image.shape and out.dtype == np.uint8
    known = mask[..., 0] == 0
    np.testing.assert_array_equal(out[known], image[known])
    assert not np.array_equal(out[~known], image[~known])  # the hole was filled with something new

    # the same pixels as calling the one inference path directly on the original generator
    direct = models.inpaint_uint8(generator, image, mask)
    np.testing.assert_array_equal(out, direct)


def test_load_generator_from_every_kind_of_ref(tiny_checkpoint, sqlite_mlflow, s3_bucket):
    mlflow = sqlite_mlflow
    path, generator = tiny_checkpoint
    with mlflow.start_run() as run:
        serving.log_inpaint_model(str(path), registered_model_name="tiny-refs", alias="champion")
    with mlflow.start_run():
        serving.log_inpaint_model(str(path), registered_model_name="tiny-refs")  # version 2, no alias

    from pipeline import storage

    s3_uri = f"{s3_bucket}/ckpt/{GENERATOR_FILENAME}"
    storage.write_bytes_atomic(s3_uri, path.read_bytes())

    image, mask = _odd_input(1, 24, 40)
    expected = models.inpaint_uint8(generator, image, mask)
    refs = {
        "models:/tiny-refs@champion": {"model_name": "tiny-refs", "model_version": "1"},
        "models:/tiny-refs/2": {"model_name": "tiny-refs", "model_version": "2"},
        f"runs:/{run.info.run_id}/model": {"run_id": run.info.run_id},
        str(path): {},
        str(path.parent): {},  # a training checkpoint folder holding generator.pt
        s3_uri: {},
        f"{s3_bucket}/ckpt": {},
        f"{s3_bucket}/run": {"checkpoint": checkpoint_name(10)},  # the newest of two by step
    }
    storage.write_bytes_atomic(f"{s3_bucket}/run/{checkpoint_name(9)}/{GENERATOR_FILENAME}",
                               b"an older, broken file")
    storage.write_bytes_atomic(f"{s3_bucket}/run/{checkpoint_name(10)}/{GENERATOR_FILENAME}", path.read_bytes())
    for ref, facts in refs.items():
        loaded, info = serving.load_generator(ref, device="cpu")
        assert info["step"] == 7, ref
        assert not loaded.training and loaded.coarse[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
        for k, v in facts.items():
            assert info[k] == v, (ref, k)
        np.testing.assert_array_equal(models.inpaint_uint8(loaded, image, mask), expected)


def test_bad_refs_and_inputs(tiny_checkpoint, tmp_path):
    path, generator = tiny_checkpoint
    with pytest.raises(FileNotFoundError, match="generator.pt"):
        serving.load_generator(str(tmp_path))
    with pytest.raises(ValueError, match="models:/<name>@<alias>"):
        serving.load_generator("models:/just-a-name")
    image, mask = _odd_input()
    with pytest.raises(ValueError, match="mask must be"):
        models.inpaint_uint8(generator, image, mask[:, :-1])
    model = serving.InpaintModel()
    model.generator = generator
    with pytest.raises(ValueError, match="model_input must be a dict"):
        model.predict(None, image)


def test_log_outside_a_run_is_an_error(tiny_checkpoint, sqlite_mlflow):
    path, _ = tiny_checkpoint
    with pytest.raises(RuntimeError, match="active MLflow run"):
        serving.log_inpaint_model(str(path))


def test_our_loaders_never_execute_model_code(tiny_checkpoint, sqlite_mlflow, tmp_path):
    """load_generator reads only MLmodel (YAML) and the checkpoint (weights_only): a registry model whose code
    file was replaced, with a booby-trapped pickle beside it, loads without running either; MLflow's own
    pyfunc loader does run the code file (what models-from-code still means for trust)."""
    mlflow = sqlite_mlflow
    path, generator = tiny_checkpoint
    with mlflow.start_run():
        info = serving.log_inpaint_model(str(path), registered_model_name="tiny-trust", alias="champion")
    stored = _stored_model_dir(mlflow, info)
    ran_code, unpickled = tmp_path / "code-ran", tmp_path / "pickle-ran"
    (stored / "pyfunc_model.py").write_text(
        f"open({str(ran_code)!r}, 'w').close()\n" + serving.MODEL_CODE_PATH.read_text())
    (stored / "python_model.pkl").write_bytes(pickle.dumps(_TouchOnUnpickle(unpickled)))

    loaded, info_ = serving.load_generator("models:/tiny-trust@champion", device="cpu")
    assert info_["model_version"] == "1" and info_["step"] == 7
    image, mask = _odd_input(2, 20, 28)
    np.testing.assert_array_equal(models.inpaint_uint8(loaded, image, mask), models.inpaint_uint8(generator, image, mask))
    assert not ran_code.exists() and not unpickled.exists()

    mlflow.pyfunc.load_model("models:/tiny-trust@champion")
    assert ran_code.exists(), "mlflow.pyfunc.load_model executes the logged code file"


def test_checkpoint_with_code_in_its_pickle_is_refused(tmp_path):
    """Generator files load with torch.load(weights_only=True): a pickled object that would run code on load
    is refused, and its code does not run (the same payload does run under a plain torch.load)."""
    payload = {"format": models.checkpoint.FORMAT, "model": {"cnum": 8}}
    armed, trap = tmp_path / "armed", tmp_path / "trap"
    torch.save({**payload, "extra": _TouchOnUnpickle(armed)}, tmp_path / "armed.pt")
    torch.load(tmp_path / "armed.pt", weights_only=False)
    assert armed.exists(), "the payload runs when unpickled without weights_only"

    torch.save({**payload, "extra": _TouchOnUnpickle(trap)}, tmp_path / GENERATOR_FILENAME)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        serving.load_generator(str(tmp_path / GENERATOR_FILENAME), device="cpu")
    assert not trap.exists()
