"""fusedclip's kernels driven from Python inside GPGPU-Sim (a simulator, not a GPU).

.ci/gpusim-stage.sh runs the tests here in the simulator's environment (its runenv.sh puts the simulator's libcudart
first on LD_LIBRARY_PATH). `Device` is that libcudart through ctypes: device memory, the simulator's output kept out
of the tests' (quiet), and what ran (Stats). `Sim` adds the CUDA kernels: csrc/kernels built with
tests/gpusim/sim_abi.cu into one shared library (nvcc 11.8, sm_70) that FUSEDCLIP_GPUSIM_LIB names; loading it
registers the kernels with the simulator, which reads their PTX from the file PYTORCH_BIN names. The Triton kernels
(triton_sim.py) use a Device of their own with the same staging.

Staging (`stage`) copies CPU tensors into simulated device memory and builds their plan with the code the kernel
backends use (fusedclip.backends.plan), relocated to the device copies. Layout of a staged list: one device
allocation (the arena) holding every tensor at its own offset, with guard bytes between and around them; a tensor
may be placed a few elements past a 16-byte boundary (a misaligned view). After a launch that writes, the whole arena
comes back, so a write outside any tensor shows as a changed guard byte. Any other CPU tensor a launch takes (the
plan's tables, outputs) is mirrored: its storage copied to the device at first sight, and back by Staged.sync().
"""

from __future__ import annotations

import ctypes
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from fusedclip.backends import plan as plan_mod

LIB_ENV = "FUSEDCLIP_GPUSIM_LIB"
LOG_ENV = "FUSEDCLIP_GPUSIM_LOG"  # where the simulator's own output goes (default: gpusim.log in the working dir)
GUARD = 0xA5  # guard byte around every staged tensor
POISON = -12345.0  # what an output buffer holds before a launch: never a norm or coefficient the kernels write
_ALIGN = 64  # every tensor slot starts on this boundary (plus its shift), after GUARD_BYTES guard bytes
GUARD_BYTES = 64
_H2D, _D2H = 1, 2  # cudaMemcpyKind

HEADER = (Path(__file__).resolve().parents[2] / "csrc" / "kernels" / "fusedclip_kernels.h").read_text()


