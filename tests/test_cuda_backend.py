"""Backend "cuda" on a GPU: conformance against float64 references and stock torch, opcheck on the ops, a tensor
of more than 2^31 elements, launch count, no host sync, determinism. Skipped without a GPU or the extension."""

from __future__ import annotations

import math

import pytest
import torch

import fusedclip
from fusedclip.backends import cuda_backend
from reference import (
    FLOAT_DTYPES,
    NORM_TYPES,
    assert_scaled,
    assert_total_close,
    random_grads,
    random_tensor,
    ref_tensor_norm,
    ref_total_norm,
)
from sync_check import cold_plans, sync_errors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("cuda" not in fusedclip.available_backends(), reason="backend 'cuda' is not available"),
]


def _backend():
    return cuda_backend.load()


def _acc(tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _mixed(count=37, seed=0, max_numel=70_000):
    """Odd sizes spanning several chunks, every dtype, plus a misaligned view (scalar path)."""
    grads = random_grads(count, FLOAT_DTYPES[:1] + FLOAT_DTYPES[2:], "cuda", seed, max_numel)
    base = random_tensor(1001, torch.float32, "cuda")
    grads.append(base[3:])  # 12-byte offset: not 16-byte aligned
    return grads


@pytest.mark.parametrize("p", NORM_TYPES)
@pytest.mark.parametrize("with_f64", [False, True])
def test_norms_match_reference(p, with_f64):
    grads = _mixed(seed=int(abs(p) * 10 if math.isfinite(p) else 99) + with_f64)
    if with_f64:
        grads.append(random_tensor(70_001, torch.float64, "cuda"))
    total, norms = _backend().norms(grads, p, per_tensor=True)
    acc = _acc(grads)
    assert_total_close(total, ref_total_norm(grads, p), acc)
    for i, g in enumerate(grads):
        assert_total_close(norms[i], ref_tensor_norm(g, p), acc, what=f"norm of tensor {i}")
    total2, none = _backend().norms(grads, p, per_tensor=False)
    assert none is None
    assert_total_close(total2, ref_total_norm(grads, p), acc)


@pytest.mark.parametrize("p", [2.0, float("inf"), float("-inf"), 1.0, 0.0, 3.0])
def test_nan_and_inf_propagate_like_torch(p):
    grads = _mixed(count=5, seed=3)
    grads[2].view(-1)[7] = float("nan")
    total, _ = _backend().norms(grads, p, per_tensor=False)
    want = torch.nn.utils.get_total_norm([g.double() for g in grads], p)
    assert math.isnan(total.item()) == math.isnan(want.item())
    grads[2].view(-1)[7] = float("inf")
    total, _ = _backend().norms(grads, p, per_tensor=False)
    assert_total_close(total, ref_total_norm(grads, p), _acc(grads))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_matches_reference(dtype):
    grads = random_grads(301, (dtype,), "cuda", seed=5, max_numel=5000)
    originals = [g.clone() for g in grads]
    params = []
    for g in grads:
        prm = torch.nn.Parameter(torch.empty_like(g))
        prm.grad = g
        params.append(prm)
    total = fusedclip.clip_grad_norm_(params, 0.5, backend="cuda")
    ref = ref_total_norm(originals, 2.0)
    assert_total_close(total, ref, _acc(grads))
    coef = min(0.5 / (total.item() + 1e-6), 1.0)
    for g, o in zip(grads, originals):
        assert_scaled(g, o, coef)


def test_scale_skips_at_coef_one_and_per_tensor():
    grads = _mixed(count=9, seed=7)
    before = [g.clone() for g in grads]
    b = _backend()
    b.scale_(grads, torch.ones((), device="cuda"))
    assert all(torch.equal(g, o) for g, o in zip(grads, before))
    coefs = torch.rand(len(grads), device="cuda")
    coefs[1] = 1.0
    b.scale_per_tensor_(grads, coefs)
    for g, o, c in zip(grads, before, coefs.tolist()):
        assert_scaled(g, o, c)


def test_clamp_matches_torch():
    grads = _mixed(count=11, seed=9)
    grads[0].view(-1)[0] = float("nan")
    want = [g.clamp(-0.3, 0.3) for g in grads]
    _backend().clamp_(grads, 0.3)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_deterministic_bits():
    grads = _mixed(count=50, seed=11)
    first = _backend().norms(grads, 2.0, per_tensor=True)
    for _ in range(3):
        again = _backend().norms(grads, 2.0, per_tensor=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_no_host_sync():
    """A cold call (the plan is built inside the checked block) and a steady-state call, each under
    set_sync_debug_mode("error"): norm + coefficient, scale, clamp; checked against references afterwards."""
    grads = _mixed(count=20, seed=13)
    b = _backend()
    cache = cold_plans("cuda")
    for phase, seed in (("cold", 14), ("steady", 15)):
        gen = torch.Generator().manual_seed(seed)
        originals = [random_tensor(g.shape, g.dtype, "cuda", gen, scale=2.0) for g in grads]
        for g, o in zip(grads, originals):
            g.copy_(o)
        builds = cache.builds
        with sync_errors():
            total, coef = b.norm_and_coef(grads, 2.0, 1.0)
            b.scale_(grads, coef)
            scaled = [g.clone() for g in grads]
            b.clamp_(grads, 0.1)
        assert cache.builds == builds + (phase == "cold"), phase
        assert_total_close(total, ref_total_norm(originals, 2.0), _acc(grads), what=f"{phase} total")
        c = coef.item()
        assert c < 1.0 and abs(c - 1.0 / (total.item() + 1e-6)) <= 1e-6 * c
        for g, s, o in zip(grads, scaled, originals):
            assert_scaled(s, o, c, what=f"{phase} gradient")
            torch.testing.assert_close(g, s.clamp(-0.1, 0.1), rtol=0, atol=0)


@pytest.mark.profiler
def test_launch_count():
    grads = random_grads(2000, (torch.float32, torch.bfloat16), "cuda", seed=17, max_numel=1000)
    b = _backend()
    _, coef = b.norm_and_coef(grads, 2.0, 1e-3)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _, coef = b.norm_and_coef(grads, 2.0, 1e-3)
        b.scale_(grads, coef)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "Memset" not in e.name]
    assert len(kernels) == 2, [e.name for e in kernels]


def test_opcheck():
    grads = _mixed(count=6, seed=19)
    p = _backend().plans.get(grads)
    tables = (p.meta, p.chunk_tensor, p.chunk_start)
    ops = torch.ops.fusedclip
    torch.library.opcheck(ops.norm.default, (grads, *tables, p.tensor_chunks, p.chunk_size, 2.0, True))
    torch.library.opcheck(ops.norm_and_coef.default, (grads, *tables, p.tensor_chunks, p.chunk_size, 2.0, 1.0))
    coef = torch.tensor(0.5, device="cuda")
    torch.library.opcheck(ops.scale.default, (grads, *tables, p.chunk_size, coef))
    torch.library.opcheck(
        ops.scale_per_tensor.default, (grads, *tables, p.chunk_size, torch.rand(len(grads), device="cuda"))
    )
    torch.library.opcheck(ops.clamp.default, (grads, *tables, p.chunk_size, 0.2))


@pytest.mark.compile
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).cuda()
    model(torch.randn(8, 16, device="cuda")).square().mean().backward()
    raw = [p.grad.clone() for p in model.parameters()]
    fusedclip.available_backends()  # backends load outside the trace: dynamo cannot trace their import

    @torch.compile(fullgraph=True)
    def step():
        total = fusedclip.clip_grad_norm_(model.parameters(), 0.01, backend="cuda")
        fusedclip.clip_grad_value_(model.parameters(), 1e-3, backend="cuda")
        return total

    total = step()
    assert_total_close(total, ref_total_norm(raw, 2.0), torch.float32)
    coef = min(0.01 / (total.item() + 1e-6), 1.0)
    for p, r in zip(model.parameters(), raw):
        torch.testing.assert_close(p.grad, (r.double() * coef).float().clamp(-1e-3, 1e-3), rtol=1e-6, atol=0)


