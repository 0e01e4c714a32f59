"""Compiles every public fusedclip entry point with torch.compile(fullgraph=True) and the default (inductor)
backend in a fresh process, and checks the compiled results. Run by tests/test_compile.py in a subprocess:

    python tests/compile_worker.py --device cpu [CHECK ...]

It prints one line per check, ``COMPILE_CHECK {"name": ..., "ok": ..., "error": ..., "skipped": ..., ...}``
(`skipped`: why a check cannot run here, e.g. the Triton backend on CPU without its interpreter).

Phase 1 runs the compiled calls of every check before anything calls fusedclip eagerly, so each entry point is
traced on its first call, with nothing loaded or cached by an eager call (each check compiles its own fresh
function); later steps re-create the gradients (as ``zero_grad(set_to_none=True)`` and backward do) under
``error_on_recompile``. Phase 2 computes the references (float64 of the stored values, stock torch, fusedclip
eager) and compares.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from functools import partial

import torch

import fusedclip
from reference import (
    TOTAL_RTOL,
    assert_scaled,
    assert_total_close,
    random_grads,
    random_tensor,
    ref_tensor_norm,
    ref_total_norm,
)

INF = float("inf")
DEVICE = "cpu"
COMPILE_BACKEND = "inductor"  # torch.compile's default; --backend aot_eager is quicker for debugging this file
STEPS = 3  # calls per compiled function: the first traces, the others must reuse its graph
CHECKS = {}

# Stock torch, as imported before any patch (the patch check restores it before phase 2 anyway).
STOCK = dict(fusedclip.patching.TORCH_ORIGINALS)


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def fullgraph(fn):
    return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)


def steps(call, regrad, snapshot, count=STEPS):
    """Run `call` `count` times; `regrad(step)` re-creates the gradients before each call (step 0: keeps them) and
    returns copies of them, `snapshot()` copies what the call changed. Every call after the first must reuse the
    first call's graph. Returns [(result, inputs, outputs)], one per step."""
    out = []
    for s in range(count):
        before = regrad(s)
        with torch._dynamo.config.patch(error_on_recompile=True) if s else contextlib.nullcontext():
            result = call()
        out.append((result, before, snapshot()))
    return out


def grad_sets():
    """Seeded gradients of odd sizes: float32, float64, and a bf16/fp16/fp32 mix."""
    return {  # few tensors: inductor's compile time grows with the number of tensors in a graph
        "fp32": random_grads(3, seed=1, device=DEVICE),
        "fp64": random_grads(2, (torch.float64,), seed=2, device=DEVICE),
        "mixed": random_grads(3, (torch.bfloat16, torch.float32, torch.float16), seed=3, device=DEVICE),
    }


def with_grads(grads):
    """Fresh parameters whose .grad are copies of `grads`."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def regrad(params, seed):
    """New gradients for a new step, new tensors as after zero_grad(set_to_none=True) + backward; returns copies."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = None
        p.grad = random_tensor(p.shape, p.dtype, DEVICE, gen, scale=float(torch.rand(1, generator=gen)) * 4 + 0.1)
    return [p.grad.clone() for p in params]


def current(params):
    return [p.grad.clone() for p in params]


def plain(grads):
    """Whether stock torch has our semantics for these inputs (float32 / float64 only: no bf16/fp16 total)."""
    return all(g.dtype in (torch.float32, torch.float64) for g in grads)


def acc_of(grads):
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def close_total(got, want, grads):
    rtol = TOTAL_RTOL[torch.float64 if all(g.dtype == torch.float64 for g in grads) else torch.float32]
    torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=rtol, atol=0, equal_nan=True)


def close_grads(got, want):
    for a, b in zip(got, want):
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(a, b, rtol=max(4 * eps, 2e-5), atol=torch.finfo(a.dtype).tiny, equal_nan=True)


