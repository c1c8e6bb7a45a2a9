"""Worker for tests/test_distributed.py: a few steps of a small model, single-process, DDP or FSDP2 (gloo, CPU).

    python tests/dist_worker.py MODE OUT.json          (MODE = single)
    torchrun --nproc_per_node=2 tests/dist_worker.py MODE OUT.json   (MODE = ddp | fsdp)

Every rank reads the forces (the FSDP2 read is a collective); rank 0 writes them and the final full parameters.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from instrumented_adamw import InstrumentedAdamW

STEPS, BATCH = 6, 8


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))


def main(mode: str, out: str) -> None:
    rank, world = 0, 1
    if mode != "single":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    net = model()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in (net[0], net[2]):
            fully_shard(layer)
        fully_shard(net)
    opt = InstrumentedAdamW(net.named_parameters(), lr=1e-2, weight_decay=0.1)
    step_model = torch.nn.parallel.DistributedDataParallel(net) if mode == "ddp" else net
    g = torch.Generator().manual_seed(1)
    reads = []
    for step in range(STEPS):
        x = torch.randn(BATCH, 16, generator=g)
        y = torch.randn(BATCH, 16, generator=g)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        torch.nn.functional.mse_loss(step_model(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 3 == 2:
            r = opt.read_forces(reset=True)
            reads.append(dict(interval=r.interval_dict(), last=r.to_dict(), w_sq_now=r.w_sq_now.tolist()))
    full = {}
    for name, p in net.named_parameters():
        full[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().reshape(-1).tolist()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(dict(reads=reads, params=full), fh)
    if mode != "single":
        dist.barrier()  # leave together: a rank destroying the group while its peer still writes can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
