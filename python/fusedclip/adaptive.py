"""Adaptive clipping: AGC (unit-wise, Brock et al. 2021), ZClip (Kumar et al. 2025) and AutoClip
(Seetharaman et al. 2020), on the core multi-tensor norm, with their state kept on the device.

Nothing here reads a value back to the host: every data-dependent decision is a `torch.where` on device
scalars. What the host does know (how many steps were taken) is kept on the host in eager mode. Under
torch.compile a host count would be baked into the graph (a recompile every step), so ZClip and AutoClip count
compiled steps on the device and take their warm-up / history decisions there too: one graph for every step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import dispatch
from .arguments import check_nonnegative, collect_grads, has_dtensor, parse_norm_type
from .backends import check_backend_name, clip_coef
from .clip import clip_norm_of_grads_

ModelOrParameters = Union[torch.nn.Module, Tensor, Iterable[Tensor]]

# zclip and the AutoClip reference code keep their statistics in Python floats (float64); so do we, on the
# device, except where the device has no float64.
_NO_FLOAT64 = ("mps",)


def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def _parameters(model_or_parameters: ModelOrParameters, where: str) -> list[Tensor]:
    if isinstance(model_or_parameters, torch.nn.Module):
        params = list(model_or_parameters.parameters())
    elif isinstance(model_or_parameters, Tensor):
        params = [model_or_parameters]
    else:
        try:
            params = list(model_or_parameters)
        except TypeError:
            raise TypeError(
                f"{where}: expected a torch.nn.Module, a Tensor or an iterable of Tensors, "
                f"got {type(model_or_parameters).__name__}"
            ) from None
    if not params:
        # Most often an exhausted generator (model.parameters() stored once and re-used every step).
        raise ValueError(f"{where}: no parameters given (pass the model, or a fresh model.parameters() each step)")
    return params


def _check_no_dtensor(tensors: Iterable[Tensor], where: str) -> None:
    if has_dtensor(list(tensors)):
        raise NotImplementedError(
            f"{where} does not take DTensor (sharded) parameters or gradients yet; "
            "adaptive clipping of sharded gradients is not implemented (clip_grad_norm_ takes them)"
        )


def _real(value: Any, name: str, *, positive: bool = False, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)) or v < 0 or (positive and v == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {'finite and ' if finite else ''}{need}, got {v}")
    return v


def _count(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# AGC


def _reduce_dims(t: Tensor, convention: str, where: str) -> Optional[tuple[int, ...]]:
    """Dims reduced to get `t`'s units, or None when the whole tensor is one unit."""
    if convention == "timm":
        # Output units on the first dim (torch's Linear/ConvNd layouts); 0-/1-D: the whole tensor.
        return None if t.dim() <= 1 else tuple(range(1, t.dim()))
    # optax: squeezed 0-/1-D: whole; 2-/3-D (IO, multi-head): reduce dim 0; 4-D (HWIO): reduce dims 0-2.
    if sum(1 for s in t.shape if s != 1) <= 1:
        return None
    if t.dim() in (2, 3):
        return (0,)
    if t.dim() == 4:
        return (0, 1, 2)
    raise ValueError(f"{where} has shape {tuple(t.shape)}: the optax convention takes tensors of 1 to 4 dims")


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: ModelOrParameters,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: Union[float, int, str] = 2.0,
    *,
    convention: str = "timm",
    backend: Optional[str] = None,
) -> None:
    """Adaptive gradient clipping (AGC, Brock et al. 2021), in place; a drop-in for timm's
    ``adaptive_clip_grad``.

    Each unit's gradient ``g_u`` is scaled to ``g_u * m / max(|g_u|, 1e-6)`` where
    ``m = clip_factor * max(|w_u|, eps)``, unless ``|g_u| < m``. All unit norms of parameters and gradients
    come from one call of the backend's ``unit_norms``, and one ``scale_units_`` call scales them.

    Parameters
    ----------
    parameters : module, Tensor or iterable of Tensors; those without a .grad are skipped
    clip_factor : largest allowed ratio of gradient norm to parameter norm per unit, >= 0
    eps : floor on the parameter norm, so zero-initialised parameters can still move, >= 0
    norm_type : p > 0, inf, -inf, 0, or 'inf' / '-inf' (optax uses 2)
    convention : "timm" (units are output rows: every dim but the first is reduced; 0-/1-D tensors are one
        unit) or "optax" (JAX layouts: IO linear and multi-head weights reduce dim 0, HWIO convolutions dims
        0-2, tensors that squeeze to 0-/1-D are one unit; 5-D and up is an error)
    backend : "cuda", "triton", "torch" or None (auto)
    """
    if isinstance(parameters, torch.nn.Module):
        params: list = list(parameters.parameters())
    else:
        params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    collect_grads(params)  # type checks, before anything is touched
    p = parse_norm_type(norm_type)
    clip_factor = _real(clip_factor, "clip_factor", finite=False)
    eps = _real(eps, "eps")
    if convention not in ("timm", "optax"):
        raise ValueError(f"convention must be 'timm' or 'optax', got {convention!r}")
    check_backend_name(backend)
    pairs = [(w, w.grad) for w in params if w.grad is not None]
    _check_no_dtensor([t for pair in pairs for t in pair], "adaptive_clip_grad_")
    weights: list[Tensor] = []
    grads: list[Tensor] = []
    dims: list[Optional[tuple[int, ...]]] = []
    for i, (w, g) in enumerate(pairs):
        where = f"parameters[{i}]"
        if g.layout != torch.strided:
            raise TypeError(f"{where}.grad is {g.layout}: adaptive_clip_grad_ takes dense gradients only")
        if g.shape != w.shape or g.device != w.device:
            raise ValueError(
                f"{where}.grad has shape {tuple(g.shape)} on {g.device}, but the parameter has shape "
                f"{tuple(w.shape)} on {w.device}; AGC compares them unit by unit"
            )
        d = _reduce_dims(w, convention, where)
        if g.numel() == 0:
            continue
        weights.append(w.detach())
        grads.append(g)
        dims.append(d)
    if not grads:
        return
    plan = dispatch.make_plan(grads, backend)
    for group in plan.groups:
        w = [weights[i] for i in group.positions]
        d = [dims[i] for i in group.positions]
        # One call for the unit norms of parameters and gradients together.
        norms = group.backend.unit_norms(w + group.tensors, d + d, p)
        w_norm, g_norm = norms.chunk(2)
        max_norm = w_norm.clamp(min=eps) * clip_factor
        coef = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm.clamp(min=1e-6))
        group.backend.scale_units_(group.tensors, d, coef)


