"""Plain torch ops: the CPU path and the fallback for anything the kernel backends do not take.

Accumulates in float32 (float64 for float64), unlike stock torch which returns a bf16/fp16 total for bf16/fp16
gradients. On CPU the scale pass is skipped when no clipping is needed: the host decision costs nothing there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import Backend, acc_dtype


def _norm_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """dtype= argument for the per-tensor norm: None keeps torch's own (fp32, fp64, complex -> real)."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else None


def combine_tensor_norms(norms: Tensor, norm_type: float) -> Tensor:
    """Total from per-tensor norms, as torch combines them (for p = 0: the number of non-zero norms)."""
    if norm_type == 0:
        return (norms != 0).sum().to(norms.dtype)
    return torch.linalg.vector_norm(norms, norm_type)


def _on_host(t: Tensor) -> bool:
    return t.device.type == "cpu"


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, foreach: Optional[bool] = None) -> None:
        self.foreach = foreach

    def runs_on(self, device: torch.device) -> bool:
        return True

    def accepts(self, t: Tensor) -> bool:
        return True

    def _use_foreach(self, tensors: list[Tensor]) -> bool:
        return self.foreach is not False and all(t.layout == torch.strided for t in tensors)

    def per_tensor_norms(self, tensors: list[Tensor], norm_type: float) -> Tensor:
        """1-D tensor of per-tensor norms in the accumulation dtype, in input order."""
        acc = acc_dtype(t.dtype for t in tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        out: list[Optional[Tensor]] = [None] * len(tensors)
        for dtype, idx in by_dtype.items():
            group = [tensors[i] for i in idx]
            if self._use_foreach(group):
                norms = torch._foreach_norm(group, norm_type, dtype=_norm_dtype(dtype))
            else:
                norms = [self._one_norm(t, norm_type) for t in group]
            for i, n in zip(idx, norms):
                out[i] = n
        if len(by_dtype) == 1 and out[0].dtype == acc:  # type: ignore[union-attr]
            return torch.stack(out)  # type: ignore[arg-type]
        return torch.stack([n.to(acc) for n in out])  # type: ignore[union-attr]

    @staticmethod
    def _one_norm(t: Tensor, norm_type: float) -> Tensor:
        dtype = _norm_dtype(t.dtype)
        if t.is_sparse:
            values = t.coalesce().values()
            n = torch.linalg.vector_norm(values, norm_type, dtype=dtype)
            # Implicit zeros count for -inf (min |x|) when not every element is stored.
            if norm_type == float("-inf") and values.numel() < t.numel():
                n = torch.zeros_like(n)
            return n
        return torch.linalg.vector_norm(t, norm_type, dtype=dtype)

    def norms(self, tensors: list[Tensor], norm_type: float, per_tensor: bool) -> tuple[Tensor, Optional[Tensor]]:
        norms = self.per_tensor_norms(tensors, norm_type)
        total = combine_tensor_norms(norms, norm_type)
        return total, (norms if per_tensor else None)

    def scale_(self, tensors: list[Tensor], coef: Tensor) -> None:
        # Only an exact 1 may be skipped: AMP folds inv_scale into coef, which can then exceed 1.
        if _on_host(coef) and bool(coef == 1):  # False for NaN: NaN still propagates
            return
        dense = [t for t in tensors if not t.is_sparse]
        if self._use_foreach(dense):
            torch._foreach_mul_(dense, coef)
        else:
            for t in dense:
                t.mul_(coef)
        for t in tensors:
            if t.is_sparse:
                t._values().mul_(coef)

    def scale_per_tensor_(self, tensors: list[Tensor], coefs: Tensor) -> None:
        if _on_host(coefs):
            pairs = [(t, c) for t, c in zip(tensors, coefs.tolist()) if not c >= 1]
            factors: list = [c for _, c in pairs]
            tensors = [t for t, _ in pairs]
        else:
            factors = list(coefs.unbind())
        dense = [(t, c) for t, c in zip(tensors, factors) if not t.is_sparse]
        if dense and self._use_foreach([t for t, _ in dense]):
            torch._foreach_mul_([t for t, _ in dense], [c for _, c in dense])
        else:
            for t, c in dense:
                t.mul_(c)
        for t, c in zip(tensors, factors):
            if t.is_sparse:
                t._values().mul_(c)

    def clamp_(self, tensors: list[Tensor], clip_value: float) -> None:
        dense = [t for t in tensors if not t.is_sparse]
        if dense and self._use_foreach(dense) and not _on_host(dense[0]):
            # Two foreach launches beat one launch per tensor on GPUs.
            torch._foreach_clamp_min_(dense, -clip_value)
            torch._foreach_clamp_max_(dense, clip_value)
        else:
            # On CPU a single pass per tensor beats two foreach passes.
            for t in dense:
                t.clamp_(min=-clip_value, max=clip_value)
        for t in tensors:
            if t.is_sparse:  # coalesced: checked by the caller before anything was touched
                t._values().clamp_(min=-clip_value, max=clip_value)


_instances = {f: TorchBackend(f) for f in (None, True, False)}


def with_foreach(foreach: Optional[bool]) -> TorchBackend:
    """The torch backend honouring torch's `foreach` argument."""
    return _instances[foreach]


def load() -> TorchBackend:
    return _instances[None]
