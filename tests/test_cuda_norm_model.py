"""A host MODEL of the CUDA kernels' bookkeeping, not a GPU result: nothing here runs a CUDA kernel.

csrc/kernels/norm.cu finalizes on the device with counters that blocks bump in whatever order the GPU schedules
them; only a GPU can run that, and none may be at hand. So this file re-implements, function by function, the
index, tile and counter logic of norm_kernel (grid-stride chunk loop, one counter bump per run of a tile's
chunks, finish_chunks, finalize_tile, warp_fold, block_reduce, the ticket and the last block's reduce), and the
element loops of fold_chunk / apply_chunk (common.cuh, norm.cu, elementwise.cu), and runs them over the tables
the plan really builds (plan.PlanCache on CPU tensors, so the addresses are real, views at odd offsets included)
under many simulated block interleavings. Values are symbolic: a partial is the name of its chunk, a combine is a
node of an interned expression DAG, so "same reduction order" is an exact equality of node ids, and the chunks
under a node say what it combined.

What it checks: every chunk's partial is written once and read only after it was written; every tile with chunks
is finalized exactly once, by the block whose count completed it; every tensor's norm is written exactly once and
combines exactly its own chunks (empty tensors: the fold's identity); the total combines every chunk exactly once;
the order of every reduction is the same for every interleaving (and, per chunk, for every grid size); every
element of a chunk is read (and written) exactly once, wide accesses only at 16-byte aligned addresses, and all
but less than 16 bytes at each end of a chunk wide.
What it cannot check: memory ordering (it runs sequentially consistent; the fences are argued in norm.cu), the
arithmetic, and anything the model does not mirror. Keep it in step with the kernels when they change.
The kernel constants are read from fusedclip_kernels.h."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from fusedclip.backends.cuda_backend import CHUNK_SIZE
from fusedclip.backends.plan import DTYPE_CODES, PlanCache

HEADER = (Path(__file__).resolve().parent.parent / "csrc" / "kernels" / "fusedclip_kernels.h").read_text()


def _const(name: str) -> int:
    return int(re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;", HEADER).group(1))


THREADS = _const("kThreads")
TILE = _const("kTileTensors")
CHUNK_ALIGN = _const("kChunkAlign")
VECTOR_BYTES = _const("kVectorBytes")
WARPS = THREADS // 32


# ---- symbolic values ---------------------------------------------------------------------------------------------


class Dag:
    """Interned expression nodes: equal trees get equal ids, so comparing reduction orders is comparing ints."""

    def __init__(self) -> None:
        self.ids: dict[tuple, int] = {}
        self.nodes: list[tuple] = []
        self.identity = self.node("identity")
        self._leaves: dict[int, Counter] = {}

    def node(self, *key) -> int:
        i = self.ids.get(key)
        if i is None:
            i = self.ids[key] = len(self.nodes)
            self.nodes.append(key)
        return i

    def combine(self, a: int, b: int) -> int:
        return self.node("combine", a, b)

    def leaves(self, i: int) -> Counter:
        """The chunk / block partials under node i, with multiplicity (memoised: runs share their nodes)."""
        if i not in self._leaves:
            self._leaves[i] = self._count_leaves(i)
        return self._leaves[i]

    def _count_leaves(self, i: int) -> Counter:
        out: Counter = Counter()
        stack = [i]
        while stack:
            key = self.nodes[stack.pop()]
            if key[0] in ("chunk", "block"):
                out[key] += 1
            elif key[0] != "identity":
                stack.extend(key[1:])
        return out


# ---- the tables ----------------------------------------------------------------------------------------------------


class Tables:
    def __init__(self, plan) -> None:
        meta = plan.meta.tolist()
        self.address, self.numel, self.code = meta
        self.chunk_tensor = plan.chunk_tensor.tolist()
        self.chunk_start = plan.chunk_start.tolist()
        self.tensor_chunks = plan.tensor_chunks.tolist()
        self.num_tensors = plan.num_tensors
        self.num_chunks = plan.num_chunks
        self.chunk_size = plan.chunk_size

    def tile_end(self, tile: int) -> int:
        return min((tile + 1) * TILE, self.num_tensors)

    def num_tiles(self) -> int:
        return (self.num_tensors + TILE - 1) // TILE

    def count(self, c: int) -> int:  # chunk_view's element count
        t = self.chunk_tensor[c]
        return min(self.chunk_start[c] + self.chunk_size, self.numel[t]) - self.chunk_start[c]


ITEMSIZE = {0: 4, 1: 2, 2: 2, 3: 8}  # plan.DTYPE_CODES


def check_tables(tt: Tables) -> None:
    """What the kernels assume of the tables: chunks in tensor order, tensor_chunks consistent with chunk_tensor,
    chunk starts at multiples of chunk_size (a multiple of kChunkAlign), each tensor's elements covered once."""
    assert tt.chunk_size > 0 and tt.chunk_size % CHUNK_ALIGN == 0
    assert tt.tensor_chunks[0] == 0 and tt.tensor_chunks[-1] == tt.num_chunks == len(tt.chunk_tensor)
    assert len(tt.tensor_chunks) == tt.num_tensors + 1 < 2**31 and tt.num_chunks < 2**31
    for t in range(tt.num_tensors):
        c0, c1 = tt.tensor_chunks[t], tt.tensor_chunks[t + 1]
        assert c1 - c0 == -(-tt.numel[t] // tt.chunk_size), f"tensor {t}: {c1 - c0} chunks for {tt.numel[t]}"
        covered = 0
        for c in range(c0, c1):
            assert tt.chunk_tensor[c] == t and tt.chunk_start[c] == covered
            assert tt.count(c) > 0
            covered += tt.count(c)
        assert covered == tt.numel[t]


# ---- the norm kernel's bookkeeping (norm.cu), mirrored --------------------------------------------------------------


class NormKernelModel:
    """One launch of norm_kernel over `tt` with `grid` blocks. Each block is a generator; a `yield` is a point where
    other blocks may run (a global memory step). Shared state is what the kernel keeps in the workspace."""

    def __init__(self, tt: Tables, grid: int, per_chunk: bool, want_norms: bool, dag: Dag) -> None:
        self.tt, self.grid, self.per_chunk, self.want_norms, self.dag = tt, grid, per_chunk, want_norms, dag
        self.partials: dict[int, int] = {}  # ws.partials
        self.tile_done = [0] * tt.num_tiles()  # ws.tile_done (zeroed by the launcher's memset)
        self.tile_shares: dict[int, int] = {}  # ws.tile_shares
        self.ticket = 0  # ws.ticket (zeroed by the launcher's memset)
        self.finalized: dict[int, int] = {}  # tile -> the block that finalized it
        self.norms: dict[int, list[int]] = {}  # tensor -> every value written to norms_out[t]
        self.totals: list[int] = []  # every value written to total_out

    # -- helpers of norm.cu --
    def root(self, v: int) -> int:
        return self.dag.node("root", v)

    def tensor_share(self, v: int) -> int:
        return self.dag.node("share", v)

    def write_partial(self, i: int, value: int) -> None:
        assert i not in self.partials, f"partial {i} written twice"
        self.partials[i] = value

    def read_partial(self, i: int) -> int:
        assert i in self.partials, f"partial {i} read before it was written"
        return self.partials[i]

    def write_norm(self, t: int, value: int) -> None:
        self.norms.setdefault(t, []).append(value)

    def warp_reduce(self, v: list[int]) -> list[int]:
        for off in (16, 8, 4, 2, 1):
            v = [self.dag.combine(v[lane], v[lane ^ off]) for lane in range(32)]
        return v

    def block_reduce(self, per_thread: list[int]) -> int:
        smem = [self.warp_reduce(per_thread[w * 32 : (w + 1) * 32])[0] for w in range(WARPS)]
        return self.warp_reduce([smem[lane] if lane < WARPS else self.dag.identity for lane in range(32)])[0]

    def warp_fold(self, c0: int, c1: int) -> list[int]:
        """Every lane's value after warp_fold (the caller keeps lane src's)."""
        comb = self.dag.combine
        v = [self.dag.identity] * 32
        for lane in range(32):
            c = c0 + lane
            while c + 96 < c1:
                a, b, d, e = (self.read_partial(c + k) for k in (0, 32, 64, 96))
                v[lane] = comb(comb(comb(comb(v[lane], a), b), d), e)
                c += 128
            while c < c1:
                v[lane] = comb(v[lane], self.read_partial(c))
                c += 32
        return self.warp_reduce(v)

    def finalize_tile(self, block: int, tile: int) -> None:
        tt, dag = self.tt, self.dag
        assert tile not in self.finalized, f"tile {tile} finalized twice (blocks {self.finalized[tile]}, {block})"
        self.finalized[tile] = block
        end = tt.tile_end(tile)
        share = [dag.identity] * THREADS
        for warp in range(WARPS):
            first = tile * TILE + warp * 32
            while first < end:  # warp-uniform
                ts = [first + lane for lane in range(32)]
                mine = [t < end for t in ts]
                c0 = [tt.tensor_chunks[t] if m else 0 for t, m in zip(ts, mine)]
                c1 = [tt.tensor_chunks[t + 1] if m else 0 for t, m in zip(ts, mine)]
                v = [self.read_partial(a) if b - a == 1 else dag.identity for a, b in zip(c0, c1)]
                for src in [lane for lane in range(32) if c1[lane] - c0[lane] > 1]:  # ballot, lowest lane first
                    v[src] = self.warp_fold(c0[src], c1[src])[src]
                for lane in range(32):
                    if mine[lane]:
                        if self.want_norms:
                            self.write_norm(ts[lane], self.root(v[lane]))
                        thread = warp * 32 + lane
                        share[thread] = dag.combine(share[thread], self.tensor_share(v[lane]))
                first += THREADS
        assert tile not in self.tile_shares
        self.tile_shares[tile] = self.block_reduce(share)

    def finish_chunks(self, block: int, tile: int, done: int):
        tt = self.tt
        chunks = tt.tensor_chunks[tt.tile_end(tile)] - tt.tensor_chunks[tile * TILE]
        yield  # threadfence: this block's partials are out; other blocks run
        old = self.tile_done[tile]  # atomicAdd: one indivisible step
        self.tile_done[tile] = old + done
        assert old + done <= chunks, f"tile {tile} counted {old + done} of {chunks} chunks"
        if old + done != chunks:
            return
        for c in range(tt.tensor_chunks[tile * TILE], tt.tensor_chunks[tt.tile_end(tile)]):
            assert c in self.partials, f"tile {tile} completed while chunk {c} has no partial"
        yield
        self.finalize_tile(block, tile)

    def block(self, b: int):
        tt, dag = self.tt, self.dag
        if not self.per_chunk:
            yield  # the data pass: one partial per block
            self.write_partial(b, dag.node("block", b))
        else:
            tile, done = -1, 0
            for c in range(b, tt.num_chunks, self.grid):
                t = tt.chunk_tensor[c]
                if t // TILE != tile:
                    if done != 0:
                        yield from self.finish_chunks(b, tile, done)
                    tile, done = t // TILE, 0
                yield  # fold of chunk c
                self.write_partial(c, dag.node("chunk", c))
                done += 1
            if done != 0:
                yield from self.finish_chunks(b, tile, done)
        yield  # threadfence, then the ticket
        old = self.ticket
        self.ticket += 1
        if old != self.grid - 1:
            return
        self.last_block(b)

    def last_block(self, b: int) -> None:
        tt, dag = self.tt, self.dag
        v = [dag.identity] * THREADS
        if not self.per_chunk:
            for thread in range(THREADS):
                for i in range(thread, self.grid, THREADS):
                    v[thread] = dag.combine(v[thread], self.read_partial(i))
        else:
            for thread in range(THREADS):
                for i in range(thread, tt.num_tiles(), THREADS):
                    end = tt.tile_end(i)
                    if tt.tensor_chunks[i * TILE] != tt.tensor_chunks[end]:
                        assert i in self.tile_shares, f"last block reads tile {i}'s share before it was written"
                        v[thread] = dag.combine(v[thread], self.tile_shares[i])
                    elif self.want_norms:
                        for t in range(i * TILE, end):
                            self.write_norm(t, self.root(dag.identity))
        self.totals.append(self.root(self.block_reduce(v)))

    def run(self, pick) -> None:
        """Run every block to its end; pick(runnable blocks, in block order) gives the index of the one that takes
        the next step."""
        ids = list(range(self.grid))
        blocks = [self.block(b) for b in ids]
        while ids:
            k = pick(ids)
            try:
                next(blocks[ids[k]])
            except StopIteration:
                del ids[k]


def schedules(seed: int, count: int):
    """Block interleavings: in order, reversed, one block starved to the end, and random ones."""
    yield "in order", lambda ids: 0
    yield "reversed", lambda ids: len(ids) - 1
    yield "block 0 last", lambda ids: 1 if len(ids) > 1 and ids[0] == 0 else 0
    for k in range(count):
        rng = random.Random(seed * 1000 + k)
        yield f"random {k}", lambda ids, rng=rng: rng.randrange(len(ids))


def check_run(m: NormKernelModel) -> tuple[int, tuple]:
    """The invariants of one finished launch; returns (total's node, norms' nodes) to compare across runs."""
    tt, dag = m.tt, m.dag
    assert len(m.totals) == 1, f"the total was written {len(m.totals)} times"
    assert m.ticket == m.grid
    with_chunks = {i for i in range(tt.num_tiles()) if tt.tensor_chunks[i * TILE] != tt.tensor_chunks[tt.tile_end(i)]}
    want_chunks = Counter(("chunk", c) for c in range(tt.num_chunks))
    if m.per_chunk:
        assert set(m.partials) == set(range(tt.num_chunks))
        assert set(m.finalized) == with_chunks, "tiles finalized"
        tile_chunks = [tt.tensor_chunks[tt.tile_end(i)] - tt.tensor_chunks[i * TILE] for i in range(tt.num_tiles())]
        assert m.tile_done == tile_chunks, "tile counters"
        got = dag.leaves(m.totals[0])
    else:
        assert set(m.partials) == set(range(m.grid))
        got = Counter()
        for (_, b), k in dag.leaves(m.totals[0]).items():
            got.update(("chunk", c) for c in range(b, tt.num_chunks, m.grid) for _ in range(k))
    assert got == want_chunks, "the total does not combine every chunk exactly once"
    norms = ()
    if m.want_norms:
        assert set(m.norms) == set(range(tt.num_tensors)), "tensors without a norm"
        for t, writes in m.norms.items():
            assert len(writes) == 1, f"norm of tensor {t} written {len(writes)} times"
            want = Counter(("chunk", c) for c in range(tt.tensor_chunks[t], tt.tensor_chunks[t + 1]))
            assert dag.leaves(writes[0]) == want, f"tensor {t}'s norm combines the wrong chunks"
            if not want:
                assert writes[0] == m.root(dag.identity), f"empty tensor {t}'s norm is not the identity's"
        norms = tuple(m.norms[t][0] for t in range(tt.num_tensors))
    else:
        assert not m.norms
    return m.totals[0], norms


def run_all(tt: Tables, grids: list[int], per_chunk: bool, want_norms: bool, seed: int, random_runs: int = 2) -> None:
    check_tables(tt)
    dag = Dag()
    seen = {}
    for grid in grids:
        for name, pick in schedules(seed + grid, random_runs):
            m = NormKernelModel(tt, grid, per_chunk, want_norms, dag)
            m.run(pick)
            result = check_run(m)
            # Per chunk, the order is the tables' alone; the total alone depends on the grid (fixed per device).
            key = None if per_chunk else grid
            if key in seen:
                assert result == seen[key][1], f"grid {grid}, {name}: another order than {seen[key][0]}"
            else:
                seen[key] = (f"grid {grid}, {name}", result)


# ---- inputs -------------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def many_tensors(seed: int, count: int, chunk_size: int, empty_runs: list[tuple[int, int]]) -> list[torch.Tensor]:
    """`count` tensors of random sizes: mostly one chunk, some of many (up to 40), single elements, views at odd
    offsets, and runs of empty tensors at [start, start + length) for each (start, length) of empty_runs."""
    rng = random.Random(seed)
    empties = {i for start, length in empty_runs for i in range(start, start + length)}
    base = torch.zeros(64 * chunk_size + 64)
    out = []
    for i in range(count):
        dtype = DTYPES[i % len(DTYPES)]
        if i in empties:
            out.append(torch.empty(0, dtype=dtype))
            continue
        r = rng.random()
        n = 1 if r < 0.05 else rng.randint(2, chunk_size) if r < 0.9 else rng.randint(chunk_size, 40 * chunk_size)
        if rng.random() < 0.1 and dtype == torch.float32:
            offset = rng.randint(0, 63)
            out.append(base[offset : offset + n])  # a view: not 16-byte aligned unless offset % 4 == 0
        else:
            out.append(torch.zeros(n, dtype=dtype))
    return out


def tables_of(tensors: list[torch.Tensor], chunk_size: int) -> Tables:
    return Tables(PlanCache(chunk_size).get(tensors))


# ---- tests ---------------------------------------------------------------------------------------------------------


def test_model_reads_the_kernel_constants():
    assert (THREADS, TILE, CHUNK_ALIGN, VECTOR_BYTES) == (512, 2048, 16, 16)
    assert THREADS % 32 == 0 and WARPS <= 32


def test_tables_and_kernels_agree_on_dtype_codes_and_chunk_size():
    """The codes the plan writes into meta are the kernels' DTypeCode (an unknown code is silently skipped by
    visit_dtype), and the backend's chunk size is one the launchers accept (a multiple of kChunkAlign)."""
    enum = re.search(r"enum DTypeCode\s*:\s*int\s*\{([^}]*)\}", HEADER).group(1)
    codes = {name.strip(): int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", enum)}
    names = {
        torch.float32: "kFloat32", torch.float16: "kFloat16", torch.bfloat16: "kBFloat16", torch.float64: "kFloat64"
    }
    assert {d: codes[names[d]] for d in names} == DTYPE_CODES
    assert {code: d.itemsize for d, code in DTYPE_CODES.items()} == ITEMSIZE  # the model's element sizes
    assert CHUNK_SIZE % CHUNK_ALIGN == 0 and CHUNK_SIZE == _const("kDefaultChunkSize")


@pytest.mark.parametrize(
    "count, empty_runs",
    [
        (5, []),  # one tile, a handful of tensors
        (TILE, [(0, 3)]),  # exactly one tile
        (TILE + 1, [(TILE - 2, 2)]),  # a second tile of one tensor
        (2 * TILE + 300, [(TILE, TILE)]),  # the middle tile is all empty: the last block writes its norms
        (3 * TILE + 17, [(0, 10), (TILE - 5, 10), (3 * TILE, 17)]),  # empties across boundaries; a last tile of them
    ],
)
def test_per_tensor_norms_every_interleaving(count, empty_runs):
    chunk_size = 16
    tt = tables_of(many_tensors(count, count, chunk_size, empty_runs), chunk_size)
    grids = sorted({1, min(tt.num_chunks, 7), min(tt.num_chunks, 528)})  # 528: 4 blocks on each of 132 SMs
    if tt.num_chunks < 100:
        grids.append(tt.num_chunks + 3)  # grid_size never launches more blocks than chunks; idle blocks still work
    run_all(tt, grids, per_chunk=True, want_norms=True, seed=count)


def test_p0_total_without_norms_every_interleaving():
    """p = 0 runs per chunk with no norms_out: the same tiles, the shares only."""
    chunk_size = 32
    tt = tables_of(many_tensors(3, 2 * TILE + 5, chunk_size, [(100, 50)]), chunk_size)
    run_all(tt, [3, 64], per_chunk=True, want_norms=False, seed=5)


def test_total_alone_every_interleaving():
    chunk_size = 16
    tt = tables_of(many_tensors(11, 700, chunk_size, [(0, 2), (500, 30)]), chunk_size)
    run_all(tt, sorted({1, 5, 64, min(528, tt.num_chunks), tt.num_chunks}), per_chunk=False, want_norms=False, seed=7)


def test_one_huge_tensor_and_runs_that_cross_tiles():
    """Tensors of 96..3002 chunks (warp_fold's four-wide loop, its bound and its tail, for lanes on both sides),
    next to tiles of one-chunk tensors, so that every block's grid-stride run crosses tile boundaries."""
    chunk_size = 16
    many = [torch.zeros(chunk_size * k - 3) for k in (96, 97, 127, 128, 129, 130, 224, 225, 257)]
    tensors = [torch.zeros(1)] * 3 + [torch.zeros(16 * 3001 + 5)] + many + [torch.zeros(3)] * (3 * TILE)
    tt = tables_of(tensors, chunk_size)
    run_all(tt, [2, 33, 64], per_chunk=True, want_norms=True, seed=13, random_runs=2)


def test_unit_tables_every_interleaving():
    """AGC's unit plans: one entry per row, rows at unaligned addresses, rows longer than a chunk."""
    chunk_size = 16
    tensors = [torch.zeros(3001, 5), torch.zeros(7, 70, dtype=torch.bfloat16), torch.zeros(900, 3, dtype=torch.float64)]
    p = PlanCache(chunk_size).get_units(tensors, [3001, 7, 900])
    tt = Tables(p)
    assert tt.num_tensors == 3001 + 7 + 900
    run_all(tt, [5, 64], per_chunk=True, want_norms=True, seed=17, random_runs=2)


# ---- element loops: fold_chunk (norm.cu) and apply_chunk (elementwise.cu), mirrored -------------------------------


def _chunk_accesses(address: int, count: int, itemsize: int, unroll: int) -> tuple[list[int], list[int]]:
    """(first element of every 16-byte load, every scalar element read) of a chunk loop over all threads: the scalar
    head up to the first 16-byte boundary (pack_span in common.cuh), then each thread takes `unroll` 16-byte
    packs THREADS apart per step while they last, then one at a time, then the scalar tail."""
    n = VECTOR_BYTES // itemsize
    if address % itemsize:  # not aligned to its element: no packs, all tail
        head = nvec = 0
    else:
        head = min(count, (VECTOR_BYTES - address % VECTOR_BYTES) % VECTOR_BYTES // itemsize)
        nvec = (count - head) // n
    packs = []
    for thread in range(THREADS):
        i = thread
        while i + (unroll - 1) * THREADS < nvec:
            packs += [i + k * THREADS for k in range(unroll)]
            i += unroll * THREADS
        while i < nvec:
            packs.append(i)
            i += THREADS
    packs = [head + k * n for k in packs]
    tail = head + nvec * n
    scalars = []
    for thread in range(THREADS):
        scalars += range(thread, head, THREADS)
        scalars += range(tail + thread, count, THREADS)
    return packs, scalars


def fold_chunk_accesses(address: int, count: int, itemsize: int) -> tuple[list[int], list[int]]:
    """fold_chunk (norm.cu): four packs per step."""
    return _chunk_accesses(address, count, itemsize, 4)


def apply_chunk_accesses(address: int, count: int, itemsize: int) -> tuple[list[int], list[int]]:
    """apply_chunk (elementwise.cu): two packs per step."""
    return _chunk_accesses(address, count, itemsize, 2)


def check_accesses(tt: Tables, loop) -> None:
    for c in range(tt.num_chunks):
        t = tt.chunk_tensor[c]
        size = ITEMSIZE[tt.code[t]]
        address = tt.address[t] + tt.chunk_start[c] * size
        count = tt.count(c)
        packs, scalars = loop(address, count, size)
        n = VECTOR_BYTES // size
        for k in packs:
            assert (address + k * size) % 16 == 0 and 0 <= k and k + n <= count
        elements = [k + j for k in packs for j in range(n)] + scalars
        assert sorted(elements) == list(range(count)), f"chunk {c}: elements not read exactly once"
        # every chunk, aligned or not, reads all but < 16 bytes at each end wide (a misaligned view too)
        assert len(scalars) <= 2 * (n - 1), f"chunk {c}: {len(scalars)} scalar reads"


@pytest.mark.parametrize("loop", [fold_chunk_accesses, apply_chunk_accesses], ids=["fold_chunk", "apply_chunk"])
def test_each_element_once_wide_only_when_aligned(loop):
    chunk_size = 65536 // 8  # large enough that every loop (four-wide, two-wide, remainder, tail) runs
    rng = random.Random(19)
    base = torch.zeros(4 * chunk_size + 64)
    tensors = []
    for dtype in DTYPES:
        for n in (1, 7, 15, 16, 17, chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size + 9):
            tensors.append(torch.zeros(n, dtype=dtype))
    for _ in range(12):
        offset, n = rng.randint(0, 31), rng.randint(1, 2 * chunk_size)
        tensors.append(base[offset : offset + n])  # fp32 views, most of them not 16-byte aligned
    tensors.append(torch.zeros(2 * chunk_size + 6, dtype=torch.bfloat16)[3:])  # bf16 at a 6-byte offset
    tt = tables_of(tensors, chunk_size)
    check_tables(tt)
    check_accesses(tt, loop)
