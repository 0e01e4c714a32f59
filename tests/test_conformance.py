"""Every API function against float64 references and stock torch, on every available (backend, device)."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

import fusedclip
from reference import (
    FLOAT_DTYPES,
    NORM_TYPES,
    TOTAL_RTOL,
    VALUE_ULPS,
    assert_rel_close,
    assert_scaled,
    assert_total_close,
    norm_rtol,
    params_with_grads,
    random_grads,
    random_tensor,
    ref_tensor_norm,
    ref_total_norm,
    ulp,
)

from fusedclip.backends import acc_dtype
from fusedclip.backends.torch_backend import BLOCK as BLOCK_ELEMENTS


def clone_all(ts):
    return [t.clone() for t in ts]


def ref_coef(total: float, max_norm: float) -> float:
    if math.isnan(total):
        return math.nan
    return min(max_norm / (total + 1e-6), 1.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_total_norm_every_type_and_dtype(backend_device, norm_type, dtype):
    backend, device = backend_device
    grads = random_grads(9, (dtype,), device, seed=NORM_TYPES.index(norm_type) + 3)
    total = fusedclip.get_total_norm(grads, norm_type, backend=backend)
    assert total.device.type == device
    assert_total_close(total, ref_total_norm(grads, norm_type), acc_dtype([dtype]))
    stock = torch.nn.utils.get_total_norm([g.to(acc_dtype([dtype])) for g in grads], norm_type)
    assert_total_close(total, stock.item(), acc_dtype([dtype]), "total vs stock torch on upcast values")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 0.0, 2.5])
def test_many_mixed_tensors_odd_sizes(backend_device, norm_type):
    backend, device = backend_device
    grads = random_grads(311, (torch.float32, torch.bfloat16, torch.float16, torch.float32), device, seed=11)
    grads += [random_tensor((0,), torch.float32, device), random_tensor((1,), torch.bfloat16, device)]
    total, per = fusedclip.multi_tensor_norm(grads, norm_type, per_tensor=True, backend=backend)
    assert_total_close(total, ref_total_norm(grads, norm_type), torch.float32)
    assert per.dtype == torch.float32 and per.shape == (len(grads),) and per.device.type == device
    ref = torch.tensor([ref_tensor_norm(g, norm_type) for g in grads], dtype=torch.float64)
    torch.testing.assert_close(per.cpu().double(), ref, rtol=1e-5, atol=0)


def test_float64_anywhere_gives_float64_total(backend_device):
    backend, device = backend_device
    grads = random_grads(5, (torch.float32, torch.float64, torch.bfloat16), device, seed=5)
    total = fusedclip.get_total_norm(grads, backend=backend)
    assert_total_close(total, ref_total_norm(grads, 2.0), torch.float64, all_fp64=False)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_norm_matches_reference_and_torch(backend_device, norm_type, dtype):
    backend, device = backend_device
    grads = random_grads(13, (dtype,), device, seed=21)
    original = clone_all(grads)
    stock_params = params_with_grads(clone_all(grads))
    ref = ref_total_norm(original, norm_type)
    max_norm = ref / 3.7  # genuinely clips
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), max_norm, norm_type, backend=backend)
    assert_total_close(total, ref, acc_dtype([dtype]))
    coef = ref_coef(total.item(), max_norm)
    assert coef < 1
    for i, (g, o) in enumerate(zip(grads, original)):
        assert_scaled(g, o, coef, f"grad {i}")
    stock_total = torch.nn.utils.clip_grad_norm_(stock_params, max_norm, norm_type)
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 2e-2)  # torch's bf16/fp16 total is coarse
    assert math.isclose(total.item(), stock_total.item(), rel_tol=rtol)
    for g, p in zip(grads, stock_params):
        torch.testing.assert_close(g, p.grad, rtol=2 * torch.finfo(dtype).eps + rtol, atol=0)


def test_clip_grad_norm_no_clip_leaves_bits(backend_device):
    backend, device = backend_device
    grads = random_grads(40, (torch.float32, torch.bfloat16), device, seed=8)
    original = clone_all(grads)
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), 1e6, backend=backend)
    assert_total_close(total, ref_total_norm(original, 2.0), torch.float32)
    for g, o in zip(grads, original):
        assert torch.equal(g, o)


def test_mixed_dtypes_clip(backend_device):
    backend, device = backend_device
    grads = random_grads(37, (torch.float32, torch.bfloat16, torch.float16, torch.float64), device, seed=4)
    original = clone_all(grads)
    ref = ref_total_norm(original, 2.0)
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), ref / 10, backend=backend)
    assert_total_close(total, ref, torch.float64, all_fp64=False)
    coef = ref_coef(total.item(), ref / 10)
    for i, (g, o) in enumerate(zip(grads, original)):
        assert_scaled(g, o, coef, f"grad {i}")


def test_non_contiguous_and_complex_fold_into_one_total(backend_device):
    backend, device = backend_device
    dense = random_grads(6, (torch.float32,), device, seed=2)
    gen = torch.Generator().manual_seed(126)
    strided = random_tensor((9, 8), torch.float32, device, gen)[:, ::2]
    cplx = torch.complex(random_tensor((7,), device=device, gen=gen), random_tensor((7,), device=device, gen=gen))
    grads = dense + [strided, cplx]
    original = clone_all(grads)
    ref = ref_total_norm(original, 2.0)
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), ref / 2, backend=backend)
    assert_total_close(total, ref, torch.float32)
    coef = ref_coef(total.item(), ref / 2)
    for g, o in zip(grads[:-1], original[:-1]):
        assert_scaled(g, o, coef)
    # complex64: the coefficient (rounded to float32) times each part, one rounding each
    rtol = VALUE_ULPS[torch.float32] * ulp(torch.float32)
    torch.testing.assert_close(grads[-1], original[-1] * coef, rtol=rtol, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), float("-inf"), 0.0])
def test_zero_size_tensors_contribute_nothing(backend_device, norm_type):
    backend, device = backend_device
    empty = [random_tensor((0,), device=device), random_tensor((0, 5), device=device)]
    grads = [empty[0], *random_grads(3, device=device, seed=1), empty[1]]
    total = fusedclip.get_total_norm(grads, norm_type, backend=backend)
    assert_total_close(total, ref_total_norm(grads, norm_type), torch.float32)
    only_empty = fusedclip.get_total_norm([random_tensor((0,), device=device)], norm_type, backend=backend)
    assert only_empty.item() == 0.0


def test_p0_counts_tensors_with_a_nonzero_entry(backend_device):
    backend, device = backend_device
    grads = random_grads(5, device=device, seed=3)
    grads.append(torch.zeros(4, device=device))  # one all-zero tensor: not counted (zeros on purpose here)
    total, per = fusedclip.multi_tensor_norm(grads, 0, per_tensor=True, backend=backend)
    assert total.item() == 5.0
    assert per.tolist() == [float(g.numel()) for g in grads[:5]] + [0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_non_finite_propagates_like_torch(backend_device, bad, norm_type):
    backend, device = backend_device
    grads = random_grads(7, (torch.float32,), device, seed=6)
    grads[3].view(-1)[0] = bad
    ours = clone_all(grads)
    stock = params_with_grads(clone_all(grads))
    total = fusedclip.clip_grad_norm_(params_with_grads(ours), 1.0, norm_type, backend=backend)
    stock_total = torch.nn.utils.clip_grad_norm_(stock, 1.0, norm_type)
    assert torch.equal(total.isnan(), stock_total.isnan()) and torch.equal(total.isinf(), stock_total.isinf())
    for g, p in zip(ours, stock):
        torch.testing.assert_close(g, p.grad, equal_nan=True)


def test_error_if_nonfinite_raises_and_touches_nothing(backend_device):
    backend, device = backend_device
    grads = random_grads(4, device=device, seed=9)
    grads[1].view(-1)[2] = float("nan")
    original = clone_all(grads)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.clip_grad_norm_(params_with_grads(grads), 0.1, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedclip.get_total_norm(grads, error_if_nonfinite=True, backend=backend)
    for g, o in zip(grads, original):
        assert torch.equal(g.isnan(), o.isnan()) and torch.equal(g.nan_to_num(), o.nan_to_num())


def test_clip_grads_with_norm_uses_given_total(backend_device):
    backend, device = backend_device
    grads = random_grads(11, (torch.float32, torch.bfloat16), device, seed=12)
    original = clone_all(grads)
    total = fusedclip.get_total_norm(grads, backend=backend)
    fusedclip.clip_grads_with_norm_(params_with_grads(grads), 0.5, total, backend=backend)
    coef = ref_coef(total.item(), 0.5)
    for g, o in zip(grads, original):
        assert_scaled(g, o, coef)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_grad_value(backend_device, dtype):
    backend, device = backend_device
    grads = random_grads(17, (dtype,), device, seed=13)
    grads[0].view(-1)[0] = float("nan")
    stock = params_with_grads(clone_all(grads))
    fusedclip.clip_grad_value_(params_with_grads(grads), 0.7, backend=backend)
    torch.nn.utils.clip_grad_value_(stock, 0.7)
    for g, p in zip(grads, stock):
        assert torch.equal(g.nan_to_num(), p.grad.nan_to_num()) and torch.equal(g.isnan(), p.grad.isnan())
        assert g[~g.isnan()].abs().max() <= 0.7


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_per_tensor_equals_loop(backend_device, norm_type):
    backend, device = backend_device
    grads = random_grads(23, (torch.float32, torch.bfloat16, torch.float64), device, seed=14)
    grads.insert(5, random_tensor((0,), device=device))
    original = clone_all(grads)
    max_norm = 3.0
    norms = fusedclip.clip_grad_norm_per_tensor_(params_with_grads(grads), max_norm, norm_type, backend=backend)
    assert norms.dtype == torch.float32 and norms.shape == (len(grads),)
    for i, (g, o) in enumerate(zip(grads, original)):
        ref = ref_tensor_norm(o, norm_type)
        assert math.isclose(norms[i].item(), ref, rel_tol=1e-5, abs_tol=1e-30)
        # float64 gradients are clipped by their float64 norm, which the float32 result does not show: allow
        # for its summation order against the reference's.
        used = ref if o.dtype == torch.float64 else norms[i].item()
        assert_scaled(g, o, ref_coef(used, max_norm), f"grad {i}", ulps=16 if o.dtype == torch.float64 else None)


def test_grad_clipper_follows_replaced_and_freed_grads(backend_device):
    backend, device = backend_device
    grads = random_grads(9, device=device, seed=15)
    params = params_with_grads(grads)
    clipper = fusedclip.GradClipper(params, 1.0, backend=backend)
    gen = torch.Generator().manual_seed(235)
    for step in range(3):
        fresh = [random_tensor(g.shape, g.dtype, device, gen, scale=step + 1.0) for g in grads]
        for p, g in zip(params, fresh):
            p.grad = g.clone()
        params[step].grad = None  # freed
        present = [g for i, g in enumerate(fresh) if i != step]
        ref = ref_total_norm(present, 2.0)
        total = clipper()
        assert_total_close(total, ref, torch.float32)
        coef = ref_coef(total.item(), 1.0)
        for i, p in enumerate(params):
            if i != step:
                assert_scaled(p.grad, fresh[i], coef)


def test_clip_by_global_norm_tf_semantics(backend_device):
    backend, device = backend_device
    ts = random_grads(6, (torch.float32, torch.bfloat16), device, seed=16)
    items = ts[:3] + [None] + ts[3:]
    ref = ref_total_norm(ts, 2.0)
    out, norm = fusedclip.clip_by_global_norm(items, ref / 4, backend=backend)
    assert out[3] is None and len(out) == len(items)
    assert_total_close(norm, ref, torch.float32)
    for o, t in zip(out[:3] + out[4:], ts):
        assert_scaled(o, t, (ref / 4) / max(norm.item(), ref / 4))
    unchanged, _ = fusedclip.clip_by_global_norm(ts, ref * 2, backend=backend)
    for o, t in zip(unchanged, ts):
        assert torch.equal(o, t)
    used, n = fusedclip.clip_by_global_norm(ts, 1.0, use_norm=2.0, backend=backend)
    assert n.item() == 2.0
    for o, t in zip(used, ts):
        assert_scaled(o, t, 0.5)
    ts[0].view(-1)[0] = float("inf")
    nan_out, _ = fusedclip.clip_by_global_norm(ts, 1.0, backend=backend)
    assert all(bool(o.isnan().all()) for o in nan_out)


def clip_by_norm_ref(x: torch.Tensor, clip_norm: float, dim) -> torch.Tensor:
    """TF's formula in float64 on the stored values; dim=() reduces over nothing (each element is its own slice)."""
    x64 = x.detach().to("cpu", torch.float64)
    norm = x64.abs() if dim == () else torch.linalg.vector_norm(x64, 2, dim=dim, keepdim=True)
    return x64 * clip_norm / norm.clamp(min=clip_norm)


