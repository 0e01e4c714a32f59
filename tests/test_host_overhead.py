"""The steady-state fast path (fusedclip.fastpath): every decision it makes, checked against stock torch and float64
references, on every backend this machine runs (the Triton one under its interpreter on CPU), with the per-call check
in C++ (fusedclip._host, where built) and in Python. Also: the host benchmark's smoke test, and the torch backend's
clamp on CPU."""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import subprocess
import sys
import types
import warnings
import weakref
from pathlib import Path

import pytest
import torch

import fusedclip
from conftest import BACKEND_DEVICES
from fusedclip import backends, fastpath
from reference import assert_scaled, assert_total_close, params_with_grads, random_grads, ref_total_norm

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["python"] + (["cpp"] if fastpath.CppSignatures is not None else [])


class _Op:
    """One stand-in op: callable, and its own `.default` overload, as torch.ops.fusedclip.<name> is."""

    def __init__(self, fn):
        self.fn = fn
        self.default = self

    def __call__(self, *args):
        return self.fn(*args)


class CudaOpsStandIn:
    """torch.ops.fusedclip's CUDA ops for the cuda backend on CPU tensors, where the extension cannot be built: each
    does its op's job with the torch backend, on the tensors it is handed or, for the planned_* ops (the table
    alone), on the tensors at the table's addresses (those the calls before handed over: every kept plan starts as a
    call with its tensors). `calls` lists which ops ran. This checks the backend's Python side (which op, which
    arguments, what comes back); the ops themselves are tested on a GPU (tests/test_cuda_backend.py)."""

    def __init__(self):
        from fusedclip.backends import clip_coef, torch_backend

        self.calls: list[str] = []
        self.by_address: dict[int, torch.Tensor] = {}
        torch_ = torch_backend.load()

        def seen(name, tensors):
            self.calls.append(name)
            self.by_address.update((t.data_ptr(), t) for t in tensors)
            return tensors

        def at(name, meta):
            self.calls.append(name)
            return [self.by_address[a] for a in meta[0].tolist()]

        def norm(grads, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, per_tensor):
            total, norms = torch_.norms(seen("norm", grads), norm_type, True)
            return total, norms if per_tensor else total.new_empty(0)

        def norm_and_coef(grads, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, max_norm):
            total, _ = torch_.norms(seen("norm_and_coef", grads), norm_type, False)
            return total, clip_coef(total, max_norm)

        def planned_norm(meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, acc_f64, norm_type, per_tensor,
                         max_norm):
            tensors = at("planned_norm", meta)
            total, norms = torch_.norms(tensors, norm_type, True)
            assert (total.dtype == torch.float64) == acc_f64, "acc_f64 does not match the tensors"
            coef = clip_coef(total, max_norm) if max_norm is not None else total.new_empty(0)
            return total, norms if per_tensor else total.new_empty(0), coef

        def planned_scale(meta, chunk_tensor, chunk_start, chunk_size, coef, per_tensor):
            tensors = at("planned_scale", meta)
            (torch_.scale_per_tensor_ if per_tensor else torch_.scale_)(tensors, coef)

        def scale(grads, meta, chunk_tensor, chunk_start, chunk_size, coef):
            torch_.scale_(seen("scale", grads), coef)

        def scale_per_tensor(grads, meta, chunk_tensor, chunk_start, chunk_size, coefs):
            torch_.scale_per_tensor_(seen("scale_per_tensor", grads), coefs)

        def clamp(grads, meta, chunk_tensor, chunk_start, chunk_size, clip_value):
            torch_.clamp_(seen("clamp", grads), clip_value)

        def planned_clamp(meta, chunk_tensor, chunk_start, chunk_size, clip_value):
            torch_.clamp_(at("planned_clamp", meta), clip_value)

        schemas = op_schemas()
        for fn in (norm, norm_and_coef, scale, scale_per_tensor, clamp, planned_norm, planned_scale, planned_clamp):
            # The stand-in takes the arguments the op's schema names, in its order: a call in another order fails.
            assert list(inspect.signature(fn).parameters) == schemas[fn.__name__], fn.__name__
            setattr(self, fn.__name__, _Op(fn))


def op_schemas() -> dict[str, list[str]]:
    """The argument names of every op csrc/ops.cpp defines, in order, read from its m.def schemas."""
    source = (ROOT / "csrc" / "ops.cpp").read_text()
    schemas = {}
    for call in re.findall(r"m\.def\((.*?)\);", source, flags=re.S):
        schema = "".join(re.findall(r'"([^"]*)"', call))
        name, rest = schema.split("(", 1)
        depth, args = 0, ""
        for c in rest:
            if c == ")" and depth == 0:
                break
            depth += {"(": 1, ")": -1}.get(c, 0)
            args += c
        schemas[name] = [a.split()[-1] for a in args.split(",")]
    return schemas


def install_cuda_stand_in(monkeypatch) -> CudaOpsStandIn:
    """The cuda backend over CudaOpsStandIn, taking CPU tensors, as backend "cuda" for this test."""
    from fusedclip.backends import cuda_backend

    ops = CudaOpsStandIn()
    monkeypatch.setattr(cuda_backend, "_ops", ops)
    backend = cuda_backend.CudaBackend()
    monkeypatch.setattr(backend, "runs_on", lambda device: True)
    monkeypatch.setitem(backends._loaded, "cuda", backend)
    return ops


# Every backend this machine runs, and where the cuda backend cannot run, the cuda backend with stand-in ops on CPU.
STAND_IN = "cuda" not in fusedclip.available_backends()
PAIRS = BACKEND_DEVICES + ([("cuda", "cpu")] if STAND_IN else [])


@pytest.fixture(params=PAIRS, ids=[f"{b}-{d}" if (b, d) != ("cuda", "cpu") else "cuda_stand_in-cpu" for b, d in PAIRS])
def backend_device(request, monkeypatch) -> tuple[str, str]:
    if request.param == ("cuda", "cpu"):
        install_cuda_stand_in(monkeypatch)
    return request.param


@pytest.fixture(params=CHECKS)
def check(request, monkeypatch):
    """Which per-call check new kept plans get; every kept plan is forgotten before and after."""
    monkeypatch.setattr(fastpath, "Signatures", fastpath.CppSignatures if request.param == "cpp" else
                        fastpath.PySignatures)
    fastpath.clear()
    fastpath.stats.hits = fastpath.stats.misses = fastpath.stats.kept = 0
    yield request.param
    fastpath.clear()


