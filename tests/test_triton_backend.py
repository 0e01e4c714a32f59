"""The Triton backend's kernels, run for real: on CPU under TRITON_INTERPRET=1 (set by conftest), on CUDA when
there is a GPU. Tiny chunks put chunk boundaries within reach of small tensors and keep the interpreter fast."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip import backends
from fusedclip.backends.plan import DTYPE_CODES, unit_rows
from reference import (
    FLOAT_DTYPES,
    NORM_TYPES,
    TOTAL_RTOL,
    assert_rel_close,
    assert_scaled,
    assert_total_close,
    params_with_grads,
    random_grads,
    random_tensor,
    ref_tensor_norm,
    ref_total_norm,
)
from sync_check import cold_plans, sync_errors

triton_backend = pytest.importorskip("fusedclip.backends.triton_backend")
if "triton" not in fusedclip.available_backends():
    pytest.skip(f"triton backend unavailable: {backends.unavailable_reasons().get('triton')}", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = 16
ODD_SIZES = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 7]


@pytest.fixture
def tb() -> triton_backend.TritonBackend:
    """A backend of its own with tiny chunks (a fresh plan cache per test)."""
    return triton_backend.TritonBackend(chunk_size=CHUNK, block=8)


def grads_of_sizes(sizes, dtypes, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return [random_tensor((n,), dtypes[i % len(dtypes)], device, gen, scale=1.0 + i) for i, n in enumerate(sizes)]


def acc_of(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class KernelCounter:
    """Counts launches of our kernels (the CPU stand-in for the profiler count on GPU)."""

    def __init__(self, monkeypatch):
        from fusedclip.triton_kernels import clamp, multi_tensor_norm, scale

        self.launches: list[str] = []
        for module, name in [
            (multi_tensor_norm, "_reduce_kernel"),
            (multi_tensor_norm, "_finalize_kernel"),
            (scale, "_scale_kernel"),
            (clamp, "_clamp_kernel"),
        ]:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name))

    def _wrap(self, kernel, name):
        counter = self

        class Wrapped:
            def __getitem__(self, grid):
                counter.launches.append(name)
                return kernel[grid]

        return Wrapped()


# ---- backend seam -----------------------------------------------------------------------------------------------


def test_registered_and_runs_here():
    b = backends.select("triton", torch.device(DEVICE))
    assert b.name == "triton"
    assert b.runs_on(torch.device(DEVICE))
    assert not b.runs_on(torch.device("meta"))


def test_accepts_only_flat_tensors(tb):
    assert tb.accepts(torch.ones(3, 4, device=DEVICE))
    for dtype in FLOAT_DTYPES:
        assert tb.accepts(torch.ones(5, dtype=dtype, device=DEVICE))
    assert not tb.accepts(torch.ones(3, 4, device=DEVICE).t())
    assert not tb.accepts(torch.ones(4, dtype=torch.complex64, device=DEVICE))
    assert not tb.accepts(torch.ones(4, dtype=torch.int32, device=DEVICE))
    assert not tb.accepts(torch.ones(4, device=DEVICE).to_sparse())


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="power of two"):
        triton_backend.TritonBackend(chunk_size=16, block=12)


# ---- norms --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES)
def test_norms_every_type_and_dtype(tb, dtype, p):
    grads = grads_of_sizes(ODD_SIZES, [dtype], seed=int(abs(p) * 10) % 97 if math.isfinite(p) else 5)
    total, norms = tb.norms(grads, p, per_tensor=True)
    acc = acc_of(grads)
    assert total.device.type == DEVICE and norms.shape == (len(grads),)
    assert_total_close(total, ref_total_norm(grads, p), acc)
    for i, g in enumerate(grads):
        assert_total_close(norms[i], ref_tensor_norm(g, p), acc, what=f"norm of tensor {i} (numel {g.numel()})")
    # norm_and_coef gives the same total
    total2, coef = tb.norm_and_coef(grads, p, 1.0)
    assert torch.equal(total, total2)
    assert coef.dtype == acc


def test_many_tensors_mixed_dtypes_one_reduce_launch(tb, monkeypatch):
    grads = random_grads(310, dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), device=DEVICE,
                         seed=3, max_numel=40)
    counter = KernelCounter(monkeypatch)
    total, norms = tb.norms(grads, 2.0, per_tensor=True)
    assert counter.launches == ["_reduce_kernel", "_finalize_kernel"]
    assert_total_close(total, ref_total_norm(grads, 2.0), torch.float64)
    ref_norms = torch.tensor([ref_tensor_norm(g, 2.0) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(norms.cpu(), ref_norms, rtol=1e-5, atol=0)


def test_clip_grad_norm_is_three_launches(monkeypatch):
    grads = random_grads(50, dtypes=(torch.float32, torch.bfloat16), device=DEVICE, seed=4)
    counter = KernelCounter(monkeypatch)
    fusedclip.clip_grad_norm_(params_with_grads(grads), 0.5, backend="triton")
    assert counter.launches == ["_reduce_kernel", "_finalize_kernel", "_scale_kernel"]


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, float("inf"), float("-inf"), 0.0])
def test_mixed_float32_float64_accumulates_in_float64(tb, p):
    grads = grads_of_sizes([5, 33, 2, 17], [torch.float32, torch.float64, torch.bfloat16], seed=9)
    total, _ = tb.norms(grads, p, per_tensor=False)
    assert_total_close(total, ref_total_norm(grads, p), torch.float64)


def test_large_values_do_not_overflow_fp16_total(tb):
    grads = grads_of_sizes([100, 50], [torch.float16], seed=2)
    grads = [g * 3000 for g in grads]  # torch's fp16 total would overflow to inf
    total, _ = tb.norms(grads, 2.0, per_tensor=False)
    assert math.isfinite(total.item())
    assert_total_close(total, ref_total_norm(grads, 2.0), torch.float32)


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("poison", ["nan", "inf", "-inf"])
def test_non_finite_propagates_like_torch(tb, p, poison):
    grads = grads_of_sizes([20, 1, 37, 9], [torch.float32], seed=11)
    grads[2][CHUNK + 3] = float(poison)  # second chunk of a tensor, not its first element
    total, norms = tb.norms(grads, p, per_tensor=True)
    ref = ref_total_norm(grads, p)
    assert_total_close(total, ref, torch.float32)
    assert_total_close(norms[2], ref_tensor_norm(grads[2], p), torch.float32)
    stock = torch.nn.utils.get_total_norm([g.clone() for g in grads], p)
    if math.isnan(ref):
        assert math.isnan(stock.item())
    else:
        assert stock.item() == pytest.approx(total.item(), rel=1e-5)


def test_nan_gradient_gives_nan_everywhere_when_clipping():
    grads = random_grads(6, device=DEVICE, seed=12)
    grads[4][0] = float("nan")
    ours, theirs = params_with_grads([g.clone() for g in grads]), params_with_grads([g.clone() for g in grads])
    t1 = fusedclip.clip_grad_norm_(ours, 1.0, backend="triton")
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert math.isnan(t1.item()) and math.isnan(t2.item())
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad.isnan(), b.grad.isnan())


def test_deterministic_bitwise(tb):
    grads = random_grads(40, dtypes=(torch.float32, torch.bfloat16), device=DEVICE, seed=13, max_numel=120)
    for p in (2.0, 3.0, float("inf")):
        first, norms = tb.norms(grads, p, per_tensor=True)
        for _ in range(3):
            again, norms2 = tb.norms(grads, p, per_tensor=True)
            assert torch.equal(first, again) and torch.equal(norms, norms2)


# ---- clipping through the public API ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_clip_grad_norm_matches_reference(dtype):
    grads = random_grads(25, dtypes=(dtype,), device=DEVICE, seed=14, max_numel=700)  # several default chunks
    original = [g.clone() for g in grads]
    max_norm = 0.1
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), max_norm, backend="triton")
    ref = ref_total_norm(original, 2.0)
    acc = acc_of(original)
    assert_total_close(total, ref, acc)
    coef = backends.clip_coef(total, max_norm).item()  # torch's formula, in the total's dtype
    for g, o in zip(grads, original):
        assert_scaled(g, o, coef)


def test_clip_matches_stock_torch_float32():
    grads = random_grads(30, device=DEVICE, seed=15)
    ours, theirs = params_with_grads([g.clone() for g in grads]), params_with_grads([g.clone() for g in grads])
    t1 = fusedclip.clip_grad_norm_(ours, 0.7, norm_type=3.0, backend="triton")
    t2 = torch.nn.utils.clip_grad_norm_(theirs, 0.7, norm_type=3.0)
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-6, atol=0)


def test_float64_coefficient_keeps_float64_max_norm(tb):
    grads = grads_of_sizes([40, 3], [torch.float64], seed=16)
    total, coef = tb.norm_and_coef(grads, 2.0, 0.1)
    expected = torch.clamp(0.1 / (total + 1e-6), max=1.0)  # torch's own formula, in float64
    assert coef.dtype == torch.float64 and coef.item() == pytest.approx(expected.item(), rel=1e-15)


def test_coef_one_touches_no_gradient_memory(tb, monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if DEVICE != "cpu":
        pytest.skip("counts interpreter stores")
    grads = grads_of_sizes([30, 5, 17], [torch.float32, torch.bfloat16, torch.float64], seed=17)
    bits = [g.clone() for g in grads]
    stores = []
    real = interpreter.interpreter_builder.create_masked_store
    monkeypatch.setattr(interpreter.interpreter_builder, "create_masked_store",
                        lambda *a, **k: (stores.append(1), real(*a, **k))[1])
    total, coef = tb.norm_and_coef(grads, 2.0, 1e9)
    assert coef.item() == 1.0
    stores.clear()
    tb.scale_(grads, coef)
    assert stores == []
    for g, b in zip(grads, bits):
        assert torch.equal(g.view(torch.uint8), b.view(torch.uint8))
    tb.scale_(grads, torch.tensor(0.5, device=DEVICE))  # the counter does see a real pass
    assert len(stores) >= len(grads)
    for g, b in zip(grads, bits):
        assert_scaled(g, b, 0.5)


def test_noncontiguous_and_zero_size_fold_into_one_total():
    gen = torch.Generator().manual_seed(18)
    grads = [
        random_tensor((9, 5), torch.float32, DEVICE, gen).t(),  # not contiguous: torch backend
        random_tensor((0,), torch.float32, DEVICE, gen),
        random_tensor((600,), torch.bfloat16, DEVICE, gen),
        random_tensor((3,), torch.float64, DEVICE, gen),
    ]
    original = [g.clone() for g in grads]
    for p in (2.0, float("inf"), 0.0):
        total, norms = fusedclip.multi_tensor_norm(grads, p, per_tensor=True, backend="triton")
        # The fallback group accumulates its fp32 tensor in fp32 (dispatch's per-group rule): fp32 tolerance.
        assert total.dtype == torch.float64
        assert total.item() == pytest.approx(ref_total_norm(original, p), rel=1e-5)
        assert norms[1].item() == 0.0
        assert norms[0].item() == pytest.approx(ref_tensor_norm(original[0], p), rel=1e-5)
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), 0.5, backend="triton")
    coef = backends.clip_coef(total, 0.5).item()
    for g, o in zip(grads, original):
        if g.numel():
            assert_scaled(g, o, coef)


def test_clip_grad_norm_per_tensor(tb):
    grads = random_grads(12, dtypes=(torch.float32, torch.float16), device=DEVICE, seed=19, max_numel=60)
    original = [g.clone() for g in grads]
    norms = fusedclip.clip_grad_norm_per_tensor_(params_with_grads(grads), 2.0, backend="triton")
    for g, o, n in zip(grads, original, norms):
        ref = ref_tensor_norm(o, 2.0)
        assert n.item() == pytest.approx(ref, rel=1e-5)
        assert_scaled(g, o, backends.clip_coef(n, 2.0).item())
    assert any(ref_tensor_norm(o, 2.0) < 2.0 for o in original)  # some untouched, some clipped
    assert any(ref_tensor_norm(o, 2.0) > 2.0 for o in original)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_clamp_matches_torch(dtype):
    grads = grads_of_sizes([31, 1, 17], [dtype], seed=20)
    grads[0][5] = float("nan")
    expected = [g.clamp(-0.3, 0.3) for g in grads]
    fusedclip.clip_grad_value_(params_with_grads(grads), 0.3, backend="triton")
    for g, e in zip(grads, expected):
        assert torch.equal(g.isnan(), e.isnan())
        assert torch.equal(torch.nan_to_num(g), torch.nan_to_num(e))


# ---- wide body, masked head and tail: aligned tensors and misaligned views --------------------------------------
# Each chunk is read as a head up to the first 16-byte boundary, whole unmasked steps from there, and a tail
# (triton_kernels/addressing.py). Views at odd element offsets move the head; sizes around the block and chunk
# lengths move the tail. Guard values around every view must come through a scale or clamp untouched.

CONFIGS = {  # (chunk_size, block): the tiny test chunks, and what a GPU runs (the same kernel variants as there)
    "tiny": (CHUNK, 8),
    "gpu_sized": (triton_backend.GPU_CHUNK, triton_backend.GPU_BLOCK),
}
GUARD = 5


def placed(n, dtype, offset, gen, scale=1.0):
    """A tensor of n random values `offset` elements into a buffer (whose start is 64-byte aligned) with GUARD spare
    values after it: (view, buffer)."""
    buf = random_tensor((offset + n + GUARD,), dtype, DEVICE, gen, scale)
    return buf[offset:offset + n], buf


def edge_case_grads(config: str, seed: int, dtypes=FLOAT_DTYPES):
    """Per dtype, sizes 1, 7, block - 1, block, block + 1, twice the block (the 16-bit body step) + 1, chunk + 1,
    each aligned and as views 1 and 3 elements in (never a multiple of 16 bytes, whatever the dtype), so that
    heads, bodies and tails of many lengths show up."""
    chunk, block = CONFIGS[config]
    sizes = [1, 7, block - 1, block, block + 1, 2 * block + 1, chunk + 1]
    gen = torch.Generator().manual_seed(seed)
    views, buffers = [], []
    for i, dtype in enumerate(dtypes):
        for j, n in enumerate(sizes):
            for offset in (0, 1, 3):
                v, b = placed(n, dtype, offset, gen, scale=0.5 + (i + j) % 4)
                assert (v.data_ptr() % 16 == 0) == (offset == 0)
                views.append(v)
                buffers.append(b)
    return views, buffers


def backend_for(config: str) -> triton_backend.TritonBackend:
    chunk, block = CONFIGS[config]
    return triton_backend.TritonBackend(chunk_size=chunk, block=block)


def assert_guards_untouched(views, buffers, before):
    for v, b, o in zip(views, buffers, before):
        start = (v.data_ptr() - b.data_ptr()) // b.element_size()
        keep = torch.ones(b.numel(), dtype=torch.bool, device=b.device)
        keep[start:start + v.numel()] = False
        assert torch.equal(b[keep], o[keep]), "a value outside a view changed"


@pytest.mark.parametrize(
    "config, p",
    [("tiny", p) for p in NORM_TYPES] + [("gpu_sized", p) for p in (2.0, 3.0, float("inf"), float("-inf"))],
)
def test_norms_of_misaligned_views_and_edge_sizes(config, p):
    views, _ = edge_case_grads(config, seed=80)
    views[5][2] = 0.0  # a zero in a misaligned view: it counts for p = 0 and -inf
    total, norms = backend_for(config).norms(views, p, per_tensor=True)
    assert_total_close(total, ref_total_norm(views, p), torch.float64)
    for i, v in enumerate(views):
        assert_total_close(norms[i], ref_tensor_norm(v, p), torch.float64,
                           what=f"norm of view {i} ({v.dtype}, numel {v.numel()}, address % 16 = {v.data_ptr() % 16})",
                           all_fp64=v.dtype == torch.float64)


@pytest.mark.parametrize("config", CONFIGS)
def test_scale_of_misaligned_views_and_edge_sizes(config):
    views, buffers = edge_case_grads(config, seed=81)
    b = backend_for(config)
    before, original = [x.clone() for x in buffers], [v.clone() for v in views]
    b.scale_(views, torch.tensor(0.37, dtype=torch.float64, device=DEVICE))
    for i, (v, o) in enumerate(zip(views, original)):
        assert_scaled(v, o, 0.37, f"view {i} ({v.dtype}, numel {v.numel()}, address % 16 = {v.data_ptr() % 16})")
    assert_guards_untouched(views, buffers, before)
    # per-tensor coefficients, some exactly 1 (those tensors are not touched)
    coefs = torch.rand(len(views), generator=torch.Generator().manual_seed(82), dtype=torch.float64) + 0.25
    coefs[::3] = 1.0
    before, original = [x.clone() for x in buffers], [v.clone() for v in views]
    b.scale_per_tensor_(views, coefs.float().to(DEVICE))
    for i, (v, o, c) in enumerate(zip(views, original, coefs.float().tolist())):
        assert_scaled(v, o, c, f"view {i} ({v.dtype}, numel {v.numel()})")
        if c == 1.0:
            assert torch.equal(v, o)
    assert_guards_untouched(views, buffers, before)


@pytest.mark.parametrize("config", CONFIGS)
def test_clamp_of_misaligned_views_and_edge_sizes(config):
    views, buffers = edge_case_grads(config, seed=83)
    for v in views[::4]:
        v[v.numel() // 2] = float("nan")  # NaN stays NaN, in the head, body or tail
    before = [x.clone() for x in buffers]
    expected = [v.clamp(-0.3, 0.3) for v in views]
    backend_for(config).clamp_(views, 0.3)
    for i, (v, e) in enumerate(zip(views, expected)):
        assert torch.equal(v.isnan(), e.isnan()), f"view {i}"
        assert torch.equal(torch.nan_to_num(v), torch.nan_to_num(e)), f"view {i} ({v.dtype}, numel {v.numel()})"
    assert_guards_untouched(views, buffers, before)


def expected_wide_steps(v: torch.Tensor, chunk: int, step: int) -> int:
    """Unmasked steps the kernels take over `v`: per chunk, whole steps after the head up to a 16-byte boundary."""
    total = 0
    for start in range(0, v.numel(), chunk):
        n = min(chunk, v.numel() - start)
        head = min((-(v.data_ptr() + start * v.element_size()) % 16) // v.element_size(), n)
        total += (n - head) // step
    return total


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_misaligned_views_take_the_wide_body_after_their_head(dtype, monkeypatch):
    """The kernels' unmasked (wide on a GPU) steps, counted under the interpreter: exactly as many as whole steps
    fit between each chunk's first 16-byte boundary and its end, for aligned tensors and views one element in."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if DEVICE != "cpu":
        pytest.skip("counts interpreter loads")
    chunk, block = CONFIGS["tiny"]
    step = block * 4 // dtype.itemsize  # the scale kernel's body step: 4 * BLOCK bytes
    gen = torch.Generator().manual_seed(84)
    views = [placed(n, dtype, offset, gen)[0] for n in (3 * chunk + 5, 2 * chunk) for offset in (0, 1)]
    assert sum(expected_wide_steps(v, chunk, block) for v in views) > 0
    loads, stores = [], []
    builder = interpreter.interpreter_builder
    real_load, real_store = builder.create_load, builder.create_store
    monkeypatch.setattr(builder, "create_load", lambda ptr, *a: (loads.append(ptr.data.size), real_load(ptr, *a))[1])
    monkeypatch.setattr(builder, "create_store", lambda ptr, *a: (stores.append(ptr.data.size), real_store(ptr, *a))[1])
    b = backend_for("tiny")
    total, _ = b.norms(views, 2.0, per_tensor=False)
    assert loads.count(block) == sum(expected_wide_steps(v, chunk, block) for v in views)
    assert_total_close(total, ref_total_norm(views, 2.0), acc_of(views))
    loads.clear()
    original = [v.clone() for v in views]
    b.scale_(views, torch.tensor(0.5, device=DEVICE))
    want = sum(expected_wide_steps(v, chunk, step) for v in views)
    assert loads.count(step) == want and stores.count(step) == want
    for v, o in zip(views, original):
        assert_scaled(v, o, 0.5)


