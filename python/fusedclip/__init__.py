"""fusedclip: fused, sync-free gradient clipping; a drop-in for torch.nn.utils.clip_grad_norm_ and family."""

from .adaptive import AutoClip, ZClip, adaptive_clip_grad_
from .amp import unscale_and_clip_grad_norm_
from .backends import available_backends, preload_backends
from .clip import (
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    multi_tensor_norm,
)
from .clipper import GradClipper
from .optim import clip_and_step
from .patching import TorchPatch, is_patched, patch_torch, unpatch_torch
from .tensorflow import clip_by_global_norm, clip_by_norm

__version__ = "0.1.0"

# Load the kernel backends now where they can run: torch.compile cannot trace the lazy import a first call
# would otherwise do inside a compiled step. On a CPU-only machine nothing extra is imported.
preload_backends()

__all__ = [
    "AutoClip",
    "GradClipper",
    "TorchPatch",
    "ZClip",
    "adaptive_clip_grad_",
    "available_backends",
    "clip_by_global_norm",
    "clip_and_step",
    "clip_by_norm",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "is_patched",
    "multi_tensor_norm",
    "patch_torch",
    "unpatch_torch",
    "unscale_and_clip_grad_norm_",
]
