"""The device plan shared by the kernel backends (cuda and triton): what one launch needs to cover any
number of tensors of one device.

A plan is a set of device-resident tables built on the host once per distinct gradient list and cached,
keyed by (address, numel, dtype) of every tensor. It holds no reference to the tensors: only addresses, so a
freed or replaced gradient can never be read through the cache (a new tensor at the same address, size and
dtype is exactly what the cached table describes). The cache is bounded (least recently used first out).

Tables (all on the plan's device):
  meta         int64 [3, T]: address, numel, dtype code of each tensor
  chunk_tensor int32 [C]: the tensor each chunk belongs to (chunks are in tensor order)
  chunk_start  int64 [C]: the chunk's first element within its tensor
  tensor_chunks int32 [T + 1]: tensor t owns chunks tensor_chunks[t] .. tensor_chunks[t + 1] - 1
  ticket       int32 [1]: zero between calls; a kernel's "last program done" counter, reset by that program
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

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


def _build(tensors: list[Tensor], chunk_size: int) -> DevicePlan:
    device = tensors[0].device
    numels = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    addresses = [t.data_ptr() for t in tensors]
    meta = torch.stack(
        [
            torch.tensor(addresses, dtype=torch.int64),
            numels,
            torch.tensor([DTYPE_CODES[t.dtype] for t in tensors], dtype=torch.int64),
        ]
    )
    counts = (numels + chunk_size - 1) // chunk_size
    tensor_chunks = torch.zeros(len(tensors) + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=tensor_chunks[1:])
    num_chunks = int(tensor_chunks[-1])
    chunk_tensor = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int64), counts)
    chunk_start = (torch.arange(num_chunks, dtype=torch.int64) - tensor_chunks[chunk_tensor]) * chunk_size
    return DevicePlan(
        device=device,
        num_tensors=len(tensors),
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        acc_dtype=acc_dtype(t.dtype for t in tensors),
        meta=meta.to(device),
        chunk_tensor=chunk_tensor.to(torch.int32).to(device),
        chunk_start=chunk_start.to(device),
        tensor_chunks=tensor_chunks.to(torch.int32).to(device),
        ticket=torch.zeros(1, dtype=torch.int32, device=device),
        aliased=len(set(addresses)) < len(addresses),
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
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        plan = _build(tensors, self.chunk_size)
        self.builds += 1
        self._plans[key] = plan
        if len(self._plans) > self.capacity:
            self._plans.popitem(last=False)
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()