def acc_of(grads) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def assert_total_of(got: torch.Tensor, tensors: list) -> None:
    """`got` is the total 2-norm of `tensors` (float64 reference; accumulation dtype as the API promises)."""
    present = [t for t in tensors if t is not None]
    assert_total_close(got, ref_total_norm(present, 2.0), acc_of(present),
                       all_fp64=all(t.dtype == torch.float64 for t in present))


def new_grads(count: int, device: str, seed: int, dtypes=(torch.float32, torch.bfloat16, torch.float64)) -> list:
    return random_grads(count, dtypes, device, seed=seed, max_numel=200)


def assert_clip_matches_torch(params: list, max_norm: float, fn) -> None:
    """Run `fn(params)` (a fusedclip clip_grad_norm_ call) and check it does what torch's does, measured against
    float64 (stock torch rounds each bfloat16 norm to bfloat16): the total against the float64 total of the
    gradients as they were, every gradient against g * min(1, max_norm / (total + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    originals = [g.clone() for g in grads]
    total = fn(params)
    assert_total_of(total, originals)
    coef = min(1.0, max_norm / (total.item() + 1e-6))  # the total itself is checked against float64 just above
    for i, (g, o) in enumerate(zip(grads, originals)):
        assert_scaled(g, o, coef, what=f"gradient {i}")


def hits_misses() -> tuple[int, int]:
    return fastpath.stats.hits, fastpath.stats.misses


# ---- hits and every reason to miss ---------------------------------------------------------------------------------


def test_a_repeated_call_takes_the_fast_path_and_matches_torch(backend_device, check):
    backend, device = backend_device
    params = params_with_grads(new_grads(23, device, seed=1))
    clip = lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend=backend)  # noqa: E731
    assert_clip_matches_torch(params, 0.5, clip)  # the general path: validates, builds, keeps
    for step in range(3):
        for p in params:  # fresh values in the same tensors (a backward into kept gradients)
            p.grad.copy_(torch.randn(p.grad.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(step)))
        h, m = hits_misses()
        assert_clip_matches_torch(params, 0.5, clip)
        assert hits_misses() == (h + 1, m), "the second and later calls should reuse the kept plan"


@pytest.mark.parametrize("change", ["moved", "resized", "retyped", "set_to_none", "appears", "non_contiguous"])
def test_a_changed_gradient_is_seen_and_the_plan_rebuilt(backend_device, check, change):
    """Each change fails the check (a miss), the call takes the general path, and the result is torch's for the
    gradients as they are now; the call after that hits again."""
    backend, device = backend_device
    grads = new_grads(17, device, seed=2)
    params = params_with_grads(grads)
    params.append(torch.nn.Parameter(torch.randn(5, dtype=torch.float64, device=device)))  # no .grad yet
    clip = lambda ps: fusedclip.clip_grad_norm_(ps, 0.25, backend=backend)  # noqa: E731
    assert_clip_matches_torch(params, 0.25, clip)
    assert_clip_matches_torch(params, 0.25, clip)
    p = params[4]
    old = p.grad
    gen = torch.Generator().manual_seed(3)
    if change == "moved":  # same size and dtype elsewhere
        p.grad = torch.randn(old.shape, generator=gen, dtype=torch.float64).to(old.dtype).to(device)
    elif change == "resized":  # the same tensor shrunk in place: same address, fewer elements
        p.grad.resize_(old.numel() // 2 or 1)
    elif change == "retyped":  # the same Python object, now another dtype at another address
        p.grad.data = torch.randn(old.shape, generator=gen, dtype=torch.float64).to(device)
    elif change == "set_to_none":
        p.grad = None
    elif change == "appears":
        params[-1].grad = torch.randn(5, generator=gen, dtype=torch.float64).to(device)
    elif change == "non_contiguous":
        base = torch.randn(old.numel(), 2, generator=gen, dtype=torch.float64).to(old.dtype).to(device)
        p.grad = base[:, 0].view(old.shape) if old.dim() == 1 else base[:, 0].reshape(old.shape)[..., :]
        if p.grad.is_contiguous():
            p.grad = base.t()[0].view(-1)[: old.numel()].view(old.shape)
    h, m = hits_misses()
    assert_clip_matches_torch(params, 0.25, clip)
    assert hits_misses()[0] == h, f"a {change} gradient must not take the kept plan"
    if change == "non_contiguous":
        assert not p.grad.is_contiguous()
        return  # never kept: every call takes the general path
    h, m = hits_misses()
    assert_clip_matches_torch(params, 0.25, clip)
    assert hits_misses() == (h + 1, m), "the call after the change should hit the rebuilt plan"


def test_a_moved_gradient_is_never_read_stale(backend_device, check):
    """The old gradient, still alive, keeps its values; the new one is clipped (and its norm counted)."""
    backend, device = backend_device
    params = params_with_grads(new_grads(9, device, seed=4))
    fusedclip.clip_grad_norm_(params, 1e9, backend=backend)
    fusedclip.clip_grad_norm_(params, 1e9, backend=backend)
    old = params[3].grad
    kept = old.clone()
    params[3].grad = old.clone() * 1000  # moved, and dominant
    assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend=backend))
    assert torch.equal(old, kept)


def test_tensor_lists_see_resize_and_dtype_changes(backend_device, check):
    """multi_tensor_norm / get_total_norm over tensors: a tensor resized in place (same address) or given another
    dtype through .data (same Python object) is a miss, and the total is the current one."""
    backend, device = backend_device
    for fn in (fusedclip.multi_tensor_norm, fusedclip.get_total_norm):
        tensors = new_grads(12, device, seed=5)
        assert tensors[2].numel() > 1
        for _ in range(2):
            assert_total_of(fn(tensors, backend=backend), tensors)
        h, _ = hits_misses()
        tensors[2].resize_(1)
        assert_total_of(fn(tensors, backend=backend), tensors)
        tensors[5].data = torch.randn(7, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(device)
        assert_total_of(fn(tensors, backend=backend), tensors)
        assert hits_misses()[0] == h
        assert_total_of(fn(tensors, backend=backend), tensors)
        assert hits_misses()[0] == h + 1


def test_per_tensor_norms_on_the_fast_path(backend_device, check):
    backend, device = backend_device
    tensors = new_grads(11, device, seed=7)
    tensors.insert(3, None)
    present = [t for t in tensors if t is not None]
    for _ in range(2):
        total, norms = fusedclip.multi_tensor_norm(tensors, backend=backend, per_tensor=True)
    assert fastpath.stats.hits >= 1
    assert_total_of(total, present)
    for t, n in zip(present, norms.tolist()):
        assert math.isclose(n, ref_total_norm([t], 2.0), rel_tol=1e-5)


@pytest.mark.parametrize("mutation", ["appended", "replaced", "reordered"])
def test_a_mutated_parameter_list_is_seen(backend_device, check, mutation):
    backend, device = backend_device
    params = params_with_grads(new_grads(14, device, seed=8))
    extra = params_with_grads(new_grads(1, device, seed=9, dtypes=(torch.float32,)))[0]
    clip = lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend=backend)  # noqa: E731
    assert_clip_matches_torch(params, 0.5, clip)
    if mutation == "appended":
        params.append(extra)
    elif mutation == "replaced":
        params[6] = extra
    else:
        params[1], params[2] = params[2], params[1]
    h, _ = hits_misses()
    assert_clip_matches_torch(params, 0.5, clip)
    if mutation != "reordered" or params[1].grad.shape != params[2].grad.shape:
        assert hits_misses()[0] == h


def test_clip_grad_value_and_clip_grads_with_norm_on_the_fast_path(backend_device, check):
    backend, device = backend_device
    params = params_with_grads(new_grads(15, device, seed=10))
    for step in range(3):
        originals = [p.grad.clone() for p in params]
        fusedclip.clip_grad_value_(params, 0.3, backend=backend)
        for p, o in zip(params, originals):
            assert torch.equal(p.grad, o.clamp(-0.3, 0.3))
    assert fastpath.stats.hits >= 2
    h = fastpath.stats.hits
    originals = [p.grad.clone() for p in params]
    fusedclip.clip_grads_with_norm_(params, 0.1, torch.tensor(2.0), backend=backend)  # shares the kept plan
    assert fastpath.stats.hits == h + 1
    coef = torch.clamp(torch.tensor(0.1) / (torch.tensor(2.0) + 1e-6), max=1.0).item()  # float32, as torch's
    for i, (p, o) in enumerate(zip(params, originals)):
        assert_scaled(p.grad, o, coef, what=f"gradient {i}")


def _kept_steps() -> list[dict]:
    """The prepared-call tables of every kept plan (kept plans of a backend without a tensor list have one)."""
    return [p.steps for bucket in fastpath._buckets.values() for e in bucket if e.plans for p in e.plans.values()]


def test_prepared_calls_follow_each_calls_arguments(backend_device, check):
    """A kept plan prepares a call per (what, norm type, max_norm or clip value): calls that change these between
    steps, back and forth and past the table's bound, each get what torch computes for their own arguments."""
    backend, device = backend_device
    params = params_with_grads(new_grads(19, device, seed=12))
    gen = torch.Generator().manual_seed(13)
    cases = [(2.0, 0.5), (1.0, 0.5), (math.inf, 0.05), (2.0, 3.0), (2.0, 0.5), (0.0, 1.0), (3.0, 0.25)]
    cases += [(2.0, 0.01 * (k + 1)) for k in range(fusedclip.dispatch.STEPS + 2)]  # more than a table keeps
    for step, (norm_type, max_norm) in enumerate(cases):
        for p in params:  # new values in the same tensors
            p.grad.copy_(torch.randn(p.grad.shape, generator=gen, dtype=torch.float64))
        originals = [p.grad.clone() for p in params]
        total = fusedclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend)
        assert_total_close(total, ref_total_norm(originals, norm_type), acc_of(originals), what=f"call {step} total",
                           all_fp64=False)
        coef = min(1.0, max_norm / (total.item() + 1e-6))
        for i, (p, o) in enumerate(zip(params, originals)):
            assert_scaled(p.grad, o, coef, what=f"call {step}, gradient {i}")
        grads = [p.grad for p in params]
        assert_total_close(fusedclip.get_total_norm(grads, norm_type, backend=backend),
                           ref_total_norm(grads, norm_type), acc_of(grads), what=f"call {step} get_total_norm",
                           all_fp64=False)
        value = 0.02 * (step % 4 + 1)
        before = [p.grad.clone() for p in params]
        fusedclip.clip_grad_value_(params, value, backend=backend)
        for p, o in zip(params, before):
            assert torch.equal(p.grad, o.clamp(-value, value))
    assert fastpath.stats.hits >= 3 * (len(cases) - 1)
    steps = _kept_steps()
    if backend == "torch":
        assert not steps  # the torch backend reads tensors: its kept plans are made per call, with no steps
    else:
        assert steps and all(0 < len(t) <= fusedclip.dispatch.STEPS for t in steps)


