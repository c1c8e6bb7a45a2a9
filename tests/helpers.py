"""Shared test fixtures: a small two-group parameter set, deterministic gradients, a float64 reference."""

from __future__ import annotations

import torch

from instrumented_adamw import InstrumentedAdamW

# Shapes chosen so that the blocked reduction sees both full rows and a tail (4810 = 37*128 + 74), a bias, and a
# tensor smaller than one row.
SHAPES = {"enc.weight": (37, 130), "enc.bias": (37,), "dec.weight": (64, 128), "norm.weight": (5,)}
GROUPS = ({"names": ("enc.weight", "enc.bias"), "lr": 1e-2}, {"names": ("dec.weight", "norm.weight"), "lr": 3e-3})


def make_params(dtype=torch.float32, seed=0, device="cpu") -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in SHAPES.items():
        base = torch.ones(shape) if name == "norm.weight" else 0.02 * torch.randn(shape, generator=g)
        out[name] = torch.nn.Parameter(base.to(device=device, dtype=dtype))
    return out


def param_groups(params: dict[str, torch.nn.Parameter], weight_decay: float, named: bool = True) -> list[dict]:
    groups = []
    for i, spec in enumerate(GROUPS):
        items = [(n, params[n]) for n in spec["names"]]
        groups.append(
            {
                "params": items if named else [p for _, p in items],
                "lr": spec["lr"],
                "weight_decay": weight_decay * (1 + i),
            }
        )
    return groups


def set_grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    """Gradient of a quadratic pull towards a moving target plus noise: W·û is clearly nonzero, as in training."""
    g = torch.Generator().manual_seed(1000 + step)
    for p in params.values():
        noise = torch.randn(p.shape, generator=g)
        p.grad = (0.5 * p.detach().float() - 0.01 + 0.05 * noise.to(p.device)).to(p.dtype)


def step_twins(pa, ref_step, pb, our_step, steps: int, every_step: bool = False) -> None:
    """``steps`` steps of a reference and of ours on the same gradients; their parameters must stay bitwise equal
    (checked after every step, or after the last)."""
    for s in range(steps):
        set_grads(pa, s)
        set_grads(pb, s)
        ref_step()
        our_step()
        if every_step or s == steps - 1:
            for (name, a), b in zip(pa.items(), pb.values(), strict=True):
                assert torch.equal(a, b), f"{name} differs after step {s + 1}"


def twin_optimizers(flags: dict, dtype=torch.float32, weight_decay=0.01, device="cpu", **ours_kw):
    """torch.optim.AdamW and InstrumentedAdamW on identical copies of the same parameters."""
    pa, pb = make_params(dtype, device=device), make_params(dtype, device=device)
    ref = torch.optim.AdamW(param_groups(pa, weight_decay, named=False), **flags)
    ours = InstrumentedAdamW(param_groups(pb, weight_decay), **flags, **ours_kw)
    return pa, ref, pb, ours


def reference_reductions(w_pre: torch.Tensor, state: dict, beta1: float, beta2: float, eps: float, amsgrad: bool):
    """float64 (⟨W,û⟩, ‖û‖², ‖W‖²) from the pre-update weights and the stored post-step moments."""
    w = w_pre.double()
    m = state["exp_avg"].double()
    v = (state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]).double()
    step = float(state["step"])
    u = (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)
    return (w * u).sum().item(), (u * u).sum().item(), (w * w).sum().item()


def assert_kernel_record_is_host_record(monkeypatch, device: str) -> None:
    """The Triton path's in-kernel table update against ``ForceStats.record`` (the definition): two identical runs,
    one recording in the kernel, one through the host path (``optim._is_float`` answering no), must leave bitwise
    equal tables after every step, and equal parameters, over what the table tracks: an lr schedule, a tensor left
    out by ``track_filter``, reads that reset the interval, steps skipped by GradScaler's found_inf, a non-finite
    gradient, and ``track_every`` leaving steps unmeasured."""
    import instrumented_adamw.optim.adamw as optim_module

    def run(in_kernel: bool):
        monkeypatch.setattr(
            optim_module, "_is_float", (lambda x: isinstance(x, float)) if in_kernel else (lambda x: False)
        )
        params = make_params(device=device)
        opt = InstrumentedAdamW(param_groups(params, 0.05), lr=3e-3, fused=True, track_every=3,
                                track_filter=lambda n: "bias" not in n)  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.3 * s))
        host_records = []
        real_record = opt._record
        monkeypatch.setattr(opt, "_record", lambda *a, **k: host_records.append(1) or real_record(*a, **k))
        tables, reads = [], []
        for step in range(14):
            set_grads(params, step)
            if step == 8:  # a non-finite gradient: NaN reductions, kept out of the sums
                next(iter(params.values())).grad[0, 0] = float("nan")
            # GradScaler's skip and scale (0-d, as it passes them)
            opt.found_inf = torch.tensor(1.0 if step in (4, 5) else 0.0, device=device)
            opt.grad_scale = torch.tensor(1.0, device=device)
            opt.step()
            sched.step()
            if step in (6, 11):
                reads.append(opt.read_forces(reset=True))
            (stats,) = opt._stats.values()
            tables.append(stats.table.cpu())
        return tables, reads, [p.detach().cpu() for p in params.values()], len(host_records)

    kernel_tables, kernel_reads, kernel_params, kernel_host_records = run(True)
    host_tables, _, host_params, host_records = run(False)
    assert kernel_host_records == 0 and host_records > 0  # each run took the path it is meant to compare
    for step, (a, b) in enumerate(zip(kernel_tables, host_tables, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m, s=step: f"step {s}: {m}")
    for a, b in zip(kernel_params, host_params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # The run exercised what it claims: skipped, non-finite and unmeasured steps, and some rows left untracked.
    last = kernel_reads[-1]
    assert last.nonfinite_steps.max() >= 1 and last.unmeasured_steps.max() >= 1
    assert len(last.names) < len(kernel_params)
