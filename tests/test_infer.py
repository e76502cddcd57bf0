"""deepfill infer end to end on local Ray and the local S3 test server, with a tiny generator."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models
import models.checkpoint
from jobs import infer
from jobs.cli import main
from pipeline import journal, storage
from pipeline.images import ImageRejected, decode_image, decode_mask
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
        ("emptymask", b"", _reason(lambda: decode_mask(b"", 4, 4))),  # mask_empty (empty_mask before)
        ("nohole", _png(np.zeros(base.shape[:2], np.uint8)), "no_hole"),
    ]:
        key = f"cases/{name}.png"
        storage.write_bytes_atomic(f"{images}/{key}", _png(base))
        if mask_bytes is not None:
            storage.write_bytes_atomic(f"{masks}/cases/{name}.png", mask_bytes)
        expected[key] = ("error", reason)
    # strange names: spaces, non-ASCII, glob characters, hidden; unsafe keys written directly (no normalisation)
    fs, _ = storage.filesystem(images)
    for key in ["odd/sp ace ü.png", "odd/[x]*.png", "odd/.hidden.png", "odd/a//b.png", "odd/a/../b.png"]:
        fs.pipe_file(f"{images[len('s3://'):]}/{key}", _png(base))
        fs.pipe_file(f"{masks[len('s3://'):]}/{infer.stem(key)}.png", _png(_box_mask(*base.shape[:2])))
        expected[key] = ("error", "unsafe_key") if storage.unsafe_key(key) else ("ok", "")
    return images, masks, expected


def _reason(fn) -> str:
    try:
        fn()
    except ImageRejected as err:
        return err.reason
    raise AssertionError("not rejected")


def _manifest(output: str) -> dict[str, dict]:
    text = storage.read_bytes(f"{output}/manifest.jsonl").decode()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(set(r) == set(infer.MANIFEST_FIELDS) for r in rows)
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

    # provenance per row
    sha = hashlib.sha256(open(model_file, "rb").read()).hexdigest()
    etags = {e.key: e.version for e in storage.iter_entries(images, hidden=True)}
    for key in ok_keys:
        r = rows[key]
        assert (r["model_sha256"], r["format"], r["mask_key"]) == (sha, "png", infer.stem(key) + ".png"), key
        assert r["input_version"] == etags[key] and r["mask_version"] and len(r["fingerprint"]) == 16
        assert r["model_ref"] == model_file and r["model_name"] is None and r["mask_preset"] is None
    for key in (k for k, (s, why) in expected.items() if why == "unsafe_key"):
        assert rows[key]["output"] is None and rows[key]["detail"]
    assert rows[BAD["empty"]]["hole_fraction"] is None
    assert not storage.exists(f"{output}/odd/b.png")  # nothing written for "a/../b.png"
    assert not list(journal.part_keys(output))  # this run's parts merged and removed

    first_run = rows[GOOD_PHOTOS["astronaut"]]["run"]
    before = _mtimes(output)

    # a changed input, a changed mask, a deleted output: exactly those three ok rows are redone (errors are
    # retried; the same-everything rerun is in the local test, where it needs no actors)
    changed_input, changed_mask, deleted = AWKWARD["palette"], SMALL["small"], GOOD_PHOTOS["astronaut"]
    flipped = decode_image(storage.read_bytes(f"{images}/{changed_input}"))[::-1].copy()
    storage.write_bytes_atomic(f"{images}/{changed_input}", _png(flipped))
    h, w = decode_image(storage.read_bytes(f"{images}/{changed_mask}")).shape[:2]
    storage.write_bytes_atomic(f"{masks}/{infer.stem(changed_mask)}.png", _png(_box_mask(h, w)[::-1].copy()))
    storage.delete(f"{output}/{infer.output_key(deleted)}")
    assert main(argv) == 0
    rows3 = _manifest(output)
    assert set(rows3) == set(expected)
    redone = {k for k in ok_keys if rows3[k]["run"] != first_run}
    assert redone == {changed_input, changed_mask, deleted}
    assert all(rows3[k]["status"] == "ok" for k in ok_keys)
    after = _mtimes(output)
    assert {k for k in after if after[k] != before.get(k)} == {infer.output_key(k) for k in redone}


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
    # (errors the same bytes give again keep their rows from the first run: SETTLED_ERRORS)
    first_settled = {k for k, r in rows.items() if r["status"] == "error" and r["reason"] in infer.SETTLED_ERRORS}
    assert result.exit_code == 0 and result.skipped == len(first_settled) >= 1
    assert result.errors_this_run == len(BAD) - len(first_settled)
    rows = _manifest(output)
    assert set(rows) == {*BAD.values(), SMALL["small"]}
    assert rows[SMALL["small"]]["status"] == "ok"
    assert all(rows[k]["status"] == "error" and rows[k]["reason"] for k in BAD.values())


def _cli(capsys, argv: list[str]) -> tuple[int, dict, str]:
    """``deepfill <argv>``: (exit code, its JSON summary line, stderr)."""
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else {}, captured.err


def test_local_reruns_names_models_and_killed_run(ray_local, tmp_path, model_file, capsys):
    """Local folder, drawn masks: strange names, a rerun after a killed run, another model refused then forced."""
    from pipeline.masks import generate_mask, mask_rng

    src_dir, out = tmp_path / "src", tmp_path / "out"
    rng = np.random.default_rng(0)
    sizes = {"a.png": (40, 48), "deep/b.png": (32, 32), "sp ace/ü é.png": (24, 40), "[x].png": (32, 24),
             "star*.png": (24, 24), ".hidden.png": (24, 32)}
    sources = {key: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for key, hw in sizes.items()}
    for key, arr in sources.items():
        (src_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (src_dir / key).write_bytes(_png(arr))
    (src_dir / "big.png").write_bytes(_png(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)))  # > --max-bytes
    (src_dir / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (src_dir / "notes.txt").write_text("not an image: ignored")
    (src_dir / "bad.jpg").write_bytes(b"a shopping list, not a JPEG\n" * 8)  # not_an_image, from the actors
    argv = ["infer", "--images", str(src_dir), "--output", str(out), "--model", model_file,
            "--mask-preset", "box", "--seed", "5", "--num-actors", "1", "--max-bytes", "20000"]
    code, summary, _ = _cli(capsys, argv)
    assert code == 0 and summary["processed"] == len(sources) + 1
    rows = _manifest(str(out))
    assert set(rows) == {*sources, "big.png", "broken.png", "bad.jpg"}  # every image key accounted for
    assert rows["bad.jpg"]["reason"] == "not_an_image" and rows["bad.jpg"]["fingerprint"]
    assert {k for k, r in rows.items() if r["status"] == "ok"} == set(sources)
    assert (rows["big.png"]["reason"], rows["broken.png"]["reason"]) == ("too_large", "read_failed")
    assert "20000" in rows["big.png"]["detail"] and "size -1" in rows["broken.png"]["detail"]
    for key, src in sources.items():
        mask = generate_mask("box", *src.shape[:2], mask_rng(5, 0, key)).astype(bool)
        result = np.asarray(Image.open(out / infer.output_key(key)))
        np.testing.assert_array_equal(result[~mask], src[~mask])
        assert rows[key]["hole_fraction"] == pytest.approx(mask.mean())
        assert (rows[key]["mask_preset"], rows[key]["mask_seed"], rows[key]["mask_key"]) == ("box", 5, None)
    assert not list(out.rglob(".tmp-*"))  # no temporary files left behind
    first_run = rows["a.png"]["run"]

    # a run killed before its merge: its rows only in its journal part (with a torn last line), no manifest;
    # one row never journaled (its output exists without a row); one input touched; one new image
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").unlink()
    part = out / "_manifest" / "20000101T000000-000000Z-dead.jsonl"
    part.parent.mkdir(exist_ok=True)
    part.write_text("".join(line + "\n" for line in lines if json.loads(line)["key"] != "deep/b.png")
                    + '{"key": "a.png", "sta')
    st = (src_dir / "a.png").stat()
    os.utime(src_dir / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (src_dir / "new.png").write_bytes(_png(sources["a.png"]))
    code, summary, _ = _cli(capsys, argv)
    assert code == 0 and summary["processed"] == 3
    rows = _manifest(str(out))
    assert {k for k, r in rows.items() if r["run"] != first_run} == {"a.png", "deep/b.png", "new.png", "big.png",
                                                                    "broken.png"}
    assert part.exists()  # another run's part is merged, never removed

    # everything the same: nothing to inpaint (the two errors are settled again on the driver; bad.jpg's row
    # is kept: the same bytes would give the same error)
    code, summary, _ = _cli(capsys, argv)
    assert code == 0 and summary["processed"] == 0 and summary["skipped"] == len(sources) + 2
    assert _manifest(str(out))["bad.jpg"]["run"] == first_run

    # another model: refused up front with one line naming --overwrite; nothing changes
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    models.checkpoint.save_generator(str(other), models.InpaintGenerator(cnum=8).eval(), step=4)
    manifest_before = (out / "manifest.jsonl").read_bytes()
    other_argv = [*argv[:6], str(other), *argv[7:]]
    code, _, stderr = _cli(capsys, other_argv)
    err = [line for line in stderr.splitlines() if "--overwrite" in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("deepfill infer: ") and "sha256" in err[0], err
    assert (out / "manifest.jsonl").read_bytes() == manifest_before
    code, summary, _ = _cli(capsys, [*other_argv, "--overwrite"])
    assert code == 0 and summary["processed"] == len(sources) + 2  # bad.jpg too: its fingerprint names the model
    other_sha = hashlib.sha256(other.read_bytes()).hexdigest()
    assert {r["model_sha256"] for r in _manifest(str(out)).values() if r["status"] == "ok"} == {other_sha}


def test_worker_records_each_row_without_ray(tmp_path, model_file):
    """The actor's __call__ alone: good rows written, every bad row recorded with a reason, nothing raised;
    a failed row's stale output is deleted."""
    with open(model_file, "rb") as f:
        worker = infer.InpaintWorker(f.read(), output=str(tmp_path / "out"), mask_preset=None, seed=0,
                                     max_pixels=10_000)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (120, 100, 3), dtype=np.uint8)  # 12000 px > max_pixels
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "d.png").write_bytes(b"old pixels")
    keys = ["a.jpg", "b.png", "c.png", "d.png", "e.png"]
    n = len(keys)
    batch = {
        "key": np.array(keys), "out_key": np.array([infer.output_key(k) for k in keys]),
        "mask_key": np.array([infer.output_key(k) for k in keys]), "input_size": np.full(n, 10),
        "input_version": np.array(["v"] * n), "mask_size": np.full(n, 5), "mask_version": np.array(["m"] * n),
        "fingerprint": np.array(["0" * 16] * n), "stale": np.array([False, False, False, True, False]),
        "image_bytes": np.array([_png(img), _png(img), b"junk", _png(big), b""], dtype=object),
        "mask_bytes": np.array([_png(_box_mask(20, 30)), _png(_box_mask(30, 20)), b"", b"", b""], dtype=object),
        "read_reason": np.array(["", "", "", "", "read_failed"], dtype=object),
        "read_detail": np.array(["", "", "", "", "OSError: boom"], dtype=object),
    }
    out = [json.loads(text) for text in worker(batch)["row"]]
    assert [r["status"] for r in out] == ["ok", "error", "error", "error", "error"]
    assert [r["reason"] for r in out] == ["", "mask_size_mismatch", "not_an_image", "decompression_bomb",
                                          "read_failed"]
    assert out[4]["detail"] == "OSError: boom" and out[1]["hole_fraction"] is None and out[0]["time"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]  # d.png's stale output removed
    result = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    hole = _box_mask(20, 30) > 0
    np.testing.assert_array_equal(result[~hole], img[~hole])
    assert out[0]["hole_fraction"] == pytest.approx(hole.mean())