def expect_total(total, tensors, p):
    """A total against the float64 reference of the stored values, in the accumulation dtype."""
    all_fp64 = all(t.dtype == torch.float64 for t in tensors)
    assert_total_close(total, ref_total_norm(tensors, p), acc_of(tensors), all_fp64=all_fp64)


def expect_clipped(before, after, total, p, max_norm):
    """The total against the float64 reference, every gradient scaled by torch's coefficient of that total."""
    expect_total(total, before, p)
    coef = min(max_norm / (total.item() + 1e-6), 1.0)
    for i, (a, b) in enumerate(zip(after, before)):
        assert_scaled(a, b, coef, f"gradient {i} (p={p}, max_norm={max_norm})")


def expect_clipped_per_tensor(before, after, norms, p, max_norm):
    """Per-tensor norms (float32) against float64, each gradient scaled by its own coefficient. For float64
    gradients the coefficient is computed from the float64 reference norm (the returned norms are rounded to
    float32; the kernels use the unrounded ones)."""
    want = torch.tensor([ref_tensor_norm(g, p) for g in before], dtype=torch.float64)
    torch.testing.assert_close(norms.double().cpu(), want, rtol=1e-5, atol=0)
    for i, (x, y, n, r) in enumerate(zip(after, before, norms.tolist(), want.tolist())):
        exact = y.dtype == torch.float64
        assert_scaled(x, y, min(max_norm / ((r if exact else n) + 1e-6), 1.0), f"gradient {i}", 4 if exact else None)


def regrad_cases(param_lists, seed):
    """regrad for steps(): step 0 keeps the gradients, later steps re-create every list's."""
    return lambda s: [regrad(ps, seed + 100 * s + k) if s else current(ps) for k, ps in enumerate(param_lists)]


def snapshot_cases(param_lists):
    return lambda: [current(ps) for ps in param_lists]


def new_inputs(tensor_lists, seed):
    """For out-of-place entry points: (regrad for steps(), the current step's inputs). Step 0 takes
    `tensor_lists`, later steps fresh tensors of the same kinds."""
    box = [[[t.clone() for t in ts] for ts in tensor_lists]]  # distinct tensors: dynamo guards on aliasing

    def regrad(s):
        if s:
            gen = torch.Generator().manual_seed(seed + s)
            box[0] = [[random_tensor(t.shape, t.dtype, DEVICE, gen) for t in ts] for ts in tensor_lists]
        return box[0]

    return regrad, lambda: box[0]


# ---- functions ---------------------------------------------------------------------------------------------

NORMS = {"fp32": [2.0, 1.0, INF, -INF, 0.0], "fp64": [2.0], "mixed": [2.0, 3.0]}


@check
def clip_grad_norm_():
    cases = []  # (parameters, norm_type, max_norm): every norm type and dtype set, clipping and coef == 1
    for name, grads in grad_sets().items():
        cases += [(with_grads(grads), p, 0.5 if i % 2 == 0 else 1e4) for i, p in enumerate(NORMS[name])]
    lists = [ps for ps, _, _ in cases]
    runs = steps(fullgraph(lambda: [fusedclip.clip_grad_norm_(ps, m, p) for ps, p, m in cases]),
                 regrad_cases(lists, 0), snapshot_cases(lists))
    yield
    for totals, befores, afters in runs:
        for (_, p, m), total, before, after in zip(cases, totals, befores, afters):
            expect_clipped(before, after, total, p, m)
            eager = with_grads(before)
            close_total(total, fusedclip.clip_grad_norm_(eager, m, p), before)
            close_grads(after, current(eager))
            if plain(before):
                stock = with_grads(before)
                close_total(total, STOCK["clip_grad_norm_"](stock, m, p), before)
                close_grads(after, current(stock))


