"""The C++/CUDA backend: torch.ops.fusedclip.* from the optional extension fusedclip._C, over the shared plan.

Same contract as the Triton backend: one launch for the norm of any number of tensors (total, per-tensor norms
and clip coefficient finalized on the device), one for the scale (which returns at once when coef == 1), one
for the clamp. Built by setup.py when torch has CUDA and a CUDA toolkit is found; without it, load() says why and the
other backends carry on.

A kept plan's calls (fusedclip.fastpath) go to the planned_* ops, which take the plan's tables alone: the backend then
reads its plan only (no tensor list to build or convert per call) and prepares its calls as the Triton backend does.
Each call allocates its own scratch on the current stream (the ops do), so streams never share one, and a prepared
call serves every stream (prepares_per_stream is False: a kept plan prepares its calls once for all streams).
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from . import BackendUnavailable, acc_dtype, torch_backend
from .plan import DevicePlan, PlanCache, flat_ok, kernel_coef
from .units import UnitKernels

# Elements per chunk: a multiple of the kernels' kChunkAlign (16) so every chunk start stays 16-byte aligned.
CHUNK_SIZE = 65536

_ext = None
_ext_error: Optional[str] = None
_fakes_registered = False
_ops = torch.ops.fusedclip  # the extension's ops (tests on a machine without them put stand-ins here)


def _import_ext():
    """fusedclip._C, importing it once; raises BackendUnavailable with the reason it cannot be had."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            ext = importlib.import_module("fusedclip._C")
        except ModuleNotFoundError as e:
            if e.name == "fusedclip._C":
                _ext_error = (
                    "the CUDA extension fusedclip._C is not built (it is built by `pip install --no-build-isolation .` "
                    "when torch has CUDA and a CUDA toolkit is found; FUSEDCLIP_FORCE_CUDA=1 forces it)"
                )
            else:
                _ext_error = f"fusedclip._C failed to import: {e}"
        except (ImportError, OSError) as e:  # a stale build against another torch: undefined symbols
            _ext_error = f"fusedclip._C failed to load ({type(e).__name__}: {e}); rebuild it against this torch"
        else:
            _ext = ext
            if hasattr(torch.ops.fusedclip, "norm"):
                _register_fakes()  # with the ops: any later fake-tensor trace of them needs these
    if _ext is None:
        raise BackendUnavailable(_ext_error or "fusedclip._C is not available")
    return _ext


def build_info() -> Optional[dict]:
    """Build information of the CUDA extension (CUDA version, compiled archs, kernel parameters, and which
    binary the current device loads), or None when the extension is not built or does not load."""
    try:
        ext = _import_ext()
    except BackendUnavailable:
        return None
    return dict(ext.build_info())


def _register_fakes() -> None:
    """Fake (meta) kernels so torch.compile can trace the ops without running them."""
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("fusedclip::norm")
    def _norm_fake(grads, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, per_tensor):
        acc = acc_dtype(g.dtype for g in grads)
        return meta.new_empty((), dtype=acc), meta.new_empty((len(grads) if per_tensor else 0,), dtype=acc)

    @torch.library.register_fake("fusedclip::norm_and_coef")
    def _norm_and_coef_fake(grads, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type, max_norm):
        acc = acc_dtype(g.dtype for g in grads)
        return meta.new_empty((), dtype=acc), meta.new_empty((), dtype=acc)

    @torch.library.register_fake("fusedclip::scale")
    def _scale_fake(grads, meta, chunk_tensor, chunk_start, chunk_size, coef):
        return None

    @torch.library.register_fake("fusedclip::scale_per_tensor")
    def _scale_per_tensor_fake(grads, meta, chunk_tensor, chunk_start, chunk_size, coefs):
        return None

    @torch.library.register_fake("fusedclip::clamp")
    def _clamp_fake(grads, meta, chunk_tensor, chunk_start, chunk_size, clip_value):
        return None

    if _has_unit_ops():  # an extension built before the AGC ops lacks them

        @torch.library.register_fake("fusedclip::unit_norms")
        def _unit_norms_fake(tensors, meta, chunk_tensor, chunk_start, tensor_chunks, chunk_size, norm_type):
            return meta.new_empty((meta.shape[1],), dtype=acc_dtype(t.dtype for t in tensors))

        @torch.library.register_fake("fusedclip::scale_units")
        def _scale_units_fake(tensors, meta, chunk_tensor, chunk_start, chunk_size, coefs):
            return None

    _fakes_registered = True


