"""The simulator stage's fixtures. These tests run only inside GPGPU-Sim, started by .ci/gpusim-stage.sh (which sets
FUSEDCLIP_GPUSIM_LIB); elsewhere tests/conftest.py does not collect them.

The stage runs pytest here in two ways at once, each process fresh: in functional mode (every case, blocks run one
after another; one process per core with pytest-xdist) and in performance mode (`-m sim_perf`: blocks run on
simulated SMs at once). The first launch of each process is a fixed probe, made before any test: the simulator leaves
shared memory uncleared between launches, so an ordering bug around __syncthreads can hide behind stale values on
every launch but the first (../shared/gpusim/README.md). The stage checks that every process got the same bits."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import sim as simlib
from reference import sparse_tiles

STATS_ENV = "FUSEDCLIP_GPUSIM_STATS"  # a folder: each process (pytest-xdist worker) writes what it ran there


def pytest_configure(config):
    config.addinivalue_line("markers", "sim_perf: also run in the simulator's performance mode (blocks concurrent)")


PROBE_CHUNK = 256


@pytest.fixture(scope="session")
def probe(_simulator):
    """The probe's tensors and what the first launch of this process returned (per-tensor norms and total, p = 2, two
    tiles on a grid of 8 blocks: blocks complete tiles, every block takes a ticket)."""
    return _simulator["probe"]


@pytest.fixture(scope="session")
def sim(_simulator) -> simlib.Sim:
    return _simulator["sim"]


@pytest.fixture(autouse=True)
def _launch_cost(request, _simulator):
    """CPU seconds each test spends in simulated launches (the stage prints the costliest)."""
    stats = _simulator["sim"].stats
    before = stats.launch_seconds
    yield
    _simulator["costs"][request.node.name] = stats.launch_seconds - before


@pytest.fixture(scope="session", autouse=True)
def _simulator():
    path = os.environ.get(simlib.LIB_ENV)
    if not path:
        pytest.skip("runs only in the GPU simulator stage (.ci/gpusim-stage.sh sets FUSEDCLIP_GPUSIM_LIB)")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        # The simulator writes its PTX extracts into the working directory: one of its own per process.
        os.makedirs(worker, exist_ok=True)
        for name in os.listdir("."):
            if name == "gpgpusim.config" or name.endswith(".icnt"):
                shutil.copy(name, worker)
        os.chdir(worker)
    log = os.environ.get(simlib.LOG_ENV, "gpusim.log")
    sim = simlib.Sim(path, f"{log}.{worker}" if worker else log)
    tensors = sparse_tiles(2, simlib.TILE, PROBE_CHUNK, seed=2024)
    st = simlib.stage(sim, tensors, PROBE_CHUNK, shifts=[i % 4 for i in range(len(tensors))])
    first = simlib.run_norm(st, 2.0, per_tensor=True, max_norm=1.0, sm_count=2)
    assert sim.stats.launches == 1
    costs: dict[str, float] = {}
    yield {"sim": sim, "probe": (tensors, first), "costs": costs}
    st.free()
    out = os.environ.get(STATS_ENV)
    if out:
        s = sim.stats
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, os.environ.get("PYTEST_XDIST_WORKER", "main") + ".json"), "w") as f:
            json.dump({"launches": s.launches, "launch_seconds": round(s.launch_seconds, 2),
                       "load_seconds": round(s.load_seconds, 2), "cycles": s.cycles, "by_kernel": s.by_kernel,
                       "probe_total_bits": first.total.view(torch.int32).item(),
                       "costliest": sorted(costs.items(), key=lambda kv: -kv[1])[:5]}, f)
