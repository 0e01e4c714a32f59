"""Distributed clipping on real processes: gloo on CPU, 2 and 4 ranks spawned here, bounded in time.

Each test starts its ranks with the spawn start method on a free port, runs one worker function per rank, and
fails (killing the ranks) when a rank raises or the whole run takes longer than its deadline.
"""

from __future__ import annotations

import datetime
import math
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from reference import TOTAL_RTOL, assert_scaled, random_grads, random_tensor, ref_total_norm

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

DEADLINE_S = 50  # per multi-process test, start-up included
NORMS = [2.0, 1.0, math.inf, -math.inf, 0.0, 3.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, queue, deadline_s: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=deadline_s - 10),
        )
        fn(rank, world)
        dist.barrier()
        queue.put((rank, None))
    except BaseException:
        queue.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world: int, deadline_s: float = DEADLINE_S) -> None:
    """Run fn(rank, world) on `world` gloo ranks; raise with every failing rank's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, queue, deadline_s), daemon=True) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    results: dict[int, str | None] = {}
    try:
        while len(results) < world and time.monotonic() < deadline:
            try:
                rank, err = queue.get(timeout=0.5)
                results[rank] = err
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    time.sleep(1.0)  # a rank died without reporting: give the others a moment, then stop
                    if queue.empty():
                        break
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"rank {r}:\n{e}" for r, e in sorted(results.items()) if e]
    missing = [r for r in range(world) if r not in results]
    if errors or missing:
        raise AssertionError(
            "\n".join(errors) + (f"\nranks {missing} did not finish within {deadline_s}s" if missing else "")
        )


# -----------------------------------------------------------------------------------------------------------
# helpers used inside the ranks


def _close(got: float, ref: float, rtol: float, what: str) -> None:
    if math.isnan(ref) or math.isinf(ref):
        assert (math.isnan(got) and math.isnan(ref)) or got == ref, f"{what}: got {got}, expected {ref}"
        return
    assert abs(got - ref) <= rtol * abs(ref) + 1e-30, f"{what}: got {got!r}, expected {ref!r}"


def _same_on_all_ranks(x: torch.Tensor, what: str) -> None:
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    for r, y in enumerate(out):
        assert torch.equal(y, x) or (x.isnan().all() and y.isnan().all()), f"{what}: rank {r} has {y}, I have {x}"


def _tiny_transformer(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(19, 12),
        torch.nn.TransformerEncoderLayer(12, 2, dim_feedforward=20, dropout=0.0, batch_first=True),
        torch.nn.TransformerEncoderLayer(12, 2, dim_feedforward=20, dropout=0.0, batch_first=True),
        torch.nn.Linear(12, 5),
    )


def _shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in list(model)[1:3]:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 19, (3, 5), generator=g)


def _collectives(fn) -> tuple[object, int]:
    """(fn(), number of collectives it issued), counted by torch's CommDebugMode."""
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        out = fn()
    return out, comm.get_total_counts()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -----------------------------------------------------------------------------------------------------------
# FSDP2 on a small transformer