def test_build_info():
    info = cuda_backend.build_info()
    assert info is not None and info["cuda_version"] and info["kernel_params"]["threads_per_block"] > 0
    assert info["loaded_binary_arch"] is not None


@pytest.mark.slow
def test_tensor_over_2_pow_31_elements():
    n = 2**31 + 37
    if torch.cuda.get_device_properties(0).total_memory < 3 * n * 2:
        pytest.skip("needs about 13 GB of GPU memory")
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    x[-1] = 3.0
    x[2**31 + 5] = -2.0
    total, norms = _backend().norms([x], 2.0, per_tensor=True)
    want = math.sqrt((n - 2) + 9.0 + 4.0)
    assert abs(total.item() - want) <= 1e-5 * want
    assert abs(norms[0].item() - want) <= 1e-5 * want
    _backend().scale_([x], torch.tensor(0.5, device="cuda"))
    assert x[-1].item() == 1.5 and x[2**31 + 5].item() == -1.0 and x[0].item() == 0.5 and x[2**31].item() == 0.5


# ---- per-tensor and unit norms over many tensors: the finalize spread over tiles of tensors ----------------------
# With per-tensor results (and p = 0) the kernel finalizes tiles of kTileTensors (2048) tensors, each by the block
# that finishes its last chunk; these cover many tiles, single- and multi-chunk tensors in one tile, empty tensors,
# NaN, and determinism, against float64 references of the same stored values.