# ----------------------------------------------------------------------------------------------------------
# ZClip


def _run_while_tracing(fn):
    """torch.compiler.assume_constant_result, without importing torch._dynamo when fusedclip is imported (that
    import takes seconds): the decorator only sets this attribute, which dynamo reads when it meets the function
    (test_compile checks that it still does). Dynamo then runs the function for real while it traces, once, and
    takes its result as a constant."""
    fn._dynamo_marked_constant = True
    return fn


def _write_traced(state: Tensor, value: Tensor) -> None:
    """state.copy_(value) for a 0-d state tensor in traced code, through a 1-element view: torch.compile (seen
    with torch 2.13) silently drops an in-place write made directly to a 0-d float64 CPU graph input."""
    state.view(1).copy_(value.reshape(1))


def _grads_and_device(model_or_parameters: ModelOrParameters, where: str) -> tuple[list[Tensor], torch.device]:
    params = _parameters(model_or_parameters, where)
    grads = collect_grads(params)
    _check_no_dtensor(params + grads, where)
    return grads, (grads[0].device if grads else params[0].device)


def _plain_total(
    grads: list[Tensor], device: torch.device, backend: Optional[str]
) -> tuple[Tensor, Optional[dispatch.Plan]]:
    """Global 2-norm of `grads` (0 on `device` when there are none) and the plan to scale them with."""
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device), None
    plan = dispatch.make_plan(grads, backend)
    total, _ = dispatch.total_norm(plan, 2.0)
    return total, plan


