"""`deepfill prepare` rerun into the same --dst with other inputs or settings: exactly the shards whose plan
changed are rewritten, no key is ever in both splits, and every listed key (strange names, hidden files,
broken links, files over the byte cap) is in one shard or rejected with a reason. Also ``plan_shards``, the
pure planning function, on a synthetic listing."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.masks import stable_seed
from pipeline.shards import SPLITS, plan_shards, read_manifest, shard_count, shard_name, shard_of, split_of
from pipeline.storage import Entry
from tests.test_prepare import noise_png

NOT_UTF8 = os.fsdecode(b"raw\xff.png")  # a local name that is not UTF-8 (its str holds a lone surrogate)


def _png(seed: int, side: int = 32) -> bytes:
    return noise_png(seed, side)  # ~3 KB at 32x32


def _write(root, files: dict[str, bytes]) -> None:
    for key, data in files.items():
        path = os.path.join(os.fsencode(root), os.fsencode(key))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def _keys(root) -> set[str]:
    """Every file under root as a key, hidden files and links (broken ones too) included."""
    out = set()
    for folder, _, names in os.walk(root):
        out.update(os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names)
    return out


def _shards(dst) -> dict[tuple[str, str], dict[str, bytes]]:
    """{(split, file name): {key: image bytes}} read from the Parquet files present."""
    out = {}
    for split in SPLITS:
        for path in sorted((dst / split).glob("*.parquet")):
            table = pq.read_table(path, columns=["key", "image"]).to_pydict()
            out[(split, path.name)] = dict(zip(table["key"], table["image"]))
    return out


def _state(dst) -> dict[tuple[str, str], tuple[int, str]]:
    """{(split, shard): (its Parquet mtime_ns or 0, its record's fingerprint)} for every record."""
    out = {}
    for path in (dst / "_work").glob("*.json"):
        record = json.loads(path.read_text())
        parquet = dst / record["split"] / record["shard"]
        out[(record["split"], record["shard"])] = (parquet.stat().st_mtime_ns if parquet.exists() else 0,
                                                   record["fingerprint"])
    return out


def _prepare(src, dst, val_fraction: float) -> dict:
    assert main(["prepare", "--src", str(src), "--dst", str(dst), "--val-fraction", str(val_fraction),
                 "--min-size", "16", "--shard-size", "14KB", "--max-bytes", "20KB", "--no-progress"]) == 0
    return read_manifest(str(dst))


def _check_exact(src, dst, manifest: dict, val_fraction: float) -> dict[str, dict]:
    """The manifest describes exactly what dst holds, and every key under src is in one place."""
    shards = _shards(dst)
    rows = {split: {k: v for (s, _), part in shards.items() if s == split for k, v in part.items()} for split in SPLITS}
    assert not set(rows["train"]) & set(rows["val"])
    for split in SPLITS:
        assert all(split_of(key, val_fraction) == split for key in rows[split])
        assert sorted(name for s, name in shards if s == split) == manifest["shards"][split]
    rejected = {r["key"]: r for r in manifest["rejected"]}
    listed = _keys(src)
    assert set(rows["train"]) | set(rows["val"]) | set(rejected) == listed
    assert manifest["counts"] == {"listed": len(listed), "train": len(rows["train"]), "val": len(rows["val"]),
                                  "rejected": len(rejected)}
    records = [json.loads(p.read_text()) for p in (dst / "_work").glob("*.json")]
    assert sum(r["keys"] for r in records) == len(listed)  # no record of an earlier plan is left
    return {**rows, "rejected": rejected}


def test_reruns_follow_the_inputs_and_settings(tmp_path, ray_local):
    src, dst = tmp_path / "src", tmp_path / "out"
    images = {f"img/{i:02d}.png": _png(i) for i in range(12)}
    names = ("with space.png", "ünïcode/é €.png", "glob[x].png", "globx.png", "star*.png", "q?.png", ".hidden.png",
             ".hid/in.png")  # globx.png: what glob[x].png would match if expanded
    strange = {name: _png(20 + i) for i, name in enumerate(names)}
    odd = {".DS_Store": b"\x00\x00\x00\x01Bud1" + bytes(64), "big.png": _png(28, side=96), NOT_UTF8: _png(29)}
    _write(src, {**images, **strange, **odd})
    os.symlink(tmp_path / "nowhere.png", src / "broken.png")
    assert len(odd["big.png"]) > 20 * 1024

    # 1. strange names: each key in a shard with its own bytes (no glob expansion) or rejected with a reason
    first = _prepare(src, dst, 0.3)
    got = _check_exact(src, dst, first, 0.3)
    accepted = {**got["train"], **got["val"]}
    assert accepted == {**images, **strange}
    reasons = {k: r["reason"] for k, r in got["rejected"].items()}
    assert reasons == {".DS_Store": "not_an_image", "big.png": "too_large", "broken.png": "read_failed",
                       NOT_UTF8: "unsafe_key"}
    assert got["rejected"]["broken.png"]["detail"].startswith("FileNotFoundError")
    assert first["shards_written"] == len(_state(dst)) and first["shards_kept"] == 0
    before = _state(dst)

    # 2. one more image and one rewritten in place: only the shards holding them are rewritten
    old = (src / "img/03.png").stat().st_mtime_ns
    (src / "img/03.png").write_bytes(_png(103))
    os.utime(src / "img/03.png", ns=(old + 10**9, old + 10**9))
    (src / "img/new.png").write_bytes(_png(100))
    second = _prepare(src, dst, 0.3)
    got = _check_exact(src, dst, second, 0.3)
    assert got[split_of("img/03.png", 0.3)]["img/03.png"] == _png(103)
    after = _state(dst)
    assert set(after) == set(before)  # same shard count: the new image fits the ladder's step
    holding = {shard for shard, part in _shards(dst).items() if {"img/03.png", "img/new.png"} & set(part)}
    changed = {shard for shard in after if after[shard] != before[shard]}
    assert changed == holding and 1 <= len(changed) < len(after)
    assert (second["shards_written"], second["shards_kept"]) == (len(changed), len(after) - len(changed))

    # 3. another val fraction: every key moves to its new split, none is in both
    third = _prepare(src, dst, 0.6)
    got = _check_exact(src, dst, third, 0.6)
    assert third["counts"]["val"] > second["counts"]["val"] and third["shards_kept"] == 0

    # 4. another source: the old shards and records are gone
    other = tmp_path / "other"
    _write(other, {f"b/{i}.png": _png(200 + i) for i in range(5)})
    fourth = _prepare(other, dst, 0.6)
    got = _check_exact(other, dst, fourth, 0.6)
    assert set(got["train"]) | set(got["val"]) == _keys(other) and not got["rejected"]
    assert fourth["shards_removed"] >= 1


def test_plan_shards_is_pure_and_fingerprints_each_shard():
    entries = [Entry(f"photos/{i:04d}.jpg", 1000 + i, f"v{i}") for i in range(300)]
    kwargs = {"shard_size_bytes": 40_000, "val_fraction": 0.2, "seed": 3}
    plan = plan_shards(iter(entries), **kwargs)
    assert plan.keys == [e.key for e in entries] and list(plan.sizes) == [e.size for e in entries]
    assert plan.num_shards == {s: shard_count(plan.planned_bytes[s], 40_000) for s in SPLITS}
    seen = []
    for shard in plan.shards:
        keys = [plan.keys[i] for i in shard.members]
        assert keys == sorted(keys)
        assert all(split_of(k, 0.2, 3) == shard.split for k in keys)
        assert all(shard_name(shard_of(k, plan.num_shards[shard.split]), plan.num_shards[shard.split]) == shard.name
                   for k in keys)
        seen += keys
    assert sorted(seen) == sorted(plan.keys)
    for key in ("photos/0001.jpg", "ünï €/glob[x]*?.png"):  # the split rule the manifest states
        assert split_of(key, 0.2, 3) == ("val" if stable_seed("split", 3, key) / 2.0**128 < 0.2 else "train")

    def fingerprints(changed_entries, **changes):
        return {(s.split, s.name): s.fingerprint for s in plan_shards(changed_entries, **{**kwargs, **changes}).shards}

    base = fingerprints(entries)
    assert fingerprints(list(entries)) == base  # deterministic
    touched = entries[:7] + [Entry(entries[7].key, entries[7].size, "v-new")] + entries[8:]
    assert sum(base[k] != v for k, v in fingerprints(touched).items()) == 1  # only the shard of entry 7
    assert all(base[k] != v for k, v in fingerprints(entries, min_size=64).items())
    assert all(base[k] != v for k, v in fingerprints(entries, src="s3://other").items())
    with pytest.raises(ValueError, match="listed twice"):
        plan_shards(entries + entries[:1], **kwargs)
    # files over the byte cap count 0 toward the shard count; a file list counts assumed_size each
    capped = plan_shards(entries, **kwargs, max_bytes=1100)
    assert sum(capped.planned_bytes.values()) == sum(e.size for e in entries if e.size <= 1100)
    assert sum(plan_shards(entries, **kwargs, assumed_size=10).planned_bytes.values()) == 3000
    steps = [shard_count(n * 1000, 1000) for n in range(1, 400)]
    assert steps[:9] == list(range(1, 10)) and steps == sorted(steps) and steps[-1] < 1.1 * 399


def test_dst_overlapping_src_is_refused_before_anything_starts(tmp_path, capsys):
    from jobs import cli

    src = tmp_path / "photos"
    src.mkdir()
    for dst, how in ((src, "is"), (src / "shards", "is inside"), (tmp_path, "contains")):
        assert cli.main(["prepare", "--src", str(src), "--dst", str(dst)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("deepfill prepare: dst") and f" {how} src" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing written
