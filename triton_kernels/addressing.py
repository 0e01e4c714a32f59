"""How the kernels reach tensors and scalars they are not handed as arguments (host side of the convention).

Tensors are read through the plan's address table: an int64 address and a dtype code per tensor, turned into
a typed pointer inside the kernel (`addr.to(tl.pointer_type(...))`), so one launch covers any number of tensors
of mixed dtypes. Float scalars that must keep float64 precision (max_norm, clip_value, p) travel as the int64
bit pattern of the double (Triton types a Python float argument as float32); a kernel reads one back with
`bits.to(tl.int64).to(tl.float64, bitcast=True)`.

The kernels call no @triton.jit helpers in their hot loops: under TRITON_INTERPRET=1 every such call re-patches
the language (milliseconds each), which would make the CPU test runs far slower.

Wide loads. An address read from a table tells the compiler nothing about alignment, so by itself it issues one
load per element. Each kernel instead splits a chunk in three: a head of at most 15 bytes up to the first 16-byte
boundary, a body of whole steps from there (its pointer hinted with `tl.multiple_of(..., WIDE)`, read unmasked:
128-bit loads and stores), and the tail after the last whole step; head and tail ("the edge") are read masked, an
element at a time. Any element-aligned tensor (torch makes no other), a misaligned view included, thus gets the
wide body; alignment is found per chunk at run time, so it costs no kernel variant. What the compiler needs to
keep it that way:
- the dtype branch sits outside the loops (a `tl.static_range` over the dtype codes, one arm each);
- loops are `while` loops over a step counter: the interpreter cannot `range()` over a loaded bound, and the
  counter times a constexpr step length still tells the compiler where each step starts;
- Triton gives one register layout to all same-shaped memory accesses that share data flow (a load widened to its
  widest member, a store capped at 128 bits, a masked element-wise one at one element). A kernel that loads and
  stores (scale, clamp) therefore gives each element size a body step of its own length (4 * BLOCK bytes: BLOCK
  float32, 2 * BLOCK 16-bit, BLOCK // 2 float64 elements) and its edge yet another (`edge_lanes`), so that no
  layout conversion, through shared memory, lands in a loop. The reduce only loads: one shape serves all.
The compile test (tests/test_triton_compile.py) checks the PTX of every variant for all of this.
"""

from __future__ import annotations

import struct

import triton.language as tl

# Dtype codes: the same as fusedclip.backends.plan.DTYPE_CODES (kept here so kernels import nothing from the API).
F32: tl.constexpr = tl.constexpr(0)
F16: tl.constexpr = tl.constexpr(1)
BF16: tl.constexpr = tl.constexpr(2)
F64: tl.constexpr = tl.constexpr(3)

# Per dtype code: the element type, its size in bytes, and the type it is scaled in (torch's opmath).
CODE_DTYPES: tl.constexpr = tl.constexpr((tl.float32, tl.float16, tl.bfloat16, tl.float64))
CODE_SIZES: tl.constexpr = tl.constexpr((4, 2, 2, 8))
CODE_MATH: tl.constexpr = tl.constexpr((tl.float32, tl.float32, tl.float32, tl.float64))
# Bytes per wide load: the alignment the body of a chunk is brought to.
WIDE: tl.constexpr = tl.constexpr(16)

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


def edge_lanes(block: int) -> int:
    """Lanes of a masked edge step in the kernels that store (see above): a length no body step has (4 * BLOCK or
    BLOCK // 4), one step for any edge of a small interpreter-sized block, at most 2048 (16 registers a thread)."""
    return 4 * block if 4 * block <= 2048 else block // 4


def f64_bits(value: float) -> int:
    """The bit pattern of `value` as a float64, for a kernel argument."""
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]
