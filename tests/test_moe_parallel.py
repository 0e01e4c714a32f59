"""Mixture-of-experts training with expert, data (FSDP2) and pipeline parallelism on gloo: fusedclip against
torchtitan's clip_grad_norm_ (the oracle, pinned in the README's test command) and a float64 reference from the
full unsharded model.

A torchtitan-style model (dense attention, routed experts as grouped weights [experts, out, in], a dense first
layer) is laid out as torchtitan lays it out: one world mesh unflattened into a dense mesh ("pp", "fsdp") and a
sparse one ("pp", "efsdp", "ep"); experts distributed Shard(0) over "ep", then FSDP2 over "efsdp" where it is larger
than 1 (expert gradients on a 2-D mesh, _StridedShard x Shard), everything else FSDP2 over "fsdp"; pipeline stages
joined by the "pp" mesh.
Experts are dispatched by all-gathering the tokens of the expert-parallel group (gloo has no reduce-scatter), and
FSDP's gradient division is off with the loss divided by the global token count, as torchtitan does, so that every
sharded gradient is the gradient of the unsharded model on the global batch.

Each configuration trains a few SGD steps, one norm type per step (2, inf, 1, 0), and checks per step: the
gradients against the unsharded model's, the total against torchtitan's (p = 0: stock torch per mesh, combined by
hand: torchtitan divides by p) and the float64 reference, the number of collectives of our call, and every
clipped gradient. Shards are uneven (odd sizes over 2 and 4 ranks), one layer has 9 experts (over 4 expert ranks:
3, 3, 3 and none), one expert is never routed to (zero gradient rows), and one step skips a layer's experts
(no gradient at all).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference import ref_total_norm
from test_distributed import _close, _collectives, _same_on_all_ranks, launch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

DIM, HIDDEN, VOCAB, HEADS = 10, 6, 23, 2
EXPERTS = (8, 9, 16)  # per MoE layer; layer 0 is dense
SEQ, BATCH = 5, 2  # per data-parallel rank
STEPS = (2.0, math.inf, 1.0, 0.0)  # one norm type per training step
SKIP_STEP = 2  # the step whose forward skips layer 2's experts (their gradients stay None)


# The torch 2.11 stage of CI (.ci/torch-cuda-build.sh) runs the suite in a venv without torchtitan: there the
# float64 reference is the only oracle. Everywhere else a missing torchtitan fails these tests.
WITHOUT_TORCHTITAN = os.environ.get("FUSEDCLIP_TEST_WITHOUT_TORCHTITAN", "") == "1"


def _torchtitan_clip():
    """torchtitan's clip_grad_norm_, or None where FUSEDCLIP_TEST_WITHOUT_TORCHTITAN=1 says it is not installed."""
    try:
        from torchtitan.distributed.utils import clip_grad_norm_
    except ImportError as e:  # the README's test command installs it; say so rather than skip silently
        if WITHOUT_TORCHTITAN:
            return None
        pytest.fail(f"torchtitan (the oracle) is not importable ({e}); install it as the README's test command does")
    return clip_grad_norm_


# -----------------------------------------------------------------------------------------------------------
# The model


