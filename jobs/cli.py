"""The ``deepfill`` command line: ``deepfill {prepare,train,sweep,infer,evaluate,import,serve} ...``.

Each subcommand lives in its own module under ``jobs/`` and exposes:

- ``Options``: the dataclass tree of its options (``jobs.options`` generates ``--config``, the flags,
  ``--set`` and ``--print-config`` from it, and the help from its field comments);
- ``run(options) -> int``: the job, given its resolved options; the return value is the exit code.

Bad options exit with code 2 and one line on stderr (``deepfill infer: batch_size must be >= 1, got 0``).
An option holding a URI with credentials in it (``s3://KEY:SECRET@bucket``, ``https://user:pw@mlflow``) is
refused the same way, before anything runs (no Ray, no S3 call): Ray's own task and worker tracebacks
cannot be filtered, so such a URI must never reach them. A job that fails exits with code 1 and one logged
line (credentials removed; the traceback with ``--log-level DEBUG``); everything logged through ``logging``
in this process, tracebacks and warnings included, passes through ``pipeline.storage.redact``.
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

from jobs.options import ConfigError, add_options, flatten, from_args, to_dict
from pipeline.storage import CREDENTIALS_HINT, has_credentials, redact, redact_tree

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("jobs.prepare", "turn a tree of images into validated Parquet shards plus a manifest"),
    "train": ("jobs.train", "train DeepFill v1 on Ray Train (DDP), checkpointed and tracked in MLflow"),
    "sweep": ("jobs.sweep", "train a grid of arms (Ray Tune trials of Ray Train runs) and compare them in one report"),
    "infer": ("jobs.infer", "inpaint a folder or bucket of images with a pool of Ray Data model actors"),
    "evaluate": ("jobs.evaluate", "score a model against OpenCV Telea / Navier-Stokes on deterministic masks"),
    "import": ("jobs.import_weights", "convert released DeepFill v1 weights (TF release, PyTorch port, MMagic) and register them"),
    "serve": ("jobs.serve", "serve a registered model over HTTP on Ray Serve (batched), with a page to paint holes"),
}


def _version() -> str:
    try:
        return metadata.version("deepfill-ray")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfill",
        description="DeepFill v1 inpainting on Ray: prepare shards, train, sweep a grid of arms, run batch inference, evaluate, import released weights, serve.",
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


def _strings(value, path: str):
    """(key path, string) for every string in an option's value (lists and mappings walked)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def credential_options(opts) -> list[str]:
    """Key paths of the options (``data.shards``, ``src``, ``tracking.uri``) whose value holds a URI with
    credentials in it (``pipeline.storage.has_credentials``), in declaration order."""
    return [path for key, value in flatten(opts).items() for path, text in _strings(value, key)
            if has_credentials(text)]


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output, message and traceback alike, has credentials removed."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


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
    refused = credential_options(opts)
    if refused:
        print(f"deepfill {args.command}: {refused[0]}: a URI must not carry credentials (user:password@); "
              f"{CREDENTIALS_HINT}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), handlers=[handler])
    logging.captureWarnings(True)  # warnings go through the redacting handler too
    if args._print_config:
        import yaml

        print(yaml.safe_dump(redact_tree(to_dict(opts)), sort_keys=False), end="")
        return 0
    try:
        return int(module.run(opts) or 0)
    except ConfigError as err:  # a job that refuses up front, before it starts anything (exit 2, like bad options)
        print(f"deepfill {args.command}: {redact(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"deepfill {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, credentials removed; the traceback at DEBUG
        log = logging.getLogger("deepfill")
        log.debug("%s", redact(traceback.format_exc()))
        log.error("deepfill %s failed: %s", args.command, redact(f"{type(err).__name__}: {err}"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