def test_one_element_chunks():
    """chunk_size 1 (one program per element): the block is raised to 2, the least the scale and clamp kernels
    take (their float64 step is block // 2 elements)."""
    b = triton_backend.TritonBackend(chunk_size=1, block=1)
    assert b.block == 2
    gen = torch.Generator().manual_seed(86)
    views = [placed(n, dtype, offset, gen)[0] for dtype in FLOAT_DTYPES for n in (1, 3) for offset in (0, 1)]
    total, norms = b.norms(views, 2.0, per_tensor=True)
    assert_total_close(total, ref_total_norm(views, 2.0), torch.float64)
    original = [v.clone() for v in views]
    b.scale_(views, torch.tensor(0.5, device=DEVICE))
    for v, o in zip(views, original):
        assert_scaled(v, o, 0.5)
    expected = [v.clamp(-0.2, 0.2) for v in views]
    b.clamp_(views, 0.2)
    assert all(torch.equal(v, e) for v, e in zip(views, expected))


def test_many_tensors_mixed_dtypes_and_alignment_gpu_configuration():
    """320 tensors, all four dtypes, every third one a misaligned view (1 to 5 elements in): norms, clip and clamp
    with the GPU configuration's chunk and block."""
    gen = torch.Generator().manual_seed(85)
    views = []
    for i in range(320):
        dtype = FLOAT_DTYPES[i % 4]
        n = int(torch.randint(1, 60, (1,), generator=gen))
        views.append(placed(n, dtype, 1 + i % 5 if i % 3 == 0 else 0, gen, scale=0.1 + i % 7)[0])
    b = backend_for("gpu_sized")
    for p in (2.0, float("inf")):
        total, norms = b.norms(views, p, per_tensor=True)
        assert_total_close(total, ref_total_norm(views, p), torch.float64)
        ref = torch.tensor([ref_tensor_norm(v, p) for v in views], dtype=torch.float64)
        torch.testing.assert_close(norms.cpu(), ref, rtol=1e-5, atol=0)
    original = [v.clone() for v in views]
    total, coef = b.norm_and_coef(views, 2.0, 1.0)
    b.scale_(views, coef)
    for v, o in zip(views, original):
        assert_scaled(v, o, backends.clip_coef(total, 1.0).item())
    expected = [v.clamp(-0.05, 0.05) for v in views]
    b.clamp_(views, 0.05)
    for v, e in zip(views, expected):
        assert torch.equal(v, e)