def _fsdp_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import fusedclip

    mesh = init_device_mesh("cpu", (world,))
    # Unsharded single-process reference: the average of every rank's loss, as FSDP averages gradients.
    ref = _tiny_transformer(0)
    sum(ref(_batch(r)).square().mean() for r in range(world)).div(world).backward()
    ref_grads = [p.grad.detach().clone() for p in ref.parameters()]

    ours, theirs = _shard(_tiny_transformer(0), mesh), _shard(_tiny_transformer(0), mesh)
    for m in (ours, theirs):
        m(_batch(rank)).square().mean().backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(isinstance(g, DTensor) for g in grads)

    for p in NORMS:
        got, calls = _collectives(lambda: fusedclip.get_total_norm(grads, p))
        assert calls == 1, f"p={p}: {calls} collectives"
        want = torch.nn.utils.get_total_norm([q.grad for q in theirs.parameters()], p)
        assert isinstance(got, DTensor), f"p={p}: {type(got)}"
        assert tuple(got.placements) == tuple(want.placements), f"p={p}: {got.placements} vs torch {want.placements}"
        g, w = got.full_tensor(), want.full_tensor()
        assert g.dtype == torch.float32
        _close(g.item(), w.item(), 2e-6, f"p={p} vs torch on the sharded model")
        _close(g.item(), ref_total_norm(ref_grads, p), 1e-5, f"p={p} vs unsharded float64 reference")
        _same_on_all_ranks(got.to_local(), f"p={p} local total")

    # Clip: fusedclip on one sharded copy, torch on the other, against the reference.
    before = [_full(g).clone() for g in grads]
    total, calls = _collectives(lambda: fusedclip.clip_grad_norm_(ours.parameters(), 0.05))
    assert calls == 1, calls
    want = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
    _close(total.full_tensor().item(), want.full_tensor().item(), 2e-6, "clip_grad_norm_ total")
    coef = 0.05 / (ref_total_norm(ref_grads, 2.0) + 1e-6)
    assert coef < 0.5
    for i, (q, t, b, rg) in enumerate(zip(ours.parameters(), theirs.parameters(), before, ref_grads)):
        torch.testing.assert_close(q.grad.full_tensor(), t.grad.full_tensor(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(q.grad.full_tensor(), rg * coef, rtol=1e-4, atol=1e-7)
        assert_scaled(q.grad.full_tensor(), b, 0.05 / (total.full_tensor().item() + 1e-6), f"grad {i}")

    # GradClipper and clip_grads_with_norm_ with a DTensor total (Replicate and Partial(max)).
    for q in ours.parameters():
        q.grad.to_local().mul_(40.0)
    before = [_full(q.grad).clone() for q in ours.parameters()]
    clipper = fusedclip.GradClipper(ours.parameters(), max_norm=0.5)
    t2 = clipper()
    assert isinstance(t2, DTensor)
    for b, q in zip(before, ours.parameters()):
        assert_scaled(q.grad.full_tensor(), b, 0.5 / (t2.full_tensor().item() + 1e-6), "GradClipper")
    tinf = torch.nn.utils.get_total_norm([q.grad for q in ours.parameters()], math.inf)  # torch's Partial(max)
    before = [_full(q.grad).clone() for q in ours.parameters()]
    fusedclip.clip_grads_with_norm_(ours.parameters(), 0.01, tinf)
    for b, q in zip(before, ours.parameters()):
        assert_scaled(q.grad.full_tensor(), b, 0.01 / (tinf.full_tensor().item() + 1e-6), "with_norm inf")
    dist.barrier()


def test_fsdp2_transformer_two_ranks():
    launch(_fsdp_worker, 2)


# -----------------------------------------------------------------------------------------------------------
# Unsupported placement (Partial), mixed inputs, non-finite on one rank


def _placements_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    import fusedclip

    mesh = init_device_mesh("cpu", (world,))
    full = random_grads(4, seed=7, max_numel=40)
    # A Partial gradient's local values differ per rank (same shapes).
    mine = [t * (1.0 + 0.7 * rank) - 0.3 * rank for t in random_grads(4, seed=8, max_numel=40)]
    dts = [
        DTensor.from_local(full[0], mesh, [Replicate()], run_check=False),
        DTensor.from_local(full[1].chunk(world)[rank].contiguous(), mesh, [Shard(0)], run_check=False),
        DTensor.from_local(mine[2], mesh, [Partial("sum")], run_check=False),
        DTensor.from_local(mine[3].abs(), mesh, [Partial("max")], run_check=False),
    ]
    fulls = [d.full_tensor() for d in dts]
    for p in NORMS:
        got = fusedclip.get_total_norm(dts, p)
        want = torch.nn.utils.get_total_norm(dts, p)
        _close(got.full_tensor().item(), ref_total_norm(fulls, p), 1e-5, f"mixed placements p={p}")
        _close(got.full_tensor().item(), want.full_tensor().item(), 2e-6, f"mixed placements p={p} vs torch")

    # Clipping a Partial gradient scales its local values: the reduction of scaled values is the scaled gradient.
    params = [torch.nn.Parameter(torch.zeros_like(d)) for d in dts]
    for q, d in zip(params, dts):
        q.grad = DTensor.from_local(d.to_local().clone(), mesh, d.placements, run_check=False)
    total = fusedclip.clip_grad_norm_(params, 0.1, 2.0)
    coef = 0.1 / (ref_total_norm(fulls, 2.0) + 1e-6)
    for i, (q, f) in enumerate(zip(params, fulls)):
        torch.testing.assert_close(q.grad.full_tensor(), f * coef, rtol=1e-5, atol=1e-7, msg=f"tensor {i}")
    assert isinstance(total, DTensor)

    # Mixed DTensor and plain gradients, and bad arguments: clear errors, no gradient touched.
    kept = [d.to_local().clone() for d in dts]
    with pytest.raises(ValueError, match="DTensors and some plain"):
        fusedclip.get_total_norm([dts[0], full[1]])
    with pytest.raises(ValueError, match="replicated"):
        fusedclip.get_total_norm(full, replicated=[full[0]])
    with pytest.raises(TypeError, match="process_group"):
        fusedclip.get_total_norm(full, process_group="world")
    with pytest.raises(TypeError, match="replicated"):
        fusedclip.clip_grad_norm_(params, 1.0, process_group=dist.group.WORLD, replicated=[3])
    for q, k in zip(params, kept):
        assert not torch.equal(q.grad.to_local(), k)  # clipped above, untouched by the failing calls since
    assert all(torch.equal(d.to_local(), k) for d, k in zip(dts, kept))

    # A non-finite gradient on one rank only: every rank sees the same non-finite total.
    for bad in (math.nan, math.inf):
        for p in (2.0, 1.0, math.inf, -math.inf):
            local = [x.reshape(-1).tensor_split(world)[rank].clone() for x in full + random_grads(1, seed=9)]
            local[-1] = torch.linspace(0.5, 2.0, 11).tensor_split(world)[rank].clone()
            if rank == world - 1:
                local[-1][-1] = bad
            sharded = [DTensor.from_local(x, mesh, [Shard(0)], run_check=False) for x in local]
            got = fusedclip.get_total_norm(sharded, p).full_tensor()
            plain = fusedclip.get_total_norm(local, p, process_group=dist.group.WORLD)
            for t, how in ((got, "DTensor"), (plain, "process_group")):
                _same_on_all_ranks(t, f"{how} p={p} bad={bad}")
                if p == -math.inf and bad == math.inf:
                    assert torch.isfinite(t), f"{how}: an inf entry does not change a min, got {t}"
                else:
                    assert not torch.isfinite(t), f"{how} p={p} bad={bad}: got {t}"
                    assert bool(t.isnan()) == (math.isnan(bad)), f"{how} p={p} bad={bad}: got {t}"
            if not (p == -math.inf and bad == math.inf):
                with pytest.raises(RuntimeError, match="non-finite"):  # on every rank alike
                    fusedclip.get_total_norm(sharded, p, error_if_nonfinite=True)


def test_placements_errors_and_nonfinite_two_ranks():
    launch(_placements_worker, 2)


# -----------------------------------------------------------------------------------------------------------
# Plain tensors sharded by the caller: flat buffers, replicated tensors marked


def _flat_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    import fusedclip

    group = dist.group.WORLD
    sharded = random_grads(9, dtypes=(torch.float32, torch.float64, torch.bfloat16), seed=3, max_numel=70)
    dup = random_grads(3, seed=4, max_numel=30)  # identical on every rank (tensor-parallel duplicates)
    for dt in (torch.float32, torch.float64):
        flat = torch.cat([t.to(dt).reshape(-1) for t in sharded])
        bounds = [0, flat.numel() // 3, flat.numel()] if world == 2 else None
        local = flat[bounds[rank]:bounds[rank + 1]].clone()  # uneven ZeRO-style pieces
        dups = [d.to(dt) for d in dup]
        for p in NORMS:
            got = fusedclip.get_total_norm([local, *dups], p, process_group=group, replicated=dups)
            if p == 0:  # each rank's piece is a tensor of its own; duplicates count once
                ref = float(world + len(dup))
            else:
                ref = ref_total_norm([flat, *dups], p)
            assert got.dtype == dt and not hasattr(got, "placements")
            _close(got.item(), ref, TOTAL_RTOL[dt] * 5, f"flat {dt} p={p}")
            _same_on_all_ranks(got, f"flat p={p}")

    # clip_grad_norm_ and GradClipper on parameters, duplicates marked by a predicate.
    pieces = [t.chunk(world)[rank].clone() for t in sharded[:3]]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in pieces + [dup[0]]]
    for q, g in zip(params, pieces + [dup[0].clone()]):
        q.grad = g
    params[3].is_dup = True
    ref = ref_total_norm(sharded[:3] + [dup[0]], 1.0)
    before = [q.grad.clone() for q in params]
    total = fusedclip.clip_grad_norm_(params, 0.3, 1.0, process_group=[group],
                                      replicated=lambda q: getattr(q, "is_dup", False))
    _close(total.item(), ref, 1e-5, "clip_grad_norm_ p=1")
    for b, q in zip(before, params):
        assert_scaled(q.grad, b, 0.3 / (total.item() + 1e-6), "flat clip")
    clipper = fusedclip.GradClipper(params, 0.01, "inf", process_group=group, replicated=(params[3],))
    before = [q.grad.clone() for q in params]
    t = clipper()
    expected = torch.stack([b.abs().max() for b in before]).max()
    dist.all_reduce(expected, op=dist.ReduceOp.MAX)
    assert torch.equal(t, expected), f"GradClipper inf: {t} vs {expected}"
    _same_on_all_ranks(t, "GradClipper inf")
    for b, q in zip(before, params):
        assert_scaled(q.grad, b, 0.01 / (t.item() + 1e-6), "GradClipper scale")
    # A rank with no gradients still takes part in the collective.
    empty = fusedclip.get_total_norm([] if rank == 0 else [sharded[0]], 2.0, process_group=group)
    _close(empty.item(), ref_total_norm([sharded[0]], 2.0), 1e-6, "one rank without tensors")


def test_flat_buffers_process_group_two_ranks():
    launch(_flat_worker, 2)


# -----------------------------------------------------------------------------------------------------------
# Four ranks: a 2-D (FSDP x TP) mesh, two process groups (data x pipeline), meshes that cannot be combined


def _mesh2d_worker(rank: int, world: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import fusedclip

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = mesh.get_coordinate()[0]

    def build():
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 7))
        return m

    ref = build()
    x = [torch.randn(3, 6, generator=torch.Generator().manual_seed(50 + d)) for d in range(2)]
    sum(ref(xi).square().mean() for xi in x).div(2).backward()
    ref_grads = [p.grad.clone() for p in ref.parameters()]

    models = []
    for _ in range(2):
        m = build()
        parallelize_module(m, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        fully_shard(m, mesh=mesh["dp"])
        m(x[dp]).square().mean().backward()
        models.append(m)
    ours, theirs = models
    grads = [p.grad for p in ours.parameters()]
    assert all(isinstance(g, DTensor) and g.device_mesh.ndim == 2 for g in grads), [g.placements for g in grads]
    for p in NORMS:
        got, calls = _collectives(lambda: fusedclip.get_total_norm(grads, p))
        assert calls == 1, f"2-D p={p}: {calls} collectives"
        want = torch.nn.utils.get_total_norm([q.grad for q in theirs.parameters()], p)
        if rank == 0 and p in (2.0, math.inf):
            print(f"2-D mesh p={p}: grads {[tuple(g.placements) for g in grads]}, torch total {want.placements}")
        assert tuple(got.placements) == tuple(want.placements), f"p={p}: {got.placements} vs {want.placements}"
        _close(got.full_tensor().item(), want.full_tensor().item(), 2e-6, f"2-D p={p} vs torch")
        _close(got.full_tensor().item(), ref_total_norm(ref_grads, p), 1e-5, f"2-D p={p} vs reference")
    total = fusedclip.clip_grad_norm_(ours.parameters(), 0.02)
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.02)
    _close(total.full_tensor().item(), ref_total_norm(ref_grads, 2.0), 1e-5, "2-D clip total vs reference")
    coef = 0.02 / (ref_total_norm(ref_grads, 2.0) + 1e-6)
    assert coef < 0.5, coef
    for q, t, r in zip(ours.parameters(), theirs.parameters(), ref_grads):
        torch.testing.assert_close(q.grad.full_tensor(), t.grad.full_tensor(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(q.grad.full_tensor(), r * coef, rtol=1e-4, atol=1e-7)

    # Gradients on a mesh and on its sub-mesh (one world, no common group): one all-reduce per rank set. The
    # sub-mesh's Replicate tensor counts once within each dp slice, beside the 2-D mesh's gradients.
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Replicate

    odd_grad = DTensor.from_local(torch.full((3,), 0.5), mesh["dp"], [Replicate()], run_check=False)
    odd = torch.nn.Parameter(torch.zeros_like(odd_grad))
    odd.grad = odd_grad
    clipped = [g.full_tensor() for g in grads]
    for p in (2.0, math.inf, 0.0):
        got, calls = _collectives(lambda: fusedclip.get_total_norm([*grads, odd_grad], p))
        assert calls == 2, f"mesh + sub-mesh p={p}: {calls} collectives"
        want = ref_total_norm(clipped + [torch.full((3,), 0.5)], p)
        _close(got.item(), want, 1e-5, f"mesh + sub-mesh p={p}")
    # A mesh of another world (made from a group on its own): a clear error on every rank, nothing touched.
    alone = DeviceMesh.from_group(mesh.get_group("dp"), "cpu")
    odd.grad = DTensor.from_local(torch.ones(3), alone, [Replicate()], run_check=False)
    kept = [q.grad.to_local().clone() for q in ours.parameters()]
    with pytest.raises(ValueError, match="belongs to a world of ranks"):
        fusedclip.clip_grad_norm_([*ours.parameters(), odd], 1e-3)
    assert all(torch.equal(q.grad.to_local(), k) for q, k in zip(ours.parameters(), kept))

    # Plain tensors over two groups (data x pipeline), as torchtitan combines stages after FSDP.
    dp_group, pp_group = mesh.get_group("dp"), mesh.get_group("tp")
    pp = mesh.get_coordinate()[1]
    stage = random_grads(5, seed=60 + pp, max_numel=50)  # each pipeline stage owns different tensors
    shared = random_grads(2, seed=70, max_numel=20)  # identical on every rank
    flat = torch.cat([t.reshape(-1) for t in stage])
    local = flat.chunk(2)[dp]
    all_stages = [torch.cat([t.reshape(-1) for t in random_grads(5, seed=60 + s, max_numel=50)]) for s in range(2)]
    for p in (2.0, 1.0, math.inf, -math.inf, 0.0):
        got, calls = _collectives(lambda: fusedclip.get_total_norm(
            [local, *shared], p, process_group=(dp_group, pp_group), replicated=shared))
        assert calls == 1, f"dp x pp p={p}: {calls} collectives (the two groups tile the world: one all-reduce)"
        if p == 0:
            assert got.item() == 2 * 2 + len(shared), got  # each rank's piece is a tensor of its own
            continue
        _close(got.item(), ref_total_norm(all_stages + shared, p), 1e-5, f"dp x pp p={p}")
        _same_on_all_ranks(got, f"dp x pp p={p}")
    dist.barrier()


def test_fsdp_tp_mesh_and_two_groups_four_ranks():
    launch(_mesh2d_worker, 4)


# -----------------------------------------------------------------------------------------------------------
# Kept calls across steps: no gradient held, keys that cannot be confused, no plan made per span


class _Pool:
    """A caching allocator in small, as torch's CUDA one behaves in a steady loop: gradient k is made in the block
    its predecessor used once that gradient is gone (no reference left), else in a new block."""

    def __init__(self) -> None:
        self.free: dict[int, list[torch.Tensor]] = {}

    def grad(self, k: int, values: torch.Tensor, wrap):
        import weakref

        blocks = self.free.setdefault(k, [])
        block = blocks.pop() if blocks else torch.empty_like(values)
        g = wrap(block.copy_(values))
        weakref.finalize(g, blocks.append, block)  # the block is handed out again once g is freed
        return g


def _steady_state(params: list, locals_of, wrap, ref_of, what: str, **kw) -> None:
    """Steps of zero_grad(set_to_none=True), new gradients from a _Pool, clip: every step after the first uses the
    kept call (the last step's gradients are gone, so the new ones sit where they were), and each total is right."""
    import fusedclip
    from fusedclip import fastpath

    pool, hits = _Pool(), []
    for step in range(4):
        for q in params:
            q.grad = None
        values = locals_of(step)
        for k, (q, v) in enumerate(zip(params, values)):
            q.grad = pool.grad(k, v, wrap)
        before = [v.clone() for v in values]
        h = fastpath.stats.hits
        total = fusedclip.clip_grad_norm_(params, 0.05, **kw)
        hits.append(fastpath.stats.hits - h)
        ref = ref_of(step)
        _close(float(_full(total)), ref, 1e-5, f"{what} step {step}")
        for q, b in zip(params, before):  # (no name left holding a gradient: the next step needs them freed)
            assert_scaled(q.grad.to_local() if hasattr(q.grad, "to_local") else q.grad, b,
                          0.05 / (float(_full(total)) + 1e-6), f"{what} step {step}")
    assert hits[1:] == [1, 1, 1], f"{what}: kept-call hits per step {hits} (set_to_none steady state)"


def _kept_worker(rank: int, world: int) -> None:
    import gc
    import weakref

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    import fusedclip
    from fusedclip import dispatch, distributed, fastpath

    grid = init_device_mesh("cpu", (world, 1), mesh_dim_names=("pp", "dp"))
    mesh = grid["pp"]  # both ranks
    sizes = (7, 13, 2, 30)

    def fulls(step: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(400 + step)
        return [random_tensor((n * world,), gen=gen, scale=0.5 + k) for k, n in enumerate(sizes)]

    # 1. A kept call holds no gradient: freed once .grad lets go of it; the next step's gradients, made where the
    # last ones were, take the kept call (DTensor gradients, then plain ones with a process group).
    dparams = [torch.nn.Parameter(DTensor.from_local(torch.zeros(n), mesh, [Shard(0)], run_check=False))
               for n in sizes]
    for q, f in zip(dparams, fulls(0)):
        q.grad = DTensor.from_local(f.chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False)
    fusedclip.clip_grad_norm_(dparams, 1.0)
    old, old_local = weakref.ref(dparams[0].grad), weakref.ref(dparams[0].grad._local_tensor)
    for q in dparams:
        q.grad = None
    assert old() is None and old_local() is None, "a kept DTensor call holds the last step's gradients"
    _steady_state(
        dparams, lambda s: [f.chunk(world)[rank].clone() for f in fulls(s)],
        lambda b: DTensor.from_local(b, mesh, [Shard(0)], run_check=False),
        lambda s: ref_total_norm(fulls(s), 2.0), "DTensor",
    )
    pparams = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    for q, f in zip(pparams, fulls(0)):
        q.grad = f.chunk(world)[rank].clone()
    fusedclip.clip_grad_norm_(pparams, 1.0, process_group=dist.group.WORLD)
    old = weakref.ref(pparams[0].grad)
    for q in pparams:
        q.grad = None
    assert old() is None, "a kept process-group call holds the last step's gradients"
    _steady_state(
        pparams, lambda s: [f.chunk(world)[rank].clone() for f in fulls(s)], lambda b: b.view_as(b),
        lambda s: ref_total_norm(fulls(s), 2.0), "process_group", process_group=dist.group.WORLD,
    )

    # 2. Keys: a fresh slice of the world mesh (what world_mesh["pp"] returns each time, equal by value) finds the
    # kept call; another group, or another `replicated`, never takes a kept layout (however ids get reused).
    distributed.clear()
    mine = [f.chunk(world)[rank].clone() for f in fulls(5)]
    slices, hits = [], fastpath.stats.hits
    for _ in range(3):
        slices.append(grid["pp"])
        got = fusedclip.get_total_norm(mine, 2.0, process_group=slices[-1])
        _close(got.item(), ref_total_norm(fulls(5), 2.0), 1e-5, "fresh pp slice")
    assert fastpath.stats.hits == hits + 2 and len(distributed._kept) == 1, (fastpath.stats.hits - hits,
                                                                            len(distributed._kept))
    a, b = random_grads(2, seed=450, max_numel=40)  # identical on both ranks
    ab = [a, b]
    for _ in range(3):  # temporaries: freed after each call, their ids free to be reused by the next ones
        for name, alone in (("pp", False), ("dp", True)):
            got = fusedclip.get_total_norm(mine, 2.0, process_group=grid[name])
            want = ref_total_norm(mine, 2.0) if alone else ref_total_norm(fulls(5), 2.0)
            _close(got.item(), want, 1e-5, f"process_group=grid[{name!r}]")
        for marked, other in ((a, b), (b, a)):
            want = math.sqrt(ref_total_norm([marked], 2.0) ** 2 + world * ref_total_norm([other], 2.0) ** 2)
            got = fusedclip.get_total_norm(ab, 2.0, process_group=dist.group.WORLD, replicated=[marked])
            _close(got.item(), want, 1e-5, "replicated=[a list]")
            got = fusedclip.get_total_norm(ab, 2.0, process_group=dist.group.WORLD,
                                           replicated=lambda t, m=marked: t is m)
            _close(got.item(), want, 1e-5, "replicated=a predicate")
        gc.collect()
    hits = fastpath.stats.hits
    fusedclip.get_total_norm(ab, 2.0, process_group=dist.group.WORLD, replicated=[a])  # a new list, same tensors
    assert fastpath.stats.hits == hits + 1, "replicated= with the same tensors in a new list: kept"

    # 4. No common group (a mesh over both ranks and one over this rank alone): the kept call makes no plan per span.
    full = fulls(6)
    shared = random_grads(2, seed=460, max_numel=30)  # identical on both ranks
    grads = [
        DTensor.from_local(full[0].chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False),
        DTensor.from_local(shared[0].clone(), mesh, [Replicate()], run_check=False),  # counts on rank 0
        DTensor.from_local(shared[1].clone(), grid["dp"], [Replicate()], run_check=False),  # this rank's own mesh
        DTensor.from_local(full[3].chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False),
    ]
    made = []
    make_plan = dispatch.make_plan

    def counting(*args, **kwargs):
        made.append(1)
        return make_plan(*args, **kwargs)

    for p in (2.0, 1.0, math.inf, -math.inf, 0.0):
        first = fusedclip.get_total_norm(grads, p)
        hits, made[:] = fastpath.stats.hits, []
        dispatch.make_plan = counting
        try:
            again, calls = _collectives(lambda: fusedclip.get_total_norm(grads, p))
        finally:
            dispatch.make_plan = make_plan
        assert fastpath.stats.hits == hits + 1 and calls == 2, (p, fastpath.stats.hits - hits, calls)
        assert not made, f"p={p}: the kept call made {len(made)} plans"
        assert torch.equal(first, again), (p, first, again)
        want = float(len(grads)) if p == 0 else ref_total_norm([full[0], shared[0], shared[1], full[3]], p)
        _close(again.item(), want, 1e-5, f"mesh + own mesh p={p}")
    dist.barrier()


def test_kept_calls_hold_no_gradients_and_keep_their_groups_two_ranks():
    launch(_kept_worker, 2)


# -----------------------------------------------------------------------------------------------------------
# GradScaler flags from torch's own unscale_ (p = 0 and -inf, or the user's scaler.unscale_): made global


def _scaler_flags_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    import fusedclip

    group = dist.group.WORLD
    cases = [(p, how) for p in (0.0, -math.inf) for how in ("clip_and_step", "fused", "unscale_and_clip")]
    cases += [(0.0, "after unscale_"), (2.0, "after unscale_")]
    for (p, how), bad in [(c, True) for c in cases] + [((0.0, "clip_and_step"), False), ((0.0, "fused"), False)]:
        what = f"{how} p={p} inf on rank 0: {bad}"
        grads = random_grads(3, seed=500 + rank, max_numel=40)  # each rank its own pieces
        if bad and rank == 0:
            grads[1].view(-1)[2] = math.inf  # on one rank only
        params = [torch.nn.Parameter(torch.randn(g.shape, generator=torch.Generator().manual_seed(k)))
                  for k, g in enumerate(grads)]
        for q, g in zip(params, grads):
            q.grad = g * 8.0  # scaled by the scaler's 8
        weights = [q.detach().clone() for q in params]
        opt = torch.optim.SGD(params, lr=0.1, fused=how == "fused")
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        scaler.scale(torch.ones(()))  # (sets up its scale)
        if how == "after unscale_":
            scaler.unscale_(opt)
        if how == "unscale_and_clip":
            total, calls = _collectives(lambda: fusedclip.unscale_and_clip_grad_norm_(
                opt, scaler, 0.5, p, process_group=group))
            scaler.step(opt)
        else:
            total, calls = _collectives(lambda: fusedclip.clip_and_step(
                opt, 0.5, norm_type=p, scaler=scaler, process_group=group))
        assert calls == 1, f"{what}: {calls} collectives"
        _same_on_all_ranks(total, what)
        if p == 0:
            assert total.item() == world * len(grads), (what, total)
        flags = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
        assert [float(f) for f in flags.values()] == [float(bad)], f"{what}: found_inf {flags} on rank {rank}"
        stepped = [not torch.equal(q.detach(), w) for q, w in zip(params, weights)]
        assert stepped == [not bad] * len(params), f"{what}: rank {rank} stepped {stepped}"
        scaler.update()
        assert scaler.get_scale() == (4.0 if bad else 8.0), (what, scaler.get_scale())
    dist.barrier()


def test_scaler_flags_alike_on_every_rank_two_ranks():
    launch(_scaler_flags_worker, 2)
