"""Bad input: a clear error naming the argument, and no gradient touched."""

import pytest
import torch

import fusedclip
from reference import random_grads


def make_params(seed=0):
    params = []
    for g in random_grads(4, seed=seed):
        p = torch.nn.Parameter(torch.empty_like(g))
        p.grad = g
        params.append(p)
    return params


def snapshot(params):
    return [p.grad.clone() for p in params]


def assert_untouched(params, before):
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan")])
def test_bad_max_norm(max_norm):
    params = make_params()
    before = snapshot(params)
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_grad_norm_(params, max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_grad_norm_per_tensor_(params, max_norm)
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.clip_grads_with_norm_(params, max_norm, torch.tensor(1.0))
    with pytest.raises(ValueError, match="max_norm"):
        fusedclip.GradClipper(params, max_norm)
    assert_untouched(params, before)


@pytest.mark.parametrize("clip_value", [-0.5, float("nan")])
def test_bad_clip_value(clip_value):
    params = make_params()
    before = snapshot(params)
    with pytest.raises(ValueError, match="clip_value"):
        fusedclip.clip_grad_value_(params, clip_value)
    assert_untouched(params, before)


def test_bad_clip_norm_tf():
    ts = random_grads(2)
    with pytest.raises(ValueError, match="clip_norm"):
        fusedclip.clip_by_global_norm(ts, -1.0)
    with pytest.raises(ValueError, match="clip_norm"):
        fusedclip.clip_by_norm(ts[0], float("nan"))
    with pytest.raises(ValueError, match="dim"):
        fusedclip.clip_by_norm(ts[0], 1.0, dim=5)
    x = ts[0].reshape(-1, 1)
    for bad in (True, 1.0, [0, 0.5], "0"):
        with pytest.raises(TypeError, match="dim"):
            fusedclip.clip_by_norm(x, 1.0, dim=bad)
    with pytest.raises(ValueError, match="twice"):
        fusedclip.clip_by_norm(x, 1.0, dim=[1, -1])
    with pytest.raises(TypeError, match="list"):
        fusedclip.clip_by_global_norm(ts[0], 1.0)


@pytest.mark.parametrize("norm_type", ["fro", "nuc", -1.0, float("nan"), None, True])
def test_bad_norm_type(norm_type):
    params = make_params()
    before = snapshot(params)
    with pytest.raises(ValueError, match="norm_type"):
        fusedclip.clip_grad_norm_(params, 1.0, norm_type)
    with pytest.raises(ValueError, match="norm_type"):
        fusedclip.get_total_norm([p.grad for p in params], norm_type)
    assert_untouched(params, before)


def test_string_inf_norm_type_is_accepted():
    grads = random_grads(3)
    assert torch.equal(fusedclip.get_total_norm(grads, "inf"), fusedclip.get_total_norm(grads, float("inf")))
    assert torch.equal(fusedclip.get_total_norm(grads, "-inf"), fusedclip.get_total_norm(grads, float("-inf")))


def test_non_tensor_in_list():
    params = make_params()
    before = snapshot(params)
    with pytest.raises(TypeError, match=r"parameters\[4\]"):
        fusedclip.clip_grad_norm_(params + ["weight"], 1.0)
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        fusedclip.get_total_norm([params[0].grad, 3.0])
    with pytest.raises(TypeError, match="parameters"):
        fusedclip.clip_grad_norm_(42, 1.0)
    with pytest.raises(TypeError, match="floating-point"):
        fusedclip.get_total_norm([torch.arange(5)])
    assert_untouched(params, before)


@pytest.mark.parametrize("backend", ["cudnn", "Triton", ""])
def test_unknown_backend(backend):
    params = make_params()
    before = snapshot(params)
    if backend == "":
        with pytest.raises(ValueError, match="backend"):
            fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    else:
        with pytest.raises(ValueError, match=repr(backend)):
            fusedclip.clip_grad_norm_(params, 1.0, backend=backend)
    assert_untouched(params, before)


def test_empty_inputs_follow_torch():
    assert torch.equal(fusedclip.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    assert torch.equal(fusedclip.get_total_norm([]), torch.tensor(0.0))
    p = torch.nn.Parameter(torch.randn(3))  # no grad
    assert torch.equal(fusedclip.clip_grad_norm_(p, 1.0), torch.tensor(0.0))
    assert fusedclip.clip_grad_norm_per_tensor_([p], 1.0).shape == (0,)
    fusedclip.clip_grad_value_([p], 1.0)
    fusedclip.clip_grads_with_norm_([p], 1.0, torch.tensor(2.0))
    assert fusedclip.GradClipper([p], 1.0)().item() == 0.0


def test_generator_and_single_tensor_inputs():
    params = make_params(3)
    ref = fusedclip.get_total_norm([p.grad for p in params])
    gen_total = fusedclip.get_total_norm(p.grad for p in params)
    assert torch.equal(gen_total, ref)
    single = fusedclip.get_total_norm(params[0].grad)
    assert torch.equal(single, fusedclip.get_total_norm([params[0].grad]))
    total = fusedclip.clip_grad_norm_((p for p in params), 1e9)
    assert torch.equal(total, ref)