# ---- p-norms: |x|^p and the root in float64 -----------------------------------------------------------------------


def tiny_values(sizes, dtype, exponent, seed):
    """Tensors of `sizes` elements whose magnitudes lie in [1, 2) * 2^exponent, of random signs (none is zero)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        magnitude = (1 + torch.rand(n, generator=gen, dtype=torch.float64)) * 2.0**exponent
        sign = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        t = (magnitude * sign).to(dtype)
        assert bool((t != 0).all())
        out.append(t.to(DEVICE))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p, exponent", [(3.0, -44), (0.5, -130)])
def test_p_norm_terms_below_the_float32_normal_range_count(tb, dtype, p, exponent):
    """Terms |x|^p under 2^-126 (p = 3 of values near 2^-44) and subnormal gradients themselves (p = 0.5 of values
    near 2^-130) count, in every tensor's norm and in the total (some of which are under 2^-126 too). On a GPU,
    Triton's float32 exp2 / log2 flush them to zero (ex2.approx.ftz; libdevice's log2f with ftz); the kernels take
    |x|^p and the root in float64. Magnitudes in [1, 2) * 2^exponent keep each float32 term within 2^-18 of |x|^p.
    The interpreter computes with numpy, which flushes nothing: on the CPU this pins the values the GPU must give,
    and tests/test_triton_compile.py checks the GPU code for approximate exp2 / log2."""
    grads = tiny_values(ODD_SIZES, dtype, exponent, seed=-exponent)
    total, norms = tb.norms(grads, p, per_tensor=True)
    assert_total_close(total, ref_total_norm(grads, p), torch.float32)
    for i, g in enumerate(grads):
        assert_total_close(norms[i], ref_tensor_norm(g, p), torch.float32, what=f"norm of tensor {i} ({g.numel()})")
    total2, coef = tb.norm_and_coef(grads, p, 1.0)
    assert torch.equal(total, total2) and coef.item() == 1.0


# ---- the finalize: many chunks, many tensors ----------------------------------------------------------------------
# The total: slabs of `block` partials, one per finalize program, then the slabs' values in the last program, `block`
# at a time. Per-tensor values (and p = 0's count): tiles of tensors whose partials are read in steps of at most 256.
# With the tiny configuration (chunk 16, block 8) a few hundred chunks make many slabs, tiles and steps.


def many_chunk_case(seed, dtypes=(torch.float32, torch.bfloat16)):
    """A tensor of 100 chunks (tiny configuration), two of 41 and 17 chunks, and 70 of 1 to 8 elements: 228 chunks,
    29 slabs (the last program takes 4 steps over them), 10 tiles of 8 tensors (2 steps, for p = 0), and steps that
    cover several tensors or part of one."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [100 * CHUNK - 3, 41 * CHUNK, 17 * CHUNK - 1]
    sizes += [int(n) for n in torch.randint(1, 9, (70,), generator=gen)]
    sizes.insert(30, sizes.pop(1))  # the 41-chunk tensor among the small ones
    return [random_tensor((n,), dtypes[i % len(dtypes)], DEVICE, gen, scale=0.5 + i % 5) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("p", NORM_TYPES)
def test_finalize_many_chunks_and_many_tensors(tb, p):
    grads = many_chunk_case(seed=90)
    total, norms = tb.norms(grads, p, per_tensor=True)
    assert_total_close(total, ref_total_norm(grads, p), torch.float32)
    ref = torch.tensor([ref_tensor_norm(g, p) for g in grads], dtype=torch.float64)
    assert_rel_close(norms, ref, TOTAL_RTOL[torch.float32], "per-tensor norms")
    total2, coef = tb.norm_and_coef(grads, p, 1.0)  # no tiles (but for p = 0): the same total, bit for bit
    assert torch.equal(total, total2)
    prepared = tb.prepare_norm(tb.cache.get(grads), p)  # a kept plan's: the slabs' values over their first partials
    assert torch.equal(prepared(), total) and torch.equal(prepared(), total)


def test_finalize_many_chunks_float64_accumulation(tb):
    grads = many_chunk_case(seed=92, dtypes=(torch.float64, torch.float32, torch.bfloat16))
    for p in (2.0, 3.0, float("-inf")):
        total, norms = tb.norms(grads, p, per_tensor=True)
        assert_total_close(total, ref_total_norm(grads, p), torch.float64, all_fp64=False)
        ref = torch.tensor([ref_tensor_norm(g, p) for g in grads], dtype=torch.float64)
        assert_rel_close(norms, ref, TOTAL_RTOL[torch.float32], "per-tensor norms")


class FinalizeLoads:
    """The masked loads of each program of the finalize launches (interpreter only), by program id."""

    def __init__(self, monkeypatch):
        from fusedclip.triton_kernels import multi_tensor_norm

        interpreter = pytest.importorskip("triton.runtime.interpreter")
        builder = interpreter.interpreter_builder
        self.per_program: dict[int, int] = {}
        kernel, inside, counts = multi_tensor_norm._finalize_kernel, [], self.per_program

        class Flagged:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    inside.append(1)
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        inside.pop()

                return run

        real = builder.create_masked_load

        def counted(*args):
            if inside:
                counts[builder.grid_idx[0]] = counts.get(builder.grid_idx[0], 0) + 1
            return real(*args)

        monkeypatch.setattr(multi_tensor_norm, "_finalize_kernel", Flagged())
        monkeypatch.setattr(builder, "create_masked_load", counted)


def test_finalize_spreads_a_long_tensor_over_programs(tb, monkeypatch):
    """The total of one tensor of 100 chunks: 13 finalize programs, each loading its slab of 8 partials once, and
    the last, 2 more steps over the 13 slab values (one program, 100 / 16 steps, before). Its per-tensor norm: one
    tile, 100 / 8 steps of 8 partials (at most 256 a step with a GPU's block)."""
    if DEVICE != "cpu":
        pytest.skip("counts interpreter loads")
    g = random_tensor((100 * CHUNK - 3,), torch.float32, DEVICE, torch.Generator().manual_seed(93))
    loads = FinalizeLoads(monkeypatch)
    total, _ = tb.norms([g], 2.0, per_tensor=False)
    assert loads.per_program == {**dict.fromkeys(range(12), 1), 12: 1 + 2}
    assert_total_close(total, ref_total_norm([g], 2.0), torch.float32)
    loads.per_program.clear()
    total2, norms = tb.norms([g], 2.0, per_tensor=True)
    tile = 3 + 13  # its tensors' chunk ranges (3 loads of tensor_chunks), then 13 steps
    assert loads.per_program == {0: 1 + tile, **dict.fromkeys(range(1, 12), 1), 12: 1 + 2}
    assert torch.equal(total, total2) and norms[0].item() == pytest.approx(ref_tensor_norm(g, 2.0), rel=1e-5)


@pytest.mark.parametrize("p", [2.0, float("inf"), 0.0])
def test_finalize_bits_do_not_depend_on_program_order(tb, monkeypatch, p):
    """The same bits whichever program runs first or takes the last ticket: here every launch runs its programs in
    reverse order (program 0 is the last), against the interpreter's own order."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    if DEVICE != "cpu":
        pytest.skip("reorders interpreter programs")
    grads = many_chunk_case(seed=91, dtypes=(torch.float32, torch.float16))
    total, norms = tb.norms(grads, p, per_tensor=True)
    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: real(builder.grid_dim[0] - 1 - x, y, z))
    again, norms_again = tb.norms(grads, p, per_tensor=True)
    assert torch.equal(total, again) and torch.equal(norms, norms_again)
    assert_total_close(total, ref_total_norm(grads, p), torch.float32)


# ---- plan cache ---------------------------------------------------------------------------------------------------


def test_plan_cache_hit_and_rebuild_on_replaced_grad(tb):
    grads = random_grads(8, device=DEVICE, seed=21)
    params = params_with_grads(grads)
    tb.norms([p.grad for p in params], 2.0, False)
    tb.norms([p.grad for p in params], 2.0, False)
    assert tb.cache.builds == 1
    params[3].grad = params[3].grad * 10  # a new tensor: must never be read through the old address
    total, _ = tb.norms([p.grad for p in params], 2.0, False)
    assert tb.cache.builds == 2
    assert_total_close(total, ref_total_norm([p.grad for p in params], 2.0), torch.float32)


def test_plan_cache_is_bounded():
    tb = triton_backend.TritonBackend(chunk_size=CHUNK, block=8, cache_size=4)
    keep = []
    for i in range(12):
        grads = random_grads(2, device=DEVICE, seed=100 + i, max_numel=10)
        keep.append(grads)  # distinct live lists: all distinct keys
        tb.norms(grads, 2.0, False)
        assert len(tb.cache) <= 4
    assert tb.cache.builds == 12


def test_tensor_listed_twice_is_not_scaled_by_racing_programs(tb, monkeypatch):
    grads = random_grads(3, device=DEVICE, seed=40)
    assert tb.cache.get(grads + [grads[1]]).aliased and not tb.cache.get(grads).aliased
    import fusedclip.triton_kernels.scale as scale_kernels

    def racing_kernel(*args, **kwargs):
        raise AssertionError("the scale kernel must not run on a list that holds a tensor twice")

    monkeypatch.setattr(scale_kernels, "scale_", racing_kernel)
    before = grads[1].clone()
    tb.scale_(grads + [grads[1]], torch.tensor(0.5, device=DEVICE))
    torch.testing.assert_close(grads[1], before * 0.25, rtol=0, atol=0)


# ---- AGC: unit plans, unit_norms / scale_units_ -------------------------------------------------------------------

def test_unit_rows_layouts():
    x = torch.ones(4, 3, 5, device=DEVICE)
    assert unit_rows(x, (1, 2)) == 4  # timm: rows
    assert unit_rows(x, (2,)) == 12  # any trailing block of dims is contiguous too
    assert unit_rows(x, None) == 1 and unit_rows(torch.ones((), device=DEVICE), None) == 1
    assert unit_rows(x, (0, 1, 2)) == 1
    assert unit_rows(torch.ones(9, 1, device=DEVICE), (1,)) == 9
    assert unit_rows(torch.ones(1, 9, device=DEVICE), (0,)) == 9  # size-1 dims do not break a run
    assert unit_rows(torch.ones(2, 5, 3, 1, device=DEVICE), (0, 1, 2)) == 1
    assert unit_rows(x, (0,)) is None  # optax: units strided through memory
    assert unit_rows(x, (0, 1)) is None
    assert unit_rows(torch.ones(5, 4, device=DEVICE).t(), (1,)) is None  # not contiguous
    assert unit_rows(torch.ones(5, 4, dtype=torch.int32, device=DEVICE), (1,)) is None


def test_unit_plan_tables(tb):
    gen = torch.Generator().manual_seed(50)
    shapes_dtypes = [((3, 40), torch.float32), ((5,), torch.float16), ((2, 3, 7), torch.float64),
                     ((), torch.bfloat16), ((9, 1), torch.bfloat16), ((1, 33), torch.float32)]
    tensors = [random_tensor(s, d, DEVICE, gen) for s, d in shapes_dtypes]
    dims = [None if t.dim() <= 1 else tuple(range(1, t.dim())) for t in tensors]
    rows = [unit_rows(t, d) for t, d in zip(tensors, dims)]
    assert rows == [3, 1, 2, 1, 9, 1]
    plan = tb.cache.get_units(tensors, rows)
    want_addr, want_numel, want_code = [], [], []
    for t, r in zip(tensors, rows):
        for k in range(r):
            want_addr.append(t.data_ptr() + k * (t.numel() // r) * t.element_size())
            want_numel.append(t.numel() // r)
            want_code.append(DTYPE_CODES[t.dtype])
    meta = plan.meta.cpu()
    assert plan.num_tensors == sum(rows) == meta.shape[1]
    assert meta[0].tolist() == want_addr and meta[1].tolist() == want_numel and meta[2].tolist() == want_code
    # chunks: each unit's own, in order, CHUNK elements each
    tc, cs, ct = plan.tensor_chunks.cpu().tolist(), plan.chunk_start.cpu().tolist(), plan.chunk_tensor.cpu().tolist()
    for u, n in enumerate(want_numel):
        mine = list(range(tc[u], tc[u + 1]))
        assert len(mine) == math.ceil(n / CHUNK) and all(ct[c] == u for c in mine)
        assert [cs[c] for c in mine] == [CHUNK * j for j in range(len(mine))]
    assert plan.num_chunks == len(ct) == tc[-1]
    assert plan.acc_dtype == torch.float64 and not plan.aliased
    # cached; a listed-twice tensor marks the plan aliased; the keys of plain plans are distinct
    assert tb.cache.get_units(tensors, rows) is plan and tb.cache.builds == 1
    assert tb.cache.get_units(tensors + tensors[:1], rows + rows[:1]).aliased
    assert tb.cache.get(tensors) is not plan


def ref_units(t: torch.Tensor, d, p: float) -> torch.Tensor:
    x = t.detach().to("cpu", torch.float64)
    return torch.linalg.vector_norm(x, p).reshape(1) if d is None else torch.linalg.vector_norm(x, p, dim=d).reshape(-1)


def unit_case(seed: int, count: int = 24):
    """Odd shapes (0-D, 1-D, rows across chunk boundaries, size-1 dims), mixed dtypes, timm's dims; plus tensors the
    kernels cannot take: a transposed (non-contiguous) one and optax-style strided units."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(), (1,), (CHUNK + 1,), (3, 2 * CHUNK + 3), (9, 1), (1, 9), (4, 3, 5), (2, CHUNK - 1), (5, 2, 1, 3)]
    dtypes = FLOAT_DTYPES
    tensors, dims = [], []
    for i in range(count):
        t = random_tensor(shapes[i % len(shapes)], dtypes[i % len(dtypes)], DEVICE, gen, scale=1.0 + i % 5)
        tensors.append(t)
        dims.append(None if t.dim() <= 1 else tuple(range(1, t.dim())))
    tensors.insert(3, random_tensor((6, 4), torch.float32, DEVICE, gen).t())  # not contiguous
    dims.insert(3, (1,))
    tensors.insert(7, random_tensor((5, 6), torch.bfloat16, DEVICE, gen))  # optax: reduce dim 0
    dims.insert(7, (0,))
    return tensors, dims


@pytest.mark.parametrize("p", [2.0, 1.0, float("inf"), 3.0])
def test_unit_norms_match_reference(tb, monkeypatch, p):
    tensors, dims = unit_case(seed=int(p) if math.isfinite(p) else 7)
    counter = KernelCounter(monkeypatch)
    norms = tb.unit_norms(tensors, dims, p)
    assert counter.launches == ["_reduce_kernel", "_finalize_kernel"]  # the two strays go to torch
    acc = acc_of(tensors)
    assert norms.dtype == acc and norms.device.type == DEVICE
    ref = torch.cat([ref_units(t, d, p) for t, d in zip(tensors, dims)])
    assert norms.shape == ref.shape
    torch.testing.assert_close(norms.cpu().double(), ref, rtol=1e-5, atol=0)
    # only the kernel tensors: the kernel result as is
    keep = [i for i, (t, d) in enumerate(zip(tensors, dims)) if unit_rows(t, d) is not None]
    alone = tb.unit_norms([tensors[i] for i in keep], [dims[i] for i in keep], p)
    torch.testing.assert_close(alone.cpu().double(), torch.cat([ref_units(tensors[i], dims[i], p) for i in keep]),
                               rtol=1e-5, atol=0)


def test_scale_units_matches_reference(tb, monkeypatch):
    tensors, dims = unit_case(seed=60)
    counts = [backends.unit_count(t, d) for t, d in zip(tensors, dims)]
    gen = torch.Generator().manual_seed(61)
    coefs = torch.rand(sum(counts), generator=gen, dtype=torch.float64).to(DEVICE)
    coefs[::4] = 1.0  # untouched units
    before = [t.clone() for t in tensors]
    counter = KernelCounter(monkeypatch)
    tb.scale_units_(tensors, dims, coefs)
    assert counter.launches == ["_scale_kernel"]
    for i, (t, d, c, b) in enumerate(zip(tensors, dims, coefs.cpu().split(counts), before)):
        c = c.reshape(backends.unit_shape(t, d))
        assert_scaled(t, b, c, f"tensor {i} {tuple(t.shape)} {t.dtype}")  # type: ignore[arg-type]
        ones = (c == 1.0).expand(t.shape).to(t.device)
        assert torch.equal(t[ones], b[ones]), f"tensor {i}: a unit with coefficient 1 changed"


def test_scale_units_listed_twice_goes_to_torch(tb, monkeypatch):
    g = random_tensor((3, 5), torch.float32, DEVICE)
    before = g.clone()
    import fusedclip.triton_kernels.scale as scale_kernels

    def racing_kernel(*args, **kwargs):
        raise AssertionError("the scale kernel must not run on a list that holds a tensor twice")

    monkeypatch.setattr(scale_kernels, "scale_", racing_kernel)
    coefs = torch.tensor([0.5, 1.0, 2.0, 0.5, 1.0, 2.0], device=DEVICE)
    tb.scale_units_([g, g], [(1,), (1,)], coefs)
    torch.testing.assert_close(g, before * torch.tensor([[0.25], [1.0], [4.0]], device=DEVICE), rtol=0, atol=0)


def agc_model_params(count, seed, dtypes=(torch.float32, torch.bfloat16)):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (7,), (3, 2, 2), (), (2, 600)]
    params = []
    for i in range(count):
        w = torch.nn.Parameter(random_tensor(shapes[i % len(shapes)], dtypes[i % len(dtypes)], DEVICE, gen))
        w.grad = random_tensor(w.shape, w.dtype, DEVICE, gen, scale=0.01 * (1 + i % 7))
        params.append(w)
    return params


