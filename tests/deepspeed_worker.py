"""DeepSpeed runs on CPU (``DS_ACCELERATOR=cpu``, gloo), launched by tests/test_deepspeed.py with torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/deepspeed_worker.py MODE STAGES OUT

STAGES: comma-separated ZeRO stages, run one after the other in the same processes (each a new engine on a new
model: on CPU the launches, not the runs, cost the time). MODE: ``run`` (STEPS steps, with
``engine.save_checkpoint`` and the monitor's state after the first half) or ``resume`` (new processes:
``engine.load_checkpoint`` of that checkpoint, then the second half). A tiny GPT-NeoX in fp32 with two param groups
(decayed matrices, undecayed norms and biases), InstrumentedAdamW as DeepSpeed's client optimizer, a read every
step. Rank 0 writes ``OUT/<mode>_stage<S>.json``: per step, each tensor's forces, and ‖W‖² before and after the
step of the gathered fp32 parameters (DeepSpeed's ``safe_get_full_fp32_param``: the independent check), plus the
optimizer's counters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from instrumented_adamw import InstrumentedAdamW, unwrap_optimizer  # noqa: E402
from instrumented_adamw.monitor import ForceMonitor  # noqa: E402
from instrumented_adamw.sinks import JsonlSink  # noqa: E402
from tests.models import tiny_model  # noqa: E402

STEPS = 6
LR, WD = 3e-3, 0.1


def full_sq_norms(model, stage: int) -> dict[str, float]:
    """‖W‖² of every parameter from the gathered fp32 master weights (a collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p) if stage > 0 else p.detach()
        out[name] = float(full.double().pow(2).sum())
    return out


def main(mode: str, stages: list[int], out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in stages:
        one_run(mode, stage, out)


def one_run(mode: str, stage: int, out: Path) -> None:
    rank = dist.get_rank()
    model = tiny_model("gpt_neox", seed=0)
    decayed = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
    other = [(n, p) for n, p in model.named_parameters() if p.dim() < 2]
    groups = [
        {"params": [p for _, p in decayed], "param_names": [n for n, _ in decayed], "weight_decay": WD},
        {"params": [p for _, p in other], "param_names": [n for n, _ in other], "weight_decay": 0.0},
    ]
    opt = InstrumentedAdamW(groups, lr=LR, weight_decay=WD)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, ds_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    ours = unwrap_optimizer(ds_opt)
    assert ours is opt, type(ds_opt)
    ckpt = out / f"ckpt_stage{stage}"
    first = 0
    if mode == "resume":
        engine.load_checkpoint(str(ckpt))
        first = STEPS // 2
    last = STEPS
    # The resumed run appends to a copy of the first run's logs (the test makes it), from the checkpoint's step.
    logs = out / (f"resumed_stage{stage}" if mode == "resume" else f"logs_stage{stage}")
    sinks = [JsonlSink(logs, resume_step=first)] if rank == 0 else []
    monitor = ForceMonitor(ds_opt, model, sinks, log_every=1)
    if mode == "resume":
        monitor.load_state_dict(json.loads((out / f"monitor_state_stage{stage}.json").read_text()))
    records = []
    for step in range(first, last):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, 96, (2, 12), generator=g)
        before = full_sq_norms(model, stage)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        after = full_sq_norms(model, stage)
        reading = monitor.read(step + 1)
        monitor.write(reading, loss=float(loss.detach()))
        forces = reading.forces["tensors"]
        records.append({"step": step + 1, "forces": forces, "before": before, "after": after,
                        "calls": int(ours._calls)})  # fmt: skip
        if mode == "run" and step + 1 == STEPS // 2:
            engine.save_checkpoint(str(ckpt))
            if rank == 0:
                (out / f"monitor_state_stage{stage}.json").write_text(json.dumps(monitor.state_dict()))
    monitor.close()
    if rank == 0:
        names = [n for n, _ in model.named_parameters()]
        state = {"records": records, "names": names, "tracked": ours.tracked_names, "world": dist.get_world_size(),
                 "flat_shapes": [list(p.shape) for g in ours.param_groups for p in g["params"]]}  # fmt: skip
        (out / f"{mode}_stage{stage}.json").write_text(json.dumps(state))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], [int(s) for s in sys.argv[2].split(",")], Path(sys.argv[3]))
