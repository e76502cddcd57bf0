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
from tests.imaging import AWKWARD, BAD, EXTREME, HOSTILE, SMALL, png_bomb, write_bad_images, write_hostile_images


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _png_stored(arr: np.ndarray) -> bytes:
    """PNG without compression: a big file, quickly."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _read_png(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))


def _generator_file(tmp_path, cnum: int = 8):
    """A small random generator saved as a generator file (what ``--model`` takes)."""
    torch.manual_seed(0)
    ckpt = tmp_path / "generator.pt"
    models.checkpoint.save_generator(str(ckpt), models.InpaintGenerator(cnum=cnum).eval())
    return ckpt


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
    ckpt = _generator_file(tmp_path)
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


def test_fit_square_crops_first_so_any_aspect_is_cheap():
    import cv2

    img = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    want = cv2.resize(img[:, 20:80], (32, 32), interpolation=cv2.INTER_AREA)  # centre square, then shrink
    np.testing.assert_array_equal(evaluate.fit_square(img, 32), want)
    line = np.zeros((1, 100_000, 3), np.uint8)  # resizing the short side first would make 256 x 25.6M pixels
    line[0, 49_999] = 200  # (100000 - 1) // 2
    assert (evaluate.fit_square(line, 256) == 200).all()  # the centre pixel, enlarged
    assert evaluate.fit_square(np.zeros((100_000, 2, 3), np.uint8), 16).shape == (16, 16, 3)


@pytest.mark.parametrize("change,message", [
    ({"grid_rows": 0}, "grid_rows must be >= 1"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"max_images": 0}, "max_images must be >= 1"),
    ({"size": 12}, "size must be a multiple of 8"),
    ({"max_pixels": 0}, "max_pixels must be >= 1"),
    ({"max_bytes": "0"}, "max_bytes: size must be positive"),
    ({"experiment": ""}, "experiment must not be empty"),
    ({"images": ""}, "images must not be empty"),
    ({"output": "heldout/report"}, "output must not be inside images"),
    ({"output": "heldout"}, "output must not be inside images"),
    ({"images": "s3://b/heldout/", "output": "s3://b/heldout/r"}, "output must not be inside images"),
])
def test_options_that_cannot_work_are_refused(change, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opts = {"images": "heldout", "model": "m.pt", "mask_preset": "box", "output": "reports/box", **change}
    with pytest.raises(ValueError, match=message):
        evaluate.EvaluateOptions(**opts)
    evaluate.EvaluateOptions(images="heldout", model="m.pt", mask_preset="box", output="heldout-report")  # a sibling


def test_output_inside_images_is_refused_through_the_cli(tmp_path, capsys):
    argv = ["evaluate", "--images", str(tmp_path), "--model", "m.pt", "--mask-preset", "box", "--output",
            f"file://{tmp_path}/report", "--no-mlflow"]
    assert main(argv) == 2
    assert "output must not be inside images" in capsys.readouterr().err


def _hostile_folder(root):
    """Good, awkward, bad, hostile and extreme images, plus links and names that cannot be read or used.
    Returns {key: reason} for every key that must be skipped, and the keys that must be scored."""
    import os

    kinds = {**write_bad_images(root), **write_hostile_images(root)}
    skip = {key: {"empty": "empty", "not_image": "not_an_image", "truncated": "truncated", "corrupt": "corrupt",
                  "bomb": "decompression_bomb"}[kind] for kind, key in BAD.items()}
    skip.update({key: reason for key, reason in HOSTILE.values()})
    rng = np.random.default_rng(1)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "ok.png").write_bytes(_png(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)))
    (root / "big").mkdir()
    (root / "big" / "zeros.png").write_bytes(_png_stored(np.zeros((600, 600, 3), np.uint8)))  # 1.08 MB
    skip["big/zeros.png"] = "too_large"  # over --max-bytes 1000000, from the listed size
    (root / "big" / "header.png").write_bytes(png_bomb(3000, 1000))
    skip["big/header.png"] = "decompression_bomb"  # over --max-pixels 2000000
    (root / "links").mkdir()
    os.symlink(root / "missing.jpg", root / "links" / "dangling.jpg")
    skip["links/dangling.jpg"] = "read_failed"
    os.symlink(root / "big", root / "links" / "folder.png")  # a directory behind an image name
    skip["links/folder.png"] = "read_failed"
    if os.geteuid() != 0:  # root reads through chmod 000
        (root / "locked.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
        (root / "locked.png").chmod(0)
        skip["locked.png"] = "read_failed"
    (root / "ctl\x01name.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    skip["ctl\x01name.png"] = "unsafe_key"
    (root / "readme.txt").write_text("not listed: not an image name")
    scored = {*AWKWARD.values(), *SMALL.values(), *EXTREME.values(), ".hidden/ok.png"}
    assert set(kinds) | {".hidden/ok.png"} >= scored
    return skip, scored


def test_hostile_folder_is_reported_key_by_key(tmp_path, one_torch_thread):
    images, output = tmp_path / "heldout", tmp_path / "report"
    images.mkdir()
    skip, scored = _hostile_folder(images)
    argv = ["evaluate", "--images", str(images), "--model", str(_generator_file(tmp_path, cnum=4)),
            "--mask-preset", "box", "--size", "32", "--output", str(output), "--no-mlflow", "--grid-rows", "2",
            "--max-bytes", "1000000", "--max-pixels", "2000000", "--batch-size", "16"]
    assert main(argv) == 0
    result = json.loads((output / "metrics.json").read_text())
    assert result["skipped"] == {k: skip[k] for k in sorted(skip)}
    assert {e["key"] for e in result["per_image"]} == scored and result["count"] == len(scored)
    for entry in result["per_image"]:
        assert all(np.isfinite(entry["telea"][m]) for m in ("l1", "l2", "ssim"))
    report = (output / "report.md").read_text()
    assert f"{len(skip)} skipped" in report
    for key, reason in skip.items():
        assert f"| {evaluate._md_key(key)} | {reason} |" in report
    assert "`ctl\\u0001name.png`" in report  # control characters escaped, not written raw
    assert (output / "grid.png").exists()


def test_no_usable_image_fails_with_one_line_and_writes_nothing(tmp_path, caplog, one_torch_thread):
    images, output = tmp_path / "heldout", tmp_path / "report"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"<html></html>")
    (images / "b.png").write_bytes(b"")
    argv = ["evaluate", "--images", str(images), "--model", str(_generator_file(tmp_path, cnum=4)),
            "--mask-preset", "box", "--size", "32", "--output", str(output), "--no-mlflow"]
    assert main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "no usable images" in errors[0] and "all 2 skipped (empty: 1, not_an_image: 1)" in errors[0]
    assert not output.exists()


def test_several_models_are_rows_of_one_report_with_intervals_and_a_self_contained_page(tmp_path, one_torch_thread):
    import re

    images, output = tmp_path / "heldout", tmp_path / "report"
    images.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        (images / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)))
    (tmp_path / "a").mkdir()
    first = _generator_file(tmp_path / "a", cnum=4)
    torch.manual_seed(1)
    second = tmp_path / "b.pt"
    models.checkpoint.save_generator(str(second), models.InpaintGenerator(cnum=4).eval())
    argv = ["evaluate", "--images", str(images), "--model", f"{first},{second}", "--mask-preset", "box",
            "--size", "32", "--output", str(output), "--no-mlflow", "--bootstrap", "200"]
    assert main([*argv, "--labels", "one"]) == 2  # one label for two models: refused before anything runs
    assert main([*argv, "--labels", "wide,narrow"]) == 0
    result = json.loads((output / "metrics.json").read_text())
    assert [m["key"] for m in result["methods"]] == ["wide", "narrow", "telea", "navier_stokes"]
    for key in ("wide", "narrow", "telea"):
        for metric in ("l1", "l1_hole", "psnr_hole", "ssim_hole", "tv_hole"):
            lo, hi = result["ci95"][key][metric]
            assert lo <= result["mean"][key][metric] <= hi
    assert result["mean"]["wide"]["l1"] != result["mean"]["narrow"]["l1"]  # two different models were scored
    rows = (output / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("key,model,label,hole_fraction,l1,") and len(rows) == 1 + 3 * 4
    assert {r.split(",")[1] for r in rows[1:]} == {"wide", "narrow", "telea", "navier_stokes"}
    grid = _read_png(str(output / "grid.png"))
    assert grid.shape == (3 * 36 + 4, 7 * 36 + 4, 3)  # masked | wide | narrow | telea | truth | 2 attention maps
    report = (output / "report.md").read_text()
    assert "## Hole (hole pixels only)" in report and "## Whole image" in report
    assert re.search(r"^\| wide \| [\d.]+% \[[\d.]+, [\d.]+\] \|", report, re.M)
    assert "No training curves for wide, narrow" in report and not (output / "curves").exists()
    page = (output / "report.html").read_text()
    assert "href=" not in page and re.findall(r'src="([^"]*)"', page)[0].startswith("data:image/png;base64,")


def test_score_hole_metrics_by_hand():
    truth = np.zeros((16, 16, 3), np.uint8)
    pred = truth.copy()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    pred[4:8, 4:8] = 51  # 0.2 on [0, 1] inside the hole
    got = evaluate.score(pred, truth, mask)
    assert got["l1_hole"] == pytest.approx(0.2) and got["l1"] == pytest.approx(0.2 * 16 / 256)
    assert got["psnr_hole"] == pytest.approx(10 * np.log10(1 / 0.04))
    # tv over the pairs touching the hole: rows 4..7, horizontal pairs (3,4)..(7,8): 5 pairs, 2 of them edges
    assert got["tv_hole"] == pytest.approx(2 * (2 * 0.2 / 5))
    assert evaluate.tv_hole(pred, np.zeros_like(mask)) != evaluate.tv_hole(pred, np.zeros_like(mask))  # NaN
    assert got["ssim"] == pytest.approx(models.metrics.ssim(pred, truth))  # the same SSIM as models.metrics
    assert -1 <= got["ssim_hole"] < got["ssim"] <= 1
