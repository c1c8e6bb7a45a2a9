"""F1–F8 diagnostics (the paper's Table 6 numbering) on modules, state dicts, files and HF directories; `fit`."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from models import tiny_model

from instrumented_adamw.cli import main
from instrumented_adamw.weibull import diagnostics as dx
from instrumented_adamw.weibull.fit import fit_weibull, fit_weibull_histogram, half_normal_anchor


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


def test_cross_family_band():
    entries = {
        "a": [_block("x", 1.19), _block("y", 1.21), _block("z", 1.20), _block("q", 0.9, cls="Selection")],
        "b": [_block("x", 1.18), _block("y", 1.22), _block("p", 0.5, pooled=True)],
    }
    band = dx.cross_family_band(entries)
    assert band.medians == {"a": pytest.approx(1.20), "b": pytest.approx(1.20)}
    assert band.low == pytest.approx(1.20) and band.cv == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no per-block"):
        dx.cross_family_band({"c": [_block("p", 1.0, pooled=True)]})


def test_k_drift_init_and_anchor_are_both_offered_and_named():
    initial = [_block("x", 1.2050), _block("y", 1.2060), _block("q", 1.20, cls="Selection")]
    terminal = [_block("x", 1.19), _block("y", 1.21), _block("q", 0.9, cls="Selection"), _block("p", 0.5, pooled=True)]
    # The paper's F6: Δk = k_terminal − k_init, block by block.
    drift = dx.k_drift(initial, terminal)
    assert drift.reference == "init" and drift.anchor is None
    assert drift.per_block == {"x": pytest.approx(1.19 - 1.2050), "y": pytest.approx(1.21 - 1.2060)}
    assert drift.median == pytest.approx((1.19 - 1.2050 + 1.21 - 1.2060) / 2)
    assert drift.max_abs == pytest.approx(0.015)
    assert dx.k_drift(initial, terminal, cls=None).per_block["q"] == pytest.approx(0.9 - 1.20)
    # Against the half-normal anchor of the same protocol: one checkpoint suffices.
    anchored = dx.k_drift_from_anchor(terminal)
    k0, _ = half_normal_anchor()
    assert anchored.reference == "anchor" and anchored.anchor == pytest.approx(k0)
    assert set(anchored.per_block) == {"x", "y"}
    assert anchored.median == pytest.approx(1.20 - k0) and anchored.max_abs == pytest.approx(abs(1.19 - k0))
    assert dx.k_drift_from_anchor(terminal, trim=0.05).anchor == pytest.approx(half_normal_anchor(0.05)[0])
    # Unmatched blocks are named, not dropped.
    with pytest.raises(ValueError, match=r"only in initial \['y'\], only in terminal \[\]"):
        dx.k_drift(initial, [_block("x", 1.19)])


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


def test_paired_lambda_correlation_is_log_log():
    a = np.array([0.02, 0.03, 0.05, 0.07, 0.075])
    out = dx.paired_lambda_correlation(a, 1.3 * a**0.8)
    # A power law is a straight line in log-log: r = 1 exactly, while the linear Pearson r is below 1.
    assert out["r"] == pytest.approx(1.0, abs=1e-12) and out["log_slope"] == pytest.approx(0.8)
    assert out["r_linear"] < 1 - 1e-5 and out["n"] == 5
    # On noisy data the two differ; r is Pearson of the logs.
    b = np.array([0.021, 0.035, 0.048, 0.081, 0.070])
    out = dx.paired_lambda_correlation(a, b)
    assert out["r"] == pytest.approx(np.corrcoef(np.log(a), np.log(b))[0, 1], rel=1e-12)
    assert out["r_linear"] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-12)
    assert abs(out["r"] - out["r_linear"]) > 1e-3
    with pytest.raises(ValueError, match="positive"):
        dx.paired_lambda_correlation([0.1, 0.0, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="constant"):
        dx.paired_lambda_correlation([0.1, 0.1, 0.1], [0.1, 0.2, 0.3])


#: Pythia (Biderman et al. 2023, Table of model sizes): peak learning rate per size; all sizes trained 143,000
#: steps with weight decay 0.01. The framework paper quotes T/τ = T·η·λ_wd and labels each size.
PYTHIA_LR = {"70m": 1e-3, "160m": 6e-4, "410m": 3e-4, "1b": 3e-4, "6.9b": 1.2e-4}
PAPER_STATES = {
    "70m": (1.43, "Saturated"),
    "160m": (0.86, "Near-saturated"),
    "410m": (0.43, "Approaching"),
    "1b": (0.43, "Approaching"),
    "6.9b": (0.17, "Transition"),
}


@pytest.mark.parametrize("size", list(PYTHIA_LR))
def test_training_budget_reproduces_the_papers_pythia_states(size):
    t_over_tau, label = PAPER_STATES[size]
    out = dx.training_budget(PYTHIA_LR[size], 0.01, steps=143_000)
    assert out["t_over_tau"] == pytest.approx(t_over_tau, abs=0.005)  # the paper prints two decimals
    assert out["label"] == label
    assert dx.physical_state(t_over_tau) == label  # the printed value gives the same state


def test_physical_state_thresholds_and_schedules():
    assert [dx.physical_state(x) for x in (0.0, 0.1999, 0.2, 0.6931, math.log(2), 0.9999, 1.0, 50.0)] == [
        "Transition",
        "Transition",
        "Approaching",
        "Approaching",
        "Near-saturated",
        "Near-saturated",
        "Saturated",
        "Saturated",
    ]
    with pytest.raises(ValueError, match="non-negative"):
        dx.physical_state(-0.1)
    with pytest.raises(ValueError, match="non-negative"):
        dx.physical_state(float("nan"))
    sched = np.full(1000, 1e-3)
    assert dx.training_budget(sched, 0.01) == {"t_over_tau": pytest.approx(0.01), "label": "Transition"}
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
    assert math.isfinite(data["k_minus_k0_transmission"]) and "delta_k_transmission" not in data
    assert data["method"] == "exact" and blocks[name]["method"] == "exact"


def test_fit_command_histogram_method_and_init_checkpoint(neox, tmp_path, capsys):
    neox.save_pretrained(tmp_path / "init")
    trained = tiny_model("gpt_neox")
    with torch.no_grad():  # a "terminal" checkpoint: every matrix rescaled (k unchanged) plus a heavier tail
        for p in trained.parameters():
            p.mul_(3.0).add_(0.3 * p**3 / p.abs().max())
    trained.save_pretrained(tmp_path / "final")
    assert main(["fit", str(tmp_path / "final"), "--init", str(tmp_path / "init"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    init_blocks = dx.fit_blocks(tmp_path / "init", classes=["Transmission"])
    final_blocks = dx.fit_blocks(tmp_path / "final", classes=["Transmission"])
    assert data["delta_k_transmission"] == pytest.approx(dx.k_drift(init_blocks, final_blocks).median, rel=1e-12)
    assert data["init"] == str(tmp_path / "init")
    assert main(["fit", str(tmp_path / "final"), "--init", str(tmp_path / "init")]) == 0
    assert "Δk = k_terminal − k_init" in capsys.readouterr().out
    assert main(["fit", str(tmp_path / "init"), "--method", "histogram", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"
    block = {b["name"]: b for b in data["blocks"]}[name]
    assert data["method"] == block["method"] == "histogram"
    assert block["k"] == pytest.approx(fit_weibull_histogram(neox.get_parameter(name)).k, rel=1e-12)
    assert main(["fit", str(tmp_path / "final"), "--init", str(tmp_path / "nowhere")]) == 2
    assert "neither a file" in capsys.readouterr().err


def test_fit_command_offline_hub_id_fails_clearly(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["fit", "EleutherAI/pythia-70m", "--revision", "step1000"]) == 2
    err = capsys.readouterr().err
    assert "could not fetch 'EleutherAI/pythia-70m' (revision step1000)" in err and "local-dir" in err
    assert main(["fit", "no/such/path.safetensors"]) == 2
    assert "neither a file" in capsys.readouterr().err
