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
