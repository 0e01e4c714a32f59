"""Adaptive clipping: AGC against float64 re-implementations of timm's and optax's formulas, ZClip against the
`zclip` package step by step, AutoClip against numpy.percentile, state-dict round trips, argument errors."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

import fusedclip
from reference import FLOAT_DTYPES, TOTAL_RTOL, VALUE_ULPS, random_tensor, ref_total_norm, ulp
from sync_check import cold_plans, sync_errors



def reference_zclip():
    """The ZClip oracle (CI installs zclip==1.0.0); only the tests that compare with it skip without it."""
    return pytest.importorskip("zclip", reason="the ZClip oracle: pip install --no-deps zclip==1.0.0")


# ---------------------------------------------------------------------------------------------------------
# helpers


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, acc: torch.dtype, what: str) -> None:
    """`got` within the rounding of its dtype plus the relative error a norm in `acc` may carry (the
    coefficients here come from norms, so they carry the norm tolerance of the one table)."""
    exp = expected.to(torch.float64)
    act = got.detach().to("cpu", torch.float64)
    rel = 2 * TOTAL_RTOL[acc] + VALUE_ULPS[got.dtype] * ulp(got.dtype)
    tol = exp.abs() * rel + torch.finfo(got.dtype).tiny
    bad = ~((act - exp).abs() <= tol)
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {got.numel()} values off; expected {exp[bad][:3].tolist()}, "
        f"got {act[bad][:3].tolist()}"
    )


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


# ---------------------------------------------------------------------------------------------------------
# AGC oracles, float64, straight from the published formulas


def ref_unit_norms_timm(x: torch.Tensor, p: float) -> torch.Tensor:
    x = x.detach().to("cpu", torch.float64)
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x, p)
    return torch.linalg.vector_norm(x, p, dim=tuple(range(1, x.dim())), keepdim=True)


def ref_unit_norms_optax(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().to("cpu", torch.float64)
    if x.squeeze().dim() <= 1:
        return (x * x).sum().sqrt()
    if x.dim() in (2, 3):
        return (x * x).sum(dim=0, keepdim=True).sqrt()
    assert x.dim() == 4
    return (x * x).sum(dim=(0, 1, 2), keepdim=True).sqrt()


def ref_agc(w: torch.Tensor, g: torch.Tensor, clip_factor: float, eps: float, p: float, convention: str):
    """Expected gradient (float64) and whether each element's unit was clipped."""
    if convention == "timm":
        w_norm, g_norm = ref_unit_norms_timm(w, p), ref_unit_norms_timm(g, p)
    else:
        w_norm, g_norm = ref_unit_norms_optax(w), ref_unit_norms_optax(g)
    max_norm = w_norm.clamp(min=eps) * clip_factor
    g64 = g.detach().to("cpu", torch.float64)
    clipped = g64 * (max_norm / g_norm.clamp(min=1e-6))
    keep = (g_norm < max_norm).expand_as(g64)
    return torch.where(keep, g64, clipped), ~keep


AGC_SHAPES = [(), (1,), (17,), (7, 13), (1, 9), (9, 1), (5, 3, 3, 3), (4, 6, 5), (0, 5), (3, 1, 1, 2), (31,)]


def agc_params(dtypes, device, seed, shapes=AGC_SHAPES, copies=3):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for k in range(copies):
        for i, shape in enumerate(shapes):
            dtype = dtypes[(i + k) % len(dtypes)]
            w = torch.nn.Parameter(random_tensor(shape, dtype, device, gen, scale=float(1 + i % 4)))
            # Per-unit gradient scales spread over two decades, so some units clip and some do not.
            g = random_tensor(shape, dtype, device, gen, scale=0.003 * 10 ** (2 * ((i + k) % 5) / 4))
            w.grad = g
            params.append(w)
    return params


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16, torch.float64, torch.float16)])
def test_agc_matches_timm_formula(backend_device, norm_type, dtypes):
    backend, device = backend_device
    params = agc_params(dtypes, device, seed=11)
    originals = [w.grad.clone() for w in params]
    fusedclip.adaptive_clip_grad_(params, clip_factor=0.05, eps=1e-3, norm_type=norm_type, backend=backend)
    n_clipped = n_kept = 0
    for i, (w, g0) in enumerate(zip(params, originals)):
        expected, clipped = ref_agc(w, g0, 0.05, 1e-3, norm_type, "timm")
        n_clipped += int(clipped.sum())
        n_kept += int((~clipped).sum())
        assert w.grad.dtype == g0.dtype and w.grad.shape == g0.shape
        # Each tensor's norms are accumulated in its own accumulation dtype (float32 unless float64).
        acc = fusedclip.backends.acc_dtype([g0.dtype])
        assert_close_rel(w.grad, expected.to(g0.dtype), acc, f"gradient {i} {tuple(g0.shape)} {g0.dtype}")
    assert n_clipped > 0 and n_kept > 0, "inputs must exercise both branches"


