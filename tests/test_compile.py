"""torch.compile and CUDA graphs on the default path: never worse than stock torch.

The fullgraph checks are in compile_worker.py. They run in fresh subprocesses, so that every entry point is
traced on its first call with nothing loaded or cached by an earlier eager call, under inductor (the default
backend) and the auto backend: once with TRITON_INTERPRET=1 (the suite's CPU setup: the Triton backend loads,
auto picks torch for CPU tensors), once without it; FUSEDCLIP_BACKEND is unset in both. Each run is one process
for every check (each check compiles its own fresh function); on a GPU machine the same checks run on CUDA.

Cost on 2 CPU cores: about 4 minutes with a cold inductor cache (C++ compiles of every graph), about 2 with a
warm one; the second environment reuses the first one's compiled code.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedclip
from compile_worker import CHECKS
from fusedclip import backends
from reference import random_grads

HERE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def worker_results(device: str, interpret: bool) -> dict[str, dict]:
    """Run every check of compile_worker.py in one fresh process; {name: result}."""
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDCLIP_BACKEND", "TRITON_INTERPRET")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(HERE / "compile_worker.py"), "--device", device],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=1800,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("COMPILE_CHECK "):
            r = json.loads(line[len("COMPILE_CHECK "):])
            results[r["name"]] = r
    if not results:
        raise AssertionError(f"compile_worker.py reported nothing (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return results


def _assert_check(device: str, interpret: bool, name: str) -> None:
    r = worker_results(device, interpret)[name]
    if r["skipped"]:
        pytest.skip(r["skipped"])
    assert r["ok"], f"{name} ({device}, TRITON_INTERPRET={'1' if interpret else 'unset'}):\n{r['error']}"


@pytest.mark.parametrize("name", list(CHECKS))
def test_fullgraph_first_call_interpreter_env(name):
    """The suite's CPU setup: TRITON_INTERPRET=1, so the Triton backend is loaded (auto still picks torch)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU environments; see test_gpu_fullgraph_first_call")
    _assert_check("cpu", True, name)


@pytest.mark.parametrize("name", list(CHECKS))
def test_fullgraph_first_call_plain_env(name):
    """A user's CPU machine: no TRITON_INTERPRET, only the torch backend is loaded."""
    if torch.cuda.is_available():
        pytest.skip("the CPU environments; see test_gpu_fullgraph_first_call")
    _assert_check("cpu", False, name)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CHECKS))
def test_gpu_fullgraph_first_call(name):
    _assert_check("cuda", False, name)


# ---- host decisions stay in eager mode ---------------------------------------------------------------------


class OpLog(TorchDispatchMode):
    """Records the aten ops that run; `scales` says whether any multiplied a tensor in place."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    @property
    def scales(self) -> bool:
        return any(op in ("mul_", "_foreach_mul_") for op in self.ops)


def _params(grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def test_eager_cpu_skips_the_scale_when_nothing_is_clipped():
    """The CPU shortcut (read coef on the host, skip the pass at exactly 1) stays in eager mode; the traced form is
    branch-free instead (checked by the compile checks)."""
    grads = random_grads(6, seed=21)
    params = _params(grads)
    with OpLog() as log:
        fusedclip.clip_grad_norm_(params, 1e9, backend="torch")
    assert not log.scales, log.ops
    with OpLog() as log:
        fusedclip.clip_grad_norm_per_tensor_(params, 1e9, backend="torch")
    assert not log.scales, log.ops
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
    with OpLog() as log:
        fusedclip.clip_grad_norm_(params, 0.1, backend="torch")
    assert log.scales, log.ops


def test_check_ops_are_registered_correctly():
    """The opaque argument checks used while tracing: schema, fake kernel and eager kernel agree."""
    torch.library.opcheck(torch.ops.fusedclip.check_nonnegative, (torch.tensor(0.5), "max_norm"))
    torch.library.opcheck(torch.ops.fusedclip.check_finite, (torch.tensor(3.0), 2.0))


def test_check_ops_raise_the_eager_errors():
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        torch.ops.fusedclip.check_nonnegative(torch.tensor(-1.0), "max_norm")
    with pytest.raises(ValueError, match="clip_value must be >= 0"):
        torch.ops.fusedclip.check_nonnegative(torch.tensor(float("nan")), "clip_value")
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.ops.fusedclip.check_finite(torch.tensor(float("inf")), 2.0)
    x = torch.tensor(0.25)
    y = torch.ops.fusedclip.check_nonnegative(x, "max_norm")
    assert y.item() == 0.25 and y.data_ptr() != x.data_ptr()


def test_unloaded_backend_under_tracing_says_how_to_fix(monkeypatch):
    """A backend nobody loaded cannot be imported inside a trace: a clear error instead of dynamo's."""
    monkeypatch.setattr(backends, "_loaded", {k: v for k, v in backends._loaded.items() if k != "cuda"})
    monkeypatch.setattr(backends, "_reasons", {k: v for k, v in backends._reasons.items() if k != "cuda"})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="preload_backends"):
        backends._load("cuda")