@check
def clip_grad_norm_checked_arguments():
    """A tensor max_norm and error_if_nonfinite=True: checked by opaque ops when the graph runs, before any
    gradient is touched."""
    grads = grad_sets()["fp32"]
    a, b = with_grads(grads), with_grads(grads)
    with_max = fullgraph(lambda m: fusedclip.clip_grad_norm_(a, m))
    finite = fullgraph(lambda: fusedclip.clip_grad_norm_(b, 0.5, error_if_nonfinite=True))
    max_norm = torch.tensor(0.5)
    runs = steps(lambda: (with_max(max_norm), finite()), regrad_cases([a, b], 1000), snapshot_cases([a, b]))
    errors, kept = [], []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for fn, arg, ps in ((with_max, (torch.tensor(-1.0),), a), (finite, (), b)):
            if ps is b:
                ps[1].grad[0] = float("nan")
            before = current(ps)
            try:
                fn(*arg)
            except Exception as e:
                errors.append(e)
            kept.append((before, current(ps)))
    yield
    for (total_a, total_b), (before_a, before_b), (after_a, after_b) in runs:
        expect_clipped(before_a, after_a, total_a, 2.0, 0.5)
        expect_clipped(before_b, after_b, total_b, 2.0, 0.5)
    assert len(errors) == 2, errors
    assert "max_norm must be >= 0" in str(errors[0]), errors[0]
    assert "non-finite" in str(errors[1]), errors[1]
    for before, after in kept:
        for x, y in zip(before, after):
            assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())


@check
def get_total_norm():
    cases = [(grads, p) for name, grads in grad_sets().items() for p in NORMS[name]]
    fn = fullgraph(lambda gs: [fusedclip.get_total_norm(g, p, error_if_nonfinite=(i == 0))
                               for i, (g, (_, p)) in enumerate(zip(gs, cases))])
    regrad_inputs, now = new_inputs([g for g, _ in cases], 2000)
    runs = steps(lambda: fn(now()), regrad_inputs, lambda: None)
    yield
    for totals, gs, _ in runs:
        for total, g, (_, p) in zip(totals, gs, cases):
            expect_total(total, g, p)
            close_total(total, fusedclip.get_total_norm(g, p), g)
            if plain(g):
                close_total(total, STOCK["get_total_norm"](g, p), g)


@check
def clip_grads_with_norm_():
    sets = grad_sets()
    a, b = with_grads(sets["fp32"]), with_grads(sets["mixed"])
    fn = fullgraph(lambda t: (fusedclip.clip_grads_with_norm_(a, 1.0, t), fusedclip.clip_grads_with_norm_(b, 0.5, 9.0)))
    totals = []

    def call():
        # A tensor total as a caller would have it (stock torch's norm of the step's gradients).
        totals.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in a])))
        return fn(totals[-1])

    runs = steps(call, regrad_cases([a, b], 3000), snapshot_cases([a, b]))
    yield
    for t, (_, (before_a, before_b), (after_a, after_b)) in zip(totals, runs):
        for x, y in zip(after_a, before_a):
            assert_scaled(x, y, min(1.0 / (t.item() + 1e-6), 1.0))
        for x, y in zip(after_b, before_b):
            assert_scaled(x, y, min(0.5 / (9.0 + 1e-6), 1.0))
        stock = with_grads(before_a)
        STOCK["clip_grads_with_norm_"](stock, 1.0, t)
        close_grads(after_a, current(stock))


@check
def clip_grad_value_():
    sets = grad_sets()
    cases = [(with_grads(sets["fp32"]), 0.5), (with_grads(sets["mixed"]), 0.7), (with_grads(sets["fp64"]), 1e4)]
    lists = [ps for ps, _ in cases]
    runs = steps(fullgraph(lambda: [fusedclip.clip_grad_value_(ps, v) for ps, v in cases]), regrad_cases(lists, 4000),
                 snapshot_cases(lists))
    yield
    for _, befores, afters in runs:
        for (_, v), before, after in zip(cases, befores, afters):
            stock = with_grads(before)
            STOCK["clip_grad_value_"](stock, v)
            for x, y, z in zip(after, before, current(stock)):
                assert torch.equal(x, y.clamp(-v, v)) and torch.equal(x, z), "a clamp is exact"


