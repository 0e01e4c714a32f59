"""Every path of the CUDA kernels (csrc/kernels), executed in GPGPU-Sim and compared with float64 references.

A simulator result, not a GPU result: this is the kernel source's logic as CUDA 11.8 compiles it for sm_70 (indexing,
heads and tails, the ticket and tile finalize, atomics and fences, counter resets, conversions and rounding). It says
nothing of the sm_80/sm_90 binaries we ship, of speed, or of races only real hardware shows.

Chunks are CHUNK = 256 elements (a multiple of kChunkAlign) so that multi-chunk, multi-block and multi-tile tables
stay cheap to simulate; `sm_count` sets the grid (min(chunks, 4 * sm_count) blocks)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from torch import Tensor

import sim as simlib
from reference import (
    FLOAT_DTYPES,
    NORM_TYPES,
    assert_total_close,
    expected_coef,
    expected_scaled,
    expected_tensor_norm,
    random_tensor,
    ref_total_norm,
    round_to_dtype,
    same_bits,
    sparse_tiles,
)

CHUNK = 256
SIZES = [1, 7, 255, 256, 257, 1000, 0, 3 * CHUNK + 5, 33]  # one element, odd, chunk +-1, multi-chunk, empty
SHIFTS = [0, 1, 3, 0, 5, 2, 0, 7, 1]  # elements past a 16-byte boundary: misaligned views
SHORT_SIZES = [1, 7, 0, 45, 33]
SIMPLE_P = (2.0, 1.0, 0.0, math.inf, -math.inf)  # the norm types with a fold of their own (no |x|^p)
KINDS = {"float32": [torch.float32], "float16": [torch.float16], "bfloat16": [torch.bfloat16],
         "float64": [torch.float64], "mixed32": [torch.float32, torch.float16, torch.bfloat16], "mixed64": FLOAT_DTYPES}
P_IDS = {2.0: "p2", 1.0: "p1", 3.0: "p3", 0.5: "p0.5", math.inf: "inf", -math.inf: "-inf", 0.0: "p0"}


def seed_of(*what) -> int:
    """A stable seed from a case's parameters (Python's hash() of a string changes from process to process)."""
    return zlib.crc32(repr(what).encode())


def make_list(dtypes, seed: int, sizes=SIZES, scale_range=(0.1, 4.0)) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        lo, hi = scale_range
        scale = math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(torch.rand((), generator=gen)))
        out.append(random_tensor((n,), dtypes[i % len(dtypes)], gen=gen, scale=scale))
    return out


# ---- oracles ---------------------------------------------------------------------------------------------------------


def check_norm(res: simlib.NormResult, tensors: list[Tensor], p: float, acc: torch.dtype, max_norm) -> None:
    all_fp64 = all(t.dtype == torch.float64 for t in tensors)
    assert_total_close(res.total, ref_total_norm(tensors, p), acc, all_fp64=all_fp64)
    if res.norms is not None:
        assert res.norms.numel() == len(tensors)
        for i, t in enumerate(tensors):
            assert_total_close(res.norms[i], expected_tensor_norm(t, p), acc, what=f"norm of tensor {i} ({t.dtype})",
                               all_fp64=acc == torch.float64)
    if max_norm is not None:
        assert same_bits(res.coef, expected_coef(res.total, max_norm)), (res.coef, res.total)


def assert_equal_bits_or_nan(got: Tensor, want: Tensor, what: str) -> None:
    """Equal values with equal signs (so -0.0 is not 0.0), or NaN in both (any sign, any payload)."""
    g, w = got.reshape(-1).to(torch.float64), want.reshape(-1).to(torch.float64)
    same = ((g == w) & (torch.signbit(g) == torch.signbit(w))) | (g.isnan() & w.isnan())
    assert bool(same.all()), (
        f"{what}: {int((~same).sum())} of {got.numel()} differ; first got {g[~same][:3].tolist()}, "
        f"want {w[~same][:3].tolist()}"
    )


def check_rounded_once(got: Tensor, x: Tensor, coef: float) -> int:
    """bf16/fp16: the scaled value is the exact product x * float32(coef) rounded once to nearest even, except where
    the float32 product (torch's opmath, which the kernel follows) is itself exactly half-way between two values of
    the 16-bit type: there the second rounding may go the other way. Returns how many such elements there were."""
    exact = x.double() * torch.tensor(coef, dtype=torch.float32).double()  # exact: 8/11 bits times 24 bits
    once = round_to_dtype(exact, x.dtype)
    f32 = exact.float().double()
    twice = round_to_dtype(f32, x.dtype)
    g = got.double()
    finite = torch.isfinite(exact)
    tie_first = finite & (f32 != exact) & (round_to_dtype(f32, x.dtype) != once)
    ok = (g == once) | (tie_first & (g == twice)) | (~finite & ((g == exact) | (g.isnan() & exact.isnan())))
    assert bool(ok.all()), (
        f"{x.dtype}: {int((~ok).sum())} scaled values are not the float64 product rounded to nearest even; first "
        f"x={x.double()[~ok][:3].tolist()} got={g[~ok][:3].tolist()} want={once[~ok][:3].tolist()}"
    )
    return int(tie_first.sum())


# ---- the first launch of the process ---------------------------------------------------------------------------------


@pytest.mark.sim_perf
def test_first_launch_of_the_process(probe):
    tensors, first = probe
    check_norm(first, tensors, 2.0, torch.float32, 1.0)


# ---- launch_norm -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", NORM_TYPES, ids=[P_IDS[p] for p in NORM_TYPES])
@pytest.mark.parametrize("kind", ["mixed32", "mixed64", "float64"])
def test_norm(sim, kind, p):
    """Every norm type, the total alone (one partial per block) and with per-tensor norms (one per chunk), with the
    clip coefficient, over a mixed fp32/fp16/bf16 table (float32 accumulation), a table with every dtype (float64
    accumulation) and an fp64 one (the tight float64 bound)."""
    # |x|^p in float64 (exp2/log2 of doubles) is ~100 simulated instructions an element: fewer elements there
    sizes = SHORT_SIZES if kind != "mixed32" and p not in SIMPLE_P else SIZES
    tensors = make_list(KINDS[kind], seed=seed_of(kind, p), sizes=sizes)
    st = simlib.stage(sim, tensors, CHUNK, shifts=SHIFTS)
    try:
        assert st.plan.acc_dtype == (torch.float32 if kind == "mixed32" else torch.float64)
        for per_tensor in (False, True):
            res = simlib.run_norm(st, p, per_tensor=per_tensor, max_norm=0.75, sm_count=1)  # grid 4
            check_norm(res, tensors, p, st.plan.acc_dtype, 0.75)
    finally:
        st.free()


@pytest.mark.parametrize("kind", ["float32", "float16", "bfloat16"])
def test_norm_single_dtype_tables(sim, kind):
    tensors = make_list(KINDS[kind], seed=seed_of(kind))
    st = simlib.stage(sim, tensors, CHUNK, shifts=SHIFTS)
    try:
        for p in (2.0, 3.0):
            check_norm(simlib.run_norm(st, p, per_tensor=True, max_norm=0.5, sm_count=1), tensors, p, torch.float32,
                       0.5)
    finally:
        st.free()


SPECIAL_AT = {"head": 0, "body": 40, "second_chunk": CHUNK + 2, "last": CHUNK + 10}  # of CHUNK + 11 elements
SPECIAL_VALUES = [math.nan, math.inf, -math.inf]


def with_special(value: float, where: str, dtype, gen: torch.Generator) -> Tensor:
    """A tensor of two chunks holding `value` at one place: the scalar head (it is staged 3 elements past a 16-byte
    boundary), the vector body, the second chunk, the scalar tail of the last chunk."""
    t = random_tensor((CHUNK + 11,), dtype, gen=gen)
    t[SPECIAL_AT[where]] = value
    return t


@pytest.mark.parametrize("p", NORM_TYPES, ids=[P_IDS[p] for p in NORM_TYPES])
def test_norm_nonfinite_anywhere(sim, p):
    """NaN and +-inf propagate as in torch's definition, from any position: per tensor (one launch, a tensor per value
    and position, each norm on its own), and through the total alone (the per-block fold), one launch per value with
    it at one position (the positions taken in turn across norm types)."""
    dtype = [torch.float32, torch.bfloat16, torch.float16][NORM_TYPES.index(p) % 3]
    gen = torch.Generator().manual_seed(NORM_TYPES.index(p))
    tensors = [with_special(v, w, dtype, gen) for v in SPECIAL_VALUES for w in SPECIAL_AT]
    tensors.append(random_tensor((301,), dtype, gen=gen))
    st = simlib.stage(sim, tensors, CHUNK, shifts=[3] * len(tensors))
    try:
        check_norm(simlib.run_norm(st, p, per_tensor=True, max_norm=1.0, sm_count=2), tensors, p, torch.float32, 1.0)
    finally:
        st.free()
    for i, v in enumerate(SPECIAL_VALUES):
        where = list(SPECIAL_AT)[(NORM_TYPES.index(p) + i) % len(SPECIAL_AT)]
        one = [random_tensor((77,), dtype, gen=gen), with_special(v, where, dtype, gen)]
        st = simlib.stage(sim, one, CHUNK, shifts=[1, 3])
        try:
            check_norm(simlib.run_norm(st, p, max_norm=1.0, sm_count=1), one, p, torch.float32, 1.0)
        finally:
            st.free()


def test_grid_sizes_and_same_bits(sim):
    """From many chunks per block (sm_count 1: 4 blocks) to one block per chunk: correct every time, and with per-
    tensor norms (one partial per chunk) the same bits whatever the grid. Then one chunk alone (a grid of 1)."""
    tensors = make_list(KINDS["mixed64"], seed=5, sizes=[CHUNK * 9 + 3, 17, CHUNK * 4, 1, CHUNK + 1, 600])
    st = simlib.stage(sim, tensors, CHUNK, shifts=[1, 0, 2, 0, 3, 0])
    try:
        bits = []
        for sm_count in (1, 3, 40):
            for per_tensor in (False, True):
                res = simlib.run_norm(st, 2.0, per_tensor=per_tensor, max_norm=1.0, sm_count=sm_count)
                check_norm(res, tensors, 2.0, torch.float64, 1.0)
                if per_tensor:
                    bits.append((res.total, res.norms))
        assert sim.grid_size(st.plan.num_chunks, 40) == st.plan.num_chunks
        for total, norms in bits[1:]:
            assert same_bits(total, bits[0][0]) and same_bits(norms, bits[0][1])
    finally:
        st.free()
    one = [random_tensor((CHUNK - 5,), torch.bfloat16, gen=torch.Generator().manual_seed(6))]
    st = simlib.stage(sim, one, CHUNK, shifts=[5])
    try:
        assert sim.grid_size(st.plan.num_chunks, 80) == 1
        for p in (2.0, math.inf, 0.0):
            check_norm(simlib.run_norm(st, p, per_tensor=True, max_norm=2.0), one, p, torch.float32, 2.0)
    finally:
        st.free()


@pytest.mark.sim_perf
def test_many_tiles_and_a_tile_of_empty_tensors(sim):
    """Four tiles of kTileTensors (8,192 tensors, most of them empty so that few chunks are simulated): tile 1 holds
    only empty tensors, so no chunk completes it and the last block writes its norms."""
    tensors = sparse_tiles(4, simlib.TILE, CHUNK, seed=7, empty_tile=1)
    st = simlib.stage(sim, tensors, CHUNK, shifts=[i % 3 for i in range(len(tensors))])
    try:
        assert st.plan.num_tensors > 2 * 2048
        for p, per_tensor in ((2.0, True), (0.0, False), (-math.inf, True)):
            res = simlib.run_norm(st, p, per_tensor=per_tensor, max_norm=10.0, sm_count=2)
            check_norm(res, tensors, p, torch.float32, 10.0)
    finally:
        st.free()


def test_accumulation_dtype(sim):
    """float32 accumulation of float32 values loses what float64 keeps: the kernel accumulates in the dtype it is
    told (float64 when any tensor is float64), not in something wider or narrower."""
    big = torch.full((CHUNK,), 1.0, dtype=torch.float32)
    big[0] = 2.0**24
    for extra, acc in (([], torch.float32), ([torch.ones(1, dtype=torch.float64)], torch.float64)):
        tensors = [big] + extra
        st = simlib.stage(sim, tensors, CHUNK)
        try:
            res = simlib.run_norm(st, 1.0, sm_count=1)
            assert res.total.dtype == acc
            exact = 2.0**24 + CHUNK - 1 + len(extra)
            if acc == torch.float64:
                assert res.total.item() == exact
            else:
                assert res.total.item() != exact  # float32 cannot hold it: the sum rounded
                assert abs(res.total.item() - exact) <= CHUNK * 2  # ...by at most the ones it dropped
        finally:
            st.free()


@pytest.mark.sim_perf
def test_repeated_launches_reset_their_counters_and_give_the_same_bits(sim):
    """One workspace, launched again and again (as a CUDA-graph replay does), even left dirty: the launcher resets the
    ticket and tile counters every time, and equal inputs give equal bits."""
    tensors = make_list(KINDS["mixed64"], seed=11, sizes=[CHUNK * 5 + 1, 3, CHUNK, 77, 0, 999])
    st = simlib.stage(sim, tensors, CHUNK, shifts=[2, 0, 0, 1, 0, 3])
    ws = sim.alloc(sim.norm_workspace_bytes(st.plan.num_tensors, st.plan.num_chunks, st.acc_f64))
    try:
        for per_tensor in (False, True):
            runs = [simlib.run_norm(st, 2.0, per_tensor=per_tensor, max_norm=1.0, sm_count=2, workspace=ws,
                                    dirty_workspace=dirty) for dirty in (False, False, True)]
            check_norm(runs[0], tensors, 2.0, torch.float64, 1.0)
            for r in runs[1:]:
                assert same_bits(r.total, runs[0].total) and same_bits(r.coef, runs[0].coef)
                if per_tensor:
                    assert same_bits(r.norms, runs[0].norms)
    finally:
        sim.free(ws)
        st.free()


def test_agc_unit_tables(sim):
    """AGC's unit plans (plan._build_units): every row of a 2-D tensor is a "tensor", rows of odd length start at odd
    addresses. One launch gives every unit's norm; one scale launch gives each unit its own coefficient."""
    gen = torch.Generator().manual_seed(12)
    tensors = [random_tensor((37, 13), torch.float32, gen=gen), random_tensor((5, 301), torch.bfloat16, gen=gen),
               random_tensor((9, 7), torch.float16, gen=gen), random_tensor((3, CHUNK + 3), torch.float32, gen=gen)]
    rows = [t.shape[0] for t in tensors]
    st = simlib.stage(sim, tensors, CHUNK, unit_rows=rows)
    try:
        units = [r for t in tensors for r in t]
        assert st.plan.num_tensors == len(units)
        res = simlib.run_norm(st, 2.0, per_tensor=True, sm_count=4)
        check_norm(res, units, 2.0, torch.float32, None)
        coef = torch.rand(len(units), generator=gen) * 1.5
        coef[::4] = 1.0  # skipped units
        after = simlib.run_scale(st, coef, per_tensor=True, sm_count=4)
        k = 0
        for t, a in zip(tensors, after):
            for r in range(t.shape[0]):
                assert_equal_bits_or_nan(a[r], expected_scaled(t[r], coef[k].item(), torch.float32), f"unit {k}")
                k += 1
    finally:
        st.free()


