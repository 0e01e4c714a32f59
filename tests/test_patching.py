"""patch_torch(): torch's clip names route to fusedclip while patched, and are restored exactly after."""

import pytest
import torch
import torch.nn.utils.clip_grad as clip_grad_mod

import fusedclip
from fusedclip import clip as fc_clip

from reference import random_grads, random_tensor

NAMES = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"]
PRIVATE = {"get_total_norm": "_get_total_norm", "clip_grads_with_norm_": "_clip_grads_with_norm_"}


def snapshot():
    out = {}
    for n in NAMES:
        out[("utils", n)] = getattr(torch.nn.utils, n)
        for attr in (n, PRIVATE.get(n)):
            if attr and hasattr(clip_grad_mod, attr):
                out[("clip_grad", attr)] = getattr(clip_grad_mod, attr)
    return out


@pytest.fixture(autouse=True)
def always_unpatch():
    yield
    fusedclip.unpatch_torch()


def params_with_grads(seed=0):
    grads = random_grads(11, (torch.float32, torch.float64), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(random_tensor(g.shape, g.dtype, gen=gen)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


def test_patch_replaces_every_name_and_unpatch_restores_exactly():
    before = snapshot()
    assert all(v.__module__.startswith("torch") for v in before.values())
    handle = fusedclip.patch_torch()
    assert fusedclip.is_patched() and handle.active
    during = snapshot()
    for key, fn in during.items():
        public = {v: k for k, v in PRIVATE.items()}.get(key[1], key[1])
        assert fn is getattr(fc_clip, public), key
    assert handle.unpatch() is True
    after = snapshot()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not fusedclip.is_patched()


def test_twice_is_harmless_and_nested_with_keeps_outer_patch():
    before = snapshot()
    with fusedclip.patch_torch() as outer:
        with fusedclip.patch_torch() as inner:
            assert inner is not outer
        assert fusedclip.is_patched()  # the inner handle does not own the patch
        assert torch.nn.utils.clip_grad_norm_ is fc_clip.clip_grad_norm_
    assert not fusedclip.is_patched()
    assert all(snapshot()[k] is before[k] for k in before)
    assert fusedclip.unpatch_torch() is False  # nothing to undo


def test_patched_calls_match_stock():
    stock_ps, ours_ps = params_with_grads(1), params_with_grads(1)
    stock = torch.nn.utils.clip_grad_norm_(stock_ps, 0.5)
    with fusedclip.patch_torch():
        ours = torch.nn.utils.clip_grad_norm_(ours_ps, 0.5)
        # torch's deprecated clip_grad_norm looks clip_grad_norm_ up in its module: ours too.
        assert clip_grad_mod.clip_grad_norm_ is fc_clip.clip_grad_norm_
    torch.testing.assert_close(ours.double(), stock.double(), rtol=1e-6, atol=0)
    for a, b in zip(stock_ps, ours_ps):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-7, atol=0)


def test_unpatch_leaves_a_later_replacement_alone():
    fusedclip.patch_torch()

    def other(*a, **k):
        return None

    torch.nn.utils.clip_grad_value_ = other
    try:
        with pytest.warns(RuntimeWarning, match="replaced after"):
            fusedclip.unpatch_torch()
        assert torch.nn.utils.clip_grad_value_ is other
        assert torch.nn.utils.clip_grad_norm_ is not fc_clip.clip_grad_norm_
    finally:
        torch.nn.utils.clip_grad_value_ = fc_clip._torch_clip_grad_value_


def test_accelerate_clip_grad_norm_runs_fusedclip(monkeypatch):
    accelerate = pytest.importorskip("accelerate")
    calls = []
    real = fc_clip.clip_grad_norm_

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    def run(patched: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.Tanh(), torch.nn.Linear(17, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        acc = accelerate.Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
        x = torch.randn(8, 13)
        loss = model(x).pow(2).sum() * 10
        acc.backward(loss)
        if patched:
            with fusedclip.patch_torch():
                total = acc.clip_grad_norm_(model.parameters(), 0.3)
        else:
            total = acc.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
        return total, [p.detach().clone() for p in model.parameters()]

    stock_total, stock_params = run(False)
    monkeypatch.setitem(fusedclip.patching._REPLACEMENTS, "clip_grad_norm_", spy)
    ours_total, ours_params = run(True)
    assert calls, "accelerate did not call fusedclip's clip_grad_norm_"
    assert float(stock_total) > 0.3  # the clip was active
    torch.testing.assert_close(ours_total.double(), stock_total.double(), rtol=1e-6, atol=0)
    for a, b in zip(stock_params, ours_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
