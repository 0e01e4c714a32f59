"""clip_and_step against the unfused sequence (clip_grad_norm_ then step; with a scaler: unscale_, clip, step)."""

import pytest
import torch

import fusedclip
from fusedclip.patching import TORCH_ORIGINALS
from fusedclip import dispatch, optim

from reference import random_tensor

torch_clip = TORCH_ORIGINALS["clip_grad_norm_"]

OPTIMIZERS = {
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, fused=True),
    "adagrad-fused": lambda ps: torch.optim.Adagrad(ps, lr=0.05, fused=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=False),
}
FUSED = {k for k in OPTIMIZERS if k.endswith("-fused")}
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def expect_fold(kind, opt):
    """A fused optimizer takes the clip as its grad_scale when torch declares that its step takes one
    (`_step_supports_amp_scaling`, the flag GradScaler checks too). torch 2.11's fused Adagrad takes grad_scale but
    does not declare it: there the clip is a separate scale pass, with the same results."""
    return kind in FUSED and getattr(opt, "_step_supports_amp_scaling", False)


def make_params(seed=0, count=10):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(int(torch.randint(1, 60, (1,), generator=gen)),) if i % 3 else (3, 7) for i in range(count)]
    return [torch.nn.Parameter(random_tensor(s, gen=gen)) for s in shapes]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def set_grads(ps, step, scale=1.0, poison=None):
    gen = torch.Generator().manual_seed(500 + step)
    for i, p in enumerate(ps):
        g = random_tensor(p.shape, torch.float64, gen=gen, scale=0.3 + i) * scale
        g = g.to(p.dtype)
        if poison is not None and poison[0] == i:
            g.view(-1)[0] = poison[1]
        p.grad = g


def snapshot(opt, ps):
    return [p.detach().clone() for p in ps], [{k: v.clone() for k, v in opt.state.get(p, {}).items()} for p in ps]


def assert_same(opt_a, opt_b, pa, pb, grads=True):
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6)
        if grads:
            torch.testing.assert_close(y.grad, x.grad, rtol=1e-5, atol=1e-7)
        sx, sy = opt_a.state.get(x, {}), opt_b.state.get(y, {})
        assert sx.keys() == sy.keys()
        for k in sx:
            torch.testing.assert_close(sy[k], sx[k], rtol=1e-5, atol=1e-6)


@pytest.fixture
def scale_calls(monkeypatch):
    calls = []
    real = dispatch.scale_

    def spy(plan, coef):
        calls.append(1)
        return real(plan, coef)

    monkeypatch.setattr(dispatch, "scale_", spy)
    return calls


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_matches_clip_then_step(kind, scale_calls):
    ps_s = make_params()
    ps_o = clone_params(ps_s)
    opt_s, opt_o = OPTIMIZERS[kind](ps_s), OPTIMIZERS[kind](ps_o)
    fold = expect_fold(kind, opt_o)
    assert optim.folds_into_step(opt_o) == fold
    for step in range(5):
        max_norm = 2.0 if step % 2 == 0 else 1e4  # clipping, then not
        set_grads(ps_s, step)
        set_grads(ps_o, step)
        t_s = torch_clip(ps_s, max_norm)
        opt_s.step()
        t_o = fusedclip.clip_and_step(opt_o, max_norm)
        torch.testing.assert_close(t_o, t_s, rtol=1e-6, atol=0)
        assert_same(opt_s, opt_o, ps_s, ps_o)
    # Fused optimizers take the clip as grad_scale: no separate scale pass ran.
    assert (len(scale_calls) == 0) == fold
    assert not hasattr(opt_o, "grad_scale") and not hasattr(opt_o, "found_inf")


def test_fold_follows_torchs_declaration():
    """Which fused optimizers fold, per torch version: Adam, AdamW and SGD on every torch we support (2.11 up),
    Adagrad where torch declares it (2.13 does, 2.11 does not). Keeps expect_fold from quietly expecting none."""
    for kind in sorted(FUSED):
        opt = OPTIMIZERS[kind](make_params())
        declared = getattr(opt, "_step_supports_amp_scaling", False)
        assert optim.folds_into_step(opt) == declared, kind
        if kind != "adagrad-fused" or TORCH_VERSION >= (2, 13):
            assert declared, f"torch {torch.__version__}: {kind} does not declare _step_supports_amp_scaling"