@pytest.mark.skipif(not STAND_IN, reason="the cuda backend runs here: its own tests cover it")
def test_cuda_backend_kept_plans_launch_from_the_tables_alone(check, monkeypatch):
    """Issue 25 item 2: the cuda backend reads its plan only when the planned_* ops are there, so a kept plan's
    calls take the tables alone (no tensor list to build and convert per call) and prepare their calls as the
    Triton backend does; the first call over a list takes the checked ops with its tensors. Ops are stand-ins."""
    from fusedclip.backends import cuda_backend

    ops = install_cuda_stand_in(monkeypatch)
    assert backends.select("cuda", torch.device("cpu")).reads_plan_only
    params = params_with_grads(new_grads(17, "cpu", seed=70))
    clip = lambda ps, **kw: fusedclip.clip_grad_norm_(ps, 0.5, backend="cuda", **kw)  # noqa: E731
    assert_clip_matches_torch(params, 0.5, clip)
    assert ops.calls == ["norm_and_coef", "scale"]
    for kwargs, want in [({}, ["planned_norm", "planned_scale"]), ({}, ["planned_norm", "planned_scale"]),
                         ({"error_if_nonfinite": True}, ["planned_norm", "planned_scale"])]:
        ops.calls.clear()
        assert_clip_matches_torch(params, 0.5, lambda ps: clip(ps, **kwargs))
        assert ops.calls == want, kwargs
    (entry,) = _kept_entries()
    assert set(entry.plans) == {None} and ("clip_norm", 2.0, 0.5) in entry.plans[None].steps
    ops.calls.clear()
    before = [p.grad.clone() for p in params]
    fusedclip.clip_grad_value_(params, 1e-3, backend="cuda")
    fusedclip.clip_grads_with_norm_(params, 0.5, torch.tensor(4.0), backend="cuda")
    coef = torch.clamp(torch.tensor(0.5) / (torch.tensor(4.0) + 1e-6), max=1.0).item()
    for p, b in zip(params, before):
        assert_scaled(p.grad, b.clamp(-1e-3, 1e-3), coef)
    assert ops.calls == ["planned_clamp", "planned_scale"]
    grads = [p.grad for p in params]
    for _ in range(2):
        ops.calls.clear()
        total, norms = fusedclip.multi_tensor_norm(grads, backend="cuda", per_tensor=True)
        assert_total_of(total, grads)
        for g, n in zip(grads, norms.tolist()):
            assert math.isclose(n, ref_total_norm([g], 2.0), rel_tol=1e-5)
    assert ops.calls == ["planned_norm"]  # per-tensor norms of a kept plan: the tables alone too
    monkeypatch.setattr(cuda_backend, "_ops", types.SimpleNamespace(**{k: v for k, v in vars(ops).items()
                                                                         if not k.startswith("planned_")}))
    assert not cuda_backend.CudaBackend().reads_plan_only  # an extension built before the planned_* ops