def test_agc_is_one_reduce_and_one_scale_launch_and_reuses_its_plans(monkeypatch):
    params = agc_model_params(120, seed=70)
    b = triton_backend.load()
    counter = KernelCounter(monkeypatch)
    fusedclip.adaptive_clip_grad_(params, 0.02, backend="triton")
    assert counter.launches == ["_reduce_kernel", "_finalize_kernel", "_scale_kernel"]
    builds = b.cache.builds
    for _ in range(2):  # grads written in place, as autograd does: no plan is rebuilt
        for w in params:
            w.grad.mul_(3.0)
        counter.launches.clear()
        fusedclip.adaptive_clip_grad_(params, 0.02, backend="triton")
        assert counter.launches == ["_reduce_kernel", "_finalize_kernel", "_scale_kernel"]
    assert b.cache.builds == builds
    params[5].grad = params[5].grad.clone()  # a new buffer: the plans that list it are rebuilt
    fusedclip.adaptive_clip_grad_(params, 0.02, backend="triton")
    assert b.cache.builds == builds + 2


# ---- GPU only ----------------------------------------------------------------------------------------------------


def _cuda_grads(count=200, dtype=torch.float32, seed=30):
    return random_grads(count, dtypes=(dtype,), device="cuda", seed=seed, max_numel=5000)