@check
def clip_grad_norm_per_tensor_():
    sets = grad_sets()
    cases = [(with_grads(sets["fp32"]), 2.0, 1.0), (with_grads(sets["mixed"]), INF, 1.5),
             (with_grads(sets["fp64"]), 1.0, 1e4)]
    lists = [ps for ps, _, _ in cases]
    runs = steps(fullgraph(lambda: [fusedclip.clip_grad_norm_per_tensor_(ps, m, p) for ps, p, m in cases]),
                 regrad_cases(lists, 5000), snapshot_cases(lists))
    yield
    for norms_list, befores, afters in runs:
        for (_, p, m), norms, before, after in zip(cases, norms_list, befores, afters):
            assert norms.dtype == torch.float32 and norms.shape == (len(before),)
            expect_clipped_per_tensor(before, after, norms, p, m)
            eager = with_grads(before)
            torch.testing.assert_close(norms, fusedclip.clip_grad_norm_per_tensor_(eager, m, p), rtol=1e-5, atol=0)
            close_grads(after, current(eager))


@check
def multi_tensor_norm():
    sets = grad_sets()
    cases = [(sets["fp32"], 2.0), (sets["mixed"], INF), (sets["fp64"], 1.0)]
    fn = fullgraph(lambda gs: [(fusedclip.multi_tensor_norm(g, p), fusedclip.multi_tensor_norm(g, p, per_tensor=True))
                               for g, (_, p) in zip(gs, cases)])
    regrad_inputs, now = new_inputs([g for g, _ in cases], 6000)
    runs = steps(lambda: fn(now()), regrad_inputs, lambda: None)
    yield
    for results, gs, _ in runs:
        for (total, (total2, per)), g, (_, p) in zip(results, gs, cases):
            expect_total(total, g, p)
            assert torch.equal(total, total2)
            want = torch.tensor([ref_tensor_norm(t, p) for t in g], dtype=torch.float64)
            assert per.dtype == torch.float32
            torch.testing.assert_close(per.double().cpu(), want, rtol=1e-5, atol=0)
            close_total(total, fusedclip.multi_tensor_norm(g, p), g)


@check
def clip_by_global_norm():
    sets = grad_sets()
    present = [sets["fp32"][0], *sets["mixed"][:3]]
    with_nan = [t.clone() for t in sets["fp32"][1:3]]
    with_nan[1][0] = float("nan")
    fn = fullgraph(lambda xs, ys: (fusedclip.clip_by_global_norm(xs, 1.0), fusedclip.clip_by_global_norm(xs, 5.0, 3.0),
                                   fusedclip.clip_by_global_norm(ys, 1.0)))
    regrad_inputs, now = new_inputs([present], 7000)

    def call():
        xs = now()[0]
        return fn([xs[0], None, *xs[1:]], with_nan)  # a None entry passes through

    runs = steps(call, lambda s: regrad_inputs(s)[0], lambda: None)
    yield
    for ((out, norm), (out_use, norm_use), (out_nan, norm_nan)), xs, _ in runs:
        assert out[1] is None and out_use[1] is None
        out, out_use = [out[0], *out[2:]], [out_use[0], *out_use[2:]]
        assert_total_close(norm, ref_total_norm(xs, 2.0), torch.float32)
        for o, t in zip(out, xs):
            assert o.dtype == t.dtype
            assert_scaled(o, t, 1.0 / max(norm.item(), 1.0))
        assert norm_use.item() == 3.0
        for o, t in zip(out_use, xs):
            assert torch.equal(o, t)  # 5 / max(3, 5) is exactly 1
        assert norm_nan.isnan() and all(o.isnan().all() for o in out_nan)
        eager, eager_norm = fusedclip.clip_by_global_norm([xs[0], None, *xs[1:]], 1.0)
        close_total(norm, eager_norm, xs)
        close_grads(out, [eager[0], *eager[2:]])


# ---- stateful and training-loop entry points ---------------------------------------------------------------


