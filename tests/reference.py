"""Test oracles and inputs: float64 references computed from the stored values, the one per-dtype tolerance
table, and random gradient factories (never zeros, odd sizes, mixed dtypes)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# Relative tolerance of a total against the float64 reference, by accumulation dtype (float64 only when every
# input is float64: float32 inputs are accumulated in float32 even when the total is float64), and the number
# of ulps (of the gradient's dtype) a clipped value may be from the float64 reference given the returned total
# (torch computes max_norm / x as a reciprocal times max_norm: one more rounding).
TOTAL_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}
VALUE_ULPS = {torch.float32: 2, torch.float64: 2, torch.bfloat16: 1, torch.float16: 1}
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NORM_TYPES = [2.0, 1.0, 3.0, 0.5, float("inf"), float("-inf"), 0.0]


def ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def norm_rtol(acc: torch.dtype, terms: int) -> float:
    """Bound on the relative error of a 2-norm of `terms` values accumulated in `acc`, whatever the summation
    order: the squares and the sum round at most `terms` times by u = ulp/2 (relative to the sum), the square
    root halves that and rounds once more."""
    return (terms / 2 + 1) * ulp(acc) / 2


def assert_rel_close(got: Tensor, ref: Tensor, rtol: float, what: str = "values") -> None:
    """Every element of `got` within `rtol` (relative) of the float64 reference `ref` (zeros must match exactly)."""
    actual = got.detach().to("cpu", torch.float64)
    err = (actual - ref).abs()
    bad = ~(err <= rtol * ref.abs())
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {got.numel()} off by more than {rtol:.1e} relative; "
        f"worst {float((err / ref.abs()).max()):.2e}"
    )


def random_tensor(shape, dtype=torch.float32, device="cpu", gen: torch.Generator | None = None, scale=1.0) -> Tensor:
    """Normal values times `scale`, with no exact zeros (a zero would hide a missing element)."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    x = torch.where(x == 0, torch.full_like(x, scale), x)
    return x.to(dtype=dtype, device=device)


def random_grads(count: int, dtypes=(torch.float32,), device="cpu", seed=0, max_numel=300) -> list[Tensor]:
    """`count` tensors of odd shapes (sizes 1..max_numel, some multi-dim), cycling through `dtypes`."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = int(torch.randint(1, max_numel + 1, (1,), generator=gen))
        shape = (n,) if i % 3 else (max(1, n // 7), 7)
        scale = float(torch.empty(1).uniform_(0.1, 4.0, generator=gen))
        out.append(random_tensor(shape, dtypes[i % len(dtypes)], device, gen, scale))
    return out


def sparse_tiles(tiles: int, tile: int, chunk: int, seed: int, empty_tile: int = -1) -> list[Tensor]:
    """`tiles` runs of `tile` float32 tensors (the CUDA finalize's tiles), most of them empty, each run but
    `empty_tile` with five non-empty ones (one element, odd sizes, one of several chunks of `chunk` elements): many
    tensors and tiles for few chunks."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [0] * (tiles * tile)
    for t in range(tiles):
        if t != empty_tile:
            for k, n in enumerate((1, 37, 3 * chunk + 5, chunk - 1, 2)):
                sizes[t * tile + 1 + (97 * k * (t + 1)) % (tile - 1)] = n
    return [random_tensor((n,), torch.float32, gen=gen, scale=0.25 + i % 7) for i, n in enumerate(sizes)]


def params_with_grads(grads: list[Tensor]) -> list[torch.nn.Parameter]:
    """A leaf parameter per gradient (zeros of its shape and dtype) with that gradient as its .grad."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
    return params


def ref_tensor_norm(t: Tensor, p: float) -> float:
    x = t.detach().to("cpu", torch.float64 if not t.is_complex() else torch.complex128).abs().reshape(-1)
    if x.numel() == 0:
        return 0.0
    if p == math.inf:
        return x.max().item()
    if p == -math.inf:
        return x.min().item()
    if p == 0:
        return float((x != 0).sum().item())
    return (x.pow(p).sum() ** (1.0 / p)).item()


def ref_total_norm(tensors: list[Tensor], p: float) -> float:
    """torch's definition in float64: the p-norm of the per-tensor norms (for p = 0, the count of tensors with
    any non-zero entry). Zero-size tensors contribute nothing."""
    norms = [ref_tensor_norm(t, p) for t in tensors if t.numel() > 0]
    if not norms:
        return 0.0
    n = torch.tensor(norms, dtype=torch.float64)
    if p == 0:
        return float((n != 0).sum().item())
    return torch.linalg.vector_norm(n, p).item()


def assert_total_close(
    got: Tensor, ref: float, acc: torch.dtype, what: str = "total", all_fp64: bool | None = None
) -> None:
    """`acc`: the expected dtype of `got`; `all_fp64`: whether every input was float64 (default: acc is float64)."""
    assert got.dtype == acc, f"{what} dtype {got.dtype}, expected {acc}"
    if all_fp64 is None:
        all_fp64 = acc == torch.float64
    g = got.item()
    if math.isnan(ref):
        assert math.isnan(g), f"{what}: got {g}, expected NaN"
        return
    if math.isinf(ref):
        assert g == ref, f"{what}: got {g}, expected {ref}"
        return
    tol = TOTAL_RTOL[torch.float64 if all_fp64 else torch.float32] * abs(ref) + 1e-30
    rel = abs(g - ref) / max(abs(ref), 1e-30)
    assert abs(g - ref) <= tol, f"{what}: got {g!r}, float64 reference {ref!r} (rel err {rel:.2e})"


def assert_scaled(got: Tensor, original: Tensor, coef: float, what: str = "gradient", ulps: int | None = None) -> None:
    """`got` equals original * coef (computed in float64, rounded to got's dtype) within VALUE_ULPS (or `ulps`)."""
    expected = (original.detach().to("cpu", torch.float64) * coef).to(original.dtype).to(torch.float64)
    actual = got.detach().to("cpu", torch.float64)
    ulps = ulps or VALUE_ULPS[original.dtype]
    tol = expected.abs() * ulps * ulp(original.dtype) + torch.finfo(original.dtype).tiny
    bad = ~((actual - expected).abs() <= tol) & ~(actual.isnan() & expected.isnan())
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {got.numel()} values off by more than {ulps} ulp; "
        f"first expected {expected[bad][:3].tolist()}, got {actual[bad][:3].tolist()}"
    )


