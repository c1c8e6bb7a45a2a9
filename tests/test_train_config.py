"""Config tree: YAML + base chains + CLI overrides, validation errors that name the field; schedule values."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import Config, ConfigError, dump_config, load_config
from train.loop import lr_at

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_overrides_are_typed_and_applied():
    cfg = load_config(CONFIGS / "demo.yaml", ["optim.lr=3e-3", "run.seed=2", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 3e-3 and isinstance(cfg.optim.lr, float)  # YAML reads 3e-3 as a string
    assert cfg.run.seed == 2 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.model.hidden_size == 64 and cfg.data.source == "synthetic"


def test_base_chain_and_paper_recipes():
    pythia = load_config(CONFIGS / "pythia70m_wikitext103.yaml")
    assert (pythia.model.hidden_size, pythia.model.num_layers, pythia.model.num_heads) == (512, 6, 8)
    assert (pythia.model.rotary_pct, pythia.model.parallel_residual, pythia.model.tie_embeddings) == (0.25, True, False)
    assert (pythia.optim.lr, pythia.optim.weight_decay, pythia.optim.betas, pythia.optim.eps) == (
        1e-3,
        0.01,
        (0.9, 0.999),
        1e-8,
    )
    assert (pythia.data.batch_size, pythia.data.seq_len, pythia.schedule.total_steps) == (24, 512, 20_000)
    assert pythia.optim.grad_clip is None and pythia.checkpoint.every == 250
    llama = load_config(CONFIGS / "llama70m_wikitext103.yaml")
    assert (llama.model.arch, llama.model.intermediate_size, llama.model.num_kv_heads) == ("llama", 1376, 8)
    assert llama.optim == pythia.optim and llama.data.hf_name == "wikitext-103-raw-v1"
    cont = load_config(CONFIGS / "continue_from_pythia70m.yaml")
    assert cont.model.pretrained == "EleutherAI/pythia-70m"
    for name in ("lr_sweep", "weight_decay_sweep", "local_corpus", "demo", "pythia70m_tokens"):
        assert isinstance(load_config(CONFIGS / f"{name}.yaml"), Config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", r"unknown key\(s\) \['lrr'\] in optim"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("data.seq_len=1.5", "data.seq_len must be an integer"),
        ("data.source=s3", r"data.source must be one of \['hf', 'local', 'tokens', 'synthetic'\]"),
        ("logging.progress=maybe", "logging.progress must be true or false"),
        ("optim.betas=[0.9]", r"optim.betas needs 2 values"),
        ("nosection.x=1", r"unknown key\(s\) \['nosection'\] in the top level"),
        ("optim.lr", "not of the form"),
        ("logging.log_every=7", "resume_every=100 must be a multiple of logging.log_every=7"),
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("optim.eps=.inf", "optim.eps must be a finite number"),
        ("model.init_std=.inf", "model.init_std must be a finite number"),
        ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number, got nan"),
        ("schedule.total_steps=.inf", "schedule.total_steps must be a finite integer"),
        ("schedule.total_steps=.nan", "schedule.total_steps must be a finite integer"),
        ("run.device=tpu", "run.device must be one of auto, cpu, cuda, cuda:N, mps; got 'tpu'"),
        ("run.device=cuda:x", "run.device must be one of"),
        ("data.max_train_tokens=-5", r"data.max_train_tokens must be null \(all\) or at least one sequence"),
        ("model.num_kv_heads=2", "model.num_kv_heads is used by arch=llama only"),
        ("run.max_nonfinite_steps=0", "run.max_nonfinite_steps must be > 0"),
        ("run.seed=-1", r"run.seed must be in \[0, 2\*\*63\)"),
    ],
)
def test_validation_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "demo.yaml", [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "llama70m_wikitext103.yaml", ["run.seed=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")


def test_schedule_table_of_the_paper_recipe():
    s = load_config(CONFIGS / "pythia70m_wikitext103.yaml").schedule
    table = {step: lr_at(step, 1e-3, s) for step in (0, 99, 199, 200, 10_100, 19_999, 25_000)}
    assert table[0] == pytest.approx(1e-3 / 200)
    assert table[99] == pytest.approx(0.5e-3)
    assert table[199] == pytest.approx(1e-3) and table[200] == pytest.approx(1e-3)
    assert table[10_100] == pytest.approx(0.55e-3)  # halfway through the cosine: (1 + 0.1) / 2
    assert table[19_999] == pytest.approx(1e-4, rel=1e-6)
    assert table[25_000] == pytest.approx(1e-4)  # past the end: the floor
    with pytest.raises(ValueError):
        lr_at(-1, 1e-3, s)


def test_llama_kv_heads_must_divide_the_heads():
    with pytest.raises(ConfigError, match=r"model.num_kv_heads must be a positive divisor of model.num_heads=8"):
        load_config(CONFIGS / "llama70m_wikitext103.yaml", ["model.num_kv_heads=-1"])
    with pytest.raises(ConfigError, match=r"got 3"):
        load_config(CONFIGS / "llama70m_wikitext103.yaml", ["model.num_kv_heads=3"])
    assert load_config(CONFIGS / "llama70m_wikitext103.yaml", ["model.num_kv_heads=2"]).model.num_kv_heads == 2


def test_documented_device_values_are_accepted():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"):
        assert load_config(CONFIGS / "demo.yaml", [f"run.device={device}"]).run.device == device
