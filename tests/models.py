"""Tiny randomly initialised `transformers` models of each supported architecture (no downloads)."""

from __future__ import annotations

import torch
import transformers

_KW = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

CONFIGS = {
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_KW, rotary_pct=0.25),
    "llama": lambda: transformers.LlamaConfig(**_KW, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**_KW, num_key_value_heads=1),
    "qwen2": lambda: transformers.Qwen2Config(**_KW, num_key_value_heads=2),
    "qwen3": lambda: transformers.Qwen3Config(**_KW, num_key_value_heads=2, head_dim=8),
    "olmo": lambda: transformers.OlmoConfig(**_KW),
    "olmo2": lambda: transformers.Olmo2Config(**_KW),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4),
}


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