def test_import_loads_the_torch_backend_without_triton():
    """On a CPU machine without TRITON_INTERPRET, importing fusedclip loads the torch backend (what every CPU call
    picks) and imports nothing else; with FUSEDCLIP_BACKEND set it loads that backend too."""
    env = {k: v for k, v in os.environ.items() if k not in ("FUSEDCLIP_BACKEND", "TRITON_INTERPRET")}
    code = (
        "import sys, fusedclip; from fusedclip import backends; "
        "print(sorted(backends._loaded), 'triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    # Nor torch._dynamo: importing it takes seconds, and nothing needs it before torch.compile does.
    assert out.stdout.split("\n")[0] == "['torch'] False False", out.stdout + out.stderr


def test_trace_time_state_marking_is_what_torch_uses():
    """ZClip / AutoClip mark their state-making method as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at import time; if torch changes how it marks, this fails (and the compile checks
    would see a recompilation at the second step)."""
    marked = torch.compiler.assume_constant_result(lambda: True)
    names = [k for k in vars(marked) if "constant" in k]
    assert names == ["_dynamo_marked_constant"], names
    assert fusedclip.ZClip._traced_state._dynamo_marked_constant is True
    assert fusedclip.AutoClip._traced_state._dynamo_marked_constant is True


# ---- ZClip / AutoClip: compiled and eager steps mix -------------------------------------------------------


def _steps_of(clipper, params, compiled_steps, total_steps, seed):
    step = torch.compile(lambda: clipper.step(params), fullgraph=True, backend="aot_eager")
    totals = []
    for s in range(total_steps):
        gen = torch.Generator().manual_seed(seed + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * (30.0 if s == 5 else 1.0)
        totals.append(step() if s < compiled_steps else clipper.step(params))
    return totals, [p.grad.clone() for p in params]


@pytest.mark.parametrize("make", [
    lambda: fusedclip.ZClip(warmup_steps=3, max_grad_norm=4.0),
    lambda: fusedclip.AutoClip(percentile=40.0, history=3),
])
@pytest.mark.parametrize("compiled_steps", [2, 4])
def test_compiled_then_eager_steps_continue_the_same_state(make, compiled_steps):
    """The device step count of compiled steps joins the host count at the next eager step (and in the
    properties and the state dict), so switching modes mid-run changes nothing."""
    torch._dynamo.reset()
    try:
        shapes = [(7, 3), (5,), (2, 2, 3)]
        ours, ref = make(), make()
        got, got_grads = _steps_of(ours, [torch.nn.Parameter(torch.zeros(s)) for s in shapes], compiled_steps, 7, 40)
        want, want_grads = _steps_of(ref, [torch.nn.Parameter(torch.zeros(s)) for s in shapes], 0, 7, 40)
    finally:
        torch._dynamo.reset()
    for a, b in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    sa, sb = ours.state_dict(), ref.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=0)
        else:
            assert sa[k] == sb[k], k
    assert repr(ours) == repr(ref)


def test_zclip_statistics_stay_hidden_during_compiled_warmup():
    torch._dynamo.reset()
    try:
        z = fusedclip.ZClip(warmup_steps=4)
        p = torch.nn.Parameter(torch.zeros(9))
        step = torch.compile(lambda: z.step([p]), fullgraph=True, backend="aot_eager")
        for s in range(2):
            p.grad = torch.randn(9, generator=torch.Generator().manual_seed(s))
            step()
    finally:
        torch._dynamo.reset()
    assert z.steps == 2 and not z.initialized and z.mean is None and z.var is None
    state = z.state_dict()
    assert state["mean"] is None and state["var"] is None and state["warmup_norms"].shape == (2,)
    fusedclip.ZClip(warmup_steps=4).load_state_dict(state)  # a valid warm-up state


# ---- CUDA graphs (item 4 of issue 15): a whole training step, clip included ---------------------------------


def _gpu_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 31)).cuda()


def _gpu_batch(step):
    gen = torch.Generator(device="cuda").manual_seed(500 + step)
    return torch.randn(16, 64, device="cuda", generator=gen), torch.randn(16, 31, device="cuda", generator=gen)


def _reference_run(steps, max_norm):
    """Stock torch, eager: totals and final parameters of `steps` training steps (fused AdamW)."""
    model = _gpu_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    totals = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = _gpu_batch(s)
        (torch.nn.functional.mse_loss(model(x), y) * 100).backward()
        totals.append(fusedclip.patching.TORCH_ORIGINALS["clip_grad_norm_"](model.parameters(), max_norm))
        opt.step()
    return totals, [p.detach().clone() for p in model.parameters()]


