"""The backend seam: one small interface, one module per backend, chosen here and nowhere else.

A backend works on the gradients of one device. The API layer (fusedclip.dispatch) splits a call into such
groups, sends tensors a backend does not accept to the torch backend, and combines the group totals.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor

BACKEND_NAMES = ("cuda", "triton", "torch")
ENV_VAR = "FUSEDCLIP_BACKEND"

# Auto choice for CUDA tensors, best first. Every other device type gets "torch".
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")
_MODULES = {
    "cuda": "fusedclip.backends.cuda_backend",
    "triton": "fusedclip.backends.triton_backend",
    "torch": "fusedclip.backends.torch_backend",
}


# The optional host extension fusedclip._host (csrc/host/): the fast path's per-call check (fusedclip.fastpath) and
# the torch backend's CPU passes (torch_backend.cpu_passes). FUSEDCLIP_NO_HOST_EXT=1 (read at import) leaves it unused.
ENV_NO_HOST_EXT = "FUSEDCLIP_NO_HOST_EXT"


def load_host_extension() -> tuple[Optional[Any], str]:
    """(fusedclip._host, or None where it is not to be used; which per-call check runs and, if it is the Python one,
    why)."""
    if os.environ.get(ENV_NO_HOST_EXT, "").strip().lower() in ("1", "true", "yes", "on"):
        return None, f"Python ({ENV_NO_HOST_EXT}=1 is set)"
    try:
        module = importlib.import_module("fusedclip._host")
    except ModuleNotFoundError as e:
        if e.name != "fusedclip._host":
            return None, f"Python (fusedclip._host failed to import: {e})"
        return None, (
            "Python (the host extension fusedclip._host is not built: `pip install --no-build-isolation .` builds it "
            "when a C++ compiler is found)"
        )
    except (ImportError, OSError) as e:  # a build for another torch: undefined symbols
        return None, f"Python (fusedclip._host failed to load: {type(e).__name__}: {e}; rebuild it against this torch)"
    built = getattr(module, "TORCH_VERSION", "unknown")
    # torch.__version__ as setup.py hands it to the extension's build (see setup.arch_token).
    if built != (re.sub(r"[^0-9A-Za-z.+]+", "_", torch.__version__.strip()) or "none"):
        return None, (
            f"Python (fusedclip._host was built against torch {built}, this is torch {torch.__version__}: rebuild it "
            "with `pip install --no-build-isolation .`)"
        )
    return module, "C++ (fusedclip._host)"


class BackendUnavailable(RuntimeError):
    """Raised by a backend module's load() when it cannot run here; the message says why."""


