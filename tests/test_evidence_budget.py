"""Budget and concurrency logic of the GPU evidence command, against a simulated GPU with a fake clock.

The fake world runs campaign runs the way one GPU does: a start-up that does not use the GPU, then training at a
speed that depends on how many runs train at once (the *true* slowdown, unknown to the scheduler), then
post-processing. The scheduler sees only what the real one sees: phases and step counts.
"""

from __future__ import annotations

import pytest

from experiments.scheduler import (
    Budget,
    Observation,
    PendingRun,
    RunProfile,
    Scheduler,
    SimulatedRun,
    TimingModel,
    simulate,
    snapshot_count,
)

PRIORS = dict(startup_s=60, step_ms={"gpt_neox": 15.0}, snapshot_s=0.5, post_s=30, post_spline_s=60, gpu_mem_gib=16,
              snapshot_gib=0.3)  # fmt: skip
PROFILE = RunProfile("gpt_neox", 20_000, 2, 20_000, False)  # 60 + 300 + 1 + 30 = 391 s alone


class World:
    """A GPU shared by processes: each training run progresses at 1/(step_s · slowdown(k)) steps per second."""

    def __init__(self, step_s=0.015, startup_s=60.0, post_s=30.0, slowdown=lambda k: float(k), steps=20_000):
        self.t, self.step_s, self.startup_s, self.post_s, self.slowdown, self.steps = (
            0.0, step_s, startup_s, post_s, slowdown, steps
        )  # fmt: skip
        self.runs: dict[str, dict] = {}
        self.stopped: list[str] = []

    def clock(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        for _ in range(int(round(dt / 0.5))):  # fine steps: phases change mid-tick
            self._advance(0.5)

    def _advance(self, dt: float) -> None:
        live = [r for r in self.runs.values() if r["rc"] is None]
        k = sum(1 for r in live if r["phase"] == "training")
        for r in live:
            if r["phase"] == "starting":
                r["left"] -= dt
                if r["left"] <= 0:
                    r["phase"] = "training"
            elif r["phase"] == "training":
                r["step"] = min(self.steps, r["step"] + dt / (self.step_s * self.slowdown(k)))
                if r["step"] >= self.steps:
                    r["phase"], r["left"] = "post", self.post_s
            elif r["phase"] == "post":
                r["left"] -= dt
                if r["left"] <= 0:
                    r["phase"], r["rc"] = "done", 0
        self.t += dt

    # -- the launcher interface
    def start(self, name: str):
        world = self
        self.runs[name] = dict(phase="starting", left=self.startup_s, step=0.0, rc=None)

        class RunHandle:
            def poll(self):
                return world.runs[name]["rc"]

            def stop(self):
                world.runs[name]["rc"] = -15
                world.stopped.append(name)

        return RunHandle()

    def observe(self, name: str) -> Observation:
        r = self.runs[name]
        return Observation(r["phase"], int(r["step"]) // 10 * 10)  # the trainer logs every 10 steps


def scheduler(world: World, names, budget_s, *, model=None, max_concurrent=3, **kw) -> Scheduler:
    budget = Budget(budget_s, reserve_s=10, clock=world.clock)
    items = [PendingRun(n, PROFILE) for n in names]
    return Scheduler(items, budget, model or TimingModel(PRIORS), world, max_concurrent=max_concurrent,
                     sleep=world.sleep, log=lambda m: None, **kw)  # fmt: skip


def test_budget_and_prediction_arithmetic():
    now = [100.0]
    b = Budget(540, reserve_s=15, clock=lambda: now[0])
    assert b.deadline == 625 and b.left() == 525 and b.fits(525) and not b.fits(526)
    now[0] = 700
    assert b.left() == -75 and b.elapsed() == 600
    with pytest.raises(ValueError, match="positive"):
        Budget(0)
    model = TimingModel(PRIORS)
    assert model.solo_s(PROFILE) == pytest.approx(60 + 300 + 1 + 30)
    assert "start-up 60 (prior)" in model.explain(PROFILE) and "15.00 ms (prior)" in model.explain(PROFILE)
    model.learn_step_ms("gpt_neox", 14.0, "bench")
    model.learn_step_ms("gpt_neox", 99.0, "prior")  # weaker evidence never replaces stronger
    assert model.step_ms["gpt_neox"].value == 14.0 and model.step_ms["gpt_neox"].source == "bench"
    model.learn_step_ms("gpt_neox", 16.0, "this window")
    assert model.step_s("gpt_neox") == 0.016
    assert snapshot_count(20_000, 250) == 81 and snapshot_count(20_000, 20_000) == 2
    assert snapshot_count(600, 100, [1, 2, 4, 8, 16, 32, 64]) == 14


def test_simulate_processor_sharing():
    # Two jobs with 100 s of solo work each, no start-up: at slowdown 2 both end at 200; at slowdown 1.25 at 125.
    jobs = [SimulatedRun("a", 0, 100, 10), SimulatedRun("b", 0, 100, 5)]
    assert simulate(0, jobs, lambda k: float(k)) == {"a": 210.0, "b": 205.0}
    assert simulate(0, jobs, lambda k: 1 + 0.25 * (k - 1)) == {"a": 135.0, "b": 130.0}
    # b starts 50 s later: a runs alone for 50 s (50 s of work), then both share.
    late = simulate(0, [SimulatedRun("a", 0, 100, 0), SimulatedRun("b", 50, 100, 0)], lambda k: float(k))
    assert late["a"] == pytest.approx(150) and late["b"] == pytest.approx(200)
    # A probe trains 20 wall seconds and leaves: a is slowed only meanwhile.
    probe = simulate(0, [SimulatedRun("a", 0, 100, 0), SimulatedRun("p", 0, 100, 0, probe_wall=20)], lambda k: float(k))
    assert probe == {"a": pytest.approx(110)}


def test_one_run_fits_the_next_is_not_started_with_the_reason():
    world = World()  # reality matches the priors: 391 s a run
    s = scheduler(world, ["r1", "r2"], 540, max_concurrent=1)
    outcomes = {o.name: o for o in s.run()}
    assert outcomes["r1"].status == "done"
    assert outcomes["r1"].timing["startup_s"] == pytest.approx(60, abs=2.5)
    assert outcomes["r2"].status == "not started"
    assert "predicted" in outcomes["r2"].reason and "s left" in outcomes["r2"].reason
    assert world.t <= 540 - 10
    assert s.model.step_ms["gpt_neox"].source == "this window"  # measured while it ran alone
    assert s.model.step_ms["gpt_neox"].value == pytest.approx(15.0, rel=0.05)


def test_nothing_starts_when_the_budget_is_short():
    world = World()
    outcomes = scheduler(world, ["r1"], 200).run()
    assert outcomes[0].status == "not started" and "391 s" in outcomes[0].reason
    assert world.runs == {} and world.t == 0


def test_a_probe_that_pays_off_keeps_both_runs():
    # The GPU has slack: two runs take only 1.2x as long per step. 2 x 391 s alone do not fit in 700 s, together they
    # do (~60 + 360 + 30 + stagger) — but the scheduler has never measured slowdown(2) on this device: it probes.
    world = World(slowdown=lambda k: 1.0 + 0.2 * (k - 1))
    s = scheduler(world, ["r1", "r2"], 700, measure_s=20)
    outcomes = {o.name: o for o in s.run()}
    assert outcomes["r1"].status == "done" and outcomes["r2"].status == "done", outcomes
    assert outcomes["r2"].timing["probe"] is True
    assert s.model.known_slowdown(2) == pytest.approx(1.2, rel=0.05)
    assert [m["k"] for m in s.measurements][:2] == [1, 2]
    assert world.t <= 700 - 10


def test_a_probe_that_does_not_pay_off_is_stopped_and_the_first_run_finishes():
    # Pure time slicing: sharing gains nothing, so the second run cannot finish; the probe measures that and stops.
    world = World(slowdown=lambda k: float(k))
    s = scheduler(world, ["r1", "r2"], 700, measure_s=20)
    outcomes = {o.name: o for o in s.run()}
    assert outcomes["r1"].status == "done"
    assert outcomes["r2"].status == "stopped" and "sharing the GPU" in outcomes["r2"].reason
    assert world.stopped == ["r2"]
    assert s.model.known_slowdown(2) == pytest.approx(2.0, rel=0.05)
    assert world.t <= 700 - 10


def test_a_known_slowdown_from_earlier_windows_starts_without_probing():
    model = TimingModel(PRIORS)
    model.learn_step_ms("gpt_neox", 15.0, "history")
    model.learn_slowdown(2, 1.2, "history")
    world = World(slowdown=lambda k: 1.0 + 0.2 * (k - 1))
    s = scheduler(world, ["r1", "r2"], 700, model=model)
    outcomes = {o.name: o for o in s.run()}
    assert outcomes["r2"].status == "done" and outcomes["r2"].timing["probe"] is False
    assert "measured slowdown 1.20" in s.reasons["r2"]
    # and where the history says sharing does not pay, the second run waits instead
    model = TimingModel(PRIORS)
    model.learn_slowdown(2, 2.0, "history")
    world = World()
    s = scheduler(world, ["r1", "r2"], 700, model=model)
    outcomes = {o.name: o for o in s.run()}
    assert outcomes["r2"].status == "not started" and "r2" not in world.runs  # never started, never wasted
    assert "s left" in outcomes["r2"].reason  # finally: too little time left to run it alone


def test_a_run_slower_than_predicted_is_stopped_once_measured_not_at_the_deadline():
    world = World(step_s=0.030)  # twice the prior: 60 + 600 + 30 s, past a 540 s budget
    s = scheduler(world, ["r1"], 540, measure_s=20)
    (outcome,) = s.run()
    assert outcome.status == "stopped" and "after the deadline" in outcome.reason
    assert world.t < 200  # stopped soon after it was measured, not after wasting the window
    assert s.model.step_ms["gpt_neox"].value == pytest.approx(30.0, rel=0.05)


def test_the_hard_deadline_stops_whatever_still_runs():
    # Slower than predicted by less than the grace: it keeps going, and the deadline stops it.
    world = World(step_s=0.0173)  # 60 + 346 + 30 = 436 s against a 440 s deadline: just too slow at the end
    world.post_s = 60
    s = scheduler(world, ["r1"], 450, measure_s=20)
    (outcome,) = s.run()
    assert outcome.status == "stopped" and "budget ran out" in outcome.reason
    assert world.t == pytest.approx(440, abs=2.1)


def test_after_a_failed_run_no_more_are_started():
    world = World(step_s=0.001, startup_s=5, post_s=1)  # short runs: several fit in the budget
    s = scheduler(world, ["r1", "r2", "r3"], 540, max_concurrent=1)
    real_start = world.start

    def start(name):
        handle = real_start(name)
        if name == "r1":
            world.runs[name]["rc"] = 1  # crashes at once
        return handle

    world.start = start
    outcomes = {o.name: o for o in s.run()}
    assert outcomes["r1"].status == "failed" and "exit status 1" in outcomes["r1"].reason
    assert outcomes["r2"].status == outcomes["r3"].status == "not started"
    assert "r1 failed in this window" in outcomes["r2"].reason and list(world.runs) == ["r1"]


def test_a_run_waits_for_gpu_memory_and_disk():
    spline = RunProfile("gpt_neox", 20_000, 81, 250, True)
    for kw, reason in ((dict(free_gpu_gib=lambda: 8.0), "GPU memory: 8.0 GiB free < 16 GiB"),
                       (dict(free_disk_gib=lambda: 10.0), "disk: 10.0 GiB free < 29.2 GiB of snapshots")):  # fmt: skip
        world = World()
        s = Scheduler([PendingRun("r1", spline)], Budget(900, clock=world.clock), TimingModel(PRIORS), world,
                      sleep=world.sleep, log=lambda m: None, **kw)  # fmt: skip
        (outcome,) = s.run()
        assert outcome.status == "not started" and reason in outcome.reason and not world.runs