def _kept_entries() -> list:
    return [e for bucket in fastpath._buckets.values() for e in bucket]


def _clips_from_stand_in_streams(monkeypatch, backend: str, streams: list[str], seed: int) -> list[str]:
    """One clip_grad_norm_ over the same parameters from each of `streams` in turn (stand-ins: plan.stream_of and
    fastpath.stream_of replaced), new seeded gradient values each time, checked against torch; returns the stream
    of every before_use (a wait for the tables)."""
    from fusedclip.backends import plan as plan_module

    stream = [streams[0]]
    for module in (plan_module, fastpath):
        monkeypatch.setattr(module, "stream_of", lambda device: stream[0])
    waits = []
    real_before_use = plan_module.PackedTables.before_use
    monkeypatch.setattr(plan_module.PackedTables, "before_use", lambda packed: waits.append(stream[0]) or
                        real_before_use(packed))
    params = params_with_grads(new_grads(13, "cpu", seed=seed))
    gen = torch.Generator().manual_seed(seed + 1)
    for name in streams:
        stream[0] = name
        for p in params:
            p.grad.copy_(torch.randn(p.grad.shape, generator=gen, dtype=torch.float64))
        assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend=backend))
    return waits


def test_kept_plans_prepare_their_calls_per_stream(check, monkeypatch):
    """A kept plan's prepared calls bind scratch (ticket, partials, coefficient): calls from two streams get a plan
    and prepared calls each, bound to that stream's scratch (DevicePlan.scratch), so that they never share a
    ticket; each stream's first call waits for the tables (before_use), later ones do not ask again. Streams are
    stand-ins (plan.stream_of replaced); the totals and gradients are checked."""
    triton_backend = _triton_or_skip()
    waits = _clips_from_stand_in_streams(monkeypatch, "triton", ["A", "A", "B", "B", "A", "B"], seed=60)
    (entry,) = _kept_entries()
    assert set(entry.plans) == {"A", "B"} and fastpath.stats.hits == 5
    device_plan = entry.device_plan
    assert set(device_plan.scratches) == {"A", "B"}
    assert device_plan.scratches["B"].ticket.data_ptr() != device_plan.scratches["A"].ticket.data_ptr()
    assert waits == ["A", "B"]  # once per stream, at its first kept call
    assert isinstance(triton_backend.load(), triton_backend.TritonBackend)


@pytest.mark.skipif(not STAND_IN, reason="the cuda backend runs here: its own tests cover it")
def test_kept_plans_of_the_cuda_backend_are_one_for_all_streams(check, monkeypatch):
    """The cuda backend's prepared calls bind no stream's state (its ops allocate their scratch per call on the
    current stream: prepares_per_stream False), so calls from several streams share one kept plan and its prepared
    calls, keyed None; every kept call still makes its stream wait for the tables (before_use, which is a set test
    on a stream that already did). Triton's are per stream (the test above). Ops and streams are stand-ins."""
    ops = install_cuda_stand_in(monkeypatch)
    waits = _clips_from_stand_in_streams(monkeypatch, "cuda", ["A", "A", "B", "B", "A"], seed=64)
    (entry,) = _kept_entries()
    assert set(entry.plans) == {None} and fastpath.stats.hits == 4
    assert ops.calls[-2:] == ["planned_norm", "planned_scale"]
    assert entry.plans[None].steps and entry.device_plan.tickets == {} and entry.device_plan.scratches == {}
    assert waits[-4:] == ["A", "B", "B", "A"]  # every kept call, from whichever stream
    assert not backends.select("cuda", torch.device("cpu")).prepares_per_stream


def test_a_kept_plan_of_a_backend_that_reads_tensors_waits_for_its_tables(check, monkeypatch):
    """A kept device plan handed to a backend that is called with the tensors (reads_plan_only False) is made ready
    for the current stream on every hit, as one found in the plan cache is (before_use: wait for the tables' copy
    and record the stream on their buffer), not only the plans of backends that read the plan alone."""
    triton_backend = _triton_or_skip()
    from fusedclip.backends import plan as plan_module

    monkeypatch.setattr(triton_backend.load(), "reads_plan_only", False)
    calls = []
    real_before_use = plan_module.PackedTables.before_use
    monkeypatch.setattr(plan_module.PackedTables, "before_use", lambda packed: calls.append(packed) or
                        real_before_use(packed))
    params = params_with_grads(new_grads(10, "cpu", seed=62))
    for _ in range(4):
        assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend="triton"))
    (entry,) = _kept_entries()
    assert fastpath.stats.hits == 3 and len([c for c in calls if c is entry.device_plan.packed]) == 3
    assert entry.plans is None  # (a plan per call, with the call's tensors)


def test_a_returned_total_is_not_overwritten_by_later_calls(backend_device, check):
    """Prepared calls keep their scratch (the clip coefficient) with the plan, never what they return: a total kept
    from one step still holds that step's value after more steps over other values."""
    backend, device = backend_device
    params = params_with_grads(new_grads(11, device, seed=14))
    gen = torch.Generator().manual_seed(15)
    kept = []
    for step in range(4):
        for p in params:
            p.grad.copy_(torch.randn(p.grad.shape, generator=gen, dtype=torch.float64) * (step + 1))
        grads = [p.grad.clone() for p in params]
        norm = fusedclip.multi_tensor_norm([p.grad for p in params], backend=backend)
        total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
        kept.append((norm, total, ref_total_norm(grads, 2.0), acc_of(grads)))
    for step, (norm, total, ref, acc) in enumerate(kept):
        assert_total_close(norm, ref, acc, what=f"step {step} multi_tensor_norm", all_fp64=False)
        assert_total_close(total, ref, acc, what=f"step {step} clip_grad_norm_", all_fp64=False)
    assert len({id(t) for _, t, _, _ in kept}) == len(kept)


