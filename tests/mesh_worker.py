"""Worker for tests/test_meshes.py: InstrumentedAdamW on DTensor meshes, 4 gloo ranks, float64.

    torchrun --nproc_per_node=4 tests/mesh_worker.py run OUT_DIR      # every mesh, 10 steps, states saved at 5
    torchrun --nproc_per_node=4 tests/mesh_worker.py resume OUT_DIR   # HSDP and FSDP2 x TP from the step-5 states

Meshes (18-wide model, 36-wide MLP: FSDP shards of 18 rows over 4 ranks are uneven, 5/5/5/3):
- ``tp``: tensor parallel on a 1-D mesh of 4 (ColwiseParallel up, RowwiseParallel down, whose bias is Replicate);
  norms and the head stay plain tensors.
- ``fsdp_tp``: FSDP2 x TP on a 2 x 2 ("dp", "tp") mesh: matrices (_StridedShard, Shard), the MLP's biases
  (Shard, Replicate) and (Shard, Shard), norms and the head on the 1-D "dp" submesh.
- ``hsdp``: fully_shard on a 2 x 2 ("replicate", "shard") mesh: (Replicate, Shard) everywhere.
- every mesh: a 2-element gain sharded with the head (``mixed``: over 4 ranks, so two hold empty shards).
- ``mixed``: the blocks tensor-parallel over pairs of ranks (the "tp" dimension of a 2 x 2 mesh, two copies), norms
  and head fully_shard over all 4 ranks: tensors on different meshes, with different process groups, in one
  optimizer (every rank trains on the whole batch).

Every rank computes the single-process reference too (same seed, same global batch, a plain model). Rank 0 writes
``<mode>.json``: per step, each tensor's last-step forces and the change of ‖W‖² of its ``full_tensor()``; the
reads (interval sums) of the mesh run and of the reference; the all-reduces each read issued, by group; the final
full parameters. ``resume`` writes ``<mode>_resumed.json`` with the reads and parameters after the step-5 state.
``run`` ends with ``muon.json``: InstrumentedMuon + InstrumentedAdamW on FSDP2 x TP beside torch's Muon + AdamW.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.monitor import ForceMonitor

STEPS, SAVE_AT, BATCH, D, H = 10, 5, 8, 18, 36
MODES = ("tp", "fsdp_tp", "hsdp", "mixed")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, H)
        self.down = nn.Linear(H, D)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Head(nn.Module):
    """The output layer and a 2-element gain: sharded over 4 ranks, two of them hold empty shards."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(D, D)
        self.gain = nn.Parameter(torch.tensor([1.0, 0.5]))

    def forward(self, x):
        return self.linear(x) * self.gain.sum()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = Head()

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def build() -> Net:
    torch.manual_seed(0)
    return Net().double()


def parallelize(net: Net, mode: str) -> tuple[Net, int, int]:
    """The model on its mesh; returns it with this rank's data-parallel index and count."""
    tp_plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
    if mode == "tp":
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        for b in net.blocks:
            parallelize_module(b, mesh, tp_plan)
        return net, 0, 1
    if mode == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for b in net.blocks:
            parallelize_module(b, mesh["tp"], tp_plan)
            fully_shard(b, mesh=mesh["dp"])
        fully_shard(net, mesh=mesh["dp"])
        return net, mesh.get_local_rank("dp"), 2
    if mode == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for b in net.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(net, mesh=mesh)
        return net, dist.get_rank(), 4
    if mode == "mixed":
        tp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("copy", "tp"))["tp"]
        dp = init_device_mesh("cpu", (4,), mesh_dim_names=("dp",))
        for b in net.blocks:
            parallelize_module(b, tp, tp_plan)
            fully_shard(b.norm, mesh=dp)
        fully_shard(net.head, mesh=dp)
        return net, 0, 1
    raise ValueError(mode)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def sq_norms(net: Net) -> dict[str, float]:
    return {n: float(full(p.detach()).double().square().sum()) for n, p in net.named_parameters()}


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, D, generator=g, dtype=torch.float64),
             torch.randn(BATCH, D, generator=g, dtype=torch.float64)) for _ in range(STEPS)]  # fmt: skip


