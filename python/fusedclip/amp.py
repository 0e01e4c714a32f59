"""AMP: unscale and clip in two fused passes, leaving torch.amp.GradScaler as its own unscale_() would.

Stock ``scaler.unscale_(opt); clip_grad_norm_(...)`` reads and writes every gradient to unscale, reads it again
for the norm and reads and writes it once more to clip: 5 passes of gradient traffic. Here the norm of the
*scaled* gradients is taken in one read pass and turned into the unscaled norm on the device (the p-norm is
homogeneous: ``||g * s|| = ||g|| * s``), the non-finite flag comes from the same totals, and one read-write pass
applies ``inv_scale * coef``: 3 passes, no host sync.

The flag is "the scaled total is not finite", which covers every NaN/inf gradient for 0 < p <= inf. It also
fires when the float32 sum of ``|g|^p`` overflows (a scaled total above ~1.8e19 for p = 2): that step is then
skipped and the scale backed off, where torch would clip by an infinite norm (zeroing every gradient) and step.
For p = 0 and p = -inf the total does not show every non-finite value, so those take torch's sequence.

This module reads GradScaler's private per-optimizer state (``_per_optimizer_states``, ``OptState``) because
that state is what ``scaler.step`` and ``scaler.update`` consume; it matches torch 2.6 - 2.13.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import dispatch, distributed
from .arguments import check_nonnegative, collect_grads, parse_norm_type
from .backends import clip_coef

Number = Union[float, int]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every param group, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


# GradScaler's methods live in torch.amp, which torch.compile does not trace (a call to one breaks the graph);
# its attributes it reads. So the few methods needed here are replaced by the attributes they read.


def scaler_enabled(scaler: Any) -> bool:
    return scaler is not None and bool(scaler._enabled)  # scaler.is_enabled()


def check_scale_tracker(scaler: Any, funcname: str) -> None:
    """GradScaler's own check that scale() ran before unscale_/step, with its messages."""
    for name in ("_scale", "_growth_tracker"):
        if getattr(scaler, name) is None:
            raise AssertionError(
                f"Attempted {funcname} but {name} is None.  This may indicate your script did not use "
                "scaler.scale(loss or outputs) earlier in the iteration."
            )


