"""The steady state: a call over the same tensors as an earlier call reuses that call's plan, after a cheap check.

A call of the API over a list (parameters whose .grad is read, or tensors) is validated, split by device and backend
(dispatch.make_plan) and finds the backend's device plan: about 2 us of Python per tensor. In a training loop all of
that gives the same answer every step, as long as every tensor is where it was. So after a call whose list qualifies,
`remember` keeps its plan with a signature of each element of the list: whether a tensor is there and its address,
element count, dtype, device, kind (dispatch keys: dense, not a subclass, not a negative or conjugate view) and
contiguity. The next call over a list of the same length (`find`) compares every element with its signature: in C++
when the extension fusedclip._host is built (one type check, one .grad read and a few integer compares per element),
in Python otherwise (same decisions, column by column: about 0.8 us per element against 35 ns in C++). If all match,
the kept plan is used: no validation, no grouping, no plan lookup. For a kernel backend that reads only its device plan
(Backend.reads_plan_only: Triton, and the cuda backend where its extension has the planned_* ops) the kept plan is a
Plan object without tensors, made once, that also keeps the backend's prepared calls (Backend.prepare_*, by what they
do and their norm type, max_norm or clip value): launches keyed (Triton) or arguments bound (cuda) once, so that a
steady-state call allocates only the total it returns and what the backend allocates per call (the cuda ops: their
scratch). Where prepared calls bind the scratch of a stream (Backend.prepares_per_stream: Triton's kernels' ticket,
partials and clip coefficient, kept with the device plan per stream, DevicePlan.scratch), that Plan is made once per
stream. With cold caches (fresh gradients) each torch call and Python layer costs tens of us: that is what this
saves. Anything else (a gradient moved, resized, re-typed, made non-contiguous, set to None or newly there, an
element added, removed or replaced by another kind of object, a different backend chosen) fails the check and the
call takes the general path, which validates, warns and builds as it always does, then keeps the new state. A kept
plan can never be read stale: a device plan holds addresses only, and the check proves that the tensors at those
addresses are the ones it describes, in the same order. With zero_grad(set_to_none=True) every .grad is a new tensor
each step; the check passes as long as the allocator hands back the same addresses (torch's CUDA caching allocator
does in a steady loop).

A list qualifies when the general path found it simple: one device (CPU or CUDA), one backend taking every tensor,
plain dense contiguous tensors of a kernel dtype (no subclass, no sparse, no view with a negative or conjugate bit), no
zero-size tensor, no two tensors at one address (a gradient listed twice keeps its warning: it always takes the general
path). The API asks only outside torch.compile tracing, for calls without a process group or `replicated`; a plan is
neither kept nor used while the current CUDA stream captures a graph (the plan cache's capture rules then apply).
Distributed calls (DTensor gradients, process groups) are kept by fusedclip.distributed, which holds entries of this
module (make_entry) over the local shards of its calls.

FUSEDCLIP_NO_HOST_EXT=1 (read at import) makes the check run in Python even where fusedclip._host is built.
"""

from __future__ import annotations

from collections import OrderedDict
from operator import attrgetter
from typing import Any, Optional

import torch
from torch import Tensor

from . import backends
from .backends import torch_backend
from .backends.plan import KERNEL_DTYPES, DevicePlan, capturing, stream_of
from .dispatch import Group, Plan

BUCKETS = 64  # distinct (kind, backend, foreach, length) keys kept, least recently used first out
PER_BUCKET = 4  # lists of one length kept side by side (gradients and weights of one model, say)


class Stats:
    """Counts for tests and the benchmark: calls that used a kept plan (hits), calls that looked and found none
    (misses), plans kept."""

    __slots__ = ("hits", "misses", "kept")

    def __init__(self) -> None:
        self.hits = self.misses = self.kept = 0


stats = Stats()

# ---- the per-call check: fusedclip._host's Signatures, or this Python one -----------------------------------------

_PLAIN = (Tensor, torch.nn.Parameter)  # exactly these types: a subclass may change what .grad or the data mean
_NOT_PLAIN = object()


