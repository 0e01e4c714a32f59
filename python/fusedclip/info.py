"""`python -m fusedclip info`: versions, devices, and which backends run here (and why not); then the machine: which
GPU and driver, the CUDA version the driver supports, the sandbox it runs in (the GPU machines lent here are gVisor
or Firecracker guests, and only Firecracker ones let compute-sanitizer and ncu work), and those two tools.

The machine part (`machine()`) uses the standard library only and never fails where something is absent, so that
bench/gpu_summary.py can load this file by path on a device before fusedclip is installed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Optional

# The keys machine() adds after the existing ones (format_info writes their dict values as "key: value; ...").
MACHINE_KEYS = ("gpus", "driver", "cuda_driver", "kernel", "sandbox", "compute_sanitizer", "ncu")
TOOLS = {"compute_sanitizer": "compute-sanitizer", "ncu": "ncu"}
TOOL_DIRS = ("/usr/local/cuda/bin", "/usr/local/cuda/compute-sanitizer", "/opt/nvidia/nsight-compute")
# What a tool prints where it cannot serve: the only evidence for works=False after a probe (KINDS.md: gVisor).
REFUSALS = {
    "compute-sanitizer": ("Device not supported",),
    "ncu": ("Failed to initialize the profiler", "ERR_NVGPUCTRPERM"),  # the latter: no permission for counters
}
# The probe's own words where there is no GPU to run it on (CUDA_ERROR_NO_DEVICE is 100): no tool works there.
NO_GPU = re.compile(r"probe: no CUDA driver|probe: cuInit failed with CUDA error 100\b")


def collect(probe_tools: bool = False) -> dict:
    import torch

    from . import __version__, backends

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
    info.update(machine(probe_tools))
    return info


def _runs(name: str, device) -> bool:
    from . import backends

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
        elif key in MACHINE_KEYS and isinstance(value, dict):
            lines.append(f"{key:20s} " + "; ".join(f"{k}: {v}" for k, v in value.items()))
        elif key == "gpus" and isinstance(value, list):
            shown = ["{name} (compute capability {compute_capability}, {memory_MiB} MiB)".format(**g) for g in value]
            lines.append(f"{key:20s} {', '.join(shown) or 'none found (nvidia-smi)'}")
        else:
            lines.append(f"{key:20s} {value}")
    return "\n".join(lines)


# ---- the machine (standard library only) -------------------------------------------------------------------------


def machine(probe_tools: bool = False) -> dict[str, Any]:
    """GPUs, driver, the driver's CUDA version, kernel, sandbox and the profiling tools: every key present, None or
    an explanation where something is absent. With `probe_tools`, each tool is tried on a tiny kernel (seconds)."""
    return {
        "gpus": gpus(),
        "driver": first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "cuda_driver": cuda_driver_version(),
        "kernel": platform.release(),
        "sandbox": sandbox(),
        **{key: tool(name, probe_tools) for key, name in TOOLS.items()},
    }


def _run(cmd: list[str], timeout: float = 20, **kw) -> Optional[subprocess.CompletedProcess]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.SubprocessError):
        return None


def first_line(cmd: list[str], **kw) -> Optional[str]:
    """The first line `cmd` prints; None when it cannot run or fails."""
    out = _run(cmd, **kw)
    lines = out.stdout.strip().splitlines() if out is not None and out.returncode == 0 else []
    return lines[0].strip() if lines else None


def gpus() -> list[dict[str, str]]:
    """Every GPU nvidia-smi lists: name, compute capability, memory ([] without nvidia-smi or a GPU)."""
    out = _run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits"])
    if out is None or out.returncode != 0:
        return []
    found = []
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append(dict(zip(("name", "compute_capability", "memory_MiB"), parts)))
    return found


def cuda_driver_version() -> Optional[str]:
    """The CUDA version the installed driver supports (cuDriverGetVersion), e.g. "13.0"; None without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def sandbox(proc_version: Optional[str] = None, dmesg: Optional[str] = None, cmdline: Optional[str] = None,
            release: Optional[str] = None) -> dict[str, Optional[str]]:
    """{"kind": "gvisor" | "firecracker" | None, "evidence": what was seen}. gVisor: its kernel log starts with
    "Starting gVisor..." (dmesg), or the kernel names itself gVisor; its usual release, 4.4.0, alone is only a hint.
    Firecracker: the MMIO virtio devices it passes on the kernel command line, a kernel log that names it, or a
    kernel release built for it ("-fc-", as here). The arguments replace what is read (for tests)."""
    proc_version = _read("/proc/version") if proc_version is None else proc_version
    release = platform.release() if release is None else release
    cmdline = _read("/proc/cmdline") if cmdline is None else cmdline
    if dmesg is None:
        out = _run(["dmesg"], timeout=5)
        dmesg = out.stdout if out is not None and out.returncode == 0 else ""
    for line in dmesg.splitlines():
        if "gvisor" in line.lower():
            return {"kind": "gvisor", "evidence": f"dmesg: {line.strip()[:160]}"}
    if "gvisor" in (proc_version + release).lower():
        return {"kind": "gvisor", "evidence": f"kernel: {(proc_version or release).strip()}"}
    if "virtio_mmio.device=" in cmdline:
        return {"kind": "firecracker", "evidence": "virtio_mmio.device= on the kernel command line"}
    for line in dmesg.splitlines():
        if "firecracker" in line.lower():
            return {"kind": "firecracker", "evidence": f"dmesg: {line.strip()[:160]}"}
    if re.search(r"-fc-", release):
        return {"kind": "firecracker", "evidence": f"kernel release {release}"}
    hint = " (4.4.0 is the release gVisor reports, but no gVisor marker was seen)" if release == "4.4.0" else ""
    return {"kind": None, "evidence": f"none seen: kernel {release}, dmesg {'read' if dmesg else 'unreadable'}{hint}"}