def scaler_state(scaler: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The scaler's record for `optimizer` ({"stage": OptState, "found_inf_per_device": {device: Tensor}}).

    A missing record is created and stored here, as GradScaler's defaultdict would on lookup: torch.compile
    does not replay an insertion made by a defaultdict's factory, so the record must be stored explicitly."""
    from torch.amp.grad_scaler import OptState

    states = scaler._per_optimizer_states
    key = id(optimizer)
    if key not in states:
        states[key] = {"stage": OptState.READY, "found_inf_per_device": {}}
    return states[key]


def check_can_unscale(scaler: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """torch's own checks of unscale_(), with its messages; returns the optimizer's scaler state."""
    from torch.amp.grad_scaler import OptState

    check_scale_tracker(scaler, "unscale_")
    state = scaler_state(scaler, optimizer)
    if state["stage"] is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    return state


def inv_scale_of(scaler: Any) -> Tensor:
    """1 / scale as torch computes it (the reciprocal in float64, then float32), on the scale's device."""
    scale = scaler._scale
    if scale.device.type == "mps":
        return scale.reciprocal()
    return scale.double().reciprocal().float()


def check_no_fp16(grads: list[Tensor]) -> None:
    """GradScaler refuses to unscale float16 gradients (fp16 master weights); so do we, before touching any."""
    if any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")


def flag_reliable(norm_type: float) -> bool:
    """Whether a non-finite gradient always makes the total non-finite (false for p = 0 and p = -inf)."""
    return norm_type > 0


def norm_and_flags(
    grads: list[Tensor], norm_type: float, backend: Optional[str] = None
) -> tuple[dispatch.Plan, Tensor, dict[torch.device, Tensor]]:
    """One read pass: (plan, total of `grads`, {device: float32 0/1 flag "this device's part is not finite"}).

    Every device holding a gradient gets a flag (zero-size gradients included), as GradScaler records it.
    """
    plan = dispatch.make_plan(grads, backend)
    totals = [g.backend.norms(g.tensors, norm_type, False)[0] for g in plan.groups]
    per_device: dict[torch.device, list[Tensor]] = {}
    for g, t in zip(plan.groups, totals):
        per_device.setdefault(g.tensors[0].device, []).append(t)
    flags: dict[torch.device, Tensor] = {}
    for grad in grads:
        d = grad.device
        if d in flags:
            continue
        mine = per_device.get(d)
        if not mine:
            flags[d] = torch.zeros((), dtype=torch.float32, device=d)
        else:
            stacked = mine[0] if len(mine) == 1 else torch.stack([t.to(d) for t in mine])
            flags[d] = (~torch.isfinite(stacked)).any().to(torch.float32)
    return plan, dispatch.combine_totals(totals, norm_type, plan), flags


def distributed_norm_and_flags(
    params: list[Tensor], grads: list[Tensor], norm_type: float, backend: Optional[str],
    process_group: distributed.GroupArg, replicated: distributed.ReplicatedArg,
    prior: Optional[dict[torch.device, Tensor]] = None,
) -> tuple[distributed.Call, Tensor, dict[torch.device, Tensor]]:
    """norm_and_flags for DTensor gradients or a process group: (the kept or new distributed call, the global
    total of `grads`, {device: flag}). The flag is the global one, the same on every rank, so every rank skips or
    steps alike: "the total is not finite", or "some rank's `prior` flag is set" (flags of torch's unscale_, this
    rank's own), which rides in the total's own collective. Pass `prior` (a dict, empty or not) on every rank or on
    none: it adds an entry to the collective's payload."""
    call = distributed.find_or_prepare(params, True, grads, backend, None, process_group, replicated)
    mine = None
    if prior is not None:  # this rank's flag: the max over its devices (0 where torch recorded none)
        own = [f.to(call.layout.device, torch.float32) for f in prior.values()]
        mine = torch.stack(own).amax() if own else torch.zeros((), device=call.layout.device)
    total, found = call.total_and_flag(norm_type, mine)
    flag = (~torch.isfinite(total)).to(torch.float32)
    if found is not None:
        flag = torch.maximum(flag, found.gt(0).to(torch.float32))
    devices = {t.device for t in call.scale_locals} | set(prior or ()) or {total.device}
    return call, total, {d: flag.to(d) for d in devices}


def unscale_total(total: Tensor, inv_scale: Tensor, norm_type: float) -> Tensor:
    """The norm of the unscaled gradients from the norm of the scaled ones (p = 0 counts do not scale)."""
    if norm_type == 0:
        return total
    return total * inv_scale.to(total.device)


@torch.no_grad()
def unscale_and_clip_grad_norm_(
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    max_norm: Number,
    norm_type: Number | str = 2.0,
    *,
    backend: Optional[str] = None,
    process_group: distributed.GroupArg = None,
    replicated: distributed.ReplicatedArg = None,
) -> Tensor:
    """``scaler.unscale_(optimizer)`` followed by ``clip_grad_norm_`` over the optimizer's parameters, in one read
    pass and one read-write pass.

    Parameters
    ----------
    optimizer : the optimizer whose parameters' gradients are unscaled and clipped (all param groups)
    scaler : a ``torch.amp.GradScaler`` (any device); when disabled this is a plain clip
    max_norm : the largest allowed total norm of the unscaled gradients, >= 0
    norm_type : p > 0, inf, -inf, 0, or 'inf' / '-inf' (0 and -inf run torch's unscale_ then a fused clip)
    backend : "cuda", "triton", "torch" or None (auto)
    process_group, replicated : as for ``clip_grad_norm_`` (DTensor gradients on any meshes need neither); the
        non-finite flag is then the global one, the same on every rank

    Returns
    -------
    The total norm of the unscaled gradients before clipping (float32, float64 if any gradient is float64); for
    DTensor gradients on one mesh a DTensor, as ``clip_grad_norm_`` returns it.

    Afterwards the scaler holds the per-device ``found_inf`` flags and marks the optimizer unscaled, so
    ``scaler.step(optimizer)`` skips a non-finite step, ``scaler.update()`` backs off, and a second
    ``unscale_`` before ``update`` raises, all as after ``scaler.unscale_(optimizer)``.
    """
    from torch.amp.grad_scaler import OptState

    from .clip import clip_grad_norm_

    max_norm = check_nonnegative(max_norm, "max_norm")
    p = parse_norm_type(norm_type)
    params = optimizer_params(optimizer)
    groups = {"backend": backend, "process_group": process_group, "replicated": replicated}
    if not scaler_enabled(scaler):
        return clip_grad_norm_(params, max_norm, p, **groups)
    state = check_can_unscale(scaler, optimizer)
    grads = collect_grads(params)
    check_no_fp16(grads)
    if not flag_reliable(p) or any(g.is_sparse for g in grads):
        # The total cannot stand in for the non-finite check (or sparse values need torch's own handling).
        scaler.unscale_(optimizer)
        if not distributed.needed(grads, process_group, replicated):
            return clip_grad_norm_(params, max_norm, p, **groups)
        # torch's flags are this rank's own: made global in the clip's collective, so every rank skips alike.
        call, total, flags = distributed_norm_and_flags(
            params, grads, p, backend, process_group, replicated, dict(state["found_inf_per_device"])
        )
        call.scale_(clip_coef(total, max_norm))
        state["found_inf_per_device"] = flags
        return call.wrap(total, p)
    if distributed.needed(grads, process_group, replicated):
        inv_scale = inv_scale_of(scaler)
        # (prior={}: on every rank, whichever branch it took, the payloads have the same length)
        call, scaled_total, flags = distributed_norm_and_flags(
            params, grads, p, backend, process_group, replicated, {}
        )
        total = unscale_total(scaled_total, inv_scale, p)
        call.scale_(inv_scale.to(total.device) * clip_coef(total, max_norm))
        state["found_inf_per_device"] = flags
        state["stage"] = OptState.UNSCALED
        return call.wrap(total, p)
    if not grads:
        state["found_inf_per_device"] = {}
        state["stage"] = OptState.UNSCALED
        return torch.tensor(0.0)
    inv_scale = inv_scale_of(scaler)
    plan, scaled_total, flags = norm_and_flags(grads, p, backend)
    total = unscale_total(scaled_total, inv_scale, p)
    factor = inv_scale.to(total.device) * clip_coef(total, max_norm)
    dispatch.scale_(plan, factor)
    state["found_inf_per_device"] = flags
    state["stage"] = OptState.UNSCALED
    return total