TILE = 2048


def _ref_rows(t: torch.Tensor, p: float) -> torch.Tensor:
    """float64 norms of the rows of a 2-D tensor (torch's vector_norm: ord 0 counts non-zeros)."""
    return torch.linalg.vector_norm(t.double(), ord=p, dim=1)


def _assert_norms_close(got: torch.Tensor, ref: torch.Tensor, rtol: float, what: str) -> None:
    got64 = got.double()
    assert got64.shape == ref.shape, (got64.shape, ref.shape)
    bad = ~((got64 - ref).abs() <= rtol * ref.abs() + 1e-30) & ~(got64.isnan() & ref.isnan())
    bad &= ~(got64.isinf() & ref.isinf() & (got64 == ref))
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} of {ref.numel()} off; first at {bad.nonzero()[:3].tolist()}"


@pytest.mark.parametrize("p", [2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.0])
def test_unit_norms_of_100k_units_match_float64(p):
    """AGC's row units: 110k+ units over 55 tiles, most of one chunk, some of two (rows longer than a chunk)."""
    gen = torch.Generator().manual_seed(23)
    tensors = [
        random_tensor((60_001, 33), torch.float32, "cuda", gen),
        random_tensor((50_003, 17), torch.bfloat16, "cuda", gen),
        random_tensor((7, 70_001), torch.float32, "cuda", gen),  # rows of 2 chunks (chunk size 65536)
        random_tensor((3001, 5), torch.float16, "cuda", gen),
    ]
    b = _backend()
    builds = b.plans.builds
    norms = b.unit_norms(tensors, [(1,)] * len(tensors), p)
    assert b.plans.builds == builds + 1, "the unit plan was not used (kernel path)"
    ref = torch.cat([_ref_rows(t, p) for t in tensors])
    assert norms.dtype == torch.float32 and norms.numel() == ref.numel() > 100_000
    _assert_norms_close(norms, ref, 1e-5, f"unit norms, p={p}")
    again = b.unit_norms(tensors, [(1,)] * len(tensors), p)
    assert torch.equal(norms, again), "unit norms differ between two calls"