def _refill(grads, seed):
    """Fresh values of the same shapes and dtypes, written into `grads` (whose plan stays cached); returns a copy.
    (random_grads with another seed would give other shapes.)"""
    gen = torch.Generator().manual_seed(seed)
    fresh = [random_tensor(g.shape, g.dtype, g.device, gen, scale=3.0) for g in grads]
    for g, f in zip(grads, fresh):
        g.copy_(f)
    return fresh


class Launches:
    """Records the ticket and scratch every norm launch of the backend gets (its launchers' arguments), and which
    (stand-in) CUDA device is current at every kernel launch."""

    def __init__(self, monkeypatch):
        from fusedclip.backends import plan as plan_module
        from fusedclip.triton_kernels import launch, multi_tensor_norm

        self.tickets: list[torch.Tensor] = []
        self.scratch: list[tuple] = []
        self.devices: list[int] = []
        self.current = 0
        self.switches = 0
        real_norm, real_prepare = multi_tensor_norm.multi_tensor_norm, multi_tensor_norm.prepare_norm

        def norm(*args, **kwargs):
            self.tickets.append(args[4])
            return real_norm(*args, **kwargs)

        def prepare(*args, **kwargs):
            self.tickets.append(args[4])
            self.scratch.append(args[10:13])
            return real_prepare(*args, **kwargs)

        monkeypatch.setattr(multi_tensor_norm, "multi_tensor_norm", norm)
        monkeypatch.setattr(multi_tensor_norm, "prepare_norm", prepare)
        real_launch = launch.Launcher.launch

        def launch_(launcher, *args):
            self.devices.append(self.current)
            return real_launch(launcher, *args)

        monkeypatch.setattr(launch.Launcher, "launch", launch_)
        self.plan = plan_module


