"""The device plan shared by the kernel backends (cuda and triton): what one launch needs to cover any
number of tensors of one device.

A plan is a set of device-resident tables built on the host once per distinct gradient list and cached,
keyed by (address, numel, dtype) of every tensor. It holds no reference to the tensors: only addresses, so a
freed or replaced gradient can never be read through the cache (a new tensor at the same address, size and
dtype is exactly what the cached table describes). The cache is bounded (least recently used first out).

A unit plan (AGC) lists the units of its tensors instead, one contiguous row each: then one launch yields
every unit's norm, or scales every unit by its own coefficient.

Tables (all on the plan's device):
  meta         int64 [3, T]: address, numel, dtype code of each tensor
  chunk_tensor int32 [C]: the tensor each chunk belongs to (chunks are in tensor order)
  chunk_start  int64 [C]: the chunk's first element within its tensor
  tensor_chunks int32 [T + 1]: tensor t owns chunks tensor_chunks[t] .. tensor_chunks[t + 1] - 1
  ticket       int32 [1]: zero between calls; a kernel's "last program done" counter, reset by that program
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import acc_dtype

# The dtype codes both kernel families understand.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
KERNEL_DTYPES = frozenset(DTYPE_CODES)
CACHE_SIZE = 64


def flat_ok(t: Tensor) -> bool:
    """A tensor the kernels can read as one flat, dense array of a supported dtype."""
    return t.layout == torch.strided and t.dtype in KERNEL_DTYPES and t.is_contiguous()


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
    ticket: Tensor
    aliased: bool  # some tensor is listed twice: an in-place kernel would race on it, so scaling goes to torch


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
    return DevicePlan(
        device=device,
        num_tensors=count,
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        acc_dtype=acc,
        meta=meta.to(device),
        chunk_tensor=chunk_tensor.to(torch.int32).to(device),
        chunk_start=chunk_start.to(device),
        tensor_chunks=tensor_chunks.to(torch.int32).to(device),
        ticket=torch.zeros(1, dtype=torch.int32, device=device),
        aliased=aliased,
    )


def _build(tensors: list[Tensor], chunk_size: int) -> DevicePlan:
    addresses = [t.data_ptr() for t in tensors]
    return _tables(
        tensors[0].device,
        torch.tensor(addresses, dtype=torch.int64),
        torch.tensor([t.numel() for t in tensors], dtype=torch.int64),
        torch.tensor([DTYPE_CODES[t.dtype] for t in tensors], dtype=torch.int64),
        chunk_size,
        acc_dtype(t.dtype for t in tensors),
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


class PlanCache:
    """Bounded cache of device plans for one backend."""

    def __init__(self, chunk_size: int, capacity: int = CACHE_SIZE) -> None:
        self.chunk_size = chunk_size
        self.capacity = capacity
        self._plans: OrderedDict[tuple, DevicePlan] = OrderedDict()
        self.builds = 0  # for tests: how many plans were built (host-to-device copies)

    def get(self, tensors: list[Tensor]) -> DevicePlan:
        """The plan for these tensors (all on one device, numel > 0, flat_ok), built on a miss."""
        key = (self.chunk_size, tensors[0].device, tuple((t.data_ptr(), t.numel(), t.dtype) for t in tensors))
        return self._lookup(key, lambda: _build(tensors, self.chunk_size))

    def _lookup(self, key: tuple, build: Callable[[], DevicePlan]) -> DevicePlan:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = build()
        self.builds += 1
        self._plans[key] = plan
        if len(self._plans) > self.capacity:
            self._plans.popitem(last=False)
        return plan

    def get_units(self, tensors: list[Tensor], rows: list[int]) -> DevicePlan:
        """The unit plan of these tensors (all on one device; rows[i] = unit_rows(tensors[i], ...), not None):
        one entry per unit, units in row-major order, tensor 0's first. The key holds everything the tables
        depend on (address, numel, dtype and unit count of every tensor), so it cannot collide with get()'s."""
        key = (
            "units", self.chunk_size, tensors[0].device,
            tuple((t.data_ptr(), t.numel(), t.dtype, r) for t, r in zip(tensors, rows)),
        )
        return self._lookup(key, lambda: _build_units(tensors, rows, self.chunk_size))

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()
