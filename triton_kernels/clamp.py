"""In-place g = clamp(g, -v, v) over every tensor of a plan, one program per chunk. NaN stays NaN, as in torch.

The bound comes pre-rounded to each dtype by the host (torch's rounding), so what is stored is exactly
representable and no in-kernel down-cast decides it (Triton's interpreter truncates float32 -> bfloat16).
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl
import torch
from torch import Tensor

from .addressing import BF16, CODE_DTYPES, CODE_MATH, CODE_SIZES, F16, F32, WIDE, edge_lanes, f64_bits
from .launch import Launcher, Prepared

# The bound as each dtype holds it, in the kernel's argument order.
_ROUNDED = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["num_tensors", "b64_bits", "b32_bits", "b16_bits", "bb16_bits"])
def _clamp_kernel(
    meta_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    num_tensors,
    b64_bits,
    b32_bits,
    b16_bits,
    bb16_bits,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    EDGE: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
    start = tl.load(chunk_start_ptr + c)
    addr = tl.load(meta_ptr + t)
    n = tl.minimum(tl.load(meta_ptr + num_tensors + t) - start, CHUNK)  # elements of this chunk
    code = tl.load(meta_ptr + 2 * num_tensors + t)
    lanes = tl.arange(0, EDGE)
    for D in tl.static_range(4):  # one arm per dtype code; see addressing.py for the head / body / tail split
        if code == D:
            # The bound as this dtype holds it, widened exactly to the type the comparison runs in.
            if D == F32:
                bits = b32_bits
            elif D == F16:
                bits = b16_bits
            elif D == BF16:
                bits = bb16_bits
            else:
                bits = b64_bits
            b = bits.to(tl.int64).to(tl.float64, bitcast=True).to(CODE_MATH[D])
            ITEM: tl.constexpr = CODE_SIZES[D]
            STEP: tl.constexpr = BLOCK * 4 // ITEM  # a body step moves 4 * BLOCK bytes, whatever the dtype
            base = addr + start * ITEM  # the chunk's first byte
            skip = -base & (WIDE - 1)  # bytes up to the first 16-byte boundary (a tensor is element-aligned)
            head = tl.minimum(skip // ITEM, n)  # the elements before it
            full = (n - head) // STEP  # whole steps from the boundary: aligned, unmasked
            jump = full * STEP
            edge = n - jump  # head + tail, masked
            body = tl.multiple_of((base + skip).to(tl.pointer_type(CODE_DTYPES[D])), WIDE)
            ptr = base.to(tl.pointer_type(CODE_DTYPES[D]))
            # Comparisons with NaN are false, so NaN passes through unchanged.
            i = tl.full([], 0, tl.int64)  # int64 scalars: far cheaper than int32 under the interpreter
            while i < full:  # a while loop: the interpreter cannot range() over loaded bounds
                q = body + i * STEP + tl.arange(0, STEP)
                x = tl.load(q).to(CODE_MATH[D])
                tl.store(q, tl.where(x > b, b, tl.where(x < -b, -b, x)).to(CODE_DTYPES[D]))
                i += 1
            j = tl.full([], 0, tl.int64)
            while j < edge:
                v = j + lanes  # position among the edge elements: head, then tail
                q = ptr + tl.where(v < head, v, v + jump)
                m = v < edge
                x = tl.load(q, mask=m).to(CODE_MATH[D])
                tl.store(q, tl.where(x > b, b, tl.where(x < -b, -b, x)).to(CODE_DTYPES[D]), mask=m)
                j += EDGE


def clamp_(
    meta: Tensor,
    chunk_tensor: Tensor,
    chunk_start: Tensor,
    num_tensors: int,
    num_chunks: int,
    chunk_size: int,
    clip_value: float,
    block: int = 1024,
    num_warps: int = 4,
) -> None:
    """One launch: every tensor of the tables clamped to [-clip_value, clip_value] in place."""
    _CLAMP((num_chunks,), *_args(meta, chunk_tensor, chunk_start, num_tensors, chunk_size, clip_value, block),
           num_warps=num_warps)


def prepare_clamp_(
    meta: Tensor,
    chunk_tensor: Tensor,
    chunk_start: Tensor,
    num_tensors: int,
    num_chunks: int,
    chunk_size: int,
    clip_value: float,
    block: int = 1024,
    num_warps: int = 4,
) -> Prepared:
    """clamp_, prepared once for a caller that repeats it over the same tables and value (a kept plan): call the
    result to launch."""
    return _CLAMP.prepare(
        (num_chunks,), _args(meta, chunk_tensor, chunk_start, num_tensors, chunk_size, clip_value, block), num_warps
    )


def _args(meta: Tensor, chunk_tensor: Tensor, chunk_start: Tensor, num_tensors: int, chunk_size: int,
          clip_value: float, block: int) -> tuple:
    # Constexprs positional, in the kernel's order: CHUNK, BLOCK, EDGE.
    return (meta, chunk_tensor, chunk_start, num_tensors, *_bounds(float(clip_value)), chunk_size, block,
            edge_lanes(block))


@functools.lru_cache(maxsize=64)
def _bounds(clip_value: float) -> tuple[int, ...]:
    """clip_value rounded to each dtype of _ROUNDED, as float64 bit patterns (cached: a training loop passes one
    value every step, and these four conversions are most of a steady-state call's host time)."""
    return tuple(f64_bits(float(torch.tensor(clip_value, dtype=torch.float64).to(d))) for d in _ROUNDED)


_CLAMP = Launcher(globals(), "_clamp_kernel")
