"""HF Trainer + DeepSpeed ZeRO-2 through accelerate on CPU (``DS_ACCELERATOR=cpu``, gloo, 2 ranks), launched by
tests/test_deepspeed.py with torchrun:

    python -m torch.distributed.run --nproc_per_node=2 tests/hf_deepspeed_worker.py ROUTE OUT

ROUTE ``cls_and_kwargs``: ``optimizer_cls_and_kwargs=(InstrumentedAdamW, {...})`` with ForceMonitorCallback; rank 0
writes ``OUT/log_history.json`` and each rank ``OUT/norms<rank>.json`` (‖W‖² of the gathered fp32 parameters at every
log step, from a callback of the test: the independent check). ROUTE ``optimizers``: ``optimizers=(InstrumentedAdamW
(...), None)``, which the Trainer discards under DeepSpeed: the callback must fail and name the working route.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from instrumented_adamw import InstrumentedAdamW  # noqa: E402
from instrumented_adamw.hf import ForceMonitorCallback  # noqa: E402
from tests.models import tiny_model  # noqa: E402

STEPS, LOG_EVERY = 6, 2


class GatheredNorms(TrainerCallback):
    """‖W‖² of every parameter from DeepSpeed's gathered fp32 master weights, at the start and every log step."""

    def __init__(self):
        self.norms: dict[int, dict[str, float]] = {}

    def _take(self, step, model):
        from deepspeed.utils import safe_get_full_fp32_param

        self.norms[step] = {n: float(safe_get_full_fp32_param(p).double().pow(2).sum())
                            for n, p in model.named_parameters()}  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        pass

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self._take(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % LOG_EVERY == 0:
            self._take(state.global_step, model)


def main(route: str, out: Path) -> None:
    model = tiny_model("gpt_neox", seed=0)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 96, (48, 12), generator=g)]
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=STEPS, per_device_train_batch_size=2, logging_steps=LOG_EVERY,
        learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type="constant", report_to=[], save_strategy="no",
        disable_tqdm=True, deepspeed=ds_config, ddp_backend="gloo",
    )  # fmt: skip
    norms = GatheredNorms()
    callbacks = [ForceMonitorCallback(), norms]
    if route == "cls_and_kwargs":
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                          optimizer_cls_and_kwargs=(InstrumentedAdamW, {"lr": 3e-3, "weight_decay": 0.1}))  # fmt: skip
    else:
        opt = InstrumentedAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks, optimizers=(opt, None))
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    (out / f"norms{rank}.json").write_text(json.dumps(norms.norms))
    if rank == 0:
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
