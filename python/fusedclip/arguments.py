"""Validation of the public API's arguments: every bad input fails here, before any gradient is touched."""

from __future__ import annotations

import math
import numbers
import sys
import types
import warnings
from collections.abc import Iterable
from typing import Optional, Union

import torch
from torch import Tensor

TensorOrTensors = Union[Tensor, Iterable[Tensor]]


def collect_tensors(tensors: TensorOrTensors | Iterable[Tensor | None], what: str = "tensors") -> list[Tensor]:
    """A single tensor, a list or a generator of tensors -> list, with None entries dropped."""
    items = as_list(tensors, what)
    out = [t for t in items if t is not None]
    if not all(isinstance(t, Tensor) for t in out):
        i, t = next((i, t) for i, t in enumerate(items) if t is not None and not isinstance(t, Tensor))
        raise TypeError(f"{what}[{i}] is a {type(t).__name__}, not a Tensor; pass tensors (or None) only")
    bad = _bad_dtype(out)
    if bad is not None:
        i = [j for j, t in enumerate(items) if t is not None][bad]
        raise TypeError(f"{what}[{i}] has dtype {out[bad].dtype}; {_DTYPE_HINT}")
    return out


def as_list(parameters: TensorOrTensors, what: str = "parameters") -> list:
    """A single tensor, a list or a generator -> list (a generator is consumed once, here). A list is returned as it
    is, not copied (callers only read it; a copy of thousands of parameters costs tens of us a step)."""
    if type(parameters) is list:
        return parameters
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        return list(parameters)
    except TypeError:
        raise TypeError(f"{what} must be a Tensor or an iterable of Tensors, got {type(parameters).__name__}") from None


def warn_if_empty_generator(parameters: object, items: list, stacklevel: int) -> None:
    """torch.nn.utils.clip_grad_norm_'s warning for a generator that yields nothing (often model.parameters()
    consumed by an earlier call). `stacklevel` counts from the caller of this function."""
    if not items and isinstance(parameters, types.GeneratorType):
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=stacklevel + 1)


def warn_if_repeated(parameters: list, grads: list[Tensor], stacklevel: int) -> None:
    """A gradient listed twice is scaled twice (torch does the same): say so, once per call, naming both places.
    A set of ids is the cheap check; the positions are looked up only when there is a repeat."""
    if torch.compiler.is_compiling() or len(set(map(id, grads))) == len(grads):
        return
    repeat = _first_repeat(None if p.grad is None else id(p.grad) for p in parameters)
    if repeat is None:
        return
    i, j = repeat
    if parameters[i] is parameters[j]:
        msg = f"parameters[{i}] is parameters[{j}] again: its gradient will be scaled twice"
    else:
        msg = f"parameters[{i}].grad is the same tensor as parameters[{j}].grad: it will be scaled twice"
    warnings.warn(f"{msg} (as torch.nn.utils does); list each gradient once", stacklevel=stacklevel + 1)


def warn_if_listed_twice(parameters: list, stacklevel: int) -> bool:
    """GradClipper's check, made once when it is built: a parameter listed twice has its gradient scaled twice at
    every call (as torch.nn.utils does). Returns whether one is."""
    repeat = _first_repeat(map(id, parameters))
    if repeat is None:
        return False
    i, j = repeat
    warnings.warn(
        f"parameters[{i}] is parameters[{j}] again: its gradient will be scaled twice at every call (as "
        "torch.nn.utils does); list each parameter once",
        stacklevel=stacklevel + 1,
    )
    return True


def _first_repeat(keys: Iterable[Optional[int]]) -> Optional[tuple[int, int]]:
    """(i, j): the first position i whose key (None: skipped) was seen before, first at j; None if no key repeats."""
    first: dict[int, int] = {}
    for i, key in enumerate(keys):
        if key is not None:
            j = first.setdefault(key, i)
            if j != i:
                return i, j
    return None


def collect_grads(parameters: list) -> list[Tensor]:
    """The .grad of every parameter that has one (parameters: the list from as_list)."""
    if not all(isinstance(p, Tensor) for p in parameters):
        i, p = next((i, p) for i, p in enumerate(parameters) if not isinstance(p, Tensor))
        raise TypeError(
            f"parameters[{i}] is a {type(p).__name__}, not a Tensor; pass model.parameters() or a list of tensors"
        )
    grads = [g for g in [p.grad for p in parameters] if g is not None]
    bad = _bad_dtype(grads)
    if bad is not None:
        i = next(i for i, p in enumerate(parameters) if p.grad is grads[bad])
        raise TypeError(f"parameters[{i}].grad has dtype {grads[bad].dtype}; {_DTYPE_HINT}")
    return grads


_DTYPE_HINT = "norms and clipping need a floating-point or complex tensor"


def _bad_dtype(tensors: list[Tensor]) -> Optional[int]:
    """Index of the first tensor of a dtype that is neither floating point nor complex, or None.
    Checked over the distinct dtypes (a handful), not tensor by tensor: this runs every step."""
    for dtype in {t.dtype for t in tensors}:
        if not (dtype.is_floating_point or dtype.is_complex):
            return next(i for i, t in enumerate(tensors) if t.dtype == dtype)
    return None


def parse_norm_type(norm_type: float | int | str) -> float:
    """torch's accepted norm types: any p > 0, inf, -inf, 0, or their string spellings ('inf', '-inf')."""
    if isinstance(norm_type, bool):
        raise ValueError(f"norm_type must be a number, 'inf' or '-inf', got {norm_type!r}")
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise ValueError(
            f"norm_type must be a positive number, 0, inf or -inf (or 'inf'/'-inf'), got {norm_type!r}"
        ) from None
    if math.isnan(p) or (p < 0 and not math.isinf(p)):
        raise ValueError(f"norm_type must be a positive number, 0, inf or -inf, got {norm_type!r}")
    return p


def check_nonnegative(value: float | int | Tensor, name: str) -> float | Tensor:
    """max_norm, clip_value, clip_norm: a finite-or-inf number >= 0. Tensors are read on the host.

    While torch.compile traces, a tensor's value cannot be read (dynamo cannot branch on it): it is checked by an
    opaque op when the graph runs, and the result is that op's 0-d tensor, which carries the check's data
    dependency to whatever uses the value (so nothing is touched before the check has run)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if torch.compiler.is_compiling():
            return torch.ops.fusedclip.check_nonnegative(value, name)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}; a negative or NaN {name} would flip or poison the gradients")
    return v


# Tags of the opaque checks used while tracing: they read a value on the host (a sync for a CUDA tensor, as the
# eager checks do), so CUDA-graph capture must leave them out.
HOST_READ_TAGS = tuple(t for t in [getattr(torch.Tag, "cudagraph_unsafe", None)] if t is not None)


@torch.library.custom_op("fusedclip::check_nonnegative", mutates_args=(), tags=HOST_READ_TAGS)
def _check_nonnegative_op(value: Tensor, name: str) -> Tensor:
    check_nonnegative(value.item(), name)
    return value.detach().reshape(()).clone()


@_check_nonnegative_op.register_fake
def _(value: Tensor, name: str) -> Tensor:
    return value.new_empty(())


def is_dtensor(t: object) -> bool:
    """True for torch.distributed DTensor; cheap when DTensor was never imported (no tensor can be one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def has_dtensor(tensors: list[Tensor]) -> bool:
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(t, mod.DTensor) for t in tensors)
