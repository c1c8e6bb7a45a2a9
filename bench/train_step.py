"""Compiled bf16 Pythia-70M training step (batch 24 × 512): torch fused AdamW vs InstrumentedAdamW tracking.

    python bench/train_step.py [--steps 50]        (needs CUDA)

Both runs in one process: the model (random init from the Pythia-70M config) is compiled with torch.compile, the
forward/backward under bf16 autocast, the optimizer step outside the graph. Tokens/s is the median over
``--steps`` steps after warm-up, CUDA events around each whole step. Target: InstrumentedAdamW ≥ 0.98× the
tokens/s of torch's fused AdamW.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import cuda_median_ms

from instrumented_adamw import InstrumentedAdamW
from train.config import ModelConfig
from train.models import build_model


def tokens_per_s(make_opt, steps: int, batch: int, seq: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig()).cuda()  # the Pythia-70M defaults
    opt = make_opt(model)
    compiled = torch.compile(model)
    x = torch.randint(0, 50304, (batch, seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = compiled(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * seq / (cuda_median_ms(step, steps, warmup=10) / 1e3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--seq", type=int, default=512)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/train_step.py needs a CUDA device")

    def torch_fused(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

    def ours(m):
        return InstrumentedAdamW(m.named_parameters(), lr=1e-3, weight_decay=0.01, fused=True)

    base = tokens_per_s(torch_fused, args.steps, args.batch, args.seq)
    inst = tokens_per_s(ours, args.steps, args.batch, args.seq)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch}x{args.seq}")
    print(f"torch AdamW fused                  {base:12,.0f} tok/s")
    print(f"InstrumentedAdamW fused (tracking) {inst:12,.0f} tok/s   {inst / base:.3f}x (target >= 0.98x)")


if __name__ == "__main__":
    main()