@check
def grad_clipper():
    sets = grad_sets()
    a, b = with_grads(sets["fp32"]), with_grads(sets["mixed"])
    clip_a, clip_b = fusedclip.GradClipper(a, 0.5), fusedclip.GradClipper(b, 1e4, "inf")
    runs = steps(fullgraph(lambda: (clip_a(), clip_b())), regrad_cases([a, b], 8000), snapshot_cases([a, b]))
    yield
    for (total_a, total_b), (before_a, before_b), (after_a, after_b) in runs:
        expect_clipped(before_a, after_a, total_a, 2.0, 0.5)
        expect_clipped(before_b, after_b, total_b, INF, 1e4)
        eager_a, eager_b = with_grads(before_a), with_grads(before_b)
        close_total(total_a, fusedclip.GradClipper(eager_a, 0.5)(), before_a)
        close_total(total_b, fusedclip.GradClipper(eager_b, 1e4, "inf")(), before_b)
        close_grads(after_a, current(eager_a))
        close_grads(after_b, current(eager_b))
        stock = with_grads(before_a)
        close_total(total_a, STOCK["clip_grad_norm_"](stock, 0.5), before_a)
        close_grads(after_a, current(stock))


def small_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.GELU(), torch.nn.Linear(33, 5)).to(DEVICE)


def batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=gen).to(DEVICE), torch.randn(16, 5, generator=gen).to(DEVICE)


def backward(model, step, scaler=None):
    x, y = batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y) * 30  # large enough to be clipped
    (scaler.scale(loss) if scaler is not None else loss).backward()


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@check
def unscale_and_clip_grad_norm_():
    """With an enabled GradScaler: the scaler's state after the compiled call drives scaler.step / update as
    after torch's unscale_ (the step with an inf gradient is skipped and the scale backed off)."""
    model = small_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=1)
    fn = fullgraph(lambda: fusedclip.unscale_and_clip_grad_norm_(opt, scaler, 0.3))
    totals, scales = [], []
    for s in range(STEPS + 1):
        opt.zero_grad(set_to_none=True)
        backward(model, s, scaler)
        if s == 2:
            model[0].weight.grad[0, 0] = float("inf")
        with torch._dynamo.config.patch(error_on_recompile=True) if s else contextlib.nullcontext():
            totals.append(fn())
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    params = params_of(model)
    yield
    ref = small_model(1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10, growth_interval=1)
    for s in range(STEPS + 1):
        ref_opt.zero_grad(set_to_none=True)
        backward(ref, s, ref_scaler)
        if s == 2:
            ref[0].weight.grad[0, 0] = float("inf")
        ref_scaler.unscale_(ref_opt)
        want = STOCK["clip_grad_norm_"](ref.parameters(), 0.3)
        if s == 2:
            assert not torch.isfinite(totals[s])
        else:
            close_total(totals[s], want, [want])
            assert want.item() > 0.3, "the step must clip"
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        assert scales[s] == ref_scaler.get_scale(), (s, scales[s], ref_scaler.get_scale())
    close_grads(params, params_of(ref))


@check
def adaptive_clip_grad_():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 7)).to(DEVICE)
    params = list(model.parameters())
    fn = fullgraph(lambda: (fusedclip.adaptive_clip_grad_(params, 0.02),
                            fusedclip.adaptive_clip_grad_(params, 0.05, norm_type=INF)))
    runs = steps(fn, lambda s: regrad(params, 9000 + s), lambda: current(params))
    yield
    for _, before, after in runs:
        eager = [torch.nn.Parameter(p.detach().clone()) for p in params]  # AGC reads the weights, never changes them
        for p, g in zip(eager, before):
            p.grad = g.clone()
        fusedclip.adaptive_clip_grad_(eager, 0.02)
        fusedclip.adaptive_clip_grad_(eager, 0.05, norm_type=INF)
        assert any(not torch.equal(x, y) for x, y in zip(after, before)), "the case must clip something"
        close_grads(after, current(eager))


