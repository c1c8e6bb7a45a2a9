"""Cost of combining sharded force tables under FSDP2: the one all-reduce per log read.

    torchrun --standalone --nproc_per_node=2 bench/distributed_read.py [--layers 4 --hidden 256]

Each rank trains a GPT-NeoX sharded with FSDP2 (``fully_shard`` per block) and InstrumentedAdamW tracking every
step. Measured on rank 0, medians: the training step, ``read_forces`` (local table + ‖W‖² + the all-reduce),
the all-reduce of a table of the same size alone, and the read's share of training time when reading every
``--log-every`` steps. gloo on CPU, NCCL on CUDA.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    add_model_args(p)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = small_neox(args).to(device)
    shard_model(model)
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randint(0, args.vocab, (args.batch // world, args.seq + 1), device=device)

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
        print(f"{world} ranks ({'nccl' if cuda else 'gloo'}), {n:,} params in {table.shape[0]} tracked tensors, "
              f"{torch.get_num_threads()} threads/rank")  # fmt: skip
        print(f"training step            {s:9.2f} ms")
        print(f"read_forces (all-reduce) {r:9.2f} ms")
        print(f"all-reduce alone         {a:9.3f} ms  ({packed.numel() * 8 / 1024:.1f} KiB)")
        print(f"read every {args.log_every} steps: {100 * r / args.log_every / s:.3f}% of training time")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
