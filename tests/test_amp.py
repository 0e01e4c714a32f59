"""unscale_and_clip_grad_norm_ against torch's sequence: scaler.unscale_, clip_grad_norm_, scaler.step, update."""

import math

import pytest
import torch
from torch.amp.grad_scaler import OptState

import fusedclip
from fusedclip.patching import TORCH_ORIGINALS

from reference import random_grads, random_tensor, ref_total_norm

torch_clip = TORCH_ORIGINALS["clip_grad_norm_"]  # torch's own, even if a test left torch patched


def make_params(seed, count=9):
    grads = random_grads(count, (torch.float32,), seed=seed, max_numel=70)
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(random_tensor(g.shape, g.dtype, gen=gen)) for g in grads]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def set_scaled_grads(ps, step, scale, poison=None):
    """Fresh 'scaled' gradients for one step; poison = (tensor index, value) puts a NaN/inf in one gradient."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(ps):
        g = random_tensor(p.shape, torch.float64, gen=gen, scale=0.5 + i) * scale
        g = g.to(p.dtype)
        if poison is not None and poison[0] == i:
            g.view(-1)[g.numel() // 2] = poison[1]
        p.grad = g


def make_scaler(init_scale=2.0**10):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    scaler.scale(torch.ones(()))  # lazily creates the scale tensor, as the first scaler.scale(loss) would
    return scaler


def assert_same_state(opt_a, opt_b, pa, pb):
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=2e-6, atol=1e-7)
        if x.grad is not None:
            torch.testing.assert_close(y.grad, x.grad, rtol=2e-6, atol=1e-7, equal_nan=True)
        sx, sy = opt_a.state.get(x, {}), opt_b.state.get(y, {})
        assert sx.keys() == sy.keys()
        for k in sx:
            torch.testing.assert_close(sy[k], sx[k], rtol=2e-6, atol=1e-7)


POISON = {2: (3, float("inf")), 4: (0, float("nan")), 5: (6, float("-inf"))}


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 0.0, float("-inf")])
@pytest.mark.parametrize("fused", [False, True])
def test_matches_stock_sequence_over_steps(norm_type, fused):
    ps_stock = make_params(0)
    ps_ours = clone_params(ps_stock)
    opt_stock = torch.optim.AdamW(ps_stock, lr=1e-2, fused=fused)
    opt_ours = torch.optim.AdamW(ps_ours, lr=1e-2, fused=fused)
    sc_stock, sc_ours = make_scaler(), make_scaler()
    max_norm = 3.0 if norm_type != 0 else 5.0
    for step in range(7):
        poison = POISON.get(step)
        set_scaled_grads(ps_stock, step, sc_stock.get_scale(), poison)
        set_scaled_grads(ps_ours, step, sc_ours.get_scale(), poison)
        scaled = [p.grad.clone() for p in ps_ours]
        sc_stock.unscale_(opt_stock)
        t_stock = torch_clip(ps_stock, max_norm, norm_type)
        t_ours = fusedclip.unscale_and_clip_grad_norm_(opt_ours, sc_ours, max_norm, norm_type)
        assert t_ours.dtype == torch.float32
        if poison is None:
            torch.testing.assert_close(t_ours, t_stock.float(), rtol=1e-6, atol=0)
            ref = ref_total_norm([g / sc_ours.get_scale() for g in scaled], norm_type)
            assert math.isclose(t_ours.item(), ref, rel_tol=1e-5)
        elif norm_type > 0:
            assert not math.isfinite(t_ours.item())
        # The scaler's record is torch's: per-device flags with the same values, stage UNSCALED.
        st_s, st_o = sc_stock._per_optimizer_states[id(opt_stock)], sc_ours._per_optimizer_states[id(opt_ours)]
        assert st_o["stage"] is OptState.UNSCALED
        assert st_o["found_inf_per_device"].keys() == st_s["found_inf_per_device"].keys()
        for d in st_s["found_inf_per_device"]:
            assert st_o["found_inf_per_device"][d].item() == st_s["found_inf_per_device"][d].item()
            assert st_o["found_inf_per_device"][d].dtype == torch.float32
        assert st_o["found_inf_per_device"][torch.device("cpu")].item() == (poison is not None)
        with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
            sc_ours.unscale_(opt_ours)
        sc_stock.step(opt_stock)
        sc_ours.step(opt_ours)
        sc_stock.update()
        sc_ours.update()
        assert sc_ours.get_scale() == sc_stock.get_scale()
        assert sc_ours._get_growth_tracker() == sc_stock._get_growth_tracker()
        if poison is None:
            assert_same_state(opt_stock, opt_ours, ps_stock, ps_ours)
    # The schedule really moved: grew on the finite streak, backed off on the poisoned steps.
    assert sc_ours.get_scale() != 2.0**10


def test_two_optimizers_share_one_scaler():
    a_stock, b_stock = make_params(1, 5), make_params(2, 6)
    a_ours, b_ours = clone_params(a_stock), clone_params(b_stock)
    opts_stock = [torch.optim.Adam(a_stock, lr=1e-2), torch.optim.SGD(b_stock, lr=0.1, momentum=0.9)]
    opts_ours = [torch.optim.Adam(a_ours, lr=1e-2), torch.optim.SGD(b_ours, lr=0.1, momentum=0.9)]
    sc_stock, sc_ours = make_scaler(), make_scaler()
    for step in range(6):
        poison_b = (1, float("nan")) if step == 3 else None
        for ps, sc, poison in ((a_stock, sc_stock, None), (b_stock, sc_stock, poison_b), (a_ours, sc_ours, None),
                               (b_ours, sc_ours, poison_b)):
            set_scaled_grads(ps, step, sc.get_scale(), poison)
        totals_stock, totals_ours = [], []
        for opt, ps in zip(opts_stock, (a_stock, b_stock)):
            sc_stock.unscale_(opt)
            totals_stock.append(torch_clip(ps, 2.0))
        for opt in opts_ours:
            totals_ours.append(fusedclip.unscale_and_clip_grad_norm_(opt, sc_ours, 2.0))
        for opt in opts_stock:
            sc_stock.step(opt)
        for opt in opts_ours:
            sc_ours.step(opt)
        sc_stock.update()
        sc_ours.update()
        assert sc_ours.get_scale() == sc_stock.get_scale()
        torch.testing.assert_close(totals_ours[0], totals_stock[0], rtol=1e-6, atol=0)
        assert_same_state(opts_stock[0], opts_ours[0], a_stock, a_ours)  # opt A stepped even on step 3
        if poison_b is None:
            torch.testing.assert_close(totals_ours[1], totals_stock[1], rtol=1e-6, atol=0)
            assert_same_state(opts_stock[1], opts_ours[1], b_stock, b_ours)
    assert sc_ours.get_scale() < 2.0**10 * 2 ** 3  # backed off once


def test_disabled_scaler_is_plain_clip_and_errors_match_torch():
    ps = make_params(3)
    set_scaled_grads(ps, 0, 1.0)
    ref = clone_params(ps)
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    opt = torch.optim.SGD(ps, lr=0.1)
    off = torch.amp.GradScaler("cpu", enabled=False)
    total = fusedclip.unscale_and_clip_grad_norm_(opt, off, 0.5)
    torch.testing.assert_close(total, torch_clip(ref, 0.5), rtol=1e-6, atol=0)
    for r, p in zip(ref, ps):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-7, atol=0)

    sc = make_scaler()
    set_scaled_grads(ps, 1, sc.get_scale())
    sc.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        fusedclip.unscale_and_clip_grad_norm_(opt, sc, 1.0)
    sc.update()
    half = torch.nn.Parameter(torch.randn(5).half())
    half.grad = torch.randn(5).half()
    ps = ps + [half]
    opt = torch.optim.SGD(ps, lr=0.1)
    before = [p.grad.clone() for p in ps]
    with pytest.raises(ValueError, match="FP16"):
        fusedclip.unscale_and_clip_grad_norm_(opt, sc, 1.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, ps))  # nothing touched
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.unscale_and_clip_grad_norm_(opt, sc, -1.0)
    with pytest.raises(AssertionError, match="_scale is None"):
        fusedclip.unscale_and_clip_grad_norm_(opt, torch.amp.GradScaler("cpu"), 1.0)


def test_scale_below_one_unscales_up():
    # inv_scale * coef > 1 must still be applied (a backend may only skip an exact 1).
    ps = make_params(4)
    ref = clone_params(ps)
    sc_o, sc_s = make_scaler(0.25), make_scaler(0.25)
    set_scaled_grads(ps, 0, 0.25)
    set_scaled_grads(ref, 0, 0.25)
    opt_o, opt_s = torch.optim.SGD(ps, lr=0.1), torch.optim.SGD(ref, lr=0.1)
    t_o = fusedclip.unscale_and_clip_grad_norm_(opt_o, sc_o, 1e6)
    sc_s.unscale_(opt_s)
    t_s = torch_clip(ref, 1e6)
    torch.testing.assert_close(t_o, t_s, rtol=1e-6, atol=0)
    for a, b in zip(ref, ps):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
