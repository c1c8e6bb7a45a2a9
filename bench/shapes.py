"""Parameter shapes of GPT-NeoX / Pythia models, for optimizer benchmarks without building the models.

Pythia configs (EleutherAI/pythia-*/config.json): vocab padded to 50304, untied embeddings, FFN = 4·d.
"""

from __future__ import annotations

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
