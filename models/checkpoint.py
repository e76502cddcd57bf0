"""Self-describing generator checkpoints: one torch.save'd dict of plain types and tensors.

{"format": "deepfill-ray/generator/1",
 "model": {"cnum": int, "semantics": "torch" | "tf", "attention": "contextual" | "none"},
 "generator": state_dict, "step": int, "config": plain dict, "extra": plain dict}. Loads with
torch.load(weights_only=True) on any device.

model.semantics is the generator's arithmetic (``models.layers``): "torch" for models trained here, "tf" for
weights converted from the authors' TensorFlow release (``models.weights_tf``). It is written only when not
"torch", so "torch" files are as before the setting existed; a file without it loads as "torch".

model.attention is the generator's stage-2 layout (``InpaintGenerator``): "contextual" (DeepFill v1) or
"none" (the paper's baseline without the contextual-attention branch). Like semantics it is written only when
not the default, so DeepFill v1 files are unchanged; a file without it loads as "contextual".
"""

from __future__ import annotations

import io

import torch

from models.generator import InpaintGenerator, check_attention
from models.layers import check_semantics

FORMAT = "deepfill-ray/generator/1"
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj, where: str) -> None:
    """Raise ValueError unless obj is made of dict/list/tuple/str/int/float/bool/None (weights_only-safe)."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be str, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise ValueError(f"{where}: {type(obj).__name__} is not a plain value (use dicts, lists, str, numbers)")


def _unwrap(generator: torch.nn.Module) -> InpaintGenerator:
    g = getattr(generator, "module", generator)  # DistributedDataParallel
    g = getattr(g, "_orig_mod", g)  # torch.compile
    if not isinstance(g, InpaintGenerator):
        raise ValueError(f"expected an InpaintGenerator, got {type(g).__name__}")
    return g


def generator_state(generator, *, step: int = 0, config: dict | None = None, extra: dict | None = None,
                    semantics: str | None = None) -> dict:
    """The checkpoint dict for `generator` (CPU tensors). config / extra must be plain dicts.
    semantics: "torch" | "tf" to record (default: the generator's own ``semantics``); pass "tf" when saving a
    generator built with the default that holds weights converted from TensorFlow."""
    g = _unwrap(generator)
    semantics = check_semantics(g.semantics if semantics is None else semantics)
    model = {"cnum": g.cnum}
    if semantics != "torch":
        model["semantics"] = semantics
    if g.attention_kind != "contextual":
        model["attention"] = g.attention_kind
    config = {} if config is None else config
    extra = {} if extra is None else extra
    _check_plain(config, "config")
    _check_plain(extra, "extra")
    return {
        "format": FORMAT,
        "model": model,
        "generator": {k: v.detach().cpu().clone() for k, v in g.state_dict().items()},
        "step": int(step),
        "config": config,
        "extra": extra,
    }


def generator_from_state(state: dict, map_location="cpu") -> tuple[InpaintGenerator, dict]:
    """Rebuild (generator, meta) from a checkpoint dict; meta = {"step", "config", "extra", "model"}, with
    meta["model"]["semantics"] and meta["model"]["attention"] always set ("torch" and "contextual" for files
    without the settings). The generator is built with the saved semantics and attention."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a {FORMAT} checkpoint (format={got!r})")
    model = dict(state["model"])
    model["semantics"] = check_semantics(model.get("semantics", "torch"))
    model["attention"] = check_attention(model.get("attention", "contextual"))
    g = InpaintGenerator(cnum=int(model["cnum"]), semantics=model["semantics"], attention=model["attention"])
    g.load_state_dict(state["generator"])
    g.to(map_location)
    meta = {"step": int(state.get("step", 0)), "config": state.get("config", {}),
            "extra": state.get("extra", {}), "model": model}
    return g, meta


def save_generator(f, generator, *, step: int = 0, config: dict | None = None, extra: dict | None = None,
                   semantics: str | None = None) -> None:
    """Write the checkpoint to f: a path or a writable binary file object. semantics: as generator_state
    (default: the generator's own)."""
    torch.save(generator_state(generator, step=step, config=config, extra=extra, semantics=semantics), f)


def load_generator(f, map_location="cpu") -> tuple[InpaintGenerator, dict]:
    """Read a checkpoint from f (path or readable binary file object) with torch.load(weights_only=True).
    Returns (generator on map_location, built with the saved semantics and attention; meta dict with step,
    config, extra, model = {"cnum", "semantics", "attention", ...})."""
    state = torch.load(f, map_location="cpu", weights_only=True)
    return generator_from_state(state, map_location=map_location)


def load_for_inference(f, device=None) -> tuple[InpaintGenerator, dict]:
    """``load_generator``, then ready for inference: on ``device`` (default CUDA when present, else CPU),
    eval mode, channels_last weights (``models.inpaint.for_inference``). f: a path, a readable binary file
    object, or the file's bytes. Returns (generator, meta)."""
    from models.inpaint import for_inference

    if isinstance(f, (bytes, bytearray, memoryview)):
        f = io.BytesIO(f)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    generator, meta = load_generator(f, map_location="cpu")
    return for_inference(generator.to(torch.device(device))), meta