def _assert_matches_reference(totals, model, steps, max_norm):
    want_totals, want_params = _reference_run(steps, max_norm)
    for s, (got, want) in enumerate(zip(totals, want_totals)):
        assert want.item() > max_norm, "the steps must clip"
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=0, msg=f"total of step {s}")
    for p, w in zip(model.parameters(), want_params):
        torch.testing.assert_close(p.detach(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("set_to_none", [False, True])
def test_gpu_whole_training_step_in_one_cuda_graph(set_to_none):
    """torch's whole-network capture recipe: warm up on a side stream, capture forward, backward, clip and the
    fused, capturable AdamW step, then replay with new data copied into the static inputs. set_to_none=True is
    the recipe as torch documents it (backward allocates the gradients from the graph's pool during capture);
    False keeps the warm-up's gradients."""
    max_norm, warmup, replays = 0.5, 3, 4
    model = _gpu_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True, capturable=True)
    static_x, static_y = (t.clone() for t in _gpu_batch(0))
    totals = []

    def step():
        opt.zero_grad(set_to_none=set_to_none)
        (torch.nn.functional.mse_loss(model(static_x), static_y) * 100).backward()
        total = fusedclip.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        return total

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in range(warmup):
            x, y = _gpu_batch(s)
            static_x.copy_(x)
            static_y.copy_(y)
            totals.append(step().clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if set_to_none:
        opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_total = step()
    for s in range(warmup, warmup + replays):
        x, y = _gpu_batch(s)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        totals.append(static_total.clone())
    torch.cuda.synchronize()
    _assert_matches_reference(totals, model, warmup + replays, max_norm)


def _reduce_overhead_step(max_norm, backend=None):
    """A model, its capturable fused AdamW, and its forward, backward and clip compiled with
    mode="reduce-overhead" (CUDA graphs by inductor)."""
    model = _gpu_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True, capturable=True)

    @torch.compile(mode="reduce-overhead")
    def step(x, y):
        (torch.nn.functional.mse_loss(model(x), y) * 100).backward()
        return fusedclip.clip_grad_norm_(model.parameters(), max_norm, backend=backend)

    return model, opt, step


@pytest.mark.gpu
def test_gpu_training_step_compiled_reduce_overhead():
    """The same training step under torch.compile(mode="reduce-overhead") (CUDA graphs by inductor): the
    compiled graphs (forward, backward, clip) are replayed from the third step on."""
    max_norm, steps = 0.5, 7
    model, opt, step = _reduce_overhead_step(max_norm)
    totals = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        totals.append(step(*_gpu_batch(s)).clone())
        opt.step()
    torch.cuda.synchronize()
    _assert_matches_reference(totals, model, steps, max_norm)


@pytest.mark.gpu
@pytest.mark.compile
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_reduce_overhead_replays_keep_nothing_in_the_trees_pool(backend, monkeypatch):
    """Issue 25 item 7: torch.compile(mode="reduce-overhead") warms a function up and records it with every
    allocation sent to its CUDA-graph tree's pool, whose blocks it frees and hands out again by its bookkeeping of
    the function's outputs. A plan (or scratch) built then and kept by fusedclip would be memory the tree does not
    know about: with inductor's slow-path checks on, the tree fails on any such block, and a block handed out twice
    would corrupt later totals. Many replays, other allocations between them, every total checked against stock
    torch and the clipped gradients against float64."""
    if backend not in fusedclip.available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    import torch._inductor.config
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._inductor.config.triton, "slow_path_cudagraph_asserts", True)
    torch._dynamo.reset()
    counters.clear()
    max_norm, steps = 0.05, 30
    model, opt, step = _reduce_overhead_step(max_norm, backend)
    totals, churn = [], []
    try:
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            total = step(*_gpu_batch(s)).clone()
            clipped = [p.grad.double() for p in model.parameters()]
            got = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped])).item()
            want = total.item() * min(1.0, max_norm / (total.item() + 1e-6))
            assert abs(got - want) <= 1e-5 * want, (s, got, want)
            totals.append(total)
            opt.step()
            churn = [torch.empty(1000 * (s % 7 + 1), device="cuda") for _ in range(s % 5)]  # other allocations
    finally:
        torch._dynamo.reset()
    del churn
    torch.cuda.synchronize()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    _assert_matches_reference(totals, model, steps, max_norm)


@pytest.mark.gpu
def test_gpu_clip_alone_compiled_reduce_overhead_fullgraph():
    max_norm, steps = 0.5, 7
    model = _gpu_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    clip = torch.compile(lambda: fusedclip.clip_grad_norm_(model.parameters(), max_norm), mode="reduce-overhead",
                         fullgraph=True)
    totals = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = _gpu_batch(s)
        (torch.nn.functional.mse_loss(model(x), y) * 100).backward()
        totals.append(clip().clone())
        opt.step()
    torch.cuda.synchronize()
    _assert_matches_reference(totals, model, steps, max_norm)
