"""GPU-only checks of the training-loop integration: no host sync, torch.compile(fullgraph=True), CUDA graphs.

Skipped without a CUDA device (see conftest). Written without a GPU to run them on: unverified until a GPU run.
"""

import pytest
import torch

import fusedclip

pytestmark = pytest.mark.gpu


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


def test_unscale_and_clip_no_sync():
    model = _model_and_grads()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    sc = _fresh_scaler()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = fusedclip.unscale_and_clip_grad_norm_(opt, sc, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert total.is_cuda


@pytest.mark.parametrize("scaler", [False, True])
def test_clip_and_step_fused_no_sync(scaler):
    model = _model_and_grads()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    sc = _fresh_scaler() if scaler else None
    fusedclip.clip_and_step(opt, 1.0, scaler=sc)  # first step creates the state (may sync)
    if sc is not None:
        sc.update()
    for p in model.parameters():
        p.grad.normal_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fusedclip.clip_and_step(opt, 1.0, scaler=sc, skip_nonfinite=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_clip_and_step_matches_stock_on_cuda():
    m1 = _model_and_grads(1)
    m2 = _model_and_grads(1)
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
        torch.testing.assert_close(t2, t1, rtol=1e-5, atol=0)
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.compile
def test_patched_clip_in_compiled_fullgraph_step():
    model = _model_and_grads(2)
    ref = [p.grad.clone() for p in model.parameters()]

    @torch.compile(fullgraph=True)
    def clip(params):
        return torch.nn.utils.clip_grad_norm_(params, 0.5)

    params = list(model.parameters())
    with fusedclip.patch_torch():
        total = clip(params)
    expected = fusedclip.patching.TORCH_ORIGINALS["clip_grad_norm_"]([torch.nn.Parameter(r) for r in ref], 0.5)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=0)


def test_clip_and_step_in_cuda_graph():
    model = _model_and_grads(3)
    opt = torch.optim.AdamW(model.parameters(), fused=True, capturable=True)
    fusedclip.clip_and_step(opt, 1.0)  # warm-up: state and plans exist before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fusedclip.clip_and_step(opt, 1.0, skip_nonfinite=True)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        total = fusedclip.clip_and_step(opt, 1.0, skip_nonfinite=True)
    before = [p.detach().clone() for p in model.parameters()]
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(total)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
