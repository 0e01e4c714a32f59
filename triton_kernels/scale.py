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

from .addressing import BF16, F16, F32


@triton.jit
def _scale_kernel(
    meta_ptr,
    chunk_tensor_ptr,
    chunk_start_ptr,
    coef_ptr,
    num_tensors,
    PER_TENSOR: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
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
        end = tl.minimum(start + CHUNK, tl.load(meta_ptr + num_tensors + t))
        code = tl.load(meta_ptr + 2 * num_tensors + t)
        c32 = coef.to(tl.float32)
        c64 = coef.to(tl.float64)
        off = start
        while off < end:  # a while loop: the interpreter cannot range() over loaded bounds
            idx = off + tl.arange(0, BLOCK).to(tl.int64)
            mask = idx < end
            if code == F32:
                ptr = addr.to(tl.pointer_type(tl.float32)) + idx
                tl.store(ptr, tl.load(ptr, mask=mask) * c32, mask=mask)
            elif code == F16:
                ptr = addr.to(tl.pointer_type(tl.float16)) + idx
                tl.store(ptr, (tl.load(ptr, mask=mask).to(tl.float32) * c32).to(tl.float16), mask=mask)
            elif code == BF16:
                ptr = addr.to(tl.pointer_type(tl.bfloat16)) + idx
                tl.store(ptr, (tl.load(ptr, mask=mask).to(tl.float32) * c32).to(tl.bfloat16), mask=mask)
            else:
                ptr = addr.to(tl.pointer_type(tl.float64)) + idx
                tl.store(ptr, tl.load(ptr, mask=mask) * c64, mask=mask)
            off += BLOCK


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
    _scale_kernel[(num_chunks,)](
        meta, chunk_tensor, chunk_start, coef, num_tensors,
        PER_TENSOR=per_tensor, CHUNK=chunk_size, BLOCK=block, num_warps=num_warps,
    )