# ---- launch_scale ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64], ids=["coef32", "coef64"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_scale_global(sim, kind, coef_dtype):
    tensors = make_list(KINDS[kind], seed=seed_of(kind))
    coef = 0.3713390171527863
    st = simlib.stage(sim, tensors, CHUNK, shifts=SHIFTS)
    try:
        after = simlib.run_scale(st, torch.tensor([coef], dtype=coef_dtype), sm_count=1)
        for i, (t, a) in enumerate(zip(tensors, after)):
            assert_equal_bits_or_nan(a, expected_scaled(t, coef, coef_dtype), f"tensor {i} ({t.dtype})")
            if t.dtype in (torch.bfloat16, torch.float16):
                check_rounded_once(a, t, coef)
    finally:
        st.free()


def test_scale_rounds_16bit_to_nearest_even(sim):
    """bf16 / fp16 products exactly half-way between two values of the type go to the even one (both ways), a hair
    above or below goes to the nearer, and random products are the float64 product rounded once (half an ulp)."""
    for dtype, bits in ((torch.bfloat16, 8), (torch.float16, 11)):
        ulp = 2.0 ** (1 - bits)  # of 1.0
        xs = torch.tensor([1 + k * ulp for k in range(64)], dtype=torch.float64).to(dtype)
        rand = random_tensor((3001,), dtype, gen=torch.Generator().manual_seed(bits))
        tensors = [xs, xs, xs, rand]
        hair = 2.0**-22
        # x * 1.5 is a tie for every odd x / ulp; 1 * (1 + ulp/2 +- hair) is just above / below the tie at 1 + ulp/2
        coefs = torch.tensor([1.5, 1 + ulp / 2 + hair, 1 + ulp / 2 - hair, 0.6180339887], dtype=torch.float32)
        st = simlib.stage(sim, tensors, CHUNK, shifts=[0, 1, 2, 3])
        try:
            after = simlib.run_scale(st, coefs, per_tensor=True, sm_count=1)
            for i, t in enumerate(tensors):
                assert_equal_bits_or_nan(after[i], expected_scaled(t, coefs[i].item(), torch.float32), f"{i}")
                check_rounded_once(after[i], t, coefs[i].item())
            exact = xs.double() * 1.5
            tie = round_to_dtype(exact * (1 + 2.0**-40), dtype) != round_to_dtype(exact * (1 - 2.0**-40), dtype)
            got = after[0].double()
            assert int(tie.sum()) >= 20 and 0 < int((got[tie] > exact[tie]).sum()) < int(tie.sum())  # up and down
            assert after[1][0].item() == 1 + ulp and after[2][0].item() == 1.0
        finally:
            st.free()


