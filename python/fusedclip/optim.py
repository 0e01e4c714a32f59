"""clip_and_step(): clip (and AMP-unscale) folded into the optimizer step.

torch's fused optimizers (Adam, AdamW, SGD, Adagrad with ``fused=True``) divide every gradient by a device
scalar ``grad_scale`` inside their own pass (writing the divided gradient back) and skip the step when a device
``found_inf`` is set, restoring their step counters. GradScaler hands them these as the attributes
``optimizer.grad_scale`` / ``optimizer.found_inf``; here they carry ``1 / (inv_scale * clip_coef)`` and the
non-finite flag. So a clipped step costs one read pass for the norm plus the optimizer's own pass: no scale pass.

Other optimizers get the gradients scaled in place (one read-write pass), then ``step()``. Skipping a non-finite
step there needs a host decision (``if not found_inf: step()``): on CPU that costs nothing, on a GPU it is one
sync per step, as in GradScaler's own non-fused path. A sync-free skip for an arbitrary optimizer is not
equivalent: zeroing the update still moves Adam's moments and step count, and a skipped first step must not
create state at all, while restoring from a snapshot needs host-side step counters (non-capturable optimizers)
and doubles the optimizer's memory traffic. Use a fused optimizer for the sync-free path.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import amp, dispatch, distributed
from .arguments import check_nonnegative, collect_grads, parse_norm_type
from .backends import clip_coef

Number = Union[float, int]

# Optimizers whose fused step takes grad_scale / found_inf as attributes (torch 2.4+).
_FUSED_CLASSES = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def folds_into_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` takes the clip as its ``grad_scale`` (a torch fused optimizer, every group fused)."""
    return (
        isinstance(optimizer, _FUSED_CLASSES)
        and getattr(optimizer, "_step_supports_amp_scaling", False)
        and all(group.get("fused") for group in optimizer.param_groups)
        and not hasattr(optimizer, "grad_scale")
        and not hasattr(optimizer, "found_inf")
    )


def _skip_would_leave_garbage(optimizer: torch.optim.Optimizer) -> bool:
    """Fused SGD with momentum creates its momentum buffers with empty_like on the first step and keeps them
    even when found_inf skips that step; later steps would then read uninitialised memory."""
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for p in group["params"]:
                if optimizer.state.get(p, {}).get("momentum_buffer") is None:
                    return True
    return False


@torch.no_grad()
def _fused_step(optimizer: torch.optim.Optimizer, factor: Tensor, found_inf: Optional[Tensor]) -> Any:
    # The optimizer divides by grad_scale; 1 / 0 = inf turns a zero factor into g / inf = 0, as g * 0.
    optimizer.grad_scale = torch.reciprocal(factor.to(torch.float32))  # type: ignore[attr-defined]
    if found_inf is not None:
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        return optimizer.step()
    finally:
        del optimizer.grad_scale  # type: ignore[attr-defined]
        if found_inf is not None:
            del optimizer.found_inf  # type: ignore[attr-defined]


