"""Distributed clipping: DTensor gradients (FSDP2, tensor and expert parallel, HSDP, N-D meshes, several meshes in
one call) and plain tensors sharded by the caller across process groups (pipeline stages, ZeRO-style buffers).

Every rank runs the fused local path (dispatch/backends) on its local shards, one reduction per device whatever
the number of meshes, and puts its contribution in a small payload; one all-reduce combines the payloads:

- p > 0 finite: the local sum of |x|^p (SUM), then the p-th root;
- +inf / -inf: the local max / min |x| (MAX / MIN), with a NaN flag beside it because MAX/MIN collectives do not
  promise to propagate NaN (gloo's does not);
- p = 0 (torch: the number of tensors with any non-zero entry): for DTensors a per-tensor non-zero flag (SUM
  over the ranks of the tensors' meshes: a tensor counts once however many ranks hold a non-zero piece of it);
  for plain tensors the local count.

A caller's own flag can ride along as one more entry (Call.total_and_flag: GradScaler's per-rank found_inf from
torch's unscale_, made global without a collective of its own).

A contribution that several ranks hold identically (a Replicate mesh dimension, a tensor marked ``replicated``)
is counted on one of them only, the one at coordinate 0 of each tensor's own mesh, so no extra collective is
needed to de-duplicate, and a rank's payload is the sum over the shards it alone holds. That is what lets one
all-reduce cover several meshes at once: gradients on several sub-meshes of one world (expert-parallel experts
and dense weights; FSDP2 + TP + EP; HSDP) that span the same ranks, plus pipeline groups (``process_group=``)
that join those spans into the world, are reduced by one all-reduce over the world (or over the ranks the meshes
span). Where no such common group exists, the call falls back to one all-reduce per distinct rank set of the
meshes and then one per extra group (see `Layout`). p = 0 with DTensors and extra groups takes two: the
per-tensor flags over the meshes, then the count over the groups (the flags of different pipeline stages cannot
be lined up in one payload).

Nothing here reads a value on the host: the collectives run on the device and the total stays there. A call's
layout (meshes, coordinates, which shards count, the groups) is worked out once and kept with the call's plans,
like fusedclip.fastpath's kept plans: a later call over the same gradients only checks that every local shard is
where it was and on the same placement (see `find`). A kept call holds no gradient (so a gradient set to None is
freed, and its successor can take its place) and is keyed on the groups themselves, never on an id that another
object could take.
"""

from __future__ import annotations

import functools
import math
import operator
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import dispatch, fastpath
from .arguments import has_dtensor, is_dtensor
from .backends import acc_dtype, clip_coef

# A process group, a 1-D DeviceMesh, or a sequence of them (e.g. the data-parallel and the pipeline group).
GroupArg = Any
# Tensors (parameters or their gradients) that are identical on every rank of the groups, or a predicate.
ReplicatedArg = Union[Iterable[Tensor], Callable[[Tensor], bool], None]


def needed(tensors: list[Tensor], process_group: GroupArg, replicated: ReplicatedArg = None) -> bool:
    """Whether a call takes the distributed path (where `replicated` without a group is refused)."""
    return process_group is not None or replicated is not None or has_dtensor(tensors)


# ---------------------------------------------------------------------------------------------------------
# Arguments


def _parse(process_group: GroupArg) -> tuple[list, list]:
    """process_group= -> (ProcessGroups, the DeviceMeshes among the items or None each). Raises TypeError or
    ValueError on bad input, naming the item and the fix."""
    if process_group is None:
        return [], []
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    items = list(process_group) if isinstance(process_group, (list, tuple)) else [process_group]
    if not items:
        raise ValueError("process_group must be a ProcessGroup, a 1-D DeviceMesh or a non-empty sequence of them")
    if not dist.is_initialized():
        raise RuntimeError("process_group= needs torch.distributed to be initialized (dist.init_process_group)")
    groups, meshes = [], []
    for i, g in enumerate(items):
        name = f"process_group[{i}]" if len(items) > 1 else "process_group"
        if isinstance(g, DeviceMesh):
            if g.ndim != 1:
                raise ValueError(
                    f"{name} is a {g.ndim}-D DeviceMesh; pass a 1-D mesh (mesh['name'] or "
                    "mesh._flatten()) or its process group"
                )
            if g.get_coordinate() is None:
                raise ValueError(
                    f"{name} is a DeviceMesh this rank (global rank {dist.get_rank()}) is not part of: pass each "
                    "rank the group of its own pipeline peers, e.g. world_mesh['pp']"
                )
            groups.append(g.get_group())
            meshes.append(g)
        elif isinstance(g, dist.ProcessGroup):
            groups.append(g)
            meshes.append(None)
        elif isinstance(g, int) and g == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"{name} is a group this rank (global rank {dist.get_rank()}) is not part of (dist.new_group "
                "returns that to the ranks outside the group): pass each rank the group of its own pipeline peers, "
                "e.g. world_mesh['pp'] or the new_group that contains it"
            )
        else:
            raise TypeError(
                f"{name} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(g).__name__}"
            )
    return groups, meshes


