"""TensorFlow's clipping semantics, out of place, for code ported from TF/Keras."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch
from .arguments import check_nonnegative, collect_tensors, has_dtensor
from .backends import acc_dtype

Number = Union[float, int]


@torch.no_grad()
def clip_by_global_norm(
    tensors: Sequence[Optional[Tensor]],
    clip_norm: Number,
    use_norm: Optional[Union[Tensor, Number]] = None,
    *,
    backend: Optional[str] = None,
) -> tuple[list[Optional[Tensor]], Tensor]:
    """tf.clip_by_global_norm: ``t * clip_norm / max(global_norm, clip_norm)`` for each tensor, out of place.

    None entries pass through as None. `use_norm` skips the norm computation. When the global norm is not
    finite every output is NaN, as in TF. Returns ``(clipped, global_norm)``; global_norm is float32
    (float64 if any input is float64). The outputs carry no autograd history: this is for gradients.
    """
    if isinstance(tensors, Tensor):
        raise TypeError("tensors must be a list of tensors (TF's t_list), not a single Tensor; wrap it in a list")
    items = list(tensors)
    present = collect_tensors(items, "tensors")
    clip_norm = check_nonnegative(clip_norm, "clip_norm")
    if has_dtensor(present):
        raise NotImplementedError("clip_by_global_norm does not take DTensor inputs yet")
    plan = dispatch.make_plan(present, backend)
    if use_norm is None:
        global_norm, _ = dispatch.total_norm(plan, 2.0)
    else:
        global_norm = torch.as_tensor(use_norm, dtype=plan.dtype, device=plan.device)
    # clip_norm * min(1 / norm, 1 / clip_norm), and NaN for a non-finite norm. A tensor division, so that
    # norm <= clip_norm gives a scale of exactly 1.
    limit = torch.as_tensor(clip_norm, dtype=global_norm.dtype, device=global_norm.device)  # a tensor when compiling
    scale = limit / torch.maximum(global_norm, limit)
    scale = torch.where(torch.isfinite(global_norm), scale, torch.full_like(scale, float("nan")))
    out: list[Optional[Tensor]] = []
    for t in items:
        if t is None:
            out.append(None)
        else:
            out.append(t * scale.to(t.device))  # a 0-d scale keeps t's dtype
    return out, global_norm


def clip_by_norm(tensor: Tensor, clip_norm: Number, dim: Optional[Union[int, Sequence[int]]] = None) -> Tensor:
    """tf.clip_by_norm: ``t * clip_norm / max(l2norm(t), clip_norm)``, out of place.

    `dim` (TF's `axes`: an int, or a sequence of ints; numpy integers too) clips each slice over those dimensions
    separately; None takes the whole tensor, and an empty sequence reduces over nothing (each element is clipped
    on its own, as TF's ``axes=[]``). The norm is accumulated in float32 (float64 for float64). Differentiable.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a Tensor, got {type(tensor).__name__}")
    collect_tensors(tensor, "tensor")
    clip_norm = check_nonnegative(clip_norm, "clip_norm")
    dims = None if dim is None else _parse_dims(dim, tensor.dim())
    acc = acc_dtype([tensor.dtype])
    if dims == ():
        # torch reads an empty dim list as "every dim"; TF's axes=[] reduces over none: each element's norm is |x|.
        norm = tensor.abs() if tensor.is_complex() else tensor.to(acc).abs()
    else:
        norm = torch.linalg.vector_norm(tensor, 2, dim=dims, keepdim=True, dtype=None if tensor.is_complex() else acc)
    scale = clip_norm / torch.clamp(norm, min=clip_norm)
    return (tensor * scale).to(tensor.dtype)


def _parse_dims(dim: object, ndim: int) -> tuple[int, ...]:
    """TF's axes as a tuple of distinct ints: an int or a sequence of ints, numpy/torch integers included."""
    try:
        items = [dim] if _is_integer(dim) else list(dim)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"dim must be an int or a sequence of ints, got {type(dim).__name__}") from None
    dims = []
    for d in items:
        if not _is_integer(d):
            raise TypeError(f"dim={dim!r}: {d!r} is not an integer; dim must be an int or a sequence of ints")
        d = operator.index(d)
        if not -ndim <= d < max(ndim, 1):
            raise ValueError(f"dim={dim!r} is out of range for a tensor with {ndim} dimensions")
        dims.append(d % max(ndim, 1))
    if len(set(dims)) != len(dims):
        raise ValueError(f"dim={dim!r} names a dimension twice")
    return tuple(dims)


def _is_integer(x: object) -> bool:
    """int, numpy integers and integer 0-d tensors; not bool (True would silently mean dim 1)."""
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return False
    if isinstance(x, Tensor):
        return x.dim() == 0 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    try:
        operator.index(x)
    except TypeError:
        return False
    return True