def _unfit(t: Tensor) -> str:
    """Why a present tensor cannot be in a kept plan, or "" (the C++ check's rules)."""
    if type(t) not in _PLAIN:
        return "a tensor subclass"
    if t.layout != torch.strided:
        return "not strided"
    if t.device.type not in ("cpu", "cuda"):
        return "neither on CPU nor on CUDA"
    if t.dtype not in KERNEL_DTYPES:
        return "of a dtype other than float32, float16, bfloat16 and float64"
    if t.is_neg() or t.is_conj():
        return "a negative or conjugate view"
    if not t.is_contiguous():
        return "not contiguous"
    if t.numel() == 0:
        return "zero-size"
    return ""


_is_leaf, _grad = attrgetter("is_leaf"), attrgetter("grad")
_layout, _dtype, _device = attrgetter("layout"), attrgetter("dtype"), attrgetter("device")
_PLAIN_SET = frozenset(_PLAIN)
_STRIDED = frozenset([torch.strided])


class PySignatures:
    """The check in Python, for when fusedclip._host is not built or FUSEDCLIP_NO_HOST_EXT=1: the same interface
    and decisions as the C++ Signatures (csrc/host/signatures.cpp). Per call it compares column by column (each a
    map over the tensors, in C), not element by element: a few hundred ns per tensor instead of microseconds."""

    def __init__(self, items: Any, grads: bool) -> None:
        self.grads = grads
        self.eligible = False
        self.why_not = ""
        self.present = 0
        self.size = 0
        self.absent: list[bool] = []  # per element: no tensor there
        self.columns: tuple = ()
        self.first = -1
        if type(items) not in (list, tuple):
            self.why_not = "not a list or tuple"
            return
        self.size = len(items)
        found = self._found(items)
        if found is not None:
            self.absent = [t is None for t in found]
            present = [t for t in found if t is not None] if True in self.absent else found
        if found is None or not self._all_fit(present):
            self._explain(items)  # the first element that disqualifies the list, as the C++ check names it
            return
        self.present = len(present)
        self.columns = self._columns(present)
        if len(set(self.columns[0])) < self.present:
            self.why_not = "two elements hold tensors at the same address"
            return
        self.first = self.absent.index(False) if self.present else -1  # the first element with a tensor
        self.eligible = True

    def _found(self, items: Any) -> Optional[list]:
        """The tensor (or None) each element stands for, column by column; None if some element is not plain."""
        if not self.grads:
            return list(items) if _PLAIN_SET.issuperset(type(t) for t in items if t is not None) else None
        if not _PLAIN_SET.issuperset(map(type, items)):
            return None
        if not all(map(_is_leaf, items)) and not all(p.is_leaf or p.retains_grad for p in items):
            return None
        return list(map(_grad, items))

    @staticmethod
    def _all_fit(tensors: list[Tensor]) -> bool:
        """Whether no present tensor is unfit (see _unfit), checked column by column, in _unfit's order (a sparse
        tensor fails on its layout before anything that would raise for it is read)."""
        return (
            _PLAIN_SET.issuperset(map(type, tensors)) and _STRIDED.issuperset(map(_layout, tensors))
            and all(d.type in ("cpu", "cuda") for d in set(map(_device, tensors)))
            and KERNEL_DTYPES.issuperset(map(_dtype, tensors))
            and not any(map(Tensor.is_neg, tensors)) and not any(map(Tensor.is_conj, tensors))
            and all(map(Tensor.is_contiguous, tensors)) and all(map(Tensor.numel, tensors))
        )

    def _explain(self, items: Any) -> None:
        """Set why_not from the first element that disqualifies the list (element by element: ineligible lists
        only)."""
        for i, item in enumerate(items):
            t = self._element(item)
            if t is _NOT_PLAIN:
                self.why_not = f"element {i} is not a plain Tensor or Parameter (or None)"
                return
            reason = "" if t is None else _unfit(t)
            if reason:
                self.why_not = f"tensor {i} is {reason}"
                return
        self.why_not = "an element is unfit"  # (not reached: the column checks apply _unfit's rules)

    @staticmethod
    def _columns(tensors: list[Tensor]) -> tuple:
        """What a kept plan depends on, column by column (the tensors are plain, strided: checked before)."""
        return (
            list(map(Tensor.data_ptr, tensors)), list(map(Tensor.numel, tensors)), list(map(_dtype, tensors)),
            list(map(_device, tensors)), list(map(Tensor.is_contiguous, tensors)), list(map(Tensor.is_neg, tensors)),
        )

    def __len__(self) -> int:
        return self.size

    def _element(self, item: Any) -> Any:
        """The tensor `item` stands for (None: absent), or _NOT_PLAIN."""
        if not self.grads:
            return item if item is None or type(item) in _PLAIN else _NOT_PLAIN
        if type(item) not in _PLAIN or not (item.is_leaf or item.retains_grad):
            return _NOT_PLAIN  # a non-leaf's .grad warns: the general path reads it
        return item.grad

    def collect(self, items: Any) -> Optional[list[Tensor]]:
        """The present tensors of `items` in order when every element is as it was; else None."""
        if not self.eligible or type(items) not in (list, tuple) or len(items) != self.size or self._first_moved(items):
            return None
        if self.grads:
            if not _PLAIN_SET.issuperset(map(type, items)):
                return None
            if not all(map(_is_leaf, items)) and not all(p.is_leaf or p.retains_grad for p in items):
                return None  # a non-leaf's .grad warns: the general path reads it
            found = list(map(_grad, items))
        else:
            found = list(items)
        if self.present != self.size:
            if [t is None for t in found] != self.absent:
                return None
            found = [t for t in found if t is not None]
        if not _PLAIN_SET.issuperset(map(type, found)) or not _STRIDED.issuperset(map(_layout, found)):
            return None  # (data_ptr() raises for a sparse tensor)
        if list(map(Tensor.data_ptr, found)) != self.columns[0]:
            return None  # moved (the usual miss): decided by the first column
        return found if self._columns(found) == self.columns else None

    def matches(self, items: Any) -> bool:
        return self.collect(items) is not None

    def _first_moved(self, items: Any) -> bool:
        """Whether the first element's tensor has plainly moved: the usual miss, found without reading the rest
        (False when in doubt: the full check decides)."""
        if self.first < 0:
            return False
        t = items[self.first]
        if self.grads:
            if type(t) not in _PLAIN_SET or not t.is_leaf:
                return False
            t = t.grad
        return type(t) in _PLAIN_SET and t.layout == torch.strided and t.data_ptr() != self.columns[0][0]