def parse_groups(process_group: GroupArg) -> list:
    """process_group= -> list of ProcessGroups (empty for None). Raises TypeError/ValueError on bad input."""
    return _parse(process_group)[0]


def parse_replicated(replicated: ReplicatedArg, groups: list) -> Callable[[Tensor, Tensor], bool]:
    """replicated= -> predicate(owner, tensor): owner is the parameter (clip functions) or the tensor itself."""
    if replicated is None:
        return lambda owner, t: False
    if not groups:
        raise ValueError("replicated= marks tensors replicated across process_group; pass process_group= too")
    if callable(replicated) and not isinstance(replicated, Tensor):
        pred = replicated
        return lambda owner, t: bool(pred(owner))
    items = [replicated] if isinstance(replicated, Tensor) else None
    if items is None:
        try:
            items = list(replicated)
        except TypeError:
            raise TypeError(
                "replicated must be a collection of tensors (parameters or gradients) or a predicate, got "
                f"{type(replicated).__name__}"
            ) from None
    for i, x in enumerate(items):
        if not isinstance(x, Tensor):
            raise TypeError(f"replicated[{i}] is a {type(x).__name__}, not a Tensor")
    ids = {id(x) for x in items}
    return lambda owner, t: id(owner) in ids or id(t) in ids


# ---------------------------------------------------------------------------------------------------------
# Meshes and placements


def _placement_types():
    from torch.distributed.tensor import placement_types as pt

    shard = (pt.Shard,) + ((pt._StridedShard,) if hasattr(pt, "_StridedShard") else ())
    return shard, pt.Replicate


def _ranks(mesh) -> tuple[int, ...]:
    """The global ranks a mesh spans (this rank's slice of a sliced mesh)."""
    return tuple(sorted(mesh.mesh.flatten().tolist()))


def _world(mesh) -> tuple[int, ...]:
    """The ranks of the mesh's root: the world it is a sub-mesh of (itself if it was made on its own)."""
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    return _ranks(root)


def _group_ranks(group) -> tuple[int, ...]:
    import torch.distributed as dist

    return tuple(sorted(dist.get_process_group_ranks(group)))


def _check_one_world(meshes: list, group_meshes: list) -> None:
    """Every mesh of a call must be a sub-mesh of one world (slices, flattenings or unflattenings of one root
    mesh, or meshes over the same ranks): ValueError otherwise. Decided from the meshes' layouts, which every rank
    holding them knows alike, before any collective."""
    worlds = [(m, _world(m), "a gradient's mesh") for m in meshes]
    worlds += [(m, _world(m), "the process_group mesh") for m in group_meshes if m is not None]
    first = worlds[0]
    for m, w, what in worlds[1:]:
        if w != first[1]:
            raise ValueError(
                f"{what} {m} belongs to a world of ranks {list(w)}, but {first[2]} {first[0]} to one of ranks "
                f"{list(first[1])}: one call combines meshes cut from one world (slices or _unflatten of one "
                "init_device_mesh). Build every mesh from one world mesh, or call get_total_norm once per world "
                "and clip with clip_grads_with_norm_"
            )


def _mesh_groups(mesh) -> list:
    """Groups whose successive all-reduces reduce over the whole mesh: one group whenever possible."""
    import torch.distributed as dist

    if mesh.ndim == 1:
        return [mesh.get_group()]
    if mesh.size() == dist.get_world_size():
        return [dist.group.WORLD]
    if mesh.mesh_dim_names and hasattr(mesh, "_flatten"):
        try:
            return [mesh._flatten().get_group()]
        except Exception:  # private API: fall back to one all-reduce per mesh dimension
            pass
    return [mesh.get_group(d) for d in range(mesh.ndim)]


def _counts_on_mesh(placements: Sequence, coord: Sequence[int]) -> bool:
    """Whether this rank's piece counts: Shard pieces are disjoint and count everywhere; a Replicate dimension
    (or a Partial one, which the norm reads redistributed to Replicate) counts at coordinate 0 only."""
    shard, _ = _placement_types()
    return all(c == 0 for c, p in zip(coord, placements) if not isinstance(p, shard))


def _norm_local(t: Tensor) -> Tensor:
    """The local tensor whose norm is this rank's share. Any placement other than Shard and Replicate (Partial:
    the gradient is a reduction of the local values, whose norm is not the sum of their norms) is first
    redistributed to Replicate on that dimension: torch's own way, a collective, never a wrong answer."""
    shard, replicate = _placement_types()
    placements = tuple(t.placements)
    if all(isinstance(p, shard + (replicate,)) for p in placements):
        return t._local_tensor
    fixed = [p if isinstance(p, shard + (replicate,)) else replicate() for p in placements]
    return t.redistribute(t.device_mesh, fixed).to_local()


def _plain_placements(t: Tensor) -> bool:
    shard, replicate = _placement_types()
    return all(isinstance(p, shard + (replicate,)) for p in t.placements)


# ---------------------------------------------------------------------------------------------------------
# The layout of a call: what does not change while the gradients stay where they are