class Backend:
    """What a backend implements. All tensors handed to one call live on one device and have numel > 0.

    Norm results are in the accumulation dtype: float64 when any tensor is float64, else float32.

    `plan`: what `plan(tensors)` returned for the call's tensors (a kernel backend's device plan), looked up once per
    call by the caller and handed to each method; None: the method looks it up. When a plan is given, `tensors` may
    be None for a backend whose `reads_plan_only` is True (the steady-state fast path, fusedclip.fastpath, then has
    no list to build).
    """

    name: str = ""
    reads_plan_only = False  # its methods need only the plan of the tensors, not the tensors (given a plan)
    # Its prepared calls (below) bind state of the stream they were prepared on (scratch, a ticket): a kept plan then
    # prepares them once per stream. False: a prepared call serves every stream.
    prepares_per_stream = False

    def runs_on(self, device: torch.device) -> bool:
        raise NotImplementedError

    def accepts(self, t: Tensor) -> bool:
        """Whether this backend's kernels take `t` (dense, supported dtype); others go to the torch backend."""
        raise NotImplementedError

    def plan(self, tensors: list[Tensor]) -> Optional[object]:
        """The device plan of these tensors (cached; see backends.plan), or None: a backend without one, or while
        torch.compile traces (the traced methods find theirs at run time)."""
        return None

    def norms(
        self, tensors: list[Tensor], norm_type: float, per_tensor: bool, plan: Optional[object] = None
    ) -> tuple[Tensor, Optional[Tensor]]:
        """(total, per-tensor norms or None). The total follows torch's definition for every norm type:
        for p = 0 it counts tensors with any non-zero entry."""
        raise NotImplementedError

    def norm_and_coef(
        self, tensors: list[Tensor], norm_type: float, max_norm: float, plan: Optional[object] = None
    ) -> tuple[Tensor, Tensor]:
        """(total, clip coefficient) as device scalars. Kernel backends fold the coefficient into their finalize."""
        total, _ = self.norms(tensors, norm_type, False, plan)
        return total, clip_coef(total, max_norm)

    def scale_(self, tensors: list[Tensor], coef: Tensor, plan: Optional[object] = None) -> None:
        """g *= coef in place; coef is a device scalar of this device. May skip the pass when coef == 1."""
        raise NotImplementedError

    def scale_per_tensor_(self, tensors: list[Tensor], coefs: Tensor, plan: Optional[object] = None) -> None:
        """tensors[i] *= coefs[i] in place."""
        raise NotImplementedError

    def clamp_(self, tensors: list[Tensor], clip_value: float, plan: Optional[object] = None) -> None:
        """g = clamp(g, -clip_value, clip_value) in place."""
        raise NotImplementedError

    # Prepared calls (the steady-state fast path, fusedclip.fastpath): a kept plan calls the same method with the same
    # arguments every step, so a backend may prepare that call once (its launches keyed, its scratch bound) and
    # return it; None: no prepared form, the caller calls the method above each time. A prepared call may bind
    # scratch it reuses (the clip coefficient, a ticket: DevicePlan.scratch) only if it serves one stream
    # (prepares_per_stream); it never returns that scratch (a returned total may outlive the next call).

    def prepare_norm(self, plan: object, norm_type: float) -> Optional[Callable[[], Tensor]]:
        """norms(None, norm_type, False, plan)[0], prepared: returns a new total at each call."""
        return None

    def prepare_clip_norm(self, plan: object, norm_type: float, max_norm: float) -> Optional[Callable[[], Tensor]]:
        """norm_and_coef then scale_ by that coefficient, prepared: returns a new total at each call."""
        return None

    def prepare_clamp(self, plan: object, clip_value: float) -> Optional[Callable[[], None]]:
        """clamp_(None, clip_value, plan), prepared."""
        return None

    # Unit-wise norms and scaling (AGC). A unit of tensor i is what remains when `reduce_dims[i]` are reduced
    # (None: the whole tensor is one unit); units are numbered in row-major order of the kept dims, tensor 0's
    # first. The defaults below are correct for any tensor torch can reduce; a kernel backend may override them
    # with one reduce and one scale launch. The tensors may include some this backend does not `accept`
    # (parameters travel with their gradients): an override must handle those or hand them to the default.

    def unit_norms(
        self, tensors: list[Tensor], reduce_dims: list[Optional[tuple[int, ...]]], norm_type: float
    ) -> Tensor:
        """1-D tensor of every unit's norm, in the accumulation dtype of `tensors`."""
        acc = acc_dtype(t.dtype for t in tensors)
        parts: list[Optional[Tensor]] = [None] * len(tensors)
        whole = [i for i, d in enumerate(reduce_dims) if d is None and self.accepts(tensors[i])]
        if whole:
            # Whole-tensor units are the backend's own per-tensor norms: one call for all it accepts.
            _, norms = self.norms([tensors[i] for i in whole], norm_type, per_tensor=True)
            for i, n in zip(whole, norms.to(acc).split(1)):  # type: ignore[union-attr]
                parts[i] = n
        for i, d in enumerate(reduce_dims):
            if parts[i] is None:
                t = tensors[i]
                dtype = norm_dtype(t.dtype)
                parts[i] = torch.linalg.vector_norm(t, norm_type, dim=d, dtype=dtype).reshape(-1).to(acc)
        return torch.cat(parts)  # type: ignore[arg-type]

    def scale_units_(self, tensors: list[Tensor], reduce_dims: list[Optional[tuple[int, ...]]], coefs: Tensor) -> None:
        """Multiply every unit of `tensors` in place by its entry of `coefs` (laid out as unit_norms returns)."""
        counts = [unit_count(t, d) for t, d in zip(tensors, reduce_dims)]
        factors = [
            c.reshape(unit_shape(t, d)) for t, d, c in zip(tensors, reduce_dims, coefs.split(counts))
        ]
        if all(t.layout == torch.strided for t in tensors):
            torch._foreach_mul_(tensors, factors)
        else:
            for t, f in zip(tensors, factors):
                t.mul_(f)


def norm_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """dtype= for torch's norm of one tensor: float32 for bf16/fp16, None (torch's own) for the rest."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else None


def acc_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """Accumulation and result dtype: float64 if any input is float64 (or complex128), else float32."""
    return torch.float64 if any(d in (torch.float64, torch.complex128) for d in dtypes) else torch.float32


def unit_shape(t: Tensor, reduce_dims: Optional[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of `t`'s unit norms kept broadcastable against `t` (size 1 on reduced dims; () for whole)."""
    if reduce_dims is None:
        return ()
    return tuple(1 if i in reduce_dims else s for i, s in enumerate(t.shape))


def unit_count(t: Tensor, reduce_dims: Optional[tuple[int, ...]]) -> int:
    n = 1
    for s in unit_shape(t, reduce_dims):
        n *= s
    return n


