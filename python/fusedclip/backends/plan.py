"""The device plan shared by the kernel backends (cuda and triton): what one launch needs to cover any
number of tensors of one device.

A plan is a set of device-resident tables built on the host once per distinct gradient list and cached,
keyed by (address, numel, dtype) of every tensor. It holds no reference to the tensors: only addresses, so a
freed or replaced gradient can never be read through the cache (a new tensor at the same address, size and
dtype is exactly what the cached table describes). The cache is bounded (least recently used first out), except
for plans a CUDA graph reads: see TableCache.

Building a plan never waits on the device: the tables are packed into one pinned host buffer and copied with
one non-blocking copy (pack_tables), so a cache miss is as sync-free as a hit and may happen inside CUDA-graph
capture (its pinned buffer then comes from a reserve, where a capture was foreseen: see PinnedReserve).

Memory a CUDA graph's pool owns is never cached: a plan built while the current stream captures, or while
torch.compile's CUDA-graph trees (mode="reduce-overhead") warm a function up in their pool, serves that one call
(see TableCache), and so do the scratch buffers of such calls (see DevicePlan.scratch).

A unit plan (AGC) lists the units of its tensors instead, one contiguous row each: then one launch yields
every unit's norm, or scales every unit by its own coefficient.

Tables (all on the plan's device, views of one buffer: DevicePlan.packed):
  meta         int64 [3, T]: address, numel, dtype code of each tensor
  chunk_tensor int32 [C]: the tensor each chunk belongs to (chunks are in tensor order)
  chunk_start  int64 [C]: the chunk's first element within its tensor
  tensor_chunks int32 [T + 1]: tensor t owns chunks tensor_chunks[t] .. tensor_chunks[t + 1] - 1
What a launch writes besides its results is not in the plan's buffer: the plan makes it on the device at its first
use, per stream (DevicePlan.ticket, DevicePlan.scratch), and only the backends that use it (the cuda ops allocate
their own per call):
  ticket       int32 [1]: zero between calls; a kernel's "last program done" counter, reset by that program
  partials, tensor_vals, coef  accumulation dtype [C], [T], [1]: the norm kernels' scratch and clip coefficient
               for the steady-state calls of a kept plan (fusedclip.fastpath), which allocate only what they return
               (other calls allocate their own: their results may outlive the next call)
Two streams never share a ticket or scratch: each stream gets its own set, and a call being captured into a CUDA
graph a fresh one.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Generic, Optional, TypeVar

import torch
from torch import Tensor

from . import acc_dtype

# The dtype codes both kernel families understand.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
KERNEL_DTYPES = frozenset(DTYPE_CODES)
_dtype = attrgetter("dtype")
CACHE_SIZE = 64
V = TypeVar("V")


def flat_ok(t: Tensor) -> bool:
    """A tensor the kernels can read as one flat, dense array of a supported dtype."""
    return t.layout == torch.strided and t.dtype in KERNEL_DTYPES and t.is_contiguous()


def kernel_coef(coef: Tensor, device: torch.device) -> Tensor:
    """A clip coefficient as the kernels read it: float32 or float64 (a bf16 total_norm from stock torch, say, is
    widened), on the plan's device (no call when it is there already: this runs every step)."""
    if coef.dtype not in (torch.float32, torch.float64):
        coef = coef.float()
    return coef if coef.device == device else coef.to(device)