def test_each_stream_launches_with_its_own_ticket_and_scratch(tb, monkeypatch):
    """Two streams launching over one plan at once would interleave one ticket's atomics (a total finalized early,
    or never, and the ticket left non-zero): so a launch from each stream uses that stream's ticket (made at its first
    use, alone: the general path needs no norm scratch), and a call being captured a fresh one; prepared calls bind the
    scratch of the stream they were prepared on, with that stream's ticket. Streams and capture are stand-ins (the
    race needs a GPU: see tests/test_plan.py's gpu tests); every result is still checked against float64."""
    rec = Launches(monkeypatch)
    stream, capture = ["A"], [False]
    monkeypatch.setattr(rec.plan, "stream_of", lambda device: stream[0])
    monkeypatch.setattr(rec.plan, "capturing", lambda device: capture[0])
    grads = grads_of_sizes([5, CHUNK + 3, 40], (torch.float32, torch.bfloat16), seed=21)
    ref = ref_total_norm(grads, 2.0)
    plan = tb.plan(grads)

    def total_from(name):
        stream[0] = name
        total, _ = tb.norms(grads, 2.0, False, plan)
        assert_total_close(total, ref, torch.float32, what=f"total from stream {name}")
        return rec.tickets[-1]

    a = total_from("A")
    assert a is plan.tickets["A"] and not plan.scratches  # the ticket alone
    b = total_from("B")
    assert b is plan.tickets["B"] and b.data_ptr() != a.data_ptr()
    assert total_from("B") is b and total_from("A") is a
    capture[0] = True
    captured = [total_from("A"), total_from("A")]
    assert all(t.data_ptr() not in (a.data_ptr(), b.data_ptr()) for t in captured)
    assert captured[0] is not captured[1]
    capture[0] = False
    assert all(int(t) == 0 for t in (a, b, *captured))  # every launch left its ticket at zero
    assert not plan.scratches

    for name in ("A", "B"):
        stream[0] = name
        for g, o in zip(grads, originals := [g.clone() for g in grads]):
            g.copy_(o)
        total = tb.prepare_clip_norm(plan, 2.0, 0.5)()
        mine = plan.scratches[name]
        assert mine.ticket is plan.tickets[name]
        assert rec.tickets[-1] is mine.ticket and rec.scratch[-1] == (mine.partials, mine.tensor_vals, mine.coef)
        want = ref_total_norm(originals, 2.0)
        assert_total_close(total, want, torch.float32, what=f"prepared clip from stream {name}")
        for g, o in zip(grads, originals):
            assert_scaled(g, o, min(1.0, 0.5 / (total.item() + 1e-6)))


