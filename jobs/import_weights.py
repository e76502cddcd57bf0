"""``deepfill import``: released DeepFill v1 weights -> our generator file, registered in MLflow.

    deepfill import --source gen_00430000.pt --register deepfill-port-imagenet --alias imported
    deepfill import --source s3://models/release/places2/ --format tf --register deepfill-places2 \
        --output places2.pt --critics-output places2.critics.pt

``--source`` is a checkpoint file, a folder holding one, an ``s3://`` URI of either, or a TF checkpoint
prefix (``.../snap-0``, whose ``.index`` and ``.data-*`` files sit beside it). In a folder: a TF prefix
(its ``.index``), the newest ``gen_*.pt`` of the PyTorch port, ``torch_model.p``, one ``*.pth`` (MMagic) or
one ``*.safetensors``; anything ambiguous is refused with the candidates. The port's ``dis_<N>.pt`` next to
``gen_<N>.pt`` is taken as its critics (or name one with ``--critics``). The formats and their key maps:
``models.weights``.

What the job does, in order, and what it writes only once everything before it worked:

1. copies the source file(s) into a temporary folder (S3 included), refusing any over ``--max-bytes``,
   and takes the sha256 of each;
2. converts them (``models.weights.convert``) and builds our generator from the result: every source tensor
   used or ignored by a named rule, every parameter filled, or one line naming the first that is not;
3. writes our generator file (``models.checkpoint``, step 0) whose ``extra["import"]`` records the
   provenance: format, the source's own name (file name or TF prefix), its sha256 and the files', the
   semantics; and, when the source has critics, a critics file (``models.weights.save_critics``:
   ``{"local", "global", "cnum", "local_size", "global_size"}``, a side None when the source has no
   critic our networks can take), which ``deepfill train --set init.critics=...`` reads;
4. ``--output`` / ``--critics-output``: those files (local or ``s3://``, written atomically);
5. ``--register NAME``: one MLflow run in experiment ``--experiment`` (default ``deepfill-import``) with
   params (source, format, cnum, semantics, tensors, ignored), tags ``deepfill.import.format``,
   ``deepfill.import.sha256``, ``deepfill.import.source_name``, ``deepfill.import.semantics``, the
   generator logged as our pyfunc model (``jobs.serving.log_inpaint_model``) registered as NAME with
   ``--alias``, the critics as the run artifact ``critics/critics.pt`` and the key map as
   ``import/conversion.json``; the model version gets the same ``deepfill.import.*`` tags.

It prints one JSON object (format, cnum, semantics, sha256, the model version, the files written, notes).
Exit codes: bad options 2 (``jobs.cli``); a source that cannot be used (missing, empty, truncated, corrupt,
a pickle that needs code, a state dict of another model, a format that does not match ``--format``) 1, with
one line and nothing written or registered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

CRITICS_FILENAME = "critics.pt"
CRITICS_ARTIFACT_DIR = "critics"  # the import run's artifact folder holding CRITICS_FILENAME
CRITICS_ARTIFACT = f"{CRITICS_ARTIFACT_DIR}/{CRITICS_FILENAME}"
DEFAULT_MAX_BYTES = "2GB"
_ALIAS = re.compile(r"[\w\-]+")


@dataclass
class ImportOptions:
    """Options of ``deepfill import`` (each is a flag: ``critics_output`` -> ``--critics-output``)."""

    source: str  # checkpoint file, folder, s3:// URI, or TF checkpoint prefix (its .index beside it)
    register: str | None = None  # register the converted generator under this MLflow model name (none: do not register)
    format: Literal["auto", "tf", "port", "mmagic"] = "auto"  # the source's format; auto tells them apart by their keys
    alias: str = ""  # alias set on the registered version, e.g. imported ("" = none)
    output: str | None = None  # also write our generator file here (local path or s3://)
    critics: str | None = None  # the source's critics, when in another file than --source (the port's dis_*.pt)
    critics_output: str | None = None  # also write the critics file (for train's init.critics) here
    semantics: Literal["auto", "torch", "tf"] = "auto"  # run the weights with this padding/resizing; auto: the format's own
    max_bytes: str = DEFAULT_MAX_BYTES  # refuse source files larger than this (bytes or e.g. 500MB)
    tracking_uri: str | None = None  # MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "deepfill-import"  # MLflow experiment of the import run

    def __post_init__(self):
        from jobs.options import check_name
        from pipeline.config import parse_size

        if not str(self.source).strip():
            raise ValueError("source must not be empty")
        if self.register is not None and self.register != "":
            check_name(self.register, "register", forbid="/\\:@")
        else:
            self.register = None
        if self.alias and (not _ALIAS.fullmatch(self.alias) or self.alias.lower() == "latest"
                           or re.fullmatch(r"[vV]\d+", self.alias)):
            raise ValueError(f"alias must be letters, digits, '_' and '-' (not 'latest' or v<N>: MLflow reserves "
                             f"them), got {self.alias!r}")
        if self.alias and not self.register:
            raise ValueError("alias needs register")
        if not self.register and not self.output:
            raise ValueError("nothing to do: give --register NAME (MLflow) and/or --output FILE")
        for name in ("output", "critics_output", "critics"):
            if getattr(self, name) == "":
                setattr(self, name, None)
        try:
            parse_size(self.max_bytes)
        except ValueError as err:
            raise ValueError(f"max_bytes: {err}") from None
        check_name(self.experiment, "experiment", forbid="")
        for name in ("output", "critics_output"):
            target = getattr(self, name)
            if target and _same_place(target, self.source):
                raise ValueError(f"{name} must not overwrite the source ({target!r})")
        if self.output and self.critics_output and _same_place(self.output, self.critics_output):
            raise ValueError("output and critics_output must be different files")


def _same_place(a: str, b: str) -> bool:
    from pipeline import storage

    def norm(u: str) -> str:
        u = str(u)
        return u.rstrip("/") if storage.is_s3(u) else os.path.abspath(os.path.expanduser(u.removeprefix("file://")))

    return norm(a) == norm(b)


Options = ImportOptions  # what `deepfill import` reads (jobs.cli)


# ----------------------------------------------------------------------------------------- the source

@dataclass
class Staged:
    """The source as local files in a temporary folder: ``path`` (a file, or a TF prefix), the critics file
    if any, the source's own names and the sha256 of every file read."""

    path: str
    name: str  # the source's own name for it: its file name, or the TF prefix's name
    tf: bool = False
    critics_path: str | None = None
    critics_name: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    @property
    def sha256(self) -> str:
        """The main file's sha256; for a TF prefix, the sha256 of its sorted ``<sha256>  <name>`` lines."""
        if not self.tf:
            return self.files[os.path.basename(self.path)]
        lines = "".join(f"{self.files[n]}  {n}\n" for n in sorted(self.files) if n != self.critics_name)
        return hashlib.sha256(lines.encode()).hexdigest()