@dataclass(frozen=True)
class Scratch:
    """What a prepared Triton norm launch writes besides its results: its ticket (zero between launches) and
    scratch."""

    ticket: Tensor
    partials: Tensor
    tensor_vals: Tensor
    coef: Tensor


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    num_tensors: int
    num_chunks: int
    chunk_size: int
    acc_dtype: torch.dtype
    meta: Tensor
    chunk_tensor: Tensor
    chunk_start: Tensor
    tensor_chunks: Tensor
    # The one buffer the tables above are views of, with its host source (kept: see PackedTables).
    packed: PackedTables = field(repr=False, compare=False)
    aliased: bool  # some tensor is listed twice: an in-place kernel would race on it, so scaling goes to torch
    # Each stream's ticket and scratch (by stream_of; None for a CPU plan), made at its first use: see ticket().
    tickets: dict = field(default_factory=dict, repr=False, compare=False)
    scratches: dict = field(default_factory=dict, repr=False, compare=False)

    def ticket(self) -> Tensor:
        """The ticket for a launch from the current stream (int32 [1], zero between launches). Launches on two
        streams may overlap, and a ticket two launches increment at once ends wrong (a total finalized early, or
        never): so each stream has its own, made at its first use (zeroed on the device, on that stream, so ordered
        before its launches) and kept with the plan. A call being captured gets a new one every time (a temporary of
        the graph, zeroed by the graph at each replay): a graph may replay on any stream, beside eager calls or other
        graphs over the same plan. So does a call in a CUDA-graph tree's warm-up (see warming_up_graphs), whose
        allocations the tree's pool owns."""
        return self._per_stream(self.tickets, self._new_ticket)

    def scratch(self) -> Scratch:
        """The ticket and norm scratch for a prepared launch from the current stream: made and kept per stream as
        ticket() is (and with the stream's ticket), fresh for a call being captured or in a graph tree's warm-up."""
        return self._per_stream(self.scratches, self._new_scratch)

    def _per_stream(self, kept: dict, make: Callable[[], V]) -> V:
        if not capturing(self.device):
            stream = stream_of(self.device)
            mine = kept.get(stream)
            if mine is not None:
                return mine
            if not warming_up_graphs(self.device):
                mine = kept[stream] = make()
                return mine
        return make()

    def _new_ticket(self) -> Tensor:
        return torch.zeros(1, dtype=torch.int32, device=self.device)  # a fill on the device: no host copy

    def _new_scratch(self) -> Scratch:
        return Scratch(
            self.ticket(),
            torch.empty(self.num_chunks, dtype=self.acc_dtype, device=self.device),
            torch.empty(self.num_tensors, dtype=self.acc_dtype, device=self.device),
            torch.empty(1, dtype=self.acc_dtype, device=self.device),
        )


_TABLE_ALIGN = 16  # bytes: each table of a packed buffer starts 16-byte aligned (int64 views, wide loads)


class PackedTables:
    """Host integer tables packed into one buffer, and the one device buffer they are copied to.

    For a CUDA device the host buffer is pinned and the copy non-blocking: nothing waits on the device, so a
    plan can be built under torch.cuda.set_sync_debug_mode("error") and inside CUDA-graph capture. On CPU `device`
    is `host` itself (no copy).

    The host buffer of a plan built outside capture is dropped once its copy is issued: torch's caching host
    allocator keeps the pinned block until the copy has run. One built while capturing keeps it (and TableCache
    keeps it for good): the copy is a node of the graph that reads it again at every replay.

    Streams: the copy runs on the stream that was current when it was issued, and an event is recorded after it.
    A later use from another stream (before_use) makes that stream wait for the event and records it on the device
    buffer, so that the tables are read only after they were written, and the buffer, once its plan is evicted, is
    not handed out again while that stream's kernels may still read it (or write through its addresses)."""

    __slots__ = ("device", "host", "pinned", "event", "streams")

    def __init__(self, host: Tensor, device: Tensor, pinned: bool) -> None:
        self.host: Optional[Tensor] = host
        self.device = device
        self.pinned = pinned
        self.event: Optional[torch.cuda.Event] = None  # recorded after an eager copy to a CUDA device
        self.streams: set = set()  # the streams known to be ordered after that copy

    def upload(self) -> None:
        """(Re-)issue the host-to-device copy on the current stream; nothing to do on CPU."""
        if self.device is self.host or self.host is None:
            return
        self.device.copy_(self.host, non_blocking=self.pinned)
        device = self.device.device
        if capturing(device):
            return  # the graph's copy node reads the host buffer at every replay: keep it
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            self.event = torch.cuda.Event()
            self.event.record(stream)
            self.streams = {stream}
        self.host = None  # see the class docstring: the allocator holds the pinned block until the copy ran

    def before_use(self) -> None:
        """Call before launching work that reads these tables from the current stream (see the class docstring).
        Cheap on the steady state: one stream lookup and a set membership test."""
        if self.event is None:
            return  # CPU, or built while capturing: its copy is a node of the graph that reads it
        stream = torch.cuda.current_stream(self.device.device)
        if stream in self.streams:
            return
        if torch.cuda.is_current_stream_capturing():
            # torch.cuda.graph synchronizes before capture begins, so the copy has run; TableCache keeps every
            # entry a capture used for good, so its buffer is never handed out again.
            return
        stream.wait_event(self.event)
        self.device.record_stream(stream)
        self.streams.add(stream)


