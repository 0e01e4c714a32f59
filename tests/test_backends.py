"""Backend choice: auto, explicit names, the FUSEDCLIP_BACKEND default, and clear errors."""

import pytest
import torch

import fusedclip
from fusedclip import backends
from reference import random_grads


def test_torch_backend_always_available():
    names = fusedclip.available_backends()
    assert "torch" in names
    assert names == [n for n in backends.BACKEND_NAMES if n in names]  # best first


def test_unavailable_backends_say_why():
    reasons = backends.unavailable_reasons()
    for name in backends.BACKEND_NAMES:
        assert (name in fusedclip.available_backends()) != (name in reasons)
        if name in reasons:
            assert reasons[name]


def test_auto_uses_torch_for_cpu_tensors():
    assert backends.select(None, torch.device("cpu")).name == "torch"


def test_explicit_unavailable_backend_raises_with_reason():
    missing = [n for n in backends.BACKEND_NAMES if n not in fusedclip.available_backends()]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match="not available"):
        fusedclip.get_total_norm(random_grads(2), backend=missing[0])


def test_cuda_backend_refuses_cpu_tensors():
    if "cuda" not in fusedclip.available_backends():
        pytest.skip("cuda backend not built")
    with pytest.raises(ValueError, match="cannot run"):
        fusedclip.get_total_norm(random_grads(2), backend="cuda")


def test_env_var_sets_default(monkeypatch):
    grads = random_grads(3)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.check_backend_name(None) == "torch"
    assert torch.equal(fusedclip.get_total_norm(grads), fusedclip.get_total_norm(grads, backend="torch"))
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    assert backends.check_backend_name(None) is None
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        fusedclip.get_total_norm(grads)


def test_explicit_argument_beats_env_var(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    assert backends.check_backend_name("torch") == "torch"
