"""DeepFill v1 in pure PyTorch: generator, contextual attention, critics, losses, inference, checkpoints.

Imports only torch, numpy and the standard library.
"""

from models import checkpoint, losses
from models.attention import ContextualAttention
from models.critics import Critic, crop_around_holes, global_critic, hole_crop_corners, local_critic
from models.generator import InpaintGenerator
from models.inpaint import for_inference, inpaint, inpaint_uint8, to_model_range, to_uint8
from models.visualize import flow_to_image, masked_input, picture_grid, upsample_nearest

__all__ = [
    "ContextualAttention",
    "InpaintGenerator",
    "Critic",
    "local_critic",
    "global_critic",
    "crop_around_holes",
    "hole_crop_corners",
    "inpaint",
    "inpaint_uint8",
    "for_inference",
    "to_model_range",
    "to_uint8",
    "flow_to_image",
    "masked_input",
    "upsample_nearest",
    "picture_grid",
    "losses",
    "checkpoint",
]
