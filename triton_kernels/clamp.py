"""In-place g = clamp(g, -v, v) over every tensor of a plan, one program per chunk. NaN stays NaN, as in torch.

The bound comes pre-rounded to each dtype by the host (torch's rounding), so what is stored is exactly
representable and no in-kernel down-cast decides it (Triton's interpreter truncates float32 -> bfloat16).
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor

from .addressing import BF16, F16, F32, f64_bits

# The bound as each dtype holds it, in the kernel's argument order.
_ROUNDED = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["b64_bits", "b32_bits", "b16_bits", "bb16_bits"])
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
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c).to(tl.int64)
    start = tl.load(chunk_start_ptr + c)
    addr = tl.load(meta_ptr + t)
    end = tl.minimum(start + CHUNK, tl.load(meta_ptr + num_tensors + t))
    code = tl.load(meta_ptr + 2 * num_tensors + t)
    b64 = b64_bits.to(tl.int64).to(tl.float64, bitcast=True)
    b32 = b32_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32)  # exact: already rounded
    b16 = b16_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32)
    bb16 = bb16_bits.to(tl.int64).to(tl.float64, bitcast=True).to(tl.float32)
    off = start
    while off < end:  # a while loop: the interpreter cannot range() over loaded bounds
        idx = off + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < end
        # Comparisons with NaN are false, so NaN passes through unchanged.
        if code == F32:
            ptr = addr.to(tl.pointer_type(tl.float32)) + idx
            x = tl.load(ptr, mask=mask)
            tl.store(ptr, tl.where(x > b32, b32, tl.where(x < -b32, -b32, x)), mask=mask)
        elif code == F16:
            ptr = addr.to(tl.pointer_type(tl.float16)) + idx
            x = tl.load(ptr, mask=mask).to(tl.float32)
            tl.store(ptr, tl.where(x > b16, b16, tl.where(x < -b16, -b16, x)).to(tl.float16), mask=mask)
        elif code == BF16:
            ptr = addr.to(tl.pointer_type(tl.bfloat16)) + idx
            x = tl.load(ptr, mask=mask).to(tl.float32)
            tl.store(ptr, tl.where(x > bb16, bb16, tl.where(x < -bb16, -bb16, x)).to(tl.bfloat16), mask=mask)
        else:
            ptr = addr.to(tl.pointer_type(tl.float64)) + idx
            x = tl.load(ptr, mask=mask)
            tl.store(ptr, tl.where(x > b64, b64, tl.where(x < -b64, -b64, x)), mask=mask)
        off += BLOCK


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
    bounds = [f64_bits(float(torch.tensor(clip_value, dtype=torch.float64).to(d))) for d in _ROUNDED]
    _clamp_kernel[(num_chunks,)](
        meta, chunk_tensor, chunk_start, num_tensors, *bounds,
        CHUNK=chunk_size, BLOCK=block, num_warps=num_warps,
    )
