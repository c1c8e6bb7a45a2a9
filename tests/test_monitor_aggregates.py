"""Monitor aggregates against values computed independently of ``monitor.aggregate``.

The per-tensor ground truth here is accumulated step by step from ``opt.last_forces()`` (a read that does not reset
the interval), and every class and layer entry, and every flat metric, is recomputed from those per-tensor values
with its documented definition. A monitor that sums where it should average (T/τ), takes the interval where it
should take the last step (cos(W, û)), or skips a log step, fails here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from models import tiny_model

from instrumented_adamw import LAST_KEYS, QUANTITIES, InstrumentedAdamW
from instrumented_adamw.monitor import ForceMonitor, equilibrium_norm
from instrumented_adamw.sinks import JsonlSink, read_jsonl

STEPS, LOG_EVERY, FIT_EVERY = 40, 4, 8  # step 40 is the 10th log: a skip-every-10th bug shows
Q = {q: i for i, q in enumerate(QUANTITIES)}
L = {k: i for i, k in enumerate(LAST_KEYS)}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A user's loop with ForceMonitor.step, and the per-tensor truth accumulated beside it."""
    out = tmp_path_factory.mktemp("agg")
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))  # lr varies: T/τ per step too
    monitor = ForceMonitor(opt, model, [JsonlSink(out)], log_every=LOG_EVERY, weibull_every=FIT_EVERY)
    names = opt.tracked_names
    truth, acc, steps = {}, np.zeros((len(names), len(QUANTITIES))), np.zeros(len(names))
    for s in range(1, STEPS + 1):
        ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(s))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        r = opt.last_forces()
        acc += r.last[:, : len(QUANTITIES)]
        steps += 1
        if s % LOG_EVERY == 0:
            w_now = np.array([p.detach().double().pow(2).sum().item() for _, p in opt.tracked_parameters()])
            truth[s] = dict(interval=acc.copy(), last=r.last.copy(), steps=steps.copy(), w_now=w_now)
            acc[:], steps[:] = 0.0, 0
        monitor.step(s, loss=float(s))
        sched.step()
    monitor.close()
    numel = np.array([p.numel() for _, p in opt.tracked_parameters()], dtype=np.float64)
    return dict(out=out, names=names, truth=truth, numel=numel, roles=monitor.roles)


def _expected(t, rows, numel):
    """Every aggregate of one set of tensors, from the per-tensor truth, by the documented definitions."""
    iv, last = t["interval"][rows], t["last"][rows]
    s = iv.sum(axis=0)
    a, i, d = s[Q["align"]], s[Q["inject"]], s[Q["decay"]]
    budget = abs(a) + i + abs(d)
    w_now, n = t["w_now"][rows].sum(), numel[rows].sum()
    u_norm = math.sqrt((iv[:, Q["u_sq"]] / t["steps"][rows]).sum())
    cos_interval = s[Q["w_dot_u"]] / math.sqrt(s[Q["w_sq"]] * s[Q["u_sq"]])
    lr, wd = last[:, L["lr"]].mean(), last[:, L["weight_decay"]].mean()
    return dict(
        align=a, inject=i, decay=d,
        align_share=abs(a) / budget, inject_share=i / budget, decay_share=abs(d) / budget,
        net=a + i + d + s[Q["higher_order"]],
        eta_lambda=iv[:, Q["eta_lambda"]].mean(),  # a per-step hyperparameter: the mean, not the sum
        rms=math.sqrt(w_now / n),
        cos_w_u=last[:, Q["w_dot_u"]].sum() / math.sqrt(last[:, Q["u_sq"]].sum() * last[:, Q["w_sq"]].sum()),
        cos_w_u_interval=cos_interval,
        rms_eq=equilibrium_norm(u_norm, cos_interval, lr, wd) / math.sqrt(n),
        rms_eq_indep=equilibrium_norm(u_norm, 0.0, lr, wd) / math.sqrt(n),
        steps=int(t["steps"][rows].max()),
    )  # fmt: skip


