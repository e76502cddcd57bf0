"""Same pixels: a fixed generator file over fixed inputs through `deepfill infer`, `deepfill evaluate` and
training validation gives the outputs recorded before the code was restructured (tests/fixtures/make_pixels.py
wrote them at aa1e763).

Known pixels must be identical; hole pixels may differ by at most one uint8 level (float summation order
on another CPU), and on at most 1% of them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from tests.fixtures import make_pixels

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "pixels"
EXPECTED = FIXTURE / "expected"


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).astype(np.int16)


def _assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    diff = np.abs(got - want)
    assert diff.max() <= 1, f"{what}: max difference {diff.max()}"
    assert (diff > 0).mean() <= 0.01, f"{what}: {(diff > 0).mean():.2%} of the values differ"


@pytest.mark.slow
def test_infer_paints_the_recorded_pixels(ray_local, tmp_path):
    assert main(make_pixels.infer_argv(FIXTURE, tmp_path / "out")) == 0
    for key in make_pixels.SIZES:
        out = key.rsplit(".", 1)[0] + ".png"
        got, want = _read(tmp_path / "out" / out), _read(EXPECTED / "infer" / out)
        known = _read(FIXTURE / "masks" / key)[..., 0] == 0
        assert np.array_equal(got[known], _read(FIXTURE / "images" / key)[known]), key
        _assert_same(got, want, key)


def test_evaluate_paints_and_scores_the_recorded_pixels(tmp_path):
    assert main(make_pixels.evaluate_argv(FIXTURE, tmp_path / "report")) == 0
    for key in make_pixels.SIZES:
        out = key.rsplit(".", 1)[0] + ".png"
        _assert_same(_read(tmp_path / "report" / "images" / "ours" / out), _read(EXPECTED / "evaluate" / out), key)
    got = json.loads((tmp_path / "report" / "metrics.json").read_text())
    want = json.loads((EXPECTED / "evaluate_metrics.json").read_text())
    for method, means in want["mean"].items():
        for metric, value in means.items():
            assert got["mean"][method][metric] == pytest.approx(value, rel=2e-3, abs=2e-4), (method, metric)
    assert [e["key"] for e in got["per_image"]] == [e["key"] for e in want["per_image"]]


def test_training_validation_gives_the_recorded_metrics_and_grid():
    import torch

    import models.checkpoint
    from jobs.trainer import validate

    generator, _ = models.checkpoint.load_generator(str(FIXTURE / "generator.pt"))
    metrics, grid = validate(generator, make_pixels.validation_set(FIXTURE), torch.device("cpu"), grid_rows=2)
    want = json.loads((EXPECTED / "validation.json").read_text())
    assert metrics == pytest.approx(want, rel=2e-3)
    _assert_same(grid.astype(np.int16), _read(EXPECTED / "validation_grid.png"), "validation grid")
