"""pipeline.datasets on real Ray Data, reading shards from the moto S3 server: batch dtypes and shapes through
iter_torch_batches, masks per sample / epoch / seed, loss weights, corrupt rows skipped, the fixed val set."""

from __future__ import annotations

import dataclasses

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import DataConfig, MaskConfig
from pipeline.datasets import (build_train_dataset, load_val_set, make_sample, reset_skipped_rows, skipped_rows)
from pipeline.masks import loss_weights
from pipeline.shards import _schema
from tests.imaging import AWKWARD, BAD, GOOD_PHOTOS

CROP = 64


def _write_shard(uri: str, rows: dict[str, bytes]) -> None:
    """A shard as `deepfill prepare` writes it (height/width/format are not read by the training path)."""
    keys = sorted(rows)
    table = pa.table({"key": keys, "image": [rows[k] for k in keys], "height": [0] * len(keys),
                      "width": [0] * len(keys), "format": ["?"] * len(keys)}, schema=_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


@pytest.fixture(scope="module")
def s3_shards(s3_server, good_images_dir, bad_images_dir):
    """Shards on S3: train = 4 photos + 6 awkward images in two files; val = 3 photos."""
    import s3fs

    bucket = "pipeline-datasets"
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(bucket)
    root = f"s3://{bucket}/shards"
    bad_root, _ = bad_images_dir
    photos = {k: (good_images_dir / k).read_bytes() for k in GOOD_PHOTOS.values()}
    awkward = {k: (bad_root / k).read_bytes() for k in AWKWARD.values()}
    _write_shard(f"{root}/train/part-00000-of-00002.parquet", photos)
    _write_shard(f"{root}/train/part-00001-of-00002.parquet", awkward)
    _write_shard(f"{root}/val/part-00000-of-00001.parquet", {f"v/{k}": v for k, v in list(photos.items())[:3]})
    return root, {**photos, **awkward}


def test_batches_through_iter_torch_batches(s3_shards, ray_local):
    import ray.data
    import torch

    root, rows = s3_shards
    data = DataConfig(shards=root, crop_size=CROP, shuffle_buffer=4, batch_rows=3)
    ray.data.DataContext.get_current().enable_progress_bars = True  # as in a fresh process (Ray Train's controller)
    ds = build_train_dataset(data, MaskConfig(seed=1), epochs=2)
    assert not ds.context.enable_progress_bars and not ds.context.enable_operator_progress_bars  # no bars
    batches = list(ds.iter_torch_batches(batch_size=4, local_shuffle_buffer_size=data.shuffle_buffer,
                                         drop_last=True))
    assert len(batches) == (2 * len(rows)) // 4
    for b in batches:
        assert set(b) == {"image", "mask", "weight"}
        assert b["image"].dtype == torch.uint8 and tuple(b["image"].shape) == (4, CROP, CROP, 3)
        assert b["mask"].dtype == torch.uint8 and tuple(b["mask"].shape) == (4, CROP, CROP, 1)
        assert b["weight"].dtype == torch.float32 and tuple(b["weight"].shape) == (4, CROP, CROP, 1)
        assert set(torch.unique(b["mask"]).tolist()) <= {0, 1}
        frac = b["mask"].float().mean(dim=(1, 2, 3))
        assert (frac > 0).all() and (frac <= 0.5).all()


def test_masks_vary_by_sample_and_epoch_and_repeat_for_the_seed(s3_shards, ray_local):
    root, rows = s3_shards
    data = DataConfig(shards=root, crop_size=CROP, decode_pool="tasks")  # the same samples as actors make
    masks = MaskConfig(kind="mixed", seed=7, gamma=0.9)
    got = build_train_dataset(data, masks, epochs=2, with_keys=True).take_all()
    by = {(r["key"], int(r["epoch"])): r for r in got}
    assert sorted(by) == sorted((k, e) for k in rows for e in (0, 1))  # every image once per epoch

    for (key, epoch), r in by.items():
        assert r["image"].shape == (CROP, CROP, 3) and r["mask"].shape == (CROP, CROP, 1)
        # the weights follow the formula for this row's mask
        np.testing.assert_allclose(r["weight"][..., 0], loss_weights(r["mask"][..., 0], 0.9), rtol=1e-6)
        # reproducible: the driver recomputes exactly what a Ray worker produced for (seed, epoch, key)
        img, m, _ = make_sample(rows[key], key, epoch, data, masks)
        assert (img == r["image"]).all() and (m == r["mask"][..., 0]).all()

    epoch0 = [by[(k, 0)]["mask"] for k in rows]
    assert len({m.tobytes() for m in epoch0}) == len(rows)  # different masks for different samples
    assert all(not (by[(k, 0)]["mask"] == by[(k, 1)]["mask"]).all() for k in rows)  # and across epochs
    other = MaskConfig(kind="mixed", seed=8)
    assert any(not (make_sample(rows[k], k, 0, data, other)[1] == by[(k, 0)]["mask"][..., 0]).all() for k in rows)

    # a resumed job asks for its own epoch: the stream starting at epoch 1 repeats epoch 1 exactly, and the
    # decode actors (the default pool; the stream above ran on tasks) make exactly the same samples
    actors = dataclasses.replace(data, decode_pool="actors")
    resumed = build_train_dataset(actors, masks, epochs=1, start_epoch=1, with_keys=True).take_all()
    assert sorted((r["key"], int(r["epoch"])) for r in resumed) == sorted((k, 1) for k in rows)
    for r in resumed:
        for name in ("image", "mask", "weight"):
            assert (r[name] == by[(r["key"], 1)][name]).all()


def test_a_stream_resumed_inside_an_epoch_leaves_out_the_shards_it_consumed(s3_shards, ray_local):
    """``skip_rows``: the resumed stream starts after the whole shards of its epoch (in that epoch's order)
    that the rows already taken cover, so it repeats at most the rest of one shard and skips nothing."""
    root, rows = s3_shards
    data = DataConfig(shards=root, crop_size=CROP, decode_pool="tasks")
    masks = MaskConfig(kind="mixed", seed=7)
    full = build_train_dataset(data, masks, epochs=2, start_epoch=1, with_keys=True).take_all()
    first = full[0]["key"]  # the first row of epoch 1's stream comes from the shard epoch 1 reads first
    in_first = {k for k in rows if (k in GOOD_PHOTOS.values()) == (first in GOOD_PHOTOS.values())}
    sizes = {"part-00000-of-00002.parquet": 4, "part-00001-of-00002.parquet": 6}
    for skip, shard_rows in ((len(in_first), sizes), (len(in_first) + 1, None)):  # manifest sizes, footers
        resumed = build_train_dataset(data, masks, epochs=2, start_epoch=1, skip_rows=skip,
                                      shard_rows=shard_rows, with_keys=True).take_all()
        got = sorted((r["key"], int(r["epoch"])) for r in resumed)
        assert got == sorted([(k, 1) for k in rows if k not in in_first] + [(k, 2) for k in rows])
    # fewer rows than the first shard holds: nothing is left out (the shard is repeated, not skipped)
    resumed = build_train_dataset(data, masks, epochs=1, start_epoch=1, skip_rows=len(in_first) - 1,
                                  shard_rows=sizes, with_keys=True).take_all()
    assert sorted(r["key"] for r in resumed) == sorted(rows)


def test_corrupt_rows_are_skipped_and_counted(tmp_path, ray_local, good_images_dir, bad_images_dir):
    bad_root, _ = bad_images_dir
    good = {k: (good_images_dir / k).read_bytes() for k in GOOD_PHOTOS.values()}
    bad = {k: (bad_root / BAD[k]).read_bytes() for k in ("truncated", "corrupt", "not_image")}
    _write_shard(str(tmp_path / "train" / "part-00000-of-00001.parquet"), {**good, **bad})
    reset_skipped_rows()
    data = DataConfig(shards=str(tmp_path), crop_size=CROP, decode_pool="tasks")
    got = build_train_dataset(data, MaskConfig(kind="box", seed=0), with_keys=True).take_all()
    assert sorted(r["key"] for r in got) == sorted(good)  # the bad rows are gone, the rest survive
    for r in got:  # box masks at 64: a 32 px box shrunk by 0..4 px per side
        assert 24 * 24 <= r["mask"].sum() <= 32 * 32
    skipped = skipped_rows()
    assert skipped["count"] == 3
    assert {r["key"]: r["reason"] for r in skipped["rows"]} == {
        "truncated": "truncated", "corrupt": "corrupt", "not_image": "not_an_image"}


def test_an_unreadable_val_shard_is_skipped_and_counted_like_a_train_shard(tmp_path, ray_local, good_images_dir,
                                                                           bad_images_dir):
    bad_root, _ = bad_images_dir
    good = {k: (good_images_dir / k).read_bytes() for k in list(GOOD_PHOTOS.values())[:2]}
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "part-00000-of-00002.parquet").write_bytes(b"PAR1 not really parquet")  # listed first
    _write_shard(str(tmp_path / "val" / "part-00001-of-00002.parquet"),
                 {**good, "zz-corrupt": (bad_root / BAD["corrupt"]).read_bytes()})
    reset_skipped_rows()
    val = load_val_set(DataConfig(shards=str(tmp_path), crop_size=CROP), MaskConfig(), 10)
    assert sorted(val["key"]) == sorted(good)  # validation goes on with the readable shard's good rows
    skipped = skipped_rows()
    assert skipped["count"] == 2
    assert {r["key"]: (r["reason"], r["split"]) for r in skipped["rows"]} == {
        str(tmp_path / "val" / "part-00000-of-00002.parquet"): ("unreadable_shard: ArrowInvalid", "val"),
        "zz-corrupt": ("corrupt", "val")}


