"""Shared fixtures. Without a GPU, Triton kernels run under its CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, which is why this happens at the top of conftest."""

import os
import random
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedclip  # noqa: E402  (after TRITON_INTERPRET)
import triton_preflight  # noqa: E402  (after TRITON_INTERPRET)

# tests/gpusim runs inside a GPU simulator, started by .ci/gpusim-stage.sh (which sets FUSEDCLIP_GPUSIM_LIB);
# anywhere else it is not collected at all.
collect_ignore = [] if os.environ.get("FUSEDCLIP_GPUSIM_LIB") else ["gpusim"]

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


def seed_for(nodeid: str) -> int:
    """Each test's own fixed seed, from its id: stable across runs, machines and test order."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def seeded_global_rngs(request):
    """A safety net under the explicit generators the tests use for their inputs: every test starts the global
    torch, numpy and random RNGs from its own seed, so nothing (a module's weight init, a stray randn) can
    make a test pass or fail by chance."""
    seed = seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed)


def pytest_collection_modifyitems(config, items):
    # The compile test compiles what the rest of the session launched: it goes last (a stable sort).
    items.sort(key=lambda item: item.path.name == "test_triton_compile.py")
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