def test_agc_many_tensors_mixed_dtypes_and_strays(backend_device):
    """On the kernel backends, the unit-plan path: 300+ tensors of every dtype and odd shapes (0-D, 1-D, rows
    longer than a chunk), plus a non-contiguous parameter (its grad is contiguous: the norms of one pair split
    between kernel and torch)."""
    backend, device = backend_device
    shapes = [(), (1,), (7,), (5, 3), (9, 1), (1, 9), (3, 2, 2), (4, 1, 3, 3), (2, 700), (13,)]
    params = agc_params(FLOAT_DTYPES, device, seed=23, shapes=shapes, copies=31)
    gen = torch.Generator().manual_seed(24)
    odd = torch.nn.Parameter(random_tensor((6, 11), torch.float32, device, gen).t())  # (11, 6), not contiguous
    odd.grad = random_tensor((11, 6), torch.float32, device, gen, scale=0.01)
    params.insert(17, odd)
    assert len(params) > 300 and not odd.is_contiguous()
    originals = [w.grad.clone() for w in params]
    fusedclip.adaptive_clip_grad_(params, clip_factor=0.05, eps=1e-3, backend=backend)
    n_clipped = n_kept = 0
    for i, (w, g0) in enumerate(zip(params, originals)):
        expected, clipped = ref_agc(w, g0, 0.05, 1e-3, 2.0, "timm")
        n_clipped += int(clipped.sum())
        n_kept += int((~clipped).sum())
        acc = fusedclip.backends.acc_dtype([g0.dtype])
        assert_close_rel(w.grad, expected.to(g0.dtype), acc, f"gradient {i} {tuple(g0.shape)} {g0.dtype}")
    assert n_clipped > 0 and n_kept > 0, "inputs must exercise both branches"


def test_agc_optax_convention_hwio(backend_device):
    backend, device = backend_device
    shapes = [(3, 3, 4, 6), (1, 1, 5, 7), (2, 5, 3, 1), (7, 5), (4, 3, 5), (1, 1, 1, 8), (9,), ()]
    params = agc_params((torch.float32, torch.float64), device, seed=5, shapes=shapes)
    originals = [w.grad.clone() for w in params]
    fusedclip.adaptive_clip_grad_(params, clip_factor=0.05, eps=1e-3, convention="optax", backend=backend)
    n_clipped = n_kept = 0
    for i, (w, g0) in enumerate(zip(params, originals)):
        expected, clipped = ref_agc(w, g0, 0.05, 1e-3, 2.0, "optax")
        n_clipped += int(clipped.sum())
        n_kept += int((~clipped).sum())
        acc = fusedclip.backends.acc_dtype([g0.dtype])
        assert_close_rel(w.grad, expected.to(g0.dtype), acc, f"gradient {i} {tuple(g0.shape)}")
    assert n_clipped > 0 and n_kept > 0, "inputs must exercise both branches"
    # The conventions differ on a 4-D kernel: optax keeps the last dim (HWIO), timm the first (OIHW).
    gen = torch.Generator().manual_seed(156)
    w = torch.nn.Parameter(random_tensor((3, 3, 4, 6), gen=gen))
    w.grad = random_tensor((3, 3, 4, 6), gen=gen)
    by_timm, by_optax = w.grad.clone(), w.grad.clone()
    fusedclip.adaptive_clip_grad_([w], 0.05, backend=backend)
    by_timm, w.grad = w.grad, by_optax
    fusedclip.adaptive_clip_grad_([w], 0.05, convention="optax", backend=backend)
    assert not torch.allclose(by_timm, w.grad)


