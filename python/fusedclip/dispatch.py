"""Split a tensor list into per-device, per-backend groups and combine their results into one answer.

The common case (every gradient on one device, all taken by one backend) is a single group, and the API hands
it to the backend whole, so a kernel backend can finalize the total and the clip coefficient on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .arguments import HOST_READ_TAGS
from .backends import Backend, acc_dtype, torch_backend
from .backends.plan import IndexCache

# The index tensors of the mixed-group paths, uploaded once per distinct (device, positions): a per-call
# torch.tensor(list, device=cuda) would be a host sync, and would break CUDA-graph capture.
_indices = IndexCache()


def _index(positions: list[int], device: torch.device) -> Tensor:
    if torch.compiler.is_compiling():
        return torch.tensor(positions, device=device)  # traced: a constant of the compiled graph
    return _indices.get(device, positions)


@dataclass
class Group:
    backend: Backend
    tensors: Optional[list[Tensor]]  # None only in a fast-path plan of a backend that reads its plan alone
    positions: Sequence[int]  # index of each tensor in the caller's list
    device: torch.device
    plan: Optional[object] = None  # the backend's device plan of `tensors` (Backend.plan), looked up once per call

    def device_plan(self) -> Optional[object]:
        """The backend's plan for this group's tensors: looked up at the first use in a call, then reused."""
        if self.plan is None and self.tensors is not None:
            self.plan = self.backend.plan(self.tensors)
        return self.plan


@dataclass
class Plan:
    groups: list[Group]
    count: int  # tensors in the caller's list, zero-size ones included
    device: torch.device  # the first tensor's: where totals are returned, as in torch
    dtype: torch.dtype  # of totals: float64 if any input is float64, else float32
    # A kept plan's prepared backend calls (fusedclip.fastpath keeps them with the plan, which is always one group of
    # every tensor), by what they do; None: a plan made for one call, which prepares nothing.
    steps: Optional[dict] = None

    @property
    def single(self) -> Optional[Group]:
        """The one group holding every tensor in order, if the call is that simple."""
        if len(self.groups) == 1 and len(self.groups[0].positions) == self.count:
            return self.groups[0]
        return None


STEPS = 16  # prepared calls a kept plan holds (a loop uses one or two: same norm type, same max_norm)
_MISSING = object()


def prepared(
    plan: Plan, key: tuple, make: Callable[[Backend, object], Optional[Callable]]
) -> Optional[Callable]:
    """The prepared call `key` of a kept plan, made at its first use by `make(backend, device plan)`; or None: not a
    kept plan (fastpath keeps single-group plans only), or the backend prepares no such call (the caller then calls
    the backend method)."""
    steps = plan.steps
    if steps is None:
        return None
    step = steps.get(key, _MISSING)
    if step is _MISSING:  # (None is a kept answer: the backend prepares no such call)
        if len(steps) >= STEPS:
            steps.clear()
        group = plan.groups[0]
        step = steps[key] = make(group.backend, group.device_plan())
    return step


def prepared_clip_norm(plan: Plan, max_norm: float, norm_type: float) -> Optional[Callable[[], Tensor]]:
    """A kept plan's prepared clip_grad_norm_ (without error_if_nonfinite), or None (see prepared). It only launches
    kernels and allocates the total: nothing that autograd records, so it needs no no_grad around it."""
    return prepared(plan, ("clip_norm", norm_type, max_norm), lambda b, p: b.prepare_clip_norm(p, norm_type, max_norm))


def make_plan(tensors: list[Tensor], backend: Optional[str], foreach: Optional[bool] = None) -> Plan:
    """Zero-size tensors are left out of every group: they contribute nothing."""
    name = backends.check_backend_name(backend)
    fallback = torch_backend.with_foreach(foreach)
    if not tensors:
        return Plan([], 0, torch.device("cpu"), torch.float32)
    dtype = acc_dtype({t.dtype for t in tensors})
    devices = [t.device for t in tensors]
    device = devices[0]
    kept = [i for i, t in enumerate(tensors) if t.numel()]

    def choose(dev: torch.device) -> Backend:
        b = backends.select(name, dev)
        return fallback if b.name == "torch" else b

    if all(d == device for d in devices):
        # The common case, kept to a few passes over the list: it runs every step over thousands of tensors.
        b = choose(device)
        mine = kept if b is fallback else [i for i in kept if b.accepts(tensors[i])]
        groups = [Group(b, [tensors[i] for i in mine], mine, device)] if mine else []
        if len(mine) < len(kept):
            rest = [i for i in kept if not b.accepts(tensors[i])]
            groups.append(Group(fallback, [tensors[i] for i in rest], rest, device))
        return Plan(groups, len(tensors), device, dtype)

    check_no_meta_mix(devices)
    chosen: dict[torch.device, Backend] = {}
    by_key: dict[tuple[torch.device, str], Group] = {}
    for i in kept:
        t = tensors[i]
        b = chosen.get(devices[i])
        if b is None:
            b = chosen[devices[i]] = choose(devices[i])
        if b is not fallback and not b.accepts(t):
            b = fallback
        g = by_key.setdefault((devices[i], b.name), Group(b, [], [], devices[i]))
        g.tensors.append(t)  # type: ignore[union-attr]
        g.positions.append(i)  # type: ignore[attr-defined]
    return Plan(list(by_key.values()), len(tensors), device, dtype)


def check_no_meta_mix(devices: list[torch.device]) -> None:
    """Meta tensors have no values: a norm over meta and real tensors together cannot be combined (torch fails
    with "Cannot copy out of meta tensor"). Only the multi-device path pays for this check."""
    meta = [d.type == "meta" for d in devices]
    if any(meta) and not all(meta):
        i, j = meta.index(True), meta.index(False)
        raise ValueError(
            f"gradient {i} (of the tensors given, counting from 0, None skipped) is on the meta device and gradient "
            f"{j} on {devices[j]}: a meta tensor has no values to combine with real ones; pass the meta tensors "
            "in a call of their own"
        )


def combine_totals(totals: list[Tensor], norm_type: float, plan: Plan) -> Tensor:
    """One total from per-group totals, on the plan's device and dtype."""
    if not totals:
        return torch.zeros((), dtype=plan.dtype, device=plan.device)
    if len(totals) == 1:
        return totals[0].to(device=plan.device, dtype=plan.dtype)
    stacked = torch.stack([t.to(device=plan.device, dtype=plan.dtype) for t in totals])
    if norm_type == 0:  # each group total counts tensors with a non-zero entry
        return stacked.sum()
    return torch.linalg.vector_norm(stacked, norm_type)


