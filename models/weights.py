"""Released DeepFill v1 weights -> our generator (and critics): the PyTorch port, MMagic, the TF release.

One entry point, ``convert(path_or_state, format="auto")``, returns a plain dict::

    {"format": "port" | "mmagic" | "tf",
     "cnum": int,                       # generator base width (32 for every released model)
     "generator": state_dict,           # loads into models.InpaintGenerator(cnum=cnum), strictly
     "critics": None | {"local": state_dict | None, "global": state_dict | None},
     "critics_meta": None | {"cnum": int, "local_size": int, "global_size": int},
     "names": {our key: source key},    # generator keys as they are, critics as local_critic.* / global_critic.*
     "ignored": {source key: the rule that leaves it out},
     "semantics": "torch" | "tf",       # how the weights were trained to run (padding and resizes; below)
     "notes": [str, ...]}               # what a user should know about running these weights here

Every source tensor is used or ignored by a named rule, and every parameter is filled; otherwise a
ValueError names the first tensor that is not (with both shapes where there are two). Tensors are copied
as float32; for the PyTorch formats the layout is already ours (conv OIHW, linear (out, in) over NCHW
features), so each tensor is copied unchanged.

The formats, and where their names come from:

- ``port`` (daa233/generative-inpainting-pytorch, ``model/networks.py``): ``gen_*.pt`` is the
  ``Generator``'s state dict, ``coarse_generator.{conv1, conv2_downsample, conv3, conv4_downsample, conv5,
  conv6, conv7_atrous .. conv10_atrous, conv11 .. conv17}.conv.{weight,bias}`` and
  ``fine_generator.{conv1 .. conv10_atrous, pmconv1 .. pmconv6, pmconv9, pmconv10, allconv11 ..
  allconv17}.conv.{weight,bias}`` (``Conv2dBlock.conv``; its ``pad`` is a ZeroPad2d(0) without weights).
  The layers map one to one, in order, onto ours. ``dis_*.pt`` is ``{"localD": ..., "globalD": ...}``,
  each ``dis_conv_module.conv1..4.conv.{weight,bias}`` + ``linear.{weight,bias}``; its global critic is
  ours, its local critic ends with 4*ndf channels where ours (as the TF release) has 8*ndf, so the port's
  local critic is ignored and ours starts fresh. ``torch_model.p`` (the port's conversion of the TF
  release, loaded by its ``test_tf_model.py`` into the whole trainer) holds the same generator keys under
  ``netG.`` (and critics under ``localD.`` / ``globalD.`` if present).
  Semantics: the port runs PyTorch padding (``padding=1`` on both sides of its stride-2 convolutions) and
  ``F.interpolate(mode="nearest")``, i.e. ours ("torch"). Its own ``gen_*.pt`` were trained so: "torch".
  ``torch_model.p`` holds the TF release's weights, trained with TF 'SAME' padding and align-corners
  resizes: "tf" reproduces the release (the port's ``test_tf_model.py`` runs them under torch semantics,
  which shifts every stride-2 layer by half a pixel); ``semantics="torch"`` reproduces the port instead.
- ``mmagic`` (OpenMMLab MMagic / MMEditing, ``mmagic/models/editors/deepfillv1`` and the ``global_local``
  dilation neck, config ``configs/_base_/models/base_deepfillv1.py``): an MMEngine checkpoint whose
  ``state_dict`` holds ``generator.stage1.{encoder.enc1..6, dilation_neck.dilation_convs.0..3,
  decoder.dec1..7}.conv.{weight,bias}``, ``generator.stage2.{encoder_conv.enc1..6,
  dilation_neck.dilation_convs.0..3, encoder_attention.enc1..6, contextual_attention_neck.conv1..2,
  decoder.dec1..7}.conv.{weight,bias}`` (mmcv ``ConvModule.conv``), the attention's fixed
  ``contextual_attention_neck.contextual_attention.fuse_kernel`` (an identity buffer, ignored) and the
  critics ``disc.{global_disc, local_disc}.{conv1..4.conv, fc.linear}.{weight,bias}``
  (``MultiLayerDiscriminator``). Semantics "torch", with differences no setting here reproduces (notes):
  MMagic's released configs pad by reflection, its attention branch ends in ELU where ours has ReLU, and
  its critics use ELU and a LeakyReLU on the score.
- ``tf`` (JiahuiYu/generative_inpainting v1.0.0): a TF checkpoint prefix, converted by
  ``models.weights_tf.convert_tf`` (same dict; its list of ignored names becomes {name: its rule});
  semantics "tf".

Files are read with ``torch.load(..., weights_only=True)`` only (tensors and plain values; a file that
needs code to unpickle is refused, naming what it asked for), or as ``.safetensors`` (read here: a JSON
header and raw little-endian tensors, no dependency). Imports only torch, numpy and the standard library.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
from collections.abc import Mapping

import torch

from models.critics import global_critic, local_critic
from models.generator import InpaintGenerator

FORMATS = ("port", "mmagic", "tf")
SEMANTICS = ("torch", "tf")
CRITICS_FORMAT = "deepfill-ray/critics/1"

# ----------------------------------------------------------------------------------------- key maps
# Our conv layers in order, each (sequential, index); a GenDeconv's conv sits one level deeper.
_OURS = ([("coarse", i) for i in range(17)] + [("refine_conv", i) for i in range(10)]
         + [("refine_attn_in", i) for i in range(6)] + [("refine_attn_out", i) for i in range(2)]
         + [("refine_dec", i) for i in range(7)])
_DECONVS = {("coarse", 12), ("coarse", 14), ("refine_dec", 2), ("refine_dec", 4)}


def _our_prefix(seq: str, i: int) -> str:
    return f"{seq}.{i}.conv.conv" if (seq, i) in _DECONVS else f"{seq}.{i}.conv"


_PORT_COARSE = ["conv1", "conv2_downsample", "conv3", "conv4_downsample", "conv5", "conv6", "conv7_atrous",
                "conv8_atrous", "conv9_atrous", "conv10_atrous", "conv11", "conv12", "conv13", "conv14",
                "conv15", "conv16", "conv17"]
_PORT_FINE = (_PORT_COARSE[:10] + ["pmconv1", "pmconv2_downsample", "pmconv3", "pmconv4_downsample", "pmconv5",
                                   "pmconv6", "pmconv9", "pmconv10"]
              + [f"allconv{i}" for i in range(11, 18)])
PORT_LAYERS = [f"coarse_generator.{n}" for n in _PORT_COARSE] + [f"fine_generator.{n}" for n in _PORT_FINE]

MMAGIC_LAYERS = (
    [f"stage1.encoder.enc{i}" for i in range(1, 7)]
    + [f"stage1.dilation_neck.dilation_convs.{i}" for i in range(4)]
    + [f"stage1.decoder.dec{i}" for i in range(1, 8)]
    + [f"stage2.encoder_conv.enc{i}" for i in range(1, 7)]
    + [f"stage2.dilation_neck.dilation_convs.{i}" for i in range(4)]
    + [f"stage2.encoder_attention.enc{i}" for i in range(1, 7)]
    + [f"stage2.contextual_attention_neck.conv{i}" for i in (1, 2)]
    + [f"stage2.decoder.dec{i}" for i in range(1, 8)]
)
_MMAGIC_FUSE = "stage2.contextual_attention_neck.contextual_attention.fuse_kernel"


def generator_names(fmt: str, prefix: str = "") -> dict[str, str]:
    """{our generator key: source key} for ``fmt`` ("port" or "mmagic"), source keys under ``prefix``."""
    if fmt == "port":
        layers = [prefix + name + ".conv" for name in PORT_LAYERS]
    elif fmt == "mmagic":
        layers = [prefix + name + ".conv" for name in MMAGIC_LAYERS]
    else:
        raise ValueError(f"no key map for format {fmt!r} (known: port, mmagic)")
    return {f"{_our_prefix(*ours)}.{p}": f"{src}.{p}" for ours, src in zip(_OURS, layers) for p in ("weight", "bias")}


def _critic_names(prefix: str, convs: list[str], linear: str, ours: str) -> dict[str, str]:
    names = {f"{ours}.features.{i}.conv.{p}": f"{prefix}{c}.{p}" for i, c in enumerate(convs) for p in ("weight", "bias")}
    names.update({f"{ours}.linear.{p}": f"{prefix}{linear}.{p}" for p in ("weight", "bias")})
    return names


_PORT_DIS = (["dis_conv_module.conv1.conv", "dis_conv_module.conv2.conv", "dis_conv_module.conv3.conv",
              "dis_conv_module.conv4.conv"], "linear")
_MMAGIC_DIS = (["conv1.conv", "conv2.conv", "conv3.conv", "conv4.conv"], "fc.linear")

# ----------------------------------------------------------------------------------------- reading files


def _refuse_pickle(err: Exception, where: str) -> ValueError:
    wanted = re.search(r"GLOBAL ([A-Za-z_][\w]*(?:\.[\w]+)+)", str(err))
    if wanted:
        return ValueError(f"refusing to unpickle code: {where} needs {wanted.group(1)} to load, and only "
                          f"tensors and plain values are read (torch.load(weights_only=True)); if you trust the "
                          f"file, re-save just its tensors: torch.save(<its state dict>, 'weights.pt')")
    return ValueError(f"cannot read {where}: not a complete torch file (truncated or corrupt: "
                      f"{str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__})")


def load_file(source, name: str | None = None) -> dict:
    """A checkpoint file (path, bytes or binary file object) -> its top-level dict, read safely.

    ``.safetensors`` content (by its header) is parsed here; anything else goes through
    ``torch.load(weights_only=True)``. Raises ValueError with a one-line reason: empty, truncated, corrupt,
    not a dict, or needing code to unpickle ("refusing to unpickle code: ...").
    """
    if isinstance(source, (str, os.PathLike)):
        where = name or os.path.basename(os.fspath(source))
        with open(source, "rb") as f:
            data = f.read()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        where, data = name or "the source", bytes(source)
    else:
        where, data = name or "the source", source.read()
    if not data:
        raise ValueError(f"cannot read {where}: the file is empty")
    if where.endswith(".safetensors") or _looks_like_safetensors(data):
        return read_safetensors(data, where)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refuse_pickle(err, where) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read {where}: not a torch checkpoint, or truncated or corrupt ({detail})") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"cannot read {where}: expected a dict of tensors, got {type(state).__name__}")
    return dict(state)


def _looks_like_safetensors(data: bytes) -> bool:
    return len(data) > 9 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_safetensors(data: bytes, where: str = "the source") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (8-byte little-endian header length, JSON header, raw data).
    Floating dtypes only (weights); every offset is checked against the file."""
    if len(data) < 8:
        raise ValueError(f"cannot read {where}: truncated safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"cannot read {where}: truncated safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {where}: corrupt safetensors header ({err})") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = _ST_DTYPES[spec["dtype"]], [int(s) for s in spec["shape"]], spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"cannot read {where}: tensor {key!r} has an unsupported entry {spec!r}") from None
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not (0 <= start <= end <= len(body)) or end - start != size:
            raise ValueError(f"cannot read {where}: tensor {key!r} lies outside the file (truncated?)")
        out[key] = torch.frombuffer(bytearray(body[start:end]), dtype=dtype).reshape(shape) if size else \
            torch.empty(shape, dtype=dtype)
    return out


def flat_tensors(state: Mapping, prefix: str = "") -> dict:
    """Nested dicts of tensors -> {"a.b.c": tensor or other leaf}, keys joined with '.'."""
    out = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_tensors(v, key + "."))
        else:
            out[key] = v
    return out