def test_a_prepared_launch_keys_another_specialisation_afresh(check, monkeypatch):
    """A prepared launch's key is worked out once, from its first arguments: a varying argument that Triton would
    specialise otherwise (here a coefficient 4 bytes off 16-byte alignment) takes the full launch path and gets its
    own key; one like the first reuses the prepared key."""
    triton_backend = _triton_or_skip()
    from fusedclip.triton_kernels import launch, scale

    buf = torch.zeros(8, dtype=torch.float32)
    meta = torch.zeros(3, 1, dtype=torch.int64)
    tables = (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int64))
    monkeypatch.setattr(scale._SCALE, "stubs", {})  # (the session's other launches left theirs)
    with triton_backend.stubbed_launches():
        prepared = scale._SCALE.prepare((1,), (meta, *tables, buf[:1], 1, False, 64, 64, 256), 4, varying=(3,))
        prepared(buf[4:5])
        assert set(scale._SCALE.stubs) == {prepared.tail}
        prepared(buf[1:2])  # misaligned: Launcher.__call__ keys it
        assert len(scale._SCALE.stubs) == 2
        assert launch.spec(buf[1:2]) != launch.spec(buf[:1])


def test_grad_clipper_keeps_its_own_parameter_list(backend_device, check):
    """The API reads a caller's list without copying it; GradClipper, which keeps the list between calls, keeps a
    copy: a parameter the caller appends later is not clipped by it."""
    backend, device = backend_device
    params = params_with_grads(new_grads(9, device, seed=16))
    clipper = fusedclip.GradClipper(params, 0.5, backend=backend)
    extra = params_with_grads(new_grads(1, device, seed=17))[0]
    params.append(extra)
    before = extra.grad.clone()
    assert_clip_matches_torch(params[:-1], 0.5, lambda ps: clipper())
    assert torch.equal(extra.grad, before)
    assert len(clipper.parameters) == 9


def test_grad_clipper_steady_state_leaves_grad_mode_alone(backend_device, check):
    """GradClipper's prepared steady-state call runs without entering no_grad (it only launches kernels): under grad
    mode it still returns a total that autograd does not track, leaves grad mode as it was, and clips as torch does."""
    backend, device = backend_device
    params = params_with_grads(new_grads(13, device, seed=18))
    clipper = fusedclip.GradClipper(params, 0.5, backend=backend)
    for step in range(3):
        with torch.enable_grad():
            totals = []
            assert_clip_matches_torch(params, 0.5, lambda ps: totals.append(clipper()) or totals[-1])
            assert torch.is_grad_enabled()
        assert not totals[0].requires_grad and totals[0].grad_fn is None
    assert fastpath.stats.hits >= 2


def test_two_grad_clippers_on_overlapping_parameters(backend_device, check):
    """Two lists of the same length sharing parameters: each keeps its own plan and both stay right."""
    backend, device = backend_device
    params = params_with_grads(new_grads(30, device, seed=11))
    a, b = params[:20], params[10:]
    ca = fusedclip.GradClipper(a, 0.7, backend=backend)
    cb = fusedclip.GradClipper(b, 0.4, backend=backend)
    for step in range(3):
        assert_clip_matches_torch(a, 0.7, lambda ps: ca())
        assert_clip_matches_torch(b, 0.4, lambda ps: cb())
    assert fastpath.stats.hits >= 4


def test_eviction_of_kept_plans_and_of_the_backends_plan_cache(backend_device, check):
    """More same-length lists than a bucket keeps: the oldest is forgotten and rebuilt on its next call. And a kept
    plan whose device plan left the backend's cache still reads the right tables (it holds them)."""
    backend, device = backend_device
    lists = [params_with_grads(new_grads(6, device, seed=20 + i)) for i in range(fastpath.PER_BUCKET + 1)]
    clip = lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend=backend)  # noqa: E731
    for ps in lists:
        assert_clip_matches_torch(ps, 0.5, clip)
    h, m = hits_misses()
    assert_clip_matches_torch(lists[0], 0.5, clip)  # evicted from its bucket: a miss
    assert hits_misses() == (h, m + 1)
    assert_clip_matches_torch(lists[-1], 0.5, clip)
    assert hits_misses() == (h + 1, m + 1)
    b = fusedclip.backends.select(backend, torch.device(device))
    if hasattr(b, "cache"):
        b.cache.clear()
    assert_clip_matches_torch(lists[-1], 0.5, clip)
    assert hits_misses() == (h + 2, m + 1)


def test_aliasing_is_never_kept_and_keeps_its_warning(backend_device, check):
    """A parameter listed twice, or two parameters sharing one gradient: scaled twice as torch does, warned at every
    call, never kept."""
    backend, device = backend_device
    params = params_with_grads(new_grads(8, device, seed=30))
    shared = torch.nn.Parameter(torch.empty_like(params[2]))
    shared.grad = params[2].grad
    for twice in (params[5], shared):
        listed = params + [twice]
        for _ in range(2):
            stock = params_with_grads([p.grad.clone() for p in params])
            stock_twice = stock[5]
            if twice is shared:
                stock_twice = torch.nn.Parameter(torch.empty_like(stock[2]))
                stock_twice.grad = stock[2].grad
            stock_list = stock + [stock_twice]
            want = torch.nn.utils.clip_grad_norm_(stock_list, 0.3)
            with pytest.warns(UserWarning, match="scaled twice"):
                got = fusedclip.clip_grad_norm_(listed, 0.3, backend=backend)
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=0)
            for p, s in zip(listed, stock_list):
                torch.testing.assert_close(p.grad.double(), s.grad.double(), rtol=1e-5, atol=1e-7)
    assert len(fastpath._buckets) == 0, "an aliased list must never be kept"


