"""The torch-compatible API: drop-ins for torch.nn.utils' clip functions, plus fused per-tensor clipping."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import dispatch
from . import distributed
from . import fastpath
from .arguments import (
    TensorOrTensors,
    as_list,
    check_nonnegative,
    collect_grads,
    collect_tensors,
    has_dtensor,
    parse_norm_type,
    warn_if_empty_generator,
    warn_if_repeated,
)
from .backends import clip_coef

Number = Union[float, int]

# torch's own clip_grad_value_, taken before fusedclip.patch_torch() can replace it: the DTensor fallback
# calls it, and calling the patched name from there would recurse.
_torch_clip_grad_value_ = torch.nn.utils.clip_grad_value_


@torch.no_grad()
def multi_tensor_norm(
    tensors: TensorOrTensors,
    norm_type: Number | str = 2.0,
    *,
    per_tensor: bool = False,
    backend: Optional[str] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Norm of all `tensors` viewed as one vector, in one reduction per device.

    Parameters
    ----------
    tensors : Tensor or iterable of Tensors (None entries are skipped)
    norm_type : p > 0, inf, -inf, 0, or 'inf' / '-inf'
    per_tensor : also return a 1-D float32 tensor with each tensor's own norm (0 for zero-size tensors)
    backend : "cuda", "triton", "torch" or None (auto; FUSEDCLIP_BACKEND sets the default)

    Returns
    -------
    The total (float32, float64 if any input is float64, on the first tensor's device), or
    ``(total, per_tensor_norms)``.
    """
    items = as_list(tensors, "tensors")
    plan = None if torch.compiler.is_compiling() else fastpath.find(items, False, backend, None)
    if plan is not None:
        p = parse_norm_type(norm_type)
    else:
        ts = collect_tensors(items)
        p = parse_norm_type(norm_type)
        if has_dtensor(ts):
            raise NotImplementedError("multi_tensor_norm does not take DTensor inputs yet; use get_total_norm")
        plan = dispatch.make_plan(ts, backend)
        if not torch.compiler.is_compiling():
            fastpath.remember(items, False, backend, None, plan)
    total, norms = dispatch.total_norm(plan, p, per_tensor)
    if not per_tensor:
        return total
    return total, norms.to(torch.float32)  # type: ignore[union-attr]


@torch.no_grad()
def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: Number | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
    process_group: distributed.GroupArg = None,
    replicated: distributed.ReplicatedArg = None,
) -> Tensor:
    """Drop-in for torch.nn.utils.get_total_norm: the norm of `tensors` (not of their .grad).

    Returns float32 (float64 if any input is float64) on the first tensor's device; 0 for no tensors.
    `error_if_nonfinite=True` raises RuntimeError on a NaN/inf total (a host sync, as in torch).
    DTensor inputs and `process_group=` / `replicated=`: see `clip_grad_norm_`.
    """
    items = as_list(tensors, "tensors")
    plan = None
    if not torch.compiler.is_compiling():
        call = distributed.find(items, False, backend, foreach, process_group, replicated)
        if call is not None:  # the same gradients as a distributed call before: validated then
            return call.clip(None, parse_norm_type(norm_type), error_if_nonfinite)
        if process_group is None and replicated is None:
            plan = fastpath.find(items, False, backend, foreach)
    if plan is not None:
        p = parse_norm_type(norm_type)
    else:
        ts = collect_tensors(items)
        p = parse_norm_type(norm_type)
        if distributed.needed(ts, process_group, replicated):
            call = distributed.prepare(items, False, ts, backend, foreach, process_group, replicated)
            return call.clip(None, p, error_if_nonfinite)
        if not ts:
            return torch.tensor(0.0)
        plan = dispatch.make_plan(ts, backend, foreach)
        if not torch.compiler.is_compiling():
            fastpath.remember(items, False, backend, foreach, plan)
    total, _ = dispatch.total_norm(plan, p)
    if error_if_nonfinite:
        total = dispatch.check_finite(total, p)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: Number,
    total_norm: Union[Tensor, Number],
    foreach: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
) -> None:
    """Drop-in for torch.nn.utils.clip_grads_with_norm_: g *= min(max_norm / (total_norm + 1e-6), 1)."""
    params = as_list(parameters)
    if not torch.compiler.is_compiling():
        call = distributed.find(params, True, backend, foreach, None, None)
        if call is not None:  # DTensor gradients seen before (by this function or clip_grad_norm_)
            max_norm = check_nonnegative(max_norm, "max_norm")
            call.scale_(clip_coef(distributed.total_value(total_norm, call.layout.device), max_norm))
            return
    if not torch.compiler.is_compiling() and not distributed.is_dtensor(total_norm):
        plan = fastpath.find(params, True, backend, foreach)
        if plan is not None:
            max_norm = check_nonnegative(max_norm, "max_norm")
            if not isinstance(total_norm, Tensor):
                total_norm = torch.tensor(float(total_norm))
            dispatch.scale_(plan, clip_coef(total_norm, max_norm))
            return
    grads = collect_grads(params)
    max_norm = check_nonnegative(max_norm, "max_norm")
    if not isinstance(total_norm, Tensor):
        total_norm = torch.tensor(float(total_norm))
    if not grads:
        return
    warn_if_repeated(params, grads, stacklevel=3)
    if has_dtensor(grads) or distributed.is_dtensor(total_norm):
        distributed.clip_grads_with_norm_(params, grads, max_norm, total_norm, foreach, backend)
        return
    plan = dispatch.make_plan(grads, backend, foreach)
    if not torch.compiler.is_compiling():
        fastpath.remember(params, True, backend, foreach, plan)
    dispatch.scale_(plan, clip_coef(total_norm, max_norm))


