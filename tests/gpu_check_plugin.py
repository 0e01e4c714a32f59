"""pytest plugin of bench/gpu_check.sh: which tests run on the device, and the launch records of its Triton cache.

Loaded with `-p gpu_check_plugin` (tests/ on PYTHONPATH); inert unless one of its options is given.

--gpu-check      keep only the tests that exercise a GPU (the rest is CI's, on CPU): those marked `gpu`; those
                 parametrised by conftest's `backend_device` with a kernel backend (`cuda` or `triton`) on CUDA, or
                 `triton` under the CPU interpreter (its stand-in where there is no GPU); and every test of the
                 modules in DEVICE_MODULES, which run on the GPU whenever there is one. Under pytest-xdist the
                 tests named in SHARED_SUBPROCESS go to one worker (`--dist loadgroup`): they read the results of
                 one expensive subprocess, which each worker would otherwise start again.
--record-launches FILE
                 at the end of the session, also drive every launcher path with the GPU configuration
                 (test_triton_compile.drive_gpu_configuration) and write every launch specialisation recorded
                 (tests/triton_preflight.py) to FILE: what `bench/gpu_check.sh prepare` compiles into the Triton
                 cache the lease carries.
"""

from __future__ import annotations

import json

import pytest

KERNEL_BACKENDS = ("cuda", "triton")
DEVICE_MODULES = ("test_triton_backend.py",)  # DEVICE = "cuda" when there is one: every test runs on the GPU
SHARED_SUBPROCESS = ("test_gpu_fullgraph_first_call",)  # test_compile.worker_results: one compile_worker.py run


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gpu_check", "bench/gpu_check.sh")
    group.addoption("--gpu-check", action="store_true", help="keep only the tests that exercise a GPU")
    group.addoption("--record-launches", metavar="FILE", default=None,
                    help="write every Triton launch specialisation of the session to FILE")


def runs_on_device(item: pytest.Item) -> bool:
    """Whether bench/gpu_check.sh runs this test on the device (see the module docstring)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    pair = callspec.params.get("backend_device") if callspec is not None else None
    if pair is not None:
        backend, device = pair
        return backend in KERNEL_BACKENDS and (device == "cuda" or backend == "triton")
    return item.path.name in DEVICE_MODULES


@pytest.hookimpl(tryfirst=True)  # before xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("gpu_check"):
        return
    keep = [item for item in items if runs_on_device(item)]
    dropped = [item for item in items if not runs_on_device(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    if config.pluginmanager.hasplugin("xdist"):
        for item in keep:
            if getattr(item, "originalname", item.name) in SHARED_SUBPROCESS:
                item.add_marker(pytest.mark.xdist_group(item.path.stem))


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("record_launches")
    if not path:
        return
    import triton_preflight
    from test_triton_compile import drive_gpu_configuration

    drive_gpu_configuration()
    records = list(triton_preflight.RECORDER.records.values())
    with open(path, "w") as f:
        json.dump(records, f)
    print(f"\n{len(records)} launch specialisations written to {path}")