class ZClip:
    """ZClip (Kumar et al. 2025): z-score spike clipping on EMA statistics of the total gradient norm.

    Step for step the same as the reference package ``zclip`` (``zclip.ZClip``), without its per-step host
    syncs: statistics live on the device and every decision is taken there.

    For the first ``max(warmup_steps, 1)`` steps the total norm is recorded and the gradients are clipped to
    ``max_grad_norm`` as ``torch.nn.utils.clip_grad_norm_`` would (not at all when it is None); then the
    EMA mean and variance start from those records. After warm-up, with ``std = sqrt(var)``:

    - ``mode="zscore"``: a spike is ``z = (norm - mean) / (std + eps) > z_thresh``; its threshold is
      ``clip_factor * (mean + z_thresh * std / (z / z_thresh))`` (``clip_option="adaptive_scaling"``) or
      ``mean`` (``clip_option="mean"``);
    - ``mode="percentile"``: a spike is ``norm > mean + z_thresh * std``, which is also its threshold.

    The limit is the threshold on a spike, else the norm itself, and at most ``max_grad_norm`` when that is
    set (so with the default 1.0 no total above 1 survives). Gradients are scaled by
    ``limit / (norm + 1e-6)`` when ``norm > limit``. The EMA is then updated with the threshold on a spike
    (skipped when ``skip_update_on_spike``), else with the norm:
    ``mean = alpha * mean + (1 - alpha) * x``, ``var = alpha * var + (1 - alpha) * (x - mean) ** 2``
    (with the updated mean, as the reference does).

    Norms are global 2-norms accumulated in float32 (float64 for float64 gradients); the reference takes them
    in the first parameter's dtype.

    >>> zclip = ZClip()
    >>> total = zclip.step(model)  # after backward(), before optimizer.step()
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: Optional[float] = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        *,
        backend: Optional[str] = None,
    ) -> None:
        alpha = _real(alpha, "alpha")
        if alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        if not isinstance(mode, str) or mode.lower() not in ("zscore", "percentile"):
            raise ValueError(f"mode must be 'zscore' or 'percentile', got {mode!r}")
        self.mode = mode.lower()
        if self.mode == "zscore":
            if not isinstance(clip_option, str) or clip_option.lower() not in ("adaptive_scaling", "mean"):
                raise ValueError(
                    f"clip_option must be 'adaptive_scaling' or 'mean' in zscore mode, got {clip_option!r}"
                )
            self.clip_option: Optional[str] = clip_option.lower()
        else:
            self.clip_option = None  # unused in percentile mode, as in the reference
        # adaptive_scaling divides by z / z_thresh.
        self.z_thresh = _real(z_thresh, "z_thresh", positive=self.clip_option == "adaptive_scaling")
        self.max_grad_norm = None if max_grad_norm is None else check_nonnegative(max_grad_norm, "max_grad_norm")
        self.eps = _real(eps, "eps")
        self.warmup_steps = _count(warmup_steps, "warmup_steps", 0)
        self.clip_factor = _real(clip_factor, "clip_factor", positive=True)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        check_backend_name(backend)
        self.backend = backend
        self._steps = 0  # host-side: how many steps were taken (known without looking at any value)
        self._traced_steps: Optional[Tensor] = None  # steps taken under torch.compile, not yet in _steps (device)
        self._warmup: Optional[Tensor] = None  # norms recorded during warm-up
        self._mean: Optional[Tensor] = None
        self._var: Optional[Tensor] = None

    @property
    def _warmup_len(self) -> int:
        return max(self.warmup_steps, 1)  # the reference initialises after its first step when warmup_steps is 0

    @property
    def steps(self) -> int:
        """How many steps were taken (after compiled steps, reading their device count is a host sync)."""
        return self._steps + (int(self._traced_steps) if self._traced_steps is not None else 0)

    @property
    def initialized(self) -> bool:
        """Whether warm-up is over and the EMA statistics are in use."""
        return self.steps >= self._warmup_len

    @property
    def mean(self) -> Optional[Tensor]:
        """EMA mean of the total norm (a device scalar), None during warm-up."""
        return self._mean if self.initialized else None

    @property
    def var(self) -> Optional[Tensor]:
        """EMA variance of the total norm (a device scalar), None during warm-up."""
        return self._var if self.initialized else None

    def _to(self, device: torch.device) -> None:
        dtype = _state_dtype(device)
        if self._warmup is None:
            self._warmup = torch.zeros(self._warmup_len, dtype=dtype, device=device)
        elif self._warmup.device != device:
            self._warmup = self._warmup.to(device=device, dtype=dtype)
        if self._mean is not None and self._mean.device != device:
            self._mean = self._mean.to(device=device, dtype=dtype)
            self._var = self._var.to(device=device, dtype=dtype)  # type: ignore[union-attr]
        if self._traced_steps is not None and self._traced_steps.device != device:
            self._traced_steps = self._traced_steps.to(device)

    def _fold_traced_steps(self) -> None:
        """Move the device count of compiled steps into the host count: an eager step after compiled ones (a host
        read per eager step from then on). The tensor is kept, zeroed, so compiled code sees the same attribute."""
        if self._traced_steps is not None:
            self._steps += int(self._traced_steps)
            self._traced_steps.zero_()

    def _decide(self, x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A step after warm-up: (clip coefficient, new mean, new var) from the norm `x` and the statistics."""
        std = var.sqrt()
        if self.mode == "percentile":
            threshold = mean + self.z_thresh * std
            spike = x > threshold
        else:
            z = (x - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh  # larger outliers are pulled further below the z_thresh line
                threshold = (mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                threshold = mean
        limit = torch.where(spike, threshold, x)
        if self.max_grad_norm is not None:
            limit = torch.clamp(limit, max=self.max_grad_norm)  # NaN stays NaN, as min(nan, m) in Python
        coef = torch.where(x > limit, limit / (x + 1e-6), torch.ones_like(x))

        seen = torch.where(spike, threshold, x)
        new_mean = self.alpha * mean + (1 - self.alpha) * seen
        new_var = self.alpha * var + (1 - self.alpha) * (seen - new_mean) ** 2
        if self.skip_update_on_spike:
            new_mean = torch.where(spike, mean, new_mean)
            new_var = torch.where(spike, var, new_var)
        return coef, new_mean, new_var

    @torch.no_grad()
    def step(self, model_or_parameters: ModelOrParameters) -> Tensor:
        """Clip the gradients in place; call after backward(), before optimizer.step().

        Returns the total 2-norm before clipping as a device scalar (float32, float64 for float64 gradients).
        """
        grads, device = _grads_and_device(model_or_parameters, "ZClip.step")
        if torch.compiler.is_compiling():
            return self._traced_step(grads, device)
        self._fold_traced_steps()
        if not self.initialized:
            if grads and self.max_grad_norm is not None:
                total = clip_norm_of_grads_(grads, self.max_grad_norm, 2.0, False, None, self.backend)
            else:
                total, _ = _plain_total(grads, device, self.backend)
            self._to(total.device)
            self._warmup[self._steps] = total  # type: ignore[index]
            self._steps += 1
            if self.initialized:
                w = self._warmup
                self._mean = w.mean()  # type: ignore[union-attr]
                self._var = ((w - self._mean) ** 2).mean()  # type: ignore[operator]
            return total

        total, plan = _plain_total(grads, device, self.backend)
        self._to(total.device)
        mean, var = self._mean, self._var
        assert mean is not None and var is not None
        coef, new_mean, new_var = self._decide(total.to(mean.dtype), mean, var)
        if plan is not None:
            dispatch.scale_(plan, coef.to(total.dtype))
        mean.copy_(new_mean)
        var.copy_(new_var)
        self._steps += 1
        return total

    @_run_while_tracing
    def _traced_state(self, device: torch.device) -> bool:
        """Create (or move to `device`) the state a compiled step reads, mean and var included (placeholders
        until warm-up ends; the `mean` / `var` properties hide them). torch.compile runs this for real, once,
        while it traces the first step (assume_constant_result), so that graph already reads the state every
        later step will find: no recompilation at the second step."""
        self._to(device)
        dtype = self._warmup.dtype  # type: ignore[union-attr]
        if self._traced_steps is None:
            self._traced_steps = torch.zeros((), dtype=torch.int64, device=device)
        if self._mean is None:
            self._mean = torch.zeros((), dtype=dtype, device=device)
            self._var = torch.zeros((), dtype=dtype, device=device)
        return True

    def _traced_step(self, grads: list[Tensor], device: torch.device) -> Tensor:
        """step() under torch.compile: the same results with no host decision, so one graph serves warm-up and
        after. Both branches are computed on device scalars and selected by the device step count."""
        self._traced_state(device)
        total, plan = _plain_total(grads, device, self.backend)
        records, mean, var = self._warmup, self._mean, self._var
        assert records is not None and mean is not None and var is not None and self._traced_steps is not None
        dtype = records.dtype
        last = self._warmup_len - 1
        taken = self._traced_steps + self._steps  # steps before this one
        warm = taken <= last
        x = total.to(dtype)
        slot = taken.clamp(max=last).reshape(1)
        records.index_copy_(0, slot, torch.where(warm, x, records[slot]))
        # Warm-up: clip_grad_norm_'s rule to max_grad_norm; the last warm-up step starts the statistics.
        if self.max_grad_norm is not None:
            warm_coef = clip_coef(total, self.max_grad_norm).to(dtype)
        else:
            warm_coef = torch.ones_like(x)
        first_mean = records.mean()
        first_var = ((records - first_mean) ** 2).mean()
        coef, ema_mean, ema_var = self._decide(x, mean, var)
        starts = taken == last
        coef = torch.where(warm, warm_coef, coef)
        new_mean = torch.where(warm, torch.where(starts, first_mean, mean), ema_mean)
        new_var = torch.where(warm, torch.where(starts, first_var, var), ema_var)
        if plan is not None:
            dispatch.scale_(plan, coef.to(total.dtype))
        _write_traced(mean, new_mean)
        _write_traced(var, new_var)
        self._traced_steps.add_(1)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the step count, the warm-up records and the EMA statistics (copies)."""
        steps = self.steps
        n = min(steps, self._warmup_len)
        warm = self._warmup[:n].clone() if self._warmup is not None else torch.zeros(0, dtype=torch.float64)
        done = steps >= self._warmup_len
        return {
            "steps": steps,
            "warmup_steps": self.warmup_steps,
            "warmup_norms": warm,
            "mean": self._mean.clone() if done else None,  # type: ignore[union-attr]
            "var": self._var.clone() if done else None,  # type: ignore[union-attr]
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state_dict() of a ZClip with the same warmup_steps; tensors move to the gradients' device
        at the next step."""
        missing = {"steps", "warmup_steps", "warmup_norms", "mean", "var"} - set(state_dict)
        if missing:
            raise ValueError(f"ZClip state_dict lacks {sorted(missing)}")
        steps = _count(state_dict["steps"], "state_dict['steps']", 0)
        if state_dict["warmup_steps"] != self.warmup_steps:
            raise ValueError(
                f"state_dict was saved with warmup_steps={state_dict['warmup_steps']}, this ZClip has "
                f"{self.warmup_steps}"
            )
        warm = state_dict["warmup_norms"]
        n = min(steps, self._warmup_len)
        if not isinstance(warm, Tensor) or tuple(warm.shape) != (n,):
            raise ValueError(f"state_dict['warmup_norms'] must be a 1-D tensor of {n} norms")
        mean, var = state_dict["mean"], state_dict["var"]
        done = steps >= self._warmup_len
        for name, v in (("mean", mean), ("var", var)):
            if done and not (isinstance(v, Tensor) and v.numel() == 1):
                raise ValueError(f"state_dict['{name}'] must be a one-element tensor after warm-up")
            if not done and v is not None:
                raise ValueError(f"state_dict['{name}'] must be None during warm-up")
        dtype = _state_dtype(warm.device)
        buf = torch.zeros(self._warmup_len, dtype=dtype, device=warm.device)
        buf[:n] = warm
        self._warmup = buf
        self._mean = mean.detach().reshape(()).to(dtype).clone() if done else None
        self._var = var.detach().reshape(()).to(dtype).clone() if done else None
        self._steps = steps
        if self._traced_steps is not None:
            self._traced_steps.zero_()

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha}, z_thresh={self.z_thresh}, max_grad_norm={self.max_grad_norm}, "
            f"eps={self.eps}, warmup_steps={self.warmup_steps}, mode={self.mode!r}, "
            f"clip_option={self.clip_option!r}, clip_factor={self.clip_factor}, "
            f"skip_update_on_spike={self.skip_update_on_spike}, steps={self.steps})"
        )


