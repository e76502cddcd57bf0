"""pipeline.progress: a tqdm bar on a terminal, a periodic log line elsewhere; Ray Data's bars off. No Ray
cluster."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.progress import LOGGER_NAME, Progress, quiet_ray_data


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER_NAME]


def test_log_lines_with_counts_then_a_final_line(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    stream = io.StringIO()
    with Progress("prepare", total=4, unit="images", interval_s=0, stream=stream) as bar:
        assert not bar.is_bar
        bar.update(1)
        bar.set_postfix("shard train/part-00000")
        bar.update(2)
        bar.update()
    lines = _lines(caplog)
    assert len(lines) == 4
    assert lines[0].startswith("prepare: 1/4 images (25%), ") and "images/s" in lines[0] and "eta" in lines[0]
    assert lines[1].startswith("prepare: 3/4 images (75%), ") and lines[1].endswith("[shard train/part-00000]")
    assert lines[2].startswith("prepare: 4/4 images (100%), ") and "eta" not in lines[2]
    assert lines[3].startswith("prepare: 4 images in ") and lines[3].endswith("s")
    assert stream.getvalue() == ""  # no bar drawn into a log


def test_a_long_interval_logs_only_the_final_line(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    bar = Progress("infer", total=1000, unit="images", interval_s=3600, stream=io.StringIO())
    for _ in range(1000):
        bar.update()
    bar.close()
    bar.close()  # idempotent
    bar.update()  # ignored after close
    assert _lines(caplog) == [_lines(caplog)[0]] and _lines(caplog)[0].startswith("infer: 1000 images in ")


def test_unknown_total_and_unfinished_counts(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    with Progress("walk", unit="files", interval_s=0, stream=io.StringIO()) as bar:
        bar.update(5)
    with Progress("train", total=10, unit="steps", interval_s=3600, stream=io.StringIO()) as bar:
        bar.update(3)
    lines = _lines(caplog)
    assert lines[0].startswith("walk: 5 files, ") and "%" not in lines[0] and "eta" not in lines[0]
    assert lines[1].startswith("walk: 5 files in ")
    assert lines[2].startswith("train: 3/10 steps in ")  # stopped early: the final line says so


def test_a_given_logger_and_the_env_interval(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("DEEPFILL_PROGRESS_INTERVAL_S", "0")
    mine = logging.getLogger("tests.progress")
    with Progress("evaluate", total=2, logger=mine, stream=io.StringIO()) as bar:
        assert bar.interval_s == 0
        bar.update(2)
    assert [r.name for r in caplog.records] == ["tests.progress", "tests.progress"]
    monkeypatch.setenv("DEEPFILL_PROGRESS_INTERVAL_S", "not a number")
    assert Progress("x", stream=io.StringIO()).interval_s == 10.0
    monkeypatch.delenv("DEEPFILL_PROGRESS_INTERVAL_S")
    assert Progress("x", stream=io.StringIO()).interval_s == 10.0


def test_lines_go_to_the_stream_when_logging_is_not_set_up():
    lonely = logging.getLogger("tests.progress.unconfigured")
    lonely.propagate = False  # no handler here nor above it
    stream = io.StringIO()
    with Progress("prepare", total=2, unit="images", interval_s=0, stream=stream, logger=lonely) as bar:
        bar.update(2)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("prepare: 2/2 images") and lines[1].startswith("prepare: 2 images in")


def test_a_terminal_gets_one_tqdm_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    stream = FakeTTY()
    with Progress("prepare", total=3, unit="images", interval_s=0, stream=stream) as bar:
        assert bar.is_bar
        bar.update(1)
        bar.set_postfix("shard val/part-00000")
        bar.update(2)
    drawn = stream.getvalue()
    assert "prepare" in drawn and "3/3" in drawn and "images" in drawn
    assert _lines(caplog) == []


def test_disabled_shows_nothing(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    for stream in (io.StringIO(), FakeTTY()):
        with Progress("prepare", total=3, interval_s=0, stream=stream, enabled=False) as bar:
            bar.update(3)
            bar.set_postfix("x")
        assert stream.getvalue() == ""
    assert _lines(caplog) == []


@pytest.fixture()
def data_context():
    """The process's DataContext, its progress switches restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    fields = ("enable_progress_bars", "enable_operator_progress_bars", "enable_rich_progress_bars")
    saved = {f: getattr(ctx, f) for f in fields}
    yield ctx
    for f, v in saved.items():
        setattr(ctx, f, v)


def test_quiet_ray_data_turns_the_progress_bars_off(data_context):
    """Works without a Ray cluster (the DataContext is a plain process-local object)."""
    from ray.data import DataContext

    data_context.enable_progress_bars = True
    data_context.enable_operator_progress_bars = True
    quiet_ray_data()
    ctx = DataContext.get_current()
    assert ctx is data_context
    assert ctx.enable_progress_bars is False
    assert ctx.enable_operator_progress_bars is False
    assert ctx.enable_rich_progress_bars is False
    assert ctx.copy().enable_progress_bars is False  # what a dataset created now captures