_GEN = re.compile(r"^gen_(\d+)\.pt$")
_TF_DATA = re.compile(r"\.data-\d+-of-\d+$")


def pick_checkpoint(names: list[str]) -> tuple[str, str | None, bool]:
    """From a folder's file names: (the checkpoint, its critics file or None, whether it is a TF prefix).

    A TF prefix (``X.index``), the newest ``gen_<N>.pt`` (with ``dis_<N>.pt`` when present: the port's own
    pairing), ``torch_model.p``, one ``*.pth``, one ``*.safetensors``. Raises ValueError when none or more
    than one kind is there, or two files of one kind (except the port's numbered snapshots).
    """
    names = sorted(n for n in names if not n.startswith("."))
    groups = {
        "TF checkpoint": [n[: -len(".index")] for n in names if n.endswith(".index")],
        "port generator": sorted((n for n in names if _GEN.match(n)), key=lambda n: int(_GEN.match(n).group(1))),
        "port TF conversion": [n for n in names if n == "torch_model.p"],
        "MMagic checkpoint": [n for n in names if n.endswith(".pth")],
        "safetensors": [n for n in names if n.endswith(".safetensors")],
    }
    present = {k: v for k, v in groups.items() if v}
    if not present:
        shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        raise ValueError(f"no checkpoint in the folder (looked for *.index, gen_*.pt, torch_model.p, *.pth, "
                         f"*.safetensors); it holds: {shown or 'nothing'}")
    if len(present) > 1:
        raise ValueError("the folder holds more than one kind of checkpoint (" + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in present.items()) + "): name the file with --source")
    kind, found = next(iter(present.items()))
    if kind == "port generator":
        gen = found[-1]
        dis = f"dis_{_GEN.match(gen).group(1)}.pt"
        return gen, dis if dis in names else None, False
    if len(found) > 1:
        raise ValueError(f"the folder holds several {kind}s ({', '.join(found)}): name one with --source")
    return found[0], None, kind == "TF checkpoint"


