"""One reduction over every tensor of a device, then a finalize that writes per-tensor norms, the total and
the clip coefficient as device scalars.

Launch 1 (`_reduce_kernel`, one program per chunk): the chunk's partial, sum |x|^p (or max / min / non-zero
count) accumulated in float32 (float64 when ACC is float64), into `partials[chunk]`.
Launch 2 (`_finalize_kernel`): the total in two levels, spread over the programs: program g reduces slab g, the SLAB
consecutive partials from g * SLAB whichever tensors they belong to, into `slabs[g * slab_stride]`; the last program
to take a ticket reduces the slabs' values (SLAB at a time), writes the total and the coefficient, then resets the
ticket. Per-tensor values (per-tensor norms, and p = 0, whose total counts tensors) come from tiles: program g takes
BLOCK_T tensors and reads their partials, which are contiguous, BLOCK_W at a time (so a tile costs its partials /
BLOCK_W steps, however they are shared among its tensors); for p = 0 the tile's count of non-zero tensors is its
value. The slabs' values have a buffer of their own, or (a prepared call, which reads no tile) overwrite the first
partial of their slab, which no other program reads: slab_stride = SLAB.
Every sum is in a fixed order that depends on the tables alone, not on which program runs when, and no float
atomics: the same input gives the same bits, per-tensor norms asked for or not.

|x|^p (p not 0, 1, 2 or +-inf) and the 1/p-th root are evaluated in float64 (libdevice's exp2 / log2 on a GPU,
numpy's under the interpreter): Triton's float32 exp2 / log2 are approximate (ex2.approx) and flush values below
2^-126 to zero. A float32 term is rounded once, from float64.

NaN propagates as in torch: sums carry it naturally; max/min use a separate "any NaN" flag because tl.max and
tl.maximum may drop a NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .addressing import (
    CODE_DTYPES,
    CODE_SIZES,
    NORM_INF,
    NORM_L2,
    NORM_NEG_INF,
    NORM_P,
    NORM_ZERO,
    WIDE,
    f64_bits,
    norm_kind,
)
from .launch import Launcher


@triton.jit
def _fold(acc, nan, v, NORM: tl.constexpr):
    """acc combined with v elementwise: max / min (NaN noted in `nan`, as tl.maximum may drop it), else a sum."""
    if NORM == NORM_INF:
        acc = tl.maximum(acc, v)
        nan |= (v != v).to(tl.int32)
    elif NORM == NORM_NEG_INF:
        acc = tl.minimum(acc, v)
        nan |= (v != v).to(tl.int32)
    else:
        acc += v
    return acc, nan


@triton.jit
def _settle(acc, nan, AXIS: tl.constexpr, NORM: tl.constexpr):
    """acc reduced along AXIS as _fold combines: max / min (NaN where `nan` is set anywhere along it), else a sum."""
    if NORM == NORM_INF:
        out = tl.where(tl.max(nan, AXIS) > 0, float("nan"), tl.max(acc, AXIS))
    elif NORM == NORM_NEG_INF:
        out = tl.where(tl.max(nan, AXIS) > 0, float("nan"), tl.min(acc, AXIS))
    else:
        out = tl.sum(acc, AXIS)
    return out


@triton.jit
def _root(vals, p, NORM: tl.constexpr, ACC: tl.constexpr):
    """The norm from its accumulated value: the square root (L2, correctly rounded), the 1/p-th root in float64
    (p-norms; 0 stays 0), else the value itself."""
    if NORM == NORM_L2:
        if ACC == tl.float32:
            out = tl.sqrt_rn(vals)  # tl.sqrt may be approximate
        else:
            out = tl.sqrt(vals)
    elif NORM == NORM_P:
        root = tl.exp2(tl.log2(tl.where(vals == 0, 1.0, vals).to(tl.float64)) / p)
        out = tl.where(vals == 0, 0.0, root).to(ACC)
    else:
        out = vals
    return out


@triton.jit(do_not_specialize=["num_tensors", "p_bits"])
def _reduce_kernel(
    meta_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    partial_ptr,
    num_tensors,
    p_bits,
    NORM: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
    start = tl.load(chunk_start_ptr + c)
    addr = tl.load(meta_ptr + t)
    n = tl.minimum(tl.load(meta_ptr + num_tensors + t) - start, CHUNK)  # elements of this chunk
    code = tl.load(meta_ptr + 2 * num_tensors + t)
    if NORM == NORM_P:
        p = p_bits.to(tl.int64).to(tl.float64, bitcast=True)
    else:
        p = 0.0
    if NORM == NORM_NEG_INF:
        pad = float("inf")  # what a masked-off lane reads: the identity of the combine
    else:
        pad = 0.0
    lanes = tl.arange(0, BLOCK)
    part = tl.full([], 0, ACC)
    for D in tl.static_range(4):  # one arm per dtype code; the branch is uniform per program
        if code == D:
            ITEM: tl.constexpr = CODE_SIZES[D]
            base = addr + start * ITEM  # the chunk's first byte
            skip = -base & (WIDE - 1)  # bytes up to the first 16-byte boundary (a tensor is element-aligned)
            head = tl.minimum(skip // ITEM, n)  # the elements before it
            full = (n - head) // BLOCK  # whole blocks from the boundary: aligned, read unmasked
            jump = full * BLOCK
            edge = n - jump  # head + tail, read masked
            body = tl.multiple_of((base + skip).to(tl.pointer_type(CODE_DTYPES[D])), WIDE)
            ptr = base.to(tl.pointer_type(CODE_DTYPES[D]))
            if NORM == NORM_NEG_INF:
                acc = tl.full([BLOCK], float("inf"), ACC)
            else:
                acc = tl.full([BLOCK], 0, ACC)
            nan = tl.full([BLOCK], 0, tl.int32)
            i = tl.full([], 0, tl.int64)  # int64 scalars: far cheaper than int32 under the interpreter
            while i * BLOCK < n:  # the full blocks, then the edge's (n = full * BLOCK + edge); see addressing.py
                if i < full:
                    x = tl.load(body + i * BLOCK + lanes)
                else:
                    v = i * BLOCK - jump + lanes  # position among the edge elements: head, then tail
                    x = tl.load(ptr + tl.where(v < head, v, v + jump), mask=v < edge, other=pad)
                x = tl.abs(x.to(ACC))
                if NORM == NORM_L2:
                    acc += x * x
                elif NORM == NORM_ZERO:
                    acc += (x != 0).to(ACC)  # NaN counts as non-zero, as in torch
                elif NORM == NORM_P:
                    # |x|^p as exp2(p log2|x|) in float64, rounded once to ACC (see the module docstring); x == 0
                    # kept out of log2 (gives 0). NaN and inf propagate.
                    w = tl.exp2(p * tl.log2(tl.where(x == 0, 1.0, x).to(tl.float64)))
                    acc += tl.where(x == 0, 0.0, w).to(ACC)
                else:  # L1, inf, -inf
                    acc, nan = _fold(acc, nan, x, NORM)
                i += 1
            part = _settle(acc, nan, 0, NORM).to(ACC)
    tl.store(partial_ptr + c, part)


@triton.jit(
    do_not_specialize=["slab_stride", "num_tensors", "num_chunks", "p_bits", "max_norm_bits", "per_tensor", "has_coef"]
)
def _finalize_kernel(
    partial_ptr,
    tensor_chunks_ptr,
    slab_ptr,
    norms_ptr,
    total_ptr,
    coef_ptr,
    ticket_ptr,
    slab_stride,
    num_tensors,
    num_chunks,
    p_bits,
    max_norm_bits,
    per_tensor,
    has_coef,
    NORM: tl.constexpr,
    NEUTRAL: tl.constexpr,
    SLAB: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ACC: tl.constexpr,
):
    g = tl.program_id(0)
    p = p_bits.to(tl.int64).to(tl.float64, bitcast=True)
    # The total's first level (p = 0 counts tensors instead: below): slab g, whichever tensors its partials are of.
    if NORM != NORM_ZERO:
        if g * SLAB < num_chunks:
            s = g * SLAB + tl.arange(0, SLAB)
            v = tl.load(partial_ptr + s, mask=s < num_chunks, other=NEUTRAL)
            tl.store(slab_ptr + g * slab_stride, _settle(v, (v != v).to(tl.int32), 0, NORM).to(ACC))
    # Per-tensor values of tile g: its tensors' partials are contiguous, [lo, hi); each BLOCK_W-wide step of them
    # is masked per tensor (row), so a step serves every tensor it covers.
    if (per_tensor != 0 or NORM == NORM_ZERO) and g * BLOCK_T < num_tensors:
        ids = g * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = ids < num_tensors
        first = tl.load(tensor_chunks_ptr + ids, mask=tmask, other=0)
        end = tl.load(tensor_chunks_ptr + ids + 1, mask=tmask, other=0)
        lo = tl.load(tensor_chunks_ptr + g * BLOCK_T)
        hi = tl.max(end, 0)
        acc = tl.full([BLOCK_T, BLOCK_W], NEUTRAL, ACC)
        nan = tl.full([BLOCK_T, BLOCK_W], 0, tl.int32)
        j = lo
        while j < hi:
            s = j + tl.arange(0, BLOCK_W)
            m = (s[None, :] >= first[:, None]) & (s[None, :] < end[:, None])
            v = tl.load(partial_ptr + s[None, :], mask=m, other=NEUTRAL)
            acc, nan = _fold(acc, nan, v, NORM)
            j += BLOCK_W
        vals = _settle(acc, nan, 1, NORM).to(ACC)
        if per_tensor != 0:
            tl.store(norms_ptr + ids, _root(vals, p, NORM, ACC), mask=tmask)
        if NORM == NORM_ZERO:  # torch: the number of tensors with a non-zero entry (NaN counts)
            tl.store(slab_ptr + g * slab_stride, tl.sum((tmask & (vals != 0)).to(ACC), 0))
    # Last program in: every slab (or tile count) is written; reduce them in a fixed order.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        if NORM == NORM_ZERO:
            parts = (num_tensors + BLOCK_T - 1) // BLOCK_T
        else:
            parts = (num_chunks + SLAB - 1) // SLAB
        tacc = tl.full([SLAB], NEUTRAL, ACC)
        tnan = tl.full([SLAB], 0, tl.int32)
        i = 0
        while i < parts:
            r = i + tl.arange(0, SLAB)
            v = tl.load(slab_ptr + r * slab_stride, mask=r < parts, other=NEUTRAL, cache_modifier=".cg")
            tacc, tnan = _fold(tacc, tnan, v, NORM)
            i += SLAB
        total = _root(_settle(tacc, tnan, 0, NORM).to(ACC), p, NORM, ACC)
        tl.store(total_ptr, total)
        if has_coef != 0:
            # torch: clamp(max_norm / (total + 1e-6), max=1), evaluated as torch does: reciprocal, then times.
            max_norm = max_norm_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
            eps = tl.full([], 1e-6, tl.float64).to(ACC)
            if ACC == tl.float32:
                coef = tl.math.div_rn(tl.full([], 1.0, ACC), total + eps) * max_norm  # IEEE division
            else:
                coef = (1.0 / (total + eps)) * max_norm
            coef = tl.where(coef > 1.0, 1.0, coef)  # NaN stays NaN
            tl.store(coef_ptr, coef.to(ACC))
        tl.atomic_xchg(ticket_ptr, 0)  # ready for the next call (and for CUDA-graph replay)


def multi_tensor_norm(
    meta: Tensor,
    chunk_tensor: Tensor,
    chunk_start: Tensor,
    tensor_chunks: Tensor,
    ticket: Tensor,
    num_tensors: int,
    num_chunks: int,
    chunk_size: int,
    acc_dtype: torch.dtype,
    norm_type: float,
    per_tensor: bool = False,
    max_norm: Optional[float] = None,
    block: int = 1024,
    num_warps: int = 4,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(total, per-tensor norms or None, clip coefficient or None), as device tensors of `acc_dtype`.

    Two launches. The tables are those of fusedclip.backends.plan (meta int64 [3, T]: address, numel, dtype
    code; chunk_tensor/chunk_start per chunk; tensor_chunks [T + 1]); `ticket` is an int32 [1] that is zero
    between calls. The caller keeps the tensors the table points at alive until the kernels have run.
    """
    device = meta.device
    partials = torch.empty(num_chunks, dtype=acc_dtype, device=device)
    # A value per slab of `block` partials, or per tile (p = 0).
    slabs = torch.empty(max(1, -(-num_chunks // block), -(-num_tensors // FINALIZE_TILE)), dtype=acc_dtype,
                        device=device)
    total = torch.empty((), dtype=acc_dtype, device=device)
    norms = torch.empty(num_tensors, dtype=acc_dtype, device=device) if per_tensor else slabs
    coef = torch.empty((), dtype=acc_dtype, device=device) if max_norm is not None else total
    (reduce_grid, reduce_args), (finalize_grid, finalize_args) = _launches(
        meta, chunk_tensor, chunk_start, tensor_chunks, ticket, num_tensors, num_chunks, chunk_size, acc_dtype,
        norm_type, partials, slabs, 1, norms, total, coef, per_tensor, max_norm, block,
    )
    _REDUCE(reduce_grid, *reduce_args, num_warps=num_warps)
    _FINALIZE(finalize_grid, *finalize_args, num_warps=4)
    return total, (norms if per_tensor else None), (coef if max_norm is not None else None)


def prepare_norm(
    meta: Tensor,
    chunk_tensor: Tensor,
    chunk_start: Tensor,
    tensor_chunks: Tensor,
    ticket: Tensor,
    num_tensors: int,
    num_chunks: int,
    chunk_size: int,
    acc_dtype: torch.dtype,
    norm_type: float,
    partials: Tensor,
    tensor_vals: Tensor,
    coef: Tensor,
    max_norm: Optional[float] = None,
    block: int = 1024,
    num_warps: int = 4,
) -> Callable[[], tuple[Tensor, Optional[Tensor]]]:
    """multi_tensor_norm's two launches, prepared once for a caller that repeats them over the same tables (a kept
    plan): a call allocates the total alone and returns (total, coef or None). `partials` [num_chunks],
    `tensor_vals` [num_tensors] and `coef` [1] (acc_dtype, on the tables' device) are scratch the caller keeps with
    the tables; `coef` is rewritten by the next call."""
    device = meta.device
    total = torch.empty((), dtype=acc_dtype, device=device)  # the first call's total, to key the launch with
    # The slabs' values over their slabs' first partials (no per-tensor norms here), p = 0's tile counts in tensor_vals.
    slabs, stride = (tensor_vals, 1) if norm_kind(norm_type) == NORM_ZERO.value else (partials, block)
    (reduce_grid, reduce_args), (finalize_grid, finalize_args) = _launches(
        meta, chunk_tensor, chunk_start, tensor_chunks, ticket, num_tensors, num_chunks, chunk_size, acc_dtype,
        norm_type, partials, slabs, stride, tensor_vals, total, coef if max_norm is not None else total, False,
        max_norm, block,
    )
    reduce = _REDUCE.prepare(reduce_grid, reduce_args, num_warps)
    if max_norm is None:  # the total is also the (unwritten) coefficient argument
        finalize = _FINALIZE.prepare(finalize_grid, finalize_args, 4, varying=(_TOTAL, _COEF))
    else:
        finalize = _FINALIZE.prepare(finalize_grid, finalize_args, 4, varying=(_TOTAL,))

    def norm_and_coef() -> tuple[Tensor, Optional[Tensor]]:
        total = torch.empty((), dtype=acc_dtype, device=device)
        reduce()
        if max_norm is None:
            finalize(total, total)
            return total, None
        finalize(total)
        return total, coef

    return norm_and_coef


_TOTAL, _COEF = 4, 5  # positions of total_ptr and coef_ptr among the finalize kernel's arguments
# Finalize tiles: BLOCK_T tensors, read FINALIZE_WIDTH partials (at most: a narrower block gives its own width) a step.
FINALIZE_TILE, FINALIZE_WIDTH = 8, 256


def _launches(
    meta: Tensor, chunk_tensor: Tensor, chunk_start: Tensor, tensor_chunks: Tensor, ticket: Tensor, num_tensors: int,
    num_chunks: int, chunk_size: int, acc_dtype: torch.dtype, norm_type: float, partials: Tensor, slabs: Tensor,
    slab_stride: int, norms: Tensor, total: Tensor, coef: Tensor, per_tensor: bool, max_norm: Optional[float],
    block: int,
) -> tuple[tuple[tuple[int], tuple], tuple[tuple[int], tuple]]:
    """(grid, arguments) of the reduce launch and of the finalize launch."""
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    kind = norm_kind(norm_type)
    # The identity of the combine: min for -inf, else max or sum.
    neutral = float("inf") if kind == NORM_NEG_INF.value else 0.0
    pb = f64_bits(norm_type if kind == NORM_P.value else 1.0)
    # Constexprs positional, in the kernel's order: NORM, CHUNK, BLOCK, ACC.
    reduce = (meta, chunk_tensor, chunk_start, partials, num_tensors, pb, kind, chunk_size, block, acc)
    # per_tensor / has_coef are run-time flags (not specialised), and an absent max_norm passes 1.0's bits (a 64-bit
    # int, as any positive max_norm's): one compiled variant serves norms, per-tensor norms and the coefficient.
    # Constexprs: NORM, NEUTRAL, SLAB, BLOCK_T, BLOCK_W, ACC (slabs of `block` partials).
    finalize = (
        partials, tensor_chunks, slabs, norms, total, coef, ticket, slab_stride, num_tensors, num_chunks, pb,
        f64_bits(max_norm if max_norm is not None else 1.0), int(per_tensor), int(max_norm is not None),
        kind, neutral, block, FINALIZE_TILE, min(block, FINALIZE_WIDTH), acc,
    )
    # A program per slab (p = 0: none), or per tile where per-tensor values are wanted, whichever are more; one at
    # least, to write the total.
    tiles = -(-num_tensors // FINALIZE_TILE) if per_tensor or kind == NORM_ZERO.value else 0
    programs = max(1, 0 if kind == NORM_ZERO.value else -(-num_chunks // block), tiles)
    return ((num_chunks,), reduce), ((programs,), finalize)


_REDUCE = Launcher(globals(), "_reduce_kernel")
_FINALIZE = Launcher(globals(), "_finalize_kernel")
