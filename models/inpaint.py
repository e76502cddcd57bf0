"""The one inference path: any-size images through the generator, composited with the known pixels."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_model_range(x) -> torch.Tensor:
    """uint8 (N,H,W,C) tensor or ndarray in [0,255] -> float32 tensor (N,C,H,W) in [-1,1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if t.dim() != 4:
        raise ValueError(f"expected (N,H,W,C), got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (N,C,H,W) in [-1,1] -> uint8 tensor (N,H,W,C) (rounded, clamped to [0,255])."""
    if x.dim() != 4:
        raise ValueError(f"expected (N,C,H,W), got shape {tuple(x.shape)}")
    y = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()


def _pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    H, W = x.shape[-2:]
    ph, pw = (-H) % m, (-W) % m
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < H and pw < W else "replicate"  # reflect needs pad < size
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def for_inference(generator):
    """Prepare a generator for inference only: eval mode and channels_last (NHWC) weights, in place.

    Returns the generator. Convolutions with channels_last weights run in NHWC and hand NHWC activations on
    (oneDNN on CPU, cuDNN's tensor-core kernels on CUDA): the same numbers up to float summation order,
    faster per image on CPU (benchmarks/infer.py measures it). Not for training: on CPU the NHWC backward
    was slower than the default layout. ``models.checkpoint.load_for_inference`` loads every model for
    inference this way.
    """
    generator.eval()
    return generator.to(memory_format=torch.channels_last)


def inpaint(generator, image: torch.Tensor, mask: torch.Tensor, *, return_offsets: bool = False,
            max_score_bytes: int | None = None):
    """Fill the holes of `image`.

    image (B,3,H,W) float in [-1,1] (any H, W); mask (B,1,H,W), 1 = hole (values > 0.5 count as hole).
    Pads (reflect) to a multiple of 8, runs the generator under torch.inference_mode in eval mode on the
    generator's device, crops back. Returns the composite (B,3,H,W) on image's device and dtype: the refined
    output in the holes, the input elsewhere (bit-identical, torch.where). With return_offsets=True also the
    attention offsets (B,2,ceil(H/8),ceil(W/8)) int64 (of the padded image). Without them, the attention
    runs only from the rows that can reach a hole (``InpaintGenerator.forward(holes_only=True)``): the
    same composite, cheaper when the holes span few rows.
    max_score_bytes overrides generator.attention.max_score_bytes for this call (memory for large images);
    ignored by the baseline without attention (``InpaintGenerator(attention="none")``: its offsets are 0).
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be (B,3,H,W), got {tuple(image.shape)}")
    B, _, H, W = image.shape
    if mask.shape != (B, 1, H, W):
        raise ValueError(f"mask must be (B,1,H,W) = {(B, 1, H, W)}, got {tuple(mask.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be float in [-1,1], got {image.dtype} (see models.to_model_range)")
    param = next(generator.parameters())
    attention = generator.attention  # None: the baseline without contextual attention (no budget to set)
    saved_budget = None if attention is None else attention.max_score_bytes
    was_training = generator.training
    if max_score_bytes is not None and attention is not None:
        attention.max_score_bytes = int(max_score_bytes)
    generator.eval()
    try:
        with torch.inference_mode():
            hole = mask > 0.5  # (B, 1, H, W) bool
            x = _pad_to_multiple(image.to(param.device, param.dtype), 8)
            m = _pad_to_multiple(hole.to(param.device, param.dtype), 8)
            # holes_only: the attention skips rows that cannot reach a hole (full attention for the offsets)
            _, refined, offsets = generator(x, m, holes_only=not return_offsets)
            del x, m
            refined = refined[:, :, :H, :W].to(image.device, image.dtype)
            out = torch.where(hole, refined, image)
    finally:
        if attention is not None:
            attention.max_score_bytes = saved_budget
        generator.train(was_training)
    return (out, offsets) if return_offsets else out


def inpaint_uint8(generator, image: np.ndarray, mask: np.ndarray, *, return_offsets: bool = False):
    """Inpaint uint8 images through ``inpaint`` (the one inference path).

    image: uint8 (N,H,W,3) RGB in [0,255] (any H, W). mask: (N,H,W,1) or (N,H,W), nonzero = hole ({0,1} or
    {0,255}). Returns a uint8 (N,H,W,3) numpy array: the refined output in the holes, the input exactly
    elsewhere; with return_offsets also the attention offsets tensor (N,2,ceil(H/8),ceil(W/8)) int64 from
    ``inpaint``. Raises ValueError for a non-uint8 or wrongly shaped image or a mask of another shape.
    """
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (N, H, W, 3), got {image.dtype} {image.shape}")
    if mask.ndim == 3:
        mask = mask[..., None]  # (N, H, W, 1)
    if mask.shape != image.shape[:3] + (1,):
        raise ValueError(f"mask must be (N, H, W, 1) matching image {image.shape}, got {mask.shape}")
    device = next(generator.parameters()).device
    x = to_model_range(torch.from_numpy(np.ascontiguousarray(image))).to(device)  # (N, 3, H, W)
    m = torch.from_numpy((mask > 0).astype(np.float32)).permute(0, 3, 1, 2).to(device)  # (N, 1, H, W)
    out = inpaint(generator, x, m, return_offsets=return_offsets)
    if return_offsets:
        composite, offsets = out
    else:
        composite, offsets = out, None
    result = to_uint8(composite).cpu().numpy()  # (N, H, W, 3)
    # the composite keeps known pixels of the [-1, 1] input; the uint8 round trip must give them back exactly
    known = mask[..., 0] == 0  # (N, H, W)
    result[known] = image[known]
    return (result, offsets) if return_offsets else result
