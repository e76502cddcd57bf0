"""The authors' TensorFlow release of DeepFill v1 -> our generator and critics, read without TensorFlow.

The release (JiahuiYu/generative_inpainting v1.0.0; Places2, CelebA-HQ, CelebA and ImageNet models at 256x256)
ships TF checkpoints (``<prefix>.index`` + ``<prefix>.data-00000-of-00001``, read by ``models.tf_bundle``).
Its variable names come from ``inpaint_model.py`` and neuralgym's layers (tf.layers.conv2d / dense:
``<scope>/kernel`` and ``<scope>/bias``):

- generator ``inpaint_net/<layer>/{kernel,bias}``, in order: coarse ``conv1, conv2_downsample, conv3,
  conv4_downsample, conv5, conv6, conv7_atrous .. conv10_atrous, conv11, conv12, conv13_upsample, conv14,
  conv15_upsample, conv16, conv17``; dilated branch ``xconv1, xconv2_downsample, xconv3, xconv4_downsample,
  xconv5, xconv6, xconv7_atrous .. xconv10_atrous``; attention branch ``pmconv1, pmconv2_downsample, pmconv3,
  pmconv4_downsample, pmconv5, pmconv6`` (before the attention) and ``pmconv9, pmconv10`` (after); decoder
  ``allconv11, allconv12, allconv13_upsample, allconv14, allconv15_upsample, allconv16, allconv17``. A
  ``gen_deconv`` layer ``X`` (the ``*_upsample`` ones) holds its convolution in ``X/X_conv/``.
- critics ``discriminator/discriminator_local/conv1..4/{kernel,bias}`` + ``discriminator/dout_local_fc/
  {kernel,bias}`` (local critic, on the 128x128 crop) and ``discriminator/discriminator_global/conv1..4`` +
  ``discriminator/dout_global_fc`` (global critic, 256x256). Issue #11 of the release: the Places2 file has no
  discriminator variables; then "critics" is None.

Layout: convolution kernels are HWIO (-> our OIHW: transpose (3, 2, 0, 1)); the dense kernels are
(features, 1) over the NHWC-flattened last feature map (-> our Linear (1, features) over NCHW: reordered).
Conversion copies values to float32 and changes nothing else; the weights run as trained only with the
release's padding and resizes, ``semantics="tf"`` (``models.layers``; the result says so).

Ignored, by rule (``IGNORE_RULES``; anything else that is not a weight above is an error): optimizer state of
tf.train.AdamOptimizer, the trainer's optimizer: its slots ``<var>/Adam`` and ``<var>/Adam_<n>`` (first and
second moments) and its accumulators ``beta1_power`` and ``beta2_power`` (``_<n>`` for a second optimizer,
at any scope); and the training step counter ``global_step``.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from models.critics import global_critic, local_critic
from models.generator import InpaintGenerator
from models.tf_bundle import list_bundle, read_bundle, resolve_prefix

# Our nn.Sequential -> the release's layer names, in order (gen_deconv layers hold X/X_conv).
GENERATOR_LAYERS = {
    "coarse": ["conv1", "conv2_downsample", "conv3", "conv4_downsample", "conv5", "conv6", "conv7_atrous",
               "conv8_atrous", "conv9_atrous", "conv10_atrous", "conv11", "conv12", "conv13_upsample", "conv14",
               "conv15_upsample", "conv16", "conv17"],
    "refine_conv": ["xconv1", "xconv2_downsample", "xconv3", "xconv4_downsample", "xconv5", "xconv6",
                    "xconv7_atrous", "xconv8_atrous", "xconv9_atrous", "xconv10_atrous"],
    "refine_attn_in": ["pmconv1", "pmconv2_downsample", "pmconv3", "pmconv4_downsample", "pmconv5", "pmconv6"],
    "refine_attn_out": ["pmconv9", "pmconv10"],
    "refine_dec": ["allconv11", "allconv12", "allconv13_upsample", "allconv14", "allconv15_upsample",
                   "allconv16", "allconv17"],
}
GENERATOR_SCOPE = "inpaint_net"
CRITIC_SCOPE = "discriminator"
CRITICS = {"local": ("discriminator_local", "dout_local_fc"), "global": ("discriminator_global", "dout_global_fc")}
IGNORE_RULES = (
    (re.compile(r"(^|/)Adam(_\d+)?$"), "Adam optimizer slot (<var>/Adam, <var>/Adam_<n>)"),
    (re.compile(r"(^|/)beta[12]_power(_\d+)?$"), "Adam optimizer accumulator (beta1_power, beta2_power)"),
    (re.compile(r"^global_step$"), "training step counter"),
)


def looks_like_tf(path) -> bool:
    """Cheap check: `path` is a TF checkpoint prefix (``<path>.index`` exists), its ``.index`` or ``.data-*``
    file, or a folder holding a ``checkpoint`` file or exactly one ``.index`` file; and that .index ends with
    the SSTable magic number. Reads 8 bytes."""
    try:
        prefix = resolve_prefix(path)
        with open(prefix + ".index", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() < 48:
                return False
            fh.seek(-8, os.SEEK_END)
            return int.from_bytes(fh.read(8), "little") == 0xDB4775248B80FB57
    except (OSError, ValueError):
        return False


def generator_names(cnum: int = 32) -> dict[str, str]:
    """{our generator parameter: release variable} for InpaintGenerator(cnum), in our parameter order."""
    names = {}
    for seq, layers in GENERATOR_LAYERS.items():
        for i, layer in enumerate(layers):
            ours = f"{seq}.{i}.conv.conv" if layer.endswith("_upsample") else f"{seq}.{i}.conv"
            src = f"{GENERATOR_SCOPE}/{layer}/{layer}_conv" if layer.endswith("_upsample") else \
                f"{GENERATOR_SCOPE}/{layer}"
            names[f"{ours}.weight"] = f"{src}/kernel"
            names[f"{ours}.bias"] = f"{src}/bias"
    return names


def critic_names(side: str) -> dict[str, str]:
    """{our critic parameter: release variable} for the "local" or "global" critic (models.critics)."""
    convs, fc = CRITICS[side]
    names = {}
    for i in range(4):
        names[f"features.{i}.conv.weight"] = f"{CRITIC_SCOPE}/{convs}/conv{i + 1}/kernel"
        names[f"features.{i}.conv.bias"] = f"{CRITIC_SCOPE}/{convs}/conv{i + 1}/bias"
    names["linear.weight"] = f"{CRITIC_SCOPE}/{fc}/kernel"
    names["linear.bias"] = f"{CRITIC_SCOPE}/{fc}/bias"
    return names


def ignore_rule(name: str) -> str | None:
    """Why the source tensor `name` is deliberately not used (IGNORE_RULES), or None."""
    for pattern, why in IGNORE_RULES:
        if pattern.search(name):
            return why
    return None


def convert_tf(prefix: str) -> dict:
    """Convert the TF release checkpoint at `prefix` (anything ``models.tf_bundle.resolve_prefix`` accepts).

    Returns {"generator": state dict (float32 tensors) for InpaintGenerator(cnum), "critics": None or
    {"local": state dict for local_critic(64, size), "global": ... for global_critic(64, size)},
    "critics_meta": None or {"cnum", "local_size", "global_size"}, "names": {our parameter: source name}
    (critics as local_critic.* / global_critic.*), "ignored": sorted source names left out by IGNORE_RULES,
    "notes": [str], "semantics": "tf", "format": "tf", "cnum": int (32 for every released model)}.

    Every source tensor is used or ignored, every parameter filled; otherwise ValueError naming the first
    tensor that is not (with both shapes for a shape mismatch)."""
    prefix = resolve_prefix(prefix)
    where = prefix
    listing = list_bundle(prefix)
    ignored = sorted(n for n in listing if ignore_rule(n))
    wanted = [n for n in listing if n not in ignored]

    conv1 = f"{GENERATOR_SCOPE}/conv1/kernel"
    if conv1 not in listing:
        raise ValueError(f"{where}: no {conv1}: not the DeepFill v1 release's generator "
                         f"(saw {', '.join(sorted(wanted)[:5]) or 'nothing'}, ...)")
    cnum = int(listing[conv1][1][-1])
    gen_names = generator_names(cnum)
    has_critics = any(n.startswith(CRITIC_SCOPE + "/") for n in wanted)
    crit_names = {side: critic_names(side) for side in CRITICS} if has_critics else {}
    used = set(gen_names.values()) | {s for m in crit_names.values() for s in m.values()}
    for n in sorted(wanted):
        if n not in used:
            raise ValueError(f"{where}: unexpected tensor {n} {list(listing[n][1])} ({listing[n][0]}): neither a "
                             f"weight of the release's generator or critics nor ignored by a rule "
                             f"(Adam slots, beta1/2_power, global_step)")
    for n in sorted(used):
        if n not in listing:
            raise ValueError(f"{where}: missing tensor {n}")
        if listing[n][0].kind != "f":
            raise ValueError(f"{where}: tensor {n} has dtype {listing[n][0]}, a weight must be floating point")
    values = read_bundle(prefix, names=sorted(used))

    names = dict(gen_names)
    generator = _fill(InpaintGenerator(cnum=cnum), gen_names, values, where, _conv_or_bias)
    critics = critics_meta = None
    if has_critics:
        critics, sizes = {}, {}
        d_cnum = int(values[crit_names["local"]["features.0.conv.weight"]].shape[-1])
        for side, factory in (("local", local_critic), ("global", global_critic)):
            mapping = crit_names[side]
            last = values[mapping["features.3.conv.weight"]].shape[-1]
            features = values[mapping["linear.weight"]].shape[0]
            side_px = int(round((features / max(last, 1)) ** 0.5))
            if side_px * side_px * last != features:
                fc = mapping["linear.weight"]
                raise ValueError(f"{where}: {fc} has shape {list(values[fc].shape)}: not over a square "
                                 f"{last}-channel feature map")
            sizes[side] = 16 * side_px
            critic = factory(cnum=d_cnum, size=sizes[side])
            critics[side] = _fill(critic, mapping, values, where,
                                  lambda key, arr, s=side_px: _critic_tensor(key, arr, s))
            names.update({f"{side}_critic.{k}": v for k, v in mapping.items()})
        critics_meta = {"cnum": d_cnum, "local_size": sizes["local"], "global_size": sizes["global"]}
    notes = ["TF release weights: run them with semantics 'tf' (TF 'SAME' padding on stride-2 convolutions, "
             "align_corners nearest resizes); 'torch' shifts every stride-2 layer by half a pixel",
             "ignored by rule: " + "; ".join(why for _, why in IGNORE_RULES)]
    if not has_critics:
        notes.append("no discriminator variables in this checkpoint (as in the released Places2 model): "
                     "critics start fresh")
    return {"generator": generator, "critics": critics, "critics_meta": critics_meta, "names": names,
            "ignored": ignored, "notes": notes, "semantics": "tf", "format": "tf", "cnum": cnum}


def _conv_or_bias(key: str, arr: np.ndarray) -> np.ndarray:
    """A release tensor in our layout: conv kernel HWIO -> OIHW; bias unchanged."""
    return arr.transpose(3, 2, 0, 1) if arr.ndim == 4 else arr


def _critic_tensor(key: str, arr: np.ndarray, side: int) -> np.ndarray:
    """Conv kernels HWIO -> OIHW; the dense kernel (side*side*C, 1) over NHWC features -> (1, C*side*side)
    over NCHW features."""
    if key == "linear.weight" and arr.ndim == 2 and arr.shape[0] % (side * side) == 0:
        c = arr.shape[0] // (side * side)
        return arr.reshape(side, side, c, arr.shape[1]).transpose(3, 2, 0, 1).reshape(arr.shape[1], -1)
    return _conv_or_bias(key, arr)


def _fill(module: torch.nn.Module, mapping: dict[str, str], values: dict[str, np.ndarray], where: str,
          layout) -> dict[str, torch.Tensor]:
    """The state dict of `module` filled from values[mapping[key]] through layout(key, array); ValueError
    naming the source and our key with both shapes on a mismatch."""
    state = {}
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if set(expected) != set(mapping):  # a programming error in the name lists
        raise ValueError(f"internal: name map and {type(module).__name__} disagree: "
                         f"{sorted(set(expected) ^ set(mapping))[:3]}")
    for key, shape in expected.items():
        src = mapping[key]
        arr = values[src]
        out = layout(key, arr) if arr.ndim in (1, 2, 4) else arr
        if tuple(out.shape) != shape:
            raise ValueError(f"{where}: {src} has shape {list(arr.shape)}, which does not fit {key} "
                             f"{list(shape)} (release layout {_release_shape(key, shape)})")
        state[key] = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    return state


def _release_shape(key: str, shape: tuple) -> list[int]:
    """Our parameter shape written in the release's layout (for error messages)."""
    if len(shape) == 4:
        return [shape[2], shape[3], shape[1], shape[0]]
    if key == "linear.weight":
        return [shape[1], shape[0]]
    return list(shape)