# ----------------------------------------------------------------------------------------- detection

def _strip_module(keys) -> str:
    """'module.' when every key carries DataParallel's prefix, else ''."""
    keys = list(keys)
    return "module." if keys and all(k.startswith("module.") for k in keys) else ""


def detect_format(keys) -> str:
    """Which released format a set of (flattened) source keys belongs to: "port", "mmagic" or "tf".

    Raises ValueError listing what it saw (the first few top-level names) when none fits.
    """
    keys = [str(k) for k in keys]
    strip = len(_strip_module(keys))
    body = [k[strip:] for k in keys]
    if any(k.startswith(("coarse_generator.", "fine_generator.", "netG.coarse_generator.")) for k in body):
        return "port"
    if any(k.startswith(("localD.dis_conv_module.", "globalD.dis_conv_module.")) for k in body):
        return "port"
    if any(k.startswith(("generator.stage1.", "generator.stage2.", "state_dict.generator.stage1.")) for k in body):
        return "mmagic"
    if any(k.startswith(("stage1.encoder.", "stage2.encoder_conv.")) for k in body):
        return "mmagic"
    if any(k.startswith("inpaint_net/") for k in body):
        return "tf"
    seen = sorted({k.split(".", 1)[0].split("/", 1)[0] for k in body})
    if any(k.startswith(("coarse.0.", "refine_dec.")) for k in body) or "format" in seen:
        raise ValueError("this is already a deepfill-ray generator or checkpoint, not a released format: use it "
                         "directly (init.generator=<file>, --model <file>)")
    shown = ", ".join(seen[:12]) + (f", ... ({len(seen)} in all)" if len(seen) > 12 else "")
    raise ValueError(f"unknown weights format: expected the PyTorch port's keys (coarse_generator.*, "
                     f"fine_generator.*, netG.*, localD.*/globalD.*), MMagic's (state_dict with generator.stage1.*, "
                     f"generator.stage2.*) or a TF checkpoint (inpaint_net/*); saw top-level names: {shown or 'none'}")


