"""Shared fixtures. Without a GPU, Triton kernels run under its CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, which is why this happens at the top of conftest."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedclip  # noqa: E402  (after TRITON_INTERPRET)
import triton_preflight

# Every launch of our Triton kernels is recorded: tests/test_triton_compile.py, which runs last, compiles each
# specialisation the session launched for sm_80 and sm_90.
triton_preflight.RECORDER.install()


def backend_device_pairs() -> list[tuple[str, str]]:
    """Every (backend, device) this machine can run: the kernel backends join the moment they are available."""
    pairs = []
    for name in fusedclip.available_backends():
        if name == "torch":
            pairs.append((name, "cpu"))
            if HAS_CUDA:
                pairs.append((name, "cuda"))
        elif HAS_CUDA:
            pairs.append((name, "cuda"))
        elif name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            pairs.append((name, "cpu"))
    return pairs


BACKEND_DEVICES = backend_device_pairs()


@pytest.fixture(params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def backend_device(request) -> tuple[str, str]:
    return request.param


def pytest_collection_modifyitems(config, items):
    # The compile test compiles what the rest of the session launched: it goes last (a stable sort).
    items.sort(key=lambda item: item.path.name == "test_triton_compile.py")
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
