"""Worker for tests/test_lightning.py: a small transformer trained by Lightning on CPU with ForceMonitorCallback.

    python tests/lightning_worker.py MODE OUT_DIR [resume]     (MODE = single | ddp | fsdp)

``ddp``: Lightning's DDP on 2 CPU processes (it launches the second itself); ``fsdp``: ModelParallelStrategy with
FSDP2 (``fully_shard`` in ``configure_model``) on 2 processes. A second callback, after ours, computes on every
log step the Transmission RMS straight from the (gathered) parameters, the independent check of what was logged.
``resume`` continues from ``OUT_DIR/ckpt/last.ckpt`` to step 18. Rank 0 writes ``OUT_DIR/check[_resumed].json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from instrumented_adamw import InstrumentedAdamW
from instrumented_adamw.lightning import ForceMonitorCallback
from instrumented_adamw.taxonomy import classify_all

D = 16


class Lit(L.LightningModule):
    def __init__(self, shard: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(D, 2, 32, batch_first=True, dropout=0.0)
        self.net = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.shard = shard

    def configure_model(self) -> None:
        if self.shard:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.net.layers:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return InstrumentedAdamW(self.named_parameters(), lr=1e-2, weight_decay=0.1)


class Independent(Callback):
    """The Transmission RMS from the parameters themselves on the steps the monitor logs."""

    def __init__(self, every: int) -> None:
        self.every, self.rms = every, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        named = list(pl_module.named_parameters())
        roles = classify_all([n for n, _ in named])
        total, count = 0.0, 0
        for name, p in named:
            if roles[name].cls == "Transmission":
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                total += float(full.detach().double().square().sum())
                count += full.numel()
        self.rms[step] = math.sqrt(total / count)


def main(mode: str, out: str, resume: bool) -> None:
    out = Path(out)
    torch.manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(256, 4, D), torch.randn(256, 4, D))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    strategy = {"single": "auto", "ddp": "ddp"}.get(mode)
    if mode == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    independent = Independent(every=3)
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if mode == "single" else 2, strategy=strategy, max_steps=18 if resume else 12,
        log_every_n_steps=3, logger=CSVLogger(out, name="logs", version=0), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[ForceMonitorCallback(weibull_every=6), independent,
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=6, save_last=True, save_top_k=-1)],
    )  # fmt: skip
    trainer.fit(Lit(shard=mode == "fsdp"), loader, ckpt_path=str(out / "ckpt" / "last.ckpt") if resume else None)
    if trainer.is_global_zero:
        name = "check_resumed.json" if resume else "check.json"
        (out / name).write_text(json.dumps(dict(rms=independent.rms)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], len(sys.argv) > 3 and sys.argv[3] == "resume")