# ----------------------------------------------------------------------------------------- conversion

def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _take(src: dict, names: dict[str, str], expected: dict[str, tuple], what: str) -> dict[str, torch.Tensor]:
    """{our key: float32 copy of src[names[our key]]}, every shape checked against ``expected``."""
    out = {}
    for ours, theirs in names.items():
        if theirs not in src:
            raise ValueError(f"{what}: the source has no {theirs} for our {ours} {tuple(expected[ours])}")
        t = src[theirs]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what}: {theirs} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(expected[ours]):
            raise ValueError(f"{what}: {theirs} has shape {_shape(t)}, our {ours} needs {tuple(expected[ours])}")
        if not t.is_floating_point():
            raise ValueError(f"{what}: {theirs} holds {t.dtype}, not floating-point weights")
        t = t.detach().to(torch.float32).clone()
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {theirs} holds non-finite values (nan or inf)")
        out[ours] = t
    return out


def _generator_shapes(cnum: int, attention: str = "contextual") -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in InpaintGenerator(cnum=cnum, attention=attention).state_dict().items()}


def _first_conv_width(src: dict, key: str, what: str) -> int:
    t = src.get(key)
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        raise ValueError(f"{what}: the source has no 4-d {key} (the first convolution): got {_shape(t) or 'nothing'}")
    cnum = int(t.shape[0])
    if cnum < 2 or cnum % 2:
        raise ValueError(f"{what}: {key} has {cnum} output channels; the generator width must be even")
    return cnum


