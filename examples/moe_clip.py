"""Clip a mixture-of-experts model trained with expert, data and pipeline parallelism, on CPU with gloo.

    torchrun --nproc-per-node 4 examples/moe_clip.py            # 2 pipeline stages x (FSDP 2, EP 2)
    torchrun --nproc-per-node 2 examples/moe_clip.py --pp 1     # FSDP 2, EP 2

The meshes are laid out as torchtitan lays them out: one world mesh unflattened into a dense mesh ("pp", "fsdp")
and a sparse one ("pp", "efsdp", "ep"). Expert weights are DTensors on the expert-parallel mesh, everything else on
the FSDP mesh, and each rank holds one pipeline stage. Where torchtitan calls

    torchtitan.distributed.utils.clip_grad_norm_(params, max_norm, pp_mesh=pp_mesh, ep_enabled=True)

(two stock get_total_norm calls, a collective per mesh, one over the pipeline stages, two clip_grads_with_norm_
calls), fusedclip takes every mesh in one call, one fused reduction per device and one all-reduce:

    fusedclip.clip_grad_norm_(params, max_norm, process_group=pp_mesh)

The gradients here are made directly on the meshes (no training step: see tests/test_moe_parallel.py for a
model trained this way). The script checks the total against a float64 reference of the full gradients, and the
clipped gradients against it, and prints both on rank 0. With torchtitan installed it checks against its
clip_grad_norm_ too.
"""

import argparse
import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import fusedclip


def moe_gradients(pp: int, layers_per_stage: int = 2, experts: int = 8, dim: int = 12) -> tuple[list, object]:
    """This rank's parameters (its pipeline stage's) with DTensor gradients: dense weights Shard(0) over "fsdp",
    grouped expert weights Shard(0) over "ep" and Shard(1) over "efsdp"; and the pipeline mesh."""
    world = dist.get_world_size()
    fsdp = world // pp
    ep = 2 if fsdp % 2 == 0 else 1
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("world",))
    dense = mesh._unflatten(0, (pp, fsdp), ("pp", "fsdp"))
    sparse = mesh._unflatten(0, (pp, fsdp // ep, ep), ("pp", "efsdp", "ep"))
    stage = dense.get_coordinate()[0]
    params = []
    for layer in range(layers_per_stage):
        gen = torch.Generator().manual_seed(100 * stage + layer)  # every rank of a stage draws the same values
        shapes = [((dim, dim), False)] * 4 + [((dim,), False), ((experts, dim), False)]  # attention, norm, router
        shapes += [((experts, 2 * dim, dim), True), ((experts, dim, 2 * dim), True)]  # grouped experts
        for shape, expert in shapes:
            full = torch.randn(shape, generator=gen)
            if expert:
                grad = distribute_tensor(full, sparse["efsdp", "ep"], [Shard(1), Shard(0)], src_data_rank=None)
            else:
                grad = distribute_tensor(full, dense["fsdp"], [Shard(0)], src_data_rank=None)
            p = torch.nn.Parameter(torch.zeros_like(grad))
            p.grad = grad
            params.append(p)
    return params, dense["pp"]


def main(pp: int) -> dict:
    """Clip on every rank (torch.distributed initialized); returns the totals."""
    rank = dist.get_rank()
    params, pp_mesh = moe_gradients(pp)
    pp_group = pp_mesh if pp > 1 else None

    # The float64 reference: every stage's full gradients (a test's check, not something training needs).
    full = [p.grad.full_tensor().double() for p in params]
    mine = torch.stack([g.square().sum() for g in full]).sum().reshape(1)
    if pp_group is not None:
        dist.all_reduce(mine, group=pp_mesh.get_group())
    reference = math.sqrt(mine.item())

    total = fusedclip.clip_grad_norm_(params, max_norm=1.0, process_group=pp_group)  # every mesh, one all-reduce
    torch.testing.assert_close(total.double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=0)
    coef = 1.0 / (reference + 1e-6)
    for p, g in zip(params, full):
        torch.testing.assert_close(p.grad.full_tensor().double(), g * coef, rtol=1e-5, atol=1e-7)

    titan = None
    try:
        from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip_grad_norm_
    except ImportError:
        pass
    else:  # the same gradients again, clipped by torchtitan
        again, _ = moe_gradients(pp)
        titan = titan_clip_grad_norm_(again, 1.0, pp_mesh=pp_group, ep_enabled=True)
        torch.testing.assert_close(titan, total, rtol=1e-5, atol=0)
        for a, b in zip(again, params):
            torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor(), rtol=1e-5, atol=1e-8)
    meshes = sorted({str(p.grad.device_mesh) for p in params})
    if rank == 0:
        print(f"gradients on {len(meshes)} meshes: {', '.join(meshes)}")
        print(f"fusedclip total {total.item():.6f}  float64 reference {reference:.6f}"
              + (f"  torchtitan {titan.item():.6f}" if titan is not None else "  (torchtitan not installed)"))
    return {"total": total.item(), "reference": reference, "torchtitan": None if titan is None else titan.item(),
            "meshes": len(meshes)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline stages (the world size must be a multiple)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    main(args.pp)
    dist.barrier()
    dist.destroy_process_group()
