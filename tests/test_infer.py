"""deepfill infer end to end on local Ray and the local S3 test server, with a tiny generator."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import models
import models.checkpoint
from jobs import infer
from jobs.cli import main
from pipeline import storage
from pipeline.images import ImageRejected, decode_image
from tests.conftest import S3_TEST_SECRET
from tests.imaging import AWKWARD, BAD, GOOD_PHOTOS, SMALL

pytestmark = pytest.mark.slow


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _box_mask(h: int, w: int) -> np.ndarray:
    """White (hole) box in the middle of a black (h, w) mask, 255 = hole as users draw them."""
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : h // 2 + 1, w // 3 : 2 * w // 3 + 1] = 255
    return m


@pytest.fixture()
def model_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "generator.pt"
    models.checkpoint.save_generator(str(path), models.InpaintGenerator(cnum=8).eval(), step=3)
    return str(path)


@pytest.fixture()
def dataset(s3_bucket, good_images_dir, bad_images_dir):
    """Images (good, awkward, small, bad) and masks on S3; returns (images uri, masks uri, {key: expected})."""
    bad_root, kinds = bad_images_dir
    images, masks = f"{s3_bucket}/in/images", f"{s3_bucket}/in/masks"
    expected: dict[str, tuple[str, str]] = {}  # key -> (status, reason)
    files = {key: (good_images_dir / key).read_bytes() for key in GOOD_PHOTOS.values()}
    files.update({key: (bad_root / key).read_bytes() for key in kinds})
    for key, data in files.items():
        try:
            h, w = decode_image(data).shape[:2]
            expected[key] = ("ok", "")
        except ImageRejected as err:
            h, w = 16, 16
            expected[key] = ("error", err.reason)
        storage.write_bytes_atomic(f"{images}/{key}", data)
        storage.write_bytes_atomic(f"{masks}/{infer.stem(key)}.png", _png(_box_mask(h, w)))
    # bad pairings, on a decodable photo each
    base = np.asarray(Image.open(io.BytesIO(files[AWKWARD["palette"]])).convert("RGB"))  # 256x256
    for name, mask_bytes, reason in [
        ("nomask", None, "missing_mask"),
        ("wrongsize", _png(_box_mask(100, 80)), "mask_size_mismatch"),
        ("emptymask", b"", "empty_mask"),
        ("nohole", _png(np.zeros(base.shape[:2], np.uint8)), "no_hole"),
    ]:
        key = f"cases/{name}.png"
        storage.write_bytes_atomic(f"{images}/{key}", _png(base))
        if mask_bytes is not None:
            storage.write_bytes_atomic(f"{masks}/cases/{name}.png", mask_bytes)
        expected[key] = ("error", reason)
    return images, masks, expected


def _manifest(output: str) -> dict[str, dict]:
    text = storage.read_bytes(f"{output}/manifest.jsonl").decode()
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == len({r["key"] for r in rows}), "manifest rows duplicated"
    return {r["key"]: r for r in rows}


def _mtimes(output: str) -> dict[str, object]:
    fs, root = storage.filesystem(output)
    fs.invalidate_cache()
    return {p[len(root) + 1 :]: fs.info(p)["LastModified"] for p in fs.find(root) if p.endswith(".png")}


def test_infer_s3_outputs_manifest_and_rerun(ray_local, dataset, model_file, caplog):
    images, masks, expected = dataset
    output = images.replace("/in/images", "/out")
    caplog.set_level(logging.INFO)
    argv = ["infer", "--images", images, "--masks", masks, "--output", output, "--model", model_file,
            "--batch-size", "3", "--num-actors", "2"]
    assert main(argv) == 0

    bad_keys = set(BAD.values())
    assert {k for k, (s, _) in expected.items() if s == "error"} >= bad_keys
    rows = _manifest(output)
    assert set(rows) == set(expected)
    for key, (status, reason) in expected.items():
        assert (rows[key]["status"], rows[key]["reason"]) == (status, reason), key

    ok_keys = [k for k, (s, _) in expected.items() if s == "ok"]
    assert set(ok_keys) >= set(GOOD_PHOTOS.values()) | set(AWKWARD.values()) | set(SMALL.values())
    fs, root = storage.filesystem(output)
    written = {p[len(root) + 1 :] for p in fs.find(root) if p.endswith(".png")}
    assert written == {infer.output_key(k) for k in ok_keys}  # one output per good image, nothing else
    for key in ok_keys:
        src = decode_image(storage.read_bytes(f"{images}/{key}"))
        out = np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{output}/{infer.output_key(key)}"))))
        assert out.shape == src.shape and out.dtype == np.uint8, key  # same size, RGB
        hole = _box_mask(*src.shape[:2]) > 0
        np.testing.assert_array_equal(out[~hole], src[~hole], err_msg=key)
        assert rows[key]["hole_fraction"] == pytest.approx(hole.mean())
        assert rows[key]["seconds"] > 0
        assert (rows[key]["height"], rows[key]["width"]) == src.shape[:2]
    for key in bad_keys:
        assert any(key in rec.getMessage() and expected[key][1] in rec.getMessage() for rec in caplog.records)
    assert S3_TEST_SECRET not in caplog.text

    # rerun after deleting two outputs: only those two are written again, manifest not duplicated
    first_run = rows[GOOD_PHOTOS["astronaut"]]["run"]
    before = _mtimes(output)
    deleted = [infer.output_key(AWKWARD["palette"]), infer.output_key(SMALL["small"])]
    for out_key in deleted:
        storage.delete(f"{output}/{out_key}")
    assert main(argv) == 0
    after = _mtimes(output)
    assert set(after) == set(before)
    rows2 = _manifest(output)
    assert set(rows2) == set(expected)
    for key in ok_keys:
        out_key = infer.output_key(key)
        assert rows2[key]["status"] == "ok"
        if out_key in deleted:
            assert rows2[key]["run"] != first_run
        else:
            assert rows2[key]["run"] == first_run and after[out_key] == before[out_key], key


def test_error_budget_stops_with_clear_exit(ray_local, s3_bucket, bad_images_dir, model_file):
    bad_root, kinds = bad_images_dir
    images, masks, output = f"{s3_bucket}/images", f"{s3_bucket}/masks", f"{s3_bucket}/out"
    for key in [*BAD.values(), SMALL["small"]]:
        storage.write_bytes_atomic(f"{images}/{key}", (bad_root / key).read_bytes())
        storage.write_bytes_atomic(f"{masks}/{infer.stem(key)}.png", _png(_box_mask(40, 56)))
    opts = infer.InferOptions(images=images, output=output, model=model_file, masks=masks, batch_size=1,
                              num_actors=1, max_errors=2)
    result = infer.run_infer(opts)
    assert result.exit_code == 1
    assert "error budget exceeded" in result.message and result.errors_this_run > 2
    rows = _manifest(output)
    assert sum(r["status"] == "error" for r in rows.values()) == result.errors_this_run
    # whatever was written before stopping is a complete image of the right size
    fs, root = storage.filesystem(output)
    for path in (p for p in fs.find(root) if p.endswith(".png")):
        assert Image.open(io.BytesIO(fs.cat_file(path))).size == (56, 40)

    # with a budget that fits, the same inputs exit 0 and every key has its row
    opts.max_errors = 10
    result = infer.run_infer(opts)
    assert result.exit_code == 0 and result.errors_this_run == len(BAD)
    rows = _manifest(output)
    assert set(rows) == {*BAD.values(), SMALL["small"]}
    assert rows[SMALL["small"]]["status"] == "ok"


def test_mask_preset_on_local_folder(ray_local, tmp_path, model_file):
    from pipeline.masks import generate_mask, mask_rng

    src_dir, out = tmp_path / "src", tmp_path / "out"
    rng = np.random.default_rng(0)
    sources = {"a.png": rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
               "deep/b.png": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)}
    for key, arr in sources.items():
        (src_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (src_dir / key).write_bytes(_png(arr))
    argv = ["infer", "--images", str(src_dir), "--output", str(out), "--model", model_file,
            "--mask-preset", "box", "--seed", "5", "--num-actors", "1"]
    assert main(argv) == 0
    rows = _manifest(str(out))
    assert set(rows) == set(sources) and {r["status"] for r in rows.values()} == {"ok"}
    for key, src in sources.items():
        mask = generate_mask("box", *src.shape[:2], mask_rng(5, 0, key)).astype(bool)
        result = np.asarray(Image.open(out / infer.output_key(key)))
        np.testing.assert_array_equal(result[~mask], src[~mask])
        assert rows[key]["hole_fraction"] == pytest.approx(mask.mean())
    assert not list(out.rglob(".tmp-*"))  # no temporary files left behind


def test_worker_records_each_row_without_ray(tmp_path, model_file):
    """The actor's __call__ alone: good rows written, every bad row recorded, nothing raised."""
    with open(model_file, "rb") as f:
        worker = infer.InpaintWorker(f.read(), output=str(tmp_path / "out"), mask_preset=None, seed=0,
                                     max_pixels=10_000, run="r1")
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)  # 12000 px > max_pixels
    batch = {
        "key": np.array(["a.jpg", "b.png", "c.png", "d.png", "e.png"]),
        "out_key": np.array(["a.png", "b.png", "c.png", "d.png", "e.png"]),
        "image_bytes": np.array([_png(img), _png(img), b"junk", _png(big), b""], dtype=object),
        "mask_bytes": np.array([_png(_box_mask(20, 30)), _png(_box_mask(30, 20)), b"", b"", b""], dtype=object),
        "read_reason": np.array(["", "", "", "", "missing_input"], dtype=object),
    }
    out = worker(batch)
    assert list(out["status"]) == ["ok", "error", "error", "error", "error"]
    assert list(out["reason"]) == ["", "mask_size_mismatch", "not_an_image", "decompression_bomb", "missing_input"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]
    result = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    hole = _box_mask(20, 30) > 0
    np.testing.assert_array_equal(result[~hole], img[~hole])
    assert out["hole_fraction"][0] == pytest.approx(hole.mean()) and out["run"][0] == "r1"


def test_options_are_validated(capsys):
    with pytest.raises(ValueError, match=r"exactly one of masks \(--masks\) or mask_preset \(--mask-preset\)"):
        infer.InferOptions(images="a", output="b", model="m")
    with pytest.raises(ValueError, match="mask_preset must be one of"):
        infer.InferOptions(images="a", output="b", model="m", mask_preset="circles")
    # through the command line: exit code 2 and one line naming the option, for flags and --set alike
    for argv, words in [(["--mask-preset", "box", "--batch-size", "0"], "batch_size must be >= 1"),
                        (["--mask-preset", "box", "--set", "max_pixels=-1"], "max_pixels must be positive"),
                        (["--mask-preset", "box", "--max-errors", "many"], "max_errors: expected an integer"),
                        ([], "exactly one of masks")]:
        assert main(["infer", "--images", "a", "--output", "b", "--model", "m", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("deepfill infer: ") and words in err[0], err
    assert main(["infer", "--output", "b", "--model", "m", "--mask-preset", "box"]) == 2
    assert "missing option(s): images (--images)" in capsys.readouterr().err
    assert infer.output_key("a/b.c/d.JPG") == "a/b.c/d.png"
    assert infer.stem("x/y") == "x/y"
