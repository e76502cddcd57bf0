"""DeepFill v1 in pure PyTorch: generator, contextual attention, critics, losses, inference, checkpoints.

Imports only torch, numpy and the standard library.
"""

from models import checkpoint, losses
from models.attention import ContextualAttention, flow_to_image
from models.critics import GlobalCritic, LocalCritic, crop_around_holes, hole_crop_corners
from models.generator import InpaintGenerator
from models.inpaint import for_inference, inpaint, to_model_range, to_uint8

__all__ = [
    "ContextualAttention",
    "flow_to_image",
    "InpaintGenerator",
    "LocalCritic",
    "GlobalCritic",
    "crop_around_holes",
    "hole_crop_corners",
    "inpaint",
    "for_inference",
    "to_model_range",
    "to_uint8",
    "losses",
    "checkpoint",
]