def nan_payload_list(seed: int) -> list[Tensor]:
    """Tensors of every dtype holding signalling NaNs with payloads and -0.0 among random values: a kernel that
    multiplies them by 1 still changes their bits (the NaN comes back quiet), so "untouched" can be checked."""
    gen = torch.Generator().manual_seed(seed)
    snan = {torch.float32: (torch.int32, 0x7F800001), torch.float64: (torch.int64, 0x7FF0000000000001),
            torch.float16: (torch.int16, 0x7C01), torch.bfloat16: (torch.int16, 0x7F81)}
    out = []
    for i, dtype in enumerate(FLOAT_DTYPES * 2):
        t = random_tensor((CHUNK + 37 * (i + 1),), dtype, gen=gen)
        idt, bits = snan[dtype]
        t.view(idt)[3::29] = bits
        t[5::31] = -0.0
        out.append(t)
    return out


@pytest.mark.parametrize("coef_dtype", [torch.float32, torch.float64], ids=["coef32", "coef64"])
def test_scale_by_one_touches_nothing(sim, coef_dtype):
    tensors = nan_payload_list(13)
    st = simlib.stage(sim, tensors, CHUNK, shifts=[0, 1, 2, 3, 1, 0, 3, 2])
    try:
        after = simlib.run_scale(st, torch.tensor([1.0], dtype=coef_dtype), sm_count=2)
        for i, (t, a) in enumerate(zip(tensors, after)):
            assert same_bits(a, t), f"tensor {i} ({t.dtype}) changed under coef == 1"
        # The probe can fail: scaling by 0.5 rewrites those NaNs (quieted), which a multiply by 1 would do too.
        st.reset()
        after = simlib.run_scale(st, torch.tensor([0.5], dtype=coef_dtype), sm_count=2)
        for t, a in zip(tensors, after):
            nan = t.isnan()
            assert bool(a[nan].isnan().all()) and not same_bits(a[nan], t[nan]), t.dtype
    finally:
        st.free()


