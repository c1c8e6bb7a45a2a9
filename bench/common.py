"""Shared pieces of the benchmarks: Pythia parameter shapes, a small GPT-NeoX from CLI sizes, timing (CUDA events on
a GPU, the wall clock on the CPU), and the JSON every benchmark can write (``--json PATH``: the figures with the
device, torch, Triton and CUDA versions they were measured with; ``results/bench/`` keeps them).

Pythia configs (EleutherAI/pythia-*/config.json): vocab padded to 50304, untied embeddings, FFN = 4·d.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train import provenance  # bench scripts run from the checkout with PYTHONPATH=.

#: name -> (vocab, d_model, layers, ffn)
PYTHIA = {
    "pythia-70m": (50304, 512, 6, 2048),
    "pythia-410m": (50304, 1024, 24, 4096),
    "pythia-1.4b": (50304, 2048, 24, 8192),
}
#: The same layout at toy size, for ``--smoke`` runs (the CPU dry run of ``python -m experiments.gpu_evidence``).
SMOKE = {"pythia-smoke": (512, 64, 2, 256)}


def pythia_shapes(name: str = "pythia-70m") -> list[tuple[int, ...]]:
    vocab, d, layers, ffn = {**PYTHIA, **SMOKE}[name]
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


def median_ms(fn, repeats: int, warmup: int = 5, device: str | torch.device = "cuda") -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU, the synchronised wall clock elsewhere."""
    if torch.device(device).type == "cuda":
        return cuda_median_ms(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What a figure was measured on: device name, versions of torch / Triton / CUDA / Python, CPU and threads."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dict(provenance.device_description(device), **provenance.versions())


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json PATH`` (write the figures as JSON) and ``--smoke`` (toy sizes, a few repeats, any device: checks
    that the script runs, e.g. in the CPU dry run of the evidence command; its figures mean nothing)."""
    parser.add_argument("--json", default=None, help="also write the results as JSON to this path")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and few repeats: a run check, not a benchmark")


def write_json(path: str | None, bench: str, args: argparse.Namespace, env: dict, rows: list[dict],
               targets: list[dict], **extra: Any) -> None:  # fmt: skip
    """The benchmark's record: what ran (command, arguments), where (``env``), its rows and its targets, each target
    with the measured value and whether it is met."""
    if path is None:
        return
    record = dict(bench=bench, command=[Path(sys.argv[0]).as_posix(), *sys.argv[1:]], args=vars(args),
                  smoke=bool(getattr(args, "smoke", False)), env=env, rows=rows, targets=targets,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra)  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=1, allow_nan=False, default=_plain) + "\n")


def target(name: str, value: float | None, op: str, bound: float, unit: str = "", note: str = "") -> dict[str, Any]:
    """One target: ``value op bound`` (``op`` is "<=" or ">="); ``met`` is None when there is no value."""
    met = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return dict(name=name, value=value, op=op, bound=bound, unit=unit, met=met, note=note)


def _plain(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


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


def timer(device: str) -> Callable[[Callable[[], None]], float]:
    """Seconds one call takes: wall clock on CPU, CUDA events on a GPU (after the queue is drained)."""
    if device == "cpu":

        def cpu(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        return cpu

    def cuda(fn):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return cuda


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"
