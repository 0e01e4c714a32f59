"""Distributed clipping: DTensor gradients (FSDP2, tensor parallel, N-D meshes) and plain tensors sharded by the
caller across process groups.

Every rank runs the fused local path (dispatch/backends) on its local shards and puts its contribution in a
small payload; one all-reduce per group combines the payloads:

- p > 0 finite: the local sum of |x|^p (SUM), then the p-th root;
- +inf / -inf: the local max / min |x| (MAX / MIN), with a NaN flag beside it because MAX/MIN collectives do not
  promise to propagate NaN (gloo's does not);
- p = 0 (torch: the number of tensors with any non-zero entry): for DTensors a per-tensor non-zero flag (SUM
  over the mesh: a tensor counts once however many ranks hold a non-zero piece of it); for plain tensors the
  local count.

A contribution that several ranks hold identically (a Replicate mesh dimension, a tensor marked ``replicated``)
is counted on one of them only, the one at coordinate 0, so no extra collective is needed to de-duplicate.
Nothing here reads a value on the host: the collectives run on the device and the total stays there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import dispatch
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


def parse_groups(process_group: GroupArg) -> list:
    """process_group= -> list of ProcessGroups (empty for None). Raises TypeError/ValueError on bad input."""
    if process_group is None:
        return []
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    items = list(process_group) if isinstance(process_group, (list, tuple)) else [process_group]
    if not items:
        raise ValueError("process_group must be a ProcessGroup, a 1-D DeviceMesh or a non-empty sequence of them")
    out = []
    for i, g in enumerate(items):
        if isinstance(g, DeviceMesh):
            if g.ndim != 1:
                raise ValueError(
                    f"process_group[{i}] is a {g.ndim}-D DeviceMesh; pass a 1-D mesh (mesh['name'] or "
                    "mesh._flatten()) or its process group"
                )
            out.append(g.get_group())
        elif isinstance(g, dist.ProcessGroup):
            out.append(g)
        else:
            raise TypeError(
                f"process_group{'[%d]' % i if len(items) > 1 else ''} must be a torch.distributed ProcessGroup or a "
                f"1-D DeviceMesh, got {type(g).__name__}"
            )
    if not dist.is_initialized():
        raise RuntimeError("process_group= needs torch.distributed to be initialized (dist.init_process_group)")
    return out


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


def common_mesh(dtensors: list[Tensor]):
    """The one mesh every DTensor lives on; ValueError naming the meshes otherwise (raised on every rank alike,
    before any collective, so no rank is left waiting)."""
    mesh = dtensors[0].device_mesh
    for i, t in enumerate(dtensors):
        m = t.device_mesh
        if m is not mesh and m != mesh:
            raise ValueError(
                f"gradients live on different device meshes ({mesh} and, for tensor {i}, {m}); one call combines "
                "the gradients of one mesh. Call get_total_norm once per mesh, combine the totals yourself, and "
                "clip with clip_grads_with_norm_, or put every parameter on one mesh"
            )
    return mesh


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


def _dtensor_local(t: Tensor, coord: Sequence[int]) -> tuple[Tensor, bool]:
    """(local tensor whose norm is this rank's share, whether it counts on this rank).

    Shard pieces are disjoint and count everywhere; a Replicate dimension counts at coordinate 0 only. Any other
    placement (Partial: the gradient is a reduction of the local values, whose norm is not the sum of their norms)
    is first redistributed to Replicate on that dimension: torch's own way, a collective, never a wrong answer.
    """
    shard, replicate = _placement_types()
    placements = tuple(t.placements)
    if not all(isinstance(p, shard + (replicate,)) for p in placements):
        fixed = [p if isinstance(p, shard + (replicate,)) else replicate() for p in placements]
        t = t.redistribute(t.device_mesh, fixed)
        placements = tuple(fixed)
    counts = all(c == 0 for c, p in zip(coord, placements) if isinstance(p, replicate))
    return t.to_local(), counts


# ---------------------------------------------------------------------------------------------------------
# The reduction


class _Call:
    """The local side of one distributed call: local tensors, which of them count here, and the groups."""

    def __init__(
        self,
        owners: list[Tensor],
        tensors: list[Tensor],
        process_group: GroupArg,
        replicated: ReplicatedArg,
    ) -> None:
        groups = parse_groups(process_group)
        is_replicated = parse_replicated(replicated, groups)
        dts = [is_dtensor(t) for t in tensors]
        if any(dts) and not all(dts):
            raise ValueError(
                "some gradients are DTensors and some plain tensors; pass them in separate calls (a plain "
                "tensor's relation to the mesh is not known)"
            )
        self.mesh = common_mesh(tensors) if tensors and dts[0] else None
        # Counting on the extra groups: a replicated tensor on group rank 0 only.
        import torch.distributed as dist

        first_in_groups = all(dist.get_rank(g) == 0 for g in groups)
        coord = self.mesh.get_coordinate() if self.mesh is not None else None
        if self.mesh is not None and coord is None:
            raise RuntimeError("this rank is not part of the gradients' device mesh")
        self.locals: list[Tensor] = []
        self.counts: list[bool] = []  # counts on this rank within the mesh
        self.counts_extra: list[bool] = []  # counts on this rank within the extra groups
        for owner, t in zip(owners, tensors):
            if self.mesh is not None:
                local, counts = _dtensor_local(t, coord)  # type: ignore[arg-type]
            else:
                local, counts = t, True
            self.locals.append(local)
            self.counts.append(counts)
            self.counts_extra.append(first_in_groups or not is_replicated(owner, t))
        self.groups = groups
        self.mesh_groups = _mesh_groups(self.mesh) if self.mesh is not None else []
        self.scale_locals = [t for t in (o.to_local() if is_dtensor(o) else o for o in tensors)]
        if self.locals:
            self.device = self.locals[0].device
        else:
            self.device = _group_device(groups[0]) if groups else torch.device("cpu")
        self.dtype = acc_dtype(t.dtype for t in self.locals)

    def total(self, p: float, backend: Optional[str], foreach: Optional[bool]) -> Tensor:
        """The global total on this rank's device (a plain tensor, the same value on every rank)."""
        import torch.distributed as dist

        if p == 0:
            op = dist.ReduceOp.SUM
            if self.mesh is not None:
                # Per-tensor non-zero flags, summed over the mesh: a tensor counts once if any piece is non-zero.
                flags = self._per_tensor_norms(p, backend, foreach).ne(0).to(self.dtype)
                flags = self._reduce(flags, op, self.mesh_groups)
                mask = torch.tensor(self.counts_extra, device=self.device)
                payload = (flags.ne(0) & mask).sum().to(self.dtype).reshape(1)
            else:
                norms = self._per_tensor_norms(p, backend, foreach)
                mask = torch.tensor(self.counts_extra, device=self.device)
                payload = (norms.ne(0) & mask).sum().to(self.dtype).reshape(1)
            return self._reduce(payload, op, self.groups)[0]
        if math.isinf(p):
            # Replicas change neither a max nor a min: every local tensor takes part.
            everything = [t for t in self.locals if t.numel() > 0]
            local = self._norm(everything, p, backend, foreach)
            nan = local.isnan().to(self.dtype)
            if p > 0:
                op = dist.ReduceOp.MAX
                payload = torch.stack([torch.where(nan > 0, torch.zeros_like(local), local), nan])
            else:
                op = dist.ReduceOp.MIN
                if not everything:
                    local = torch.full((), math.inf, dtype=self.dtype, device=self.device)
                has = torch.full((), -1.0 if everything else 0.0, dtype=self.dtype, device=self.device)
                payload = torch.stack([torch.where(nan > 0, torch.full_like(local, math.inf), local), -nan, has])
            payload = self._reduce(self._reduce(payload, op, self.mesh_groups), op, self.groups)
            if p > 0:
                return torch.where(payload[1] > 0, torch.full_like(payload[0], math.nan), payload[0])
            value = torch.where(payload[2] < 0, payload[0], torch.zeros_like(payload[0]))  # no elements anywhere: 0
            return torch.where(payload[1] < 0, torch.full_like(value, math.nan), value)
        counted = [
            t for t, c, e in zip(self.locals, self.counts, self.counts_extra) if c and e and t.numel() > 0
        ]
        payload = self._norm(counted, p, backend, foreach).pow(p).reshape(1)
        payload = self._reduce(payload, dist.ReduceOp.SUM, self.mesh_groups)
        payload = self._reduce(payload, dist.ReduceOp.SUM, self.groups)
        return payload[0].pow(1.0 / p)

    def _norm(self, tensors: list[Tensor], p: float, backend: Optional[str], foreach: Optional[bool]) -> Tensor:
        if not tensors:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        total, _ = dispatch.total_norm(dispatch.make_plan(tensors, backend, foreach), p)
        return total.to(device=self.device, dtype=self.dtype)

    def _per_tensor_norms(self, p: float, backend: Optional[str], foreach: Optional[bool]) -> Tensor:
        if not self.locals:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        _, norms = dispatch.total_norm(dispatch.make_plan(self.locals, backend, foreach), p, per_tensor=True)
        return norms.to(device=self.device, dtype=self.dtype)  # type: ignore[union-attr]

    @staticmethod
    def _reduce(payload: Tensor, op, groups: list) -> Tensor:
        import torch.distributed as dist

        for g in groups:
            dist.all_reduce(payload, op=op, group=g)
        return payload

    def wrap(self, total: Tensor, p: float) -> Tensor:
        """The total as torch returns it for DTensor inputs: a DTensor on the mesh, Replicate for finite p and
        Partial(max/min) for +/-inf (holding the global value, so .full_tensor() gives it exactly)."""
        if self.mesh is None:
            return total
        from torch.distributed.tensor import DTensor, Partial, Replicate

        if math.isinf(p):
            placement = Partial("max" if p > 0 else "min")
        else:
            placement = Replicate()
        return DTensor.from_local(total, self.mesh, [placement] * self.mesh.ndim, run_check=False)


def _group_device(group) -> torch.device:
    """Where a rank with no tensors builds its payload: the group's collective device."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _full_value(total: Tensor) -> Tensor:
    """A DTensor total -> a plain tensor holding the global value (free for Replicate, a collective otherwise)."""
    from torch.distributed.tensor import Replicate

    if all(isinstance(p, Replicate) for p in total.placements):  # type: ignore[attr-defined]
        return total.to_local()  # type: ignore[attr-defined]
    return total.full_tensor()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------
# The API's distributed paths (called by fusedclip.clip with validated arguments)


def get_total_norm(
    owners: list[Tensor],
    tensors: list[Tensor],
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: Optional[bool],
    backend: Optional[str],
    process_group: GroupArg,
    replicated: ReplicatedArg,
) -> Tensor:
    return clip_grad_norm_(
        owners, tensors, None, norm_type, error_if_nonfinite, foreach, backend, process_group, replicated
    )


def clip_grad_norm_(
    owners: list[Tensor],
    grads: list[Tensor],
    max_norm: Optional[float],
    norm_type: float,
    error_if_nonfinite: bool,
    foreach: Optional[bool],
    backend: Optional[str],
    process_group: GroupArg,
    replicated: ReplicatedArg,
) -> Tensor:
    """The total over every rank; the local shards are clipped too unless max_norm is None."""
    call = _Call(owners, grads, process_group, replicated)
    total = call.total(norm_type, backend, foreach)
    if error_if_nonfinite:
        total = dispatch.check_finite(total, norm_type)
    if max_norm is not None and call.scale_locals:
        dispatch.scale_(dispatch.make_plan(call.scale_locals, backend, foreach), clip_coef(total, max_norm))
    return call.wrap(total, norm_type)


def clip_grads_with_norm_(
    grads: list[Tensor], max_norm: float, total_norm: Tensor, foreach: Optional[bool], backend: Optional[str]
) -> None:
    """Scale each gradient's local shard by the coefficient of the global total (scaling is linear, so this is
    right for every placement)."""
    if is_dtensor(total_norm):
        total_norm = _full_value(total_norm)
    local = [g.to_local() if is_dtensor(g) else g for g in grads]
    dispatch.scale_(dispatch.make_plan(local, backend, foreach), clip_coef(total_norm, max_norm))