def _copy(fs, path: str, dst: str, limit: int, shown: str) -> str:
    """Copy one file to ``dst`` refusing more than ``limit`` bytes; returns its sha256."""
    size = fs.size(path)
    if size is not None and size > limit:
        raise ValueError(f"{shown} is {size} bytes, over --max-bytes ({limit}): refused unread")
    digest, total = hashlib.sha256(), 0
    with fs.open(path, "rb") as src, open(dst, "wb") as out:
        while block := src.read(1 << 20):
            total += len(block)
            if total > limit:
                raise ValueError(f"{shown} is over --max-bytes ({limit}): refused")
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def stage_source(source: str, folder: str, limit: int, critics: str | None = None) -> Staged:
    """Copy the source (and its critics) into ``folder``; see ``pick_checkpoint`` for folders. Raises
    FileNotFoundError when nothing is there, ValueError for a source that cannot be used."""
    from models.weights import tf_prefix
    from pipeline import storage

    shown = storage.redact(source)
    fs, path = storage.filesystem(source)
    if storage.is_s3(source):
        fs.invalidate_cache(path)
    path = path.rstrip("/") or path
    parent, base = path.rsplit("/", 1) if "/" in path else (".", path)
    critics_name = None
    if fs.isdir(path):
        listing = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        files = [n for n in listing if fs.isfile(f"{path}/{n}")]
        name, critics_name, tf = pick_checkpoint(files)
        parent = path
    elif fs.isfile(path) and not (base.endswith(".index") or _TF_DATA.search(base)):
        name, tf = base, False
        match = _GEN.match(base)
        if match and critics is None and fs.isfile(f"{parent}/dis_{match.group(1)}.pt"):
            critics_name = f"dis_{match.group(1)}.pt"
    elif fs.isfile(path) or fs.isfile(path + ".index"):
        name, tf = tf_prefix(base), True
    else:
        raise FileNotFoundError(f"no such file, folder or TF checkpoint prefix: {shown}")
    staged = Staged(path="", name=name, tf=tf)
    if tf:
        members = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False)]
        members = [n for n in members if n == name + ".index" or n == name + ".meta"
                   or (n.startswith(name + ".data-") and _TF_DATA.search(n))]
        if not any(_TF_DATA.search(n) for n in members):
            raise ValueError(f"the TF checkpoint {shown} has an index but no {name}.data-* file")
        for n in members:
            staged.files[n] = _copy(fs, f"{parent}/{n}", os.path.join(folder, n), limit, storage.join(shown, n))
        staged.path = os.path.join(folder, name)
    else:
        staged.path = os.path.join(folder, name)
        staged.files[name] = _copy(fs, f"{parent}/{name}", staged.path, limit, shown if name == base else
                                   storage.join(shown, name))
    if critics is not None:
        cfs, cpath = storage.filesystem(critics)
        if not cfs.isfile(cpath):
            raise FileNotFoundError(f"no such critics file: {storage.redact(critics)}")
        critics_name = cpath.rstrip("/").rsplit("/", 1)[-1]
        os.makedirs(os.path.join(folder, "critics"), exist_ok=True)
        staged.critics_path = os.path.join(folder, "critics", critics_name)
        staged.files[critics_name] = _copy(cfs, cpath, staged.critics_path, limit, storage.redact(critics))
    elif critics_name is not None:
        staged.critics_path = os.path.join(folder, "critics", critics_name)
        os.makedirs(os.path.dirname(staged.critics_path), exist_ok=True)
        staged.files[critics_name] = _copy(fs, f"{parent}/{critics_name}", staged.critics_path, limit,
                                           storage.join(shown, critics_name))
    staged.critics_name = critics_name
    return staged


# ----------------------------------------------------------------------------------------- the job

