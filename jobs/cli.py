"""The ``deepfill`` command line: ``deepfill {prepare,train,infer,evaluate} ...``.

Each subcommand lives in its own module under ``jobs/`` and exposes:

- ``Options``: the dataclass tree of its options (``jobs.options`` generates ``--config``, the flags,
  ``--set`` and ``--print-config`` from it, and the help from its field comments);
- ``run(options) -> int``: the job, given its resolved options; the return value is the exit code.

Bad options exit with code 2 and one line on stderr (``deepfill infer: batch_size must be >= 1, got 0``);
a job that fails exits with code 1 and one logged line (credentials removed; the traceback with
``--log-level DEBUG``).
Modules are imported only when their subcommand runs, so ``deepfill --help`` stays fast and one job's
heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from importlib import metadata

from jobs.options import ConfigError, add_options, dump_yaml, from_args
from pipeline.storage import redact

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("jobs.prepare", "turn a tree of images into validated Parquet shards plus a manifest"),
    "train": ("jobs.train", "train DeepFill v1 on Ray Train (DDP), checkpointed and tracked in MLflow"),
    "infer": ("jobs.infer", "inpaint a folder or bucket of images with a pool of Ray Data model actors"),
    "evaluate": ("jobs.evaluate", "score a model against OpenCV Telea / Navier-Stokes on deterministic masks"),
}


def _version() -> str:
    try:
        return metadata.version("deepfill-ray")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfill",
        description="DeepFill v1 inpainting on Ray: prepare shards, train, run batch inference, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"deepfill-ray {_version()}")
    parser.add_argument("--log-level", default=os.environ.get("DEEPFILL_LOG_LEVEL", "INFO"), help="logging level")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            add_options(p, module.Options, config_help=getattr(module, "CONFIG_HELP", None))
            p.set_defaults(_module=module)
    return parser


def parse(argv: list[str]):
    """``deepfill <argv>`` -> (argparse namespace, the job's module, its resolved options or None when no
    command is given). Raises ``ConfigError`` for bad options and SystemExit for a bad command line."""
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    if args.command is None:
        return args, None, None
    return args, args._module, from_args(args._module.Options, args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if not sys.stderr.isatty():  # in a log, MLflow's download bars would be one redrawn line per file
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        args, module, opts = parse(argv)
    except ConfigError as err:
        command = next((a for a in argv if a in COMMANDS), "")
        print(f"deepfill {command}: {redact(str(err))}", file=sys.stderr)
        return 2
    if module is None:
        build_parser().print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args._print_config:
        print(dump_yaml(opts), end="")
        return 0
    try:
        return int(module.run(opts) or 0)
    except Exception as err:  # noqa: BLE001 - one line, credentials removed; the traceback at DEBUG
        log = logging.getLogger("deepfill")
        log.debug("%s", redact(traceback.format_exc()))
        log.error("deepfill %s failed: %s", args.command, redact(f"{type(err).__name__}: {err}"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