def test_agc_optax_rejects_5d():
    w = torch.nn.Parameter(random_tensor((2, 2, 2, 2, 2)))
    w.grad = random_tensor((2, 2, 2, 2, 2))
    before = w.grad.clone()
    with pytest.raises(ValueError, match="optax convention"):
        fusedclip.adaptive_clip_grad_([w], convention="optax")
    assert torch.equal(w.grad, before)


def test_agc_eps_lets_zero_parameters_move():
    # Parameters at zero (fresh init): the limit is clip_factor * eps per unit.
    w = torch.nn.Parameter(torch.zeros(4, 6))
    g = random_tensor((4, 6), gen=torch.Generator().manual_seed(177), scale=3.0)
    w.grad = g.clone()
    fusedclip.adaptive_clip_grad_(w, clip_factor=0.5, eps=0.01)
    norms = torch.linalg.vector_norm(w.grad, dim=1)
    assert torch.allclose(norms, torch.full((4,), 0.005), rtol=1e-5)


def test_agc_skips_missing_grads_and_accepts_module():
    m = torch.nn.Sequential(torch.nn.Linear(9, 5), torch.nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(2)
    for p in m.parameters():
        p.grad = random_tensor(p.shape, gen=gen, scale=2.0)
    m[1].bias.grad = None
    originals = [p.grad.clone() if p.grad is not None else None for p in m.parameters()]
    fusedclip.adaptive_clip_grad_(m, clip_factor=0.02)
    for p, g0 in zip(m.parameters(), originals):
        if g0 is None:
            assert p.grad is None
            continue
        expected, _ = ref_agc(p, g0, 0.02, 1e-3, 2.0, "timm")
        assert_close_rel(p.grad, expected.to(g0.dtype), torch.float32, "module gradient")
    fusedclip.adaptive_clip_grad_([])  # nothing to do, like timm


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(clip_factor=-0.1), ValueError, "clip_factor"),
        (dict(clip_factor=float("nan")), ValueError, "clip_factor"),
        (dict(eps=-1.0), ValueError, "eps"),
        (dict(norm_type=-2.0), ValueError, "norm_type"),
        (dict(convention="keras"), ValueError, "convention"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_agc_bad_arguments(kwargs, error, match):
    params = agc_params((torch.float32,), "cpu", seed=3, shapes=[(5, 4), (7,)], copies=1)
    before = [p.grad.clone() for p in params]
    with pytest.raises(error, match=match):
        fusedclip.adaptive_clip_grad_(params, **kwargs)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_agc_bad_gradients_touch_nothing():
    params = agc_params((torch.float32,), "cpu", seed=4, shapes=[(5, 4), (7,)], copies=1)
    before = [p.grad.clone() for p in params]
    bad = torch.nn.Parameter(random_tensor((3, 3)))
    bad.grad = random_tensor((3, 3)).to_sparse()
    with pytest.raises(TypeError, match="dense"):
        fusedclip.adaptive_clip_grad_(params + [bad])
    with pytest.raises(TypeError, match="not a Tensor"):
        fusedclip.adaptive_clip_grad_(params + ["w"])
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


# ---------------------------------------------------------------------------------------------------------
# ZClip against the zclip package


class Net(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3)
        self.fc1 = torch.nn.Linear(13, 11)
        self.fc2 = torch.nn.Linear(11, 1)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.to(dtype)


def norm_sequence(steps: int, seed: int) -> list[float]:
    """Target total norms: noisy plateau with a slow drift, two spikes of different size, recovery."""
    gen = np.random.default_rng(seed)
    targets = []
    for s in range(steps):
        t = (1.0 + 0.01 * s) * (1 + 0.15 * gen.standard_normal())
        if s in (14, 27):
            t *= 9.0
        if s in (20, 33):
            t *= 2.2
        targets.append(abs(t) + 0.05)
    return targets


def grads_with_norm(params, target: float, gen: torch.Generator) -> list[torch.Tensor]:
    grads = [random_tensor(p.shape, p.dtype, p.device, gen, scale=float(1 + i % 3)) for i, p in enumerate(params)]
    total = ref_total_norm(grads, 2.0)
    return [(g.to(torch.float64) * (target / total)).to(p.dtype) for g, p in zip(grads, params)]


ZCLIP_CASES = [
    dict(mode="zscore", clip_option="adaptive_scaling", max_grad_norm=None),
    dict(mode="zscore", clip_option="adaptive_scaling", max_grad_norm=None, clip_factor=0.8),
    dict(mode="zscore", clip_option="adaptive_scaling", max_grad_norm=3.0, skip_update_on_spike=True),
    dict(mode="zscore", clip_option="adaptive_scaling"),  # default max_grad_norm=1.0
    dict(mode="zscore", clip_option="mean", max_grad_norm=None),
    dict(mode="zscore", clip_option="mean", max_grad_norm=3.0, skip_update_on_spike=True, z_thresh=1.5),
    dict(mode="percentile", max_grad_norm=None),
    dict(mode="percentile", max_grad_norm=3.0, skip_update_on_spike=True),
    dict(mode="percentile", max_grad_norm=None, z_thresh=1.0, alpha=0.9),
    dict(mode="zscore", clip_option="adaptive_scaling", max_grad_norm=None, warmup_steps=0),
    dict(mode="zscore", clip_option="adaptive_scaling", max_grad_norm=None, warmup_steps=1, dtype=torch.float64),
]


@pytest.mark.parametrize("case", ZCLIP_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_zclip_matches_reference_step_by_step(case):
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    case.setdefault("warmup_steps", 10)
    ours_model = Net(dtype)
    ref_model = copy.deepcopy(ours_model)
    ours, ref = fusedclip.ZClip(**case), reference_zclip().ZClip(**case)
    params, ref_params = list(ours_model.parameters()), list(ref_model.parameters())
    gen = torch.Generator().manual_seed(7)
    clipped_steps = untouched_steps = 0
    for step, target in enumerate(norm_sequence(40, seed=1)):
        grads = grads_with_norm(params, target, gen)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        total = ours.step(ours_model)
        ref_total = ref.step(ref_model)
        assert isinstance(total, torch.Tensor) and total.dtype == dtype
        assert math.isclose(total.item(), ref_total, rel_tol=TOTAL_RTOL[dtype]), (step, total.item(), ref_total)
        changed = False
        for p, q, g in zip(params, ref_params, grads):
            assert_close_rel(p.grad, q.grad, dtype, f"step {step}")
            changed |= not torch.equal(q.grad, g)
        if step >= max(case["warmup_steps"], 1):
            clipped_steps += changed
            untouched_steps += not changed
            assert math.isclose(ours.mean.item(), ref.mean, rel_tol=1e-5), (step, ours.mean.item(), ref.mean)
            assert math.isclose(ours.var.item(), ref.var, rel_tol=1e-4, abs_tol=1e-12), (step, ours.var.item(), ref.var)
        assert ours.initialized == ref.initialized
    assert clipped_steps > 0, "the sequence must trigger clipping after warm-up"
    if case.get("max_grad_norm", 1.0) != 1.0:  # None or 3.0: the plateau stays under every limit
        assert untouched_steps > 0, "and leave some steps alone"


def test_zclip_parameters_list_and_missing_grads():
    model = Net()
    params = list(model.parameters())
    zclip = reference_zclip()
    ours, ref = fusedclip.ZClip(warmup_steps=3, max_grad_norm=None), zclip.ZClip(warmup_steps=3, max_grad_norm=None)
    ref_model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    for step, target in enumerate([1.0, 1.2, 0.9, 1.1, 8.0, 1.0]):
        grads = grads_with_norm(params, target, gen)
        set_grads(params, grads)
        set_grads(ref_model.parameters(), grads)
        params[1].grad = None  # a parameter without a gradient is skipped by both
        list(ref_model.parameters())[1].grad = None
        total = ours.step(p for p in params)  # a generator works
        assert math.isclose(total.item(), ref.step(ref_model), rel_tol=1e-5)
        for p, q in zip(params, ref_model.parameters()):
            if p.grad is not None:
                assert_close_rel(p.grad, q.grad, torch.float32, f"step {step}")


def _run(clipper, model, targets, seed):
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    out = []
    for target in targets:
        set_grads(params, grads_with_norm(params, target, gen))
        out.append((clipper.step(model).clone(), [p.grad.clone() for p in params]))
    return out


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("split", [3, 12])  # during warm-up and after it
def test_zclip_state_dict_round_trip(split):
    targets = norm_sequence(20, seed=4)
    kwargs = dict(warmup_steps=6, max_grad_norm=None, mode="zscore")
    model = Net()
    a = fusedclip.ZClip(**kwargs)
    _run(a, model, targets[:split], seed=1)
    b = fusedclip.ZClip(**kwargs)
    b.load_state_dict(_roundtrip(a.state_dict()))
    assert b.initialized == a.initialized
    model_b = copy.deepcopy(model)
    ra = _run(a, model, targets[split:], seed=2)
    rb = _run(b, model_b, targets[split:], seed=2)
    for (ta, ga), (tb, gb) in zip(ra, rb):
        assert torch.equal(ta, tb)
        assert all(torch.equal(x, y) for x, y in zip(ga, gb))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)


def test_zclip_load_state_dict_checks():
    a = fusedclip.ZClip(warmup_steps=4)
    _run(a, Net(), [1.0, 1.1], seed=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        fusedclip.ZClip(warmup_steps=5).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        fusedclip.ZClip(warmup_steps=4).load_state_dict({"steps": 2})
    bad = a.state_dict()
    bad["warmup_norms"] = bad["warmup_norms"][:1]
    with pytest.raises(ValueError, match="warmup_norms"):
        fusedclip.ZClip(warmup_steps=4).load_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="median"), ValueError, "mode"),
        (dict(clip_option="max"), ValueError, "clip_option"),
        (dict(alpha=1.5), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(z_thresh=0.0), ValueError, "z_thresh"),
        (dict(z_thresh=-1.0, mode="percentile"), ValueError, "z_thresh"),
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(warmup_steps=2.5), TypeError, "warmup_steps"),
        (dict(clip_factor=0.0), ValueError, "clip_factor"),
        (dict(eps="tiny"), TypeError, "eps"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_zclip_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedclip.ZClip(**kwargs)


def test_stateful_clippers_reject_bad_step_input():
    for clipper in (fusedclip.ZClip(), fusedclip.AutoClip()):
        with pytest.raises(ValueError, match="no parameters"):
            clipper.step([])
        with pytest.raises(TypeError, match="iterable"):
            clipper.step(3.0)
        with pytest.raises(TypeError, match="not a Tensor"):
            clipper.step([torch.nn.Parameter(torch.ones(2)), "x"])


# ---------------------------------------------------------------------------------------------------------
# AutoClip against numpy.percentile


@pytest.mark.parametrize(
    "percentile, history, steps",
    [(10.0, 1000, 15), (10.0, 5, 17), (37.5, 4, 13), (0.0, 3, 8), (100.0, 6, 9), (50.0, 1, 4), (99.9, 7, 7)],
)
def test_autoclip_matches_numpy_percentile(backend_device, percentile, history, steps):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(int(percentile * 10) + history)
    rng = np.random.default_rng(history)
    shapes = [(7, 3), (13,), (1,), (4, 5, 2)]
    params = [torch.nn.Parameter(random_tensor(s, device=device, gen=gen)) for s in shapes]
    clipper = fusedclip.AutoClip(percentile=percentile, history=history, backend=backend)
    seen: list[float] = []
    clipped = 0
    for step in range(steps):
        scale = float(np.exp(rng.normal(0.0, 1.0)))
        grads = [random_tensor(s, device=device, gen=gen, scale=scale) for s in shapes]
        set_grads(params, grads)
        total = clipper.step(params)
        assert math.isclose(total.item(), ref_total_norm(grads, 2.0), rel_tol=TOTAL_RTOL[torch.float32])
        seen.append(total.item())
        expected_thr = float(np.percentile(np.array(seen[-history:], dtype=np.float64), percentile))
        assert clipper.threshold.item() == expected_thr, (step, clipper.threshold.item(), expected_thr)  # same bits
        np.testing.assert_array_equal(clipper.recorded.cpu().numpy(), np.array(seen[-history:]))
        coef = min(expected_thr / (total.item() + 1e-6), 1.0)
        clipped += coef < 1
        for p, g in zip(params, grads):
            assert_close_rel(p.grad, (g.to(torch.float64) * coef).to(g.dtype), torch.float32, f"step {step}")
    if percentile < 100 and history > 1:
        assert clipped > 0


def test_autoclip_nan_norm_poisons_threshold_like_numpy():
    p = torch.nn.Parameter(random_tensor((5,)))
    clipper = fusedclip.AutoClip(percentile=20.0, history=3)
    p.grad = random_tensor((5,))
    clipper.step([p])
    p.grad = random_tensor((5,))
    p.grad[2] = float("nan")
    clipper.step([p])
    assert math.isnan(clipper.threshold.item())
    assert math.isnan(float(np.percentile([1.0, float("nan")], 20.0)))
    assert bool(p.grad.isnan().all())


@pytest.mark.parametrize("split, history_b", [(3, 4), (9, 4), (9, 6), (9, 2)])
def test_autoclip_state_dict_round_trip(split, history_b):
    rng_targets = list(np.exp(np.random.default_rng(0).normal(size=16)))
    a = fusedclip.AutoClip(percentile=30.0, history=4)
    model = Net()
    _run(a, model, rng_targets[:split], seed=1)
    state = _roundtrip(a.state_dict())
    b = fusedclip.AutoClip(percentile=30.0, history=history_b)
    b.load_state_dict(state)
    kept = state["norms"][-history_b:]
    assert torch.equal(b.recorded, kept)
    if history_b == 4:
        # Same configuration: the restored clipper continues exactly like the original.
        model_b = copy.deepcopy(model)
        ra = _run(a, model, rng_targets[split:], seed=2)
        rb = _run(b, model_b, rng_targets[split:], seed=2)
        for (ta, ga), (tb, gb) in zip(ra, rb):
            assert torch.equal(ta, tb)
            assert all(torch.equal(x, y) for x, y in zip(ga, gb))
        assert torch.equal(a.recorded, b.recorded)
    else:
        # Another history keeps the newest norms that fit and goes on appending after them.
        _run(b, Net(), [2.0, 3.0, 4.0], seed=3)
        rec = b.recorded.tolist()
        assert len(rec) == min(history_b, kept.numel() + 3)
        assert rec[-3:] == pytest.approx([2.0, 3.0, 4.0][-len(rec):] if len(rec) < 3 else [2.0, 3.0, 4.0], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(percentile=-1.0), ValueError, "percentile"),
        (dict(percentile=100.5), ValueError, "percentile"),
        (dict(percentile=float("nan")), ValueError, "percentile"),
        (dict(history=0), ValueError, "history"),
        (dict(history=2.0), TypeError, "history"),
    ],
)
def test_autoclip_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedclip.AutoClip(**kwargs)


