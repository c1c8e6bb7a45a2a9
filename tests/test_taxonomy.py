"""Parameter-name taxonomy on real module names of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from models import CONFIGS, tiny_model

from instrumented_adamw.taxonomy import UNCLASSIFIED, classify, classify_all, detect_family, strip_wrappers

# (component, class) every weight matrix of each architecture must get; biases and vectors are Other.
EXPECTED = {
    "gpt_neox": {"qkv": "QKV", "o": "Transmission", "ffn_in": "Transmission", "ffn_out": "Transmission"},
    "gpt2": {"qkv": "QKV", "o": "Transmission", "ffn_in": "Transmission", "ffn_out": "Transmission"},
}
LLAMA_LIKE = {
    "q": "Selection",
    "k": "Selection",
    "v": "V",
    "o": "Transmission",
    "ffn_gate": "Transmission",
    "ffn_up": "Transmission",
    "ffn_out": "Transmission",
}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_every_parameter_of_every_architecture_is_classified(arch):
    model = tiny_model(arch)
    names = [n for n, _ in model.named_parameters()]
    roles = classify_all(names, model.config.model_type)
    assert not [n for n, r in roles.items() if r.cls == UNCLASSIFIED]
    # The family is also recognised from the bare names (a state dict without config).
    assert classify_all(names) == roles
    block_matrices = {
        (r.component, r.cls)
        for n, r in roles.items()
        if r.layer is not None and r.kind == "weight" and model.get_parameter(n).ndim == 2
    }
    assert block_matrices == set(EXPECTED.get(arch, LLAMA_LIKE).items())
    layers = {r.layer for r in roles.values() if r.layer is not None}
    assert layers == {0, 1}
    for n, r in roles.items():
        if r.kind == "bias" or model.get_parameter(n).ndim < 2:
            assert r.cls == "Other", n
    embed = [r for r in roles.values() if r.component == "embed"]
    assert len(embed) == 1 and embed[0].cls == "Other" and embed[0].layer is None


def test_wrapped_names_and_torch_transformer():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    wrapped = [f"module._orig_mod.{n}" for n, _ in enc.named_parameters()]
    assert strip_wrappers(wrapped[0]) == "layers.0.self_attn.in_proj_weight"
    roles = classify_all(wrapped)
    assert roles["module._orig_mod.layers.1.self_attn.in_proj_weight"].cls == "QKV"
    assert roles["module._orig_mod.layers.1.linear2.weight"].cls == "Transmission"
    assert roles["module._orig_mod.layers.1.linear2.weight"].layer == 1
    assert all(r.cls != UNCLASSIFIED for r in roles.values())


def test_torchtitan_canonical_names():
    """torchtitan's Llama 3 (fused QKV) and its older separate-projection names, as its optimizers see them."""
    block = ["attention.qkv_linear.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    names = ["tok_embeddings.weight", *(f"layers.{i}.{b}.weight" for i in (0, 1) for b in block),
             *(f"layers.{i}.{n}.weight" for i in (0, 1) for n in ("attention_norm", "ffn_norm")),
             "norm.weight", "lm_head.weight"]  # fmt: skip
    roles = classify_all(names)
    assert {n: r.cls for n, r in roles.items() if r.layer == 1} == {
        "layers.1.attention.qkv_linear.wqkv.weight": "QKV", "layers.1.attention.wo.weight": "Transmission",
        "layers.1.feed_forward.w1.weight": "Transmission", "layers.1.feed_forward.w2.weight": "Transmission",
        "layers.1.feed_forward.w3.weight": "Transmission", "layers.1.attention_norm.weight": "Other",
        "layers.1.ffn_norm.weight": "Other",
    }  # fmt: skip
    assert {roles[n].component for n in ("tok_embeddings.weight", "norm.weight", "lm_head.weight")} == {
        "embed", "norm", "head"}  # fmt: skip
    separate = classify_all(["layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
                             "layers.0.attention.wv.weight", "output.weight"])  # fmt: skip
    assert [r.cls for r in separate.values()] == ["Selection", "Selection", "V", "Other"]


def test_unknown_architectures_are_unclassified_not_guessed():
    import transformers

    cfg = transformers.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
    opt = transformers.AutoModelForCausalLM.from_config(cfg)
    names = [n for n, _ in opt.named_parameters()]
    # OPT's config names a model type we have no table for: nothing is labelled, even names that look familiar.
    assert {r.cls for r in classify_all(names, "opt").values()} == {UNCLASSIFIED}
    assert detect_family(["encoder.block.0.weight"]) is None
    assert classify("encoder.block.0.weight", None).cls == UNCLASSIFIED
    with pytest.raises(ValueError, match="unknown naming family"):
        classify("x.weight", "bert")