def header_const(name: str) -> int:
    return int(re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;", HEADER).group(1))


THREADS = header_const("kThreads")
TILE = header_const("kTileTensors")
BLOCKS_PER_SM = header_const("kBlocksPerSM")


class SimError(RuntimeError):
    pass


class TensorTable(ctypes.Structure):
    """fusedclip::TensorTable (fusedclip_kernels.h), field for field."""

    _fields_ = [
        ("meta", ctypes.c_void_p),
        ("chunk_tensor", ctypes.c_void_p),
        ("chunk_start", ctypes.c_void_p),
        ("tensor_chunks", ctypes.c_void_p),
        ("num_tensors", ctypes.c_int64),
        ("num_chunks", ctypes.c_int64),
        ("chunk_size", ctypes.c_int64),
    ]


@dataclass
class Stats:
    """What a session ran in the simulator (printed by the stage)."""

    launches: int = 0
    launch_seconds: float = 0.0  # CPU seconds of this process (the simulator's threads included) in launches
    load_seconds: float = 0.0
    cycles: int = 0  # simulated GPU cycles, performance mode only (0 in functional mode)
    by_kernel: dict = field(default_factory=dict)


class Device:
    """The simulator's libcudart through ctypes: device memory, the simulator's output redirected into a log, and
    what ran. Every call is checked."""

    def __init__(self, log_path: str) -> None:
        self.stats = Stats()
        self.log_path = log_path
        self._log = open(log_path, "ab", buffering=0)
        self._libc = ctypes.CDLL(None)
        self.rt = rt = ctypes.CDLL("libcudart.so")  # the simulator's: runenv.sh puts it first on LD_LIBRARY_PATH
        vp, size = ctypes.c_void_p, ctypes.c_size_t
        rt.cudaMalloc.argtypes = [ctypes.POINTER(vp), size]
        rt.cudaFree.argtypes = [vp]
        rt.cudaMemcpy.argtypes = [vp, vp, size, ctypes.c_int]

    @contextmanager
    def quiet(self):
        """The simulator prints pages per launch (with C stdio): into the log file instead of the test's output."""
        self._libc.fflush(None)
        saved = os.dup(1)
        os.dup2(self._log.fileno(), 1)
        try:
            yield
        finally:
            self._libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise SimError(f"{what} returned CUDA error {rc} (see {self.log_path})")

    # ---- memory ----------------------------------------------------------------------------------------------------

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.rt.cudaMalloc(ctypes.byref(ptr), max(nbytes, 1)), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.rt.cudaFree(ptr), "cudaFree")

    def to_device(self, ptr: int, t: Tensor) -> None:
        assert t.device.type == "cpu" and t.is_contiguous()
        self._check(self.rt.cudaMemcpy(ptr, t.data_ptr(), t.numel() * t.element_size(), _H2D), "cudaMemcpy H2D")

    def to_host(self, t: Tensor, ptr: int) -> None:
        """Device memory at `ptr` into the CPU tensor `t` (contiguous), in place."""
        assert t.device.type == "cpu" and t.is_contiguous()
        self._check(self.rt.cudaMemcpy(t.data_ptr(), ptr, t.numel() * t.element_size(), _D2H), "cudaMemcpy D2H")

    def upload(self, t: Tensor) -> int:
        t = t.contiguous()
        ptr = self.alloc(t.numel() * t.element_size())
        self.to_device(ptr, t)
        return ptr

    def download(self, ptr: int, like: Tensor) -> Tensor:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
        self.to_host(out, ptr)
        return out

    # ---- launches --------------------------------------------------------------------------------------------------

    def launch(self, kernel: str, fn, *args) -> None:
        """`fn(*args)` (a launch that synchronizes and returns a CUDA error code), quiet, timed and counted."""
        log_size = os.fstat(self._log.fileno()).st_size
        t0 = time.process_time()
        with self.quiet():
            rc = fn(*args)
        self.stats.launch_seconds += time.process_time() - t0
        self.stats.launches += 1
        self.stats.by_kernel[kernel] = self.stats.by_kernel.get(kernel, 0) + 1
        self.stats.cycles += self._cycles_since(log_size)
        self._check(rc, kernel)

    def _cycles_since(self, offset: int) -> int:
        """Simulated cycles of the launches whose reports start at `offset` of the log (performance mode)."""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return sum(int(m) for m in re.findall(r"^gpu_sim_cycle = (\d+)", text, re.MULTILINE))