_host, _how = backends.load_host_extension()  # fusedclip._host or None; which check runs, and why
CppSignatures: Optional[type] = _host.Signatures if _host is not None else None
Signatures: Any = CppSignatures or PySignatures  # the check new plans get (tests switch it)
# fusedclip.distributed's kept calls read DTensor parameters' gradients and local shards through this (C++), where the
# extension is used; None: in Python.
_host_grads_and_locals = getattr(_host, "grads_and_locals", None)


def grads_and_locals(items: Any) -> Optional[tuple[list, list]]:
    """(each parameter's .grad, each gradient's _local_tensor; None where absent), read in C++ while the extension's
    check is the one in use; None otherwise (or for an element the general path must read)."""
    if _host_grads_and_locals is None or Signatures is not CppSignatures:
        return None
    return _host_grads_and_locals(items)


def describe() -> str:
    """Which check runs, and why it is the Python one if it is (for `python -m fusedclip info`)."""
    if Signatures is CppSignatures or CppSignatures is None:
        return _how
    return "Python (chosen in this process although fusedclip._host is loaded)"


def uses_extension() -> bool:
    return CppSignatures is not None and Signatures is CppSignatures


# ---- kept plans ---------------------------------------------------------------------------------------------------


class Entry:
    """A kept plan: what a call over the list needs besides its tensors, and the signatures that say it still holds."""

    __slots__ = (
        "sigs", "name", "foreach", "backend", "device", "dtype", "count", "device_plan", "plans", "per_stream",
    )

    def __init__(self, sigs: Any, name: Optional[str], foreach: Optional[bool], group: Group, plan: Plan) -> None:
        self.sigs = sigs
        self.name = name
        self.foreach = foreach
        self.backend = group.backend
        self.device = plan.device
        self.dtype = plan.dtype
        self.count = plan.count
        self.device_plan = group.device_plan()
        # A backend that reads only its device plan is called without a tensor list, so every call's plan is the
        # same: made once, with the backend's prepared calls; once per stream (stream_of; None on CPU) where they
        # bind that stream's scratch (Backend.prepares_per_stream), else once for all (key None). Other backends
        # get a plan with the call's tensors.
        reads_plan_only = self.device_plan is not None and group.backend.reads_plan_only
        self.plans: Optional[dict] = {} if reads_plan_only else None
        self.per_stream = reads_plan_only and group.backend.prepares_per_stream

    def _plan(self, tensors: Optional[list[Tensor]], steps: Optional[dict]) -> Plan:
        group = Group(self.backend, tensors, range(self.count), self.device, self.device_plan)
        return Plan([group], self.count, self.device, self.dtype, steps)

    def plan_of(self, tensors: Optional[list[Tensor]]) -> Plan:
        """The kept plan over `tensors`, which the caller has checked itself (fusedclip.distributed: a subset of a
        list another entry just checked), for a call from the current stream. A backend that reads its plan only
        ignores them: its plan is made once (per stream where its prepared calls bind the stream's scratch), with its
        prepared calls."""
        if self.per_stream:
            stream = stream_of(self.device)
            plan = self.plans.get(stream)
            if plan is None:  # the first call from this stream
                self.device_plan.packed.before_use()  # type: ignore[union-attr]  (wait for the tables)
                plan = self.plans[stream] = self._plan(None, {})
            return plan
        if isinstance(self.device_plan, DevicePlan):
            self.device_plan.packed.before_use()  # a new stream waits for the tables (a known one: a set test)
        if self.plans is None:
            return self._plan(tensors, None)
        plan = self.plans.get(None)
        if plan is None:
            plan = self.plans[None] = self._plan(None, {})
        return plan

    def backend_now(self) -> bool:
        """Whether the general path would pick the same backend now (FUSEDCLIP_BACKEND, what is loaded)."""
        b = backends.select(self.name, self.device)
        return (torch_backend.with_foreach(self.foreach) if b.name == "torch" else b) is self.backend

    def plan_for(self, items: Any) -> Optional[Plan]:
        if capturing(self.device):
            return None
        if not self.backend_now():
            return None
        if self.plans is None:
            tensors = self.sigs.collect(items)
            return None if tensors is None else self.plan_of(tensors)
        if not self.sigs.matches(items):
            return None
        return self.plan_of(None)