@dataclass
class _Span:
    """The tensors whose meshes span one set of ranks, and the groups that reduce over that set."""

    ranks: tuple[int, ...]
    meshes: list
    positions: list[int]
    counted: list[int] = field(default_factory=list)  # the positions that count on this rank for p > 0
    _groups: Optional[list] = None

    @property
    def groups(self) -> list:
        """Made at first use: a flattened mesh's group is created then, and only the calls that reduce over the
        span itself need one (a pipeline grid reduces over the world)."""
        if self._groups is None:
            one_d = [m for m in self.meshes if m.ndim == 1]
            self._groups = [one_d[0].get_group()] if one_d else _mesh_groups(self.meshes[0])
        return self._groups

    def plan_kind(self, counted: bool) -> bool:
        """Which of the span's plans a norm over its counted (or all) positions reads: counted only where some
        position does not count here (else both are the plan over all of them)."""
        return counted and len(self.counted) != len(self.positions)


@dataclass
class Layout:
    """How a distributed call over a list of gradients is reduced.

    `spans`: the call's DTensors grouped by the ranks their mesh spans (sorted: every rank takes its collectives in
    the same order); none for plain tensors. `extra`: the groups of process_group=. `common`: the groups whose
    successive all-reduces cover every span and every extra group at once (one group in the common case), or None
    where none exists: then each span is reduced over its own groups, the results combined, and the extra groups
    reduced in turn.
    """

    count: int  # tensors in the call's list
    dtensor: bool
    mesh: Any  # the one mesh of every DTensor (the total is then returned as a DTensor on it), or None
    counted: list[int]  # positions that count on this rank for p > 0 (not a replica held elsewhere too)
    counts_extra: list[bool]  # per position: counts within the extra groups (a marked replica at their rank 0 only)
    spans: list[_Span]
    extra: list
    common_: Union[list, _Span, None]  # the common groups, or the one span whose groups they are (made at first use)
    plain_placements: bool  # every DTensor is Shard/Replicate: the norm reads the local tensors as they are
    device: torch.device
    dtype: torch.dtype
    _cache: dict = field(default_factory=dict)  # index tensors made once

    @property
    def common(self) -> Optional[list]:
        return self.common_.groups if isinstance(self.common_, _Span) else self.common_


def make_layout(
    owners: list[Tensor], tensors: list[Tensor], process_group: GroupArg, replicated: ReplicatedArg
) -> Layout:
    """The layout of a call (raises ValueError/TypeError/RuntimeError on what cannot be combined, on every rank
    that sees it alike: only the meshes' layouts and the arguments are read, before any collective)."""
    import torch.distributed as dist

    groups, group_meshes = _parse(process_group)
    is_replicated = parse_replicated(replicated, groups)
    dts = [is_dtensor(t) for t in tensors]
    if any(dts) and not all(dts):
        raise ValueError(
            "some gradients are DTensors and some plain tensors; pass them in separate calls (a plain "
            "tensor's relation to the mesh is not known)"
        )
    dtensor = bool(tensors) and dts[0]
    me = dist.get_rank() if dist.is_initialized() else 0
    spans: list[_Span] = []
    counted_mesh = [True] * len(tensors)
    mesh = None
    if dtensor:
        by_mesh: dict = {}
        for i, t in enumerate(tensors):
            by_mesh.setdefault(t.device_mesh, []).append(i)
        meshes = list(by_mesh)
        _check_one_world(meshes, group_meshes)
        by_ranks: dict[tuple[int, ...], _Span] = {}
        for m, positions in by_mesh.items():
            coord = m.get_coordinate()
            if coord is None:
                raise ValueError(
                    f"this rank (global rank {me}) holds gradients on {m}, a mesh it is not part of; pass each rank "
                    "its own gradients"
                )
            for i in positions:
                counted_mesh[i] = _counts_on_mesh(tensors[i].placements, coord)
            ranks = _ranks(m)
            span = by_ranks.get(ranks)
            if span is None:
                span = by_ranks[ranks] = _Span(ranks, [], [])
            span.meshes.append(m)
            span.positions.extend(positions)
        spans = [by_ranks[r] for r in sorted(by_ranks)]
        for s in spans:
            s.positions.sort()
        mesh = meshes[0] if len(meshes) == 1 else None
    first_in_groups = all(dist.get_rank(g) == 0 for g in groups)
    counts_extra = [first_in_groups or not is_replicated(o, t) for o, t in zip(owners, tensors)]
    counted = [i for i in range(len(tensors)) if counted_mesh[i] and counts_extra[i]]
    counted_set = set(counted)
    for s in spans:
        s.counted = [i for i in s.positions if i in counted_set]
    locals_ = [t._local_tensor if d else t for t, d in zip(tensors, dts)]
    if locals_:
        device = locals_[0].device
    else:
        device = _group_device(groups[0]) if groups else torch.device("cpu")
    return Layout(
        count=len(tensors),
        dtensor=dtensor,
        mesh=mesh,
        counted=counted,
        counts_extra=counts_extra,
        spans=spans,
        extra=groups,
        common_=_common_groups(spans, groups),
        plain_placements=not dtensor or all(_plain_placements(t) for t in tensors),
        device=device,
        dtype=acc_dtype(t.dtype for t in locals_),
    )


