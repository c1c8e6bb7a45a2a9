"""The force arithmetic of ``instrumented_adamw/optim/forces.py`` on its own, against values computed here.

* ``forces_from_reductions``: every accepted form of the update lr (None, float, 0-d, one per row) gives the
  documented formulas, in float64, exactly (the same few operations; compared at 1e-15 relative).
* ``additive_columns``: the tables of two shards of a tensor, combined as the FSDP read-out combines them, equal the
  table of the whole tensor (element sums add; lr, λ, η·λ and the step counters do not).
* ``fp32_closure_bound``: the documented bound, term by term (storage rounding with ε₃₂ = 2⁻²³, the reductions'
  γ₁₂₈ = 128u/(1 − 128u) with u = 2⁻²⁴), so a changed constant or term fails here rather than only loosening the
  residual checks it backs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from instrumented_adamw.optim import forces
from instrumented_adamw.optim.forces import LAST_KEYS, ForceStats, additive_columns, forces_from_reductions


def _expected(red: torch.Tensor, lr: float, wd: float, eta_u: torch.Tensor) -> dict[str, torch.Tensor]:
    wu, uu, ww = red.unbind(1)
    shrink = lr * wd
    return {
        "w_dot_u": wu, "u_sq": uu, "w_sq": ww,
        "align": -2 * eta_u * wu, "inject": eta_u**2 * uu, "decay": -2 * shrink * ww,
        "higher_order": 2 * eta_u * shrink * wu + shrink**2 * ww, "eta_lambda": torch.full_like(wu, shrink),
        "lr": torch.full_like(wu, lr), "weight_decay": torch.full_like(wu, wd), "update_lr": eta_u.expand_as(wu),
    }  # fmt: skip


@pytest.mark.parametrize(
    "update_lr",
    [None, 3e-3, torch.tensor(3e-3), torch.tensor([3e-3]), torch.tensor([[3e-3]]), torch.tensor([1e-3, 2e-3, 4e-3])],
    ids=["none", "float", "0-d", "[1]", "[1,1]", "per-row"],
)
def test_forces_follow_the_documented_formulas_for_every_form_of_the_update_lr(update_lr):
    g = torch.Generator().manual_seed(0)
    red = torch.randn(3, 3, generator=g, dtype=torch.float64)
    red[:, 1:] = red[:, 1:].abs() + 0.5  # squared norms are positive
    lr, wd = 1e-2, 0.1
    if update_lr is None:
        eta_u = torch.tensor(lr, dtype=torch.float64)
    else:
        eta_u = torch.as_tensor(update_lr, dtype=torch.float64).reshape(-1)
        eta_u = eta_u if eta_u.numel() == 3 else eta_u.reshape(())
    got = forces_from_reductions(red, lr, wd, update_lr=update_lr)
    assert got.shape == (3, len(LAST_KEYS)) and got.dtype == torch.float64
    for j, key in enumerate(LAST_KEYS):
        torch.testing.assert_close(got[:, j], _expected(red, lr, wd, eta_u)[key], rtol=1e-15, atol=0, msg=key)
    total = got[:, [LAST_KEYS.index(f) for f in forces.FORCES]].sum(1)
    w, wu, uu = red[:, 2], red[:, 0], red[:, 1]
    exact = (1 - lr * wd) ** 2 * w - 2 * (1 - lr * wd) * eta_u * wu + eta_u**2 * uu - w  # ‖W₊‖² − ‖W‖²
    torch.testing.assert_close(total, exact, rtol=1e-12, atol=1e-15)


def test_shard_tables_combined_as_the_read_out_does_equal_the_whole_tensor_table():
    """Two halves of a tensor recorded as shards, then summed on the additive columns only (what the FSDP read-out's
    all-reduce does): the whole tensor's table, every column — last step, interval sums, counters, start ‖W‖²."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 64, generator=g, dtype=torch.float64)
    tables = {}
    for label, parts in (("whole", [w.reshape(-1)]), ("a", [w[0]]), ("b", [w[1]])):
        stats = ForceStats(torch.device("cpu"))
        stats.add_rows(["t"])
        for step in range(3):
            u = torch.randn(2, 64, generator=torch.Generator().manual_seed(10 + step), dtype=torch.float64)
            part_u = {"whole": u.reshape(-1), "a": u[0], "b": u[1]}[label]
            part_w = parts[0]
            red = torch.stack([part_w @ part_u, part_u @ part_u, part_w @ part_w])[None]
            stats.record((0,), forces_from_reductions(red, 1e-2, 0.1))
            parts = [part_w * (1 - 1e-3) - 1e-2 * part_u]
        tables[label] = stats.table.clone()
    cols = torch.tensor(additive_columns())
    combined = torch.where(cols, tables["a"] + tables["b"], tables["a"])
    torch.testing.assert_close(combined, tables["whole"], rtol=1e-12, atol=1e-15)
    assert cols.any() and not cols.all()