class Sim(Device):
    """The CUDA kernels' library loaded into the simulator: the three launchers, each synchronizing and checked."""

    def __init__(self, path: str, log_path: str) -> None:
        super().__init__(log_path)
        t0 = time.perf_counter()
        with self.quiet():
            self.lib = ctypes.CDLL(path)  # registers the kernels: the simulator parses their PTX now
        self.stats.load_seconds = time.perf_counter() - t0
        lib = self.lib
        vp, i64, size = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
        table = ctypes.POINTER(TensorTable)
        lib.fcsim_norm_workspace_bytes.argtypes = [i64, i64, ctypes.c_int]
        lib.fcsim_norm_workspace_bytes.restype = size
        lib.fcsim_grid_size.argtypes = [i64, ctypes.c_int]
        lib.fcsim_grid_size.restype = i64
        lib.fcsim_launch_norm.argtypes = [table, ctypes.c_double, ctypes.c_int, vp, vp, vp, ctypes.c_double, vp, size,
                                          ctypes.c_int]
        lib.fcsim_launch_scale.argtypes = [table, vp, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.fcsim_launch_clamp.argtypes = [table, ctypes.c_double, ctypes.c_int]

    def norm_workspace_bytes(self, num_tensors: int, num_chunks: int, acc_f64: bool) -> int:
        return self.lib.fcsim_norm_workspace_bytes(num_tensors, num_chunks, int(acc_f64))

    def grid_size(self, num_chunks: int, sm_count: int) -> int:
        return self.lib.fcsim_grid_size(num_chunks, sm_count)


# ---- staging ---------------------------------------------------------------------------------------------------------


@dataclass
class Staged:
    """Tensors copied into one device arena, with their (relocated) plan tables on the device."""

    sim: Device
    originals: list[Tensor]  # the values as staged (CPU)
    host: Tensor  # uint8 image of the arena as staged
    offsets: list[int]  # byte offset of each tensor in the arena
    dev_base: int
    plan: plan_mod.DevicePlan  # CPU tables (meta relocated to device addresses)
    _owned: list[int]
    # CPU storage address -> (its device copy, a uint8 view of the whole storage, which also keeps it alive)
    _mirrors: dict[int, tuple[int, Tensor]] = field(default_factory=dict)
    table: TensorTable = field(init=False)

    def __post_init__(self) -> None:
        plan = self.plan
        self.table = TensorTable(*map(self.device_ptr, (plan.meta, plan.chunk_tensor, plan.chunk_start,
                                                         plan.tensor_chunks)),
                                 plan.num_tensors, plan.num_chunks, plan.chunk_size)

    @property
    def acc_f64(self) -> bool:
        return self.plan.acc_dtype == torch.float64

    def device_ptr(self, t: Tensor) -> int:
        """The device address of the CPU tensor `t` (a plan table, an output): its whole storage is copied to the
        device at first sight, and back by sync()."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._mirrors:
            whole = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._mirrors[key] = (self.sim.upload(whole), whole)
            self._owned.append(self._mirrors[key][0])
        ptr = self._mirrors[key][0] + t.data_ptr() - key
        assert ptr % 16 == t.data_ptr() % 16, "the device copy is aligned otherwise than the tensor"
        return ptr

    def sync(self) -> None:
        """Every mirrored CPU storage back from the device (after a launch: its outputs, the ticket)."""
        for ptr, whole in self._mirrors.values():
            self.sim.to_host(whole, ptr)

    def read_back(self) -> list[Tensor]:
        """Every tensor as it is now in device memory; asserts that no byte outside them changed."""
        arena = self.sim.download(self.dev_base, self.host)
        outside = torch.ones(arena.numel(), dtype=torch.bool)
        out = []
        for t, off in zip(self.originals, self.offsets):
            nbytes = t.numel() * t.element_size()
            outside[off : off + nbytes] = False
            out.append(arena[off : off + nbytes].view(t.dtype).view(t.shape))
        changed = outside & (arena != self.host)
        assert not bool(changed.any()), f"a launch wrote {int(changed.sum())} bytes outside every tensor"
        return out

    def reset(self) -> None:
        """Device memory back to the staged values."""
        self.sim.to_device(self.dev_base, self.host)

    def free(self) -> None:
        for ptr in self._owned:
            self.sim.free(ptr)
        self._owned = []
        self._mirrors = {}


def arrange(
    tensors: Sequence[Tensor],
    chunk_size: int,
    *,
    shifts: Optional[Sequence[int]] = None,
    unit_rows: Optional[Sequence[int]] = None,
) -> tuple[Tensor, list[int], plan_mod.DevicePlan]:
    """The host side of stage(): `tensors` copied into one host buffer (uint8, guard bytes around each), tensor i
    placed shifts[i] elements past a 64-byte boundary, their byte offsets in it, and their plan built over the copies
    as the kernel backends build it (plan._build, or plan._build_units with `unit_rows` for AGC's unit tables)."""
    shifts = list(shifts) if shifts is not None else [0] * len(tensors)
    offsets, size = [], 0
    for t, shift in zip(tensors, shifts):
        size = -(-(size + GUARD_BYTES) // _ALIGN) * _ALIGN + shift * t.element_size()
        offsets.append(size)
        size += t.numel() * t.element_size()
    size += GUARD_BYTES
    host = torch.full((size,), GUARD, dtype=torch.uint8)
    assert host.data_ptr() % _ALIGN == 0
    views = []
    for t, off in zip(tensors, offsets):
        view = host[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        views.append(view)
    if unit_rows is None:
        return host, offsets, plan_mod._build(views, chunk_size)
    return host, offsets, plan_mod._build_units(views, list(unit_rows), chunk_size)


def stage(
    sim: Device,
    tensors: Sequence[Tensor],
    chunk_size: int,
    *,
    shifts: Optional[Sequence[int]] = None,
    unit_rows: Optional[Sequence[int]] = None,
) -> Staged:
    """Copy `tensors` (CPU, any of the four kernel dtypes, numel 0 allowed) into one device arena laid out by
    arrange(), with their plan's addresses pointing into the device arena and its tables on the device."""
    host, offsets, cpu_plan = arrange(tensors, chunk_size, shifts=shifts, unit_rows=unit_rows)
    dev_base = sim.alloc(host.numel())
    assert dev_base % _ALIGN == 0, f"device arena at {dev_base:#x} is not {_ALIGN}-byte aligned"
    sim.to_device(dev_base, host)
    meta = cpu_plan.meta.clone()
    meta[0] += dev_base - host.data_ptr()
    relocated = replace(cpu_plan, meta=meta)
    return Staged(sim, [t.detach().clone() for t in tensors], host, offsets, dev_base, relocated, [dev_base])


@dataclass
class NormResult:
    total: Tensor  # 0-d, accumulation dtype
    norms: Optional[Tensor]  # [T] or None
    coef: Optional[Tensor]  # 0-d or None


def run_norm(
    st: Staged,
    p: float,
    *,
    per_tensor: bool = False,
    max_norm: Optional[float] = None,
    sm_count: int = 80,
    workspace: Optional[int] = None,
    dirty_workspace: bool = False,
) -> NormResult:
    """launch_norm over a staged list. Outputs are poisoned before the launch (POISON), so a value the kernel did not
    write shows. `workspace`: reuse this device buffer (of norm_workspace_bytes) instead of a fresh one;
    `dirty_workspace`: fill it with 0xFF first (the launcher must reset its counters itself)."""
    sim, plan = st.sim, st.plan
    acc = plan.acc_dtype
    ws_bytes = sim.norm_workspace_bytes(plan.num_tensors, plan.num_chunks, st.acc_f64)
    ws = workspace if workspace is not None else sim.alloc(ws_bytes)
    if dirty_workspace:
        sim.to_device(ws, torch.full((ws_bytes,), 0xFF, dtype=torch.uint8))
    poison_total = torch.full((1,), POISON, dtype=acc)
    poison_norms = torch.full((max(plan.num_tensors, 1),), POISON, dtype=acc)
    total_d = sim.upload(poison_total)
    norms_d = sim.upload(poison_norms) if per_tensor else None
    coef_d = sim.upload(poison_total) if max_norm is not None else None
    try:
        sim.launch(
            "norm", sim.lib.fcsim_launch_norm, ctypes.byref(st.table), p, int(st.acc_f64), total_d, norms_d, coef_d,
            0.0 if max_norm is None else max_norm, ws, ws_bytes, sm_count,
        )
        return NormResult(
            total=sim.download(total_d, poison_total)[0],
            norms=sim.download(norms_d, poison_norms)[: plan.num_tensors] if per_tensor else None,
            coef=sim.download(coef_d, poison_total)[0] if max_norm is not None else None,
        )
    finally:
        for ptr in (total_d, norms_d, coef_d, None if workspace is not None else ws):
            if ptr is not None:
                sim.free(ptr)


def run_scale(st: Staged, coef: Tensor, *, per_tensor: bool = False, sm_count: int = 80) -> list[Tensor]:
    """launch_scale with `coef` (float32 or float64: one value, or one per tensor) from device memory; returns every
    tensor as it is afterwards."""
    assert coef.dtype in (torch.float32, torch.float64)
    coef_d = st.sim.upload(coef.reshape(-1))
    try:
        st.sim.launch("scale", st.sim.lib.fcsim_launch_scale, ctypes.byref(st.table), coef_d,
                       int(coef.dtype == torch.float64), int(per_tensor), sm_count)
    finally:
        st.sim.free(coef_d)
    return st.read_back()


def run_clamp(st: Staged, clip_value: float, *, sm_count: int = 80) -> list[Tensor]:
    st.sim.launch("clamp", st.sim.lib.fcsim_launch_clamp, ctypes.byref(st.table), clip_value, sm_count)
    return st.read_back()
