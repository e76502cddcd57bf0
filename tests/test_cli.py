"""The `deepfill` console script: installed, versioned, lists every job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, main


def test_console_script_help_and_version():
    exe = Path(sys.executable).with_name("deepfill")
    assert exe.exists(), "the deepfill console script is not installed in this environment"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("deepfill-ray ")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: deepfill " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "prepare" in capsys.readouterr().out


def test_a_failing_job_exits_1_with_one_redacted_line(tmp_path, caplog, monkeypatch):
    import logging

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-so-secret-Qx81")
    empty = tmp_path / "not-so-secret-Qx81"
    empty.mkdir()
    with caplog.at_level(logging.DEBUG, logger="deepfill"):
        code = main(["evaluate", "--images", str(empty), "--model", "m", "--mask-preset", "box",
                     "--output", str(tmp_path / "o"), "--no-mlflow"])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("deepfill evaluate failed: ValueError: no images under")
    assert "not-so-secret-Qx81" not in caplog.text and "***" in errors[0]
    assert any("Traceback" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
