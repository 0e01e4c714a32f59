"""The Triton backend: fused multi-tensor kernels from fusedclip.triton_kernels over the shared device plan.

Per call: one reduce launch over every tensor of the device (any count, mixed dtypes), one finalize launch that
writes per-tensor norms, the total and the clip coefficient on the device, and one scale launch that returns at
once when the coefficient is 1. Nothing waits on the host.

On CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported): that is how
CI exercises the real kernels without a GPU. Under the interpreter CUDA tensors are not taken (the interpreter
cannot follow device addresses).

Triton launches on the current CUDA device: every launch here is made on the plan's device (the tensors'), as the
CUDA ops' device guard does, whichever device is current.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from . import BackendUnavailable, acc_dtype, torch_backend
from .plan import CACHE_SIZE, DevicePlan, PlanCache, Scratch, flat_ok, kernel_coef
from .units import UnitKernels

# Chunk = elements one program covers; block = elements per step of the reduce loop (the scale and clamp loops step
# 4 * block bytes: block float32 elements, twice as many 16-bit ones). The interpreter runs programs one by one in
# Python at a cost per operation, not per element: small chunks (chunk boundaries within reach of small test
# tensors) of a single step each.
GPU_CHUNK, GPU_BLOCK = 65536, 2048
INTERPRETER_CHUNK, INTERPRETER_BLOCK = 512, 512


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(UnitKernels):
    """Triton kernels over a cached device plan.

    Parameters
    ----------
    chunk_size : elements per program (tests use tiny chunks to cover chunk boundaries under the interpreter)
    block : elements per vector step, a power of two
    cache_size : how many distinct gradient lists keep a device plan (least recently used first out)
    """

    name = "triton"
    reads_plan_only = True
    prepares_per_stream = True  # prepared calls bind the preparing stream's scratch (DevicePlan.scratch)

    def __init__(self, chunk_size: Optional[int] = None, block: Optional[int] = None, cache_size: int = CACHE_SIZE):
        interp = _interpreting()
        self.chunk_size = int(chunk_size or (INTERPRETER_CHUNK if interp else GPU_CHUNK))
        self.block = int(block or (INTERPRETER_BLOCK if interp else GPU_BLOCK))
        if self.chunk_size < 1 or self.block < 1 or self.block & (self.block - 1):
            raise ValueError(f"chunk_size must be >= 1 and block a power of two, got {self.chunk_size}, {self.block}")
        # No wider than a chunk; at least 2, so that the scale's float64 step (block // 2) is an element at least.
        self.block = max(2, min(self.block, 1 << max(0, (self.chunk_size - 1).bit_length())))
        self.cache = PlanCache(self.chunk_size, cache_size)
        self.interpreted = _kernels_interpreted()

    def runs_on(self, device: torch.device) -> bool:
        if device.type == "cuda":
            return not self.interpreted and torch.cuda.is_available()
        if device.type == "cpu":
            return (self.interpreted and _interpreting()) or _kernels.launch.is_stubbed()
        return False

    def accepts(self, t: Tensor) -> bool:
        return flat_ok(t)

    def plan(self, tensors: list[Tensor]) -> Optional[DevicePlan]:
        return None if torch.compiler.is_compiling() else self.cache.get(tensors)

    def _norms(
        self, tensors: Optional[list[Tensor]], norm_type: float, per_tensor: bool, max_norm: Optional[float],
        plan: Optional[DevicePlan] = None,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The reduce and finalize launches over `plan` (by default the plan of `tensors`)."""
        plan = plan if plan is not None else self.cache.get(tensors)  # type: ignore[arg-type]
        with on_device(plan.device):
            return _kernels.norm.multi_tensor_norm(
                plan.meta, plan.chunk_tensor, plan.chunk_start, plan.tensor_chunks, plan.ticket(),
                plan.num_tensors, plan.num_chunks, plan.chunk_size, plan.acc_dtype, norm_type,
                per_tensor=per_tensor, max_norm=max_norm, block=self.block,
            )

    def norms(
        self, tensors: Optional[list[Tensor]], norm_type: float, per_tensor: bool, plan: Optional[DevicePlan] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        if torch.compiler.is_compiling():
            total, norms = torch.ops.fusedclip.triton_norms(tensors, float(norm_type))
            return total, (norms if per_tensor else None)
        total, norms, _ = self._norms(tensors, norm_type, per_tensor, None, plan)
        return total, norms

    def norm_and_coef(
        self, tensors: Optional[list[Tensor]], norm_type: float, max_norm: float, plan: Optional[DevicePlan] = None
    ) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return torch.ops.fusedclip.triton_norm_and_coef(tensors, float(norm_type), float(max_norm))
        total, _, coef = self._norms(tensors, norm_type, False, max_norm, plan)
        return total, coef  # type: ignore[return-value]

    def _scale(
        self, tensors: Optional[list[Tensor]], coef: Tensor, per_tensor: bool, plan: Optional[DevicePlan] = None
    ) -> None:
        """The scale launch over `plan` (by default the plan of `tensors`, which an aliased plan needs)."""
        plan = plan if plan is not None else self.cache.get(tensors)  # type: ignore[arg-type]
        coef = kernel_coef(coef, plan.device)
        if coef.dim() != 1:
            coef = coef.reshape(-1)
        if plan.aliased:  # torch scales a tensor listed twice twice, in turn; the kernel would race
            fallback = torch_backend.load()
            (fallback.scale_per_tensor_ if per_tensor else fallback.scale_)(tensors, coef if per_tensor else coef[0])
            return
        with on_device(plan.device):
            _kernels.scale.scale_(
                plan.meta, plan.chunk_tensor, plan.chunk_start, plan.num_tensors, plan.num_chunks, plan.chunk_size,
                coef.contiguous(), per_tensor=per_tensor, block=self.block,
            )

    def scale_(self, tensors: Optional[list[Tensor]], coef: Tensor, plan: Optional[DevicePlan] = None) -> None:
        if torch.compiler.is_compiling():
            torch.ops.fusedclip.triton_scale_(tensors, coef, False)
            return
        self._scale(tensors, coef, False, plan)

    def scale_per_tensor_(
        self, tensors: Optional[list[Tensor]], coefs: Tensor, plan: Optional[DevicePlan] = None
    ) -> None:
        if torch.compiler.is_compiling():
            torch.ops.fusedclip.triton_scale_(tensors, coefs, True)
            return
        self._scale(tensors, coefs, True, plan)

    # Prepared calls of a kept plan (Backend.prepare_*): the launches keyed once, the scratch of the preparing stream
    # bound (fusedclip.fastpath prepares them per stream), launched on the plan's device.

    def _prepared_norm(self, plan: DevicePlan, norm_type: float, max_norm: Optional[float], scratch: Scratch
                       ) -> Callable:
        return _kernels.norm.prepare_norm(
            plan.meta, plan.chunk_tensor, plan.chunk_start, plan.tensor_chunks, scratch.ticket, plan.num_tensors,
            plan.num_chunks, plan.chunk_size, plan.acc_dtype, norm_type, scratch.partials, scratch.tensor_vals,
            scratch.coef, max_norm=max_norm, block=self.block,
        )

    def prepare_norm(self, plan: object, norm_type: float) -> Optional[Callable[[], Tensor]]:
        if not isinstance(plan, DevicePlan) or torch.compiler.is_compiling():
            return None
        norm = self._prepared_norm(plan, norm_type, None, plan.scratch())
        return launched_on(plan.device, lambda: norm()[0])

    def prepare_clip_norm(self, plan: object, norm_type: float, max_norm: float) -> Optional[Callable[[], Tensor]]:
        if not isinstance(plan, DevicePlan) or plan.aliased or torch.compiler.is_compiling():
            return None  # (an aliased plan scales through torch: see _scale)
        scratch = plan.scratch()
        norm = self._prepared_norm(plan, norm_type, max_norm, scratch)
        scale = _kernels.scale.prepare_scale_(
            plan.meta, plan.chunk_tensor, plan.chunk_start, plan.num_tensors, plan.num_chunks, plan.chunk_size,
            scratch.coef, block=self.block,
        )

        def clip() -> Tensor:
            total, _ = norm()
            scale()
            return total

        return launched_on(plan.device, clip)

    def prepare_clamp(self, plan: object, clip_value: float) -> Optional[Callable[[], None]]:
        if not isinstance(plan, DevicePlan) or torch.compiler.is_compiling():
            return None
        return launched_on(plan.device, _kernels.clamp.prepare_clamp_(
            plan.meta, plan.chunk_tensor, plan.chunk_start, plan.num_tensors, plan.num_chunks, plan.chunk_size,
            clip_value, block=self.block,
        ))

    # AGC (UnitKernels): the same two launchers over a unit plan.

    def _unit_norms_on(self, tensors: list[Tensor], plan: DevicePlan, norm_type: float) -> Tensor:
        _, norms, _ = self._norms(tensors, norm_type, True, None, plan)
        return norms  # type: ignore[return-value]

    def _scale_units_on(self, tensors: list[Tensor], plan: DevicePlan, coefs: Tensor) -> None:
        self._scale(tensors, coefs, True, plan)

    def clamp_(self, tensors: Optional[list[Tensor]], clip_value: float, plan: Optional[DevicePlan] = None) -> None:
        if torch.compiler.is_compiling():
            torch.ops.fusedclip.triton_clamp_(tensors, float(clip_value))
            return
        plan = plan if plan is not None else self.cache.get(tensors)  # type: ignore[arg-type]
        with on_device(plan.device):
            _kernels.clamp.clamp_(
                plan.meta, plan.chunk_tensor, plan.chunk_start, plan.num_tensors, plan.num_chunks, plan.chunk_size,
                clip_value, block=self.block,
            )


_HERE = contextlib.nullcontext()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Where a launch for tensors on `device` must run: Triton launches on the current CUDA device (its tables,
    stream and compiled kernel are that device's), so another device is made current around it."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return _HERE


def launched_on(device: torch.device, call: Callable) -> Callable:
    """`call` (a prepared launch) made on `device` whichever device is current when it is called."""
    if device.type != "cuda":
        return call
    index = device.index

    def on_its_device(*args: Any) -> Any:
        if torch.cuda.current_device() == index:
            return call(*args)
        with torch.cuda.device(index):
            return call(*args)

    return on_its_device


# ---- torch.compile -------------------------------------------------------------------------------------------
# The kernels take their tensors as addresses in a table built with data_ptr(), which torch.compile cannot
# trace (fake tensors have no storage), so torch.library.triton_op cannot see into them. Each backend op is
# registered instead as an opaque custom op with a fake implementation: a compiled step calls it as one node,
# with no graph break, and it runs the same kernels (plan cache included) at run time. The backend's methods
# call these ops only while torch.compile traces; eager calls skip the op layer's overhead.

_default: Optional[TritonBackend] = None


class _Kernels:
    """The kernel modules (fusedclip.triton_kernels), imported by load(): importing them imports triton. Their
    launchers are looked up as module attributes at each call (tests replace them)."""

    launch = norm = scale = clamp = None  # type: ignore[assignment]


_kernels = _Kernels()


def _backend() -> TritonBackend:
    global _default
    if _default is None:
        _default = TritonBackend()
    return _default


@torch.library.custom_op("fusedclip::triton_norms", mutates_args=())
def _norms_op(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    total, norms, _ = _backend()._norms(tensors, norm_type, True, None)
    return total, norms  # type: ignore[return-value]


@_norms_op.register_fake
def _(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    acc, dev = acc_dtype(t.dtype for t in tensors), tensors[0].device
    return torch.empty((), dtype=acc, device=dev), torch.empty(len(tensors), dtype=acc, device=dev)


@torch.library.custom_op("fusedclip::triton_norm_and_coef", mutates_args=())
def _norm_and_coef_op(tensors: list[Tensor], norm_type: float, max_norm: float) -> tuple[Tensor, Tensor]:
    total, _, coef = _backend()._norms(tensors, norm_type, False, max_norm)
    return total, coef  # type: ignore[return-value]


@_norm_and_coef_op.register_fake
def _(tensors: list[Tensor], norm_type: float, max_norm: float) -> tuple[Tensor, Tensor]:
    acc, dev = acc_dtype(t.dtype for t in tensors), tensors[0].device
    return torch.empty((), dtype=acc, device=dev), torch.empty((), dtype=acc, device=dev)


@torch.library.custom_op("fusedclip::triton_scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], coef: Tensor, per_tensor: bool) -> None:
    _backend()._scale(tensors, coef, per_tensor)


@_scale_op.register_fake
def _(tensors: list[Tensor], coef: Tensor, per_tensor: bool) -> None:
    return None


@torch.library.custom_op("fusedclip::triton_clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    _backend().clamp_(tensors, clip_value)


@_clamp_op.register_fake
def _(tensors: list[Tensor], clip_value: float) -> None:
    return None


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """The host-overhead benchmark's mode (`python -m fusedclip bench --host` on CPU): within it every launch of the
    Triton kernels is a no-op (after its host work: argument packing, allocations, the launch cache), and the
    backend takes CPU tensors without Triton's interpreter. The kernels do not run: totals and gradients are not
    computed. What remains is the host time of a call. Raises BackendUnavailable where triton cannot load."""
    load()
    with _kernels.launch.stubbed():
        yield


def _kernels_interpreted() -> bool:
    """Whether triton built our kernels for its CPU interpreter (decided when triton first saw them)."""
    _import_kernels()
    return type(_kernels.norm._reduce_kernel).__name__ == "InterpretedFunction"


def _import_kernels() -> None:
    """Fill _kernels; BackendUnavailable saying why where triton or the kernels cannot be imported."""
    if _kernels.launch is not None:
        return
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        raise BackendUnavailable(f"triton cannot be imported: {type(e).__name__}: {e}") from e
    try:
        from fusedclip.triton_kernels import clamp, launch, multi_tensor_norm, scale
    except Exception as e:
        raise BackendUnavailable(f"the Triton kernels failed to load: {type(e).__name__}: {e}") from e
    _kernels.norm, _kernels.scale, _kernels.clamp, _kernels.launch = multi_tensor_norm, scale, clamp, launch


def load() -> TritonBackend:
    _import_kernels()
    return _backend()