def convert_staged(staged: Staged, opts: ImportOptions) -> dict:
    """``models.weights.convert`` on the staged files (ValueError for anything unusable)."""
    from models import weights

    semantics = None if opts.semantics == "auto" else opts.semantics
    if staged.tf:
        if opts.format not in ("auto", "tf"):
            raise ValueError(f"{staged.name} is a TF checkpoint, not --format {opts.format}")
        if staged.critics_path:
            raise ValueError("--critics is for the PyTorch port's dis_*.pt; a TF checkpoint holds its own critics")
        return weights.convert(staged.path, "tf", semantics=semantics)
    return weights.convert(staged.path, opts.format, critics=staged.critics_path, semantics=semantics)


def provenance(staged: Staged, result: dict, source: str) -> dict:
    """What the generator file's ``extra["import"]`` records (plain values only)."""
    from pipeline.storage import redact

    return {"format": result["format"], "source": redact(source), "source_name": staged.name,
            "sha256": staged.sha256, "files": dict(staged.files), "critics_source_name": staged.critics_name,
            "semantics": result["semantics"], "cnum": int(result["cnum"])}


def write_files(result: dict, prov: dict, folder: str) -> tuple[str, str | None]:
    """Our generator file (and the critics file when there are critics) in ``folder``; returns their paths."""
    from jobs.train_state import GENERATOR_FILENAME
    from models import checkpoint, weights

    generator = weights.build_generator(result)
    gen_path = os.path.join(folder, GENERATOR_FILENAME)
    checkpoint.save_generator(gen_path, generator, step=0, config={}, extra={"import": prov})
    checkpoint.load_generator(gen_path)  # what every loader will do: it must read back
    critics_path = None
    if result.get("critics"):
        critics_path = os.path.join(folder, CRITICS_FILENAME)
        weights.save_critics(critics_path, result["critics"], result["critics_meta"], extra={"import": prov})
    return gen_path, critics_path


