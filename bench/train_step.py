"""Compiled bf16 Pythia-70M training step (batch 24 × 512): torch fused AdamW vs InstrumentedAdamW tracking.

    python bench/train_step.py [--steps 50] [--json out.json]        (needs CUDA; --smoke runs anywhere)

Both runs in one process: the model (random init from the Pythia-70M config) is compiled with torch.compile, the
forward/backward under bf16 autocast, the optimizer step outside the graph (as the trainer does it). Tokens/s is
the median over ``--steps`` steps after warm-up, CUDA events around each whole step. Target: InstrumentedAdamW
≥ 0.98× the tokens/s of torch's fused AdamW. Also reports what 20,000 steps take at that speed (the papers' run
length; the run itself adds logging, fits, snapshots and the start-up).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
from common import add_output_args, environment, median_ms, target, write_json

from instrumented_adamw import InstrumentedAdamW
from train.config import ModelConfig
from train.models import build_model

#: The papers' run length (../shared/reference/paper_numbers.md): the time budget target is for 20,000 steps.
PAPER_STEPS = 20_000


def tokens_per_s(make_opt, steps: int, batch: int, seq: int, device: str, compile_model: bool, smoke: bool):
    torch.manual_seed(0)
    cfg = ModelConfig()  # the defaults are the Pythia-70M config
    if smoke:
        cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)
    model = build_model(cfg).to(device)
    opt = make_opt(model)
    compiled = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    cuda = device == "cuda"

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            logits = compiled(input_ids=x[:, :-1]).logits
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # compiles
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    return batch * seq / (median_ms(step, steps, warmup=2 if smoke else 10, device=device) / 1e3), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--seq", type=int, default=512)
    add_output_args(p)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.smoke:
        raise SystemExit("bench/train_step.py needs a CUDA device (--smoke runs a toy model anywhere)")
    if args.smoke:
        args.steps, args.batch, args.seq = 3, 2, 32
    compile_model = device == "cuda"  # on the CPU inductor's C++ build alone takes minutes: not what is measured

    def torch_fused(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, fused=True)

    def ours(m):
        return InstrumentedAdamW(m.named_parameters(), lr=1e-3, weight_decay=0.01, fused=True)

    shape = (args.steps, args.batch, args.seq, device, compile_model, args.smoke)
    base, first_base = tokens_per_s(torch_fused, *shape)
    inst, first_inst = tokens_per_s(ours, *shape)
    env = environment(device)
    tokens = args.batch * args.seq
    print(f"{env['device_name']}, torch {torch.__version__}, batch {args.batch}x{args.seq}, compiled={compile_model}")
    print(f"torch AdamW fused                  {base:12,.0f} tok/s  {1e3 * tokens / base:7.2f} ms/step")
    print(f"InstrumentedAdamW fused (tracking) {inst:12,.0f} tok/s  {1e3 * tokens / inst:7.2f} ms/step  "
          f"{inst / base:.3f}x (target >= 0.98x)")  # fmt: skip
    print(f"{PAPER_STEPS:,} steps at that speed: {PAPER_STEPS * tokens / inst / 60:.2f} min (steps only)")
    rows = [
        dict(variant="torch AdamW fused", tok_s=base, ms_per_step=1e3 * tokens / base, first_step_s=first_base),
        dict(variant="InstrumentedAdamW fused (tracking)", tok_s=inst, ms_per_step=1e3 * tokens / inst,
             first_step_s=first_inst),
    ]  # fmt: skip
    targets = [
        target("compiled bf16 training: InstrumentedAdamW / torch fused tok/s", inst / base, ">=", 0.98, "x"),
        target(f"{PAPER_STEPS:,} training steps alone (the whole run adds its start-up, logs, fits, snapshots)",
               PAPER_STEPS * tokens / inst / 60, "<=", 5.0, "min"),
    ]  # fmt: skip
    write_json(args.json, "train_step", args, env, rows, targets, compiled=compile_model, tokens_per_step=tokens)


if __name__ == "__main__":
    main()
