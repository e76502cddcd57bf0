"""deepfill evaluate: metrics recomputed by hand from the saved outputs, report files, MLflow links."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import models
import models.checkpoint
from jobs import evaluate, serving
from jobs.cli import main
from pipeline import storage


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _read_png(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))


def test_fit_square_and_preset_size():
    img = np.arange(40 * 64 * 3, dtype=np.uint8).reshape(40, 64, 3)
    assert evaluate.fit_square(img, 40).shape == (40, 40, 3)
    np.testing.assert_array_equal(evaluate.fit_square(img, 40), img[:, 12:52])  # centre crop, no resize
    assert evaluate.fit_square(img, 64).shape == (64, 64, 3)  # enlarged
    assert evaluate.preset_size("thick_512") == 512 and evaluate.preset_size("box") == 256
    with pytest.raises(ValueError, match="mask_preset must be one of"):
        evaluate.EvaluateOptions(images="a", model="m", mask_preset="circles", output="o")


def test_evaluate_on_s3_matches_hand_calculation(s3_bucket, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    torch.manual_seed(0)
    ckpt = tmp_path / "generator.pt"
    models.checkpoint.save_generator(str(ckpt), models.InpaintGenerator(cnum=8).eval())
    with mlflow.start_run(run_name="train"):
        serving.log_inpaint_model(str(ckpt), registered_model_name="tiny-eval", alias="candidate")

    images, output = f"{s3_bucket}/heldout", f"{s3_bucket}/report"
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 100, np.uint8)  # a constant image: the classical methods fill it exactly
    storage.write_bytes_atomic(f"{images}/flat.png", _png(flat))
    storage.write_bytes_atomic(f"{images}/noise.png", _png(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)))
    storage.write_bytes_atomic(f"{images}/broken.jpg", b"not an image")

    argv = ["evaluate", "--images", images, "--model", "models:/tiny-eval@candidate", "--mask-preset", "box",
            "--seed", "3", "--output", output, "--size", "32", "--save-images"]
    assert main(argv) == 0

    result = json.loads(storage.read_bytes(f"{output}/metrics.json"))
    assert result["count"] == 2 and result["skipped"] == {"broken.jpg": "not_an_image"}
    for name in ("report.md", "metrics.csv", "grid.png"):
        assert storage.exists(f"{output}/{name}")
    grid = _read_png(f"{output}/grid.png")
    assert grid.shape == (2 * 36 + 4, 5 * 36 + 4, 3)  # 2 rows x 5 columns of 32 px tiles, 4 px gutters
    report = storage.read_bytes(f"{output}/report.md").decode()
    assert "| ours |" in report and "| telea |" in report and "| navier_stokes |" in report

    from pipeline.masks import generate_mask, mask_rng

    per_image = {e["key"]: e for e in result["per_image"]}
    for key in ("flat.png", "noise.png"):
        truth = _read_png(f"{output}/images/truth/{key}")
        mask = generate_mask("box", 32, 32, mask_rng(3, 0, key)).astype(bool)
        for method in evaluate.METHODS:
            pred = _read_png(f"{output}/images/{method}/{key}")
            diff = pred.astype(np.float64) / 255 - truth.astype(np.float64) / 255
            got = per_image[key][method]
            assert got["l1"] == pytest.approx(np.abs(diff).mean())  # by hand
            assert got["l2"] == pytest.approx((diff**2).mean())
            assert got["l1_hole"] == pytest.approx(np.abs(diff[mask]).mean())
            assert got["psnr"] == pytest.approx(10 * np.log10(1 / (diff**2).mean()) if diff.any() else np.inf)
            np.testing.assert_array_equal(pred[~mask], truth[~mask])  # known pixels untouched
    for method in ("telea", "navier_stokes"):  # a constant image is filled (almost) exactly by the classics
        assert per_image["flat.png"][method]["l1_hole"] <= 2 / 255
        assert per_image["flat.png"][method]["ssim"] > 0.99
    assert result["mean"]["ours"]["l1"] == pytest.approx(np.mean([per_image[k]["ours"]["l1"] for k in per_image]))

    # MLflow: one run, tagged with the model version it judged, the version tagged back with the run
    runs = mlflow.search_runs(experiment_names=["deepfill-evaluate"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["deepfill.model_name"] == "tiny-eval" and run.data.tags["deepfill.model_version"] == "1"
    assert run.data.metrics["telea/l1"] == pytest.approx(result["mean"]["telea"]["l1"])
    assert run.data.params["mask_preset"] == "box"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "report")}
    assert {"report/report.md", "report/grid.png", "report/metrics.json", "report/metrics.csv"} <= artifacts
    mv = mlflow.MlflowClient().get_model_version("tiny-eval", "1")
    assert mv.tags["deepfill.eval.box"] == run.info.run_id
    mlflow.set_tracking_uri(None)
