"""The device plan's tables and cache (fusedclip.backends.plan): packed into one buffer with one copy (pinned
and non-blocking for CUDA), the layout the kernels read, and the CUDA-graph rules of the cache (entries a graph
uses are never evicted; entries built while capturing are not handed to eager calls). "Capturing" is simulated
on CPU by replacing the capture query; the gpu-marked tests at the end check the real thing."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fusedclip
from fusedclip import dispatch
from fusedclip.backends import acc_dtype, plan
from fusedclip.backends.plan import DTYPE_CODES, IndexCache, PlanCache, pack_tables, unit_rows
from reference import (
    assert_scaled,
    params_with_grads,
    random_grads,
    random_tensor,
    ref_tensor_norm,
    ref_total_norm,
)

TABLES = ("meta", "chunk_tensor", "chunk_start", "tensor_chunks")  # packed; the ticket is made per stream (ticket())


def old_tables(addresses: list[int], numels: list[int], codes: list[int], chunk_size: int) -> dict:
    """The construction the tables had before packing (one pageable .to(device) copy per table), kept here as
    the oracle of their layout: dtypes, shapes and values must not change."""
    addresses_t = torch.tensor(addresses, dtype=torch.int64)
    numels_t = torch.tensor(numels, dtype=torch.int64)
    count = len(numels)
    counts = (numels_t + chunk_size - 1) // chunk_size
    tensor_chunks = torch.zeros(count + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=tensor_chunks[1:])
    num_chunks = int(tensor_chunks[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(count, dtype=torch.int64), counts)
    chunk_start = (torch.arange(num_chunks, dtype=torch.int64) - tensor_chunks[chunk_tensor]) * chunk_size
    return {
        "meta": torch.stack([addresses_t, numels_t, torch.tensor(codes, dtype=torch.int64)]),
        "chunk_tensor": chunk_tensor.to(torch.int32),
        "chunk_start": chunk_start,
        "tensor_chunks": tensor_chunks.to(torch.int32),
        "ticket": torch.zeros(1, dtype=torch.int32),
    }


def seeded_list(seed: int, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = list(DTYPE_CODES)
    count = int(torch.randint(1, 40, (1,), generator=gen))
    out = []
    for _ in range(count):
        n = int(torch.randint(1, 200, (1,), generator=gen))
        dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=gen))]
        out.append(random_tensor((n,), dtype, device, gen))
    return out


def assert_layout(p: plan.DevicePlan, want: dict) -> None:
    for name, got in [(name, getattr(p, name)) for name in TABLES] + [("ticket", p.ticket())]:
        assert got.dtype == want[name].dtype and got.shape == want[name].shape, name
        assert got.is_contiguous(), name
        assert torch.equal(got.cpu(), want[name]), name
    assert p.num_tensors == want["meta"].shape[1] and p.num_chunks == want["chunk_tensor"].numel()


def assert_one_buffer(p: plan.DevicePlan) -> None:
    """Every table is a view of the plan's one packed buffer, 16-byte aligned within it, and the buffer holds the
    tables alone: no ticket or norm scratch (made on the device, per stream, by the backends that use them)."""
    base = p.packed.device.data_ptr()
    for name in TABLES:
        t = getattr(p, name)
        assert t.untyped_storage().data_ptr() == p.packed.device.untyped_storage().data_ptr(), name
        assert (t.data_ptr() - base) % 16 == 0, name
    ends = [getattr(p, name).data_ptr() - base + getattr(p, name).nbytes for name in TABLES]
    assert p.packed.device.numel() == max(ends), "the packed buffer holds more than the tables"


# ---- layout and packing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_tables_match_the_old_construction(seed):
    tensors = seeded_list(seed)
    chunk = [1, 7, 16, 64, 1000][seed % 5]
    p = PlanCache(chunk).get(tensors)
    want = old_tables([t.data_ptr() for t in tensors], [t.numel() for t in tensors],
                      [DTYPE_CODES[t.dtype] for t in tensors], chunk)
    assert_layout(p, want)
    assert_one_buffer(p)
    assert p.acc_dtype == acc_dtype(t.dtype for t in tensors) and not p.aliased
    assert p.packed.host is p.packed.device and not p.packed.pinned  # CPU: no copy, nothing pinned


def test_unit_plan_tables_match_the_old_construction():
    gen = torch.Generator().manual_seed(3)
    tensors = [random_tensor(s, d, "cpu", gen) for s, d in [((3, 40), torch.float32), ((5,), torch.float16),
                                                            ((2, 3, 7), torch.float64), ((9, 1), torch.bfloat16)]]
    rows = [unit_rows(t, tuple(range(1, t.dim())) if t.dim() > 1 else None) for t in tensors]
    p = PlanCache(8).get_units(tensors, rows)
    addresses, numels, codes = [], [], []
    for t, r in zip(tensors, rows):
        for row in range(r):
            addresses.append(t.data_ptr() + row * (t.numel() // r) * t.element_size())
            numels.append(t.numel() // r)
            codes.append(DTYPE_CODES[t.dtype])
    assert_layout(p, old_tables(addresses, numels, codes, 8))
    assert_one_buffer(p)


def test_pack_tables_any_dtypes_shapes_and_empty_tables():
    gen = torch.Generator().manual_seed(4)
    tables = [
        torch.randint(-2**40, 2**40, (3, 5), generator=gen),
        torch.randint(0, 100, (7,), generator=gen, dtype=torch.int32),
        torch.zeros(0, dtype=torch.int64),
        torch.randint(0, 100, (2, 3), generator=gen, dtype=torch.int16).t(),  # not contiguous
        torch.tensor(5, dtype=torch.int64),  # 0-d
    ]
    packed, views = pack_tables(torch.device("cpu"), tables)
    for t, v in zip(tables, views):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert (v.data_ptr() - packed.host.data_ptr()) % 16 == 0
    assert packed.host.numel() < sum(t.numel() * t.element_size() for t in tables) + 16 * len(tables)


def pin_requests(monkeypatch) -> list[tuple[str, int, bool]]:
    """torch.zeros and torch.empty without pinning (a CPU-only torch cannot pin), recording each host allocation:
    (function, bytes, pin_memory asked). A fresh pinned reserve (plan.reserve) for the test."""
    requests = []

    def unpinned(name, real):
        def alloc(*args, pin_memory=False, **kwargs):
            t = real(*args, **kwargs)
            if t.device.type == "cpu":
                requests.append((name, t.numel() * t.element_size(), pin_memory))
            return t

        return alloc

    monkeypatch.setattr(torch, "zeros", unpinned("zeros", torch.zeros))
    monkeypatch.setattr(torch, "empty", unpinned("empty", torch.empty))
    monkeypatch.setattr(plan, "reserve", plan.PinnedReserve())
    return requests


def test_pinned_non_blocking_copy_only_for_cuda(monkeypatch):
    """The CUDA branch, run on the meta device: one pinned host buffer (requested), one non-blocking copy of
    it, views of one device buffer. For a CPU device: no pinning and no copy at all."""
    requests, copies = pin_requests(monkeypatch), []
    real_copy = torch.Tensor.copy_

    def copy_(self, src, non_blocking=False):
        copies.append((self.device.type, src.device.type, self.numel(), non_blocking))
        return real_copy(self, src, non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    tables = [torch.arange(6, dtype=torch.int64).view(2, 3), torch.arange(5, dtype=torch.int32)]

    pack_tables(torch.device("cpu"), tables)
    assert [r[2] for r in requests if r[0] == "zeros"] == [False] and all(c[0] == "cpu" for c in copies)

    requests.clear()
    copies.clear()
    monkeypatch.setattr(plan, "_pinned_staging", lambda device: True)  # what a CUDA device gets
    packed, views = pack_tables(torch.device("meta"), tables)
    assert [r[2] for r in requests if r[0] == "zeros"] == [True] and packed.pinned
    assert packed.device.device.type == "meta"
    to_device = [c for c in copies if c[0] == "meta"]
    assert to_device == [("meta", "cpu", packed.device.numel(), True)]  # one copy, non-blocking
    assert packed.host is None  # built outside capture: the host buffer is dropped once its copy is issued
    assert [v.shape for v in views] == [(2, 3), (5,)] and [v.dtype for v in views] == [torch.int64, torch.int32]
    assert all(v.untyped_storage().data_ptr() == packed.device.untyped_storage().data_ptr() for v in views)


def test_pinning_is_chosen_for_cuda_devices_only():
    assert plan._pinned_staging(torch.device("cuda", 0)) and plan._pinned_staging(torch.device("cuda"))
    assert not plan._pinned_staging(torch.device("cpu")) and not plan._pinned_staging(torch.device("meta"))


# ---- the cache under (simulated) CUDA-graph capture --------------------------------------------------------------


class Capture:
    """Stands in for torch.cuda.is_current_stream_capturing (the CPU has no streams to capture)."""

    def __init__(self, monkeypatch):
        self.on = False
        self.uploads = 0
        monkeypatch.setattr(plan, "capturing", lambda device: self.on)
        real_upload = plan.PackedTables.upload

        def upload(packed):
            self.uploads += 1
            real_upload(packed)

        monkeypatch.setattr(plan.PackedTables, "upload", upload)


def fill_cache(cache: PlanCache, count: int, seed: int) -> list:
    """Build `count` plans of distinct live lists (returned, so their addresses stay distinct)."""
    keep = []
    for i in range(count):
        grads = random_grads(2, seed=seed + i, max_numel=10)
        keep.append(grads)
        cache.get(grads)
    return keep


def test_the_lru_bound_holds_outside_capture(monkeypatch):
    Capture(monkeypatch)
    cache = PlanCache(16, capacity=4)
    first = random_grads(3, seed=1)
    p = cache.get(first)
    keep = fill_cache(cache, 10, 100)
    assert len(cache) == 4 and cache.builds == 11 and cache.kept_for_graphs == 0
    assert cache.get(first) is not p and cache.builds == 12  # evicted: rebuilt
    assert keep


def test_a_plan_built_while_capturing_serves_that_call_only(monkeypatch):
    """A miss while capturing builds a plan for that call alone: its device buffer is then a temporary of the graph
    (the graph's pool owns it; keeping it would hold memory the pool may hand out again), its host source is kept
    for good (the graph's copy node reads it at every replay). Later calls, captured or eager, build their own."""
    cap = Capture(monkeypatch)
    cache = PlanCache(16, capacity=4)
    grads = random_grads(5, seed=2)
    cap.on = True
    captured = cache.get(grads)
    assert cache.builds == 1 and len(cache) == 0 and cache.kept_for_graphs == 0
    source = weakref.ref(captured.packed.host)
    again = cache.get(grads)
    assert again is not captured and cache.builds == 2  # a second capture (or call) builds again
    cap.on = False
    eager = cache.get(grads)
    assert eager is not captured and eager is not again and cache.builds == 3
    assert cache.get(grads) is eager and len(cache) == 1  # an eager build is cached as before
    del captured, again
    gc.collect()
    assert source() is not None  # kept for the graph that copies from it
    assert_layout(eager, old_tables([t.data_ptr() for t in grads], [t.numel() for t in grads],
                                    [DTYPE_CODES[t.dtype] for t in grads], 16))
    cache.clear()
    gc.collect()
    assert source() is None


def test_captured_builds_keep_no_device_memory_and_take_pinned_buffers_from_the_reserve(monkeypatch):
    """The CUDA branch on the meta device. A process that never captured sets no pinned memory aside; a capture's
    first build finds no reserve (torch's allocator, counted) and sizes it, and the next eager build sets that many
    bytes aside (PinnedReserve); a build while capturing then takes a buffer instead of asking for pinned memory
    (cudaHostAlloc is kept out of a capture), keeps it for good, and keeps no reference to its device buffer once
    the call is done. An empty reserve falls back to torch's pinned allocation, counted."""
    cap = Capture(monkeypatch)
    requests = pin_requests(monkeypatch)
    monkeypatch.setattr(plan, "_pinned_staging", lambda device: True)
    meta = torch.device("meta")
    cache = IndexCache()
    for k in range(3):
        cache.get(meta, [3, 1, 2, k])
    assert [r[0] for r in requests if r[2]] == ["zeros"] * 3, "pinned memory set aside by a process that never captured"
    assert plan.reserve.buffers == [] and plan.reserve.size == 0

    requests.clear()
    cap.on = True
    cache.get(meta, [3, 1, 2])  # the first capture of the process that builds: no reserve yet
    assert plan.reserve.misses == 1 and [r[0] for r in requests if r[2]] == ["zeros"]
    cap.on = False
    requests.clear()
    cache.get(meta, [4, 1, 2])  # an eager build after it sets the reserve aside, sized to what the capture used
    pinned = [r for r in requests if r[2]]
    assert [r[0] for r in pinned] == ["empty"] * plan.PinnedReserve.COUNT + ["zeros"]
    assert len(plan.reserve.buffers) == plan.PinnedReserve.COUNT
    assert all(b.numel() == plan.PinnedReserve.MIN_BYTES for b in plan.reserve.buffers)

    requests.clear()
    cap.on = True
    for k in range(plan.PinnedReserve.COUNT):
        index = cache.get(meta, [k, 7])
        device_buffer = weakref.ref(index.untyped_storage())
        assert index.shape == (2,) and index.dtype == torch.int64
        del index
        gc.collect()
        assert device_buffer() is None, "a device buffer built while capturing was kept"
    assert not [r for r in requests if r[2]], "a pinned allocation while capturing"
    assert plan.reserve.buffers == [] and plan.reserve.misses == 1 and len(cache._graph_sources) == 5
    cache.get(meta, [9])  # the reserve is empty: torch's allocator, counted
    assert plan.reserve.misses == 2 and [r[0] for r in requests if r[2]] == ["zeros"]

    cache.get(meta, list(range(2000)))  # a larger capture-time build: counted, and it sizes the reserve
    cap.on = False
    requests.clear()
    cache.get(meta, [5])  # the next eager build: larger buffers replace the smaller ones
    assert len(plan.reserve.buffers) == plan.PinnedReserve.COUNT
    assert all(b.numel() >= 2000 * 8 for b in plan.reserve.buffers)
    assert [r[0] for r in requests if r[2]] == ["empty"] * plan.PinnedReserve.COUNT + ["zeros"]


def test_the_pinned_reserve_is_sized_by_captures_graph_tree_warm_ups_or_an_opt_in_and_bounded(monkeypatch):
    """What sizes PinnedReserve besides a capture's build (previous test): tables a capture looked up (a later
    capture may build such tables), a build while CUDA-graph trees warm a function up (the recording follows: set
    aside at once), every build after arm(); eager builds of a process that never captured do not (an AGC plan of a
    7B model, ~67 MB of tables, would have set 4 x 128 MB aside). At most MAX_BYTES in all: fewer buffers of larger
    tables, none for tables larger than MAX_BYTES (their capture-time builds are misses)."""
    cap = Capture(monkeypatch)
    requests = pin_requests(monkeypatch)
    monkeypatch.setattr(plan, "_pinned_staging", lambda device: True)
    warming = [False]
    monkeypatch.setattr(plan, "warming_up_graphs", lambda device: warming[0])
    monkeypatch.setattr(plan.PinnedReserve, "MAX_BYTES", 64 * 4096)
    meta = torch.device("meta")
    reserve, cache = plan.reserve, IndexCache()

    cache.get(meta, list(range(3000)))  # eager, ~24 KB of tables: nothing set aside
    assert reserve.size == 0 and reserve.buffers == []
    cap.on = True
    cache.get(meta, list(range(3000)))  # a capture uses it: sized, not filled while capturing
    cap.on = False
    assert reserve.size == 32768 and reserve.buffers == [] and cache.builds == 1
    cache.get(meta, [1])
    assert [b.numel() for b in reserve.buffers] == [32768] * plan.PinnedReserve.COUNT

    monkeypatch.setattr(plan, "reserve", plan.PinnedReserve())
    requests.clear()
    warming[0] = True
    cache.get(meta, list(range(1000)))  # a graph tree's warm-up: set aside now
    assert [b.numel() for b in plan.reserve.buffers] == [8192] * plan.PinnedReserve.COUNT
    warming[0] = False
    cap.on = True
    cache.get(meta, list(range(1000, 2000)))  # its recording builds from the reserve
    assert plan.reserve.misses == 0 and len(plan.reserve.buffers) == plan.PinnedReserve.COUNT - 1
    assert [r[0] for r in requests if r[2]] == ["empty"] * plan.PinnedReserve.COUNT + ["zeros"]
    cap.on = False

    monkeypatch.setattr(plan, "reserve", plan.PinnedReserve())
    plan.reserve.arm()
    cache.get(meta, list(range(4000)))  # opted in: every build sizes the reserve (fills it, outside capture)
    assert [b.numel() for b in plan.reserve.buffers] == [32768] * plan.PinnedReserve.COUNT
    cache.get(meta, list(range(12000)))  # 96 KB: 128 KB buffers, two of them within MAX_BYTES (256 KB)
    assert [b.numel() for b in plan.reserve.buffers] == [131072] * 2
    cache.get(meta, list(range(40000)))  # 320 KB: larger than MAX_BYTES, never reserved
    assert [b.numel() for b in plan.reserve.buffers] == [131072] * 2
    cap.on = True
    cache.get(meta, list(range(40001)))
    assert plan.reserve.misses == 1 and len(plan.reserve.buffers) == 2


def test_scratch_is_per_stream_and_fresh_for_each_captured_call(monkeypatch):
    """DevicePlan.ticket and DevicePlan.scratch: nothing is made with the plan; every stream gets its own ticket
    (zeroed, kept with the plan) at its first use, and its own scratch (with that ticket) at the first use of a
    prepared call; a call being captured or run in a CUDA-graph tree's warm-up a new one each time (never kept).
    Streams are stand-ins here (stream_of replaced)."""
    cap = Capture(monkeypatch)
    stream = ["A"]
    warming = [False]
    monkeypatch.setattr(plan, "stream_of", lambda device: stream[0])
    monkeypatch.setattr(plan, "warming_up_graphs", lambda device: warming[0])
    p = PlanCache(16).get(random_grads(4, seed=5))
    assert p.tickets == {} and p.scratches == {}
    ticket = p.ticket()
    assert p.ticket() is ticket and int(ticket) == 0 and p.scratches == {}  # the ticket alone: no scratch
    home = p.scratch()
    assert home.ticket is ticket and p.scratch() is home
    assert home.partials.shape == (p.num_chunks,) and home.tensor_vals.shape == (p.num_tensors,)
    assert home.coef.shape == (1,) and home.partials.dtype == home.coef.dtype == p.acc_dtype
    stream[0] = "B"
    other = p.scratch()
    assert other.ticket.data_ptr() != ticket.data_ptr() and int(other.ticket) == 0
    assert other.partials.shape == home.partials.shape and other.tensor_vals.shape == home.tensor_vals.shape
    assert p.scratch() is other and set(p.scratches) == {"A", "B"} and p.ticket() is other.ticket
    for mode in ("capture", "warm-up"):
        cap.on, warming[0] = mode == "capture", mode == "warm-up"
        stream[0] = "C"
        first, second = p.scratch(), p.scratch()
        assert first is not second and first.ticket.data_ptr() != second.ticket.data_ptr()
        assert p.ticket().data_ptr() not in (first.ticket.data_ptr(), second.ticket.data_ptr())
        assert int(first.ticket) == 0 and "C" not in p.scratches and "C" not in p.tickets
        stream[0] = "A"
        if cap.on:
            assert p.scratch() is not home  # captured even on the building stream: a graph may replay anywhere
            assert p.ticket() is not ticket
    cap.on = warming[0] = False
    assert p.scratch() is home and p.ticket() is ticket


def test_an_eager_plan_used_while_capturing_is_kept_and_stays_shared(monkeypatch):
    cap = Capture(monkeypatch)
    cache = PlanCache(16, capacity=4)
    grads = random_grads(4, seed=3)
    p = cache.get(grads)
    cap.on = True
    assert cache.get(grads) is p and cap.uploads == 0  # filled eagerly: no new copy in the graph
    cap.on = False
    keep = fill_cache(cache, 100, 300)
    assert cache.get(grads) is p and cache.builds == 101  # never evicted, and eager calls share it
    assert len(cache._lru) == 4 and cache.kept_for_graphs == 1 and len(cache) == 5
    cache.clear()
    assert len(cache) == 0 and cache.get(grads) is not p
    assert keep


def test_warming_up_graphs_is_a_cuda_graph_trees_warm_up_on_the_trees_stream(monkeypatch):
    """warming_up_graphs: true while the current stream of the device is the stream of torch.compile's CUDA-graph
    tree manager for it (where the trees warm functions up with allocations sent to their pool); false without a
    manager, on another stream, on other devices, or when inductor's trees were never imported. Inductor's module
    and the streams are stand-ins here (a GPU test runs the real trees)."""
    import sys
    import types

    cuda1 = torch.device("cuda", 1)
    trees = types.ModuleType("torch._inductor.cudagraph_trees")
    managers = {}
    trees.get_manager = lambda index, create_if_none_exists=True: managers.get(index)
    current = {"stream": "user"}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.delitem(sys.modules, "torch._inductor.cudagraph_trees", raising=False)
    assert not plan.warming_up_graphs(cuda1)
    monkeypatch.setitem(sys.modules, "torch._inductor.cudagraph_trees", trees)
    assert not plan.warming_up_graphs(cuda1)  # no manager for the device
    managers[1] = types.SimpleNamespace(stream="tree")
    assert not plan.warming_up_graphs(cuda1)  # the user's stream
    current["stream"] = "tree"
    assert plan.warming_up_graphs(cuda1) and not plan.warming_up_graphs(torch.device("cpu"))
    assert not plan.warming_up_graphs(torch.device("cuda", 0))


def test_a_build_while_graph_trees_warm_up_serves_that_call_only(monkeypatch):
    """The tree's pool owns what is allocated during its warm-up: a plan built then is not cached (nor is its
    scratch, see the scratch test), so nothing fusedclip keeps lives in memory the tree may hand out again."""
    Capture(monkeypatch)
    warming = [True]
    monkeypatch.setattr(plan, "warming_up_graphs", lambda device: warming[0])
    cache = PlanCache(16)
    grads = random_grads(3, seed=7)
    first = cache.get(grads)
    assert cache.get(grads) is not first and len(cache) == 0 and cache.builds == 2
    warming[0] = False
    kept = cache.get(grads)
    warming[0] = True
    assert cache.get(grads) is kept  # built outside the pool: used by the warm-up as by any call


def test_the_host_buffer_is_kept_only_for_plans_built_while_capturing(monkeypatch):
    """A device plan's pinned host source is dropped once its copy is issued (torch's caching host allocator holds
    the block until the copy ran), except for one built while capturing: the graph's copy node re-reads it at every
    replay. The meta device stands in for CUDA."""
    cap = Capture(monkeypatch)
    pin_requests(monkeypatch)
    monkeypatch.setattr(plan, "_pinned_staging", lambda device: True)
    tables = [torch.arange(7, dtype=torch.int64)]
    eager, _ = pack_tables(torch.device("meta"), tables)
    assert eager.host is None and cap.uploads == 1
    cap.on = True
    captured, _ = pack_tables(torch.device("meta"), tables)
    assert captured.host is not None and torch.equal(captured.host.view(torch.int64), tables[0])
    assert cap.uploads == 2


def test_an_evicted_plans_host_buffer_is_freed(monkeypatch):
    """The contrast to the test above: outside capture, eviction releases the plan and its host source."""
    Capture(monkeypatch)
    cache = PlanCache(16, capacity=2)
    grads = random_grads(3, seed=4)
    source = weakref.ref(cache.get(grads).packed.host)
    keep = fill_cache(cache, 3, 400)
    gc.collect()
    assert source() is None
    assert keep


def test_unit_plans_follow_the_same_rules(monkeypatch):
    cap = Capture(monkeypatch)
    cache = PlanCache(16, capacity=2)
    tensors = [random_tensor((4, 9)), random_tensor((3, 5), torch.bfloat16)]
    rows = [4, 3]
    cap.on = True
    captured = cache.get_units(tensors, rows)
    assert cache.get_units(tensors, rows) is not captured and len(cache) == 0  # for its call only
    cap.on = False
    eager = cache.get_units(tensors, rows)
    assert eager is not captured
    cap.on = True
    assert cache.get_units(tensors, rows) is eager  # filled eagerly: preferred, and now kept for the graph
    cap.on = False
    keep = fill_cache(cache, 10, 600)
    assert cache.get_units(tensors, rows) is eager and cache.kept_for_graphs == 1
    assert keep


# ---- index tensors of the mixed-group paths (dispatch) -----------------------------------------------------------


def test_index_cache_uploads_once_per_distinct_list(monkeypatch):
    cap = Capture(monkeypatch)
    cache = IndexCache(capacity=2)
    cpu = torch.device("cpu")
    a = cache.get(cpu, [3, 0, 5])
    assert a.dtype == torch.int64 and a.tolist() == [3, 0, 5]
    assert cache.get(cpu, [3, 0, 5]) is a and cache.builds == 1
    cap.on = True
    assert cache.get(cpu, [3, 0, 5]) is a  # now kept for the graph
    cap.on = False
    for i in range(5):
        cache.get(cpu, [i])
    assert cache.get(cpu, [3, 0, 5]) is a and cache.builds == 6


def test_mixed_group_per_tensor_clip_builds_no_index_per_call(monkeypatch):
    """A list the kernels take only in part (a transposed gradient goes to torch): two groups, so the per-tensor
    norms and coefficients are put in place by index. The indices are built on the first call only; nothing
    calls torch.tensor(list, device=...) per call."""
    if "triton" not in fusedclip.available_backends():
        pytest.skip("needs a kernel backend beside torch for a mixed-group plan")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grads = random_grads(6, (torch.float32, torch.bfloat16), device, seed=60)
    grads.insert(2, random_tensor((9, 5), torch.float32, device).t())
    params = []
    for g in grads:
        prm = torch.nn.Parameter(torch.empty_like(g))
        prm.grad = g
        params.append(prm)
    monkeypatch.setattr(dispatch, "_indices", IndexCache())
    originals = [g.clone() for g in grads]
    norms = fusedclip.clip_grad_norm_per_tensor_(params, 0.5, backend="triton")
    assert dispatch._indices.builds == 2  # one index per group, shared by the norms and the scale
    for i, (g, o) in enumerate(zip(grads, originals)):
        ref = ref_tensor_norm(o, 2.0)
        assert abs(norms[i].item() - ref) <= 1e-5 * ref
        assert_scaled(g, o, min(0.5 / (norms[i].item() + 1e-6), 1.0))

    device_lists = []
    real_tensor = torch.tensor

    def tensor(data, *args, **kwargs):
        if kwargs.get("device") is not None and isinstance(data, list):
            device_lists.append(data)
        return real_tensor(data, *args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    for g, o in zip(grads, originals):
        g.copy_(o)
    again = fusedclip.clip_grad_norm_per_tensor_(params, 0.5, backend="triton")
    assert dispatch._indices.builds == 2 and device_lists == []
    assert torch.equal(again, norms)


# ---- on a GPU: the real capture and sync checks (unverified until a GPU run) ------------------------------------


def _kernel_backends() -> list[str]:
    return [b for b in ("triton", "cuda") if b in fusedclip.available_backends()]


@pytest.mark.gpu
def test_gpu_cold_plan_and_index_builds_do_not_sync():
    grads = random_grads(50, (torch.float32, torch.bfloat16, torch.float16), "cuda", seed=70, max_numel=3000)
    cache, indices = PlanCache(1024), IndexCache()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = cache.get(grads)
        u = cache.get_units(grads, [1] * len(grads))
        index = indices.get(torch.device("cuda"), list(range(0, 40, 3)))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert p.packed.pinned and p.packed.host is None and p.meta.is_cuda  # pinned staging, dropped once copied
    want = old_tables([t.data_ptr() for t in grads], [t.numel() for t in grads],
                      [DTYPE_CODES[t.dtype] for t in grads], 1024)
    assert_layout(p, want)
    assert_layout(u, want)  # one unit per tensor: the same tables
    assert_one_buffer(p)
    assert index.is_cuda and index.tolist() == list(range(0, 40, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_plan_built_in_capture_replays_after_100_other_plans(backend, monkeypatch):
    """A cache miss inside torch.cuda.graph capture: the plan's copy is a node of the graph. After 100 other
    plans went through the cache (more than its capacity), the graph still replays correctly, and an eager call
    made before the first replay does not read the captured plan's still-unfilled tables. The pinned reserve is
    armed before the warm-up (the opt-in a first capture that builds needs: PinnedReserve)."""
    if backend not in _kernel_backends():
        pytest.skip(f"backend {backend!r} is not available")
    monkeypatch.setattr(plan, "reserve", plan.PinnedReserve())
    plan.reserve.arm()
    dtypes = (torch.float32, torch.bfloat16)
    grads = random_grads(40, dtypes, "cuda", seed=81, max_numel=5000)
    params = params_with_grads(grads)
    # The same sizes and dtypes at other addresses: compiles every kernel specialisation outside the capture,
    # and leaves the plan of `grads` cold.
    fusedclip.clip_grad_norm_(params_with_grads([g.clone() for g in grads]), 0.5, backend=backend)
    cache = fusedclip.backends.select(backend, grads[0].device).cache  # type: ignore[attr-defined]
    builds, misses = cache.builds, plan.reserve.misses
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # (capture_error_mode "global": no pinned allocation may happen in it)
        total = fusedclip.clip_grad_norm_(params, 0.5, backend=backend)
    assert cache.builds == builds + 1, "the capture should have built the plan (a cold cache)"
    assert plan.reserve.misses == misses, "the capture's build found no pinned buffer set aside for it"

    originals = [g.clone() for g in grads]
    eager_total = fusedclip.get_total_norm(grads, backend=backend)  # eager, before any replay
    torch.testing.assert_close(eager_total.double().cpu(), torch.tensor(ref_total_norm(originals, 2.0)),
                               rtol=1e-5, atol=0)
    keep = []
    for i in range(100):
        other = random_grads(3, dtypes, "cuda", seed=1000 + i, max_numel=300)
        keep.append(other)
        fusedclip.clip_grad_norm_(params_with_grads(other), 0.5, backend=backend)
    assert cache.builds >= builds + 101 and len(cache._lru) <= cache.capacity

    for seed in (82, 83):
        gen = torch.Generator().manual_seed(seed)
        fresh = [random_tensor(g.shape, g.dtype, "cuda", gen, scale=2.0) for g in grads]
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_total_norm(fresh, 2.0)
        assert abs(total.item() - ref) <= 1e-5 * ref, (total.item(), ref)
        coef = min(0.5 / (total.item() + 1e-6), 1.0)
        assert coef < 1.0
        for g, f in zip(grads, fresh):
            assert_scaled(g, f, coef)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_a_plan_used_from_another_stream_waits_for_its_tables(backend):
    """A plan built (tables copied) on one stream and found from another: the other stream waits for the copy's
    event and is recorded on the device buffer, once; the results match torch."""
    if backend not in _kernel_backends():
        pytest.skip(f"backend {backend!r} is not available")
    grads = random_grads(30, (torch.float32, torch.bfloat16), "cuda", seed=91, max_numel=4000)
    cache = fusedclip.backends.select(backend, grads[0].device).cache  # type: ignore[attr-defined]
    cache.clear()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        p = cache.get(grads)
        assert p.packed.host is None and p.packed.streams == {side}
    main = torch.cuda.current_stream()
    total = fusedclip.get_total_norm(grads, backend=backend)  # finds the plan from the main stream
    assert cache.get(grads) is p and p.packed.streams == {side, main}
    torch.testing.assert_close(total.double().cpu(), torch.tensor(ref_total_norm(grads, 2.0)), rtol=1e-5, atol=0)
    with torch.cuda.stream(side):  # and the other way round, through the fast path's kept plan
        again = fusedclip.get_total_norm(grads, backend=backend)
    torch.cuda.synchronize()
    torch.testing.assert_close(again.double().cpu(), torch.tensor(ref_total_norm(grads, 2.0)), rtol=1e-5, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_two_streams_and_a_graph_replay_on_one_kept_plan(backend):
    """Issue 25 item 5: one kept plan used at once from two streams, and by a CUDA graph replaying on a third
    stream beside them, with nothing ordering them: each gets its own ticket and scratch, so every total is right
    (a shared ticket would finalize some early, or never) and every ticket is back to zero afterwards."""
    if backend not in _kernel_backends():
        pytest.skip(f"backend {backend!r} is not available")
    grads = random_grads(300, (torch.float32, torch.bfloat16), "cuda", seed=96, max_numel=20000)
    ref = ref_total_norm(grads, 2.0)
    for _ in range(3):  # build, keep (fast path), prepared calls
        fusedclip.get_total_norm(grads, backend=backend)
    streams = [torch.cuda.Stream() for _ in range(3)]
    graph = torch.cuda.CUDAGraph()
    streams[2].wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(streams[2]):
        fusedclip.get_total_norm(grads, backend=backend)  # torch's recipe: a warm-up on a side stream first
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        graph_total = fusedclip.get_total_norm(grads, backend=backend)
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    totals, replays = [], []
    for _ in range(40):
        for s in streams[:2]:
            with torch.cuda.stream(s):
                totals.append(fusedclip.get_total_norm(grads, backend=backend))
        with torch.cuda.stream(streams[2]):
            graph.replay()
            replays.append(graph_total.clone())
    torch.cuda.synchronize()
    for i, t in enumerate(totals + replays):
        assert abs(t.item() - ref) <= 1e-5 * ref, (i, t.item(), ref)
    device_plan = fusedclip.backends.select(backend, grads[0].device).cache.get(grads)  # type: ignore[attr-defined]
    assert all(int(s.ticket) == 0 for s in device_plan.scratches.values())
    assert all(int(t) == 0 for t in device_plan.tickets.values())
    assert bool(device_plan.tickets) == (backend == "triton")  # the cuda ops make their own: the plan makes none