def _has_unit_ops() -> bool:
    return hasattr(torch.ops.fusedclip, "unit_norms") and hasattr(torch.ops.fusedclip, "scale_units")


def _has_planned_ops() -> bool:
    return all(hasattr(_ops, f"planned_{job}") for job in ("norm", "scale", "clamp"))


class CudaBackend(UnitKernels):
    name = "cuda"

    def __init__(self) -> None:
        self.plans = PlanCache(CHUNK_SIZE)
        # With the planned_* ops (an extension built before them lacks them) every method takes tensors=None given a
        # plan: the fast path then keeps one plan and prepared calls (Backend.reads_plan_only).
        self.reads_plan_only = _has_planned_ops()

    @property
    def cache(self) -> PlanCache:  # the name UnitKernels looks the unit plans up in
        return self.plans

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def accepts(self, t: Tensor) -> bool:
        return flat_ok(t)

    # While torch.compile traces, the methods below call the opaque ops at the end of this module instead: the
    # plan lookup reads data_ptr(), which dynamo cannot trace (fake tensors have no storage), and a mutating op
    # whose tables were built at trace time would write to stale addresses when functionalization hands it
    # copies. The opaque ops build (or find) the plan from the tensors they actually get, at run time.

    def plan(self, tensors: list[Tensor]) -> Optional[DevicePlan]:
        return None if torch.compiler.is_compiling() else self.plans.get(tensors)

    def norms(
        self, tensors: list[Tensor], norm_type: float, per_tensor: bool, plan: Optional[DevicePlan] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        if torch.compiler.is_compiling():
            total, norms = torch.ops.fusedclip.cuda_norms(tensors, float(norm_type), per_tensor)
            return total, (norms if per_tensor else None)
        return self._norms(tensors, norm_type, per_tensor, plan)

    def _norms(
        self, tensors: Optional[list[Tensor]], norm_type: float, per_tensor: bool, plan: Optional[DevicePlan] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        if tensors is None:  # a kept plan's call (reads_plan_only): the tables alone
            total, norms, _ = _ops.planned_norm(*_norm_tables(plan), float(norm_type), per_tensor, None)
            return total, (norms if per_tensor else None)
        p = plan if plan is not None else self.plans.get(tensors)
        total, norms = _ops.norm(
            tensors, p.meta, p.chunk_tensor, p.chunk_start, p.tensor_chunks, p.chunk_size, float(norm_type), per_tensor
        )
        return total, (norms if per_tensor else None)

    def norm_and_coef(
        self, tensors: list[Tensor], norm_type: float, max_norm: float, plan: Optional[DevicePlan] = None
    ) -> tuple[Tensor, Tensor]:
        if torch.compiler.is_compiling():
            return torch.ops.fusedclip.cuda_norm_and_coef(tensors, float(norm_type), float(max_norm))
        return self._norm_and_coef(tensors, norm_type, max_norm, plan)

    def _norm_and_coef(
        self, tensors: Optional[list[Tensor]], norm_type: float, max_norm: float, plan: Optional[DevicePlan] = None
    ) -> tuple[Tensor, Tensor]:
        if tensors is None:
            total, _, coef = _ops.planned_norm(*_norm_tables(plan), float(norm_type), False, float(max_norm))
            return total, coef
        p = plan if plan is not None else self.plans.get(tensors)
        return _ops.norm_and_coef(
            tensors, p.meta, p.chunk_tensor, p.chunk_start, p.tensor_chunks, p.chunk_size, float(norm_type),
            float(max_norm),
        )

    def scale_(self, tensors: list[Tensor], coef: Tensor, plan: Optional[DevicePlan] = None) -> None:
        if torch.compiler.is_compiling():
            torch.ops.fusedclip.cuda_scale_(tensors, coef, False)
            return
        self._scale(tensors, coef, False, plan)

    def scale_per_tensor_(self, tensors: list[Tensor], coefs: Tensor, plan: Optional[DevicePlan] = None) -> None:
        if torch.compiler.is_compiling():
            torch.ops.fusedclip.cuda_scale_(tensors, coefs, True)
            return
        self._scale(tensors, coefs, True, plan)

    def _scale(
        self, tensors: Optional[list[Tensor]], coef: Tensor, per_tensor: bool, plan: Optional[DevicePlan] = None
    ) -> None:
        p = plan if plan is not None else self.plans.get(tensors)  # type: ignore[arg-type]
        coef = kernel_coef(coef, p.device)
        if p.aliased:  # torch scales a tensor listed twice twice, in turn; the kernel would race
            fallback = torch_backend.load()  # (never a kept plan's: the fast path keeps no aliased list)
            (fallback.scale_per_tensor_ if per_tensor else fallback.scale_)(tensors, coef)  # type: ignore[arg-type]
            return
        coef = coef.reshape(-1).contiguous() if per_tensor else coef.reshape(())
        if tensors is None:
            _ops.planned_scale(p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size, coef, per_tensor)
        elif per_tensor:
            _ops.scale_per_tensor(tensors, p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size, coef)
        else:
            _ops.scale(tensors, p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size, coef)

    # AGC (UnitKernels): one unit_norms launch and one scale_units launch over a unit plan.

    def _units_available(self) -> bool:
        return super()._units_available() and _has_unit_ops()

    def _unit_norms_on(self, tensors: list[Tensor], plan: DevicePlan, norm_type: float) -> Tensor:
        return torch.ops.fusedclip.unit_norms(
            tensors, plan.meta, plan.chunk_tensor, plan.chunk_start, plan.tensor_chunks, plan.chunk_size,
            float(norm_type),
        )

    def _scale_units_on(self, tensors: list[Tensor], plan: DevicePlan, coefs: Tensor) -> None:
        torch.ops.fusedclip.scale_units(tensors, plan.meta, plan.chunk_tensor, plan.chunk_start, plan.chunk_size, coefs)

    def clamp_(self, tensors: list[Tensor], clip_value: float, plan: Optional[DevicePlan] = None) -> None:
        if torch.compiler.is_compiling():
            torch.ops.fusedclip.cuda_clamp_(tensors, float(clip_value))
            return
        self._clamp(tensors, clip_value, plan)

    def _clamp(self, tensors: Optional[list[Tensor]], clip_value: float, plan: Optional[DevicePlan] = None) -> None:
        p = plan if plan is not None else self.plans.get(tensors)  # type: ignore[arg-type]
        if tensors is None:
            _ops.planned_clamp(p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size, float(clip_value))
        else:
            _ops.clamp(tensors, p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size, float(clip_value))

    # Prepared calls of a kept plan (Backend.prepare_*): the planned_* ops with their arguments bound once. The ops
    # allocate each call's scratch on the current stream and guard the plan's device, so a prepared call serves any
    # stream and any current device.

    def _planned(self, plan: object) -> bool:
        return isinstance(plan, DevicePlan) and self.reads_plan_only and not torch.compiler.is_compiling()

    def prepare_norm(self, plan: object, norm_type: float) -> Optional[Callable[[], Tensor]]:
        if not self._planned(plan):
            return None
        norm = functools.partial(_ops.planned_norm.default, *_norm_tables(plan), float(norm_type), False, None)
        return lambda: norm()[0]

    def prepare_clip_norm(self, plan: object, norm_type: float, max_norm: float) -> Optional[Callable[[], Tensor]]:
        if not self._planned(plan) or plan.aliased:  # type: ignore[union-attr]
            return None  # (an aliased plan scales through torch: see _scale)
        p: DevicePlan = plan  # type: ignore[assignment]
        norm = functools.partial(_ops.planned_norm.default, *_norm_tables(p), float(norm_type), False, float(max_norm))
        scale = functools.partial(_ops.planned_scale.default, p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size)

        def clip() -> Tensor:
            total, _, coef = norm()
            scale(coef, False)
            return total

        return clip

    def prepare_clamp(self, plan: object, clip_value: float) -> Optional[Callable[[], None]]:
        if not self._planned(plan):
            return None
        p: DevicePlan = plan  # type: ignore[assignment]
        return functools.partial(_ops.planned_clamp.default, p.meta, p.chunk_tensor, p.chunk_start, p.chunk_size,
                                 float(clip_value))


def _norm_tables(p: DevicePlan) -> tuple:
    """planned_norm's leading arguments: the tables, the chunk size and whether to accumulate in float64."""
    return p.meta, p.chunk_tensor, p.chunk_start, p.tensor_chunks, p.chunk_size, p.acc_dtype == torch.float64


_instance: Optional[CudaBackend] = None


def load() -> CudaBackend:
    """The backend, or BackendUnavailable saying why not (extension not built or not loadable, no CUDA device)."""
    global _instance
    if _instance is None:
        _import_ext()
        if not hasattr(torch.ops.fusedclip, "norm"):
            raise BackendUnavailable("fusedclip._C loaded but registered no torch.ops.fusedclip ops")
        if not torch.cuda.is_available():
            raise BackendUnavailable("fusedclip._C is built, but no CUDA device is visible")
        _register_fakes()
        _instance = CudaBackend()
    return _instance


# ---- torch.compile -------------------------------------------------------------------------------------------
# Opaque ops over the whole backend call (plan lookup included), as the Triton backend has: a compiled step calls
# each as one node, with no graph break, and at run time it finds the plan of the tensors it is really handed.


@torch.library.custom_op("fusedclip::cuda_norms", mutates_args=())
def _norms_op(tensors: list[Tensor], norm_type: float, per_tensor: bool) -> tuple[Tensor, Tensor]:
    total, norms = load()._norms(tensors, norm_type, per_tensor)
    return total, (norms if norms is not None else total.new_empty((0,)))


@_norms_op.register_fake
def _(tensors: list[Tensor], norm_type: float, per_tensor: bool) -> tuple[Tensor, Tensor]:
    acc, dev = acc_dtype(t.dtype for t in tensors), tensors[0].device
    return torch.empty((), dtype=acc, device=dev), torch.empty(len(tensors) if per_tensor else 0, dtype=acc, device=dev)


@torch.library.custom_op("fusedclip::cuda_norm_and_coef", mutates_args=())
def _norm_and_coef_op(tensors: list[Tensor], norm_type: float, max_norm: float) -> tuple[Tensor, Tensor]:
    return load()._norm_and_coef(tensors, norm_type, max_norm)


@_norm_and_coef_op.register_fake
def _(tensors: list[Tensor], norm_type: float, max_norm: float) -> tuple[Tensor, Tensor]:
    acc, dev = acc_dtype(t.dtype for t in tensors), tensors[0].device
    return torch.empty((), dtype=acc, device=dev), torch.empty((), dtype=acc, device=dev)


@torch.library.custom_op("fusedclip::cuda_scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], coef: Tensor, per_tensor: bool) -> None:
    load()._scale(tensors, coef, per_tensor)


@_scale_op.register_fake
def _(tensors: list[Tensor], coef: Tensor, per_tensor: bool) -> None:
    return None


@torch.library.custom_op("fusedclip::cuda_clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    load()._clamp(tensors, clip_value)


@_clamp_op.register_fake
def _(tensors: list[Tensor], clip_value: float) -> None:
    return None


# The ops name this module as the home of their fakes (set_python_module): when fusedclip._C was loaded without
# load()/build_info() and torch imports this module to find them, register them now.
if "fusedclip._C" in sys.modules:
    try:
        _import_ext()
    except BackendUnavailable:
        pass