def test_autoclip_load_state_dict_checks():
    with pytest.raises(ValueError, match="lacks"):
        fusedclip.AutoClip().load_state_dict({"count": 3})
    with pytest.raises(ValueError, match="norms"):
        fusedclip.AutoClip().load_state_dict({"count": 1, "norms": torch.ones(3, dtype=torch.float64)})


# ---------------------------------------------------------------------------------------------------------
# DTensor: a clear error until the distributed issue lands


def test_dtensor_is_a_clear_error():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if dist.get_world_size() != 1:
            pytest.skip("needs a single-rank group")
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(random_tensor((4, 3)), mesh, [Shard(0)]))
        w.grad = distribute_tensor(random_tensor((4, 3)), mesh, [Shard(0)])
        before = w.grad.full_tensor().clone()
        for call in (
            lambda: fusedclip.adaptive_clip_grad_([w]),
            lambda: fusedclip.ZClip().step([w]),
            lambda: fusedclip.AutoClip().step([w]),
        ):
            with pytest.raises(NotImplementedError, match="DTensor"):
                call()
        assert torch.equal(w.grad.full_tensor(), before)
    finally:
        if own_group:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# GPU: no host sync on the default path


@pytest.mark.gpu
def test_adaptive_clipping_is_sync_free_on_cuda():
    """AGC, ZClip and AutoClip on CUDA: a cold first step (their plans are built inside the checked block) and
    steady steps (warm-up, EMA, ring wraparound, a spike), each under set_sync_debug_mode("error"). After each
    step, totals and gradients match the same clippers run on CPU copies by the torch backend."""
    params = agc_params((torch.float32, torch.bfloat16), "cuda", seed=9, copies=2)
    ref = [torch.nn.Parameter(p.detach().cpu().clone()) for p in params]
    zc, ac = fusedclip.ZClip(warmup_steps=2, max_grad_norm=None), fusedclip.AutoClip(history=3)
    zc_ref = fusedclip.ZClip(warmup_steps=2, max_grad_norm=None, backend="torch")
    ac_ref = fusedclip.AutoClip(history=3, backend="torch")
    cache = cold_plans()
    gen = torch.Generator().manual_seed(10)
    for step in range(6):
        for p, r in zip(params, ref):
            g = random_tensor(p.shape, p.dtype, "cpu", gen, scale=10.0 if step == 4 else 1.0)
            p.grad.copy_(g)  # same tensors every step: after the first, the plans are cached
            r.grad = g.clone()
        builds = cache.builds
        with sync_errors():
            fusedclip.adaptive_clip_grad_(params, 0.05)
            z_total = zc.step(params)
            a_total = ac.step(params)
        assert (cache.builds > builds) == (step == 0), (step, builds, cache.builds)
        fusedclip.adaptive_clip_grad_(ref, 0.05, backend="torch")
        z_ref, a_ref = zc_ref.step(ref), ac_ref.step(ref)
        assert math.isclose(z_total.item(), z_ref.item(), rel_tol=4e-5), (step, z_total.item(), z_ref.item())
        assert math.isclose(a_total.item(), a_ref.item(), rel_tol=4e-5), (step, a_total.item(), a_ref.item())
        for i, (p, r) in enumerate(zip(params, ref)):
            # Three clips in turn, each rounding to the gradient's dtype: 3 ulps, plus the norms' tolerance.
            got, want = p.grad.detach().cpu().double(), r.grad.double()
            tol = want.abs() * (4 * TOTAL_RTOL[torch.float32] + 3 * ulp(p.dtype)) + torch.finfo(p.dtype).tiny
            assert bool(((got - want).abs() <= tol).all()), (step, i, p.dtype, (got - want).abs().max().item())


