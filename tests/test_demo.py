"""`make demo`: the dataset it builds, and the wiring of the commands it runs.

The commands themselves (prepare, train, infer, evaluate) have their own end-to-end tests; here we check that
the demo builds a sound dataset and that each command it runs parses, loads its config and agrees with
configs/demo.yaml — fast, without starting Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_options(tmp_path_factory) -> demo.DemoOptions:
    return demo.DemoOptions(output=tmp_path_factory.mktemp("demo"), train_per_source=2, held_out_per_source=3)


@pytest.fixture(scope="module")
def built(small_options) -> tuple[Path, dict[str, int]]:
    root = small_options.output / "images"
    return root, demo.build_dataset(root, small_options)


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_sources_are_bundled_rgb_uint8():
    for name in demo.TRAIN_SOURCES + demo.HELD_OUT_SOURCES:
        image = demo.load_source(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert min(image.shape[:2]) >= 4 * 64, name  # room for crops up to 4x the crop size
        assert image.std() > 5, f"{name} is nearly flat"
    assert not set(demo.TRAIN_SOURCES) & set(demo.HELD_OUT_SOURCES)


def test_dataset_counts_sizes_and_split(built, small_options):
    root, counts = built
    train = sorted((root / "train").rglob("*.png"))
    held_out = sorted((root / "held_out").glob("*.png"))
    assert counts == {"train": len(train), "held_out": len(held_out)}
    assert len(train) == len(demo.TRAIN_SOURCES) * small_options.train_per_source
    assert len(held_out) == len(demo.HELD_OUT_SOURCES) * small_options.held_out_per_source

    crop = small_options.crop_size
    for path in train:
        image = read(path)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert image.shape[0] == image.shape[1] and crop <= image.shape[0] <= 4 * crop
    for path in held_out:
        assert read(path).shape == (crop, crop, 3)
    # Held-out images come only from the held-out sources; training folders only from training sources.
    assert {p.stem.split("_", 1)[1] for p in held_out} == set(demo.HELD_OUT_SOURCES)
    assert {p.parent.name for p in train} == set(demo.TRAIN_SOURCES)


def test_dataset_is_reproducible_and_crops_differ(built, small_options, tmp_path):
    root, _ = built
    again = tmp_path / "images"
    demo.build_dataset(again, small_options)
    first = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert first == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for rel in first:
        assert np.array_equal(read(root / rel), read(again / rel)), rel
    a, b = (read(p) for p in sorted((root / "held_out").glob("*_coffee.png"))[:2])
    assert not np.array_equal(a, b)


def test_commands_parse_and_agree_with_the_demo_config(small_options):
    """Each step's argv parses with the real `deepfill` parser; the train config loads with the demo's
    overrides and agrees with what infer/evaluate ask for (model name, alias, mask kind, crop size)."""
    from jobs import cli

    steps = demo.commands(small_options)
    assert [argv[0] for _, argv in steps] == ["prepare", "train", "infer", "evaluate"]
    assert Path(steps[1][1][2]) == Path(demo.CONFIG) and (ROOT / demo.CONFIG).is_file()
    absolute = {argv[0]: [str(ROOT / a) if a == demo.CONFIG else a for a in argv] for _, argv in steps}
    parsed = {name: cli.parse(argv)[2] for name, argv in absolute.items()}  # the resolved options

    cfg = parsed["train"]
    out = small_options.output
    assert Path(cfg.data.shards) == out / "shards" == Path(parsed["prepare"].dst)
    assert Path(cfg.checkpoint.storage_path).parent == out
    assert cfg.scaling.num_workers == 2 and not cfg.scaling.use_gpu
    assert cfg.data.crop_size == small_options.crop_size == parsed["prepare"].min_size
    assert cfg.masks.kind == demo.MASK_PRESET
    assert (cfg.tracking.registered_model, cfg.tracking.alias) == (demo.MODEL_NAME, demo.ALIAS)
    assert cfg.tracking.uri is None, "the demo tracks to sqlite:///mlflow.db in the working directory"

    model = f"models:/{demo.MODEL_NAME}@{demo.ALIAS}"
    for name in ("infer", "evaluate"):
        args = parsed[name]  # resolved options
        assert args.model == (model if name == "infer" else [model])  # evaluate compares a list of models
        assert Path(args.images) == out / "images" / "held_out"
        assert args.mask_preset == demo.MASK_PRESET and args.seed == 0


def test_summary_reads_the_evaluate_metrics(small_options):
    report = small_options.output / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics.json").write_text(
        '{"mean": {"ours": {"psnr": 21.5, "ssim": 0.71}, "telea": {"psnr": 20.25, "ssim": 0.69}}}'
    )
    text = demo.summary(small_options, {"dataset": 1.0, "train": 100.0})
    assert "21.5000" in text and "20.2500" in text and "telea" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert f"models:/{demo.MODEL_NAME}@{demo.ALIAS}" in text
