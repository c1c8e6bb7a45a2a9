"""CPU demo: train a tiny transformer LM with InstrumentedAdamW and print the force budget per interval.

The corpus is generated in code (a sparse random Markov chain over a small vocabulary), so the demo needs no
downloads. Run it with ``python -m instrumented_adamw.demo`` (``make demo``); it takes well under a minute on two
cores. The printed shares use the papers' definition over all weight matrices:
``|ΣF_a| / (|ΣF_a| + ΣF_i + Σ|F_d|)`` with each force integrated over every step of the interval.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .forces import FORCES, QUANTITIES
from .optim import InstrumentedAdamW

ALIGN, INJECT, DECAY = (QUANTITIES.index(q) for q in ("align", "inject", "decay"))
FORCE_COLUMNS = [QUANTITIES.index(f) for f in FORCES]


@dataclass(frozen=True)
class DemoConfig:
    vocab: int = 64
    seq_len: int = 64
    batch: int = 16
    d_model: int = 64
    layers: int = 2
    heads: int = 4
    steps: int = 400
    log_every: int = 50
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 40
    seed: int = 1


def markov_corpus(vocab: int, n_tokens: int, seed: int) -> torch.Tensor:
    """Tokens from a random sparse Markov chain: learnable structure (entropy well below log(vocab))."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, generator=g) * 3.0
    probs = torch.softmax(logits, dim=1)
    out = torch.empty(n_tokens, dtype=torch.long)
    state = 0
    draws = torch.rand(n_tokens, generator=g)
    cdf = probs.cumsum(1)
    for i in range(n_tokens):
        state = int(torch.searchsorted(cdf[state], draws[i]).clamp(max=vocab - 1))
        out[i] = state
    return out


class TinyLM(nn.Module):
    def __init__(self, cfg: DemoConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.seq_len, cfg.d_model))
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(cfg.seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        h = self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True)
        return self.head(h)


def lr_at(step: int, cfg: DemoConfig) -> float:
    """Linear warmup then cosine to 10% of the peak: the papers' schedule shape."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))


def budget_shares(interval: np.ndarray) -> tuple[float, float, float]:
    """(align, inject, decay) shares in percent from summed interval forces (columns as QUANTITIES)."""
    align, inject, decay = abs(interval[:, ALIGN].sum()), interval[:, INJECT].sum(), np.abs(interval[:, DECAY]).sum()
    total = align + inject + decay
    return 100 * align / total, 100 * inject / total, 100 * decay / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--log-every", type=int, default=DemoConfig.log_every)
    args = parser.parse_args(argv)
    cfg = DemoConfig(steps=args.steps, log_every=args.log_every)

    torch.manual_seed(cfg.seed)
    tokens = markov_corpus(cfg.vocab, 60_000, cfg.seed)
    model = TinyLM(cfg)
    opt = InstrumentedAdamW(model.named_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    matrices = [n for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n and n != "pos"]
    n_el = sum(model.get_parameter(n).numel() for n in matrices)
    rows = None
    g = torch.Generator().manual_seed(cfg.seed)
    print(f"tiny LM: {sum(p.numel() for p in model.parameters()):,} params, {len(matrices)} weight matrices tracked")
    print(f"{'step':>5} {'loss':>7} {'align%':>7} {'inject%':>8} {'decay%':>7} {'RMS(W)':>8} {'rel.resid':>9}")
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        start = torch.randint(0, tokens.numel() - cfg.seq_len - 1, (cfg.batch,), generator=g)
        batch = torch.stack([tokens[s : s + cfg.seq_len + 1] for s in start.tolist()])
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % cfg.log_every == 0:
            r = opt.read_forces(reset=True)  # one host transfer: the interval integral since the last read
            if rows is None:
                rows = [r.index(n) for n in matrices]
            a, i, d = budget_shares(r.interval[rows])
            w_sq = r.w_sq_now[rows].sum()
            resid = np.abs(r.residual[rows]).sum() / np.abs(r.interval[rows][:, FORCE_COLUMNS]).sum()
            print(
                f"{step + 1:>5} {loss.item():>7.3f} {a:>7.1f} {i:>8.1f} {d:>7.1f} "
                f"{np.sqrt(w_sq / n_el):>8.4f} {resid:>9.1e}"
            )
    print(f"done in {time.perf_counter() - t0:.1f} s; shares are |ΣF_a|/(|ΣF_a|+ΣF_i+Σ|F_d|) over each interval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