def test_grad_clipper_warns_once_for_a_parameter_listed_twice(backend_device, check):
    backend, device = backend_device
    params = params_with_grads(new_grads(6, device, seed=31))
    with pytest.warns(UserWarning, match=r"parameters\[6\] is parameters\[1\] again"):
        clipper = fusedclip.GradClipper(params + [params[1]], 0.5, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper()  # said once, at construction
        clipper()
    shared = torch.nn.Parameter(torch.empty_like(params[0]))
    shared.grad = params[0].grad
    clipper = fusedclip.GradClipper(params + [shared], 0.5, backend=backend)
    with pytest.warns(UserWarning, match="same tensor"):  # distinct parameters sharing a gradient: at each call
        clipper()


@pytest.mark.parametrize("case", ["error_if_nonfinite", "sparse", "non_leaf", "generator", "tuple"])
def test_other_inputs_keep_their_general_path_behaviour(backend_device, check, case):
    backend, device = backend_device
    params = params_with_grads(new_grads(7, device, seed=40))
    if case == "error_if_nonfinite":
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend, error_if_nonfinite=True)
        fusedclip.clip_grad_norm_(params, 1.0, backend=backend, error_if_nonfinite=True)
        assert fastpath.stats.hits == 1
        params[2].grad[0] = math.inf
        with pytest.raises(RuntimeError, match="non-finite"):
            fusedclip.clip_grad_norm_(params, 1.0, backend=backend, error_if_nonfinite=True)
    elif case == "sparse":
        sp = torch.nn.Parameter(torch.zeros(5, 3, device=device))
        sp.grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(41)).to(device).to_sparse()
        listed = params + [sp]
        for _ in range(2):
            dense = [p.grad.to_dense() for p in listed]
            assert_total_of(fusedclip.clip_grad_norm_(listed, 1e9, backend=backend), dense)
        assert fastpath.stats.kept == 0
    elif case == "non_leaf":
        leaf = torch.randn(4, requires_grad=True)
        nonleaf = (leaf * 2).to(device)
        nonleaf.retain_grad()
        nonleaf.sum().backward()
        listed = params + [nonleaf]
        for _ in range(2):
            assert_clip_matches_torch(listed, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend=backend))
    elif case == "generator":
        module = torch.nn.ParameterList(params)
        for _ in range(2):
            assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(module.parameters(), 0.5,
                                                                                        backend=backend))
        assert fastpath.stats.hits == 1  # model.parameters() is consumed into a list, then checked like one
    else:
        for _ in range(2):
            assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(tuple(ps), 0.5,
                                                                                        backend=backend))
        assert fastpath.stats.hits == 1


def test_an_empty_generator_still_warns_every_call(check):
    for _ in range(2):
        with pytest.warns(UserWarning, match="empty generator"):
            fusedclip.clip_grad_norm_((p for p in []), 1.0)


def test_a_different_backend_is_not_served_by_a_kept_plan(check, monkeypatch):
    """FUSEDCLIP_BACKEND (the default for backend=None) changes which backend a call gets: the kept plan of another
    backend is not used."""
    if "triton" not in fusedclip.available_backends() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton backend on CPU (its interpreter)")
    params = params_with_grads(new_grads(5, "cpu", seed=50))
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "triton")
    fusedclip.clip_grad_norm_(params, 1.0)
    monkeypatch.setenv("FUSEDCLIP_BACKEND", "torch")
    h = fastpath.stats.hits
    assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5))
    assert fastpath.stats.hits == h


# ---- the two checks agree --------------------------------------------------------------------------------------


@pytest.mark.skipif(fastpath.CppSignatures is None, reason="fusedclip._host is not built")
@pytest.mark.parametrize("at", [0, 3, 8, 20, 36])
def test_long_lists_a_change_anywhere_is_seen_by_both_checks(at):
    """The C++ walk resolves elements ahead of the one it compares (prefetching): a change at any position of a long
    list, the first, around the look-ahead distance and the last included, fails both checks, and an unchanged list
    gives back exactly its gradients in order."""
    g = torch.Generator().manual_seed(61 + at)
    params = params_with_grads([torch.randn(int(n), generator=g) for n in torch.randint(1, 50, (37,), generator=g)])
    params[11].grad = None  # an absent gradient in the middle stays absent
    c, p = fastpath.CppSignatures(params, True), fastpath.PySignatures(params, True)
    assert c.eligible and p.eligible and c.present == p.present == 36
    want = [q.grad for q in params if q.grad is not None]
    for sig in (c, p):
        got = sig.collect(params)
        assert got is not None and len(got) == 36 and all(a is b for a, b in zip(got, want))
    i = at if at != 11 else 12
    victim, old = params[i], params[i].grad

    def with_grad(grad):  # a parameter of the gradient's shape in place of the victim (torch refuses other shapes)
        q = torch.nn.Parameter(torch.empty_like(grad))
        q.grad = grad
        return params[:i] + [q] + params[i + 1:]

    changes = {
        "moved": lambda: with_grad(old.clone()),
        "set to None": lambda: params[:i] + [torch.nn.Parameter(old.clone())] + params[i + 1:],
        "resized": lambda: with_grad(torch.randn(old.numel() + 1, generator=g)),
        "re-typed": lambda: with_grad(old.double()),
        "non-contiguous": lambda: with_grad(torch.randn(2, old.numel(), generator=g).t()[:, 0]),
    }
    for name, make in changes.items():
        changed = make()
        assert not c.matches(changed) and not p.matches(changed), name
        assert c.collect(changed) is None and p.collect(changed) is None, name
    victim.grad = old.clone()  # the same parameter, its gradient moved
    assert not c.matches(params) and not p.matches(params)
    victim.grad = old
    assert c.matches(params) and p.matches(params)
    params_with_a_stranger = params[:at] + [3.0] + params[at + 1:]
    assert not c.matches(params_with_a_stranger) and not p.matches(params_with_a_stranger)
    params[11].grad = torch.randn(params[11].shape, generator=g)  # a gradient appears where there was none
    assert not c.matches(params) and not p.matches(params)


@pytest.mark.skipif(fastpath.CppSignatures is None, reason="fusedclip._host is not built")
def test_the_cpp_and_python_checks_decide_alike():
    g = torch.Generator().manual_seed(60)
    base = [torch.randn(n, generator=g) for n in (3, 1, 8)]
    cases = {
        "tensors": (base, False),
        "with None": ([base[0], None, base[2]], False),
        "non-contiguous": ([base[0], torch.randn(4, 4, generator=g).t()], False),
        "zero-size": ([base[0], torch.empty(0)], False),
        "int": ([torch.arange(3)], False),
        "negative view": ([base[0], base[1].neg().resolve_neg()._neg_view()], False),
        "same address": ([base[0], base[0][:2]], False),
        "not a tensor": ([base[0], 3.0], False),
        "sparse": ([torch.randn(3, 3, generator=g).to_sparse()], False),
        "meta": ([base[0], torch.empty(3, device="meta")], False),
        "complex": ([base[0], base[1], torch.randn(2, generator=g, dtype=torch.complex64)], False),
    }
    params = params_with_grads([b.clone() for b in base])
    params.append(torch.nn.Parameter(torch.randn(2, generator=g)))
    cases["params"] = (params, True)
    cases["param list with a tensor"] = (params + [None], True)
    non_leaf = params[1] * 2  # reading its .grad would warn: the general path's business
    cases["param list with a non-leaf"] = (params[:2] + [non_leaf], True)
    cases["param with a bad grad"] = (params[:1] + params_with_grads([torch.randn(4, 4, generator=g).t()]), True)
    for name, (items, grads) in cases.items():
        c, p = fastpath.CppSignatures(items, grads), fastpath.PySignatures(items, grads)
        assert c.eligible == p.eligible, name
        if not c.eligible:  # both name the same element first (in their own words)
            assert re.findall(r"\d+", c.why_not)[:1] == re.findall(r"\d+", p.why_not)[:1], (name, c.why_not, p.why_not)
        assert c.matches(items) == p.matches(items) == c.eligible, name
        if c.eligible:
            assert (c.present, len(c)) == (p.present, len(p)), name
            got_c, got_p = c.collect(items), p.collect(items)
            assert [t.data_ptr() for t in got_c] == [t.data_ptr() for t in got_p], name