_buckets: OrderedDict[tuple, list[Entry]] = OrderedDict()


def find(items: Any, grads: bool, backend: Optional[str], foreach: Optional[bool]) -> Optional[Plan]:
    """The kept plan for a call over `items` (its parameters if `grads`, else its tensors), if every element is as it
    was when the plan was kept; None otherwise (the caller takes the general path). Call it only outside tracing."""
    bucket = _buckets.get((grads, backends.check_backend_name(backend), foreach, len(items)))
    if bucket is not None:
        for i, entry in enumerate(bucket):
            plan = entry.plan_for(items)
            if plan is not None:
                if i:
                    bucket.insert(0, bucket.pop(i))
                stats.hits += 1
                return plan
    stats.misses += 1
    return None


def make_entry(items: Any, grads: bool, backend: Optional[str], foreach: Optional[bool], plan: Plan) -> Optional[Entry]:
    """A kept plan over `items`, made by the general path from them, if it qualifies (see the module docstring);
    else None. fusedclip.distributed keeps such entries over the local shards of its calls."""
    single = plan.single
    if single is None or single.tensors is None or torch.compiler.is_compiling() or capturing(plan.device):
        return None
    sigs = Signatures(items, grads)
    if not sigs.eligible or sigs.present != plan.count:
        return None
    return Entry(sigs, backends.check_backend_name(backend), foreach, single, plan)


def remember(items: Any, grads: bool, backend: Optional[str], foreach: Optional[bool], plan: Plan) -> None:
    """Keep `plan`, which the general path just made from `items`, for the next calls over the same tensors, if it
    qualifies (see the module docstring). Cheap to call when it does not."""
    entry = make_entry(items, grads, backend, foreach, plan)
    if entry is None:
        return
    key = (grads, entry.name, foreach, len(items))
    bucket = _buckets.get(key)
    if bucket is None:
        bucket = _buckets[key] = []
        if len(_buckets) > BUCKETS:
            _buckets.popitem(last=False)
    else:
        _buckets.move_to_end(key)
    bucket.insert(0, entry)
    del bucket[PER_BUCKET:]
    stats.kept += 1


def clear() -> None:
    """Forget every kept plan (tests; the benchmark, around its stubbed launches)."""
    _buckets.clear()