def _common_groups(spans: list[_Span], extra: list) -> Union[list, _Span, None]:
    """Groups whose all-reduce covers every span and extra group at once, or None (then: one per span and group).

    One span and no extra group: the span's own groups (one group whenever the mesh allows). Otherwise the ranks
    must tile the world as a grid, as pipeline stages and their peer groups do: the span and each extra group
    meet at this rank only, and the product of their sizes is the world size. Then the world is the union of
    every rank taking part, and one all-reduce over it adds each rank's own contribution exactly once. These are
    facts about the group sizes and this rank's own groups, alike on every rank of a regular layout.
    """
    import torch.distributed as dist

    if len(spans) > 1:
        return None
    if not extra:
        return spans[0] if spans else []
    if not spans and len(extra) == 1:
        return list(extra)
    sets = [set(spans[0].ranks)] if spans else []
    sets += [set(_group_ranks(g)) for g in extra]
    if any(len(a & b) != 1 for k, a in enumerate(sets) for b in sets[k + 1:]):
        return None
    if math.prod(len(s) for s in sets) != dist.get_world_size():
        return None
    return [dist.group.WORLD]


def _group_device(group) -> torch.device:
    """Where a rank with no tensors builds its payload: the group's collective device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# One call


class Call:
    """A distributed call over one list of gradients: its layout, this call's local tensors and their plans."""

    def __init__(
        self, layout: Layout, norm_locals: list[Tensor], scale_locals: list[Tensor], backend: Optional[str],
        foreach: Optional[bool], plan_all: Optional[dispatch.Plan] = None, plan_counted: Optional[dispatch.Plan] = None,
        span_plans: Optional[Callable[[int, bool], dispatch.Plan]] = None,
    ) -> None:
        self.layout = layout
        self.norm_locals = norm_locals
        self.scale_locals = scale_locals
        self.backend = backend
        self.foreach = foreach
        self._plan_all = plan_all  # every non-empty local: the inf norms, the p = 0 flags, the scale pass
        self._plan_counted = plan_counted  # the counted ones: the p > 0 sums
        self._span_source = span_plans  # a kept call's per-span plans (see span_plan)
        self._span_plans: dict = {}

    # -- plans (made at first use in a call that was not kept)

    def _plan_over(self, positions: Iterable[int]) -> dispatch.Plan:
        """A plan over the locals at `positions`, empty ones left out (the kept entries of _remember are made over
        the same non-empty ones)."""
        mine = (self.norm_locals[i] for i in positions)
        return dispatch.make_plan([t for t in mine if t.numel()], self.backend, self.foreach)

    def plan_all(self) -> dispatch.Plan:
        if self._plan_all is None:
            self._plan_all = self._plan_over(range(len(self.norm_locals)))
        return self._plan_all

    def plan_counted(self) -> dispatch.Plan:
        if self._plan_counted is None:
            lay = self.layout
            if len(lay.counted) == lay.count:
                self._plan_counted = self.plan_all()
            else:
                self._plan_counted = self._plan_over(lay.counted)
        return self._plan_counted

    def scale_plan(self) -> dispatch.Plan:
        if self.norm_locals is self.scale_locals:
            return self.plan_all()
        return dispatch.make_plan(self.scale_locals, self.backend, self.foreach)

    def _norm(self, plan: dispatch.Plan, p: float) -> Tensor:
        lay = self.layout
        if not plan.count:
            return torch.zeros((), dtype=lay.dtype, device=lay.device)
        total, _ = dispatch.total_norm(plan, p)
        return total.to(device=lay.device, dtype=lay.dtype)

    def span_plan(self, k: int, counted: bool) -> dispatch.Plan:
        """The plan over span k's non-empty locals (its counted ones if `counted`), for the per-span norms of a
        layout without a common group: a kept call's, from its kept entries; else made at first use."""
        span = self.layout.spans[k]
        counted = span.plan_kind(counted)
        plan = self._span_plans.get((k, counted))
        if plan is None:
            if self._span_source is not None:
                plan = self._span_source(k, counted)
            else:
                plan = self._plan_over(span.counted if counted else span.positions)
            self._span_plans[(k, counted)] = plan
        return plan

    # -- the total

    def total(self, p: float) -> Tensor:
        """The global total on this rank's device (a plain tensor, the same value on every rank)."""
        return self.total_and_flag(p, None)[0]

    def total_and_flag(self, p: float, flag: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(the global total, `flag`'s max over every rank, or None without one). `flag` (this rank's 0/1, 0-d)
        rides as one more entry of the total's own payloads, so it takes no collective of its own; every rank must
        pass one or none alike (the payloads' lengths must agree)."""
        import torch.distributed as dist

        lay = self.layout
        slot = None if flag is None else flag.to(device=lay.device, dtype=lay.dtype).reshape(1)
        if p == 0:
            return self._count(slot)
        if math.isinf(p):
            op = dist.ReduceOp.MAX if p > 0 else dist.ReduceOp.MIN
            slot = slot if slot is None or p > 0 else -slot  # (MIN-reduced: the flag as -flag)
            if lay.common is not None or not lay.spans:
                payload = _with(self._inf_payload(self.plan_all(), p), slot)
                combined = _reduce(payload, op, lay.common if lay.common is not None else [])
            else:
                parts = [
                    _reduce(_with(self._inf_payload(self.span_plan(k, False), p), slot), op, s.groups)
                    for k, s in enumerate(lay.spans)
                ]
                combined = torch.stack(parts).amax(0) if p > 0 else torch.stack(parts).amin(0)
            if lay.common is None:
                combined = _reduce(combined, op, lay.extra)
            value, found = _split(combined, slot)
            return self._inf_value(value, p), found if found is None or p > 0 else -found
        op = dist.ReduceOp.SUM
        if lay.common is not None:
            payload = _reduce(_with(self._norm(self.plan_counted(), p).pow(p).reshape(1), slot), op, lay.common)
        else:
            if lay.spans:
                parts = [
                    _reduce(_with(self._norm(self.span_plan(k, True), p).pow(p).reshape(1), slot), op, s.groups)
                    for k, s in enumerate(lay.spans)
                ]
                payload = torch.stack(parts).sum(0)
            else:
                payload = _with(self._norm(self.plan_counted(), p).pow(p).reshape(1), slot)
            payload = _reduce(payload, op, lay.extra)
        value, found = _split(payload, slot)
        return value[0].pow(1.0 / p), found

    def _inf_payload(self, plan: dispatch.Plan, p: float) -> Tensor:
        """The inf norm of `plan`'s locals as a payload: [max, nan] for +inf; [min, -nan, -has] for -inf (MIN-reduced:
        has < 0 where some rank holds elements)."""
        lay = self.layout
        local, has = self._norm(plan, p), plan.count > 0
        nan = local.isnan().to(lay.dtype)
        if p > 0:
            return torch.stack([torch.where(nan > 0, torch.zeros_like(local), local), nan])
        if not has:
            local = torch.full((), math.inf, dtype=lay.dtype, device=lay.device)
        flag = torch.full((), -1.0 if has else 0.0, dtype=lay.dtype, device=lay.device)
        return torch.stack([torch.where(nan > 0, torch.full_like(local, math.inf), local), -nan, flag])

    @staticmethod
    def _inf_value(payload: Tensor, p: float) -> Tensor:
        if p > 0:
            return torch.where(payload[1] > 0, torch.full_like(payload[0], math.nan), payload[0])
        value = torch.where(payload[2] < 0, payload[0], torch.zeros_like(payload[0]))  # no elements anywhere: 0
        return torch.where(payload[1] < 0, torch.full_like(value, math.nan), value)

    def _count(self, slot: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """p = 0: DTensors: per-tensor non-zero flags summed over each span (a tensor counts once if any piece is
        non-zero), then counted; plain tensors: the local count. `slot`: total_and_flag's flag (SUM-reduced)."""
        import torch.distributed as dist

        lay = self.layout
        op = dist.ReduceOp.SUM
        norms = self._per_tensor_norms()
        mask = self._index("mask", lambda: torch.tensor(lay.counts_extra, device=lay.device))
        if not lay.dtensor:
            payload = _with((norms.ne(0) & mask).sum().to(lay.dtype).reshape(1), slot)
            count, found = _split(_reduce(payload, op, lay.common if lay.common is not None else lay.extra), slot)
            return count[0], found
        if lay.common is not None and not lay.extra:
            flags, found = _split(_reduce(_with(norms.ne(0).to(lay.dtype), slot), op, lay.common), slot)
            return (flags.ne(0) & mask).sum().to(lay.dtype), found
        counts = []
        for k, s in enumerate(lay.spans):
            idx = self._index(("span", k), lambda s=s: torch.tensor(s.positions, device=lay.device))
            flags, found = _split(_reduce(_with(norms.index_select(0, idx).ne(0).to(lay.dtype), slot), op, s.groups),
                                  slot)
            counts.append(_with((flags.ne(0) & mask.index_select(0, idx)).sum().to(lay.dtype).reshape(1), found))
        count, found = _split(_reduce(torch.stack(counts).sum(0), op, lay.extra), slot)
        return count[0], found

    def _per_tensor_norms(self) -> Tensor:
        """One norm per position (0 for zero-size locals), from one fused reduction."""
        lay = self.layout
        plan = self.plan_all()
        if not plan.count:
            return torch.zeros(lay.count, dtype=lay.dtype, device=lay.device)
        _, norms = dispatch.total_norm(plan, 0.0, per_tensor=True)
        norms = norms.to(device=lay.device, dtype=lay.dtype)  # type: ignore[union-attr]
        if plan.count == lay.count:
            return norms
        nonempty = self._index(
            ("nonempty", plan.count),
            lambda: torch.tensor([i for i, t in enumerate(self.norm_locals) if t.numel()], device=lay.device),
        )
        return torch.zeros(lay.count, dtype=lay.dtype, device=lay.device).index_copy_(0, nonempty, norms)

    def _index(self, key: Any, make: Callable[[], Tensor]) -> Tensor:
        """A small tensor of the layout's, made once (a per-call upload to a GPU would be a host sync)."""
        cache = self.layout._cache
        t = cache.get(key)
        if t is None:
            t = cache[key] = make()
        return t

    # -- the API's calls

    def clip(self, max_norm: Optional[float], p: float, error_if_nonfinite: bool) -> Tensor:
        """The total over every rank, wrapped as torch returns it; the local shards are clipped unless max_norm is
        None."""
        total = self.total(p)
        if error_if_nonfinite:
            total = dispatch.check_finite(total, p)
        if max_norm is not None and self.scale_locals:
            self.scale_(clip_coef(total, max_norm))
        return self.wrap(total, p)

    def scale_(self, factor: Tensor) -> None:
        dispatch.scale_(self.scale_plan(), factor)

    def wrap(self, total: Tensor, p: float) -> Tensor:
        """The total as torch returns it for DTensor inputs on one mesh: a DTensor on the mesh, Replicate for
        finite p and Partial(max/min) for +/-inf (holding the global value, so .full_tensor() gives it exactly).
        Gradients on several meshes (which torch cannot combine) get a plain tensor holding the global value."""
        mesh = self.layout.mesh
        if mesh is None:
            return total
        from torch.distributed.tensor import DTensor, Partial, Replicate

        if math.isinf(p):
            placement = Partial("max" if p > 0 else "min")
        else:
            placement = Replicate()
        return DTensor.from_local(total, mesh, [placement] * mesh.ndim, run_check=False)


def _reduce(payload: Tensor, op, groups: list) -> Tensor:
    import torch.distributed as dist

    for g in groups:
        dist.all_reduce(payload, op=op, group=g)
    return payload


def _with(payload: Tensor, slot: Optional[Tensor]) -> Tensor:
    """A payload with total_and_flag's flag as its last entry (none without one)."""
    return payload if slot is None else torch.cat([payload, slot])


def _split(payload: Tensor, slot: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """_with undone after the reduction: (the payload, the reduced flag or None)."""
    return (payload, None) if slot is None else (payload[:-1], payload[-1])


def _full_value(total: Tensor) -> Tensor:
    """A DTensor total -> a plain tensor holding the global value (free for Replicate, a collective otherwise)."""
    from torch.distributed.tensor import Replicate

    if all(isinstance(p, Replicate) for p in total.placements):  # type: ignore[attr-defined]
        return total.to_local()  # type: ignore[attr-defined]
    return total.full_tensor()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------
# Kept calls: the steady state of a training loop


_UNKEPT = object()


def _replicated_key(replicated: ReplicatedArg) -> Any:
    """replicated= as part of a kept call's key: a predicate by itself (the key holds it: no other object takes its
    id while the entry lives); tensors by the set of their ids, which the entry's weak references confirm
    (_Kept.replicated_alive: while they all live, no other tensor has one of those ids); _UNKEPT for anything else
    (a one-pass iterable, read here, would leave nothing for the call)."""
    if replicated is None:
        return None
    if isinstance(replicated, Tensor):
        return frozenset((id(replicated),))
    if callable(replicated):
        return ("predicate", replicated)
    if isinstance(replicated, (list, tuple, set, frozenset)):
        return frozenset(map(id, replicated))
    return _UNKEPT


def _key(grads: bool, backend: Optional[str], foreach: Optional[bool], count: int, process_group: GroupArg,
         replicated: ReplicatedArg) -> Optional[tuple]:
    """The key of a kept call, or None where the call cannot be kept. The groups are keyed by themselves and held by
    the key: a DeviceMesh compares by value (world_mesh["pp"] is a new, equal mesh each time), a ProcessGroup by
    identity."""
    rep = _replicated_key(replicated)
    if rep is _UNKEPT:
        return None
    groups = tuple(process_group) if isinstance(process_group, (list, tuple)) else process_group
    key = (grads, backend, foreach, count, isinstance(process_group, (list, tuple)), groups, rep)
    try:
        hash(key)
    except TypeError:  # (an unhashable predicate, or a bad argument the general path reports)
        return None
    return key


_spec = operator.attrgetter("_spec")


class _Kept:
    """A kept distributed call: its layout, the placements (DTensorSpec) of every gradient, and fastpath entries
    over its non-empty local shards (all of them; the counted ones if fewer; per span where the layout has no
    common group). It holds no gradient: a gradient set to None is freed, and the next one can take its place."""

    __slots__ = ("layout", "specs", "absent", "nonempty", "sub", "entry_all", "entry_counted", "spans", "empty",
                 "replicated")

    def __init__(self, layout: Layout, specs: Optional[list], absent: Optional[list], nonempty: Optional[list],
                 sub: Optional[list], entry_all: fastpath.Entry, entry_counted: Optional[fastpath.Entry],
                 spans: Optional[dict], replicated: Optional[list]) -> None:
        self.layout = layout
        self.specs = specs  # the gradients' placements (DTensorSpec), or None (plain tensors)
        self.absent = absent  # per element: no gradient there; None when every element had one
        self.nonempty = nonempty  # positions of non-empty locals, None when all are
        self.sub = sub  # positions (in the non-empty list) of the counted ones, None when all count
        self.entry_all = entry_all
        self.entry_counted = entry_counted
        self.spans = spans  # (span, counted) -> (entry or None, positions in the non-empty list); None: not needed
        self.empty = dispatch.make_plan([], None)  # the plan over no local (nothing counts on this rank)
        self.replicated = replicated  # weak references to the tensors of replicated=, or None

    def replicated_alive(self) -> bool:
        """Whether every tensor of the kept replicated= still lives (then a call whose tensors have the same ids
        passes the same tensors)."""
        return self.replicated is None or all(r() is not None for r in self.replicated)

    def _plan_of(self, entry: Optional[fastpath.Entry], nonempty: list, sub: list[int]) -> dispatch.Plan:
        """An entry's plan over nonempty[i] for i in sub (a subset of the list entry_all just checked)."""
        return self.empty if entry is None else entry.plan_of([nonempty[i] for i in sub])

    def call(self, items: list, grads: bool, backend: Optional[str], foreach: Optional[bool]) -> Optional[Call]:
        pair = fastpath.grads_and_locals(items) if grads and self.specs is not None else None
        if pair is not None:  # (C++: the .grad getter of a DTensor parameter is slow in Python)
            found, local = pair
        else:
            try:
                found = [p.grad for p in items] if grads else items
            except AttributeError:
                return None
            local = None
        if self.absent is not None:
            if [g is None for g in found] != self.absent:
                return None
            found = [g for g in found if g is not None]
            local = None if local is None else [t for t in local if t is not None]
        if self.specs is not None:
            try:
                specs = list(map(_spec, found))
            except AttributeError:  # a plain tensor or None where a DTensor was
                return None
            if len(specs) != len(self.specs):
                return None
            if not all(map(operator.is_, specs, self.specs)):
                if specs != self.specs:  # new gradient objects (set_to_none) pass on equal placements
                    return None
                self.specs = specs
            if local is None or len(local) != len(found):
                local = [g._local_tensor for g in found]  # (the fastpath check below proves where each one is)
        else:
            local = found
        nonempty = local if self.nonempty is None else [local[i] for i in self.nonempty]
        plan_all = self.entry_all.plan_for(nonempty)
        if plan_all is None:
            return None
        plan_counted = plan_all
        if self.sub is not None:  # (the counted shards are among those just checked)
            plan_counted = self._plan_of(self.entry_counted, nonempty, self.sub)
        spans = None if self.spans is None else functools.partial(self._span_plan, nonempty)
        return Call(self.layout, local, local, backend, foreach, plan_all, plan_counted, spans)

    def _span_plan(self, nonempty: list, k: int, counted: bool) -> dispatch.Plan:
        entry, sub = self.spans[(k, counted)]  # type: ignore[index]
        return self._plan_of(entry, nonempty, sub)


_kept: OrderedDict[tuple, _Kept] = OrderedDict()
KEPT = 16  # distributed calls kept (one per list, process group and backend), least recently used first out


def find(items: Any, grads: bool, backend: Optional[str], foreach: Optional[bool], process_group: GroupArg,
         replicated: ReplicatedArg) -> Optional[Call]:
    """The kept call over `items` (parameters if `grads`, else tensors) if every gradient is where it was, on the
    same placement, with the same groups; None otherwise (the caller takes the general path). Outside tracing."""
    if not _kept or type(items) not in (list, tuple):
        return None
    key = _key(grads, backend, foreach, len(items), process_group, replicated)
    entry = None if key is None else _kept.get(key)
    if entry is None:
        return None
    call = entry.call(items, grads, backend, foreach) if entry.replicated_alive() else None
    if call is None:
        fastpath.stats.misses += 1
        return None
    fastpath.stats.hits += 1
    return call


def _sub_entry(present: list[Tensor], sub: list[int], plan: dispatch.Plan, backend: Optional[str],
               foreach: Optional[bool]) -> tuple[bool, Optional[fastpath.Entry]]:
    """(whether it qualifies, a fastpath entry over present[i] for i in sub, made from `plan`: None where sub is
    empty)."""
    if not sub:
        return True, None
    entry = fastpath.make_entry([present[i] for i in sub], False, backend, foreach, plan)
    return entry is not None, entry


def _remember(items: Any, grads: bool, backend: Optional[str], foreach: Optional[bool], process_group: GroupArg,
              replicated: ReplicatedArg, call: Call, tensors: list[Tensor]) -> None:
    """Keep `call` for the next calls over the same gradients, when its plans qualify (one device, one backend,
    plain dense locals; every DTensor Shard/Replicate)."""
    lay = call.layout
    if torch.compiler.is_compiling() or type(items) not in (list, tuple) or not lay.plain_placements:
        return
    if not all(type(t) is Tensor or is_dtensor(t) for t in tensors):
        return
    key = _key(grads, backend, foreach, len(items), process_group, replicated)
    if key is None:
        return
    local = call.norm_locals
    nonempty = [i for i, t in enumerate(local) if t.numel()]
    plan_all = call.plan_all()
    if plan_all.single is None or not nonempty:
        return
    present = [t for t in local if t.numel()]
    entry_all = fastpath.make_entry(present, False, backend, foreach, plan_all)
    if entry_all is None:
        return
    where = {pos: k for k, pos in enumerate(nonempty)}
    entry_counted = sub = None
    if len(lay.counted) != lay.count:
        sub = [where[i] for i in lay.counted if i in where]
        ok, entry_counted = _sub_entry(present, sub, call.plan_counted(), backend, foreach)
        if not ok:
            return
    spans: Optional[dict] = None
    if lay.common_ is None and lay.spans:  # the per-span norms without a common group: entries made once
        spans = {}
        for k, s in enumerate(lay.spans):
            for counted in {s.plan_kind(False), s.plan_kind(True)}:  # the plans Call.span_plan asks for
                span_sub = [where[i] for i in (s.counted if counted else s.positions) if i in where]
                ok, entry = _sub_entry(present, span_sub, call.span_plan(k, counted), backend, foreach)
                if not ok:
                    return
                spans[(k, counted)] = (entry, span_sub)
    absent = [g is None for g in ([p.grad for p in items] if grads else items)]
    rep_refs = None
    if replicated is not None and not callable(replicated):
        rep_refs = [weakref.ref(t) for t in ([replicated] if isinstance(replicated, Tensor) else replicated)]
    _kept[key] = _Kept(
        lay, [t._spec for t in tensors] if lay.dtensor else None, absent if any(absent) else None,
        None if len(nonempty) == len(local) else nonempty, sub, entry_all, entry_counted, spans, rep_refs,
    )
    _kept.move_to_end(key)
    while len(_kept) > KEPT:
        _kept.popitem(last=False)


def clear() -> None:
    """Forget every kept call (tests, the benchmark)."""
    _kept.clear()


def prepare(items: Any, grads: bool, tensors: list[Tensor], backend: Optional[str], foreach: Optional[bool],
            process_group: GroupArg, replicated: ReplicatedArg) -> Call:
    """The general path's call over `tensors` (the present gradients of the parameters `items` if `grads`, else
    the tensors of `items`): the layout worked out (errors raised here, before any collective or any gradient is
    touched), then kept for the next calls over the same gradients."""
    owners = [q for q in items if q.grad is not None] if grads else tensors  # what replicated= names
    layout = make_layout(owners, tensors, process_group, replicated)
    if layout.dtensor:
        scale_locals = [t._local_tensor for t in tensors]
        norm_locals = scale_locals if layout.plain_placements else [_norm_local(t) for t in tensors]
    else:
        norm_locals = scale_locals = tensors
    call = Call(layout, norm_locals, scale_locals, backend, foreach)
    _remember(items, grads, backend, foreach, process_group, replicated, call, tensors)
    return call


def find_or_prepare(items: Any, grads: bool, tensors: list[Tensor], backend: Optional[str], foreach: Optional[bool],
                    process_group: GroupArg, replicated: ReplicatedArg) -> Call:
    """The call over `items`: the kept one if find has it, else the general path's (see prepare). The clip functions
    look before validating their other arguments (find), and prepare after."""
    call = find(items, grads, backend, foreach, process_group, replicated)
    return call if call is not None else prepare(items, grads, tensors, backend, foreach, process_group, replicated)


# ---------------------------------------------------------------------------------------------------------
# The API's distributed paths (called by fusedclip.clip with validated arguments)


def total_value(total_norm: Union[Tensor, float], device: torch.device) -> Tensor:
    """A total as clip_grads_with_norm_ takes it (a number, a tensor, a DTensor) -> a plain tensor holding the
    global value."""
    if is_dtensor(total_norm):
        return _full_value(total_norm)  # type: ignore[arg-type]
    if not isinstance(total_norm, Tensor):
        return torch.tensor(float(total_norm), device=device)
    return total_norm


def clip_grads_with_norm_(
    items: list, grads: list[Tensor], max_norm: float, total_norm: Union[Tensor, float], foreach: Optional[bool],
    backend: Optional[str],
) -> None:
    """Scale each gradient's local shard by the coefficient of the global total (scaling is linear, so this is
    right for every placement and every mesh). DTensors on Shard/Replicate placements of one world are kept as a
    call (see find); anything else is scaled as it is."""
    local = [g._local_tensor if is_dtensor(g) else g for g in grads]
    call = None
    if has_dtensor(grads) and all(map(is_dtensor, grads)) and all(map(_plain_placements, grads)):
        try:
            call = prepare(items, True, grads, backend, foreach, None, None)
        except ValueError:  # meshes of several worlds: nothing to combine here, scale them as they are
            pass
    coef = clip_coef(total_value(total_norm, local[0].device), max_norm)
    if call is not None:
        call.scale_(coef)
    else:
        dispatch.scale_(dispatch.make_plan(local, backend, foreach), coef)