class Gather(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward sums every rank's gradient of this rank's rows."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


class SumAll(torch.autograd.Function):
    """All-reduce (sum) over a group; backward likewise (every rank's output feeds its own loss)."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(DIM, DIM, bias=False) for _ in range(4))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, HEADS, DIM // HEADS).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, DIM))


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GroupedExperts(nn.Module):
    """torchtitan's layout: w1, w3 [experts, hidden, dim], w2 [experts, dim, hidden]."""

    def __init__(self, experts: int) -> None:
        super().__init__()
        self.num_experts = experts
        self.w1 = nn.Parameter(torch.randn(experts, HIDDEN, DIM) * 0.3)
        self.w2 = nn.Parameter(torch.randn(experts, DIM, HIDDEN) * 0.3)
        self.w3 = nn.Parameter(torch.randn(experts, HIDDEN, DIM) * 0.3)

    def forward(self, x, idx, weight, first: int):
        """Tokens x [n, dim] routed to experts idx [n, k] with weights [n, k], through the experts held here
        (global ids first, first + 1, ...); zero rows for tokens routed elsewhere."""
        w1, w2, w3 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1, self.w2, self.w3))
        # Zero terms keep every weight and the dispatched tokens in the graph, as a grouped GEMM does: a rank with no
        # expert (or no token) still gets (empty or zero) gradients and runs the dispatch's backward collectives.
        # (w * 0.0).sum(), not w.sum() * 0.0: the latter's gradient is an expanded view (stride 0), and torch 2.11's
        # DTensor then all-gathers it in backward on that rank alone, which deadlocks the other ranks.
        out = x * 0.0 + sum((w * 0.0).sum() for w in (w1, w2, w3))
        for e in range(w1.shape[0]):
            hit = idx == first + e  # [n, k]
            rows = hit.any(1)
            if not bool(rows.any()):
                continue
            xe = x[rows]
            h = (F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T
            out = out.index_add(0, rows.nonzero()[:, 0], h * (weight * hit).sum(1, keepdim=True)[rows])
        return out


class MoE(nn.Module):
    def __init__(self, experts: int, dead_expert: bool) -> None:
        super().__init__()
        self.router = nn.Linear(DIM, experts, bias=False)
        self.experts = GroupedExperts(experts)
        self.dead_expert = dead_expert  # expert 0 never chosen: its gradient rows are exactly zero
        self.ep_group = None  # set by parallelize

    def forward(self, x):
        b, s, _ = x.shape
        x = x.reshape(b * s, DIM)
        logits = self.router(x)
        if self.dead_expert:
            logits = logits.index_fill(1, torch.tensor([0]), -math.inf)
        weight, idx = torch.softmax(logits, -1).topk(2, dim=-1)
        if self.ep_group is None:
            out = self.experts(x, idx, weight, 0)
        else:
            import torch.distributed as dist

            group = self.ep_group
            r, n = dist.get_rank(group), dist.get_world_size(group)
            idx_all = [torch.empty_like(idx) for _ in range(n)]
            dist.all_gather(idx_all, idx, group=group)
            per = -(-self.experts.num_experts // n)  # Shard(0): torch.chunk's pieces
            both = Gather.apply(torch.cat([x, weight], 1), group)  # one collective (and one in backward)
            out_all = self.experts(both[:, :DIM], torch.cat(idx_all), both[:, DIM:], r * per)
            out = SumAll.apply(out_all, group)[r * x.shape[0]:(r + 1) * x.shape[0]]
        return out.reshape(b, s, DIM)


class Block(nn.Module):
    def __init__(self, experts: int, dead_expert: bool = False) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.attention = Attention()
        self.moe = MoE(experts, dead_expert) if experts else None
        self.feed_forward = None if experts else FeedForward()
        self.skip_moe = False

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        if self.moe is None:
            return x + self.feed_forward(self.ffn_norm(x))
        if self.skip_moe:
            return x
        return x + self.moe(self.ffn_norm(x))


class Model(nn.Module):
    """Layers 0 (dense), 1..3 (MoE). Stage s of `stages` keeps its share of the layers (and the embedding on the
    first stage, the head on the last); stages=1 is the whole model."""

    def __init__(self, stage: int = 0, stages: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleDict(
            {str(i): Block(e, dead_expert=i == 1) for i, e in enumerate((0,) + EXPERTS)}
        )
        self.norm, self.output = nn.RMSNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)
        per = len(self.layers) // stages
        mine = range(stage * per, (stage + 1) * per)
        for i in list(self.layers):
            if int(i) not in mine:
                del self.layers[i]
        self.first, self.last = stage == 0, stage == stages - 1
        if not self.first:
            self.tok_embeddings = None
        if not self.last:
            self.norm = self.output = None

    def forward(self, h):
        if self.first:
            h = self.tok_embeddings(h)
        for layer in self.layers.values():
            h = layer(h)
        if self.last:
            h = self.output(self.norm(h))
        return h


def _batch(dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + dp)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(logits, targets, tokens: int):
    """Summed over this rank's tokens, divided by the global token count (FSDP's own division is off)."""
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum") / tokens


# -----------------------------------------------------------------------------------------------------------
# Parallelism, torchtitan-style


def _sum_gradients(module) -> None:
    """FSDP2 sums the gradients instead of averaging them (the loss is divided by the global token count), with
    plain SUM collectives (gloo has no PREMUL_SUM)."""
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


class Layout:
    """torchtitan's meshes for pp x replicate x fsdp ranks (replicate > 1: HSDP), experts over ep of the fsdp ranks."""

    def __init__(self, pp: int, fsdp: int, ep: int, replicate: int = 1) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.pp, self.fsdp, self.ep, self.efsdp, self.replicate = pp, fsdp, ep, fsdp // ep, replicate
        self.data_parallel = replicate * fsdp
        assert pp * replicate * fsdp == dist.get_world_size()
        world = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("world",))
        dense = world._unflatten(0, (pp, replicate, fsdp), ("pp", "dp_replicate", "fsdp"))
        sparse = world._unflatten(0, (pp, replicate, self.efsdp, ep), ("pp", "dp_replicate", "efsdp", "ep"))
        hsdp = replicate > 1
        self.dense_mesh = dense["dp_replicate", "fsdp"] if hsdp else dense["fsdp"]
        self.expert_mesh = sparse["dp_replicate", "efsdp"] if hsdp else sparse["efsdp"]
        self.ep_mesh = sparse["ep"]
        self.fsdp_group = dense["fsdp"].get_group()
        self.pp_mesh = dense["pp"]
        stage, rep, shard = dense.get_coordinate()
        self.stage, self.dp = stage, rep * fsdp + shard

    def build(self) -> Model:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard, distribute_tensor

        model = Model(self.stage, self.pp)
        ep_only: set = set()
        for block in model.layers.values():
            if block.moe is not None:
                experts = block.moe.experts
                for name, w in list(experts.named_parameters()):
                    setattr(experts, name, nn.Parameter(distribute_tensor(w.data, self.ep_mesh, [Shard(0)])))
                block.moe.ep_group = self.ep_mesh.get_group()
                if self.expert_mesh.size() > 1:
                    # (With one rank there is nothing to shard, and FSDP2 cannot reduce a unit whose shards are all
                    # empty on a rank, "_chunk_cat expects non-empty tensor": the experts stay EP-only DTensors.)
                    _sum_gradients(fully_shard(experts, mesh=self.expert_mesh))
                else:
                    ep_only |= set(experts.parameters())
            _sum_gradients(fully_shard(block, mesh=self.dense_mesh, ignored_params=ep_only))
        _sum_gradients(fully_shard(model, mesh=self.dense_mesh, ignored_params=ep_only))
        return model

    def step(self, model: Model) -> None:
        """Forward and backward of this rank's micro-batch through the pipeline (one micro-batch: stage 0 sends
        its activations to the next stage, which sends their gradient back)."""
        import torch.distributed as dist

        inputs, targets = _batch(self.dp)
        tokens = BATCH * SEQ * self.data_parallel
        pp_ranks = dist.get_process_group_ranks(self.pp_mesh.get_group())
        if model.first and model.last:
            _loss(model(inputs), targets, tokens).backward()
            return
        if model.first:
            h = model(inputs)
            dist.send(h.detach().contiguous(), pp_ranks[self.stage + 1])
            grad = torch.empty_like(h)
            dist.recv(grad, pp_ranks[self.stage + 1])
            h.backward(grad)
        else:
            h = torch.empty(BATCH, SEQ, DIM)
            dist.recv(h, pp_ranks[self.stage - 1])
            h.requires_grad_(True)
            _loss(model(h), targets, tokens).backward()
            dist.send(h.grad.contiguous(), pp_ranks[self.stage - 1])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _set_skip(model: nn.Module, skip: bool) -> None:
    for name, block in model.layers.items():
        if name == "2":
            block.skip_moe = skip


def _by_mesh(params: list) -> list[list]:
    by_mesh: dict = {}
    for q in params:
        if q.grad is not None:
            by_mesh.setdefault(q.grad.device_mesh, []).append(q)
    return list(by_mesh.values())


def _stock_clip_count(params: list, max_norm: float, pp_mesh) -> float:
    """p = 0 as torchtitan would compute it if it could (it divides by p): stock get_total_norm per mesh, the
    counts added and summed over the pipeline stages, then stock clip_grads_with_norm_ per mesh."""
    import torch.distributed as dist

    count = torch.zeros(())
    for qs in _by_mesh(params):
        count += _full(torch.nn.utils.get_total_norm([q.grad for q in qs], 0.0))
    if pp_mesh is not None:
        dist.all_reduce(count, group=pp_mesh.get_group())
    for qs in _by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(qs, max_norm, count)
    return count.item()


def _empty_anywhere(params: list) -> bool:
    """Whether some rank holds an empty local shard (stock torch, and so torchtitan, cannot take an inf norm
    then: "_foreach_norm cannot compute the infinity norm on an empty tensor")."""
    import torch.distributed as dist

    flag = torch.tensor([float(any(q.grad is not None and q.grad.to_local().numel() == 0 for q in params))])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _train(layout: Layout, backend: str) -> list[int]:
    """A few training steps: fusedclip on one sharded copy, torchtitan on another, float64 on the full model."""
    import torch.distributed as dist

    import fusedclip

    tt_clip = _torchtitan_clip()
    ours, theirs = layout.build(), layout.build()
    ref = Model()
    names = [n for n, _ in ours.named_parameters()]
    ref_params = dict(ref.named_parameters())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (ours, theirs, ref)]
    pp_mesh = layout.pp_mesh if layout.pp > 1 else None
    empties_seen: list[int] = []
    for step, p in enumerate(STEPS):
        for m, opt in zip((ours, theirs, ref), opts):
            opt.zero_grad(set_to_none=True)
            _set_skip(m, step == SKIP_STEP)
        for m in (ours, theirs):
            layout.step(m)
        tokens = BATCH * SEQ * layout.data_parallel
        sum(_loss(ref(_batch(d)[0]), _batch(d)[1], tokens) for d in range(layout.data_parallel)).backward()

        # Every sharded gradient is the unsharded model's (the reference below is then the right one).
        mine = {n: q for n, q in zip(names, ours.parameters())}
        for n, q in mine.items():
            r = ref_params[n].grad
            assert (q.grad is None) == (r is None), f"step {step}: {n} has a gradient in one model only"
            if r is not None:
                torch.testing.assert_close(_full(q.grad), r, rtol=1e-4, atol=1e-6, msg=f"step {step} grad {n}")
        if step == SKIP_STEP and any("layers.2.moe" in n for n in names):
            assert all(mine[n].grad is None for n in names if "layers.2.moe" in n)
        meshes = {q.grad.device_mesh for q in ours.parameters() if q.grad is not None}
        if any("moe.experts" in n for n in names):
            assert len(meshes) == 2, meshes  # dense and expert gradients: two meshes in one call

        ref_grads = [q.grad for q in ref.parameters() if q.grad is not None]
        ref_total = ref_total_norm(ref_grads, p)
        max_norm = 0.3 * ref_total
        before = {n: _full(q.grad).clone() for n, q in mine.items() if q.grad is not None}
        total, calls = _collectives(lambda: fusedclip.clip_grad_norm_(
            ours.parameters(), max_norm, p, backend=backend, process_group=pp_mesh))
        expected_calls = 2 if (p == 0 and pp_mesh is not None) else 1
        assert calls == expected_calls, f"step {step} p={p}: {calls} collectives, expected {expected_calls}"
        assert not hasattr(total, "placements") and total.dtype == torch.float32
        _same_on_all_ranks(total, f"step {step} p={p} total")
        _close(total.item(), ref_total, 1e-5, f"step {step} p={p} vs the unsharded float64 reference")
        theirs_params = list(theirs.parameters())
        oracle = True
        empty = math.isinf(p) and _empty_anywhere(theirs_params)
        if empty:
            empties_seen.append(step)
        if p == 0:
            want = _stock_clip_count(theirs_params, max_norm, pp_mesh)
        elif empty or tt_clip is None:
            oracle = False  # torchtitan raises there; theirs is clipped by the reference's total to stay in step
            for qs in _by_mesh(theirs_params):
                torch.nn.utils.clip_grads_with_norm_(qs, max_norm, torch.tensor(ref_total))
        else:
            want = tt_clip(theirs_params, max_norm, p, pp_mesh=pp_mesh, ep_enabled=True).item()
        if oracle:
            _close(total.item(), want, 1e-5, f"step {step} p={p} vs torchtitan")

        coef = min(max_norm / (ref_total + 1e-6), 1.0)
        assert coef < 0.5, coef  # the clip engaged
        ref_coef = max_norm / (total.item() + 1e-6)
        for (n, q), t in zip(mine.items(), theirs.parameters()):
            if q.grad is None:
                assert t.grad is None
                continue
            got = _full(q.grad)
            if oracle:
                torch.testing.assert_close(got, _full(t.grad), rtol=1e-5, atol=1e-7, msg=f"step {step} {n} vs tt")
            torch.testing.assert_close(got, ref_params[n].grad * coef, rtol=1e-4, atol=1e-7, msg=f"step {step} {n}")
            torch.testing.assert_close(got, before[n] * ref_coef, rtol=2e-6, atol=0, msg=f"step {step} {n} scale")
        for r in ref_grads:
            r.mul_(coef)
        for opt in opts:
            opt.step()
    _api_checks(layout, ours, pp_mesh, backend)
    dist.barrier()
    return empties_seen