def test_scale_per_tensor(sim):
    """One coefficient per tensor (float32 and float64): a coefficient of exactly 1 skips its tensor (not a byte
    changes, signalling NaNs included), the others scale theirs, NaN coefficients make NaNs."""
    tensors = nan_payload_list(14)
    for coef_dtype in (torch.float32, torch.float64):
        st = simlib.stage(sim, tensors, CHUNK, shifts=[3, 2, 1, 0, 0, 1, 2, 3])
        try:
            coef = torch.tensor([0.5, 1.0, 1.75, 0.001, 1.0, math.nan, 0.999, 1e-30], dtype=coef_dtype)
            after = simlib.run_scale(st, coef, per_tensor=True, sm_count=2)
            for i, (t, a) in enumerate(zip(tensors, after)):
                if coef[i] == 1:
                    assert same_bits(a, t), f"tensor {i} changed with its coefficient 1"
                else:
                    assert_equal_bits_or_nan(a, expected_scaled(t, coef[i].item(), coef_dtype), f"tensor {i}")
        finally:
            st.free()


# ---- launch_clamp ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_clamp(sim, kind):
    tensors = make_list(KINDS[kind], seed=seed_of(kind, "clamp"))
    for t in tensors[:4]:
        if t.numel() > 2:
            t[1] = math.nan
            t[-1] = -math.inf
    v = 0.7  # not representable: the bound is rounded as the kernel computes (in float, double for float64)
    st = simlib.stage(sim, tensors, CHUNK, shifts=SHIFTS)
    try:
        after = simlib.run_clamp(st, v, sm_count=1)
        for i, (t, a) in enumerate(zip(tensors, after)):
            want = expected_clamped(t, v)
            assert_equal_bits_or_nan(a, want, f"tensor {i} ({t.dtype})")
            assert bool((a.isnan() == t.isnan()).all())
            bound = expected_clamped(torch.tensor([v], dtype=t.dtype) * 2, v).double()  # v as the kernel bounds it
            over = t.double().abs() > bound
            assert bool((a.double()[over].abs() == bound).all()), f"tensor {i}: a clamped value is not the bound"
    finally:
        st.free()