@pytest.mark.parametrize("p", NORM_TYPES)
def test_per_tensor_norms_of_5000_tensors_match_float64(p):
    """Three tiles; multi-chunk tensors mixed with one-chunk ones in every tile; some all-zero tensors (p = 0
    counts only tensors with a non-zero entry); fp32/bf16/fp16 together."""
    grads = random_grads(5000, (torch.float32, torch.bfloat16, torch.float16), "cuda", seed=29, max_numel=900)
    for i in range(0, 5000, 397):
        grads[i] = random_tensor(140_003, grads[i].dtype, "cuda")  # three chunks
    for i in (5, 2100, 4999):
        grads[i].zero_()
    total, norms = _backend().norms(grads, p, per_tensor=True)
    assert_total_close(total, ref_total_norm(grads, p), torch.float32)
    ref = torch.tensor([ref_tensor_norm(g, p) for g in grads], dtype=torch.float64, device="cuda")
    _assert_norms_close(norms, ref, 1e-5, f"per-tensor norms, p={p}")
    again = _backend().norms(grads, p, per_tensor=True)
    assert torch.equal(total, again[0]) and torch.equal(norms, again[1]), "not bitwise deterministic"


@pytest.mark.parametrize("p", [2.0, float("inf"), 0.0])
def test_per_tensor_nan_in_a_late_tile(p):
    grads = random_grads(4500, (torch.float32,), "cuda", seed=31, max_numel=200)
    grads[4321].view(-1)[3] = float("nan")
    total, norms = _backend().norms(grads, p, per_tensor=True)
    want = torch.nn.utils.get_total_norm([g.double() for g in grads], p)
    assert math.isnan(total.item()) == math.isnan(want.item())
    assert math.isnan(norms[4321].item()) == (p != 0.0)
    assert not norms[:4321].isnan().any() and not norms[4322:].isnan().any()


def test_empty_tensors_including_a_whole_tile_of_them():
    """Zero-size tensors have no chunk: inside a tile the finalizing block gives them the fold's identity; a tile of
    nothing but empty tensors is never completed by a chunk, so the last block writes their norms."""
    grads = random_grads(10, (torch.float32,), "cuda", seed=37)
    empties = [torch.empty(0, device="cuda") for _ in range(TILE + 100)]
    tensors = grads[:5] + empties + grads[5:]
    b = _backend()
    plan = b.plans.get(tensors)
    for p, empty_norm in [(2.0, 0.0), (float("-inf"), float("inf")), (0.0, 0.0)]:
        total, norms = torch.ops.fusedclip.norm(
            tensors, plan.meta, plan.chunk_tensor, plan.chunk_start, plan.tensor_chunks, plan.chunk_size, p, True
        )
        assert_total_close(total, ref_total_norm(grads, p), torch.float32)
        assert torch.all(norms[5 : 5 + len(empties)] == empty_norm)
        ref = torch.tensor([ref_tensor_norm(g, p) for g in grads], dtype=torch.float64, device="cuda")
        _assert_norms_close(torch.cat([norms[:5], norms[-5:]]), ref, 1e-5, f"norms around the empties, p={p}")