def register(opts: ImportOptions, gen_path: str, critics_path: str | None, result: dict, prov: dict) -> dict:
    """The MLflow run of the import: params, tags, the registered pyfunc model, critics and key map."""
    import mlflow

    from jobs.serving import log_inpaint_model
    from jobs.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(opts.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(opts.experiment)
    tags = {"deepfill.job": "import", "deepfill.import.format": prov["format"],
            "deepfill.import.sha256": prov["sha256"], "deepfill.import.source_name": prov["source_name"],
            "deepfill.import.semantics": prov["semantics"]}
    if mlflow.active_run() is not None:
        mlflow.end_run()
    with mlflow.start_run(run_name=f"import-{prov['format']}-{prov['source_name']}"[:250], tags=tags) as run:
        mlflow.log_params({"source": prov["source"][:6000], "format": prov["format"], "cnum": prov["cnum"],
                           "semantics": prov["semantics"], "tensors": len(result["names"]),
                           "ignored": len(result["ignored"]), "critics": _critic_sides(result)})
        mlflow.log_dict({"names": result["names"], "ignored": result["ignored"], "notes": result.get("notes", []),
                         "files": prov["files"]}, "import/conversion.json")
        if critics_path:
            mlflow.log_artifact(critics_path, artifact_path=CRITICS_ARTIFACT_DIR)
        info = log_inpaint_model(gen_path, name="model", registered_model_name=opts.register,
                                 alias=opts.alias or None)
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            if key != "deepfill.job":
                client.set_model_version_tag(opts.register, version, key, value)
        return {"tracking_uri": uri, "mlflow_run_id": run.info.run_id, "registered_model": opts.register,
                "version": version, "alias": opts.alias or None,
                "model_uri": f"models:/{opts.register}/{version}"}


def _critic_sides(result: dict) -> str:
    critics = result.get("critics") or {}
    return ",".join(side for side in ("local", "global") if critics.get(side) is not None) or "none"


def run(opts: ImportOptions) -> int:
    """``deepfill import`` once its options are resolved (``jobs.cli``): prints a JSON summary."""
    from jobs.tracking import resolve_tracking_uri
    from pipeline import storage
    from pipeline.config import parse_size

    if opts.register:
        resolve_tracking_uri(opts.tracking_uri)  # refuses credentials in the URI before anything is read
    with tempfile.TemporaryDirectory(prefix="deepfill-import-") as tmp:
        os.makedirs(os.path.join(tmp, "source"))
        try:
            staged = stage_source(opts.source, os.path.join(tmp, "source"), parse_size(opts.max_bytes), opts.critics)
            result = convert_staged(staged, opts)
            prov = provenance(staged, result, opts.source)
            os.makedirs(os.path.join(tmp, "out"))
            gen_path, critics_path = write_files(result, prov, os.path.join(tmp, "out"))
        except (ValueError, OSError) as err:  # the source cannot be used: one line, nothing written
            print(f"deepfill import: {storage.redact(str(err) or type(err).__name__)}", file=sys.stderr)
            return 1
        shutil.rmtree(os.path.join(tmp, "source"), ignore_errors=True)
        if opts.critics_output and not critics_path:
            print("deepfill import: --critics-output given, but the source holds no critics", file=sys.stderr)
            return 1
        summary = {"format": result["format"], "source": storage.redact(opts.source), "source_name": staged.name,
                   "sha256": staged.sha256, "cnum": int(result["cnum"]), "semantics": result["semantics"],
                   "tensors": len(result["names"]), "ignored": len(result["ignored"]),
                   "critics": _critic_sides(result), "output": None, "critics_output": None,
                   "notes": result.get("notes", [])}
        if opts.output:
            storage.put_file_atomic(gen_path, opts.output)
            summary["output"] = storage.redact(opts.output)
        if opts.critics_output:
            storage.put_file_atomic(critics_path, opts.critics_output)
            summary["critics_output"] = storage.redact(opts.critics_output)
        if opts.register:
            summary.update(register(opts, gen_path, critics_path, result, prov))
            summary["tracking_uri"] = storage.redact(summary["tracking_uri"])
    print(json.dumps(summary, indent=2))
    return 0


# ----------------------------------------------------------------------------------------- init.critics

def fetch_critics(ref: str) -> tuple[dict, dict]:
    """The critics behind ``train``'s ``init.critics`` -> ({"local": sd | None, "global": sd | None, "cnum",
    ...}, info). ref: a critics file (``deepfill import --critics-output``; local or s3://), a training
    checkpoint folder (its ``train_state.pt``) or a Ray Train run folder (the newest checkpoint),
    ``runs:/<run_id>/critics/critics.pt``, or ``models:/name@alias`` / ``models:/name/N`` (the critics the
    run that logged that version left in ``critics/critics.pt``: an import run with critics). The MLflow
    tracking URI must already be set for models:/ and runs:/ refs. Raises ValueError / FileNotFoundError."""
    from jobs import train_state
    from models import weights
    from pipeline import storage

    info: dict = {"ref": storage.redact(ref)}
    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        from jobs.serving import resolve_model_version

        uri = ref
        if ref.startswith("models:/"):
            mv = resolve_model_version(ref)
            info.update({k: mv[k] for k in ("model_name", "model_version", "run_id", "model_uri")})
            uri = f"runs:/{mv['run_id']}/{CRITICS_ARTIFACT}"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
            except Exception as err:  # noqa: BLE001 - MLflow raises several types for a missing artifact
                raise ValueError(f"init.critics: no critics at {uri} ({type(err).__name__}); the run that logged "
                                 f"the model must be an import run of a source with critics") from None
            if os.path.isdir(local):
                local = os.path.join(local, CRITICS_FILENAME)
            return weights.load_critics(local, os.path.basename(local)), info
    fs, path = storage.filesystem(ref)
    if fs.isdir(path):
        folder = ref
        if not fs.exists(f"{path.rstrip('/')}/{train_state.TRAIN_STATE_FILENAME}"):
            if fs.exists(f"{path.rstrip('/')}/{CRITICS_FILENAME}"):
                return weights.load_critics(storage.read_bytes(storage.join(ref, CRITICS_FILENAME)),
                                            CRITICS_FILENAME), info
            folder = train_state.latest_checkpoint(ref)
            if folder is None:
                raise FileNotFoundError(f"init.critics: no {train_state.TRAIN_STATE_FILENAME} or {CRITICS_FILENAME} "
                                        f"in {storage.redact(ref)}")
            info["checkpoint"] = folder.rstrip("/").rsplit("/", 1)[-1]
        import io

        import torch

        blob = storage.read_bytes(storage.join(folder, train_state.TRAIN_STATE_FILENAME))
        state = train_state._checked_state(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True),
                                           storage.redact(folder))
        return {"local": state["local_critic"], "global": state["global_critic"]}, info
    if not fs.exists(path):
        raise FileNotFoundError(f"init.critics: no such file {storage.redact(ref)}")
    return weights.load_critics(storage.read_bytes(ref), os.path.basename(path)), info


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["import", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