def test_launches_run_on_the_plans_device_whichever_device_is_current(tb, monkeypatch):
    """Triton launches on the current CUDA device: gradients on cuda:1 while cuda:0 is current would launch on
    device 0 over device 1's tables. Every launch (norms, scale, clamp, and the prepared calls) runs with the plan's
    device current and restores the caller's afterwards; a plan on the current device switches nothing. The device
    index is a stand-in (this machine has no second GPU: the gpu test below needs two); the kernels run here, and
    their results are checked."""
    import contextlib
    import dataclasses

    rec = Launches(monkeypatch)
    monkeypatch.setattr(rec.plan, "stream_of", lambda device: None)
    monkeypatch.setattr(rec.plan, "capturing", lambda device: False)
    monkeypatch.setattr(triton_backend, "kernel_coef", lambda coef, device: coef.float())  # stays on this CPU

    @contextlib.contextmanager
    def device(index):
        index = index.index if isinstance(index, torch.device) else index
        before, rec.current = rec.current, index
        rec.switches += 1
        try:
            yield
        finally:
            rec.current = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: rec.current)
    monkeypatch.setattr(torch.cuda, "device", device)
    grads = grads_of_sizes([7, CHUNK + 1], (torch.float32,), seed=22)
    originals = [g.clone() for g in grads]
    on_cpu = tb.plan(grads)
    on_cpu.scratch()  # the ticket and scratch made here, on this CPU: the copies below share them (stand-in devices)
    for index in (1, 0):
        p = dataclasses.replace(on_cpu, device=torch.device("cuda", index))
        rec.devices.clear()
        switches = rec.switches
        for g, o in zip(grads, originals):
            g.copy_(o)
        total, _ = tb.norms(None, 2.0, False, p)
        assert_total_close(total, ref_total_norm(originals, 2.0), torch.float32)
        total, coef = tb.norm_and_coef(None, 2.0, 0.5, p)
        tb.scale_(None, coef, p)
        for g, o in zip(grads, originals):
            assert_scaled(g, o, min(1.0, 0.5 / (total.item() + 1e-6)))
        tb.clamp_(None, 1e-3, p)
        tb.prepare_norm(p, 2.0)()
        tb.prepare_clip_norm(p, 2.0, 0.5)()
        tb.prepare_clamp(p, 1e-3)()
        assert len(rec.devices) >= 10 and set(rec.devices) == {index} and rec.current == 0
        assert (rec.switches > switches) == (index != 0)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_gradients_on_another_device_than_the_current_one():
    grads = random_grads(20, (torch.float32, torch.bfloat16), "cuda:1", seed=23, max_numel=5000)
    params = params_with_grads(grads)
    originals = [g.clone() for g in grads]
    with torch.cuda.device(0):
        for _ in range(3):  # cold, kept (the fast path's prepared calls), kept
            for g, o in zip(grads, originals):
                g.copy_(o)
            total = fusedclip.clip_grad_norm_(params, 0.5, backend="triton")
            assert total.device == torch.device("cuda", 1)
            assert_total_close(total, ref_total_norm(originals, 2.0), torch.float32)
            for g, o in zip(grads, originals):
                assert_scaled(g, o, min(1.0, 0.5 / (total.item() + 1e-6)))
        assert torch.cuda.current_device() == 0


