"""Plain torch ops: the CPU path and the fallback for anything the kernel backends do not take.

Accumulates in float32 (float64 for float64), unlike stock torch which returns a bf16/fp16 total for bf16/fp16
gradients. On CPU the scale pass is skipped when no clipping is needed: the host decision costs nothing there.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from . import Backend, acc_dtype, load_host_extension, norm_dtype


# torch's CPU norm of one long vector drifts: its accumulators each sum a share of every element. For p = 2 it
# stays within 2e-6 of float64 on random values up to 256K elements (1.1e-5 at 1M, 5e-3 at 38M), but not on
# equal values (4.6e-5 at 65536: their rounding does not cancel); for other p its kernel sums in one scalar
# (1.9e-5 at 262K random values for p = 3). Tensors above LONG elements (SHORT for p other than 2) are reduced
# in rows of ROW (SHORT_ROW) elements and the row norms combined in float64: within 3e-6 for any length, equal
# values included. Shorter ones keep torch's one-call foreach norm: a row pass per tensor would cost more than
# the norm itself for thousands of small tensors.
LONG = 1 << 18
SHORT = 1 << 12
ROW = 1 << 11
SHORT_ROW = 1 << 7
# bf16/fp16: torch's norm with dtype=float32 first converts the whole tensor to float32 (a fresh buffer twice the
# tensor's size, page-faulted in on every call for big tensors). Long ones are converted BLOCK elements at a time
# into one reused float32 buffer (4 MiB: in the last-level cache), or fused (below).
BLOCK = 1 << 20
_LOWP = (torch.bfloat16, torch.float16)


def _row_length(norm_type: float) -> int:
    return ROW if norm_type == 2.0 else SHORT_ROW


def _by_rows(t: Tensor, norm_type: float) -> bool:
    """Whether `t` takes the row-wise path: a long CPU tensor, for a finite p > 0."""
    return (
        t.numel() > (LONG if norm_type == 2.0 else SHORT)
        and t.device.type == "cpu"
        and 0 < norm_type < float("inf")
        and t.layout == torch.strided
        and t.is_contiguous()
        and not torch.compiler.is_compiling()  # a traced graph fuses the conversion itself
    )


def _row_norms(flat: Tensor, norm_type: float, parts: list[Tensor]) -> int:
    """Append the norms of `flat`'s rows (and of its tail) to `parts`; return how many."""
    row = _row_length(norm_type)
    whole = flat.numel() // row * row
    if whole:
        parts.append(torch.linalg.vector_norm(flat[:whole].view(-1, row), norm_type, dim=1))
    if whole < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[whole:], norm_type).reshape(1))
    return whole // row + (whole < flat.numel())


# p = 2 over bf16/fp16 on CPU, the common case: torch.compile fuses the conversion into the reduction (one read of
# the gradients, as torch's own bf16 norm). On 2 cores GPT-2 bf16's norm took 1.19x stock's, against 1.79x with
# the blocked conversion. The compile costs seconds once per process (11 s cold, 6 s with inductor's disk cache
# warm, measured here), so it is used only for calls with at least FUSED_MIN_ELEMENTS such elements, where it
# pays for itself within a few hundred steps. Where it fails (no C++ compiler, a Python dynamo does not support)
# the blocked conversion takes over, with one warning. FUSEDCLIP_CPU_COMPILE=0 turns it off.
FUSED_MIN_ELEMENTS = 1 << 24
_fused_rows: Optional[Callable[[Tensor], Tensor]] = None
_fused_failed: Optional[str] = None


def _fused_wanted(tensors: list[Tensor], norm_type: float) -> bool:
    if norm_type != 2.0 or _fused_failed is not None or os.environ.get("FUSEDCLIP_CPU_COMPILE", "1") == "0":
        return False
    return sum(t.numel() for t in tensors if t.dtype in _LOWP) >= FUSED_MIN_ELEMENTS


def _rows_norm2(x: Tensor) -> Tensor:
    return x.float().square().sum(dim=1).sqrt()