def spiky(param_lists, seed, spikes=(4, 6)):
    """regrad for steps() whose gradient norms jump 40x at the `spikes` steps."""
    def regrad_all(s):
        out = []
        for k, ps in enumerate(param_lists):
            regrad(ps, seed + 100 * k + s)
            if s in spikes:
                for p in ps:
                    p.grad.mul_(40.0)
            out.append(current(ps))
        return out
    return regrad_all


@check
def zclip_step():
    """Warm-up, then spikes, in one graph: the step count lives on the device under torch.compile."""
    sets = grad_sets()
    a, b = with_grads(sets["fp32"]), with_grads(sets["mixed"])

    def make():
        return (fusedclip.ZClip(warmup_steps=3, max_grad_norm=20.0),
                fusedclip.ZClip(warmup_steps=2, mode="percentile", max_grad_norm=None, skip_update_on_spike=True))

    z1, z2 = make()
    runs = steps(fullgraph(lambda: (z1.step(a), z2.step(b))), spiky([a, b], 10000), snapshot_cases([a, b]), count=8)
    states = (z1.state_dict(), z2.state_dict())
    yield
    e1, e2 = make()
    clipped = 0
    for (total_a, total_b), (before_a, before_b), (after_a, after_b) in runs:
        pa, pb = with_grads(before_a), with_grads(before_b)
        close_total(total_a, e1.step(pa), before_a)
        close_total(total_b, e2.step(pb), before_b)
        close_grads(after_a, current(pa))
        close_grads(after_b, current(pb))
        clipped += any(not torch.equal(x, y) for x, y in zip(after_a + after_b, before_a + before_b))
    assert clipped >= 3, "the sequence must make ZClip clip (warm-up and spikes)"
    for got, want in zip(states, (e1.state_dict(), e2.state_dict())):
        assert got["steps"] == want["steps"] == len(runs)
        for key in ("mean", "var", "warmup_norms"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=0)


@check
def autoclip_step():
    """The ring wraps and the percentile moves, in one graph (device count under torch.compile)."""
    sets = grad_sets()
    a, b = with_grads(sets["fp32"]), with_grads(sets["fp64"])

    def make():
        return fusedclip.AutoClip(percentile=30.0, history=4), fusedclip.AutoClip(percentile=100.0, history=3)

    c1, c2 = make()
    runs = steps(fullgraph(lambda: (c1.step(a), c2.step(b))), spiky([a, b], 11000),
                 lambda: (current(a), current(b), c1.threshold.clone(), c2.threshold.clone()), count=7)
    states = (c1.state_dict(), c2.state_dict())
    yield
    e1, e2 = make()
    for (total_a, total_b), (before_a, before_b), (after_a, after_b, h1, h2) in runs:
        pa, pb = with_grads(before_a), with_grads(before_b)
        close_total(total_a, e1.step(pa), before_a)
        close_total(total_b, e2.step(pb), before_b)
        torch.testing.assert_close(h1, e1.threshold, rtol=1e-6, atol=0)
        torch.testing.assert_close(h2, e2.threshold, rtol=1e-12, atol=0)
        close_grads(after_a, current(pa))
        close_grads(after_b, current(pb))
    for got, want in zip(states, (e1.state_dict(), e2.state_dict())):
        assert got["count"] == want["count"] == len(runs)
        torch.testing.assert_close(got["norms"], want["norms"], rtol=1e-6, atol=0)