def test_fp32_closure_bound_is_the_documented_bound():
    u32 = 2.0**-24
    assert u32 == torch.finfo(torch.float32).eps / 2
    gamma = 128 * u32 / (1 - 128 * u32)
    assert forces.GAMMA_ROW == gamma and 7.62e-6 < gamma < 7.64e-6

    def documented(w_sq, w_next_sq, u_sq, lr, wd):
        w, w_next, u, el = math.sqrt(w_sq), math.sqrt(w_next_sq), math.sqrt(u_sq), lr * wd
        delta = 2 * u32 * ((1 - el) * w + 3 * lr * u + w_next)  # ‖δ‖ of the stored W₊
        storage = 2 * w_next * delta + 3 * delta**2
        reductions = gamma * (2 * lr * (1 + el) * w * u + lr**2 * u_sq + el * (2 + el) * w_sq)
        return storage + reductions

    # Ordinary steps, decay-dominated ones, and a tensor that collapses in one step (W₊ = 0).
    for args in [(4.0, 3.9, 9.0, 1e-3, 0.1), (1e4, 9.9e3, 1e-2, 1e-2, 5.0), (4.0, 0.0, 9.0, 1e-3, 0.0)]:
        assert forces.fp32_closure_bound(*args) == pytest.approx(documented(*args), rel=1e-14), args


def _readout(stats: ForceStats) -> forces.ForceReadout:
    return forces.ForceReadout.from_tables(stats.names, stats.table.numpy(), np.ones(len(stats.names)))


def test_record_with_a_device_mask_counts_unmeasured_steps_as_compiled_steps_do():
    """Under torch.compile with track_every > 1 the choice to measure stays on the device: ``record`` gets the mask.
    Counted here directly (coverage cannot see code that Dynamo traces, so this is where a slip would show)."""
    stats = ForceStats(torch.device("cpu"))
    stats.add_rows(["a", "b"])
    red = torch.tensor([[0.5, 2.0, 3.0], [0.1, 1.0, 1.0]], dtype=torch.float64)
    values = forces_from_reductions(red, 1e-2, 0.1)
    for measured in (True, False, False, True, False):
        stats.record((0, 1), values, measured=torch.tensor(measured))
    r = _readout(stats)
    assert list(r.steps) == [2, 2] and list(r.unmeasured_steps) == [3, 3] and list(r.nonfinite_steps) == [0, 0]
    assert np.isnan(r.residual).all() and np.isnan(r.last_residual).all()  # one unmeasured step after the last
    stats.record((1,), values[1:], measured=torch.tensor(True))
    r = _readout(stats)
    assert list(r.steps) == [2, 3] and np.isnan(r.last_residual[0]) and np.isfinite(r.last_residual[1])
    # A skipped step (GradScaler found inf) changes nothing, measured or not.
    before = stats.table.clone()
    stats.record((0, 1), values, skip=torch.tensor(1.0), measured=torch.tensor(False))
    stats.record((0, 1), values, skip=torch.tensor(1.0))
    assert torch.equal(stats.table, before)
    stats.record_unmeasured((0,))
    stats.record_unmeasured((0,), skip=torch.tensor(1.0))
    assert list(_readout(stats).unmeasured_steps) == [4, 3]


