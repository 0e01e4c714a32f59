"""In-place g *= coef over every tensor of a plan, one program per chunk, reading coef from device memory.

When a program's coefficient is exactly 1 it returns at once: with coef == 1 (no clipping needed) the pass
touches no gradient memory, and no host decision is needed to skip it. A NaN coefficient is applied (NaN != 1),
as torch does. PER_TENSOR reads one coefficient per tensor (clip_grad_norm_per_tensor_). float64 tensors are
scaled in float64, the others in float32 (torch's opmath), rounded once to the tensor's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .addressing import CODE_DTYPES, CODE_MATH, CODE_SIZES, WIDE, edge_lanes
from .launch import Launcher, Prepared


@triton.jit(do_not_specialize=["num_tensors"])
def _scale_kernel(
    meta_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    coef_ptr,
    num_tensors,
    PER_TENSOR: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    EDGE: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
    if PER_TENSOR:
        coef = tl.load(coef_ptr + t)
    else:
        coef = tl.load(coef_ptr)
    if coef != 1.0:
        start = tl.load(chunk_start_ptr + c)
        addr = tl.load(meta_ptr + t)
        n = tl.minimum(tl.load(meta_ptr + num_tensors + t) - start, CHUNK)  # elements of this chunk
        code = tl.load(meta_ptr + 2 * num_tensors + t)
        lanes = tl.arange(0, EDGE)
        for D in tl.static_range(4):  # one arm per dtype code; see addressing.py for the head / body / tail split
            if code == D:
                ITEM: tl.constexpr = CODE_SIZES[D]
                STEP: tl.constexpr = BLOCK * 4 // ITEM  # a body step moves 4 * BLOCK bytes, whatever the dtype
                f = coef.to(CODE_MATH[D])
                base = addr + start * ITEM  # the chunk's first byte
                skip = -base & (WIDE - 1)  # bytes up to the first 16-byte boundary (a tensor is element-aligned)
                head = tl.minimum(skip // ITEM, n)  # the elements before it
                full = (n - head) // STEP  # whole steps from the boundary: aligned, unmasked
                jump = full * STEP
                edge = n - jump  # head + tail, masked
                body = tl.multiple_of((base + skip).to(tl.pointer_type(CODE_DTYPES[D])), WIDE)
                ptr = base.to(tl.pointer_type(CODE_DTYPES[D]))
                i = tl.full([], 0, tl.int64)  # int64 scalars: far cheaper than int32 under the interpreter
                while i < full:  # a while loop: the interpreter cannot range() over loaded bounds
                    q = body + i * STEP + tl.arange(0, STEP)
                    tl.store(q, (tl.load(q).to(CODE_MATH[D]) * f).to(CODE_DTYPES[D]))
                    i += 1
                j = tl.full([], 0, tl.int64)
                while j < edge:
                    v = j + lanes  # position among the edge elements: head, then tail
                    q = ptr + tl.where(v < head, v, v + jump)
                    m = v < edge
                    tl.store(q, (tl.load(q, mask=m).to(CODE_MATH[D]) * f).to(CODE_DTYPES[D]), mask=m)
                    j += EDGE


def scale_(
    meta: Tensor,
    chunk_tensor: Tensor,
    chunk_start: Tensor,
    num_tensors: int,
    num_chunks: int,
    chunk_size: int,
    coef: Tensor,
    per_tensor: bool = False,
    block: int = 1024,
    num_warps: int = 4,
) -> None:
    """One launch: tensor t *= coef[0], or *= coef[t] when per_tensor. `coef` is float32 or float64,
    contiguous, on the tables' device."""
    _SCALE((num_chunks,), *_args(meta, chunk_tensor, chunk_start, num_tensors, chunk_size, coef, per_tensor, block),
           num_warps=num_warps)


def prepare_scale_(
    meta: Tensor,
    chunk_tensor: Tensor,
    chunk_start: Tensor,
    num_tensors: int,
    num_chunks: int,
    chunk_size: int,
    coef: Tensor,
    block: int = 1024,
    num_warps: int = 4,
) -> Prepared:
    """scale_ by the one coefficient at `coef` (read when the kernel runs), prepared once for a caller that repeats
    it over the same tables (a kept plan): call the result to launch."""
    return _SCALE.prepare(
        (num_chunks,), _args(meta, chunk_tensor, chunk_start, num_tensors, chunk_size, coef, False, block), num_warps
    )


def _args(meta: Tensor, chunk_tensor: Tensor, chunk_start: Tensor, num_tensors: int, chunk_size: int, coef: Tensor,
          per_tensor: bool, block: int) -> tuple:
    # Constexprs positional, in the kernel's order: PER_TENSOR, CHUNK, BLOCK, EDGE.
    return meta, chunk_tensor, chunk_start, coef, num_tensors, per_tensor, chunk_size, block, edge_lanes(block)


_SCALE = Launcher(globals(), "_scale_kernel")