class CountingAllReduce:
    """dist.all_reduce, counted by the group's ranks while ``on``."""

    def __init__(self) -> None:
        self.real, self.on, self.calls = dist.all_reduce, False, []

    def __call__(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if self.on:
            self.calls.append(dist.get_process_group_ranks(group) if group is not None else "world")
        return self.real(tensor, op=op, group=group, async_op=async_op)


def train(net: Net, opt, data, dp_index: int, dp_size: int, steps: range, counter=None, norms=False):
    """Steps over the global batches (this rank's data-parallel slice); reads at SAVE_AT and at the end."""
    per_step, reads = [], []
    rows = slice(dp_index * BATCH // dp_size, (dp_index + 1) * BATCH // dp_size)
    for step in steps:
        x, y = data[step]
        before = sq_norms(net) if norms else None
        torch.nn.functional.mse_loss(net(x[rows]), y[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if norms:
            after = sq_norms(net)
            last = opt.last_forces().to_dict()
            per_step.append({n: dict(last[n], delta=after[n] - before[n]) for n in after})
        if step + 1 in (SAVE_AT, STEPS):
            if counter is not None:
                counter.on, counter.calls = True, []
            r = opt.read_forces(reset=True)
            if counter is not None:
                counter.on = False
            reads.append(dict(step=step + 1, interval=r.interval_dict(), w_sq_now=r.w_sq_now.tolist(),
                              all_reduces=list(counter.calls) if counter is not None else None))  # fmt: skip
    return per_step, reads


def optimizer(net: Net) -> InstrumentedAdamW:
    return InstrumentedAdamW(net.named_parameters(), lr=1e-2, weight_decay=0.1, foreach=True)


def run(mode: str, out: Path, counter: CountingAllReduce) -> None:
    data = batches()
    ref_net = build()
    ref_opt = optimizer(ref_net)
    _, ref_reads = train(ref_net, ref_opt, data, 0, 1, range(STEPS))
    net, dp_index, dp_size = parallelize(build(), mode)
    opt = optimizer(net)
    tracked = list(opt.tracked_names)
    head, tail = range(SAVE_AT), range(SAVE_AT, STEPS)
    steps1, reads1 = train(net, opt, data, dp_index, dp_size, head, counter, norms=True)
    if mode in ("hsdp", "fsdp_tp"):  # the state a killed run resumes from
        model_sd, optim_sd = get_state_dict(net, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(out / f"{mode}_state"))
    steps2, reads2 = train(net, opt, data, dp_index, dp_size, tail, counter, norms=True)
    fits = ForceMonitor(opt, net, []).fit(STEPS)["blocks"]  # gathers each matrix: every rank takes part
    ref_fits = ForceMonitor(ref_opt, ref_net, []).fit(STEPS)["blocks"]
    params = {n: full(p.detach()).reshape(-1).tolist() for n, p in net.named_parameters()}
    ref_params = {n: p.detach().reshape(-1).tolist() for n, p in ref_net.named_parameters()}
    placements = {n: str(getattr(p, "placements", "plain")) for n, p in net.named_parameters()}
    if dist.get_rank() == 0:
        record = dict(mode=mode, tracked=tracked, names=[n for n, _ in net.named_parameters()], placements=placements,
                      steps=steps1 + steps2, reads=reads1 + reads2, ref_reads=ref_reads, params=params,
                      ref_params=ref_params, calls=int(opt._calls), fits=fits, ref_fits=ref_fits)  # fmt: skip
        (out / f"{mode}.json").write_text(json.dumps(record))
    dist.barrier()


def resume(mode: str, out: Path) -> None:
    """A fresh process: the model and optimizer from the step-5 state, then steps 6-10 as the first run took them."""
    data = batches()
    net, dp_index, dp_size = parallelize(build(), mode)
    opt = optimizer(net)
    model_sd, optim_sd = get_state_dict(net, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(out / f"{mode}_state"))
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    calls = int(opt._calls)
    opt.read_forces(reset=True)  # the interval starts from the exact norms, as the first run's read at step 5 did
    _, reads = train(net, opt, data, dp_index, dp_size, range(SAVE_AT, STEPS))
    params = {n: full(p.detach()).reshape(-1).tolist() for n, p in net.named_parameters()}
    if dist.get_rank() == 0:
        (out / f"{mode}_resumed.json").write_text(json.dumps(dict(reads=reads, params=params, calls=calls)))
    dist.barrier()


def muon(out: Path) -> None:
    """FSDP2 x TP with InstrumentedMuon on the matrices and InstrumentedAdamW on the rest, beside torch's Muon and
    AdamW on an identically parallelised copy: parameters bitwise torch's, and each step's forces close the change
    of the full tensors' ‖W‖²."""
    from instrumented_adamw import HybridOptimizer, InstrumentedMuon

    data = batches()
    ours, dp_index, dp_size = parallelize(build(), "fsdp_tp")
    theirs, _, _ = parallelize(build(), "fsdp_tp")
    matrices = [(n, p) for n, p in ours.named_parameters() if p.ndim == 2]
    rest = [(n, p) for n, p in ours.named_parameters() if p.ndim != 2]
    opt = HybridOptimizer([InstrumentedMuon(matrices, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                           InstrumentedAdamW(rest, lr=1e-2, weight_decay=0.1, foreach=True)])  # fmt: skip
    ref = [torch.optim.Muon([p for p in theirs.parameters() if p.ndim == 2], lr=1e-2, weight_decay=0.1,
                            adjust_lr_fn="match_rms_adamw"),
           torch.optim.AdamW([p for p in theirs.parameters() if p.ndim != 2], lr=1e-2, weight_decay=0.1,
                             foreach=True)]  # fmt: skip
    rows = slice(dp_index * BATCH // dp_size, (dp_index + 1) * BATCH // dp_size)
    steps = []
    for step in range(4):
        x, y = data[step]
        before = sq_norms(ours)
        for net, opts in ((ours, [opt]), (theirs, ref)):
            torch.nn.functional.mse_loss(net(x[rows]), y[rows]).backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
        after, last = sq_norms(ours), opt.last_forces().to_dict()
        steps.append({n: dict(last[n], delta=after[n] - before[n]) for n in after})
    same = all(torch.equal(full(p.detach()), full(q.detach()))
               for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))  # fmt: skip
    if dist.get_rank() == 0:
        (out / "muon.json").write_text(json.dumps(dict(steps=steps, bitwise=same, tracked=opt.tracked_names,
                                                       names=[n for n, _ in ours.named_parameters()])))  # fmt: skip
    dist.barrier()


def main(what: str, out: str) -> None:
    dist.init_process_group("gloo")
    counter = CountingAllReduce()
    dist.all_reduce = counter  # the optimizer imports torch.distributed lazily and calls dist.all_reduce
    try:
        for mode in MODES if what == "run" else ("hsdp", "fsdp_tp"):
            run(mode, Path(out), counter) if what == "run" else resume(mode, Path(out))
        if what == "run":
            muon(Path(out))
    finally:
        dist.all_reduce = counter.real
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
