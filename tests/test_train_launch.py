"""What a launch settles before training: the device, the network services it needs, its arguments.

Network tests are hermetic: the hub cache is an empty temporary directory and the network is a stub that swallows
every connection attempt (as a firewall that drops packets does), so nothing depends on this machine's network.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instrumented_adamw.utils import netcheck
from train.loop import DeviceUnavailableError, resolve_device
from train.models import PretrainedUnavailableError, load_pretrained
from train.sweep import parse_args

ROOT = Path(__file__).resolve().parent.parent

#: Generous bound for "fails within a few seconds": the probe waits 1 s here, a loaded CI machine adds the rest.
FAST_S = 10.0


def test_every_documented_device_value_resolves_to_a_usable_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceUnavailableError, match=r"run.device=cuda, but no CUDA device .* use run.device=cpu"):
            resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match="run.device=mps"):
        resolve_device("mps")
    # A machine with two GPUs, on CPU: torch.cuda.set_device needs an index, which a bare "cuda" lacks.
    selected = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", selected.append, raising=False)
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        torch.cuda.set_device(torch.device("cuda"))  # the failure run.device=cuda used to hit
    for spec, local_rank, index in (("cuda", 0, 0), ("cuda", 1, 1), ("auto", 1, 1), ("cuda:1", 0, 1)):
        device = resolve_device(spec, local_rank)
        assert device == torch.device("cuda", index)
        torch.cuda.set_device(device)
        assert selected[-1] == index
    with pytest.raises(DeviceUnavailableError, match=r"run.device=cuda:2 .* 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty hub cache and a network where every connection attempt hangs."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in netcheck.PROXY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(netcheck, "PROBE_TIMEOUT_S", 1.0)

    def swallowed(*args, **kwargs):
        time.sleep(60)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", swallowed)


def test_pretrained_model_without_network_fails_in_seconds_naming_what_to_do(no_network):
    t0 = time.perf_counter()
    with pytest.raises(PretrainedUnavailableError) as err:
        load_pretrained("EleutherAI/pythia-70m", "step143000")
    assert time.perf_counter() - t0 < FAST_S
    message = str(err.value)
    assert "the Hugging Face hub (https://huggingface.co) does not answer" in message
    assert "`hf download EleutherAI/pythia-70m --revision step143000 --local-dir DIR`" in message
    assert "model.pretrained=DIR" in message and "HF_HUB_OFFLINE=1" in message


def test_wandb_online_with_an_unreachable_server_fails_in_seconds(no_network, monkeypatch, tmp_path):
    from instrumented_adamw.sinks import WandbSink

    monkeypatch.delenv("WANDB_MODE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"does not answer .* logging.wandb_mode=offline .* `wandb sync"):
        WandbSink("p", directory=tmp_path, mode="online")
    assert time.perf_counter() - t0 < FAST_S


def test_probe_is_bounded_even_when_the_name_lookup_hangs(no_network):
    t0 = time.perf_counter()
    assert netcheck.endpoint_reachable("https://huggingface.co") is False
    assert time.perf_counter() - t0 < 3.0


def test_sweep_overrides_may_come_before_or_after_options():
    for argv in (["s.yaml", "--parallel", "3", "a.b=1", "c.d=2"], ["s.yaml", "a.b=1", "--parallel", "3", "c.d=2"],
                 ["--parallel", "3", "s.yaml", "a.b=1", "c.d=2"]):  # fmt: skip
        args = parse_args(argv)
        assert (args.config, args.overrides, args.parallel) == ("s.yaml", ["a.b=1", "c.d=2"], 3)
    with pytest.raises(SystemExit):
        parse_args(["s.yaml", "--parallel", "0"])


def test_a_missing_trainer_dependency_names_the_extra(monkeypatch, capsys):
    import importlib.util

    import train.__main__ as entry

    real = importlib.util.find_spec
    monkeypatch.setattr(entry.importlib.util, "find_spec", lambda name, *a: None if name == "yaml" else real(name, *a))
    assert entry.main(["configs/demo.yaml"]) == 2
    assert "missing here: yaml. Install them with: pip install 'instrumented-adamw[train]'" in capsys.readouterr().err


def test_a_config_error_is_named_before_torch_or_transformers_load():
    """The common first-hour mistake answers in a fraction of a second: nothing heavy is imported for it."""
    code = ("import sys\nfrom train.__main__ import main\nrc = main(['configs/demo.yaml', 'optim.lr=abc'])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    assert done.stdout.strip() == "2 []", done.stderr
    assert "config error: optim.lr must be a number, got 'abc'" in done.stderr
