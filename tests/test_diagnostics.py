"""F1–F8 diagnostics on live modules, state dicts, safetensors files and HF directories; the `fit` command."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from models import tiny_model

from instrumented_adamw import diagnostics as dx
from instrumented_adamw.cli import main
from instrumented_adamw.weibull import fit_weibull, half_normal_anchor


@pytest.fixture(scope="module")
def neox():
    return tiny_model("gpt_neox")


def test_fit_blocks_same_from_module_state_dict_file_and_directory(neox, tmp_path):
    from safetensors.torch import save_file

    neox.save_pretrained(tmp_path / "hf")
    save_file({n: p.detach().contiguous() for n, p in neox.named_parameters()}, tmp_path / "w.safetensors")
    torch.save({"model": neox.state_dict()}, tmp_path / "ckpt.pt")
    sources = [neox, neox.state_dict(), tmp_path / "w.safetensors", tmp_path / "hf", tmp_path / "ckpt.pt"]
    ref = dx.fit_blocks(neox)
    assert len(ref) == 2 * 4 + 2  # 4 matrices per layer, embedding, head
    for block in ref:
        assert block.fit.k == pytest.approx(fit_weibull(neox.get_parameter(block.name)).k, rel=1e-12)

    def key(blocks):  # transformers 5 calls the head lm_head in the module, embed_out in saved files
        return sorted((b.layer or -1, b.component, b.cls, b.fit.k, b.fit.lam) for b in blocks)

    for source in sources[1:]:
        assert key(dx.fit_blocks(source)) == key(ref)
    assert dx.load_weights(tmp_path / "hf").model_type == "gpt_neox"
    only = dx.fit_blocks(neox, classes=["Transmission"])
    assert {b.cls for b in only} == {"Transmission"} and len(only) == 6
    state = dict(neox.state_dict())
    bias = "gpt_neox.layers.0.attention.query_key_value.bias"
    state[bias] = torch.randn(state[bias].shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_vectors = dx.fit_blocks(state, include_vectors=True)  # norm weights are all ones at init
    messages = [str(w.message) for w in caught]
    assert "fit_blocks: skipped gpt_neox.layers.0.input_layernorm.weight: the kept |w| are all equal" in messages[0]
    assert len(messages) == 17  # 5 norm weights, 5 norm biases, 7 zero biases: each named, none dropped silently
    assert [b.cls for b in with_vectors if b.name == bias] == ["Other"]


def test_pooled_fit_is_labelled_and_depressed_by_mixing_scales():
    g = torch.Generator().manual_seed(0)
    state = {
        f"gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight": s * torch.randn(300, 300, generator=g)
        for i, s in enumerate((0.01, 0.05))
    }
    state["gpt_neox.layers.0.attention.query_key_value.weight"] = torch.randn(30, 10, generator=g)
    pooled = dx.pooled_fit(state)
    per_block = dx.fit_blocks(state, classes=["Transmission"])
    assert pooled.pooled and pooled.name == "pooled:Transmission" and pooled.shape == (180_000,)
    assert pooled.fit.k < min(b.fit.k for b in per_block) - 0.1  # scale mixture depresses k
    with pytest.raises(ValueError, match="no Selection"):
        dx.pooled_fit(state, cls="Selection")


def test_gamma_closure_on_weibull_and_half_normal():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(500_000, generator=g, dtype=torch.float64)
    weib = dx.gamma_closure(fit_weibull(0.03 * (-torch.log1p(-u)) ** (1 / 1.3)))
    assert weib["closure"] == pytest.approx(1.0, abs=1e-2) and weib["bridge"] == pytest.approx(1.0, abs=1e-2)
    half = dx.gamma_closure(fit_weibull(torch.randn(1_000_000, generator=g)))
    k0, l0 = half_normal_anchor()
    assert half["lam_over_rms"] == pytest.approx(l0, abs=2e-3)
    assert half["bridge_lam_over_rms"] == pytest.approx(0.8176, abs=2e-3)
    assert half["bridge"] == pytest.approx(0.8176 / 0.8875, abs=3e-3)


def _block(name, k, cls="Transmission", pooled=False):
    fit = dx.WeibullFit(k, 0.02, 0.99, 100, 125, 0.0, 0.0, 0.02, 0.01)
    return dx.BlockFit(name, 0, "o", cls, (10, 10), fit, pooled)


def test_cross_family_band_and_k_drift():
    entries = {
        "a": [_block("x", 1.19), _block("y", 1.21), _block("z", 1.20), _block("q", 0.9, cls="Selection")],
        "b": [_block("x", 1.18), _block("y", 1.22), _block("p", 0.5, pooled=True)],
    }
    band = dx.cross_family_band(entries)
    assert band.medians == {"a": pytest.approx(1.20), "b": pytest.approx(1.20)}
    assert band.low == pytest.approx(1.20) and band.cv == pytest.approx(0.0, abs=1e-12)
    drift = dx.k_drift(entries["a"])
    k0, _ = half_normal_anchor()
    assert drift.anchor == pytest.approx(k0) and set(drift.per_block) == {"x", "y", "z"}
    assert drift.median == pytest.approx(1.20 - k0) and drift.max_abs == pytest.approx(abs(1.19 - k0))
    with pytest.raises(ValueError, match="no per-block"):
        dx.cross_family_band({"c": [_block("p", 1.0, pooled=True)]})


def test_lambda_scaling_recovers_known_law():
    lrs, wds = np.array([3e-4, 1e-3, 3e-3, 1e-3, 1e-3]), np.array([0.01, 0.01, 0.01, 0.1, 0.2])
    lams = 0.087 * np.sqrt(lrs / wds)
    s = dx.lambda_scaling(lams, lrs, wds)
    assert s.slope == pytest.approx(0.087, rel=1e-12) and s.pearson_r == pytest.approx(1.0)
    assert s.r2_origin == pytest.approx(1.0)
    noisy = dx.lambda_scaling(lams * np.array([1.1, 0.9, 1.0, 1.05, 0.95]), lrs, wds)
    assert 0.9 < noisy.pearson_r < 1.0 and noisy.r2_origin < 1.0
    with pytest.raises(ValueError, match="positive"):
        dx.lambda_scaling([1.0, 2.0], [1e-3, 1e-3], [0.0, 0.1])


def test_attention_architecture_from_configs():
    assert dx.attention_architecture(tiny_model("gpt_neox").config.to_dict())["kind"] == "MHA"
    assert dx.attention_architecture(tiny_model("llama").config.to_dict())["kind"] == "GQA"
    assert dx.attention_architecture(tiny_model("mistral").config.to_dict())["kind"] == "MQA"
    assert dx.attention_architecture(tiny_model("gpt2").config.to_dict())["kind"] == "MHA"
    with pytest.raises(ValueError, match="num_attention_heads"):
        dx.attention_architecture({})


def test_paired_lambda_correlation_and_training_budget():
    a = np.array([0.02, 0.03, 0.05, 0.07, 0.075])
    out = dx.paired_lambda_correlation(a, 1.3 * a**0.8)
    assert out["log_slope"] == pytest.approx(0.8) and out["pearson_r"] > 0.99
    # Pythia-70M: 143k steps at lr 1e-3, wd 0.01 -> 1.43, "saturated" (paper).
    assert dx.training_budget(1e-3, 0.01, steps=143_000) == {"t_over_tau": pytest.approx(1.43), "label": "saturated"}
    sched = np.full(1000, 1e-3)
    assert dx.training_budget(sched, 0.01)["label"] == "transient"
    assert dx.training_budget(sched, 0.5)["t_over_tau"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="steps"):
        dx.training_budget(1e-3, 0.01)


def test_fit_command_table_and_json(neox, tmp_path, capsys):
    neox.save_pretrained(tmp_path)
    assert main(["fit", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "dense_4h_to_h" in table and "Transmission" in table and "attention: MHA" in table
    assert main(["fit", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == "gpt_neox" and data["attention"]["kind"] == "MHA"
    blocks = {b["name"]: b for b in data["blocks"]}
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    assert blocks[name]["k"] == pytest.approx(fit_weibull(neox.get_parameter(name)).k, rel=1e-12)
    assert blocks[name]["layer"] == 1 and blocks[name]["cls"] == "Transmission"
    assert math.isfinite(data["k_drift_transmission"])


def test_fit_command_offline_hub_id_fails_clearly(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["fit", "EleutherAI/pythia-70m", "--revision", "step1000"]) == 2
    err = capsys.readouterr().err
    assert "could not fetch 'EleutherAI/pythia-70m' (revision step1000)" in err and "local-dir" in err
    assert main(["fit", "no/such/path.safetensors"]) == 2
    assert "neither a file" in capsys.readouterr().err
