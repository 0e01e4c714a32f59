"""How the kernels reach tensors and scalars they are not handed as arguments (host side of the convention).

Tensors are read through the plan's address table: an int64 address and a dtype code per tensor, turned into
a typed pointer inside the kernel (`addr.to(tl.pointer_type(...))`), so one launch covers any number of tensors
of mixed dtypes. Float scalars that must keep float64 precision (max_norm, clip_value, p) travel as the int64
bit pattern of the double (Triton types a Python float argument as float32); a kernel reads one back with
`bits.to(tl.int64).to(tl.float64, bitcast=True)`.

The kernels call no @triton.jit helpers in their hot loops: under TRITON_INTERPRET=1 every such call re-patches
the language (milliseconds each), which would make the CPU test runs far slower.
"""

from __future__ import annotations

import struct

import triton.language as tl

# Dtype codes: the same as fusedclip.backends.plan.DTYPE_CODES (kept here so kernels import nothing from the API).
F32: tl.constexpr = tl.constexpr(0)
F16: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)

# Norm kinds, chosen on the host from norm_type.
NORM_L2: tl.constexpr = tl.constexpr(0)
NORM_L1: tl.constexpr = tl.constexpr(1)
NORM_INF: tl.constexpr = tl.constexpr(2)
NORM_NEG_INF: tl.constexpr = tl.constexpr(3)
NORM_ZERO: tl.constexpr = tl.constexpr(4)
NORM_P: tl.constexpr = tl.constexpr(5)


def norm_kind(norm_type: float) -> int:
    if norm_type == 2.0:
        return 0
    if norm_type == 1.0:
        return 1
    if norm_type == float("inf"):
        return 2
    if norm_type == float("-inf"):
        return 3
    if norm_type == 0.0:
        return 4
    return 5


def f64_bits(value: float) -> int:
    """The bit pattern of `value` as a float64, for a kernel argument."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]