def test_options_are_validated(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"exactly one of masks \(--masks\) or mask_preset \(--mask-preset\)"):
        infer.InferOptions(images="a", output="b", model="m")
    with pytest.raises(ValueError, match="mask_preset must be one of"):
        infer.InferOptions(images="a", output="b", model="m", mask_preset="circles")
    # through the command line: exit code 2 and one line naming the option, for flags and --set alike
    for argv, words in [(["--mask-preset", "box", "--batch-size", "0"], "batch_size must be >= 1"),
                        (["--mask-preset", "box", "--set", "max_pixels=-1"], "max_pixels must be positive"),
                        (["--mask-preset", "box", "--max-bytes", "0"], "max_bytes: size must be positive"),
                        (["--mask-preset", "box", "--max-errors", "many"], "max_errors: expected an integer"),
                        ([], "exactly one of masks")]:
        assert main(["infer", "--images", "a", "--output", "b", "--model", "m", *argv]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines()  # not Ray's late-forwarded task logs
               if not line.startswith("\x1b[36m(")]
        assert len(err) == 1 and err[0].startswith("deepfill infer: ") and words in err[0], err
    # --output overlapping --images or --masks is refused up front
    for images, output, masks, words in [
        (str(tmp_path), str(tmp_path / "out"), None, "is inside images"),
        (str(tmp_path / "in"), str(tmp_path / "in" / ".." / "in"), None, "is images"),
        ("s3://b/x/", "s3://b/x", None, "is images"),
        ("s3://b/x/in", "s3://b/x", None, "contains images"),
        ("s3://b/in", "s3://b/out", "s3://b/out/masks", "contains masks"),
    ]:
        extra = ["--masks", masks] if masks else ["--mask-preset", "box"]
        assert main(["infer", "--images", images, "--output", output, "--model", "m", *extra]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines()  # not Ray's late-forwarded task logs
               if not line.startswith("\x1b[36m(")]
        assert len(err) == 1 and words in err[0] and "--output" in err[0], err
    assert storage.overlap("s3://b/xy", "s3://b/x") is None and storage.overlap("/data/a", "s3://data/a") is None
    main(["infer", "--images", "a", "--output", "b", "--model", "m", "--mask-preset", "box", "--overwrite",
          "--print-config"])
    assert "overwrite: true" in capsys.readouterr().out
    assert main(["infer", "--output", "b", "--model", "m", "--mask-preset", "box"]) == 2
    assert "missing option(s): images (--images)" in capsys.readouterr().err
    assert infer.output_key("a/b.c/d.JPG") == "a/b.c/d.png"
    assert infer.stem("x/y") == "x/y"
