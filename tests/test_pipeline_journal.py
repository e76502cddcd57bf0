"""pipeline.journal: run parts merged into one manifest, damaged lines skipped, concurrent runs kept, strict JSON."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline import journal, storage


def _rows(root: str) -> list[dict]:
    text = storage.read_bytes(storage.join(root, journal.MANIFEST_NAME)).decode()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_merge_damage_and_last_writer(where, tmp_path, request, caplog):
    root = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3_bucket") + "/out"
    a = journal.open_journal(root, "runA", flush_rows=2)  # S3: a part object every 2 rows
    b = journal.open_journal(root, "runB")
    a.append([{"key": "x", "time": "2026-01-01T00:00:01.000000Z", "v": 1},
              {"key": "y", "time": "2026-01-01T00:00:01.000000Z", "v": 1}])
    b.append([{"key": "x", "time": "2026-01-01T00:00:02.000000Z", "v": 2}])  # newer: wins over runA's x
    a.append([{"key": "z", "time": "2026-01-01T00:00:03.000000Z", "v": 1}])
    a.close()  # runA "killed" before merging: its rows are only in its parts
    b.close()
    parts = journal.part_keys(root)
    assert {p.split(".", 1)[0] for p in parts} == {"runA", "runB"}
    assert journal.latest(root, value=lambda r: r["v"]) == {"x": 2, "y": 1, "z": 1}

    # a damaged line in a part (a killed local append, or garbage) is skipped with a warning
    storage.write_bytes_atomic(storage.join(root, journal.PARTS_DIR, "runC.jsonl"),
                               b'{"key": "w", "time": "2026-01-01T00:00:04.000000Z", "v": NaN}\n'
                               b'[1, 2]\n\xff\xfe\n{"key": "q", "ti')
    caplog.set_level(logging.WARNING)
    counts = journal.merge(root, remove_run="runB", count=lambda r: r["v"])
    assert counts == {"rows": 4, 2: 1, 1: 2, None: 1}
    assert "skipped 3 damaged line(s)" in caplog.text
    rows = _rows(root)
    assert [r["key"] for r in rows] == ["w", "x", "y", "z"]  # one row per key, sorted
    assert rows[0]["v"] is None and rows[1]["v"] == 2  # NaN read as null; the newer x won
    assert "NaN" not in storage.read_bytes(storage.join(root, journal.MANIFEST_NAME)).decode()
    left = journal.part_keys(root)
    assert left and not any(p.startswith("runB.") for p in left)  # only its own parts removed
    assert any(p.startswith("runA.") for p in left)

    # merging again changes nothing; a manifest row newer than an old part's row keeps winning
    journal.merge(root)
    assert _rows(root) == rows
    with journal.open_journal(root, "runD") as d:
        d.append([{"key": "y", "time": "2026-01-01T00:00:09.000000Z", "v": 9}])
    journal.merge(root, remove_run="runD")
    assert journal.latest(root, value=lambda r: r["v"])["y"] == 9
    assert {r["key"]: r["v"] for r in _rows(root)}["y"] == 9  # runA's older y (still in its part) lost
    with pytest.raises(ValueError):
        journal.dumps({"key": "n", "v": float("nan")})


def test_chunked_merge_equals_in_memory(tmp_path):
    root = str(tmp_path)
    with journal.open_journal(root, "r1") as j:
        j.append([{"key": f"k{i % 7}", "time": f"2026-01-01T00:00:{i:02d}.000000Z", "v": i} for i in range(30)])
    journal.merge(root, chunk_rows=4)  # several sorted runs spilled to disk, merged back
    chunked = _rows(root)
    journal.merge(root)
    assert chunked == _rows(root)
    assert {r["key"]: r["v"] for r in chunked} == {f"k{k}": max(i for i in range(30) if i % 7 == k) for k in range(7)}
    assert journal.new_run_id() != journal.new_run_id() and "." not in journal.new_run_id()
