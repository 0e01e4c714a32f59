"""AGC's unit-wise hooks (Backend.unit_norms / scale_units_) on the kernel backends: one reduce launch for the
norms of every unit, one scale launch for every unit's coefficient, over a unit plan (plan.PlanCache.get_units).

A unit the kernels can reach as one contiguous run of memory (timm's output rows, or a whole tensor) is one
entry of the plan's table. Tensors whose units are strided through memory (optax's HWIO convention), or that
the backend does not accept (e.g. a non-contiguous parameter), go to the base-class default; results are put
back in the caller's order. While torch.compile traces, the defaults run (they call the backend's own norms,
which have opaque ops for tracing); the unit plan reads data_ptr(), which cannot be traced.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import Backend, acc_dtype, unit_count
from .plan import DevicePlan, PlanCache, unit_rows

Dims = list[Optional[tuple[int, ...]]]


class UnitKernels(Backend):
    """Mixin for a kernel backend: supplies `unit_norms` / `scale_units_` from the backend's two launchers."""

    cache: PlanCache  # the backend's plan cache; unit plans share it

    def _unit_norms_on(self, tensors: list[Tensor], plan: DevicePlan, norm_type: float) -> Tensor:
        """Per-unit norms of a unit plan, one reduce launch; 1-D of plan.acc_dtype."""
        raise NotImplementedError

    def _scale_units_on(self, tensors: list[Tensor], plan: DevicePlan, coefs: Tensor) -> None:
        """plan unit u *= coefs[u], one launch. plan.aliased is False; coefs is 1-D, float32 or float64."""
        raise NotImplementedError

    def _units_available(self) -> bool:
        return not torch.compiler.is_compiling()

    def _split(self, tensors: list[Tensor], reduce_dims: Dims) -> tuple[list[int], list[int], list[int]]:
        """(indices the kernels take, their unit counts, the other indices)."""
        mine, rows, rest = [], [], []
        for i, (t, d) in enumerate(zip(tensors, reduce_dims)):
            r = unit_rows(t, d) if self.accepts(t) else None
            if r is None:
                rest.append(i)
            else:
                mine.append(i)
                rows.append(r)
        return mine, rows, rest

    def unit_norms(self, tensors: list[Tensor], reduce_dims: Dims, norm_type: float) -> Tensor:
        if not self._units_available():
            return super().unit_norms(tensors, reduce_dims, norm_type)
        mine, rows, rest = self._split(tensors, reduce_dims)
        if not mine:
            return super().unit_norms(tensors, reduce_dims, norm_type)
        acc = acc_dtype(t.dtype for t in tensors)
        taken = [tensors[i] for i in mine]
        got = self._unit_norms_on(taken, self.cache.get_units(taken, rows), norm_type).to(acc)
        if not rest:
            return got
        other = super().unit_norms([tensors[i] for i in rest], [reduce_dims[i] for i in rest], norm_type).to(acc)
        # Back into the caller's order (a loop over tensors, not units; only when some tensors were handed on).
        pieces: dict[int, Tensor] = dict(zip(mine, got.split(rows)))
        pieces.update(zip(rest, other.split([unit_count(tensors[i], reduce_dims[i]) for i in rest])))
        return torch.cat([pieces[i] for i in range(len(tensors))])

    def scale_units_(self, tensors: list[Tensor], reduce_dims: Dims, coefs: Tensor) -> None:
        if not self._units_available():
            super().scale_units_(tensors, reduce_dims, coefs)
            return
        mine, rows, rest = self._split(tensors, reduce_dims)
        if not mine:
            super().scale_units_(tensors, reduce_dims, coefs)
            return
        taken = [tensors[i] for i in mine]
        if rest:
            parts = coefs.split([unit_count(t, d) for t, d in zip(tensors, reduce_dims)])
            super().scale_units_(
                [tensors[i] for i in rest], [reduce_dims[i] for i in rest], torch.cat([parts[i] for i in rest])
            )
            coefs = torch.cat([parts[i] for i in mine])
        plan = self.cache.get_units(taken, rows)
        if plan.aliased:  # a tensor listed twice: torch scales it twice, in turn; the kernel would race
            super().scale_units_(taken, [reduce_dims[i] for i in mine], coefs)
            return
        if coefs.dtype not in (torch.float32, torch.float64):
            coefs = coefs.float()
        self._scale_units_on(taken, plan, coefs.to(plan.device).reshape(-1).contiguous())