# ----------------------------------------------------------------------------------------------------------
# AutoClip


def _linear_percentile(sorted_values: Tensor, n: int, percentile: float) -> Tensor:
    """numpy.percentile(values, percentile) (method 'linear') of the first `n` sorted values, NaN when any is
    NaN. The positions depend on `n` alone, so they are worked out on the host, as numpy does them."""
    q = percentile / 100
    virtual = (n - 1) * q
    lo = math.floor(virtual)
    hi = lo + 1
    if virtual >= n - 1:  # numpy takes the last value for both and keeps gamma from the moved index
        lo = hi = -1
    gamma = virtual - lo
    a = sorted_values[lo if lo >= 0 else n - 1]
    b = sorted_values[hi if hi >= 0 else n - 1]
    diff = b - a
    value = b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma
    return torch.where(torch.isnan(sorted_values[n - 1]), sorted_values[n - 1], value)


def _linear_percentile_on_device(sorted_values: Tensor, n: Tensor, percentile: float, any_nan: Tensor) -> Tensor:
    """_linear_percentile with the count `n` a device integer (under torch.compile): the same positions and
    arithmetic, selected with torch.where. `any_nan`: whether a recorded value is NaN (the result is then NaN)."""
    q = percentile / 100
    count = n.to(sorted_values.dtype)
    virtual = (count - 1) * q
    floor = torch.floor(virtual)
    moved = virtual >= count - 1
    last = n - 1
    lo = torch.where(moved, last, floor.long())
    hi = torch.where(moved, last, floor.long() + 1)
    gamma = torch.where(moved, virtual + 1, virtual - floor)  # as the host form: gamma from the moved index -1
    a, b = sorted_values.index_select(0, torch.stack([lo, hi])).unbind()
    diff = b - a
    value = torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)
    return torch.where(any_nan, torch.full_like(value, float("nan")), value)


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): clip the total gradient norm to a percentile of its own history.

    Each step records the total 2-norm, then clips with ``torch.nn.utils.clip_grad_norm_``'s rule to
    ``numpy.percentile(recorded, percentile)`` (linear interpolation), the current norm included, as the
    paper's reference code does. Only the last ``history`` norms are kept, in a ring buffer on the device;
    nothing is read back to the host.

    >>> autoclip = AutoClip(percentile=10.0)
    >>> total = autoclip.step(model)  # after backward(), before optimizer.step()
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000, *, backend: Optional[str] = None) -> None:
        self.percentile = _real(percentile, "percentile")
        if self.percentile > 100:
            raise ValueError(f"percentile must be in [0, 100], got {self.percentile}")
        self.history = _count(history, "history", 1)
        check_backend_name(backend)
        self.backend = backend
        self._count = 0  # norms recorded so far (host-side)
        self._traced_count: Optional[Tensor] = None  # norms recorded under torch.compile, not yet in _count (device)
        self._norms: Optional[Tensor] = None
        self.threshold: Optional[Tensor] = None  # the last step's clip threshold (device scalar)

    def _to(self, device: torch.device) -> None:
        dtype = _state_dtype(device)
        if self._norms is None:
            self._norms = torch.zeros(self.history, dtype=dtype, device=device)
        elif self._norms.device != device:
            self._norms = self._norms.to(device=device, dtype=dtype)
        if self._traced_count is not None and self._traced_count.device != device:
            self._traced_count = self._traced_count.to(device)

    @property
    def count(self) -> int:
        """How many norms were recorded (after compiled steps, reading their device count is a host sync)."""
        return self._count + (int(self._traced_count) if self._traced_count is not None else 0)

    @torch.no_grad()
    def step(self, model_or_parameters: ModelOrParameters) -> Tensor:
        """Clip the gradients in place; returns the total 2-norm before clipping as a device scalar."""
        grads, device = _grads_and_device(model_or_parameters, "AutoClip.step")
        if torch.compiler.is_compiling():
            return self._traced_step(grads, device)
        if self._traced_count is not None:  # after compiled steps: their count joins the host count (one read)
            self._count += int(self._traced_count)
            self._traced_count.zero_()  # kept, so compiled code keeps seeing the same attribute
        total, plan = _plain_total(grads, device, self.backend)
        self._to(total.device)
        norms = self._norms
        assert norms is not None
        norms[self._count % self.history] = total
        self._count += 1
        n = min(self._count, self.history)
        # Order does not matter for a percentile, so the ring's unsorted prefix is all we need.
        ordered = torch.sort(norms[:n]).values
        self.threshold = _linear_percentile(ordered, n, self.percentile)
        if plan is not None:
            coef = clip_coef(total.to(self.threshold.dtype), self.threshold)  # type: ignore[arg-type]
            dispatch.scale_(plan, coef.to(total.dtype))
        return total

    @_run_while_tracing
    def _traced_state(self, device: torch.device) -> bool:
        """Create (or move to `device`) the state a compiled step reads. torch.compile runs this for real, once,
        while it traces the first step (assume_constant_result), so that graph already reads the state every
        later step will find: no recompilation at the second step."""
        self._to(device)
        if self._traced_count is None:
            self._traced_count = torch.zeros((), dtype=torch.int64, device=device)
        return True

    def _traced_step(self, grads: list[Tensor], device: torch.device) -> Tensor:
        """step() under torch.compile: the ring position and the number of recorded norms come from a device
        count, so one graph serves every step. Slots not yet written sort last, as +inf."""
        self._traced_state(device)
        total, plan = _plain_total(grads, device, self.backend)
        norms = self._norms
        assert norms is not None and self._traced_count is not None
        taken = self._traced_count + self._count  # norms recorded before this one
        norms.index_copy_(0, (taken % self.history).reshape(1), total.to(norms.dtype).reshape(1))
        n = (taken + 1).clamp(max=self.history)
        written = torch.arange(self.history, device=norms.device) < n
        ordered = torch.sort(torch.where(written, norms, torch.full_like(norms, float("inf")))).values
        any_nan = (written & torch.isnan(norms)).any()
        self.threshold = _linear_percentile_on_device(ordered, n, self.percentile, any_nan)
        if plan is not None:
            coef = clip_coef(total.to(self.threshold.dtype), self.threshold)
            dispatch.scale_(plan, coef.to(total.dtype))
        self._traced_count.add_(1)
        return total

    @property
    def recorded(self) -> Tensor:
        """The recorded norms still in the history, oldest first (a copy)."""
        if self._norms is None:
            return torch.zeros(0, dtype=torch.float64)
        count = self.count
        n = min(count, self.history)
        start = count % self.history if count > self.history else 0
        return torch.roll(self._norms, -start)[:n].clone()

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the recorded norms still in the history, oldest first, and the step count."""
        return {"count": self.count, "history": self.history, "norms": self.recorded}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state_dict(); a different `history` keeps the newest norms that fit."""
        missing = {"count", "norms"} - set(state_dict)
        if missing:
            raise ValueError(f"AutoClip state_dict lacks {sorted(missing)}")
        count = _count(state_dict["count"], "state_dict['count']", 0)
        norms = state_dict["norms"]
        if not isinstance(norms, Tensor) or norms.dim() != 1 or norms.numel() > count:
            raise ValueError("state_dict['norms'] must be a 1-D tensor of at most `count` norms")
        kept = norms[-self.history :] if norms.numel() else norms
        n = kept.numel()
        # A larger history than the saved one: continue as if only the saved norms had ever been recorded.
        count = count if n == min(count, self.history) else n
        dtype = _state_dtype(norms.device)
        buf = torch.zeros(self.history, dtype=dtype, device=norms.device)
        # Lay the kept norms out as if written one by one, the newest at (count - 1) % history.
        if n:
            positions = torch.tensor([(count - n + i) % self.history for i in range(n)], device=norms.device)
            buf[positions] = kept.to(dtype)
        self._norms = buf
        self._count = count
        if self._traced_count is not None:
            self._traced_count.zero_()
        self.threshold = None

    def __repr__(self) -> str:
        kept = min(self.count, self.history)
        return f"AutoClip(percentile={self.percentile}, history={self.history}, recorded={kept})"


__all__ = ["AutoClip", "ZClip", "adaptive_clip_grad_"]
