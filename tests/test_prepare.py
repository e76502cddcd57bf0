"""`deepfill prepare` end to end: real photos, bad files and keys with strange names on the moto S3 server
-> Parquet shards on S3, read back through Ray Data; resuming an interrupted run; file lists; no credential
in logs or manifest. Reruns with other inputs or settings: tests/test_prepare_reruns.py."""

from __future__ import annotations

import json
import logging
import shutil

import pyarrow.parquet as pq

from jobs.cli import main
from pipeline import storage
from pipeline.shards import prepare, read_manifest, split_of
from tests.conftest import S3_TEST_SECRET
from tests.imaging import AWKWARD, BAD, GOOD_PHOTOS, SMALL, encode

EXPECTED_REASONS = {  # bad kind -> reason code in the manifest
    "empty": "empty", "not_image": "not_an_image", "truncated": "truncated", "corrupt": "corrupt",
    "bomb": "decompression_bomb",
}


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _source(good_images_dir, bad_images_dir) -> dict[str, bytes]:
    bad_root, _ = bad_images_dir
    out = {f"good/{k}": v for k, v in _files(good_images_dir).items()}
    out.update({f"bad/{k}": v for k, v in _files(bad_root).items()})
    return out


def _read_rows(dst, split, options=None):
    """All rows of one split, read with pyarrow (key, height, width, format, image)."""
    fs, root = storage.pyarrow_filesystem(storage.join(dst, split), options)
    rows = []
    for name in storage.list_files(storage.join(dst, split), (".parquet",), options):
        rows.extend(pq.read_table(f"{root}/{name}", filesystem=fs).to_pylist())
    return rows


def noise_png(seed: int, side: int = 64) -> bytes:
    """A PNG of random pixels: ~3 KB at 32x32, ~12 KB at 64x64, ~27 KB at 96x96."""
    import numpy as np
    from PIL import Image

    return encode(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)), "PNG")


# Keys S3 allows that a path cannot hold: rejected unread as unsafe_key.
# ("?versionId=": s3fs would read another key).
UNSAFE_S3 = ("odd/a//b.png", "odd/a/../b.png", "odd/./c.png", "odd/..", "/lead.png", "odd/v?versionId=1.png")
# Names that are names: read as they are (no glob expansion, hidden files included).
STRANGE_S3 = ("odd/sp ace [1]*?.png", "odd/glob[x].png", "odd/globx.png", "odd/.hidden.png", "odd/ünï €.png")


def test_prepare_s3_through_the_cli(s3_bucket, ray_local, good_images_dir, bad_images_dir, caplog, capfd):
    import ray

    src, dst = f"{s3_bucket}/raw", f"{s3_bucket}/shards"
    files = _source(good_images_dir, bad_images_dir)
    files.update({key: noise_png(i) for i, key in enumerate(STRANGE_S3)})
    files["odd/.DS_Store"] = b"\x00\x00\x00\x01Bud1" + bytes(64)
    odd = {key: noise_png(10 + i) for i, key in enumerate(UNSAFE_S3)}
    fs, _ = storage.filesystem(src)
    for key, data in files.items():
        fs.pipe_file(f"{src[5:]}/{key}", data)
    for key, data in odd.items():  # put as they are, "//", ".." and "?versionId=" included
        fs.call_s3("put_object", Bucket=s3_bucket[5:], Key=f"raw/{key}", Body=data)
    files.update(odd)

    caplog.set_level(logging.INFO)
    rc = main(["prepare", "--src", src, "--dst", dst, "--shard-size", "200KB", "--val-fraction", "0.35",
               "--min-size", "64", "--no-progress"])
    assert rc == 0
    manifest = read_manifest(dst)

    # every bad file rejected with its reason, the small one too (40x56 < 64); nothing else rejected
    want = {f"bad/{BAD[kind]}": reason for kind, reason in EXPECTED_REASONS.items()}
    want[f"bad/{SMALL['small']}"] = "too_small"
    want.update({key: "unsafe_key" for key in UNSAFE_S3})
    want["odd/.DS_Store"] = "not_an_image"
    assert {r["key"]: r["reason"] for r in manifest["rejected"]} == want
    good_keys = ({f"good/{k}" for k in GOOD_PHOTOS.values()} | {f"bad/{k}" for k in AWKWARD.values()}
                 | set(STRANGE_S3))
    counts = manifest["counts"]
    assert counts["listed"] == len(files) and counts["rejected"] == len(want)
    assert counts["train"] + counts["val"] == len(good_keys) == 15
    assert counts["val"] == sum(split_of(k, 0.35) == "val" for k in good_keys) == 4

    # read back through Ray Data with the S3 filesystem: one row per accepted image, original bytes
    pa_fs, path = storage.pyarrow_filesystem(storage.join(dst, "train"))
    train = ray.data.read_parquet(path, filesystem=pa_fs).take_all()
    val = _read_rows(dst, "val")
    assert len(train) == counts["train"] and len(val) == counts["val"]
    rows = {r["key"]: r for r in train + val}
    assert set(rows) == good_keys and len(rows) == len(train) + len(val)  # no duplicates
    for key, row in rows.items():
        assert row["image"] == files[key]
        assert split_of(key, 0.35) == ("train" if row in train else "val")
    assert (rows["bad/awkward/rotated.jpg"]["height"], rows["bad/awkward/rotated.jpg"]["width"]) == (256, 128)
    assert (rows["good/photos/coffee.png"]["height"], rows["good/photos/coffee.png"]["width"],
            rows["good/photos/coffee.png"]["format"]) == (400, 600, "PNG")
    assert len(manifest["shards"]["train"]) >= 2  # 200 KB shards: the train split is spread over several

    # each rejection is logged with its key and reason; the secret appears nowhere
    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    for key, reason in want.items():
        assert f"rejected {key}: {reason}" in logs
    manifest_text = storage.read_bytes(storage.join(dst, "manifest.json")).decode()
    assert S3_TEST_SECRET not in logs and S3_TEST_SECRET not in manifest_text
    summary = [line for line in out.splitlines() if line.startswith('{"dst"')]  # the CLI's summary line
    assert len(summary) == 1 and json.loads(summary[0])["train"] == counts["train"]


