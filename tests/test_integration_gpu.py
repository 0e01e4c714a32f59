"""GPU-only checks of the training-loop integration: no host sync, torch.compile(fullgraph=True), CUDA graphs.

Skipped without a CUDA device (see conftest). Written without a GPU to run them on: unverified until a GPU run.
The no-sync checks run a cold call (the plan is built inside the checked block) and a steady-state call, each
under set_sync_debug_mode("error"), and compare both with stock torch after leaving that mode.
"""

import pytest
import torch

import fusedclip
from sync_check import cold_plans, sync_errors

pytestmark = pytest.mark.gpu

KERNEL_BACKENDS = ["cuda", "triton"]


def _kernel_backend(name):
    if name not in fusedclip.available_backends():
        pytest.skip(f"backend {name!r} is not available")
    return name


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 257), torch.nn.GELU(), torch.nn.Linear(257, 31)).cuda()
    loss = model(torch.randn(16, 64, device="cuda")).pow(2).sum() * 100
    loss.backward()
    return model


def _fresh_scaler():
    sc = torch.amp.GradScaler("cuda", init_scale=2.0**8, growth_interval=2)
    sc.scale(torch.ones((), device="cuda"))
    return sc


def _new_grads(params, seed, scale=50.0):
    """Fresh values written into the existing .grad tensors (same addresses: the plan stays cached)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p in params:
        p.grad.copy_(torch.randn(p.grad.shape, device="cuda", generator=gen) * scale)


def _twin(params):
    """Stand-alone parameters holding copies of the gradients, for stock torch to clip."""
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def _twin_model(model, seed):
    """The same model again (same seed), holding copies of `model`'s gradients (not recomputed: a second
    backward need not give the same bits)."""
    twin = _model_and_grads(seed)
    for a, b in zip(model.parameters(), twin.parameters()):
        b.grad = a.grad.clone()
    return twin


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_unscale_and_clip_no_sync_cold_and_steady(backend):
    backend = _kernel_backend(backend)
    model = _model_and_grads()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, fused=True)
    cache = cold_plans(backend)
    for phase in ("cold", "steady"):
        if phase == "steady":
            _new_grads(params, seed=1)
        builds = cache.builds
        ref_params = _twin(params)
        sc = _fresh_scaler()
        with sync_errors():
            total = fusedclip.unscale_and_clip_grad_norm_(opt, sc, 1.0, backend=backend)
        assert cache.builds == builds + (phase == "cold"), phase
        ref_scaler = _fresh_scaler()
        ref_scaler.unscale_(torch.optim.SGD(ref_params, lr=0.0))
        ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        assert total.is_cuda and ref_total.item() > 1.0, "the gradients must be clipped"
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        for p, r in zip(params, ref_params):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-12)


def _stock_clip_and_step(opt, params, sc):
    if sc is not None:
        sc.unscale_(opt)
    total = torch.nn.utils.clip_grad_norm_(params, 1.0)
    if sc is not None:
        sc.step(opt)
        sc.update()
    else:
        opt.step()
    return total


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("scaler", [False, True])
def test_clip_and_step_fused_no_sync_cold_and_steady(backend, scaler):
    """The optimizer's first step (it creates the optimizer state) runs outside the check; then a call with a
    cold plan cache and a steady-state call, each under "error" mode, against stock clip + fused AdamW step."""
    backend = _kernel_backend(backend)
    model = _model_and_grads(4)
    ref_model = _twin_model(model, 4)
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    opt = torch.optim.AdamW(params, fused=True)
    ref_opt = torch.optim.AdamW(ref_params, fused=True)
    sc, ref_sc = (_fresh_scaler(), _fresh_scaler()) if scaler else (None, None)
    fusedclip.clip_and_step(opt, 1.0, scaler=sc, backend=backend)
    if sc is not None:
        sc.update()
    _stock_clip_and_step(ref_opt, ref_params, ref_sc)
    cache = None
    for step, phase in enumerate(("cold", "steady")):
        _new_grads(params, seed=10 + step)
        _new_grads(ref_params, seed=10 + step)
        if phase == "cold":
            cache = cold_plans(backend)
        builds = cache.builds
        with sync_errors():
            total = fusedclip.clip_and_step(opt, 1.0, scaler=sc, skip_nonfinite=True, backend=backend)
        assert cache.builds == builds + (phase == "cold"), phase
        if sc is not None:
            sc.update()
        ref_total = _stock_clip_and_step(ref_opt, ref_params, ref_sc)
        assert ref_total.item() > 1.0, "the gradients must be clipped"
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        if sc is not None:
            assert sc.get_scale() == ref_sc.get_scale()


def test_clip_and_step_matches_stock_on_cuda():
    m1 = _model_and_grads(1)
    m2 = _twin_model(m1, 1)
    o1 = torch.optim.AdamW(m1.parameters(), fused=True)
    o2 = torch.optim.AdamW(m2.parameters(), fused=True)
    for step in range(3):
        if step:
            for a, b in zip(m1.parameters(), m2.parameters()):
                g = torch.randn_like(a) * (step + 1)
                a.grad, b.grad = g.clone(), g.clone()
        t1 = torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5)
        o1.step()
        t2 = fusedclip.clip_and_step(o2, 0.5)
        assert t1.item() > 0.5, "the gradients must be clipped"
        torch.testing.assert_close(t2, t1, rtol=1e-5, atol=0)
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.compile
def test_patched_clip_in_compiled_fullgraph_step():
    """Under patch_torch(), a compiled step calling torch.nn.utils.clip_grad_norm_ runs fusedclip, with no graph
    break; the same gradients clipped by stock torch (the original function) are the reference."""
    torch._dynamo.reset()
    model = _model_and_grads(2)
    ref_params = _twin(list(model.parameters()))
    fusedclip.available_backends()  # backends load outside the trace: dynamo cannot trace their import

    @torch.compile(fullgraph=True)
    def clip(params):
        return torch.nn.utils.clip_grad_norm_(params, 0.5)

    params = list(model.parameters())
    with fusedclip.patch_torch():
        total = clip(params)
    expected = fusedclip.patching.TORCH_ORIGINALS["clip_grad_norm_"](ref_params, 0.5)
    assert expected.is_cuda and expected.item() > 0.5, "the stock clip must see the gradients and clip them"
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-6, atol=1e-12)


def test_clip_and_step_in_cuda_graph():
    """clip_and_step captured with a capturable fused AdamW; every replay (fresh gradients written in place) is
    compared with stock clip + step on a twin model run eagerly."""
    model = _model_and_grads(3)
    twin = _twin_model(model, 3)
    params, ref_params = list(model.parameters()), list(twin.parameters())
    opt = torch.optim.AdamW(params, fused=True, capturable=True)
    ref_opt = torch.optim.AdamW(ref_params, fused=True, capturable=True)
    fusedclip.clip_and_step(opt, 1.0)  # warm-up: state and plans exist before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fusedclip.clip_and_step(opt, 1.0, skip_nonfinite=True)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):  # the twin takes the same two warm-up steps
        _stock_clip_and_step(ref_opt, ref_params, None)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        total = fusedclip.clip_and_step(opt, 1.0, skip_nonfinite=True)
    for seed in (20, 21):
        _new_grads(params, seed)
        _new_grads(ref_params, seed)
        g.replay()
        ref_total = _stock_clip_and_step(ref_opt, ref_params, None)
        torch.cuda.synchronize()
        assert ref_total.item() > 1.0, "the gradients must be clipped"
        torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=0)
        for a, b in zip(params, ref_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