@pytest.mark.gpu
@pytest.mark.profiler
def test_gpu_launch_count_at_most_three():
    from torch.profiler import ProfilerActivity, profile

    params = params_with_grads(_cuda_grads(500, torch.bfloat16))
    fusedclip.clip_grad_norm_(params, 0.1, backend="triton")  # compile and build the plan first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) <= 3, [e.name for e in kernels]


@pytest.mark.gpu
def test_gpu_no_host_sync_cold_and_steady():
    """A call that builds its plan (cold cache) and steady-state calls, each under set_sync_debug_mode("error");
    the results are checked against the float64 reference after leaving that mode."""
    grads = _cuda_grads()
    params = params_with_grads(grads)
    cache = cold_plans("triton")
    for phase, seed in (("cold", 33), ("steady", 34)):
        fresh = _refill(grads, seed)
        builds = cache.builds
        with sync_errors():
            total = fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
            snapshot = [g.clone() for g in grads]
            unclipped = fusedclip.clip_grad_norm_(params, 1e9, backend="triton")  # coef 1: no pass over the grads
        assert cache.builds == builds + (phase == "cold"), phase
        assert_total_close(total, ref_total_norm(fresh, 2.0), torch.float32, what=f"{phase} total")
        coef = backends.clip_coef(total, 0.1).item()
        assert coef < 1.0
        for g, s, f in zip(grads, snapshot, fresh):
            assert_scaled(s, f, coef, what=f"{phase} gradient")
            assert torch.equal(g, s)
        assert_total_close(unclipped, ref_total_norm(snapshot, 2.0), torch.float32, what=f"{phase} 2nd total")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    grads = _cuda_grads(50)
    params = params_with_grads(grads)
    fusedclip.clip_grad_norm_(params, 0.1, backend="triton")  # warm: compile, plan
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = fusedclip.clip_grad_norm_(params, 0.1, backend="triton")
    for seed in (31, 32):
        fresh = _refill(grads, seed)
        graph.replay()
        torch.cuda.synchronize()
        assert_total_close(total, ref_total_norm(fresh, 2.0), torch.float32)
        coef = backends.clip_coef(total, 0.1).item()
        for g, f in zip(grads, fresh):
            assert_scaled(g, f, coef)


def _compiled_clip_step(device: str, compile_backend: str) -> None:
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(device)
    model(torch.randn(8, 16, device=device)).square().mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    fusedclip.available_backends()  # backends load outside the trace: dynamo cannot trace their import

    @torch.compile(fullgraph=True, backend=compile_backend)
    def step():
        return fusedclip.clip_grad_norm_(model.parameters(), 0.01, backend="triton")

    total = step()
    assert_total_close(total, ref_total_norm(raw, 2.0), torch.float32)
    coef = backends.clip_coef(total, 0.01).item()
    for p, r in zip(model.parameters(), raw):
        assert_scaled(p.grad, r, coef)


@pytest.mark.compile
def test_torch_compile_fullgraph_cpu():
    if DEVICE != "cpu":
        pytest.skip("the CPU variant; see test_gpu_torch_compile_fullgraph")
    _compiled_clip_step("cpu", "aot_eager")


@pytest.mark.compile
def test_agc_torch_compile_fullgraph_cpu():
    """Under torch.compile the unit hooks take the base-class path (through the backend's opaque norm op)."""
    if DEVICE != "cpu":
        pytest.skip("the CPU variant")
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model(torch.randn(8, 16)).square().mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    fusedclip.available_backends()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step():
        fusedclip.adaptive_clip_grad_(model.parameters(), 0.01, backend="triton")

    step()
    compiled = [p.grad.clone() for p in model.parameters()]
    for p, r in zip(model.parameters(), raw):
        p.grad.copy_(r)
    fusedclip.adaptive_clip_grad_(model.parameters(), 0.01, backend="triton")  # eager: the unit-plan kernels
    assert any(not torch.equal(c, r) for c, r in zip(compiled, raw))
    for c, p in zip(compiled, model.parameters()):
        torch.testing.assert_close(c, p.grad, rtol=2e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.compile
def test_gpu_torch_compile_fullgraph():
    _compiled_clip_step("cuda", "inductor")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_tensor_over_two_to_the_31_elements():
    n = 2**31 + 4097
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * 2:
        pytest.skip("needs about 13 GB of GPU memory")
    g = torch.full((n,), 0.5, dtype=torch.bfloat16, device="cuda")
    g[-3:] = 2.0  # past 2^31: a 32-bit offset would miss these
    total, coef = backends.select("triton", g.device).norm_and_coef([g], float("inf"), 1.0)
    assert total.item() == 2.0
    total, _ = backends.select("triton", g.device).norms([g], 2.0, False)
    ref = math.sqrt((n - 3) * 0.25 + 3 * 4.0)
    assert total.item() == pytest.approx(ref, rel=1e-5)
    backends.select("triton", g.device).scale_([g], torch.tensor(0.5, device="cuda"))
    assert g[-1].item() == 1.0 and g[0].item() == 0.25