def clip_and_step(
    optimizer: torch.optim.Optimizer,
    max_norm: Number,
    *,
    norm_type: Number | str = 2.0,
    scaler: Any = None,
    skip_nonfinite: bool = False,
    backend: Optional[str] = None,
    process_group: distributed.GroupArg = None,
    replicated: distributed.ReplicatedArg = None,
) -> Tensor:
    """Clip the global gradient norm of the optimizer's parameters and take the optimizer step.

    Equivalent to ``clip_grad_norm_(params, max_norm, norm_type); optimizer.step()`` (with a scaler:
    ``scaler.unscale_(optimizer); clip_grad_norm_(...); scaler.step(optimizer)``; call ``scaler.update()``
    afterwards as usual).

    Parameters
    ----------
    optimizer : any torch optimizer; fused Adam/AdamW/SGD/Adagrad get the clip as their ``grad_scale``
    max_norm : the largest allowed total norm, >= 0
    norm_type : p > 0, inf, -inf, 0, or 'inf' / '-inf'
    scaler : an optional ``torch.amp.GradScaler``; gradients are taken as scaled by it, and a non-finite step is
        skipped and recorded for ``scaler.update()``, as ``scaler.step`` does
    skip_nonfinite : without a scaler, skip the step (parameters and optimizer state untouched) when the total
        is NaN or inf. Sync-free for fused optimizers; other optimizers decide on the host (a sync on GPUs)
    backend : "cuda", "triton", "torch" or None (auto)
    process_group, replicated : as for ``clip_grad_norm_`` (DTensor gradients on any meshes need neither). The
        skip decision then follows the global total and every rank's flags from torch's unscale_ (norm_type 0 and
        -inf, or after your own ``scaler.unscale_``), alike on every rank. DTensor parameters are clipped in place
        and then stepped (the clip is not folded into a fused step: its ``grad_scale`` would be a plain tensor
        beside DTensor parameters)

    Returns
    -------
    The total norm before clipping (of the unscaled gradients): float32 (float64 if any gradient is float64); for
    DTensor gradients on one mesh a DTensor, as ``clip_grad_norm_`` returns it.

    Notes
    -----
    ``.grad`` is left clipped (and unscaled) after a step that ran, as by the unfused sequence. After a skipped
    step it is unspecified: fused optimizers leave the gradients as passed in, others hold them multiplied by
    the (non-finite or zero) factor, as torch's sequence does.
    """
    from torch.amp.grad_scaler import OptState

    max_norm = check_nonnegative(max_norm, "max_norm")
    p = parse_norm_type(norm_type)
    params = amp.optimizer_params(optimizer)
    grads = collect_grads(params)
    use_scaler = amp.scaler_enabled(scaler)
    state = None
    inv_scale: Optional[Tensor] = None
    prior_flags: Optional[dict[torch.device, Tensor]] = None  # torch's unscale_ flags (this rank's own)
    if use_scaler:
        amp.check_scale_tracker(scaler, "step")
        state = amp.scaler_state(scaler, optimizer)
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] is OptState.READY:
            amp.check_no_fp16(grads)
            inv_scale = amp.inv_scale_of(scaler)
        else:  # the user ran scaler.unscale_ already: the gradients are unscaled, its flags stand
            prior_flags = dict(state["found_inf_per_device"])
    if use_scaler and grads and (not amp.flag_reliable(p) or any(g.is_sparse for g in grads)):
        # The total cannot stand in for the non-finite check: torch's unscale_, then the unscaled clip below.
        if state["stage"] is OptState.READY:  # type: ignore[index]
            scaler.unscale_(optimizer)
            prior_flags = dict(state["found_inf_per_device"])  # type: ignore[index]
        inv_scale = None
    skip = use_scaler or bool(skip_nonfinite)

    call = None
    if distributed.needed(grads, process_group, replicated):
        # Every rank takes part in the collective, with gradients or without; the prior flags ride in it, so the
        # flags come back global.
        call, total, flags = amp.distributed_norm_and_flags(
            params, grads, p, backend, process_group, replicated, (prior_flags or {}) if use_scaler else None
        )
        prior_flags = None
    elif not grads:
        if use_scaler:
            raise AssertionError("No inf checks were recorded for this optimizer.")  # torch's scaler.step
        optimizer.step()
        return torch.tensor(0.0)
    else:
        plan, total, flags = amp.norm_and_flags(grads, p, backend)
    if inv_scale is not None:
        total = amp.unscale_total(total, inv_scale, p)
    for d, f in (prior_flags or {}).items():
        flags[d] = torch.maximum(flags[d], f.to(d)) if d in flags else f
    coef = clip_coef(total, max_norm)
    factor = coef if inv_scale is None else inv_scale.to(total.device) * coef

    found_inf: Optional[Tensor] = None
    if use_scaler:
        # Fused kernels skip only on found_inf == 1, so several devices' flags are combined with max, not sum.
        found_inf = torch.stack([f.to(total.device) for f in flags.values()]).amax()
    elif skip_nonfinite:
        found_inf = (~torch.isfinite(total)).to(torch.float32)

    folds = call is None or not call.layout.dtensor
    if folds and folds_into_step(optimizer) and not (skip and _skip_would_leave_garbage(optimizer)):
        if torch.compiler.is_compiling():
            # Run eagerly: torch's fused step is compiler-disabled itself (stock torch breaks the graph there too),
            # and dynamo (2.13) loses the attributes set around that break. Decorated here, when dynamo is loaded
            # anyway, not at import (importing torch._dynamo takes seconds).
            torch.compiler.disable(_fused_step)(optimizer, factor, found_inf)
        else:
            _fused_step(optimizer, factor, found_inf)
    else:
        if call is not None:
            call.scale_(factor)
        else:
            dispatch.scale_(plan, factor)
        if found_inf is None or not bool(found_inf):  # host decision: see the module docstring
            optimizer.step()
    if use_scaler:
        state["found_inf_per_device"] = flags  # type: ignore[index]
        state["stage"] = OptState.STEPPED  # type: ignore[index]
    return total if call is None else call.wrap(total, p)
