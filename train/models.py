"""Models from config with `transformers` (never hand-written): GPT-NeoX (Pythia) and Llama."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import transformers

from train.config import ModelConfig


def hf_config(cfg: ModelConfig) -> transformers.PretrainedConfig:
    """The transformers config of ``cfg``; SDPA attention, no dropout, init std ``init_std`` everywhere."""
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
        bos_token_id=0,
        eos_token_id=0,
    )
    if cfg.arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            **common,
            rotary_pct=cfg.rotary_pct,
            rotary_emb_base=cfg.rope_theta,
            use_parallel_residual=cfg.parallel_residual,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    return transformers.LlamaConfig(
        **common,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        rope_theta=cfg.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
    )


def _dtype_kwarg() -> dict:
    """fp32 weights: transformers >= 4.56 calls the argument ``dtype`` (``torch_dtype`` before, now deprecated)."""
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def build_model(cfg: ModelConfig) -> transformers.PreTrainedModel:
    """Random init from ``cfg`` (seed the RNG first), or the published weights of ``cfg.pretrained``."""
    if cfg.pretrained is not None:
        return load_pretrained(cfg.pretrained, cfg.revision)
    return transformers.AutoModelForCausalLM.from_config(hf_config(cfg), **_dtype_kwarg())


class PretrainedUnavailableError(RuntimeError):
    """The pretrained weights are neither a local directory nor reachable on the hub nor in the local cache."""


def load_pretrained(name: str, revision: str | None) -> transformers.PreTrainedModel:
    """``name`` from a local HF directory, else from the hub, else from the local hub cache.

    The hub is probed first (:func:`train.data.hub_reachable`, a few seconds at most): unreachable, only the cache is
    tried, instead of the hub client's ~30 s of retries before the same failure."""
    from huggingface_hub import constants

    from train.data import hub_offline, hub_reachable

    kwargs = dict(revision=revision, attn_implementation="sdpa", **_dtype_kwarg())
    path = Path(os.path.expanduser(name))
    if path.exists() or name.startswith((".", "/", "~")):
        if not path.is_dir():
            raise PretrainedUnavailableError(f"model.pretrained={name!r}: no such directory")
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)  # a broken directory raises as is
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else hub_offline():
            return transformers.AutoModelForCausalLM.from_pretrained(name, local_files_only=not online, **kwargs)
    except OSError as exc:
        rev = revision or "main"
        why = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE
            else f"the Hugging Face hub ({constants.ENDPOINT}) does not answer"
            if not online
            else "the hub refused it"
        )
        raise PretrainedUnavailableError(
            f"cannot load {name!r} (revision {rev}): {why}, and it is not in the local cache "
            f"({constants.HF_HUB_CACHE}) [{str(exc).splitlines()[0]}]. On a machine with network run "
            f"`hf download {name} --revision {rev} --local-dir DIR` (the `hf` command comes with "
            "`pip install huggingface_hub`), copy DIR here and set model.pretrained=DIR; or download it there into "
            "a Hugging Face cache, copy that cache here (HF_HOME) and set HF_HUB_OFFLINE=1."
        ) from exc