# Significant bits and smallest exponent of one ulp (subnormal spacing) of the 16-bit float dtypes.
_FORMAT = {torch.bfloat16: (8, -133), torch.float16: (11, -24)}


def round_to_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 values rounded once, to nearest even, to bfloat16 / float16 (subnormals and overflow to inf included),
    returned as float64. torch's own float64 -> bfloat16/float16 conversion goes through float32 (two roundings), so
    it cannot be the oracle of a kernel that is meant to round once."""
    bits, min_exp = _FORMAT[dtype]
    x = x.to(torch.float64)
    _, e = torch.frexp(x)  # |x| in [2^(e-1), 2^e)
    step = torch.clamp(e.to(torch.float64) - bits, min=min_exp)  # log2 of one ulp at x
    q = torch.ldexp(x, -step)  # exact: a power-of-two scaling
    out = torch.ldexp(torch.round(q), step)  # torch.round: half to even
    big = torch.finfo(dtype).max
    out = torch.where(out.abs() > big, torch.copysign(torch.full_like(out, math.inf), x), out)
    return torch.where(torch.isfinite(x), out, x)


# ---- the kernels' arithmetic (what the simulator tests in tests/gpusim compare bit for bit) --------------


def expected_tensor_norm(t: Tensor, p: float) -> float:
    """A tensor's norm as the kernel writes it: torch's, in float64; an empty tensor gets the fold's identity (0, or
    +inf for p = -inf: nothing was folded into the min)."""
    if t.numel() == 0:
        return math.inf if p == -math.inf else 0.0
    return ref_tensor_norm(t, p)


def expected_coef(total: Tensor, max_norm: float) -> Tensor:
    """torch's clip coefficient computed from the returned total in its dtype, as the kernel does (NaN kept)."""
    npt = np.float64 if total.dtype == torch.float64 else np.float32
    c = (npt(1) / (npt(total.item()) + npt(1e-6))) * npt(max_norm)
    return torch.tensor(c if (c < 1 or c != c) else npt(1), dtype=total.dtype)


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def expected_scaled(x: Tensor, coef: float, coef_dtype: torch.dtype) -> Tensor:
    """x * coef as the kernel computes it: in float (the coefficient rounded to float) for float32/float16/bfloat16,
    in double for float64, then rounded once to x's dtype. float32(x) * float32(c) is exact in float64, so `.float()`
    of the float64 product is the one IEEE rounding of the float multiply."""
    c = torch.tensor(coef, dtype=coef_dtype)
    if x.dtype == torch.float64:
        return x * c.double()
    f32 = (x.double() * c.float().double()).float()
    return f32 if x.dtype == torch.float32 else f32.to(x.dtype)