def _critic(src: dict, prefix: str, layout: tuple[list[str], str], side: str, ours: str, what: str):
    """(state dict, cnum, size) of one critic under ``prefix``, or (None, reason, None) when the source's
    local critic has the port's 4c last layer."""
    convs, linear = layout
    first = f"{prefix}{convs[0]}.weight"
    c = _first_conv_width(src, first, what) if first in src else None
    if c is None:
        raise ValueError(f"{what}: the {side} critic has no {first}")
    last = src.get(f"{prefix}{convs[-1]}.weight")
    mult = int(last.shape[0]) // c if isinstance(last, torch.Tensor) and last.dim() == 4 else 0
    want_mult = 8 if side == "local" else 4
    if side == "local" and mult == 4:
        return None, ("the port's LocalDis ends with 4*ndf channels; our local critic (as the TF release) has "
                      "8*ndf: not loadable, our local critic starts fresh"), None
    if mult != want_mult:
        raise ValueError(f"{what}: {prefix}{convs[-1]}.weight has shape {_shape(last)}; our {side} critic's last "
                         f"convolution needs ({want_mult * c}, {4 * c}, 5, 5)")
    fc = src.get(f"{prefix}{linear}.weight")
    cells = int(fc.shape[-1]) // (mult * c) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 0
    side_cells = math.isqrt(cells)
    if side_cells * side_cells != cells or not cells:
        raise ValueError(f"{what}: {prefix}{linear}.weight has shape {_shape(fc)}, not (1, {mult * c} x s x s) "
                         f"for a square input")
    size = 16 * side_cells
    with torch.device("meta"):
        net = local_critic(c, size) if side == "local" else global_critic(c, size)
        expected = {f"{ours}.{k}": tuple(v.shape) for k, v in net.state_dict().items()}
    names = _critic_names(prefix, convs, linear, ours)
    taken = _take(src, names, expected, what)
    return {k[len(ours) + 1:]: v for k, v in taken.items()}, (c, size), names