def _api_checks(layout: Layout, model: Model, pp_mesh, backend: str) -> None:
    """The rest of the API over the same multi-mesh gradients (left by the last step): kept calls (the second call
    over the same gradients finds its layout and plans), GradClipper, clip_grads_with_norm_, clip_and_step and
    unscale_and_clip_grad_norm_, each one collective; then what cannot be combined, refused on every rank with
    nothing touched."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate

    import fusedclip
    from fusedclip import fastpath

    params = list(model.parameters())
    for q in params:  # fresh values, so that every check below clips
        if q.grad is not None:
            q.grad.to_local().mul_(50.0)
    fulls = [_full(q.grad) for q in params if q.grad is not None]
    ref = _stages_total(fulls, pp_mesh)
    pg = {"process_group": pp_mesh, "backend": backend}

    # Kept: the second get_total_norm finds the first one's layout and plans.
    grads = [q.grad for q in params]
    first = fusedclip.get_total_norm(grads, 2.0, **pg)
    hits = fastpath.stats.hits
    again, calls = _collectives(lambda: fusedclip.get_total_norm(grads, 2.0, **pg))
    assert fastpath.stats.hits == hits + 1 and calls == 1, (fastpath.stats.hits - hits, calls)
    assert torch.equal(first, again)
    _close(again.item(), ref, 1e-5, "kept get_total_norm")

    if dist.get_world_size() == 2:  # the Triton kernels (interpreted here) on a kept plan of the local shards
        first = fusedclip.get_total_norm(grads, 2.0, process_group=pp_mesh, backend="triton")
        hits = fastpath.stats.hits
        again = fusedclip.get_total_norm(grads, 2.0, process_group=pp_mesh, backend="triton")
        assert fastpath.stats.hits == hits + 1
        for t in (first, again):
            _close(t.item(), ref, 1e-5, "triton get_total_norm")

    # clip_grads_with_norm_ (twice: the second is kept) and GradClipper (twice), against the float64 reference.
    before = [_full(q.grad).clone() for q in params if q.grad is not None]
    fusedclip.clip_grads_with_norm_(params, ref / 2, first, backend=backend)
    hits = fastpath.stats.hits
    _, calls = _collectives(lambda: fusedclip.clip_grads_with_norm_(params, 1e30, first, backend=backend))
    assert fastpath.stats.hits == hits + 1 and calls == 0, (fastpath.stats.hits - hits, calls)
    for b, q in zip(before, [q for q in params if q.grad is not None]):
        torch.testing.assert_close(_full(q.grad), b * ((ref / 2) / (first.item() + 1e-6)), rtol=2e-6, atol=0)
    clipper = fusedclip.GradClipper(params, 1e-3, **pg)
    totals = [clipper() for _ in range(2)]
    assert fastpath.stats.hits >= hits + 2
    _close(totals[0].item(), ref / 2, 1e-5, "GradClipper")
    _close(totals[1].item(), 1e-3, 1e-4, "GradClipper again (clipped to max_norm)")

    # clip_and_step (a plain SGD: clipped in place, then stepped) and the AMP path with a GradScaler.
    for q in params:
        if q.grad is not None:
            q.grad.to_local().copy_(torch.randn_like(q.grad.to_local()))
    fulls = [_full(q.grad).clone() for q in params if q.grad is not None]
    ref = _stages_total(fulls, pp_mesh)
    weights = [_full(q.detach()).clone() for q in params if q.grad is not None]
    opt = torch.optim.SGD(params, lr=0.1)
    total, calls = _collectives(lambda: fusedclip.clip_and_step(opt, ref / 4, **pg))
    assert calls == 1, calls
    _close(float(_full(total)), ref, 1e-5, "clip_and_step total")
    coef = (ref / 4) / (float(_full(total)) + 1e-6)
    for w, g, q in zip(weights, fulls, [q for q in params if q.grad is not None]):
        torch.testing.assert_close(_full(q.detach()), w - 0.1 * g * coef, rtol=1e-5, atol=1e-6)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # (sets up its scale)
    for q, g in zip([q for q in params if q.grad is not None], fulls):
        q.grad.to_local().copy_(DTensor.from_local(q.grad.to_local(), q.grad.device_mesh, q.grad.placements,
                                                   run_check=False).to_local() * 0 + 8.0 * _local_of(g, q.grad))
    total, calls = _collectives(lambda: fusedclip.unscale_and_clip_grad_norm_(opt, scaler, ref / 4, **pg))
    assert calls == 1, calls
    _close(float(_full(total)), ref, 1e-5, "unscale_and_clip_grad_norm_ total")
    flags = scaler._per_optimizer_states[id(opt)]["found_inf_per_device"]
    assert all(float(f) == 0.0 for f in flags.values()), flags
    for g, q in zip(fulls, [q for q in params if q.grad is not None]):
        torch.testing.assert_close(_full(q.grad), g * coef, rtol=1e-5, atol=1e-7)

    # What cannot be combined: nothing is touched, every rank raises.
    kept = [q.grad.to_local().clone() for q in params if q.grad is not None]
    stage_ranks = dist.get_process_group_ranks(layout.fsdp_group)
    sub = dist.new_group([0])  # (every rank creates it; only rank 0 is in it)
    pp_arg = DeviceMesh.from_group(sub, "cpu") if dist.get_rank() == 0 else sub
    with pytest.raises(ValueError, match="world of ranks|not part of"):
        fusedclip.clip_grad_norm_(params, 1e-3, process_group=pp_arg)
    if layout.pp > 1:  # a gradient on a mesh made on its own over this stage's ranks: another world
        alone = DeviceMesh.from_group(layout.fsdp_group, "cpu")
        odd = nn.Parameter(DTensor.from_local(torch.zeros(3), alone, [Replicate()], run_check=False))
        odd.grad = DTensor.from_local(torch.ones(3), alone, [Replicate()], run_check=False)
        with pytest.raises(ValueError, match=re.escape(f"belongs to a world of ranks {stage_ranks}, but")):
            fusedclip.clip_grad_norm_([*params, odd], 1e-3, process_group=pp_mesh)
    for k, q in zip(kept, [q for q in params if q.grad is not None]):
        assert torch.equal(q.grad.to_local(), k)


def _stages_total(fulls: list[torch.Tensor], pp_mesh) -> float:
    """The float64 2-norm over every pipeline stage's full gradients."""
    import torch.distributed as dist

    mine = torch.tensor([ref_total_norm(fulls, 2.0) ** 2], dtype=torch.float64)
    if pp_mesh is not None:
        dist.all_reduce(mine, group=pp_mesh.get_group())
    return math.sqrt(mine.item())