@check
def training_loop():
    """A small model trained for several steps: forward and loss compiled fullgraph (backward by the same
    compiled graph's backward), the clip compiled fullgraph, SGD with momentum (torch's optimizer step cannot be
    fullgraph: see clip_and_step); gradients re-created every step (zero_grad(set_to_none=True)); no
    recompilation after the first step. The parameters follow the same loop run eagerly with stock torch."""
    model = small_model(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = fullgraph(lambda x, y: torch.nn.functional.mse_loss(model(x), y) * 30)
    clip = fullgraph(lambda: fusedclip.clip_grad_norm_(model.parameters(), 0.5))
    totals = []
    for s in range(STEPS + 1):
        with torch._dynamo.config.patch(error_on_recompile=True) if s else contextlib.nullcontext():
            opt.zero_grad(set_to_none=True)
            loss_fn(*batch(s)).backward()
            totals.append(clip())
        opt.step()
    params = params_of(model)
    yield
    ref = small_model(5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for s in range(STEPS + 1):
        ref_opt.zero_grad(set_to_none=True)
        backward(ref, s)
        want = STOCK["clip_grad_norm_"](ref.parameters(), 0.5)
        assert want.item() > 0.5, "the loop must clip"
        torch.testing.assert_close(totals[s], want, rtol=1e-4, atol=0)  # compiled forward/backward round differently
        ref_opt.step()
    for p, r in zip(params, params_of(ref)):
        torch.testing.assert_close(p, r, rtol=1e-4, atol=1e-6)


def optimizer(model, fused):
    """A fused optimizer takes the clip as its grad_scale (its step runs eagerly, as in stock torch); a non-fused
    one is scaled first, and dynamo traces its step (plain SGD: quick to compile, and no state created at the first
    step, which makes dynamo recompile torch's SGD.step at the second whoever clips)."""
    if fused:
        return torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.05)


def clip_then_step(model, opt):
    STOCK["clip_grad_norm_"](model.parameters(), 0.5)
    opt.step()


def graphs_and_breaks(fn):
    """(graphs, graph breaks) of `fn` under torch.compile (dynamo only, eager backend; runs fn once)."""
    explained = torch._dynamo.explain(fn)()
    return explained.graph_count, explained.graph_break_count


@check
def clip_and_step():
    """Stock torch's Optimizer.step() breaks the graph on purpose (torch._dynamo.graph_break() in its wrapper;
    fused optimizer kernels are compiler-disabled), so neither `clip_grad_norm_; opt.step()` nor clip_and_step
    can be fullgraph. Checked: compiled clip_and_step has no more graphs or breaks than the compiled stock
    sequence, gives the stock results, and does not recompile."""
    results = {}
    for fused in (False, True):
        counts = []
        for ours in (True, False):
            model = small_model(7)
            opt = optimizer(model, fused)
            backward(model, 0)
            counts.append(graphs_and_breaks(partial(fusedclip.clip_and_step, opt, 0.5) if ours else
                                            partial(clip_then_step, model, opt)))
        model = small_model(7)
        opt = optimizer(model, fused)
        step = torch.compile(partial(fusedclip.clip_and_step, opt, 0.5))
        totals = []
        for s in range(STEPS):
            opt.zero_grad(set_to_none=True)
            backward(model, s)
            with torch._dynamo.config.patch(error_on_recompile=True) if s else contextlib.nullcontext():
                totals.append(step())
        results[fused] = (counts, totals, params_of(model))
    yield
    for fused, ((ours, stock), totals, params) in results.items():
        assert ours[0] <= stock[0] and ours[1] <= stock[1], f"fused={fused}: ours {ours}, stock {stock}"
        ref = small_model(7)
        ref_opt = optimizer(ref, fused)
        for s in range(STEPS):
            ref_opt.zero_grad(set_to_none=True)
            backward(ref, s)
            want = STOCK["clip_grad_norm_"](ref.parameters(), 0.5)
            assert want.item() > 0.5, "the steps must clip"
            ref_opt.step()
            close_total(totals[s], want, [want])
        for p, r in zip(params, params_of(ref)):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def triton_runs_here() -> bool:
    if "triton" not in fusedclip.available_backends():
        return False
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return interpreting if DEVICE == "cpu" else not interpreting


@check
def kernel_backend_ops():
    """The Triton backend named explicitly (where it runs: CUDA, or CPU under TRITON_INTERPRET=1): its opaque
    custom ops under inductor, traced on the first call."""
    if not triton_runs_here():
        yield "the Triton backend does not run on this device here (CPU needs TRITON_INTERPRET=1)"
        return
    sets = grad_sets()
    a, b, c = with_grads(sets["mixed"]), with_grads(sets["fp32"]), with_grads(sets["fp64"])
    fn = fullgraph(lambda: (fusedclip.clip_grad_norm_(a, 0.5, backend="triton"),
                            fusedclip.clip_grad_value_(b, 0.3, backend="triton"),
                            fusedclip.clip_grad_norm_per_tensor_(c, 1.0, backend="triton")))
    runs = steps(fn, regrad_cases([a, b, c], 12000), snapshot_cases([a, b, c]))
    yield
    for (total, _, norms), (before_a, before_b, before_c), (after_a, after_b, after_c) in runs:
        expect_clipped(before_a, after_a, total, 2.0, 0.5)
        for x, y in zip(after_b, before_b):
            assert torch.equal(x, y.clamp(-0.3, 0.3))
        expect_clipped_per_tensor(before_c, after_c, norms, 2.0, 1.0)


@check
def patched_stock_functions():
    """Stock torch's clip functions compile fullgraph; after patch_torch() (fusedclip behind the same names) they
    still do, with fusedclip's results. Runs last in phase 1, and unpatches before phase 2."""
    grads = grad_sets()["fp32"]

    def calls(a, b, c, d, e):
        utils = torch.nn.utils
        return (
            utils.clip_grad_norm_(a, 0.5),
            utils.get_total_norm([p.grad for p in b], 3.0),
            utils.clip_grads_with_norm_(c, 0.5, torch.tensor(7.0)),
            utils.clip_grad_value_(d, 0.4),
            utils.clip_grad.clip_grad_norm_(e, 0.5, INF),
        )

    stock_params = [with_grads(grads) for _ in range(5)]
    stock_out = fullgraph(calls)(*stock_params)  # the premise: stock torch compiles fullgraph
    assert not fusedclip.is_patched()
    with fusedclip.patch_torch():
        assert torch.nn.utils.clip_grad_norm_ is fusedclip.clip_grad_norm_
        patched_params = [with_grads(grads) for _ in range(5)]
        patched_out = fullgraph(calls)(*patched_params)
    yield
    assert not fusedclip.is_patched()
    for i in (0, 1, 4):
        close_total(patched_out[i], stock_out[i], grads)
    for ps, qs in zip(patched_params, stock_params):
        close_grads(current(ps), current(qs))
    close_total(patched_out[0], fusedclip.clip_grad_norm_(with_grads(grads), 0.5), grads)


def main() -> int:
    global DEVICE, COMPILE_BACKEND
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("checks", nargs="*")
    args = parser.parse_args()
    DEVICE, COMPILE_BACKEND = args.device, args.backend
    names = args.checks or list(CHECKS)
    results: dict[str, dict] = {}
    pending = {}
    for name in names:  # phase 1: compiled calls only
        start = time.perf_counter()
        gen = CHECKS[name]()
        try:
            skipped = next(gen)  # a check that cannot run here yields the reason and stops
            results[name] = {"name": name, "ok": None, "error": None, "skipped": skipped}
            if skipped is None:
                pending[name] = gen
        except Exception:
            results[name] = {"name": name, "ok": False, "error": "compiled call: " + traceback.format_exc()[-4000:],
                             "skipped": None}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    for name, gen in pending.items():  # phase 2: references
        start = time.perf_counter()
        try:
            next(gen)
            results[name].update(ok=False, error="check did not finish")
        except StopIteration:
            results[name]["ok"] = True
        except Exception:
            results[name].update(ok=False, error="comparison: " + traceback.format_exc()[-4000:])
        results[name]["seconds"] = round(results[name]["seconds"] + time.perf_counter() - start, 1)
    env = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "FUSEDCLIP_BACKEND")}
    for r in results.values():
        r["env"] = env
        print("COMPILE_CHECK " + json.dumps(r), flush=True)
    return 0 if all(r["ok"] or r["skipped"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
