"""Parameter names → (layer, component, class) for the architectures the papers study.

Classes (DESIGN.md, "Weibull protocol"):

* ``Transmission`` — FFN matrices and the attention output: the matrices whose k stays locked near the anchor.
* ``Selection`` — the query and key projections.
* ``QKV`` — a fused query/key/value matrix (GPT-NeoX ``query_key_value``, GPT-2 ``c_attn``, torch
  ``in_proj_weight``): it mixes Selection and V rows, so it is its own kind.
* ``V`` — the value projection.
* ``Other`` — embeddings, norms, biases, the LM head.
* ``unclassified`` — a name no known naming scheme matches, or a model type we have no table for. Never guessed.

Naming schemes are matched per family; a family is taken from an HF ``config.model_type`` when there is one, else
detected from the names (the family whose signature matrices are present).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

TRANSMISSION, SELECTION, QKV, V, OTHER, UNCLASSIFIED = "Transmission", "Selection", "QKV", "V", "Other", "unclassified"
CLASSES = (TRANSMISSION, SELECTION, QKV, V, OTHER, UNCLASSIFIED)

#: Matrix components and their class; a bias of any of them is ``Other``.
COMPONENT_CLASS = {
    "q": SELECTION,
    "k": SELECTION,
    "qkv": QKV,
    "v": V,
    "o": TRANSMISSION,
    "ffn_in": TRANSMISSION,
    "ffn_gate": TRANSMISSION,
    "ffn_up": TRANSMISSION,
    "ffn_out": TRANSMISSION,
    "embed": OTHER,
    "pos_embed": OTHER,
    "head": OTHER,
    "norm": OTHER,
}

# Each pattern is searched in the name after wrapper prefixes are removed; ``(?:^|\.)`` anchors a path segment.
_SEG = r"(?:^|\.)"
_LLAMA = (
    (_SEG + r"self_attn\.q_proj\.", "q"),
    (_SEG + r"self_attn\.k_proj\.", "k"),
    (_SEG + r"self_attn\.v_proj\.", "v"),
    (_SEG + r"self_attn\.o_proj\.", "o"),
    (_SEG + r"mlp\.gate_proj\.", "ffn_gate"),
    (_SEG + r"mlp\.up_proj\.", "ffn_up"),
    (_SEG + r"mlp\.down_proj\.", "ffn_out"),
    (_SEG + r"self_attn\.[qk]_norm\.", "norm"),  # Qwen3, OLMo-2 QK-norm
    (_SEG + r"(?:input_layernorm|post_attention_layernorm|(?:pre|post)_feedforward_layernorm)\.", "norm"),
    (_SEG + r"model\.norm\.", "norm"),
    (_SEG + r"embed_tokens\.", "embed"),
    (_SEG + r"lm_head\.", "head"),
)
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_neox": (
        (_SEG + r"attention\.query_key_value\.", "qkv"),
        (_SEG + r"attention\.dense\.", "o"),
        (_SEG + r"mlp\.dense_h_to_4h\.", "ffn_in"),
        (_SEG + r"mlp\.dense_4h_to_h\.", "ffn_out"),
        (_SEG + r"(?:input_layernorm|post_attention_layernorm|final_layer_norm)\.", "norm"),
        (_SEG + r"embed_in\.", "embed"),
        (_SEG + r"(?:embed_out|lm_head)\.", "head"),  # transformers 5 names it lm_head
    ),
    "llama": _LLAMA,
    "gpt2": (
        (_SEG + r"attn\.c_attn\.", "qkv"),
        (_SEG + r"attn\.c_proj\.", "o"),
        (_SEG + r"mlp\.c_fc\.", "ffn_in"),
        (_SEG + r"mlp\.c_proj\.", "ffn_out"),
        (_SEG + r"ln_(?:1|2|f)\.", "norm"),
        (_SEG + r"wte\.", "embed"),
        (_SEG + r"wpe\.", "pos_embed"),
        (_SEG + r"lm_head\.", "head"),
    ),
    # torchtitan's Llama 3 / 4 and Qwen-style decoders (its canonical names: fused or separate QKV, SwiGLU w1/w3/w2).
    "torchtitan": (
        (_SEG + r"attention\.qkv_linear\.wqkv\.", "qkv"),
        (_SEG + r"attention\.wq\.", "q"),
        (_SEG + r"attention\.wk\.", "k"),
        (_SEG + r"attention\.wv\.", "v"),
        (_SEG + r"attention\.wo\.", "o"),
        (_SEG + r"feed_forward\.w1\.", "ffn_gate"),
        (_SEG + r"feed_forward\.w3\.", "ffn_up"),
        (_SEG + r"feed_forward\.w2\.", "ffn_out"),
        (_SEG + r"(?:attention_norm|ffn_norm|norm)\.", "norm"),
        (_SEG + r"tok_embeddings\.", "embed"),
        (_SEG + r"(?:output|lm_head)\.", "head"),
    ),
    # torch.nn.TransformerEncoderLayer / DecoderLayer internals (self-attention only).
    "torch_transformer": (
        (_SEG + r"self_attn\.in_proj_(?:weight|bias)$", "qkv"),
        (_SEG + r"self_attn\.out_proj\.", "o"),
        (_SEG + r"linear1\.", "ffn_in"),
        (_SEG + r"linear2\.", "ffn_out"),
        (_SEG + r"norm\d?\.", "norm"),
    ),
}
_COMPILED = {fam: tuple((re.compile(p), c) for p, c in pats) for fam, pats in FAMILIES.items()}

#: HF ``config.model_type`` → naming family. Model types not listed are classified ``unclassified``.
MODEL_TYPES = {
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "olmo": "llama",
    "olmo2": "llama",
    "gpt2": "gpt2",
}

#: A family is detected from bare names when one of its signature matrices is present.
_SIGNATURES = {
    "gpt_neox": re.compile(_SEG + r"attention\.query_key_value\.weight$"),
    "llama": re.compile(_SEG + r"self_attn\.q_proj\.weight$"),
    "gpt2": re.compile(_SEG + r"attn\.c_attn\.weight$"),
    "torch_transformer": re.compile(_SEG + r"self_attn\.in_proj_weight$"),
    "torchtitan": re.compile(_SEG + r"attention\.(?:qkv_linear\.wqkv|wq)\.weight$"),
}
_WRAPPERS = re.compile(r"(?:^|\.)(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)(?=\.)")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class ParamRole:
    """Where a parameter sits: ``layer`` (None outside the blocks), ``component`` (a key of ``COMPONENT_CLASS``,
    None when unclassified), ``kind`` (``"weight"`` or ``"bias"``) and ``cls`` (one of ``CLASSES``)."""

    name: str
    family: str | None
    layer: int | None
    component: str | None
    kind: str
    cls: str


def strip_wrappers(name: str) -> str:
    """Drop DDP / torch.compile / FSDP wrapper segments (``module.``, ``_orig_mod.``, ...)."""
    return _WRAPPERS.sub("", name).lstrip(".")


def family_for_model_type(model_type: str | None) -> str | None:
    return MODEL_TYPES.get(model_type) if model_type else None


def detect_family(names: Iterable[str]) -> str | None:
    """The naming family whose signature matrix appears in ``names``; None if none or several do."""
    found = {fam for n in names for fam, sig in _SIGNATURES.items() if sig.search(strip_wrappers(n))}
    return found.pop() if len(found) == 1 else None


def classify(name: str, family: str | None) -> ParamRole:
    """Role of one parameter under ``family`` (see :data:`FAMILIES`); ``family=None`` → unclassified."""
    clean = strip_wrappers(name)
    match = _LAYER.search(clean)
    layer = int(match.group(1)) if match else None
    kind = "bias" if clean.endswith("bias") else "weight"
    if family is not None and family not in _COMPILED:
        raise ValueError(f"unknown naming family {family!r}; known: {sorted(_COMPILED)}")
    for pattern, component in _COMPILED.get(family, ()):
        if pattern.search(clean):
            cls = OTHER if kind == "bias" else COMPONENT_CLASS[component]
            return ParamRole(name, family, layer, component, kind, cls)
    return ParamRole(name, family, layer, None, kind, UNCLASSIFIED)


def classify_all(names: Iterable[str], model_type: str | None = None) -> dict[str, ParamRole]:
    """Roles of every name. With an HF ``model_type`` the family comes from it (an unsupported model type leaves
    everything ``unclassified``); without one it is detected from the names."""
    names = list(names)
    family = family_for_model_type(model_type) if model_type is not None else detect_family(names)
    return {n: classify(n, family) for n in names}