def _pinned_staging(device: torch.device) -> bool:
    """Pinned host memory and a non-blocking copy: for CUDA devices (pinning needs CUDA, and only then is the
    copy asynchronous). A CPU plan uses the host buffer itself."""
    return device.type == "cuda"


class PinnedReserve:
    """Pinned host buffers set aside outside capture for the tables of plans built while capturing, in a process
    that captures.

    A pinned allocation that torch's caching host allocator cannot serve from its cache calls cudaHostAlloc, which
    fusedclip keeps out of a capture where it can: a build while capturing takes one of these buffers instead (the
    graph keeps it: see PackedTables). A process that never captures sets nothing aside. The reserve is sized
    (`size`, bytes per buffer: a power of two) by the tables of
    - every plan or index looked up or built while capturing (TableCache, pack_tables), so later captures are served;
    - every plan built while torch.compile's CUDA-graph trees warm a function up (mode="reduce-overhead"), so the
      recording that follows is served, the first one included;
    - after arm() (an explicit opt-in: call it before the warm-up of a first capture), every plan built.
    It is filled outside capture, at the next build: COUNT buffers, MAX_BYTES in all at most (fewer of larger ones;
    tables larger than MAX_BYTES are never reserved).

    What remains: a build while capturing that finds no buffer asks torch's allocator, counted in `misses` (torch
    2.11's host allocator then allocates into a private pool of the graph, as for any pinned allocation in a
    capture). That is the first capture of a process that builds a plan in it (as torch's whole-step recipe does:
    its gradients are allocated in the graph's pool, at new addresses) unless arm() was called or a graph tree's
    warm-up came first; more than COUNT builds in one capture, or before a build outside capture refilled the
    reserve; tables larger than MAX_BYTES."""

    COUNT = 4  # builds in one capture before the reserve runs dry (a compiled clip looks its plan up twice)
    MIN_BYTES = 4096
    MAX_BYTES = 64 << 20  # pinned bytes set aside in all, at most

    def __init__(self) -> None:
        self.buffers: list[Tensor] = []  # all of `size` bytes
        self.size = 0  # bytes per buffer wanted: 0 until a capture is foreseen (nothing is set aside)
        self.armed = False  # arm(): every build sizes the reserve, not only those of captures
        self.misses = 0

    def arm(self) -> None:
        """Opt in: from now on every plan built sizes the reserve (and fills it, outside capture), so that even the
        first capture of the process finds buffers for tables as large as the plans built before it (its warm-up's)."""
        self.armed = True

    def note(self, nbytes: int) -> None:
        """Tables of `nbytes` are used by a capture, or will be (may be called while capturing: records only)."""
        size = max(self.MIN_BYTES, 1 << max(0, nbytes - 1).bit_length())
        if self.size < size <= self.MAX_BYTES:
            self.size = size

    def ensure(self) -> None:
        """Outside capture: set aside what the captures foreseen may take (nothing when none is)."""
        if not self.size:
            return
        if self.buffers and self.buffers[0].numel() < self.size:
            self.buffers = []  # too small for the tables seen now: larger ones replace them
        count = min(self.COUNT, self.MAX_BYTES // self.size)
        if len(self.buffers) < count:
            self.buffers += [torch.empty(self.size, dtype=torch.uint8, pin_memory=True)
                             for _ in range(count - len(self.buffers))]

    def take(self, nbytes: int) -> Optional[Tensor]:
        """While capturing: a zeroed pinned buffer of `nbytes` bytes from the reserve, or None (counted). Either way
        the size is noted, so that later captures are served."""
        self.note(nbytes)
        if not self.buffers or self.buffers[-1].numel() < nbytes:
            self.misses += 1
            return None
        return self.buffers.pop()[:nbytes].zero_()


reserve = PinnedReserve()


def pack_tables(device: torch.device, tables: Sequence[Tensor]) -> tuple[PackedTables, list[Tensor]]:
    """Copy host tables (any dtypes and shapes, contiguous or not) to `device` with one allocation and one copy.

    Returns the packed buffer (keep it alive with whatever uses the views) and a view of each table on `device`,
    same dtype and shape, in order. A kernel backend that needs another table adds it to the list."""
    offsets, nbytes = [], 0
    for t in tables:
        nbytes = -(-nbytes // _TABLE_ALIGN) * _TABLE_ALIGN
        offsets.append(nbytes)
        nbytes += t.numel() * t.element_size()
    pinned = _pinned_staging(device)
    host = None
    if pinned and capturing(device):
        host = reserve.take(max(nbytes, 1))  # no pinned allocation while capturing (see PinnedReserve)
    elif pinned:
        if reserve.armed or warming_up_graphs(device):  # opted in, or a graph tree's recording follows
            reserve.note(max(nbytes, 1))
        reserve.ensure()
    if host is None:
        host = torch.zeros(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)

    def views(buffer: Tensor) -> list[Tensor]:
        return [
            buffer[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape) for t, o in zip(tables, offsets)
        ]

    for view, t in zip(views(host), tables):
        view.copy_(t)
    if device.type == "cpu":
        return PackedTables(host, host, False), views(host)
    on_device = torch.empty(host.numel(), dtype=torch.uint8, device=device)
    packed = PackedTables(host, on_device, pinned)
    packed.upload()
    return packed, views(on_device)


def _tables(
    device: torch.device, addresses: Tensor, numels: Tensor, codes: Tensor, chunk_size: int, acc: torch.dtype,
    aliased: bool,
) -> DevicePlan:
    """The device tables of a plan whose i-th "tensor" is the flat run of numels[i] elements at addresses[i]."""
    count = int(numels.numel())
    meta = torch.stack([addresses, numels, codes])
    counts = (numels + chunk_size - 1) // chunk_size
    tensor_chunks = torch.zeros(count + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=tensor_chunks[1:])
    num_chunks = int(tensor_chunks[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(count, dtype=torch.int64), counts)
    chunk_start = (torch.arange(num_chunks, dtype=torch.int64) - tensor_chunks[chunk_tensor]) * chunk_size
    packed, (meta_d, chunk_tensor_d, chunk_start_d, tensor_chunks_d) = pack_tables(
        device, [meta, chunk_tensor.to(torch.int32), chunk_start, tensor_chunks.to(torch.int32)]
    )
    return DevicePlan(
        device=device,
        num_tensors=count,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        acc_dtype=acc,
        meta=meta_d,
        chunk_tensor=chunk_tensor_d,
        chunk_start=chunk_start_d,
        tensor_chunks=tensor_chunks_d,
        aliased=aliased,
        packed=packed,
    )


def _build(tensors: list[Tensor], chunk_size: int) -> DevicePlan:
    addresses = list(map(Tensor.data_ptr, tensors))
    dtypes = list(map(_dtype, tensors))
    return _tables(
        tensors[0].device,
        torch.tensor(addresses, dtype=torch.int64),
        torch.tensor(list(map(Tensor.numel, tensors)), dtype=torch.int64),
        torch.tensor(list(map(DTYPE_CODES.__getitem__, dtypes)), dtype=torch.int64),
        chunk_size,
        acc_dtype(set(dtypes)),
        aliased=len(set(addresses)) < len(addresses),
    )


def unit_rows(t: Tensor, reduce_dims: Optional[tuple[int, ...]]) -> Optional[int]:
    """How many units `t` has when each is one contiguous run of its memory, so that a unit plan can list them;
    None when the kernels cannot take them that way (not flat_ok, or units strided through memory).

    Units (see Backend.unit_norms) are contiguous runs exactly when, dims of size 1 aside, every kept dim comes
    before every reduced dim: timm's "all dims but the first", or the whole tensor (reduce_dims None)."""
    if not flat_ok(t) or t.numel() == 0:
        return None
    if reduce_dims is None or t.dim() == 0:
        return 1
    reduced = {d % t.dim() for d in reduce_dims}
    sizes = t.shape
    last_kept = max((i for i, s in enumerate(sizes) if s != 1 and i not in reduced), default=-1)
    first_reduced = min((i for i, s in enumerate(sizes) if s != 1 and i in reduced), default=t.dim())
    if last_kept > first_reduced:
        return None
    rows = 1
    for i, s in enumerate(sizes):
        if i not in reduced:
            rows *= s
    return rows


def _build_units(tensors: list[Tensor], rows: list[int], chunk_size: int) -> DevicePlan:
    """A plan whose "tensors" are the units: row r of tensor i starts at base_i + r * row_numel_i * itemsize_i.
    Vectorised over rows: the host loops over tensors only."""
    rows_t = torch.tensor(rows, dtype=torch.int64)
    numels = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    row_numel = numels // rows_t
    row_bytes = row_numel * torch.tensor([t.element_size() for t in tensors], dtype=torch.int64)
    bases = [t.data_ptr() for t in tensors]
    codes = torch.tensor([DTYPE_CODES[t.dtype] for t in tensors], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int64), rows_t)
    first_unit = torch.cumsum(rows_t, 0) - rows_t
    row = torch.arange(int(owner.numel()), dtype=torch.int64) - first_unit[owner]
    addresses = torch.tensor(bases, dtype=torch.int64)[owner] + row * row_bytes[owner]
    return _tables(
        tensors[0].device, addresses, row_numel[owner], codes[owner], chunk_size,
        acc_dtype(t.dtype for t in tensors),
        aliased=len(set(bases)) < len(bases),  # distinct tensors have distinct rows
    )


def capturing(device: torch.device) -> bool:
    """Whether work issued now for `device` is recorded into a CUDA graph (the current stream is capturing)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def stream_of(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The current stream of a CUDA device, or None (other devices have none)."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def warming_up_graphs(device: torch.device) -> bool:
    """Whether torch.compile's CUDA-graph trees (mode="reduce-overhead") are warming a function up on `device` now:
    they run it on their own stream with every allocation of this thread sent to the tree's pool, whose blocks the
    tree frees and hands out again by its own bookkeeping of the function's outputs. Memory allocated then must not
    outlive the call (asked only when something would be kept: a miss, a new stream)."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None or device.type != "cuda":
        return False
    try:
        manager = trees.get_manager(device.index, create_if_none_exists=False)
    except Exception:  # another torch's internals: then no tree of theirs can be told apart
        return False
    return manager is not None and torch.cuda.current_stream(device) == manager.stream


class TableCache(Generic[V]):
    """Bounded cache of values that read packed device tables (plans, index tensors), safe under CUDA graphs.

    Outside capture it is an LRU of `capacity` entries. A CUDA graph reads the tables of every entry used while
    it was captured, at every replay, for as long as the graph lives; so, while the current stream captures:
    - an entry that is looked up leaves the LRU for good: it is kept for the life of the process (or until
      clear()) and no longer counts against `capacity`;
    - an entry that is built serves that call only: its device buffer is a temporary of the graph (the graph's pool
      owns it, as it owns every temporary of the captured work, and the graph's copy node fills it at each replay
      before the kernels read it), and its pinned host buffer, which that copy node reads, is kept for good.
      Eager calls, and later captures, build their own.
    A build while torch.compile's CUDA-graph trees warm a function up in their pool (warming_up_graphs) serves that
    call only too: the tree would free and reuse its memory by the bookkeeping of the function's outputs.
    Clear the cache only when no captured graph that used it will replay again.
    """

    def __init__(self, capacity: int = CACHE_SIZE) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[tuple, tuple[V, PackedTables]] = OrderedDict()
        self._kept: dict[tuple, tuple[V, PackedTables]] = {}  # used while capturing, tables filled eagerly
        self._graph_sources: list[Tensor] = []  # host buffers of builds while capturing: their graphs read them
        self.builds = 0  # for tests: how many entries were built (host-to-device copies)

    def _lookup(self, key: tuple, device: torch.device, build: Callable[[], tuple[V, PackedTables]]) -> V:
        in_capture = capturing(device)
        entry = self._lru.get(key)
        if entry is not None:
            if in_capture:
                del self._lru[key]
                self._kept[key] = entry
                if entry[1].pinned:  # this process captures: a later capture may build tables of this size
                    reserve.note(entry[1].device.numel())
            else:
                self._lru.move_to_end(key)
            entry[1].before_use()
            return entry[0]
        entry = self._kept.get(key)
        if entry is not None:
            entry[1].before_use()
            return entry[0]
        entry = build()
        self.builds += 1
        if in_capture:
            self._graph_sources.append(entry[1].host)  # type: ignore[arg-type]
        elif not warming_up_graphs(device):
            self._lru[key] = entry
            if len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        return entry[0]

    @property
    def kept_for_graphs(self) -> int:
        """How many entries are kept because a CUDA graph captured their use (outside the LRU bound)."""
        return len(self._kept)

    def __len__(self) -> int:
        return len(self._lru) + self.kept_for_graphs

    def clear(self) -> None:
        """Forget every entry, those kept for CUDA graphs too: only when no such graph will replay again."""
        self._lru.clear()
        self._kept.clear()
        self._graph_sources.clear()


class PlanCache(TableCache[DevicePlan]):
    """The device plans of one backend (see TableCache for the bound and the CUDA-graph rules)."""

    def __init__(self, chunk_size: int, capacity: int = CACHE_SIZE) -> None:
        super().__init__(capacity)
        self.chunk_size = chunk_size

    def get(self, tensors: list[Tensor]) -> DevicePlan:
        """The plan for these tensors (all on one device, numel > 0, flat_ok), built on a miss."""
        device = tensors[0].device
        # (column by column, each a map in C: on a miss of the steady-state fast path this runs for every tensor)
        key = (self.chunk_size, device,
               tuple(zip(map(Tensor.data_ptr, tensors), map(Tensor.numel, tensors), map(_dtype, tensors))))
        return self._lookup(key, device, lambda: _with_packed(_build(tensors, self.chunk_size)))

    def get_units(self, tensors: list[Tensor], rows: list[int]) -> DevicePlan:
        """The unit plan of these tensors (all on one device; rows[i] = unit_rows(tensors[i], ...), not None):
        one entry per unit, units in row-major order, tensor 0's first. The key holds everything the tables
        depend on (address, numel, dtype and unit count of every tensor), so it cannot collide with get()'s."""
        device = tensors[0].device
        key = (
            "units", self.chunk_size, device,
            tuple((t.data_ptr(), t.numel(), t.dtype, r) for t, r in zip(tensors, rows)),
        )
        return self._lookup(key, device, lambda: _with_packed(_build_units(tensors, rows, self.chunk_size)))


def _with_packed(plan: DevicePlan) -> tuple[DevicePlan, PackedTables]:
    return plan, plan.packed


class IndexCache(TableCache[Tensor]):
    """int64 index tensors on a device, uploaded once per distinct list (the API's mixed-group paths): no
    per-call host-to-device copy, and capture-safe like the plans."""

    def get(self, device: torch.device, positions: Sequence[int]) -> Tensor:
        def build() -> tuple[Tensor, PackedTables]:
            packed, (index,) = pack_tables(device, [torch.tensor(positions, dtype=torch.int64)])
            return index, packed

        return self._lookup((device, tuple(positions)), device, build)
