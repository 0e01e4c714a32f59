"""Inputs a new user passes without thinking twice: exhausted generators, a parameter listed twice, sparse
compressed gradients, meta tensors mixed with real ones. Each either works as torch defines it or says why not."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fusedclip
from reference import (
    NORM_TYPES,
    assert_rel_close,
    assert_total_close,
    params_with_grads,
    random_tensor,
    ref_total_norm,
)


def caught(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, seen


# --- an exhausted generator: torch's warning, from torch's functions only ---------------------------------------


def test_empty_generator_warns_as_torch_does():
    params = params_with_grads([random_tensor((5,), gen=torch.Generator().manual_seed(1))])
    ours, seen = caught(lambda: fusedclip.clip_grad_norm_((p for p in []), 1.0))
    stock, stock_seen = caught(lambda: torch.nn.utils.clip_grad_norm_((p for p in []), 1.0))
    assert torch.equal(ours, stock)
    assert [(w.category, str(w.message)) for w in seen] == [(w.category, str(w.message)) for w in stock_seen]
    assert len(seen) == 1 and "empty generator" in str(seen[0].message)
    assert seen[0].filename == __file__  # points at the caller, as torch's stacklevel does

    exhausted = (p for p in params)
    list(exhausted)
    with pytest.warns(UserWarning, match="`parameters` is an empty generator"):
        fusedclip.clip_grad_norm_(exhausted, 1.0)
    with fusedclip.patch_torch():
        with pytest.warns(UserWarning, match="empty generator"):
            torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)


def test_no_warning_where_torch_gives_none():
    params = params_with_grads([random_tensor((5,), gen=torch.Generator().manual_seed(2))])
    for call in [
        lambda: fusedclip.clip_grad_norm_([], 1.0),  # an empty list is deliberate
        lambda: fusedclip.clip_grad_norm_((p for p in params), 1e9),  # a generator with parameters
        lambda: fusedclip.clip_grad_value_((p for p in []), 1.0),  # torch warns in clip_grad_norm_ only
        lambda: fusedclip.clip_grads_with_norm_((p for p in []), 1.0, torch.tensor(1.0)),
        lambda: fusedclip.get_total_norm(t for t in []),
    ]:
        _, seen = caught(call)
        assert not seen, [str(w.message) for w in seen]


# --- a gradient listed twice: scaled twice, as torch does, with a warning -----------------------------------------


def test_parameter_listed_twice_is_scaled_twice_with_a_warning():
    gen = torch.Generator().manual_seed(3)
    grads = [random_tensor((7,), gen=gen, scale=3.0) for _ in range(3)]
    ours = params_with_grads([g.clone() for g in grads])
    stock = params_with_grads([g.clone() for g in grads])
    with pytest.warns(UserWarning, match=r"parameters\[3\] is parameters\[1\] again") as seen:
        total = fusedclip.clip_grad_norm_(ours + [ours[1]], 1.0)
    assert len([w for w in seen if "scaled twice" in str(w.message)]) == 1  # once per call, not per repeat
    stock_total = torch.nn.utils.clip_grad_norm_(stock + [stock[1]], 1.0)
    assert_total_close(total, stock_total.item(), torch.float32)
    for p, q in zip(ours, stock):
        torch.testing.assert_close(p.grad, q.grad, rtol=4 * torch.finfo(torch.float32).eps, atol=0)

    shared = params_with_grads([grads[0].clone(), grads[1].clone()])
    shared[1].grad = shared[0].grad  # two parameters, one gradient tensor
    with pytest.warns(UserWarning, match=r"parameters\[1\].grad is the same tensor as parameters\[0\].grad"):
        fusedclip.clip_grads_with_norm_(shared, 1.0, torch.tensor(10.0))
    with pytest.warns(UserWarning, match="scaled twice"):
        fusedclip.clip_grad_norm_per_tensor_(shared, 1.0)


def test_distinct_parameters_give_no_repeat_warning():
    params = params_with_grads([random_tensor((4,), gen=torch.Generator().manual_seed(4)) for _ in range(3)])
    params[1].grad = None
    _, seen = caught(lambda: fusedclip.clip_grad_norm_(params, 0.1))
    assert not seen, [str(w.message) for w in seen]


def test_input_checks_trace_without_a_graph_break():
    # The checks run on every clip, including inside a user's torch.compile(fullgraph=True) step.
    from fusedclip.arguments import warn_if_empty_generator, warn_if_repeated

    params = params_with_grads([random_tensor((4,), gen=torch.Generator().manual_seed(5)) for _ in range(2)])

    @torch.compile(backend="eager", fullgraph=True)
    def checked(params):
        grads = [p.grad for p in params]
        warn_if_empty_generator(params, params, stacklevel=1)
        warn_if_repeated(params, grads, stacklevel=1)
        return grads[0] * 2

    assert torch.equal(checked(params), params[0].grad * 2)


# --- sparse compressed gradients: clipped like COO ones -------------------------------------------------------

LAYOUTS = {
    "csr": lambda d: d.to_sparse_csr(),
    "csc": lambda d: d.to_sparse_csc(),
    "bsr": lambda d: d.to_sparse_bsr((2, 3)),
    "bsc": lambda d: d.to_sparse_bsc((2, 3)),
}


def sparse_dense(seed: int, dtype=torch.float32) -> torch.Tensor:
    """A 6 x 9 dense tensor with about half its entries zero, in whole 2 x 3 blocks and scattered."""
    gen = torch.Generator().manual_seed(seed)
    d = random_tensor((6, 9), torch.float64, gen=gen, scale=2.0)
    d[torch.rand(6, 9, generator=gen) < 0.4] = 0
    d[0:2, 3:6] = 0  # one block entirely implicit
    return d.to(dtype)


@pytest.mark.filterwarnings("ignore:Sparse .* tensor support is in beta")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_sparse_compressed_norms(layout, norm_type):
    dense = [sparse_dense(10), sparse_dense(11)]
    other = random_tensor((5,), gen=torch.Generator().manual_seed(12))
    tensors = [LAYOUTS[layout](d) for d in dense] + [other]
    total = fusedclip.get_total_norm(tensors, norm_type)
    assert_total_close(total, ref_total_norm(dense + [other], norm_type), torch.float32)
    _, per = fusedclip.multi_tensor_norm(tensors, norm_type, per_tensor=True)
    _, per_dense = fusedclip.multi_tensor_norm(dense + [other], norm_type, per_tensor=True)
    torch.testing.assert_close(per, per_dense, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:Sparse .* tensor support is in beta")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sparse_compressed_clipping(layout):
    dense = [sparse_dense(20), sparse_dense(21)]
    params = params_with_grads([LAYOUTS[layout](d) for d in dense])
    for p, d in zip(params, dense):
        p.data = LAYOUTS[layout](torch.zeros_like(d))  # a sparse parameter, so that autograd would give this layout
    ref = ref_total_norm(dense, 2.0)
    total = fusedclip.clip_grad_norm_(params, ref / 3)
    assert_total_close(total, ref, torch.float32)
    coef = min((ref / 3) / (total.item() + 1e-6), 1.0)
    for p, d in zip(params, dense):
        assert p.grad.layout == LAYOUTS[layout](d).layout
        assert_rel_close(p.grad.to_dense(), d.double() * coef, 2 * torch.finfo(torch.float32).eps)

    clipped = [p.grad.to_dense() for p in params]
    fusedclip.clip_grad_value_(params, 0.25)
    for p, c in zip(params, clipped):
        assert torch.equal(p.grad.to_dense(), c.clamp(-0.25, 0.25))

    norms = fusedclip.clip_grad_norm_per_tensor_(params, 0.1)
    for p, n in zip(params, norms):
        assert math.isclose(p.grad.to_dense().double().norm().item(), min(n.item(), 0.1), rel_tol=1e-5)


# --- meta tensors mixed with real ones ------------------------------------------------------------------------


def test_meta_mixed_with_real_gradients_is_a_clear_error():
    real = random_tensor((5,), gen=torch.Generator().manual_seed(30))
    params = params_with_grads([real.clone(), torch.empty(3, device="meta")])
    before = params[0].grad.clone()
    for call in [
        lambda: fusedclip.get_total_norm([p.grad for p in params]),
        lambda: fusedclip.clip_grad_norm_(params, 0.1),
        lambda: fusedclip.clip_grad_norm_per_tensor_(params, 0.1),
    ]:
        with pytest.raises(ValueError, match=r"gradient 1 .* meta device and gradient 0 on cpu"):
            call()
    assert torch.equal(params[0].grad, before)
    meta_only = fusedclip.get_total_norm([torch.empty(3, device="meta"), torch.empty(2, device="meta")])
    assert meta_only.device.type == "meta"  # all-meta calls (shape tracing) still work


# --- the suite's own randomness -------------------------------------------------------------------------------


def test_global_rngs_start_from_the_tests_own_seed(request):
    # conftest seeds torch, numpy and random per test; a test that draws from them sees the same values every run.
    import random

    import numpy as np
    from conftest import seed_for

    seed = seed_for(request.node.nodeid)
    drawn = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(drawn[0], torch.rand(3, generator=torch.Generator().manual_seed(seed)))
    assert np.array_equal(drawn[1], np.random.RandomState(seed).rand(2))
    assert drawn[2] == random.Random(seed).random()