def test_interrupted_prepare_completes_without_duplicates(tmp_path, ray_local, good_images_dir, bad_images_dir):
    src, dst = tmp_path / "src", tmp_path / "out"
    for key, data in _source(good_images_dir, bad_images_dir).items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    first = prepare(str(src), str(dst), shard_size_bytes=150_000, val_fraction=0.25, min_size=64, progress=False)
    before = {r["key"] for split in ("train", "val") for r in _read_rows(str(dst), split)}
    shards = sorted((dst / "train").glob("*.parquet"))
    assert len(shards) >= 2

    # The state a crash leaves: one shard (and its record) never written, a half-written temporary file,
    # no manifest; plus a shard of an earlier, different listing that would duplicate rows if read.
    lost = shards[0]
    lost.unlink()
    (dst / "_work" / f"train-{lost.stem}.json").unlink()
    (dst / "manifest.json").unlink()
    (dst / "train" / ".tmp-abc-part-x.parquet").write_bytes(b"PAR1 half written")
    shutil.copy(shards[1], dst / "train" / "part-00000-of-00099.parquet")
    kept = {p.name: p.stat().st_mtime_ns for p in shards[1:]}

    second = prepare(str(src), str(dst), shard_size_bytes=150_000, val_fraction=0.25, min_size=64, progress=False)
    planned = len(list((dst / "_work").glob("*.json")))
    assert (second["shards_kept"], second["shards_written"]) == (planned - 1, 1)  # only the lost shard was redone
    assert second["shards_removed"] == 1  # the earlier listing's part-00000-of-00099
    assert {p.name: p.stat().st_mtime_ns for p in shards[1:]} == kept
    assert not (dst / "train" / "part-00000-of-00099.parquet").exists()
    keys = [r["key"] for split in ("train", "val") for r in _read_rows(str(dst), split)]
    assert len(keys) == len(set(keys)) == len(before)
    assert set(keys) == before
    assert second["counts"] == first["counts"] and second["rejected"] == first["rejected"]


def test_prepare_from_a_file_list(tmp_path, ray_local, good_images_dir):
    listing = tmp_path / "list.txt"
    paths = [str(good_images_dir / k) for k in GOOD_PHOTOS.values()]
    missing = str(tmp_path / "gone.jpg")
    listing.write_text("\n".join(["# photos", *paths, missing]) + "\n")
    manifest = prepare(str(listing), str(tmp_path / "out"), val_fraction=0.0, min_size=256, progress=False)
    assert manifest["counts"]["train"] == 4 and manifest["counts"]["val"] == 0
    assert [(r["key"], r["reason"]) for r in manifest["rejected"]] == [(missing.lstrip("/"), "read_failed")]
    assert manifest["rejected"][0]["detail"].startswith("FileNotFoundError")


def test_prepare_cli_rejects_bad_options(tmp_path, capsys):
    for flag, value, words in [("--shard-size", "lots", "shard_size: not a size: 'lots'"),
                               ("--val-fraction", "1.5", "val_fraction must be in [0, 1), got 1.5"),
                               ("--max-bytes", "huge", "max_bytes: not a size: 'huge'"),
                               ("--endpoint-url", "minio:9000", "endpoint_url")]:
        assert main(["prepare", "--src", str(tmp_path), "--dst", str(tmp_path / "o"), flag, value]) == 2
        # (lines that Ray's log monitor forwards late from an earlier test's tasks start with "(")
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("\x1b[36m(")]
        assert len(err) == 1 and err[0].startswith("deepfill prepare: ") and words in err[0], err
