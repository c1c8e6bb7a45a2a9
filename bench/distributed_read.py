"""Cost of combining sharded force tables on a read: one all-reduce per process group that shards a tensor.

    torchrun --standalone --nproc_per_node=2 bench/distributed_read.py [--layers 4 --hidden 256]
    torchrun --standalone --nproc_per_node=4 bench/distributed_read.py --mesh fsdp_tp    # 2 x 2: dp x tp
    torchrun --standalone --nproc_per_node=4 bench/distributed_read.py --mesh hsdp       # 2 x 2: replicate x shard

Each rank trains a GPT-NeoX with InstrumentedAdamW tracking every step: ``fsdp`` shards every block with FSDP2 on
one mesh dimension; ``fsdp_tp`` makes each block's MLP tensor parallel (ColwiseParallel in, RowwiseParallel out)
on the "tp" dimension of a 2-D mesh and shards the blocks with FSDP2 on "dp"; ``hsdp`` shards within pairs of
ranks and replicates across them. Measured on rank 0, medians: the training step, ``read_forces`` (local table +
‖W‖² + the all-reduces), one all-reduce of a table of the same size over the whole world, and the read's share
of training time when reading every ``--log-every`` steps. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import add_model_args, small_neox

from instrumented_adamw import InstrumentedAdamW
from train.loop import shard_model


def parallelize(model, mesh: str, device_type: str, world: int) -> int:
    """The model on its mesh; returns the number of data-parallel ways (the batch is split that many times)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if mesh == "fsdp":
        shard_model(model)
        return world
    if world % 2:
        raise SystemExit(f"--mesh {mesh} needs an even number of ranks (a 2-D mesh), got {world}")
    if mesh == "fsdp_tp":
        grid = init_device_mesh(device_type, (world // 2, 2), mesh_dim_names=("dp", "tp"))
        plan = {"dense_h_to_4h": ColwiseParallel(), "dense_4h_to_h": RowwiseParallel()}
        for layer in model.gpt_neox.layers:
            parallelize_module(layer.mlp, grid["tp"], plan)
            fully_shard(layer, mesh=grid["dp"])
        fully_shard(model, mesh=grid["dp"])
        return world // 2
    grid = init_device_mesh(device_type, (2, world // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model.gpt_neox.layers:
        fully_shard(layer, mesh=grid)
    fully_shard(model, mesh=grid)
    return world


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    add_model_args(p)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--mesh", choices=("fsdp", "fsdp_tp", "hsdp"), default="fsdp")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = small_neox(args).to(device)
    data_parallel = parallelize(model, args.mesh, device.type, world)
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randint(0, args.vocab, (args.batch // data_parallel, args.seq + 1), device=device)

    def step():
        logits = model(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    steps, reads, reduces = [], [], []
    table = next(iter(opt._stats.values())).table
    packed = torch.zeros(table.shape[0], table.shape[1] + 1, dtype=torch.float64, device=device)
    for _ in range(args.steps):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        steps.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        opt.read_forces(reset=True)
        reads.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(packed)
        sync()
        reduces.append(time.perf_counter() - t0)
    if rank == 0:
        s, r, a = (statistics.median(v) * 1e3 for v in (steps, reads, reduces))
        n = sum(p.numel() for p in model.parameters())
        groups = len(next(iter(opt._sum_groups.values())))
        print(f"{world} ranks ({'nccl' if cuda else 'gloo'}), mesh {args.mesh}, {n:,} params in {table.shape[0]} "
              f"tracked tensors, {torch.get_num_threads()} threads/rank")  # fmt: skip
        print(f"training step            {s:9.2f} ms")
        print(f"read_forces ({groups} all-reduce{'s' if groups > 1 else ''}) {r:9.2f} ms")
        print(f"all-reduce alone         {a:9.3f} ms  ({packed.numel() * 8 / 1024:.1f} KiB)")
        print(f"read every {args.log_every} steps: {100 * r / args.log_every / s:.3f}% of training time")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