def test_nonfinite_steps_are_counted_apart_and_a_reset_clears_every_counter():
    stats = ForceStats(torch.device("cpu"))
    stats.add_rows(["a"])
    good = forces_from_reductions(torch.tensor([[0.5, 2.0, 3.0]], dtype=torch.float64), 1e-2, 0.1)
    bad = forces_from_reductions(torch.tensor([[float("nan"), 2.0, 3.0]], dtype=torch.float64), 1e-2, 0.1)
    for values in (good, bad, bad, good):
        stats.record((0,), values)
    stats.record_unmeasured((0,))
    r = _readout(stats)
    assert (r.steps[0], r.nonfinite_steps[0], r.unmeasured_steps[0]) == (2, 2, 1) and r.last_finite[0]
    np.testing.assert_allclose(r.interval[0], 2 * good[0, : len(forces.QUANTITIES)].numpy(), rtol=1e-15)
    stats.reset_interval(torch.tensor([3.0], dtype=torch.float64))
    r = _readout(stats)
    assert (r.steps[0], r.nonfinite_steps[0], r.unmeasured_steps[0]) == (0, 0, 0)
    assert (r.interval == 0).all() and r.residual[0] == 1.0 - 3.0  # books open at the read's ‖W‖²


def test_a_reset_without_a_read_leaves_the_start_unknown_until_the_first_step():
    stats = ForceStats(torch.device("cpu"))
    stats.add_rows(["a"])
    values = forces_from_reductions(torch.tensor([[0.5, 2.0, 3.0]], dtype=torch.float64), 1e-2, 0.1)
    stats.reset_interval(torch.tensor([5.0], dtype=torch.float64))
    stats.reset_interval(None)  # e.g. a table whose tensors were just (re)tracked
    assert np.isnan(_readout(stats).residual).all()  # no read, no step: where the books open is unknown
    stats.record((0,), values)
    r = _readout(stats)
    forces_sum = values[0, [forces.LAST_KEYS.index(f) for f in forces.FORCES]].sum().item()
    assert r.residual[0] == pytest.approx(1.0 - 3.0 - forces_sum, rel=1e-15)  # opened at the step's own ‖W‖² = 3


def test_readouts_concatenate_refuse_a_tensor_twice_and_are_immutable():
    stats = ForceStats(torch.device("cpu"))
    stats.add_rows(["a", "b"])
    stats.record((0, 1), forces_from_reductions(torch.tensor([[0.5, 2.0, 3.0], [0.1, 1.0, 1.0]]).double(), 1e-2, 0.1))
    r = _readout(stats)
    other = forces.ForceReadout.from_tables(["c"], stats.table[:1].numpy(), np.ones(1))
    both = forces.ForceReadout.concat([r, other])
    assert both.names == ("a", "b", "c") and len(both) == 3 and list(both.steps) == [1, 1, 1]
    np.testing.assert_array_equal(both.last[2], r.last[0])
    assert forces.ForceReadout.concat([other]).names == ("c",)
    for empty in (forces.ForceReadout.concat([]), forces.ForceReadout.empty()):
        assert len(empty) == 0 and empty.last.shape == (0, len(LAST_KEYS))
        assert empty.steps.shape == empty.w_sq_now.shape == empty.residual.shape == (0,)
    with pytest.raises(ValueError, match="track a tensor twice"):
        forces.ForceReadout.concat([r, r])
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.steps = np.zeros(2)  # a read-out is a value: the monitor and sinks share it
    rows = both.interval_dict()
    assert rows["c"]["steps"] == 1 and rows["c"]["nonfinite_steps"] == 0 and rows["c"]["unmeasured_steps"] == 0
    assert rows["a"]["residual"] == pytest.approx(float(r.residual[0])) and rows["a"]["align"] == r.interval[0, 3]
