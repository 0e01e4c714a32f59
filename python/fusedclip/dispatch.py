"""Split a tensor list into per-device, per-backend groups and combine their results into one answer.

The common case (every gradient on one device, all taken by one backend) is a single group, and the API hands
it to the backend whole, so a kernel backend can finalize the total and the clip coefficient on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .backends import Backend, acc_dtype, torch_backend


@dataclass
class Group:
    backend: Backend
    tensors: list[Tensor]
    positions: list[int]  # index of each tensor in the caller's list


@dataclass
class Plan:
    groups: list[Group]
    count: int  # tensors in the caller's list, zero-size ones included
    device: torch.device  # the first tensor's: where totals are returned, as in torch
    dtype: torch.dtype  # of totals: float64 if any input is float64, else float32

    @property
    def single(self) -> Optional[Group]:
        """The one group holding every tensor in order, if the call is that simple."""
        if len(self.groups) == 1 and len(self.groups[0].tensors) == self.count:
            return self.groups[0]
        return None


def make_plan(tensors: list[Tensor], backend: Optional[str], foreach: Optional[bool] = None) -> Plan:
    """Zero-size tensors are left out of every group: they contribute nothing."""
    name = backends.check_backend_name(backend)
    fallback = torch_backend.with_foreach(foreach)
    chosen: dict[torch.device, Backend] = {}
    groups: dict[tuple[torch.device, str], Group] = {}
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        b = chosen.get(t.device)
        if b is None:
            b = backends.select(name, t.device)
            if b.name == "torch":
                b = fallback
            chosen[t.device] = b
        if not b.accepts(t):
            b = fallback
        g = groups.setdefault((t.device, b.name), Group(b, [], []))
        g.tensors.append(t)
        g.positions.append(i)
    device = tensors[0].device if tensors else torch.device("cpu")
    return Plan(list(groups.values()), len(tensors), device, acc_dtype(t.dtype for t in tensors))


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
    results = [g.backend.norms(g.tensors, norm_type, per_tensor) for g in plan.groups]
    total = combine_totals([r[0] for r in results], norm_type, plan)
    if not per_tensor:
        return total, None
    single = plan.single
    if single is not None and results[0][1].device == plan.device:  # type: ignore[union-attr]
        return total, results[0][1]
    out = torch.zeros(plan.count, dtype=plan.dtype, device=plan.device)
    for g, (_, norms) in zip(plan.groups, results):
        index = torch.tensor(g.positions, device=plan.device)
        out.index_copy_(0, index, norms.to(device=plan.device, dtype=plan.dtype))  # type: ignore[union-attr]
    return total, out


def scale_(plan: Plan, coef: Tensor) -> None:
    for g in plan.groups:
        g.backend.scale_(g.tensors, coef.to(g.tensors[0].device))


def scale_per_tensor_(plan: Plan, coefs: Tensor) -> None:
    """coefs: one per tensor of the caller's list, on the plan's device."""
    for g in plan.groups:
        device = g.tensors[0].device
        if plan.single is not None:
            mine = coefs.to(device)
        else:
            mine = coefs.to(device)[torch.tensor(g.positions, device=device)]
        g.backend.scale_per_tensor_(g.tensors, mine)


def check_finite(total: Tensor, norm_type: float) -> None:
    """torch's error_if_nonfinite check (a host sync, as in torch)."""
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