def test_every_log_step_and_fit_step_is_written_once(logged):
    out = logged["out"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [r["step"] for r in read_jsonl(out / "forces.jsonl")] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    assert [r["step"] for r in read_jsonl(out / "weibull.jsonl")] == list(range(FIT_EVERY, STEPS + 1, FIT_EVERY))


def test_tensor_entries_equal_the_step_by_step_truth(logged):
    for rec in read_jsonl(logged["out"] / "forces.jsonl"):
        t = logged["truth"][rec["step"]]
        for i, name in enumerate(logged["names"]):
            entry = rec["tensors"][name]
            for q in ("w_dot_u", "u_sq", "w_sq", "align", "inject", "decay", "higher_order"):
                assert entry[q] == pytest.approx(t["interval"][i, Q[q]], rel=1e-12, abs=1e-300), (name, q)
            assert entry["steps"] == t["steps"][i] == LOG_EVERY
            assert entry["last_align"] == t["last"][i, L["align"]] and entry["last_lr"] == t["last"][i, L["lr"]]
            assert entry["w_sq_now"] == pytest.approx(t["w_now"][i], rel=1e-6)


def test_class_and_layer_entries_and_metrics_follow_their_definitions(logged):
    names, numel, roles = logged["names"], logged["numel"], logged["roles"]
    classes = {
        c: np.array([i for i, n in enumerate(names) if roles[n].cls == c]) for c in {r.cls for r in roles.values()}
    }
    layers = {str(k): np.array([i for i, n in enumerate(names) if roles[n].layer == k])
              for k in {r.layer for r in roles.values() if r.layer is not None}}  # fmt: skip
    metrics = {m["step"]: m for m in read_jsonl(logged["out"] / "metrics.jsonl")}
    t_over_tau = dict.fromkeys(classes, 0.0)
    for rec in read_jsonl(logged["out"] / "forces.jsonl"):
        t = logged["truth"][rec["step"]]
        for group, sets in (("classes", classes), ("layers", layers)):
            for key, rows in sets.items():
                want = _expected(t, rows, numel)
                got = rec[group][key]
                for k, v in want.items():
                    assert got[k] == pytest.approx(v, rel=1e-6), (rec["step"], group, key, k)
        for c, rows in classes.items():
            t_over_tau[c] += _expected(t, rows, numel)["eta_lambda"]
            assert rec["classes"][c]["t_over_tau"] == pytest.approx(t_over_tau[c], rel=1e-12)
            m = metrics[rec["step"]]
            assert m[f"{c}/t_over_tau"] == rec["classes"][c]["t_over_tau"]
            for k in ("align_share", "inject_share", "decay_share", "rms", "net", "cos_w_u", "rms_eq"):
                assert m[f"{c}/{k}"] == rec["classes"][c][k]
        assert metrics[rec["step"]]["loss"] == float(rec["step"])
    # T/τ of a class is Σ_t η_t λ_t: all its tensors share one group here, so it equals one tensor's sum.
    lr_sum = sum(0.1 * 3e-3 / (1 + 0.1 * s) for s in range(STEPS))
    assert t_over_tau["Transmission"] == pytest.approx(lr_sum, rel=1e-9)


def test_weibull_summary_is_each_class_median_of_its_own_blocks(logged):
    """The fit record's per-class k and λ medians, recomputed from its blocks: a class's median over only its own
    matrices, with the classes' medians apart so that mixing in another class's blocks shows."""
    for rec in read_jsonl(logged["out"] / "weibull.jsonl"):
        blocks, summary = rec["blocks"], rec["summary"]
        classes = {b["cls"] for b in blocks}
        assert len(classes) >= 2 and set(summary) == {
            f"weibull/{c}/{s}" for c in classes for s in ("k_median", "lam_median")
        }
        for c in classes:
            mine = [b for b in blocks if b["cls"] == c]
            assert summary[f"weibull/{c}/k_median"] == float(np.median([b["k"] for b in mine]))
            assert summary[f"weibull/{c}/lam_median"] == float(np.median([b["lam"] for b in mine]))
        lam = {c: summary[f"weibull/{c}/lam_median"] for c in classes}
        assert len(set(lam.values())) == len(lam), lam


# ---------------------------------------------------------------------------------------------- unit definitions
def test_shares_are_fractions_of_the_absolute_budget():
    from instrumented_adamw.monitor import shares

    assert shares(-9.0, 1.0, -2.0) == pytest.approx((0.75, 1 / 12, 1 / 6), rel=1e-15)
    assert shares(3.0, 0.5, 0.0) == pytest.approx((6 / 7, 1 / 7, 0.0), rel=1e-15)
    assert all(math.isnan(v) for v in shares(0.0, 0.0, 0.0))


def test_aggregate_residual_share_and_empty_selection_follow_their_definitions():
    from instrumented_adamw.monitor import aggregate
    from instrumented_adamw.optim.forces import ForceReadout, ForceStats, forces_from_reductions

    stats = ForceStats(torch.device("cpu"))
    stats.add_rows(["a", "b"])
    red = torch.tensor([[-0.5, 2.0, 3.0], [0.2, 1.0, 4.0]], dtype=torch.float64)
    stats.record((0, 1), forces_from_reductions(red, 1e-2, 0.1))
    readout = ForceReadout.from_tables(["a", "b"], stats.table.numpy(), np.array([2.9, 4.1]))
    out = aggregate(readout, np.array([0, 1]), np.array([10, 20]))
    col = {q: i for i, q in enumerate(QUANTITIES)}
    align, inject, decay = (readout.interval[:, col[q]].sum() for q in ("align", "inject", "decay"))
    budget = abs(align) + inject + abs(decay)
    assert out["rel_residual"] == pytest.approx(np.abs(readout.residual).sum() / budget, rel=1e-12)
    assert out["eta_lambda"] == pytest.approx(1e-3, rel=1e-12) and out["steps"] == 1
    forces_total = sum(readout.interval[:, col[q]].sum() for q in ("align", "inject", "decay", "higher_order"))
    assert out["net"] == pytest.approx(forces_total, rel=1e-12)
    assert out["residual"] == pytest.approx(readout.residual.sum(), rel=1e-12)  # measured steps only: books close
    last = readout.last
    assert out["cos_w_u"] == pytest.approx(last[:, 0].sum() / math.sqrt(last[:, 1].sum() * last[:, 2].sum()))
    assert out["rms"] == pytest.approx(math.sqrt(7.0 / 30), rel=1e-12)
    u_norm = math.sqrt(readout.interval[:, col["u_sq"]].sum())  # one step: the interval mean is that step's
    cos = out["w_dot_u"] / math.sqrt(out["w_sq"] * out["u_sq"])
    assert out["rms_eq"] == pytest.approx(equilibrium_norm(u_norm, cos, 1e-2, 0.1) / math.sqrt(30), rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy mean-of-empty warning either
        empty = aggregate(readout, np.array([], dtype=np.int64), np.array([10, 20]))
    assert empty["eta_lambda"] == 0.0 and math.isnan(empty["rms"])
    assert (empty["steps"], empty["nonfinite_steps"], empty["unmeasured_steps"]) == (0, 0, 0)


def test_closing_the_monitor_closes_its_sinks(tmp_path):
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters())
    sink = JsonlSink(tmp_path)
    closed = []
    real_close = sink.close
    sink.close = lambda: closed.append(True) or real_close()
    ForceMonitor(opt, model, [sink]).close()
    assert closed == [True]


def test_monitor_defaults_and_bad_intervals():
    """The documented defaults (log every 10 steps, per-tensor entries at every read, the papers' middle-80% fits),
    and each bad interval refused on its own."""
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters())
    mon = ForceMonitor(opt, model)
    assert (mon.log_every, mon.weibull_every, mon.per_tensor_every, mon.trim) == (10, 0, 0, 0.1)
    for kwargs in ({"log_every": 0}, {"weibull_every": -1}, {"per_tensor_every": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ForceMonitor(opt, model, **kwargs)


def _one_tensor_readout(red, lr, unmeasured=False, w_sq_now=0.1):
    """The read-out of one tensor after one step with reductions ``red`` = [⟨W,û⟩, ‖û‖², ‖W‖²] (λ = 0.1), recorded
    by the real force table; ``unmeasured`` adds a step that moved W unmeasured."""
    from instrumented_adamw.optim.forces import ForceReadout, ForceStats, forces_from_reductions

    stats = ForceStats(torch.device("cpu"))
    stats.add_rows(["a"])
    stats.record((0,), forces_from_reductions(torch.tensor([red], dtype=torch.float64), lr, 0.1))
    if unmeasured:
        stats.record_unmeasured((0,))
    return ForceReadout.from_tables(["a"], stats.table.numpy(), np.array([w_sq_now]))


def test_aggregate_guards_small_values_and_open_books():
    """cos(W, û) needs only ‖û‖² > 0 and ‖W‖² > 0 (not > 1); an interval with one unmeasured step has no residual
    (NaN, not the 0 a nansum of NaNs gives); a zero budget has no relative residual (NaN, not inf)."""
    from instrumented_adamw.monitor import aggregate

    readout = _one_tensor_readout
    small = aggregate(readout([0.01, 0.04, 0.09], 1e-2), np.array([0]), np.array([10]))  # ‖û‖² and ‖W‖² below 1
    assert small["cos_w_u"] == pytest.approx(0.01 / math.sqrt(0.04 * 0.09), rel=1e-12)
    assert small["cos_w_u_interval"] == pytest.approx(0.01 / math.sqrt(0.04 * 0.09), rel=1e-12)
    assert math.isfinite(small["residual"]) and math.isfinite(small["rel_residual"])
    open_books = aggregate(readout([0.01, 0.04, 0.09], 1e-2, unmeasured=True), np.array([0]), np.array([10]))
    assert open_books["unmeasured_steps"] == 1
    assert math.isnan(open_books["residual"]) and math.isnan(open_books["rel_residual"])
    no_budget = aggregate(readout([0.01, 0.04, 0.09], 0.0, w_sq_now=0.2), np.array([0]), np.array([10]))  # lr 0
    assert no_budget["align"] == no_budget["inject"] == no_budget["decay"] == 0.0
    assert no_budget["residual"] == pytest.approx(0.2 - 0.09, rel=1e-12) and math.isnan(no_budget["rel_residual"])


def test_per_tensor_sums_carry_every_count_between_entries():
    """With per_tensor_every > log_every, a read's per-tensor entry adds the pending sums of the reads since the last
    entry: each quantity, steps, nonfinite and unmeasured steps and the residual into its own column."""
    from instrumented_adamw.optim.forces import ForceReadout

    w = torch.nn.Parameter(torch.randn(3, 3))
    mon = ForceMonitor(InstrumentedAdamW([("w", w)], lr=1e-2), log_every=10, per_tensor_every=20)
    q = len(QUANTITIES)

    def readout(scale, steps, nonfinite, unmeasured, residual):
        return ForceReadout(
            names=("w",), last=np.zeros((1, len(LAST_KEYS))), interval=scale * np.arange(1.0, q + 1)[None, :],
            steps=np.array([steps]), nonfinite_steps=np.array([nonfinite]), unmeasured_steps=np.array([unmeasured]),
            last_finite=np.array([True]), w_sq_now=np.array([1.0]), residual=np.array([residual]),
            last_residual=np.array([0.0]),
        )  # fmt: skip

    mon._since_last_tensor_entry(readout(1.0, 10, 2, 3, 0.5))
    both = mon._since_last_tensor_entry(readout(10.0, 9, 1, 4, 0.25))
    np.testing.assert_array_equal(both.interval, 11.0 * np.arange(1.0, q + 1)[None, :])
    assert (both.steps[0], both.nonfinite_steps[0], both.unmeasured_steps[0]) == (19, 3, 7)
    assert both.residual[0] == 0.75


def test_zero_norms_give_nan_cosines_without_numpy_warnings():
    """A tensor whose û is exactly zero (no gradient yet) or whose W is zero has no angle: cos is NaN, decided by the
    guards before any division, so a monitored run does not print numpy's 0/0 warning at every log."""
    from instrumented_adamw.monitor import aggregate

    for red in ([0.0, 0.0, 4.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0]):  # û = 0; W = 0; both
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = aggregate(_one_tensor_readout(red, 1e-2, w_sq_now=red[2]), np.array([0]), np.array([10]))
        assert math.isnan(out["cos_w_u"]) and math.isnan(out["cos_w_u_interval"]), red


def test_model_type_comes_from_the_model_unless_given():
    """ForceMonitor(model=...) takes the naming table from ``model.config.model_type``; an explicit model_type
    wins over it (a GPT-NeoX model read with Llama's table leaves its attention matrices unclassified)."""
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters())
    own = ForceMonitor(opt, model)
    assert own.model_type == "gpt_neox"
    assert own.roles["gpt_neox.layers.0.attention.dense.weight"].cls == "Transmission"
    told = ForceMonitor(opt, model, model_type="llama")
    assert told.model_type == "llama"
    assert told.roles["gpt_neox.layers.0.attention.dense.weight"].cls != "Transmission"
    assert ForceMonitor(opt).model_type is None


def test_groups_aggregated_together_equal_each_alone_and_do_not_mix():
    """``aggregate_groups`` (a log's classes and layers in one pass) gives each set what it gives that set alone,
    with empty sets among them and a tensor whose last step is NaN/inf outside the set, which must not leak in."""
    from instrumented_adamw.monitor import aggregate, aggregate_groups
    from instrumented_adamw.optim.forces import ForceReadout

    rng = np.random.default_rng(0)
    n, q = 5, len(QUANTITIES)
    last = rng.uniform(0.1, 1.0, (n, len(LAST_KEYS)))
    last[4, :3] = (math.nan, math.inf, 1.0)  # a tensor whose last step went non-finite
    readout = ForceReadout(
        names=tuple(f"t{i}" for i in range(n)), last=last, interval=rng.uniform(0.1, 1.0, (n, q)),
        steps=np.array([10, 10, 7, 10, 3]), nonfinite_steps=np.array([0, 1, 0, 0, 2]),
        unmeasured_steps=np.array([0, 0, 0, 2, 0]), last_finite=np.array([True] * 4 + [False]),
        w_sq_now=rng.uniform(1.0, 2.0, n), residual=np.array([1e-9, math.nan, -2e-9, 3e-9, math.inf]),
        last_residual=np.zeros(n),
    )  # fmt: skip
    numel = np.array([10, 20, 30, 40, 50])
    groups = [np.array([0, 1]), np.array([], dtype=np.int64), np.array([2]), np.array([3, 0]), np.array([4])]
    together = aggregate_groups(readout, groups, numel)
    for rows, got in zip(groups, together, strict=True):
        alone = aggregate(readout, rows, numel)
        assert got.keys() == alone.keys()
        for key, value in alone.items():
            assert got[key] == pytest.approx(value, rel=1e-15, nan_ok=True), (rows, key)
    assert math.isfinite(together[0]["cos_w_u"]) and together[0]["residual"] == pytest.approx(1e-9)  # NaN: nansum
    assert math.isnan(together[3]["residual"])  # tensor 3 has unmeasured steps: the books are open
    assert together[1]["steps"] == 0 and math.isnan(together[1]["rms"])
    assert (together[0]["steps"], together[0]["nonfinite_steps"]) == (10, 1)
    assert aggregate_groups(readout, [], numel) == []


def test_update_and_weight_norms_and_composer_keys_equal_the_step_they_describe(tmp_path):
    """η_u‖û‖ of the last step, ‖W‖ now and their ratio, per class and (Composer's keys) per tensor, against the
    step itself: the update is W₊ − (1 − ηλ)W, measured on the weights before and after in float64."""
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    monitor = ForceMonitor(opt, model, [JsonlSink(tmp_path)], log_every=1, per_tensor=False, composer_keys=True)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt.step()
    record = monitor.log(1)
    monitor.close()
    update, param = {}, {}
    for n, p in model.named_parameters():
        step = p.detach().double() - (1 - 1e-2 * 0.1) * before[n]
        update[n], param[n] = float(step.norm()), float(p.detach().double().norm())
        assert record[f"l2_norm/update/{n}"] == pytest.approx(update[n], rel=1e-4, abs=1e-9), n
        assert record[f"l2_norm/param/{n}"] == pytest.approx(param[n], rel=1e-9), n
        assert record[f"l2_norm_ratio/update_param/{n}"] == pytest.approx(update[n] / param[n], rel=1e-4, abs=1e-9)
    transmission = [n for n in update if monitor.roles[n].cls == "Transmission"]
    u = math.sqrt(sum(update[n] ** 2 for n in transmission))
    w = math.sqrt(sum(param[n] ** 2 for n in transmission))
    assert record["Transmission/update_norm"] == pytest.approx(u, rel=1e-4)
    assert record["Transmission/weight_norm"] == pytest.approx(w, rel=1e-9)
    assert record["Transmission/update_weight_ratio"] == pytest.approx(u / w, rel=1e-4)


def test_timescale_and_distance_from_equilibrium_follow_their_definitions(tmp_path):
    """τ_iter = 1/(ηλ) of the last step, and RMS / rms_eq: the run's distance from the equilibrium its forces imply."""
    model = tiny_model("gpt_neox")
    opt = InstrumentedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.1)
    monitor = ForceMonitor(opt, model, [], log_every=1, per_tensor=False)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
    opt.step()
    record = monitor.log(1)
    assert record["Transmission/tau_iter"] == pytest.approx(1 / (1e-2 * 0.1), rel=1e-12)
    assert record["Transmission/rms_over_eq"] == pytest.approx(
        record["Transmission/rms"] / record["Transmission/rms_eq"], rel=1e-12
    )
    no_decay = InstrumentedAdamW(model.named_parameters(), lr=1e-2, weight_decay=0.0)
    model(input_ids=x[:, :-1], labels=x[:, 1:]).loss.backward()
    no_decay.step()
    assert math.isnan(
        ForceMonitor(no_decay, model, [], per_tensor=False, open_books=False).log(1)["Transmission/tau_iter"]
    )