@pytest.mark.gpu
@pytest.mark.profiler
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_agc_gpu_one_reduce_and_one_scale_launch(backend):
    """Profiler-counted: the kernel AGC path is one reduce (plus, for triton, its finalize) and one scale launch
    per call, and the whole call's kernel count does not grow with the number of tensors."""
    if backend not in fusedclip.available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    from torch.profiler import ProfilerActivity, profile

    ours = {"triton": ("_reduce_kernel", "_finalize_kernel", "_scale_kernel"), "cuda": ("norm_kernel", "scale_kernel")}

    def is_ours(name: str) -> bool:  # CUDA kernel names carry their namespace (demangled or not)
        return any(k in name for k in ours[backend]) and (backend == "triton" or "fusedclip" in name)

    def kernels(count):
        params = agc_params((torch.float32, torch.bfloat16), "cuda", seed=31, copies=count)
        fusedclip.adaptive_clip_grad_(params, 0.05, backend=backend)  # compile, build the plans
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fusedclip.adaptive_clip_grad_(params, 0.05, backend=backend)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]

    small, large = kernels(2), kernels(20)
    mine = [n for n in large if is_ours(n)]
    assert len(mine) == len(ours[backend]), mine
    for k in ours[backend]:
        assert sum(k in n for n in mine) == 1, (k, mine)
    assert len(large) == len(small), (small, large)  # the rest: a fixed handful of coefficient ops
