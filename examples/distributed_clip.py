"""Clip the gradients of an FSDP2-sharded model with fusedclip, on CPU with gloo.

    torchrun --nproc-per-node 2 examples/distributed_clip.py

Each rank clips its own shards; the global norm takes one all-reduce. The script checks the result against
torch.nn.utils.clip_grad_norm_ on an identically sharded copy and prints both totals on rank 0.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import fusedclip


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
    )
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    ours, theirs = build(), build()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    for model in (ours, theirs):
        model(x).square().mean().backward()

    total = fusedclip.clip_grad_norm_(ours.parameters(), max_norm=0.1)  # DTensor gradients in, DTensor total out
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm=0.1)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor())

    # Plain tensors sharded by hand (ZeRO-style flat buffer) plus a tensor every rank holds in full.
    flat = torch.arange(1.0, 101.0).tensor_split(world)[rank]
    shared = torch.full((3,), 0.5)
    flat_total = fusedclip.get_total_norm([flat, shared], process_group=dist.group.WORLD, replicated=[shared])
    reference = torch.linalg.vector_norm(torch.cat([torch.arange(1.0, 101.0), torch.full((3,), 0.5)]))
    torch.testing.assert_close(flat_total, reference)

    if rank == 0:
        print(f"fusedclip total {total.full_tensor().item():.6f}  torch total {expected.full_tensor().item():.6f}")
        print(f"flat buffer total {flat_total.item():.4f} (reference {reference.item():.4f})")
    dist.barrier()
    dist.destroy_process_group()
