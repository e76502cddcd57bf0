"""The ``deepfill`` command line: ``deepfill {prepare,train,infer,evaluate} ...``.

Each subcommand lives in its own module under ``jobs/`` and exposes two functions:

- ``add_arguments(parser: argparse.ArgumentParser) -> None``
- ``run(args: argparse.Namespace) -> int`` (the process exit code)

Modules are imported only when their subcommand runs, so ``deepfill --help`` stays fast and one job's
heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from importlib import metadata

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
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