def test_per_tensor_launch_count_with_many_tensors():
    """The spread finalize adds no launch: a per-tensor norm is one kernel (plus its counters' memset)."""
    grads = random_grads(6000, (torch.float32, torch.bfloat16), "cuda", seed=41, max_numel=500)
    b = _backend()
    b.norms(grads, 2.0, per_tensor=True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        b.norms(grads, 2.0, per_tensor=True)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len([k for k in kernels if "Memset" not in k]) == 1 and len(kernels) <= 2, kernels


# ---- writes stay inside each tensor; the counters are reset on every CUDA-graph replay --------------------------


def test_scale_and_clamp_write_only_inside_each_view():
    """Views of one buffer per dtype, back to back with gaps of 1-3 elements: odd lengths (tails), starts at every
    alignment (the 16-byte vector path and the scalar one), some longer than a chunk. Scale, per-tensor scale and
    clamp change every element of every view, and none of the gaps."""
    b = _backend()
    lengths = [1, 7, 15, 16, 17, 65_535, 65_537, 33, 140_003, 2, 9]
    for dtype in FLOAT_DTYPES:
        gen = torch.Generator().manual_seed(47)
        buf = random_tensor(sum(lengths) + 4 * len(lengths) + 16, dtype, "cuda", gen, scale=2.0)
        spans, start = [], 1
        for k, n in enumerate(lengths):
            spans.append((start, n))
            start += n + 1 + k % 3
        gaps = torch.ones(buf.numel(), dtype=torch.bool, device="cuda")
        for s, n in spans:
            gaps[s : s + n] = False
        views = [buf[s : s + n] for s, n in spans]
        assert len({v.data_ptr() % 16 for v in views}) > 1, "starts at one alignment only"
        coefs = torch.rand(len(views), generator=gen).tolist()  # float32 values: what the kernel multiplies by
        for what, cs in (("scale", [0.375] * len(views)), ("per-tensor scale", coefs)):
            before = buf.clone()
            if what == "scale":
                b.scale_(views, torch.tensor(0.375, device="cuda"))
            else:
                b.scale_per_tensor_(views, torch.tensor(cs, device="cuda"))
            assert torch.equal(buf[gaps], before[gaps]), f"{dtype} {what}: wrote between the views"
            for (s, n), c in zip(spans, cs):
                assert_scaled(buf[s : s + n], before[s : s + n], c, what=f"{dtype} {what} of a view of {n}")
        before = buf.clone()
        b.clamp_(views, 0.01)
        assert torch.equal(buf[gaps], before[gaps]), f"{dtype} clamp: wrote between the views"
        for s, n in spans:
            torch.testing.assert_close(buf[s : s + n], before[s : s + n].clamp(-0.01, 0.01), rtol=0, atol=0)


@pytest.mark.parametrize("p", [2.0, 0.0, float("inf")])
def test_tiled_norms_and_clip_replay_in_a_cuda_graph(p):
    """One memset, captured with the kernel, zeroes the ticket and the per-tile counters: every replay finalizes
    every tile again (a counter left from the last replay would never reach its tile's chunk count). Three tiles,
    multi-chunk tensors among one-chunk ones; three replays with fresh gradients written in place, each against
    float64 references of those gradients."""
    grads = random_grads(4500, (torch.float32, torch.bfloat16), "cuda", seed=43, max_numel=300)
    gen = torch.Generator().manual_seed(43)
    for i in range(0, len(grads), 701):
        grads[i] = random_tensor(140_003, grads[i].dtype, "cuda", gen)
    b = _backend()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: plans built and used outside the capture
        b.norms(grads, p, per_tensor=True)
        b.norm_and_coef(grads, p, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, norms = b.norms(grads, p, per_tensor=True)
        total2, coef = b.norm_and_coef(grads, p, 0.5)
        b.scale_(grads, coef)
    for seed in (44, 45, 46):
        gen = torch.Generator().manual_seed(seed)
        fresh = [random_tensor(g.shape, g.dtype, "cuda", gen, scale=3.0) for g in grads]
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_total_norm(fresh, p)
        assert_total_close(total, ref, torch.float32, what=f"replay {seed} total")
        assert_total_close(total2, ref, torch.float32, what=f"replay {seed} total of norm_and_coef")
        ref_norms = torch.tensor([ref_tensor_norm(f, p) for f in fresh], dtype=torch.float64, device="cuda")
        _assert_norms_close(norms, ref_norms, 1e-5, f"replay {seed} per-tensor norms")
        c = coef.item()
        assert c < 1.0 and abs(c - 0.5 / (total2.item() + 1e-6)) <= 1e-6 * c
        for g, f in zip(grads[::97], fresh[::97]):
            assert_scaled(g, f, c, what=f"replay {seed} gradient")
