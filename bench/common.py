"""Shared pieces of the benchmarks: Pythia parameter shapes, a small GPT-NeoX from CLI sizes, CUDA-event timing.

Pythia configs (EleutherAI/pythia-*/config.json): vocab padded to 50304, untied embeddings, FFN = 4·d.
"""

from __future__ import annotations

import argparse
import statistics

import torch

#: name -> (vocab, d_model, layers, ffn)
PYTHIA = {
    "pythia-70m": (50304, 512, 6, 2048),
    "pythia-410m": (50304, 1024, 24, 4096),
    "pythia-1.4b": (50304, 2048, 24, 8192),
}


def pythia_shapes(name: str = "pythia-70m") -> list[tuple[int, ...]]:
    vocab, d, layers, ffn = PYTHIA[name]
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d,), (d,)]  # input / post-attention LayerNorm weight and bias
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,)]  # fused QKV, attention output
        shapes += [(ffn, d), (ffn,), (d, ffn), (d,)]  # dense_h_to_4h, dense_4h_to_h
    shapes += [(d,), (d,), (vocab, d)]  # final LayerNorm, embed_out
    return shapes


def make_params(name: str = "pythia-70m", seed: int = 0, device="cpu", dtype=torch.float32):
    """Parameters initialised N(0, 0.02²) with fixed N(0, 1e-3²) gradients attached."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in pythia_shapes(name):
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=g, device=device)).to(dtype))
        p.grad = (1e-3 * torch.randn(shape, generator=g, device=device)).to(dtype)
        params.append(p)
    return params


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Sizes of the small GPT-NeoX the monitoring benchmarks train (defaults: 7.35M parameters)."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)


def small_neox(args: argparse.Namespace):
    """The GPT-NeoX of ``add_model_args``, seeded, on the CPU (move it where it should run)."""
    from train.config import ModelConfig
    from train.models import build_model

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                      intermediate_size=4 * args.hidden)  # fmt: skip
    return build_model(cfg)


def cuda_median_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median of ``repeats`` calls timed with CUDA events, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