def test_the_loader_says_why_the_extension_is_not_used(monkeypatch):
    real = backends.importlib.import_module

    def missing(name, *args):
        if name == "fusedclip._host":
            raise ModuleNotFoundError("No module named 'fusedclip._host'", name=name)
        return real(name, *args)

    monkeypatch.delenv(backends.ENV_NO_HOST_EXT, raising=False)
    monkeypatch.setattr(backends.importlib, "import_module", missing)
    module, why = backends.load_host_extension()
    assert module is None and why.startswith("Python (the host extension fusedclip._host is not built")

    class OtherTorch:
        TORCH_VERSION = "1.0.0"
        Signatures = object

    monkeypatch.setattr(backends.importlib, "import_module", lambda name, *a: OtherTorch)
    module, why = backends.load_host_extension()
    assert module is None and "built against torch 1.0.0" in why
    monkeypatch.setenv(backends.ENV_NO_HOST_EXT, "1")
    assert backends.load_host_extension() == (None, "Python (FUSEDCLIP_NO_HOST_EXT=1 is set)")


def test_the_fast_path_runs_with_the_extension_disabled():
    """FUSEDCLIP_NO_HOST_EXT=1 (read at import): the Python check, and a subset of this file passes under it."""
    env = dict(os.environ, FUSEDCLIP_NO_HOST_EXT="1")
    out = subprocess.run(
        [sys.executable, "-c", "from fusedclip import fastpath; print(fastpath.describe())"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert "FUSEDCLIP_NO_HOST_EXT=1" in out.stdout
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)), "-k",
         "repeated_call or changed_gradient and moved or aliasing"],
        env=env, capture_output=True, text=True, cwd=ROOT / "tests",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


# ---- the host benchmark ------------------------------------------------------------------------------------------


def test_host_benchmark_smoke(tmp_path):
    """A tiny run of `python -m fusedclip bench --host`: it runs, writes a valid record, and the kernel backend's
    steady-state calls took the fast path (no timings are asserted)."""
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the stubbed launches need none
    run = subprocess.run(
        [sys.executable, "-m", "fusedclip", "bench", "--host", "--tensors", "20", "--reps", "3", "--warmup", "1",
         "--out", str(out)],
        env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["kind"] == "host" and record["settings"]["sizes"] == [20]
    rows = record["results"]
    assert {r["mode"] for r in rows} == {"kept", "fresh", "moved"}
    impls = {r["impl"] for r in rows}
    assert "stock torch" in impls and "fusedclip torch" in impls
    for r in rows:
        assert r["calls"] == 3 and r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"]
        if r["impl"] == "stock torch":
            continue
        assert r["ratio_to_stock"] is not None
        if r["mode"] in ("kept", "fresh"):
            assert r["fast_path_hit_rate"] == 1.0, r
        else:
            assert r["fast_path_hit_rate"] == 0.0, r
    # The modes' meaning, on whatever device ran it (a GPU's caching allocator for `fresh` there): fresh gradients
    # at the old addresses, moved ones never.
    assert all(r["address_reuse"] == {"fresh": 1.0, "moved": 0.0}[r["mode"]] for r in rows if r["mode"] != "kept")
    from fusedclip.bench import markdown_host_table

    table = markdown_host_table([("host.json", record)])
    assert "| 20 | kept | GradClipper | " in table and "| 20 | moved | clip_grad_value_ | " in table


def _host_set_addresses_per_mode(device: str) -> None:
    """HostSet's modes mean the same on every device: `fresh` makes new gradient tensors at the addresses the old
    ones had, `moved` at addresses no earlier call had (over more calls than any plan cache holds); the values are
    the parameter set's own either way."""
    from fusedclip.backends.plan import CACHE_SIZE
    from fusedclip.bench import HostSet

    state = HostSet(9, 3, torch.float32, torch.device(device), seed=0)
    masters = [m.clone() for m in state.masters]
    for _ in range(3):
        before, old = state.addresses(), [weakref.ref(g) for g in state.grads]
        state.new_grads("fresh")
        assert state.addresses() == before
        assert all(r() is None for r in old), "fresh gradients are new tensors (set_to_none, then made anew)"
        assert all(p.grad is g for p, g in zip(state.params, state.grads))
    seen = [state.addresses()]
    for _ in range(CACHE_SIZE + 8):
        state.new_grads("moved")
        now = state.addresses()
        assert len(set(now)) == len(now)
        assert all(a != b for earlier in seen for a, b in zip(now, earlier)), "a gradient came back to an old address"
        seen.append(now)
        assert all(torch.equal(g, m) for g, m in zip(state.grads, masters))


def test_host_benchmark_modes_put_gradients_where_they_say(monkeypatch):
    _host_set_addresses_per_mode("cpu")
    from fusedclip.bench import HostSet

    monkeypatch.setattr(HostSet, "ARENA_SPARE", 2)  # a new arena every other call: made while the old one lives
    state = HostSet(5, 7, torch.float32, torch.device("cpu"), seed=3)
    for _ in range(6):
        before = state.addresses()
        state.new_grads("moved")
        assert all(a != b for a, b in zip(state.addresses(), before))


@pytest.mark.gpu
def test_gpu_host_benchmark_modes_put_gradients_where_they_say():
    """The same on a GPU (the benchmark's CUDA records: `bench --host` there)."""
    _host_set_addresses_per_mode("cuda")


# ---- the torch backend's clamp on CPU ----------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [None, True, False])
def test_torch_backend_clamp_on_cpu_matches_torch(check, foreach):
    """Small tensors go through two foreach passes, large ones one pass each: the same values as stock torch's
    clip_grad_value_, NaN and inf included, for every dtype."""
    gen = torch.Generator().manual_seed(70)
    sizes = [1, 7, 300, 1 << 16, 3, (1 << 16) + 5, 2]
    dtypes = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
    grads = [(torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtypes[i % 4]) for i, n in enumerate(sizes)]
    grads[1][2] = math.nan
    grads[3][5] = -math.inf
    ours = params_with_grads(grads)
    for bound in (1.25, 0.5, 0.125):  # the general path, then the kept plan (with what it learnt) twice
        stock = params_with_grads([g.clone() for g in grads])
        torch.nn.utils.clip_grad_value_(stock, bound, foreach=foreach)
        fusedclip.clip_grad_value_(ours, bound, foreach=foreach, backend="torch")
        for i, (p, s) in enumerate(zip(ours, stock)):
            torch.testing.assert_close(p.grad, s.grad, rtol=0, atol=0, equal_nan=True, msg=f"gradient {i}")
    small = params_with_grads([g[:100].clone() * 4 for g in grads])  # every tensor small: all to the foreach passes
    for bound in (1.0, 0.25):
        stock = params_with_grads([p.grad.clone() for p in small])
        torch.nn.utils.clip_grad_value_(stock, bound, foreach=foreach)
        fusedclip.clip_grad_value_(small, bound, foreach=foreach, backend="torch")
        for i, (p, s) in enumerate(zip(small, stock)):
            torch.testing.assert_close(p.grad, s.grad, rtol=0, atol=0, equal_nan=True, msg=f"gradient {i}")
    assert fastpath.stats.hits >= 3


@pytest.mark.parametrize("foreach", [None, False])
def test_torch_backend_clamp_learns_when_every_tensor_takes_the_foreach_passes(foreach):
    """TorchPlan.all_foreach, the decision a kept plan reuses, is True exactly when the call sent every tensor to the
    two foreach passes: all dense, foreach allowed, none past the CPU one-pass size."""
    from fusedclip.backends import torch_backend

    gen = torch.Generator().manual_seed(71)
    backend = torch_backend.with_foreach(foreach)
    small = [torch.randn(n, generator=gen) for n in (3, 100, 7)]
    mixed = small + [torch.randn((1 << 16) + 1, generator=gen)]
    sparse = small + [torch.randn(4, 4, generator=gen).to_sparse().coalesce()]
    for tensors, expected in ((small, foreach is not False), (mixed, False), (sparse, False), ([], False)):
        plan = backend.plan(tensors)
        backend.clamp_(tensors, 0.5, plan)
        assert plan.all_foreach is expected, (len(tensors), foreach)


# ---- the Triton launchers: no-op mode (CPU) and the direct launch of a compiled kernel (GPU) ----------------------


def _triton_or_skip():
    if "triton" not in fusedclip.available_backends():
        pytest.skip("triton is not available")
    from fusedclip.backends import triton_backend

    triton_backend.load()
    return triton_backend


def test_stubbed_launches_do_the_host_work_and_no_kernel(check):
    """In stubbed_launches() every launch is a no-op after its host work: the Triton backend takes CPU tensors,
    keys each launch as a real one would be keyed, and leaves every gradient untouched. After the block the same
    calls run for real (the interpreter here) and clip as torch does."""
    triton_backend = _triton_or_skip()
    from fusedclip.triton_kernels import clamp, launch, multi_tensor_norm, scale

    params = params_with_grads(new_grads(9, "cpu", seed=80))
    before = [p.grad.clone() for p in params]
    launchers = [multi_tensor_norm._REDUCE, multi_tensor_norm._FINALIZE, scale._SCALE, clamp._CLAMP]
    stubs = [len(x.stubs) for x in launchers]
    with triton_backend.stubbed_launches():
        assert launch.is_stubbed()
        for _ in range(2):
            fusedclip.clip_grad_norm_(params, 1e-3, backend="triton")
            fusedclip.clip_grad_value_(params, 1e-3, backend="triton")
        assert fastpath.stats.hits == 3  # clip_grad_value_ shares the plan clip_grad_norm_ kept for this list
    assert not launch.is_stubbed()
    assert all(len(x.stubs) >= n for x, n in zip(launchers, stubs)) and any(x.stubs for x in launchers)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b), "a stubbed launch ran a kernel"
    if os.environ.get("TRITON_INTERPRET") == "1":
        fastpath.clear()
        assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend="triton"))