def expected_clamped(t: Tensor, v: float) -> Tensor:
    """clamp(t, -v, v) as the kernel computes it: in float with v rounded to float (double for float64), rounded
    once back to t's dtype."""
    if t.dtype == torch.float64:
        return torch.clamp(t, -v, v)
    fv = float(np.float32(v))
    return torch.clamp(t.float(), -fv, fv).to(t.dtype)


# ---- property cases: random lists against float64 -------------------------------------------------------------------

PROPERTY_CASES = 200


def random_case(seed: int):
    """A random list (1-6 tensors, 0-600 elements, any dtypes and shifts, magnitudes 1e-6..1e6 per tensor, a NaN or
    inf now and then), a norm type, total or per tensor, a max_norm, and what to do after the norm."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 7))
    gen = torch.Generator().manual_seed(seed)
    tensors, shifts = [], []
    for _ in range(count):
        dtype = FLOAT_DTYPES[int(rng.integers(0, 4))]
        n = int(rng.choice([0, 1, int(rng.integers(2, 40)), int(rng.integers(40, 600))], p=[0.05, 0.1, 0.35, 0.5]))
        scale = float(10.0 ** rng.uniform(-6, 6))
        t = random_tensor((n,), dtype, gen=gen, scale=scale)
        if n and rng.random() < 0.08:
            t[int(rng.integers(0, n))] = float(rng.choice([math.nan, math.inf, -math.inf]))
        tensors.append(t)
        shifts.append(int(rng.integers(0, 8)))
    p = NORM_TYPES[int(rng.integers(0, len(NORM_TYPES)))]
    if p not in SIMPLE_P and any(t.dtype == torch.float64 for t in tensors):
        tensors = [t[:40] for t in tensors]  # |x|^p in float64 is costly to simulate
    per_tensor = bool(rng.random() < 0.5)
    max_norm = float(10.0 ** rng.uniform(-3, 4))
    after = ["scale", "per_tensor_scale", "clamp", "none"][int(rng.integers(0, 4))]
    sm_count = int(rng.choice([1, 2, 80]))
    return tensors, shifts, p, per_tensor, max_norm, after, sm_count


@pytest.mark.parametrize("seed", range(PROPERTY_CASES), ids=[f"case{i:03d}" for i in range(PROPERTY_CASES)])
def test_random_lists(sim, seed):
    tensors, shifts, p, per_tensor, max_norm, after, sm_count = random_case(1000 + seed)
    if all(t.numel() == 0 for t in tensors):
        tensors[0] = random_tensor((3,), tensors[0].dtype, gen=torch.Generator().manual_seed(seed))
    st = simlib.stage(sim, tensors, CHUNK, shifts=shifts)
    try:
        acc = st.plan.acc_dtype
        res = simlib.run_norm(st, p, per_tensor=per_tensor, max_norm=max_norm, sm_count=sm_count)
        check_norm(res, tensors, p, acc, max_norm)
        if after == "scale":
            out = simlib.run_scale(st, res.coef.reshape(1), sm_count=sm_count)
            for t, a in zip(tensors, out):
                assert_equal_bits_or_nan(a, expected_scaled(t, res.coef.item(), acc), f"scaled {t.dtype}")
        elif after == "per_tensor_scale":
            coef = torch.rand(len(tensors), generator=torch.Generator().manual_seed(seed), dtype=acc)
            coef[0] = 1.0
            out = simlib.run_scale(st, coef, per_tensor=True, sm_count=sm_count)
            for i, (t, a) in enumerate(zip(tensors, out)):
                assert_equal_bits_or_nan(a, expected_scaled(t, coef[i].item(), acc), f"tensor {i} ({t.dtype})")
        elif after == "clamp":
            v = float(res.coef.item()) * 3
            v = v if math.isfinite(v) and v > 0 else 1.0
            out = simlib.run_clamp(st, v, sm_count=sm_count)
            for t, a in zip(tensors, out):
                assert_equal_bits_or_nan(a, expected_clamped(t, v), f"clamped {t.dtype}")
    finally:
        st.free()