def clip_by_norm_rtol(dtype: torch.dtype, terms: int) -> float:
    """The clipped values' bound: the norm's (accumulated in acc over `terms` values), then the values' own."""
    return VALUE_ULPS[dtype] * ulp(dtype) + norm_rtol(acc_dtype([dtype]), terms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clip_by_norm_tf_semantics(dtype):
    gen = torch.Generator().manual_seed(267)
    x = random_tensor((4, 5, 3), dtype, gen=gen)
    for clip_norm, dim, terms in [(1.0, None, 60), (0.5, (1, 2), 15), (0.3, -1, 3), (0.3, [0, 2], 12)]:
        ref = clip_by_norm_ref(x, clip_norm, dim)
        assert_rel_close(fusedclip.clip_by_norm(x, clip_norm, dim=dim), ref, clip_by_norm_rtol(dtype, terms), f"{dim=}")
    big = fusedclip.clip_by_norm(x, 1e9)
    assert torch.equal(big, x)
    y = x.clone().requires_grad_()
    fusedclip.clip_by_norm(y, 0.1).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_clip_by_norm_empty_dim_clips_each_element():
    # tf.clip_by_norm([3., -0.5, 0.2, 4.], 1., axes=[]) gives [1., -0.5, 0.2, 1.]; torch reads dim=() as "all dims".
    x = torch.tensor([3.0, -0.5, 0.2, 4.0])
    assert torch.equal(fusedclip.clip_by_norm(x, 1.0, dim=()), torch.tensor([1.0, -0.5, 0.2, 1.0]))
    assert torch.equal(fusedclip.clip_by_norm(x, 1.0, dim=[]), torch.tensor([1.0, -0.5, 0.2, 1.0]))
    gen = torch.Generator().manual_seed(268)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        y = random_tensor((6, 7), dtype, gen=gen, scale=2.0)
        ref = clip_by_norm_ref(y, 1.5, ())
        assert_rel_close(fusedclip.clip_by_norm(y, 1.5, dim=()), ref, clip_by_norm_rtol(dtype, 1))
    z = torch.complex(random_tensor((5,), gen=gen, scale=2.0), random_tensor((5,), gen=gen, scale=2.0))
    got = fusedclip.clip_by_norm(z, 1.0, dim=())
    expected = z.to(torch.complex128) / z.abs().double().clamp(min=1.0)
    assert got.dtype == z.dtype and torch.allclose(got.to(torch.complex128), expected, rtol=4 * ulp(torch.float32))


def test_clip_by_norm_takes_numpy_and_tensor_integer_dims():
    np = pytest.importorskip("numpy")
    x = random_tensor((4, 5, 3), gen=torch.Generator().manual_seed(269))
    for dim, same in [
        (np.int64(1), 1),
        (np.arange(1, 3), (1, 2)),
        (np.array([-1]), -1),
        ([np.int32(0), 2], (0, 2)),
        (torch.tensor(2), 2),
        (torch.tensor([0, 1]), (0, 1)),
        (np.array([], dtype=np.int64), ()),
    ]:
        assert torch.equal(fusedclip.clip_by_norm(x, 0.5, dim=dim), fusedclip.clip_by_norm(x, 0.5, dim=same)), dim


def test_determinism(backend_device):
    backend, device = backend_device
    grads = random_grads(50, (torch.float32, torch.bfloat16), device, seed=17)
    first = fusedclip.get_total_norm(grads, backend=backend)
    for _ in range(3):
        assert torch.equal(fusedclip.get_total_norm(grads, backend=backend), first)


def test_sparse_gradients_on_torch_path():
    gen = torch.Generator().manual_seed(337)
    emb = torch.nn.Embedding(20, 4, sparse=True, _weight=random_tensor((20, 4), gen=gen))
    emb(torch.tensor([1, 3, 3, 7])).pow(2).sum().backward()
    dense = torch.nn.Parameter(random_tensor((3,), gen=gen))
    dense.grad = random_tensor((3,), gen=gen)
    grad_dense = emb.weight.grad.to_dense()
    ref = ref_total_norm([grad_dense, dense.grad], 2.0)
    total = fusedclip.clip_grad_norm_([emb.weight, dense], ref / 2)
    assert_total_close(total, ref, torch.float32)
    torch.testing.assert_close(emb.weight.grad.to_dense(), grad_dense * ref_coef(total.item(), ref / 2))
    with pytest.raises(ValueError, match="uncoalesced"):
        fusedclip.clip_grad_value_([emb.weight], 0.1)
    emb.weight.grad = emb.weight.grad.coalesce()
    fusedclip.clip_grad_value_([emb.weight], 0.01)
    assert emb.weight.grad.to_dense().abs().max() <= 0.01


@pytest.mark.gpu
def test_mixed_devices_combine_on_first_device():
    grads = [random_tensor((33,), device="cuda"), random_tensor((17,)), random_tensor((5,), device="cuda")]
    original = clone_all(grads)
    ref = ref_total_norm(original, 2.0)
    total = fusedclip.clip_grad_norm_(params_with_grads(grads), ref / 2)
    assert total.device.type == "cuda"
    assert_total_close(total, ref, torch.float32)
    for g, o in zip(grads, original):
        assert_scaled(g, o, ref_coef(total.item(), ref / 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0])
def test_long_tensor_total_stays_exact(norm_type, dtype):
    # torch's own CPU norm of a 3M-element vector drifts well past 1e-5; ours must not.
    gen = torch.Generator().manual_seed(369)
    grads = [random_tensor((3_000_017,), dtype, gen=gen), random_tensor((5,), dtype, gen=gen)]
    total = fusedclip.get_total_norm(grads, norm_type, backend="torch")
    assert_total_close(total, ref_total_norm(grads, norm_type), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_long_cpu_tensors_stay_exact_without_a_float32_copy(dtype):
    # On CPU, torch's norm with dtype=float32 converts a whole bf16/fp16 tensor to a fresh float32 copy (page
    # faults on every call for big tensors); the torch backend converts BLOCK elements at a time into one buffer.
    # torch's norm of one vector of 262K elements is already 1.9e-5 off for p = 3 (float32 too): rows keep it exact.
    from torch.profiler import ProfilerActivity, profile

    from fusedclip.backends.torch_backend import BLOCK, ROW

    gen = torch.Generator().manual_seed(420)
    sizes = [3 * BLOCK + ROW + 7, BLOCK + 1, 2 * BLOCK, BLOCK, 5, 3 * ROW - 1, (1 << 18) + 1]
    grads = [random_tensor((n,), dtype, gen=gen, scale=1.0 + i) for i, n in enumerate(sizes)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fusedclip.get_total_norm(grads, backend="torch")
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= 4 * BLOCK, f"a {largest}-byte buffer for tensors of {max(sizes)} elements"
    for norm_type in [2.0, 1.0, 3.0, 0.5]:
        total, per = fusedclip.multi_tensor_norm(grads, norm_type, per_tensor=True, backend="torch")
        assert_total_close(total, ref_total_norm(grads, norm_type), torch.float32, f"p={norm_type}")
        ref = torch.tensor([ref_tensor_norm(g, norm_type) for g in grads], dtype=torch.float64)
        assert_rel_close(per, ref, TOTAL_RTOL[torch.float32], f"per-tensor, p={norm_type}")


@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, 0.5])
def test_equal_values_stay_exact_on_cpu(value, norm_type):
    # The rounding of equal terms does not average out: torch's CPU norm of 256K equal float32 values is ~2e-4
    # off for p = 2 (its vector lanes each sum 32768 of them). The torch backend's rows keep long tensors exact.
    from fusedclip.backends.torch_backend import LONG

    grads = [torch.full((LONG + 1,), value), torch.full((3 * BLOCK_ELEMENTS + 5,), value, dtype=torch.bfloat16)]
    for g in grads:
        total = fusedclip.get_total_norm([g], norm_type, backend="torch")
        assert_total_close(total, ref_total_norm([g], norm_type), torch.float32, f"{g.dtype} x {g.numel()}")


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_cpu_rows_run_on_one_thread_unless_each_thread_has_long_work(two_threads, monkeypatch):
    # A parallel region waits for a descheduled thread (milliseconds on a busy machine): long tensors' rows are
    # reduced on one thread, except a tensor of PARALLEL_MIN elements per thread or more; the caller's count stays.
    from fusedclip.backends import torch_backend

    monkeypatch.setattr(torch_backend, "cpu_passes", None)  # the per-op path (fusedclip._host's region: below)
    monkeypatch.setattr(torch_backend, "PARALLEL_MIN", torch_backend.LONG)
    seen = []
    real = torch_backend._row_norms

    def spy(flat, norm_type, parts):
        seen.append((flat.numel(), torch.get_num_threads()))
        return real(flat, norm_type, parts)

    monkeypatch.setattr(torch_backend, "_row_norms", spy)
    gen = torch.Generator().manual_seed(436)
    sizes = [torch_backend.LONG + 1, 2 * torch_backend.LONG + 3, 99]
    grads = [random_tensor((n,), gen=gen, scale=1.0 + i) for i, n in enumerate(sizes)]
    total = fusedclip.get_total_norm(grads, backend="torch")
    assert sorted(seen) == [(sizes[0], 1), (sizes[1], 2)] and torch.get_num_threads() == 2
    assert_total_close(total, ref_total_norm(grads, 2.0), torch.float32)

    def broken(flat, norm_type, parts):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(torch_backend, "_row_norms", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        fusedclip.get_total_norm(grads[:1], backend="torch")
    assert torch.get_num_threads() == 2


@pytest.fixture
def one_region(two_threads, monkeypatch):
    """fusedclip._host's CPU passes (one parallel region per pass), in small pieces so that the lists below span many;
    the calls they get, recorded."""
    import fusedclip.fastpath
    from fusedclip.backends import torch_backend

    if torch_backend.cpu_passes is None:
        if fusedclip.fastpath.CppSignatures is not None and sys.platform.startswith("linux"):
            pytest.fail("fusedclip._host is loaded without its CPU passes: rebuild it "
                        "(`pip install --no-build-isolation .`)")
        pytest.skip("fusedclip._host's CPU passes are not built here (no extension, or no OpenMP)")
    calls: list[str] = []
    passes = torch_backend.cpu_passes

    class Recorded:
        def scale_(self, *args):
            calls.append("scale_")
            return passes.scale_(*args)

        def row_norms(self, *args):
            calls.append("row_norms")
            return passes.row_norms(*args)

    monkeypatch.setattr(torch_backend, "cpu_passes", Recorded())
    monkeypatch.setattr(torch_backend, "PIECE", 4099)  # pieces end mid-row, and several rows share one
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_passes_in_one_region_match_torch_and_float64(one_region, dtype):
    # The long tensors' scale and row norms in one region: the scale bit for bit stock torch's (each piece is torch's
    # op on a part of the tensor), the total within 3e-6 of float64 (the rows are the per-op path's rows).
    gen = torch.Generator().manual_seed(917)
    sizes = [300_001, 40_000, 7, 2 * 2048 * 70 + 5, 33_000]
    grads = [random_tensor((n,), gen=gen, scale=10.0 ** (i - 2)).to(dtype) for i, n in enumerate(sizes)]
    stock = [g.clone() for g in grads]
    ref = ref_total_norm(grads, 2.0)
    total = fusedclip.get_total_norm(grads, backend="torch")
    assert_total_close(total, ref, acc_dtype({dtype}))
    ours = [g.clone() for g in grads]
    fusedclip.clip_grads_with_norm_(params_with_grads(ours), 0.5, total, backend="torch")
    torch.nn.utils.clip_grads_with_norm_(params_with_grads(stock), 0.5, total)
    for o, t, g in zip(ours, stock, grads):
        assert torch.equal(o, t) and not torch.equal(o, g), (dtype, o.numel())
    assert "scale_" in one_region and ("row_norms" in one_region or dtype in (torch.bfloat16, torch.float16))


def test_cpu_passes_leave_overlapping_tensors_to_torch(one_region):
    # A long tensor listed twice is scaled twice, as torch does, and never by two threads of one region at once.
    gen = torch.Generator().manual_seed(918)
    g = random_tensor((100_003,), gen=gen, scale=1.0)
    expected = g.clone()
    torch.nn.utils.clip_grads_with_norm_(params_with_grads([expected]) * 2, 1.0, torch.tensor(4.0))
    fusedclip.clip_grads_with_norm_(params_with_grads([g]) * 2, 1.0, torch.tensor(4.0), backend="torch")
    assert torch.equal(g, expected) and "scale_" not in one_region


def test_tensor_listed_twice_is_scaled_twice_like_torch(backend_device):
    # torch counts a gradient listed twice twice in the norm and multiplies it twice; a kernel must not race on it.
    backend, device = backend_device

    def with_shared(grads):
        params = params_with_grads(grads)
        twin = torch.nn.Parameter(torch.empty_like(grads[2]))
        twin.grad = grads[2]  # the same tensor object as params[2].grad
        return params + [twin]

    grads = random_grads(5, device=device, seed=18)
    stock_grads = clone_all(grads)
    original = clone_all(grads)
    max_norm = ref_total_norm(grads + [grads[2]], 2.0) / 3
    with pytest.warns(UserWarning, match=r"parameters\[5\].grad is the same tensor as parameters\[2\].grad"):
        total = fusedclip.clip_grad_norm_(with_shared(grads), max_norm, backend=backend)
    stock_total = torch.nn.utils.clip_grad_norm_(with_shared(stock_grads), max_norm)
    assert_total_close(total, stock_total.item(), torch.float32)
    assert_total_close(total, ref_total_norm(original + [original[2]], 2.0), torch.float32)
    coef = ref_coef(total.item(), max_norm)
    for i, (g, o) in enumerate(zip(grads, original)):
        if i == 2:  # scaled twice: twice the rounding
            assert_scaled(g, o, coef * coef, f"grad {i}", ulps=2 * VALUE_ULPS[torch.float32])
        else:
            assert_scaled(g, o, coef, f"grad {i}")


@pytest.fixture
def fused_cpu_norm(monkeypatch):
    """The torch backend's compiled bf16/fp16 norm, switched on for small inputs (normally only for tensors of 1M
    elements and more, 16M in all)."""
    from fusedclip.backends import torch_backend

    monkeypatch.delenv("FUSEDCLIP_CPU_COMPILE", raising=False)
    monkeypatch.setattr(torch_backend, "LONG", torch_backend.ROW)
    monkeypatch.setattr(torch_backend, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(torch_backend, "_fused_failed", None)
    return torch_backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_half_precision_norm_is_exact(fused_cpu_norm, monkeypatch, dtype):
    calls = []
    real = fused_cpu_norm._fused_row_norms
    monkeypatch.setattr(fused_cpu_norm, "_fused_row_norms", lambda rows: calls.append(rows.shape) or real(rows))
    gen = torch.Generator().manual_seed(430)
    row = fused_cpu_norm.ROW
    grads = [random_tensor((n,), dtype, gen=gen, scale=1.0 + i) for i, n in enumerate([5 * row + 7, 3 * row, 99])]
    grads.append(torch.full((4 * row + 1,), 1 / 3, dtype=dtype))  # equal values: rounding that does not cancel
    total, per = fusedclip.multi_tensor_norm(grads, per_tensor=True, backend="torch")
    assert calls == [(5, row), (3, row), (4, row)]  # the compiled path ran, on every tensor of 2 rows or more
    assert_total_close(total, ref_total_norm(grads, 2.0), torch.float32)
    ref = torch.tensor([ref_tensor_norm(g, 2.0) for g in grads], dtype=torch.float64)
    assert_rel_close(per, ref, TOTAL_RTOL[torch.float32], "per-tensor")


def test_compiled_norm_falls_back_with_one_warning(fused_cpu_norm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(fused_cpu_norm, "_fused_rows", None)
    monkeypatch.setattr(torch, "compile", broken)
    grads = [random_tensor((9 * fused_cpu_norm.ROW + 3,), torch.bfloat16, gen=torch.Generator().manual_seed(431))]
    with pytest.warns(UserWarning, match="no C.. compiler here"):
        first = fusedclip.get_total_norm(grads, backend="torch")
    assert_total_close(first, ref_total_norm(grads, 2.0), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(fusedclip.get_total_norm(grads, backend="torch"), first)


def test_compiled_norm_can_be_switched_off(fused_cpu_norm, monkeypatch):
    monkeypatch.setenv("FUSEDCLIP_CPU_COMPILE", "0")
    monkeypatch.setattr(fused_cpu_norm, "_fused_row_norms", lambda rows: pytest.fail("compiled path used"))
    grads = [random_tensor((9 * fused_cpu_norm.ROW,), torch.bfloat16, gen=torch.Generator().manual_seed(432))]
    assert_total_close(fusedclip.get_total_norm(grads, backend="torch"), ref_total_norm(grads, 2.0), torch.float32)