def _convert_torch_format(src: dict, fmt: str, what: str) -> dict:
    """port / mmagic: flattened source tensors -> the result dict (see the module docstring)."""
    ignored: dict[str, str] = {}
    strip = _strip_module(src)
    if strip:
        src = {k[len(strip):]: v for k, v in src.items()}
    notes: list[str] = []
    if fmt == "port":
        gen_prefix = "netG." if any(k.startswith("netG.") for k in src) else ""
        gen_key = f"{gen_prefix}coarse_generator.conv1.conv.weight"
        critic_parts = [("local", "localD.", _PORT_DIS), ("global", "globalD.", _PORT_DIS)]
        semantics = "tf" if gen_prefix else "torch"
        if gen_prefix:
            notes.append("torch_model.p holds the TF release's weights: semantics 'tf' reproduces the release; "
                         "'torch' reproduces the port's test_tf_model.py")
    else:
        gen_prefix = "generator." if any(k.startswith("generator.") for k in src) else ""
        gen_key = f"{gen_prefix}stage1.encoder.enc1.conv.weight"
        critic_parts = [("local", "disc.local_disc.", _MMAGIC_DIS), ("global", "disc.global_disc.", _MMAGIC_DIS)]
        semantics = "torch"
        if f"{gen_prefix}{_MMAGIC_FUSE}" in src:
            ignored[f"{gen_prefix}{_MMAGIC_FUSE}"] = "the attention's fixed identity fuse kernel (a buffer, not a weight)"
        notes.append("MMagic's released configs pad by reflection and end the attention branch in ELU (ours: zero "
                     "padding, ReLU): outputs differ from MMagic's until fine-tuned")
    if gen_key not in src:
        if any(k.startswith(("localD.", "globalD.", "disc.")) for k in src):
            raise ValueError(f"{what} holds critics only (a discriminator file): convert the generator file "
                             f"(gen_*.pt) and pass this one as its critics")
        raise ValueError(f"{what}: no {gen_key}: not a DeepFill v1 {fmt} generator")
    cnum = _first_conv_width(src, gen_key, what)
    names = generator_names(fmt, gen_prefix)
    generator = _take(src, names, _generator_shapes(cnum), what)

    critics, meta = None, None
    found = [(side, p, lay) for side, p, lay in critic_parts if any(k.startswith(p) for k in src)]
    if found:
        critics, sizes, c_seen = {"local": None, "global": None}, {}, set()
        for side, prefix, layout in found:
            ours = f"{side}_critic"
            sd, info, cnames = _critic(src, prefix, layout, side, ours, what)
            if sd is None:
                ignored.update({k: info for k in src if k.startswith(prefix)})
                notes.append(info)
                continue
            critics[side] = sd
            names.update(cnames)
            c_seen.add(info[0])
            sizes[f"{side}_size"] = info[1]
        if len(c_seen) > 1:
            raise ValueError(f"{what}: the critics have different widths {sorted(c_seen)}")
        if c_seen:
            meta = {"cnum": c_seen.pop(), "local_size": sizes.get("local_size", sizes.get("global_size", 256) // 2),
                    "global_size": sizes.get("global_size", sizes.get("local_size", 128) * 2)}
        else:
            critics = None
        if fmt == "mmagic" and meta:
            notes.append("MMagic's critics use ELU and a LeakyReLU on the score (ours: LeakyReLU, a linear score): "
                         "a warm start for fine-tuning, not the same function")
    used = set(names.values())
    for key, value in src.items():
        if key in used or key in ignored:
            continue
        if fmt == "mmagic" and key.startswith("data_preprocessor."):
            ignored[key] = "MMagic's input normalisation buffers (mean/std 127.5: our [-1, 1] range)"
            continue
        raise ValueError(f"{what}: unexpected source tensor {key} {_shape(value)}: not part of a DeepFill v1 "
                         f"{fmt} model")
    return {"format": fmt, "cnum": cnum, "generator": generator, "critics": critics, "critics_meta": meta,
            "names": names, "ignored": ignored, "semantics": semantics, "notes": notes}


_BOOKKEEPING = ("meta", "optimizer", "optimizers", "message_hub", "param_schedulers", "epoch", "iter", "step",
                "config", "ema_state_dict")


def _source_tensors(state: Mapping, what: str) -> tuple[dict, dict[str, str]]:
    """A loaded file -> (flattened tensors to convert, {top-level key: rule} left out as bookkeeping)."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        rest = {k: "checkpoint bookkeeping (not weights)" for k in state if k != "state_dict"}
        return flat_tensors(state["state_dict"]), rest
    ignored = {k: "checkpoint bookkeeping (not weights)" for k in state if k in _BOOKKEEPING
               and not isinstance(state[k], torch.Tensor)}
    return flat_tensors({k: v for k, v in state.items() if k not in ignored}), ignored


def convert(path_or_state, format: str = "auto", *, critics=None, semantics: str | None = None) -> dict:
    """Convert released weights to ours (the dict in the module docstring).

    path_or_state: a file path (``.pt``, ``.p``, ``.pth``, ``.safetensors``), its bytes, an already loaded
    dict, or for "tf" a checkpoint prefix. format: "auto" (``detect_format`` on the keys; a path with a
    ``.index`` file beside it is "tf"), "port", "mmagic" or "tf". critics: a second source with the critics
    (the port's ``dis_*.pt``), merged before converting. semantics: override the format's own ("torch" or
    "tf"), e.g. to run the port's torch_model.p exactly as the port does. Raises ValueError.
    """
    if format not in ("auto", *FORMATS):
        raise ValueError(f"unknown format {format!r}: use auto, {', '.join(FORMATS)}")
    if semantics is not None and semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}: use {' or '.join(SEMANTICS)}")
    is_path = isinstance(path_or_state, (str, os.PathLike))
    if format == "tf" or (format == "auto" and is_path and _is_tf_prefix(os.fspath(path_or_state))):
        result = _convert_tf(path_or_state)
    else:
        what = os.path.basename(os.fspath(path_or_state)) if is_path else "the source"
        state = path_or_state if isinstance(path_or_state, Mapping) else load_file(path_or_state, what)
        tensors, bookkeeping = _source_tensors(state, what)
        if critics is not None:
            cname = os.path.basename(os.fspath(critics)) if isinstance(critics, (str, os.PathLike)) else "the critics"
            cstate = critics if isinstance(critics, Mapping) else load_file(critics, cname)
            ctensors, cbook = _source_tensors(cstate, cname)
            clash = sorted(set(ctensors) & set(tensors))
            if clash:
                raise ValueError(f"{cname}: {clash[0]} is in both the generator and the critics source")
            tensors.update(ctensors)
            bookkeeping.update(cbook)
        detected = detect_format(tensors)
        if format != "auto" and detected != format:
            raise ValueError(f"{what}: --format {format} given, but the keys are {detected}'s")
        if detected == "tf":
            raise ValueError(f"{what}: TF variables inside a torch file; pass the TF checkpoint prefix instead")
        result = _convert_torch_format(tensors, detected, what)
        result["ignored"] = {**bookkeeping, **result["ignored"]}
    if semantics is not None and semantics != result["semantics"]:
        result["notes"] = [*result.get("notes", []),
                           f"semantics set to {semantics!r} (the format's own is {result['semantics']!r})"]
        result["semantics"] = semantics
    return result


def _is_tf_prefix(path: str) -> bool:
    return path.endswith(".index") or bool(re.search(r"\.data-\d+-of-\d+$", path)) or (
        not os.path.exists(path) and os.path.exists(path + ".index"))


def tf_prefix(path: str) -> str:
    """A TF checkpoint prefix from the prefix itself, its ``.index`` or one of its ``.data-*`` files."""
    path = os.fspath(path)
    if path.endswith(".index"):
        return path[: -len(".index")]
    return re.sub(r"\.data-\d+-of-\d+$", "", path)


def _convert_tf(prefix) -> dict:
    from models import weights_tf  # the TF release's reader and key map (its own module)

    result = dict(weights_tf.convert_tf(tf_prefix(os.fspath(prefix))))
    result.setdefault("format", "tf")
    result.setdefault("semantics", "tf")
    result.setdefault("notes", [])
    result.setdefault("critics", None)
    result.setdefault("critics_meta", None)
    ignored = result.get("ignored") or {}
    if not isinstance(ignored, Mapping):  # weights_tf lists the names; the rule is its ignore_rule
        ignored = {name: weights_tf.ignore_rule(name) or "ignored by models.weights_tf" for name in ignored}
    result["ignored"] = dict(ignored)
    check_generator_state(result["generator"], int(result["cnum"]), "the TF checkpoint")
    return result


# ----------------------------------------------------------------------------------------- using the result

def check_generator_state(state: Mapping, cnum: int, what: str = "the weights",
                          attention: str = "contextual") -> None:
    """Every key and shape of ``InpaintGenerator(cnum, attention=attention)`` present in ``state`` and nothing
    else; ValueError naming the first that is not."""
    load_into_shapes(_generator_shapes(cnum, attention), state, what)


def load_into_shapes(expected: Mapping[str, tuple], state: Mapping, what: str) -> None:
    for key, shape in expected.items():
        if key not in state:
            raise ValueError(f"{what}: no tensor for {key} {tuple(shape)}")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"{what}: {key} has shape {_shape(state[key])}, here it needs {tuple(shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{what}: unexpected tensor {extra[0]} {_shape(state[extra[0]])}")


def load_into(module: torch.nn.Module, state: Mapping, what: str) -> None:
    """``module.load_state_dict(state)`` after checking every key and shape, so a mismatch is one
    ValueError naming the tensor and both shapes (not torch's multi-line RuntimeError)."""
    load_into_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, what)
    module.load_state_dict(dict(state))


def make_generator(cnum: int, semantics: str = "torch", attention: str = "contextual") -> InpaintGenerator:
    """``InpaintGenerator(cnum)`` running with ``semantics`` ("torch" is the default build); attention
    "contextual" (DeepFill v1) or "none" (the paper's baseline without the attention branch)."""
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}: use {' or '.join(SEMANTICS)}")
    return InpaintGenerator(cnum=cnum, semantics=semantics, attention=attention)


def build_generator(result: Mapping) -> InpaintGenerator:
    """The converted generator (CPU, float32), with the result's semantics."""
    g = make_generator(int(result["cnum"]), result.get("semantics", "torch"))
    load_into(g, result["generator"], f"the converted {result.get('format', '')} generator".replace("  ", " "))
    return g


def critics_state(critics: Mapping, meta: Mapping, extra: Mapping | None = None) -> dict:
    """The critics file's dict: {"format", "local", "global", "cnum", "local_size", "global_size", "extra"};
    a side may be None (the source had no loadable critic for it: ours starts fresh)."""
    return {"format": CRITICS_FORMAT, "local": critics.get("local"), "global": critics.get("global"),
            "cnum": int(meta["cnum"]), "local_size": int(meta["local_size"]),
            "global_size": int(meta["global_size"]), "extra": dict(extra or {})}


def save_critics(f, critics: Mapping, meta: Mapping, extra: Mapping | None = None) -> None:
    """Write a critics file (``critics_state``) to a path or binary file object; read by ``load_critics``."""
    torch.save(critics_state(critics, meta, extra), f)


def load_critics(source, name: str = "the critics file") -> dict:
    """Read a critics file (path, bytes or file object) with weights_only=True; returns ``critics_state``'s
    dict. Raises ValueError for anything else."""
    state = load_file(source, name)
    if state.get("format") != CRITICS_FORMAT:
        raise ValueError(f"{name} is not a {CRITICS_FORMAT} file (format {state.get('format')!r})")
    return state