def test_decode_pool_options_are_checked():
    with pytest.raises(ValueError, match="decode_pool"):
        DataConfig(decode_pool="threads")
    with pytest.raises(ValueError, match="decode_workers"):
        DataConfig(decode_workers=-1)
    with pytest.raises(ValueError, match="data.stall_timeout_s"):
        DataConfig(stall_timeout_s=-1)
    # the CPUs the decode stage needs to make progress (what `deepfill train` checks the cluster for)
    assert DataConfig(decode_pool="tasks", decode_workers=4).decode_cpus == 1
    assert DataConfig(decode_pool="actors", decode_workers=4).decode_cpus == 4
    assert DataConfig(decode_pool="actors", decode_workers=0).decode_cpus == 1


def test_val_set_is_fixed(s3_shards):
    root, rows = s3_shards
    data = DataConfig(shards=root, crop_size=CROP)
    masks = MaskConfig(kind="thick", seed=0)
    a = load_val_set(data, masks, 2)
    b = load_val_set(data, masks, 2)
    assert list(a["key"]) == sorted(f"v/{k}" for k in list(rows)[:3])[:2]
    assert a["image"].shape == (2, CROP, CROP, 3) and a["image"].dtype == np.uint8
    assert a["mask"].shape == (2, CROP, CROP, 1) and a["weight"].dtype == np.float32
    for name in ("image", "mask", "weight"):
        assert (a[name] == b[name]).all()
    assert not (a["mask"][0] == a["mask"][1]).all()
    assert len(load_val_set(data, masks, 10)["key"]) == 3  # capped by what exists
