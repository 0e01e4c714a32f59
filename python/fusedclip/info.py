"""`python -m fusedclip info`: versions, devices, and which backends run here (and why not)."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__, backends


def collect() -> dict:
    info: dict = {
        "fusedclip": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        backends.ENV_VAR: os.environ.get(backends.ENV_VAR),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:
        info["triton"] = f"not importable ({type(e).__name__}: {e})"
    info["available_backends"] = backends.available_backends()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    info["backends_by_device"] = {
        d.type: [n for n in info["available_backends"] if _runs(n, d)]
        for d in devices
    }
    info["unavailable_backends"] = backends.unavailable_reasons()
    info["auto_backend_cuda"] = backends.select(None, torch.device("cuda")).name if torch.cuda.is_available() else None
    info["auto_backend_cpu"] = backends.select(None, torch.device("cpu")).name
    from .backends import cuda_backend

    info["cuda_extension"] = cuda_backend.build_info() or "not built or not loadable (see backend cuda above)"
    from . import fastpath

    # The steady-state fast path is always on (outside torch.compile tracing); this says where its check runs.
    info["host_fast_path"] = "on; per-call check in " + fastpath.describe()
    return info


def _runs(name: str, device: torch.device) -> bool:
    try:
        backends.select(name, device)
        return True
    except (ValueError, RuntimeError):
        return False


def format_info(info: dict) -> str:
    lines = []
    for key, value in info.items():
        if key == "unavailable_backends":
            for name, why in value.items():
                lines.append(f"{'backend ' + name:20s} unavailable: {why}")
        else:
            lines.append(f"{key:20s} {value}")
    return "\n".join(lines)