def total_norm(plan: Plan, norm_type: float, per_tensor: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """(total, per-tensor norms in the accumulation dtype or None)."""
    if not per_tensor:
        step = prepared(plan, ("norm", norm_type), lambda b, p: b.prepare_norm(p, norm_type))
        if step is not None:
            return step(), None
    results = [g.backend.norms(g.tensors, norm_type, per_tensor, g.device_plan()) for g in plan.groups]
    total = combine_totals([r[0] for r in results], norm_type, plan)
    if not per_tensor:
        return total, None
    single = plan.single
    if single is not None and results[0][1].device == plan.device:  # type: ignore[union-attr]
        return total, results[0][1]
    out = torch.zeros(plan.count, dtype=plan.dtype, device=plan.device)
    for g, (_, norms) in zip(plan.groups, results):
        mine = norms.to(device=plan.device, dtype=plan.dtype)  # type: ignore[union-attr]
        out.index_copy_(0, _index(list(g.positions), plan.device), mine)
    return total, out


def scale_(plan: Plan, coef: Tensor) -> None:
    for g in plan.groups:
        g.backend.scale_(g.tensors, coef.to(g.device), g.device_plan())


def scale_per_tensor_(plan: Plan, coefs: Tensor) -> None:
    """coefs: one per tensor of the caller's list, on the plan's device."""
    for g in plan.groups:
        if plan.single is not None:
            mine = coefs.to(g.device)
        else:
            mine = coefs.to(g.device)[_index(list(g.positions), g.device)]
        g.backend.scale_per_tensor_(g.tensors, mine, g.device_plan())


def clamp_(plan: Plan, clip_value: float) -> None:
    step = prepared(plan, ("clamp", clip_value), lambda b, p: b.prepare_clamp(p, clip_value))
    if step is not None:
        step()
        return
    for g in plan.groups:
        g.backend.clamp_(g.tensors, clip_value, g.device_plan())


def check_finite(total: Tensor, norm_type: float) -> Tensor:
    """torch's error_if_nonfinite check (a host sync, as in torch); returns `total`, to be used in its place.

    While torch.compile traces, the value cannot be read (dynamo cannot branch on it; stock torch's check breaks
    the graph there): an opaque op checks it when the graph runs and returns a copy, whose data dependency keeps
    every gradient update after the check."""
    if torch.compiler.is_compiling():
        return torch.ops.fusedclip.check_finite(total, float(norm_type))
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    return total


@torch.library.custom_op("fusedclip::check_finite", mutates_args=(), tags=HOST_READ_TAGS)
def _check_finite_op(total: Tensor, norm_type: float) -> Tensor:
    check_finite(total, norm_type)
    return total.clone()


@_check_finite_op.register_fake
def _(total: Tensor, norm_type: float) -> Tensor:
    return torch.empty_like(total)