def _local_of(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's piece of `full` laid out as the DTensor `like`."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def _moe_worker(rank: int, world: int, configs: tuple) -> None:
    for pp, fsdp, ep, *replicate in configs:
        empties = _train(Layout(pp, fsdp, ep, *replicate), "torch")
        if fsdp == 4:  # HIDDEN = 6 over 4 ranks: 2, 2, 2, 0 (and 9 experts over 4: 3, 3, 3, 0)
            assert empties, "no rank held an empty shard: the layout does not test what it says"


def _two(rank: int, world: int) -> None:
    _moe_worker(rank, world, ((1, 2, 2),))


def _four(rank: int, world: int) -> None:
    _moe_worker(rank, world, ((2, 2, 2), (1, 4, 2)))


def _eight(rank: int, world: int) -> None:
    _moe_worker(rank, world, ((2, 4, 4), (1, 4, 2, 2)))  # EP x FSDP x PP; HSDP (2 replicas of FSDP 4) x EP


def test_moe_ep_fsdp_two_ranks():
    launch(_two, 2)


def test_moe_ep_fsdp_pp_four_ranks():
    launch(_four, 4)


def test_moe_ep_fsdp_pp_hsdp_eight_ranks():
    launch(_eight, 8, deadline_s=240)  # 8 processes on CI's 2 cores


def test_moe_host_bench_record():
    """`bench --host --moe` at toy size: the record holds every path, the totals agreed before timing, and
    fusedclip's calls took their kept layouts."""
    from fusedclip import bench

    if WITHOUT_TORCHTITAN:
        pytest.skip("FUSEDCLIP_TEST_WITHOUT_TORCHTITAN=1: the benchmark compares against torchtitan")
    record = bench.run_host_moe(reps=2, warmup=1, layers=2)
    assert record["kind"] == "host-moe" and record["check"]["matched"], record["check"]
    assert record["results"][0]["impl"] == "torchtitan"
    ours = [r for r in record["results"] if r["impl"].startswith("fusedclip")]
    assert {r["path"] for r in ours} == {"clip_grad_norm_", "GradClipper"}
    assert all(r["fast_path_hit_rate"] == 1.0 for r in ours), [(r["impl"], r["fast_path_hit_rate"]) for r in ours]
    assert all(len(r["per_rank_median_us"]) == bench.MOE_WORLD and r["median_us"] > 0 for r in record["results"])
    assert "host time per call" in bench.format_moe_host_table(record)