def test_launch_keys_separate_what_triton_specialises_on():
    """Launcher.key_tail is never coarser than Triton's own specialisation: tensors by dtype and 16-byte alignment, ints
    by width, ==1 and %16, constexprs by value."""
    _triton_or_skip()
    from fusedclip.triton_kernels import launch, scale

    buf = torch.zeros(64, dtype=torch.float32)
    assert launch.spec(buf) != launch.spec(buf[1:])  # 4-byte offset: not 16-byte aligned
    assert launch.spec(buf) != launch.spec(buf.double())
    assert launch.spec(buf[4:]) == launch.spec(buf)
    specs = [launch.spec(n) for n in (1, 2, 16, 32, 2**31, 2**63)]
    assert specs[0] != specs[1] and specs[2] != specs[1] and specs[2] == specs[3]
    assert specs[4][0] == "i64" and specs[5][0] == "u64" and specs[1][0] == "i32"
    assert launch.spec(True) != launch.spec(1)
    s = scale._SCALE
    args = [0] * len(s.constexpr)
    other = list(args)
    k = s.constexpr.index(True)
    other[k] = 7  # a constexpr: by value
    assert s.key_tail(4, tuple(args)) != s.key_tail(4, tuple(other))
    assert s.key_tail(4, tuple(args)) != s.key_tail(8, tuple(args))  # num_warps


@pytest.mark.gpu
def test_gpu_launchers_call_the_compiled_kernel_directly_and_match_torch():
    """After the first launch of a specialisation (through JITFunction.run), later launches call the compiled kernel
    directly; the results stay torch's, for clip_grad_norm_ (reduce, finalize, scale) and clip_grad_value_."""
    _triton_or_skip()
    from fusedclip.triton_kernels import clamp, multi_tensor_norm, scale

    launchers = [multi_tensor_norm._REDUCE, multi_tensor_norm._FINALIZE, scale._SCALE, clamp._CLAMP]
    params = params_with_grads(new_grads(40, "cuda", seed=81))
    direct = [x.direct for x in launchers]
    for _ in range(3):
        assert_clip_matches_torch(params, 0.5, lambda ps: fusedclip.clip_grad_norm_(ps, 0.5, backend="triton"))
        originals = [p.grad.clone() for p in params]
        fusedclip.clip_grad_value_(params, 1e-3, backend="triton")
        for p, o in zip(params, originals):
            assert torch.equal(p.grad, o.clamp(-1e-3, 1e-3))
    assert all(x.direct > d for x, d in zip(launchers, direct)), "no launch took the direct path"
    assert fastpath.stats.hits >= 4
