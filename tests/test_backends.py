"""Backend choice: auto, explicit names, the FUSEDCLIP_BACKEND default, and clear errors."""

import json
import os
import subprocess
import sys

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
        pytest.skip(f"backend 'cuda' is not available: {backends.unavailable_reasons()['cuda']}")  # the real reason
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


def backends_in_fresh_process(**env: str) -> tuple[list[str], dict[str, str]]:
    """available_backends() and unavailable_reasons() of a new interpreter with `env` (TRITON_INTERPRET unset
    unless given): what a user sees, not what this test process (interpreter on, via conftest) sees."""
    code = (
        "import json, fusedclip; from fusedclip import backends; "
        "print(json.dumps([fusedclip.available_backends(), backends.unavailable_reasons()]))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backends.ENV_VAR)}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    available, reasons = json.loads(out.splitlines()[-1])
    return available, reasons


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only answer")
def test_triton_is_listed_only_where_it_can_run():
    available, reasons = backends_in_fresh_process()
    assert "triton" not in available and "torch" in available
    assert "no CUDA device" in reasons["triton"] and "TRITON_INTERPRET=1" in reasons["triton"]
    # tests/conftest.py's path: the interpreter, switched on before triton is imported.
    available, reasons = backends_in_fresh_process(TRITON_INTERPRET="1")
    if "triton cannot be imported" not in reasons.get("triton", ""):
        assert "triton" in available


@pytest.mark.gpu
def test_triton_is_listed_on_a_gpu():
    available, reasons = backends_in_fresh_process()
    if "triton cannot be imported" not in reasons.get("triton", ""):
        assert "triton" in available, reasons