@pytest.mark.parametrize("kind", ["adamw-fused", "sgd-fused", "adamw-foreach", "sgd-plain"])
def test_with_scaler_matches_unscale_clip_step(kind):
    ps_s = make_params(1)
    ps_o = clone_params(ps_s)
    opt_s, opt_o = OPTIMIZERS[kind](ps_s), OPTIMIZERS[kind](ps_o)
    sc_s = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    sc_o = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    for sc in (sc_s, sc_o):
        sc.scale(torch.ones(()))
    # torch's fused SGD keeps uninitialised momentum buffers after a skipped first step (we do not, see
    # test_skip_nonfinite_leaves_params_and_state), so the stock sequence is only a reference from step 1 there.
    first = 1 if kind == "sgd-fused" else 0
    poisons = {first: (2, float("inf")), 3: (5, float("nan"))}
    scales = []
    for step in range(7):
        poison = poisons.get(step)
        set_grads(ps_s, step, sc_s.get_scale(), poison)
        set_grads(ps_o, step, sc_o.get_scale(), poison)
        before = snapshot(opt_o, ps_o)
        sc_s.unscale_(opt_s)
        t_s = torch_clip(ps_s, 3.0)
        sc_s.step(opt_s)
        t_o = fusedclip.clip_and_step(opt_o, 3.0, scaler=sc_o)
        with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
            sc_o.step(opt_o)
        sc_s.update()
        sc_o.update()
        assert sc_o.get_scale() == sc_s.get_scale()
        scales.append(sc_o.get_scale())
        if poison is None:
            torch.testing.assert_close(t_o, t_s.float(), rtol=1e-6, atol=0)
            assert_same(opt_s, opt_o, ps_s, ps_o)
        else:  # skipped: nothing moved, and torch skipped too
            params, states = before
            for p, q, st in zip(ps_o, params, states):
                assert torch.equal(p.detach(), q)
                assert all(torch.equal(opt_o.state.get(p, {})[k], v) for k, v in st.items())
            assert_same(opt_s, opt_o, ps_s, ps_o, grads=False)
    assert len(set(scales)) > 1 and min(scales) < 2.0**8  # the schedule backed off and grew


@pytest.mark.parametrize("kind", ["adamw-fused", "sgd-fused", "adamw-foreach", "sgd-plain"])
def test_skip_nonfinite_leaves_params_and_state(kind):
    ps_s = make_params(2)
    ps_o = clone_params(ps_s)
    opt_s, opt_o = OPTIMIZERS[kind](ps_s), OPTIMIZERS[kind](ps_o)
    poisons = {0: (1, float("nan")), 2: (4, float("inf"))}  # step 0: before any optimizer state exists
    for step in range(5):
        poison = poisons.get(step)
        set_grads(ps_o, step, poison=poison)
        before = snapshot(opt_o, ps_o)
        t_o = fusedclip.clip_and_step(opt_o, 1.5, skip_nonfinite=True)
        if poison is not None:
            assert not torch.isfinite(t_o)
            params, states = before
            for p, q, st in zip(ps_o, params, states):
                assert torch.equal(p.detach(), q)
                now = opt_o.state.get(p, {})
                # A skipped first step may create fresh state (zeros, step 0) but never moves it.
                assert all(torch.equal(now[k], v) for k, v in st.items())
                for k, v in now.items():
                    if k not in st:
                        assert not bool(v.ne(0).any()), f"{kind}: state {k} created non-zero by a skipped step"
            continue
        set_grads(ps_s, step)
        t_s = torch_clip(ps_s, 1.5)
        opt_s.step()
        torch.testing.assert_close(t_o, t_s, rtol=1e-6, atol=0)
        assert_same(opt_s, opt_o, ps_s, ps_o)


def test_without_skip_nonfinite_matches_torch_on_inf():
    # torch clips by an infinite norm (coef 0) and steps; so do we.
    ps_s = make_params(3)
    ps_o = clone_params(ps_s)
    opt_s, opt_o = OPTIMIZERS["sgd-fused"](ps_s), OPTIMIZERS["sgd-fused"](ps_o)
    set_grads(ps_s, 0)
    set_grads(ps_o, 0)
    torch_clip(ps_s, 1.0)
    opt_s.step()
    fusedclip.clip_and_step(opt_o, 1.0)
    for step in (1, 2):
        set_grads(ps_s, step, poison=(0, float("inf")) if step == 1 else None)
        set_grads(ps_o, step, poison=(0, float("inf")) if step == 1 else None)
        torch_clip(ps_s, 1.0)
        opt_s.step()
        fusedclip.clip_and_step(opt_o, 1.0)
        for x, y in zip(ps_s, ps_o):
            torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_bad_arguments_touch_nothing():
    ps = make_params(4)
    set_grads(ps, 0)
    opt = OPTIMIZERS["adamw-fused"](ps)
    before = snapshot(opt, ps)
    grads = [p.grad.clone() for p in ps]
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_and_step(opt, float("nan"))
    with pytest.raises(ValueError, match="norm_type"):
        fusedclip.clip_and_step(opt, 1.0, norm_type=-2)
    assert all(torch.equal(p.detach(), q) for p, q in zip(ps, before[0]))
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads))
    assert not opt.state
