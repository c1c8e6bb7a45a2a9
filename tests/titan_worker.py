"""Worker for tests/test_torchtitan.py: torchtitan's own components on CPU (gloo), with the instrumented optimizers.

    torchrun --nproc_per_node=2 tests/titan_worker.py fsdp OUT_DIR       # dp_shard=2

torchtitan's debug Llama 3 (``model_registry("debugmodel")``), parallelised by torchtitan's ``parallelize_llama``
from a ``ParallelDims``, its optimizers built by :class:`InstrumentedOptimizersContainer` from a
``ParamGroupConfig`` naming ``InstrumentedAdamW``, checkpointed through the container's flat DCP state dict, and
logged through :class:`ForceMetricsProcessor`. What torchtitan's trainer does on a GPU and this worker does
instead on CPU: meshes built on "cpu"; no device memory statistics; FlexAttention (no backward on CPU) replaced
by causal SDPA; FSDP's
gradient reduction as a plain sum (gloo has no PREMUL_SUM; torchtitan already divides by the global token count
itself, as the loss here does). Rank 0 writes ``OUT_DIR/<mode>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
import torchtitan.components.metrics as metrics_module
import torchtitan.distributed.parallel_dims as parallel_dims_module
from torch.distributed.fsdp import FSDPModule
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.llama3 import model_registry
from torchtitan.models.llama3.parallelize import parallelize_llama

from instrumented_adamw.torchtitan import ForceMetricsProcessor, InstrumentedOptimizersContainer

STEPS, SAVE_AT, BATCH, SEQ, VOCAB = 6, 3, 4, 16, 2048


def _causal_sdpa(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **kwargs):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=enable_gqa)  # fmt: skip
    return out.transpose(1, 2)


class _CpuMemoryMonitor:
    """torchtitan's DeviceMemoryMonitor reads CUDA memory statistics; on CPU there are none to log."""

    device_name = "cpu"

    def reset_peak_stats(self) -> None:
        pass

    def get_peak_stats(self):
        return metrics_module.DeviceMemStats(0.0, 0.0, 0.0, 0.0, 0, 0)


def full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def build(mode: str):
    if mode != "fsdp":
        raise ValueError(f"mode {mode!r}: torchtitan 0.3.0 applies tensor parallelism through sharding configs its "
                         "trainer attaches on GPU; FSDP2 x TP itself is tests/mesh_worker.py's")  # fmt: skip
    world, tp = dist.get_world_size(), 1
    parallelism = ParallelismConfig(spmd_backend="partial_dtensor")
    dims = ParallelDims(dp_replicate=1, dp_shard=world // tp, cp=1, tp=tp, pp=1, ep=1, world_size=world,
                        spmd_backend="partial_dtensor")  # fmt: skip
    dims.build_mesh()
    spec = model_registry("debugmodel", attn_backend="flex")
    torch.manual_seed(0)
    model = spec.model.build()
    model.init_weights() if hasattr(model, "init_weights") else None
    training = TrainingConfig()
    training.mixed_precision_param = "float32"
    model = parallelize_llama(model, parallel_dims=dims, training=training, parallelism=parallelism,
                              compile_config=CompileConfig(), ac_config=None, dump_folder="/tmp")  # fmt: skip
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
    config = InstrumentedOptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=".*", optimizer_name="InstrumentedAdamW", optimizer_kwargs=dict(lr=1e-3, weight_decay=0.1)
            )
        ],  # fmt: skip
        implementation="foreach",
    )
    return model, config.build(model_parts=[model]), dims


def batches(dims):
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]
    dp = dims.dp_shard
    rank = dist.get_rank() // dims.tp  # ranks of one TP group share the data
    rows = slice(rank * BATCH // dp, (rank + 1) * BATCH // dp)
    return [t[rows] for t in tokens]


def train_step(model, opts, x) -> None:
    logits = model(x[:, :-1])
    # torchtitan's loss: summed over the local tokens, divided by the global count (FSDP sums the gradients)
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="sum")
    (loss / (BATCH * SEQ)).backward()
    opts.step()
    opts.zero_grad()


def run(mode: str, out: Path) -> None:
    model, opts, dims = build(mode)
    (opt,) = opts.instrumented
    data = batches(dims)
    processor = ForceMetricsProcessor.Config(log_freq=3, weibull_every=3, save_tb_folder="tb").build(
        parallel_dims=dims, dump_folder=str(out / mode)
    )
    processor.optimizers, processor.model_parts, processor.num_flops_per_token = opts, [model], 1
    logged = []
    processor.logger.log = lambda metrics, step: logged.append(dict(metrics, step=step))  # what TB/wandb get
    closure = []
    for step in range(STEPS):
        before = {n: float(full(p.detach()).double().square().sum()) for n, p in model.named_parameters()}
        train_step(model, opts, data[step])
        processor.ntokens_since_last_log += BATCH * SEQ  # what torchtitan's trainer counts between logs
        processor.data_loading_times.append(0.0)
        after = {n: float(full(p.detach()).double().square().sum()) for n, p in model.named_parameters()}
        last = opt.last_forces().to_dict()
        closure.append({n: dict(last[n], delta=after[n] - before[n], w_sq_after=after[n]) for n in after})
        if step + 1 == SAVE_AT:
            dcp.save({"optimizer": opts.state_dict(), "model": {n: p for n, p in model.state_dict().items()}},
                     checkpoint_id=str(out / f"{mode}_state"))  # fmt: skip
        if processor.should_log(step + 1):
            processor.log(step + 1, 0.0, 0.0, 0.0)
    params = {n: full(p.detach()).reshape(-1).tolist()[:64] for n, p in model.named_parameters()}
    resumed = resume(mode, out, data)
    processor.close()
    if dist.get_rank() == 0:
        names = [n for n, _ in model.named_parameters()]
        placements = {n: str(getattr(p, "placements", "plain")) for n, p in model.named_parameters()}
        (out / f"{mode}.json").write_text(json.dumps(dict(
            names=names, tracked=opt.tracked_names, group_names=opt.param_groups[0]["param_names"],
            placements=placements, closure=closure, logged=logged, params=params, resumed=resumed,
            calls=int(opt._calls), jsonl=sorted(p.name for p in (out / mode / "forces").glob("*.jsonl")),
        ), default=float))  # fmt: skip
    dist.barrier()


def resume(mode: str, out: Path, data) -> dict:
    """New model and container from the step-SAVE_AT checkpoint, then the remaining steps."""
    model, opts, _ = build(mode)
    (opt,) = opts.instrumented
    state = {"optimizer": opts.state_dict(), "model": {n: p for n, p in model.state_dict().items()}}
    calls_before_load = int(opt._calls)
    dcp.load(state, checkpoint_id=str(out / f"{mode}_state"))
    opts.load_state_dict(state["optimizer"])
    model.load_state_dict(state["model"])
    calls = int(opt._calls)
    for step in range(SAVE_AT, STEPS):
        train_step(model, opts, data[step])
    params = {n: full(p.detach()).reshape(-1).tolist()[:64] for n, p in model.named_parameters()}
    return dict(calls_before_load=calls_before_load, calls=calls, params=params, steps=int(opt._calls))


def main(mode: str, out: str) -> None:
    parallel_dims_module.device_type = "cpu"
    metrics_module.build_device_memory_monitor = _CpuMemoryMonitor
    FlexAttention.forward = _causal_sdpa
    dist.init_process_group("gloo")
    try:
        run(mode, Path(out))
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