def clip_norm_of_grads_(
    grads: list[Tensor],
    max_norm: Union[float, Tensor],
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: Optional[bool],
    backend: Optional[str],
) -> Tensor:
    """clip_grad_norm_ on validated arguments. A tensor max_norm comes from check_nonnegative under torch.compile
    only."""
    return clip_norm_(dispatch.make_plan(grads, backend, foreach), max_norm, norm_type, error_if_nonfinite)


def clip_norm_(
    plan: dispatch.Plan, max_norm: Union[float, Tensor], norm_type: float, error_if_nonfinite: bool
) -> Tensor:
    """clip_grad_norm_ over a plan (the general path's or a kept one: fusedclip.fastpath), arguments validated."""
    single = plan.single
    if single is not None and not error_if_nonfinite and not isinstance(max_norm, Tensor):
        step = dispatch.prepared_clip_norm(plan, max_norm, norm_type)
        if step is not None:  # a kept plan's steady state
            return step()
        # One device, one backend: total and coefficient come from the backend's own finalize.
        device_plan = single.device_plan()
        total, coef = single.backend.norm_and_coef(single.tensors, norm_type, max_norm, device_plan)
        single.backend.scale_(single.tensors, coef, device_plan)
        return total
    total, _ = dispatch.total_norm(plan, norm_type)
    if error_if_nonfinite:
        total = dispatch.check_finite(total, norm_type)
    dispatch.scale_(plan, clip_coef(total, max_norm))
    return total