def find_tool(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for top in TOOL_DIRS:
        for root, _, files in os.walk(top):
            if name in files and os.access(os.path.join(root, name), os.X_OK):
                return os.path.join(root, name)
    return None


def tool(name: str, probe: bool = False) -> dict[str, Any]:
    """{"path", "version", "works", "evidence"}: works is False when the tool is absent or printed a refusal, True
    when it ran the probe kernel cleanly, None when not tried or not known (see probe_tool)."""
    path = find_tool(name)
    if path is None:
        return {"path": None, "version": None, "works": False, "evidence": "not found on PATH or in " +
                ", ".join(TOOL_DIRS)}
    out = _run([path, "--version"])
    lines = out.stdout.strip().splitlines() if out is not None else []
    found = {"path": path, "version": lines[-1].strip() if lines else None, "works": None,
             "evidence": "not tried (python -m fusedclip info --probe-tools tries it on a tiny kernel)"}
    if probe:
        found.update(probe_tool(name, path))
    return found


# A kernel that stores 42: PTX for any GPU from sm_80 on, JIT-compiled by the driver (no toolkit needed).
PROBE_PTX = """.version 7.0
.target sm_80
.address_size 64
.visible .entry probe(.param .u64 out)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [out];
    cvta.to.global.u64 %rd2, %rd1;
    mov.u32 %r1, 42;
    st.global.u32 [%rd2], %r1;
    ret;
}
"""


def probe_kernel() -> int:
    """Run PROBE_PTX once through the driver API (ctypes, no torch): 0 when it stored 42, else a message and 1."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        print(f"probe: no CUDA driver: {e}", file=sys.stderr)
        return 1
    device, ctx, module, function = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
    out, result = ctypes.c_uint64(), ctypes.c_uint32(0)
    calls = [
        ("cuInit", lambda: cuda.cuInit(0)),
        ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(device), 0)),
        ("cuCtxCreate", lambda: cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, device)),
        ("cuModuleLoadData", lambda: cuda.cuModuleLoadData(ctypes.byref(module), PROBE_PTX.encode())),
        ("cuModuleGetFunction", lambda: cuda.cuModuleGetFunction(ctypes.byref(function), module, b"probe")),
        ("cuMemAlloc", lambda: cuda.cuMemAlloc_v2(ctypes.byref(out), ctypes.c_size_t(4))),
        # kernelParams: one pointer per argument, to where its value is (here the device address in `out`)
        ("cuLaunchKernel", lambda: cuda.cuLaunchKernel(function, 1, 1, 1, 1, 1, 1, 0, None,
                                                       (ctypes.c_void_p * 1)(ctypes.addressof(out)), None)),
        ("cuCtxSynchronize", lambda: cuda.cuCtxSynchronize()),
        ("cuMemcpyDtoH", lambda: cuda.cuMemcpyDtoH_v2(ctypes.byref(result), out, ctypes.c_size_t(4))),
    ]
    for name, call in calls:
        err = call()
        if err != 0:
            print(f"probe: {name} failed with CUDA error {err}", file=sys.stderr)
            return 1
    if result.value != 42:
        print(f"probe: the kernel stored {result.value}, not 42", file=sys.stderr)
        return 1
    print("probe: the kernel ran")
    return 0


def probe_tool(name: str, path: str, timeout: float = 8) -> dict[str, Any]:
    """Run the probe kernel under compute-sanitizer (memcheck) or ncu: {"works", "evidence"}. works is True when
    the probe ran cleanly under the tool, False only when the tool printed a refusal (REFUSALS) or there is no GPU
    (NO_GPU), else None (not known: the check runs the tool anyway, and a failure of it is recorded there)."""
    with tempfile.TemporaryDirectory(prefix="fusedclip-probe-") as tmp:
        script = os.path.join(tmp, "probe.py")
        with open(script, "w") as f:  # this file by path: nothing of fusedclip is imported, no torch
            f.write(f"import importlib.util, sys\nspec = importlib.util.spec_from_file_location('info', {__file__!r})\n"
                    "info = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(info)\n"
                    "sys.exit(info.probe_kernel())\n")
        if name == "compute-sanitizer":
            cmd = [path, "--tool", "memcheck", "--error-exitcode", "1", sys.executable, script]
        else:
            cmd = [path, "--metrics", "gpu__time_duration.sum", "--clock-control", "none", sys.executable, script]
        out = _run(cmd, timeout=timeout)
    if out is None:
        return {"works": None, "evidence": f"{name} did not finish within {timeout:.0f} s"}
    text = out.stdout + out.stderr
    if name == "compute-sanitizer":
        works = out.returncode == 0 and "the kernel ran" in text and "ERROR SUMMARY: 0 errors" in text
    else:
        metric = re.search(r"gpu__time_duration\.sum\s+\S+\s+[\d.,]+", text)
        works = out.returncode == 0 and "the kernel ran" in text and metric is not None
    if not works:
        works = False if NO_GPU.search(text) or any(r in text for r in REFUSALS[name]) else None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    telling = [ln for ln in lines if re.search(r"error|fail|not supported|ERROR SUMMARY|gpu__time|probe:", ln, re.I)]
    return {"works": works, "evidence": f"exit {out.returncode}: " + " | ".join((telling or lines)[-4:])[:600]}