def clip_coef(total: Tensor, max_norm: Union[float, Tensor]) -> Tensor:
    """torch's clip coefficient: min(max_norm / (total + 1e-6), 1), NaN when total is NaN. A tensor max_norm (a
    checked one under torch.compile) is taken in total's dtype, as a number would be."""
    if isinstance(max_norm, Tensor):
        max_norm = max_norm.to(device=total.device, dtype=total.dtype)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


_loaded: dict[str, Backend] = {}
_reasons: dict[str, str] = {}


def _load(name: str) -> Optional[Backend]:
    if name in _loaded:
        return _loaded[name]
    if name in _reasons:
        return None
    if torch.compiler.is_compiling():
        # torch.compile cannot trace an import; preload_backends() (run by `import fusedclip`) loads every
        # backend a call can pick, so only a backend named for a device it cannot run on gets here.
        raise RuntimeError(
            f"fusedclip backend {name!r} was not loaded before torch.compile traced this call; call "
            "fusedclip.preload_backends() (or fusedclip.available_backends()) before compiling"
        )
    try:
        module = importlib.import_module(_MODULES[name])
        backend = module.load()
    except ModuleNotFoundError as e:
        if e.name != _MODULES[name]:
            _reasons[name] = f"import failed: {e}"
        else:
            _reasons[name] = "not part of this version of fusedclip"
        return None
    except BackendUnavailable as e:
        _reasons[name] = str(e)
        return None
    except Exception as e:  # a broken install must never break `import fusedclip`
        _reasons[name] = f"failed to load: {type(e).__name__}: {e}"
        return None
    _loaded[name] = backend
    return backend


def preload_backends() -> None:
    """Load every backend a call may pick, so that no import happens while torch.compile traces a call (dynamo
    cannot trace one): the torch backend always, the kernel backends when a device they run on may be present
    (CUDA, or Triton's interpreter) or FUSEDCLIP_BACKEND names one. On a CPU-only machine that is the torch
    backend alone: nothing extra is imported."""
    _load("torch")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        available_backends()
    elif os.environ.get(ENV_VAR, "").strip() in BACKEND_NAMES:
        _load(os.environ[ENV_VAR].strip())


def _devices_here() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _why_not(name: str) -> Optional[str]:
    """Why backend `name` cannot run in this process, or None when it runs on at least one device here.
    A backend can load and still run nowhere: triton without a GPU, unless its interpreter is on."""
    b = _load(name)
    if b is None:
        return _reasons[name]
    devices = _devices_here()
    if any(b.runs_on(d) for d in devices):
        return None
    if name == "triton" and not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") == "1":
            return "no CUDA device, and TRITON_INTERPRET=1 was set after the Triton kernels were loaded (set it before)"
        return (
            "no CUDA device, and TRITON_INTERPRET=1 was not set before triton was imported (Triton runs on CPU "
            "only under its interpreter, a testing tool)"
        )
    return f"it runs on none of this process's devices ({', '.join(str(d) for d in devices)})"


def available_backends() -> list[str]:
    """Names of the backends that can run in this process (on at least one of its devices), best first."""
    return [n for n in BACKEND_NAMES if _why_not(n) is None]


def unavailable_reasons() -> dict[str, str]:
    """For each backend that cannot run here, why not."""
    reasons = {n: _why_not(n) for n in BACKEND_NAMES}
    return {n: why for n, why in reasons.items() if why is not None}


def check_backend_name(name: Optional[str]) -> Optional[str]:
    """None/'auto' -> the FUSEDCLIP_BACKEND default (or None for auto); unknown names -> ValueError."""
    if name is None or name == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env in ("", "auto"):
            return None
        if env not in BACKEND_NAMES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; use one of {', '.join(BACKEND_NAMES)} or auto")
        return env
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend={name!r} is not a backend; use one of {', '.join(BACKEND_NAMES)} or None (auto)")
    return name


def select(name: Optional[str], device: torch.device) -> Backend:
    """The backend for tensors on `device`. `name` was checked by check_backend_name."""
    if name is None:
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
        for n in order:
            b = _load(n)
            if b is not None and b.runs_on(device):
                return b
        raise RuntimeError(f"no fusedclip backend runs on {device}: {unavailable_reasons()}")
    b = _load(name)
    if b is None:
        raise RuntimeError(
            f"backend {name!r} is not available: {_reasons[name]}. Available: {', '.join(available_backends())}"
        )
    if not b.runs_on(device):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run Triton on CPU)" if name == "triton" else ""
        raise ValueError(
            f"backend {name!r} cannot run tensors on {device}{hint}; use backend=None to choose automatically"
        )
    return b