@torch.no_grad()
def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: Number,
    norm_type: Number | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
    process_group: distributed.GroupArg = None,
    replicated: distributed.ReplicatedArg = None,
) -> Tensor:
    """Drop-in for torch.nn.utils.clip_grad_norm_: clip the global norm of the gradients in place.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensors whose .grad is clipped (a generator is fine)
    max_norm : the largest allowed total norm, >= 0
    norm_type : p > 0, inf, -inf, 0, or 'inf' / '-inf'
    error_if_nonfinite : raise RuntimeError (touching no gradient) when the total is NaN or inf
    foreach : torch's switch, honoured by the torch backend; the kernel backends are always fused
    backend : "cuda", "triton", "torch" or None (auto)
    process_group : a ProcessGroup, a 1-D DeviceMesh, or a sequence of them: the gradients on the ranks of the
        group are different parts of one gradient set (pipeline stages, ZeRO-style shards), and the total covers
        them all. With DTensor gradients only the extra groups (the pipeline's: torchtitan's pp_mesh)
    replicated : parameters (or gradients) that are identical on every rank of `process_group`, counted once;
        or a predicate on the parameter

    Returns
    -------
    Total norm before clipping: float32 (float64 if any gradient is float64), on the first gradient's device.
    For DTensor gradients (FSDP2, tensor parallel) each rank clips its local shards and the total is a DTensor on
    their mesh, placed as torch places it (Replicate; Partial(max/min) for +/-inf), so `.full_tensor()` works.
    Gradients on several meshes of one world (expert parallel beside dense weights, HSDP, FSDP2 + TP + EP) are
    taken in the same call, and the total is then a plain tensor holding the global value. One all-reduce
    combines every mesh and group where they have a common group (the meshes span the same ranks, and the extra
    groups tile the world with them); otherwise one per distinct rank set and per extra group (fusedclip.distributed
    says when). Meshes of different worlds, or a group without this rank, raise ValueError before any collective.
    """
    params = as_list(parameters)
    if not torch.compiler.is_compiling():
        call = distributed.find(params, True, backend, foreach, process_group, replicated)
        if call is not None:  # the same gradients as a distributed call before: validated then
            return call.clip(check_nonnegative(max_norm, "max_norm"), parse_norm_type(norm_type), error_if_nonfinite)
        if process_group is None and replicated is None:
            plan = fastpath.find(params, True, backend, foreach)
            if plan is not None:  # the same gradients as a call before: validated then
                return clip_norm_(plan, check_nonnegative(max_norm, "max_norm"), parse_norm_type(norm_type),
                                  error_if_nonfinite)
    warn_if_empty_generator(parameters, params, stacklevel=3)  # as torch: this function, no_grad's wrapper, caller
    grads = collect_grads(params)
    max_norm = check_nonnegative(max_norm, "max_norm")
    p = parse_norm_type(norm_type)
    warn_if_repeated(params, grads, stacklevel=3)
    if distributed.needed(grads, process_group, replicated):
        call = distributed.prepare(params, True, grads, backend, foreach, process_group, replicated)
        return call.clip(max_norm, p, error_if_nonfinite)
    if not grads:
        return torch.tensor(0.0)
    plan = dispatch.make_plan(grads, backend, foreach)
    if not torch.compiler.is_compiling():
        fastpath.remember(params, True, backend, foreach, plan)
    return clip_norm_(plan, max_norm, p, error_if_nonfinite)


@torch.no_grad()
def clip_grad_value_(
    parameters: TensorOrTensors,
    clip_value: Number,
    foreach: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
) -> None:
    """Drop-in for torch.nn.utils.clip_grad_value_: clamp every gradient to [-clip_value, clip_value]."""
    params = as_list(parameters)
    if not torch.compiler.is_compiling():
        plan = fastpath.find(params, True, backend, foreach)
        if plan is not None:  # the same gradients as a call before: validated then
            dispatch.clamp_(plan, check_nonnegative(clip_value, "clip_value"))  # type: ignore[arg-type]
            return
    grads = collect_grads(params)
    clip_value = check_nonnegative(clip_value, "clip_value")
    if has_dtensor(grads):
        _torch_clip_grad_value_(params, clip_value, foreach)
        return
    for i, g in enumerate(grads):
        if g.is_sparse and not g.is_coalesced():
            raise ValueError(
                f"gradient {i} is an uncoalesced sparse tensor: clamping its values would not bound the sum of "
                "duplicates; coalesce it first (p.grad = p.grad.coalesce())"
            )
    if isinstance(clip_value, Tensor):  # under torch.compile only (see check_nonnegative): clamp takes a tensor
        for g in grads:
            (g._values() if g.is_sparse else g).clamp_(min=-clip_value, max=clip_value)
        return
    plan = dispatch.make_plan(grads, backend, foreach)
    if not torch.compiler.is_compiling():
        fastpath.remember(params, True, backend, foreach, plan)
    dispatch.clamp_(plan, clip_value)


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters: TensorOrTensors,
    max_norm: Number,
    norm_type: Number | str = 2.0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """Clip each gradient to its own norm, in one fused call (Keras' `clipnorm`; the loop
    ``for p in params: clip_grad_norm_(p, max_norm)``).

    Returns the 1-D float32 tensor of per-tensor norms before clipping, one per gradient (0 for zero-size
    ones), on the first gradient's device.
    """
    params = as_list(parameters)
    grads = collect_grads(params)
    max_norm = check_nonnegative(max_norm, "max_norm")
    p = parse_norm_type(norm_type)
    if has_dtensor(grads):
        raise NotImplementedError("clip_grad_norm_per_tensor_ does not take DTensor gradients yet")
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    warn_if_repeated(params, grads, stacklevel=3)
    plan = dispatch.make_plan(grads, backend)
    _, norms = dispatch.total_norm(plan, p, per_tensor=True)
    dispatch.scale_per_tensor_(plan, clip_coef(norms, max_norm))  # type: ignore[arg-type]
    return norms.to(torch.float32)  # type: ignore[union-attr]