def _fused_row_norms(rows: Tensor) -> Optional[Tensor]:
    """2-norms of the rows of a (rows >= 2, ROW) bf16/fp16 CPU tensor in one fused pass, or None if unavailable."""
    global _fused_rows, _fused_failed
    if _fused_failed is not None:
        return None
    try:
        if _fused_rows is None:
            _fused_rows = torch.compile(_rows_norm2, dynamic=True, fullgraph=True)
        return _fused_rows(rows)
    except Exception as e:  # a missing or broken compiler: fall back, once
        _fused_failed = f"{type(e).__name__}: {str(e)[:300]}"
        warnings.warn(
            f"fusedclip: torch.compile of the CPU bf16/fp16 norm failed ({_fused_failed}); using the slower "
            "blocked conversion (set FUSEDCLIP_CPU_COMPILE=0 to skip the attempt)",
            stacklevel=2,
        )
        return None


# Intra-op threads. torch runs an op over more than 32768 elements as an OpenMP parallel region: each thread takes
# an equal share and all wait for the last at its end. When other processes want the cores too (data-loading
# workers, a second job), a thread descheduled mid-region holds the others until the scheduler runs it again, for
# milliseconds: with two busy processes on 2 cores a 4M-element row norm took 23 ms on 2 threads, 0.6 ms on one
# (0.23 and 0.45 ms on quiet cores). Stock torch's norm never opens such a region (its full reductions run on one
# thread); the row path opened one per long tensor. So rows are reduced on one thread, except a tensor so long
# that each thread's share (PARALLEL_MIN elements or more) outweighs a wait for a descheduled thread.
PARALLEL_MIN = 1 << 24


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op thread count set to 1 for the block (the calling thread's; restored after it)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# One parallel region for a whole pass: fusedclip._host's CPU passes (csrc/host/cpu_passes.cpp) cut every long
# tensor of the call into pieces of about PIECE elements that torch's intra-op threads take as they come, so a
# descheduled thread costs one wait per pass instead of one per tensor, and holds up only its own piece. Used for
# CPU tensors of more than REGION_MIN elements (torch would open a region for each) where the extension is built for
# this torch; None otherwise (FUSEDCLIP_NO_HOST_EXT=1 too), and the per-op path below runs.
PIECE = 1 << 20
REGION_MIN = 1 << 15


def _load_cpu_passes() -> Optional[Any]:
    module, _ = load_host_extension()
    return module if module is not None and getattr(module, "CPU_PASSES_PARALLEL", False) else None


cpu_passes = _load_cpu_passes()  # tests set it to None for the per-op path


def _in_one_region(tensors: list[Tensor]) -> bool:
    """Whether the pass over `tensors` (CPU, strided, contiguous) may run in cpu_passes' region: plain tensors
    outside autograd, no dispatch mode that would miss the ops its threads run, more than one thread."""
    return (
        cpu_passes is not None
        and torch.get_num_threads() > 1
        and not torch._C._len_torch_dispatch_stack()
        and all(type(t) is Tensor and not t.requires_grad for t in tensors)
    )


def _disjoint(tensors: list[Tensor]) -> bool:
    """No two of `tensors` share memory (the region's threads would write one element at once)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def norms_by_rows(tensors: list[Tensor], norm_type: float) -> list[Tensor]:
    """Each tensor's norm (float32; float64 for float64) from its row norms, combined in float64 for all of
    them at once. In one parallel region where cpu_passes runs (bf16/fp16 rows converted a piece at a time), except
    bf16/fp16 tensors the fused conversion takes (p = 2: one read, faster than a conversion per piece)."""
    fuse = _fused_wanted(tensors, norm_type)
    fused = [fuse and t.dtype in _LOWP for t in tensors]
    mine = [t for t, f in zip(tensors, fused) if not f]
    if not mine or not _in_one_region(mine):
        return _norms_by_rows_per_op(tensors, norm_type, fuse)
    row = _row_length(norm_type)
    outs = [torch.empty(-(-t.numel() // row), dtype=acc_dtype([t.dtype])) for t in mine]
    cpu_passes.row_norms(mine, outs, norm_type, row, max(1, PIECE // row))  # type: ignore[union-attr]
    combined = torch.cat(outs).double().split([o.numel() for o in outs])
    norms = iter([n.to(o.dtype) for o, n in zip(outs, torch._foreach_norm(combined, norm_type))])
    if len(mine) == len(tensors):
        return list(norms)
    others = iter(_norms_by_rows_per_op([t for t, f in zip(tensors, fused) if f], norm_type, fuse))
    return [next(others) if f else next(norms) for f in fused]


def _norms_by_rows_per_op(tensors: list[Tensor], norm_type: float, fuse: bool) -> list[Tensor]:
    """norms_by_rows without cpu_passes. bf16/fp16 rows: fused (p = 2) or converted a BLOCK at a time into one
    reused float32 buffer. On one thread, except the rows of a tensor of PARALLEL_MIN elements per thread or more,
    reduced in one region (float32/float64, or fused: the blocked conversion's regions are a block each)."""
    blocked = _BlockedConversion(tensors, norm_type)
    wide = PARALLEL_MIN * torch.get_num_threads()
    rows: dict[int, tuple[list[Tensor], int]] = {}
    for i, t in enumerate(tensors):
        if t.numel() >= wide and (fuse or t.dtype not in _LOWP):
            rows[i] = _tensor_row_norms(t, norm_type, fuse, blocked)
    with one_thread():
        for i, t in enumerate(tensors):
            if i not in rows:
                rows[i] = _tensor_row_norms(t, norm_type, fuse, blocked)
        parts = [p for i in range(len(tensors)) for p in rows[i][0]]
        combined = torch.cat(parts).double().split([rows[i][1] for i in range(len(tensors))])
        return [n.to(acc_dtype([t.dtype])) for t, n in zip(tensors, torch._foreach_norm(combined, norm_type))]


def _tensor_row_norms(
    t: Tensor, norm_type: float, fuse: bool, blocked: _BlockedConversion
) -> tuple[list[Tensor], int]:
    """The norms of `t`'s rows (and of its tail), and how many."""
    parts: list[Tensor] = []
    flat = t.view(-1)
    if t.dtype not in _LOWP:
        return parts, _row_norms(flat, norm_type, parts)
    whole = flat.numel() // ROW * ROW
    fused = _fused_row_norms(flat[:whole].view(-1, ROW)) if fuse and whole >= 2 * ROW else None
    if fused is None:
        return parts, blocked.row_norms(flat, parts)
    parts.append(fused)
    if whole < flat.numel():
        parts.append(torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).reshape(1))
    return parts, whole // ROW + (whole < flat.numel())


class _BlockedConversion:
    """Row norms of bf16/fp16 tensors through one float32 buffer, allocated at first use and reused: whole blocks
    are converted into it and its rows reduced in place (BLOCK is a multiple of both row lengths); the rest of a
    tensor, shorter than a block, through a slice of it."""

    def __init__(self, tensors: list[Tensor], norm_type: float) -> None:
        self.size = min(BLOCK, max((t.numel() for t in tensors if t.dtype in _LOWP), default=0))
        self.norm_type = norm_type
        self.buffer: Optional[Tensor] = None

    def row_norms(self, flat: Tensor, parts: list[Tensor]) -> int:
        if self.buffer is None:
            self.buffer = torch.empty(self.size, dtype=torch.float32)
        buffer, p = self.buffer, self.norm_type
        rows = buffer.view(-1, _row_length(p)) if buffer.numel() == BLOCK else None
        whole = flat.numel() // BLOCK * BLOCK if rows is not None else 0
        for start in range(0, whole, BLOCK):
            buffer.copy_(flat[start : start + BLOCK])
            parts.append(torch.linalg.vector_norm(rows, p, dim=1))  # type: ignore[arg-type]
        count = whole // _row_length(p)
        if whole < flat.numel():
            converted = buffer[: flat.numel() - whole]
            converted.copy_(flat[whole:])
            count += _row_norms(converted, p, parts)
        return count


def combine_tensor_norms(norms: Tensor, norm_type: float) -> Tensor:
    """Total from per-tensor norms, as torch combines them (for p = 0: the number of non-zero norms)."""
    if norm_type == 0:
        return (norms != 0).sum().to(norms.dtype)
    return torch.linalg.vector_norm(norms, norm_type)


def _on_host(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _host_reads(t: Tensor) -> bool:
    """Whether reading `t`'s values on the host to save work is free: a CPU tensor, outside torch.compile.
    A traced value read would need a graph break (dynamo cannot branch on data), so traced code runs the
    branch-free form, which is also what a compiled graph does best."""
    return _on_host(t) and not torch.compiler.is_compiling()


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _stored_values(t: Tensor) -> Optional[Tensor]:
    """The values a sparse tensor stores (COO coalesced: its duplicates add up), an alias that in-place ops write
    through; None for a strided tensor. Every element not stored is an implicit zero."""
    if t.is_sparse:
        return t.coalesce().values() if not t.is_coalesced() else t._values()
    if t.layout in _COMPRESSED:
        return t.values()
    return None


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

    def _by_dtype(self, tensors: list[Tensor]) -> list[list[int]]:
        """Indices of `tensors` grouped by dtype; one group without a per-tensor pass when there is one dtype."""
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) == 1:
            return [list(range(len(tensors)))]
        groups: dict[torch.dtype, list[int]] = {d: [] for d in dtypes}
        for i, t in enumerate(tensors):
            groups[t.dtype].append(i)
        return list(groups.values())

    def per_tensor_norms(self, tensors: list[Tensor], norm_type: float) -> Tensor:
        """1-D tensor of per-tensor norms in the accumulation dtype, in input order."""
        long = [i for i, t in enumerate(tensors) if _by_rows(t, norm_type)]
        groups = self._by_dtype(tensors)
        if not long and len(groups) == 1 and self._use_foreach(tensors):  # the common case, in one call
            return torch.stack(torch._foreach_norm(tensors, norm_type, dtype=norm_dtype(tensors[0].dtype)))
        out: list[Optional[Tensor]] = [None] * len(tensors)
        if long:
            for i, n in zip(long, norms_by_rows([tensors[i] for i in long], norm_type)):
                out[i] = n
        for idx in groups:
            idx = [i for i in idx if out[i] is None]
            group = [tensors[i] for i in idx]
            if not group:
                continue
            if self._use_foreach(group):
                norms = torch._foreach_norm(group, norm_type, dtype=norm_dtype(group[0].dtype))
            else:
                norms = [self._one_norm(t, norm_type) for t in group]
            for i, n in zip(idx, norms):
                out[i] = n
        acc = acc_dtype({n.dtype for n in out})  # type: ignore[union-attr]
        return torch.stack([n if n.dtype == acc else n.to(acc) for n in out])  # type: ignore[union-attr]

    @staticmethod
    def _one_norm(t: Tensor, norm_type: float) -> Tensor:
        dtype = norm_dtype(t.dtype)
        values = _stored_values(t)
        if values is not None:
            n = torch.linalg.vector_norm(values, norm_type, dtype=dtype)
            # Implicit zeros count for -inf (min |x|) when not every element is stored.
            if norm_type == float("-inf") and values.numel() < t.numel():
                n = torch.zeros_like(n)
            return n
        return torch.linalg.vector_norm(t, norm_type, dtype=dtype)

    # `plan` (see Backend): this backend has none, and ignores it.

    def norms(
        self, tensors: list[Tensor], norm_type: float, per_tensor: bool, plan: Optional[object] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        norms = self.per_tensor_norms(tensors, norm_type)
        total = combine_tensor_norms(norms, norm_type)
        return total, (norms if per_tensor else None)

    def scale_(self, tensors: list[Tensor], coef: Tensor, plan: Optional[object] = None) -> None:
        # Only an exact 1 may be skipped: AMP folds inv_scale into coef, which can then exceed 1.
        if _host_reads(coef) and bool(coef == 1):  # False for NaN: NaN still propagates
            return
        # One foreach call per dtype, as torch does: a foreach op with a tensor scalar may round the
        # scalar to the first tensor's dtype, which would scale float64 gradients by a float32 coefficient.
        for idx in self._by_dtype(tensors):
            group = [tensors[i] for i in idx]
            if self._use_foreach(group):
                group = self._scale_in_one_region(group, coef)
                if group:
                    torch._foreach_mul_(group, coef)
                continue
            for t in group:
                if t.is_sparse:
                    t._values().mul_(coef)
                else:
                    t.mul_(coef)

    @staticmethod
    def _scale_in_one_region(group: list[Tensor], coef: Tensor) -> list[Tensor]:
        """Scale `group`'s long CPU tensors by cpu_passes in one region where it may; return the others."""
        if cpu_passes is None or not _host_reads(coef):
            return group
        long = [t.numel() > REGION_MIN and _on_host(t) and t.is_contiguous() for t in group]
        if not any(long):
            return group
        big = [t for t, is_long in zip(group, long) if is_long]
        if not (_in_one_region(big) and _disjoint(big)):
            return group
        cpu_passes.scale_(big, coef, PIECE)
        return [t for t, is_long in zip(group, long) if not is_long]

    def scale_per_tensor_(self, tensors: list[Tensor], coefs: Tensor, plan: Optional[object] = None) -> None:
        if _host_reads(coefs):
            pairs = [(t, c) for t, c in zip(tensors, coefs.tolist()) if c != 1]  # NaN != 1: still applied
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

    def plan(self, tensors: list[Tensor]) -> Optional[TorchPlan]:
        return None if torch.compiler.is_compiling() else TorchPlan()

    def clamp_(self, tensors: list[Tensor], clip_value: float, plan: Optional[object] = None) -> None:
        known = isinstance(plan, TorchPlan)
        if known and plan.all_foreach:  # type: ignore[union-attr]
            torch._foreach_clamp_min_(tensors, -clip_value)
            torch._foreach_clamp_max_(tensors, clip_value)
            return
        dense = [t for t in tensors if t.layout == torch.strided]
        one_pass = dense
        if dense and self._use_foreach(dense):
            one_pass = []
            if _on_host(dense[0]) and not torch.compiler.is_compiling():
                # On CPU one pass per tensor beats the two foreach passes over a large tensor (memory bound), but
                # a Python call per tensor costs far more than the passes over a small one (host bound).
                one_pass = [t for t in dense if t.numel() >= _CPU_ONE_PASS_NUMEL]
                if one_pass:
                    dense = [t for t in dense if t.numel() < _CPU_ONE_PASS_NUMEL]
            if dense:
                torch._foreach_clamp_min_(dense, -clip_value)
                torch._foreach_clamp_max_(dense, clip_value)
        if known:  # every tensor went to the foreach passes: so will they at every call of this plan
            plan.all_foreach = not one_pass and len(dense) == len(tensors) > 0  # type: ignore[union-attr]
        for t in one_pass:
            t.clamp_(min=-clip_value, max=clip_value)
        for t in tensors:
            if t.layout != torch.strided:  # a COO one is coalesced: checked by the caller before anything was touched
                _stored_values(t).clamp_(min=-clip_value, max=clip_value)  # type: ignore[union-attr]


# CPU clamp: tensors from this size on are clamped one pass each, smaller ones by two foreach passes (see clamp_).
_CPU_ONE_PASS_NUMEL = 1 << 16


class TorchPlan:
    """The torch backend's plan of a call's tensors (Backend.plan): what its methods decided from their sizes and
    layouts, kept with a steady-state fast-path plan (fusedclip.fastpath), whose check guarantees the same sizes and
    layouts at every call, so that a later call skips the per-tensor passes that decided it. A fresh one knows
    nothing yet."""

    __slots__ = ("all_foreach",)

    def __init__(self) -> None:
        self.all_foreach: Optional[bool] = None  # clamp_: every tensor goes to the two foreach passes


_instances = {f: TorchBackend(f) for f in (None, True, False)}


def with_foreach(foreach: Optional[bool]) -> TorchBackend:
    """The torch backend honouring torch's `foreach` argument."""
    return _instances[foreach]


def load() -> TorchBackend:
    return _instances[None]
