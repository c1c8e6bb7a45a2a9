"""Time budget of a GPU window, the run-time model of campaign runs, and the scheduler that decides, by
measurement, how many runs share the GPU.

The budget is wall-clock seconds from the start of the command; a reserve at the end is kept for writing the
bundle. Every piece is started only if its predicted duration fits what is left, and is killed at the deadline
whatever happens (the window ends then anyway).

A campaign run's duration is modelled as

    start-up  +  steps × step time × slowdown(k)  +  snapshots × snapshot time  +  post-processing

where k is the number of runs training on the GPU at the same time and slowdown(k) how much longer each of their
steps takes than alone (1 for one run; k if the GPU only time-slices between processes, less where one run leaves
it idle: during its host syncs, logging, fits, snapshots). The numbers come, best first, from this window's
measurements, from earlier windows on the same device (``results/``), from the benchmarks on that device, and
from the campaign's priors; :class:`TimingModel` says which for each.

Concurrency is decided by measurement (:class:`Scheduler`). A second run starts when the model predicts that every
run still finishes in time. When slowdown(k+1) has never been measured on this device, a run that fits only with
some throughput gain is started as a *probe*, but only where the runs already going would still finish if it
gained nothing; after ``measure_s`` seconds of sharing the slowdown is measured, and if the runs no longer all fit,
the newest is stopped. The measured slowdowns go into the bundle, so later windows plan with them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Budget:
    """Seconds left until the deadline (``total_s`` after creation, less ``reserve_s`` kept for packing)."""

    def __init__(self, total_s: float, reserve_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if total_s <= 0:
            raise ValueError(f"the budget must be positive seconds, got {total_s}")
        self.clock, self.total_s, self.reserve_s = clock, float(total_s), float(reserve_s)
        self.start = clock()

    @property
    def deadline(self) -> float:
        return self.start + self.total_s - self.reserve_s

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.deadline - self.clock()

    def fits(self, estimate_s: float) -> bool:
        return estimate_s <= self.left()


# ---------------------------------------------------------------------------------------------- run-time model
@dataclass(frozen=True)
class RunProfile:
    """What a run's duration depends on."""

    arch: str
    steps: int
    snapshots: int  # numbered snapshots it writes (steps 0 and the last included)
    snapshot_every: int  # spacing of the regular snapshots (the run length when there are none between)
    spline: bool  # whether its post-processing validates spline recovery over the snapshots


@dataclass
class Estimate:
    value: float
    source: str  # "prior", "bench", "history", "this window"


class TimingModel:
    """Start-up, per-step, snapshot and post-processing times, and the measured slowdowns of shared runs."""

    def __init__(self, priors: dict[str, Any]) -> None:
        self.startup = Estimate(float(priors["startup_s"]), "prior")
        self.step_ms = {arch: Estimate(float(v), "prior") for arch, v in priors["step_ms"].items()}
        self.snapshot = Estimate(float(priors["snapshot_s"]), "prior")
        self.post = Estimate(float(priors["post_s"]), "prior")
        self.post_spline = Estimate(float(priors["post_spline_s"]), "prior")
        self.gpu_gib = float(priors.get("gpu_mem_gib", 0))
        self.snapshot_gib = float(priors.get("snapshot_gib", 0))
        self.slowdowns: dict[int, Estimate] = {1: Estimate(1.0, "definition")}

    # -- evidence, weakest first: a later call with a stronger source wins; the same source averages in
    _RANK = {"prior": 0, "bench": 1, "history": 2, "this window": 3, "definition": 4}

    def _better(self, old: Estimate, value: float, source: str) -> Estimate:
        if self._RANK[source] > self._RANK[old.source]:
            return Estimate(value, source)
        if source == old.source and source != "prior":
            return Estimate(value, source)  # the latest measurement of the same kind
        return old

    def learn_step_ms(self, arch: str, ms: float, source: str) -> None:
        old = self.step_ms.get(arch, Estimate(ms, "prior"))
        self.step_ms[arch] = self._better(old, ms, source)

    def learn_startup(self, seconds: float, source: str) -> None:
        self.startup = self._better(self.startup, seconds, source)

    def learn_snapshot(self, seconds: float, source: str) -> None:
        self.snapshot = self._better(self.snapshot, max(seconds, 0.0), source)

    def learn_post(self, seconds: float, spline: bool, source: str) -> None:
        if spline:
            self.post_spline = self._better(self.post_spline, seconds, source)
        else:
            self.post = self._better(self.post, seconds, source)

    def learn_slowdown(self, k: int, value: float, source: str) -> None:
        if k > 1:
            old = self.slowdowns.get(k, Estimate(value, "prior"))
            self.slowdowns[k] = self._better(old, max(value, 1.0), source)

    # -- predictions
    def step_s(self, arch: str) -> float:
        est = self.step_ms.get(arch) or max(self.step_ms.values(), key=lambda e: e.value)
        return est.value / 1e3

    def work_s(self, p: RunProfile) -> float:
        """Seconds of training alone on the GPU: steps and snapshots."""
        return p.steps * self.step_s(p.arch) + p.snapshots * self.snapshot.value

    def post_s(self, p: RunProfile) -> float:
        return (self.post_spline if p.spline else self.post).value

    def solo_s(self, p: RunProfile) -> float:
        return self.startup.value + self.work_s(p) + self.post_s(p)

    def known_slowdown(self, k: int) -> float | None:
        est = self.slowdowns.get(k)
        return None if est is None else est.value

    def explain(self, p: RunProfile) -> str:
        """The prediction of a run alone, term by term, with where each number comes from."""
        step = self.step_ms.get(p.arch) or max(self.step_ms.values(), key=lambda e: e.value)
        post = self.post_spline if p.spline else self.post
        return (
            f"{self.solo_s(p):.0f} s = start-up {self.startup.value:.0f} ({self.startup.source}) + {p.steps:,} steps x "
            f"{step.value:.2f} ms ({step.source}) + {p.snapshots} snapshots x {self.snapshot.value:.2f} s "
            f"({self.snapshot.source}) + post {post.value:.0f} ({post.source})"
        )

    def summary(self) -> dict[str, Any]:
        return dict(
            startup_s=vars(self.startup),
            step_ms={a: vars(e) for a, e in self.step_ms.items()},
            snapshot_s=vars(self.snapshot),
            post_s=vars(self.post),
            post_spline_s=vars(self.post_spline),
            slowdown={str(k): vars(e) for k, e in sorted(self.slowdowns.items())},
        )


# ---------------------------------------------------------------------------------------------- simulation
@dataclass
class SimulatedRun:
    """A run as the simulation sees it: seconds of start-up left, seconds of solo training work left, seconds of
    post-processing, and (a probe) how many wall seconds it trains before it is stopped."""

    name: str
    startup_left: float
    work_left: float
    post_s: float
    probe_wall: float | None = None


def simulate(now: float, jobs: list[SimulatedRun], slowdown: Callable[[int], float]) -> dict[str, float]:
    """Finish times of ``jobs`` under processor sharing: the k jobs training at a time each progress at
    1/slowdown(k) solo seconds per second; start-up and post-processing do not share the GPU. A probe leaves
    after ``probe_wall`` seconds of training (no finish time)."""
    t = now
    state = [dict(job=j, startup=j.startup_left, work=j.work_left, probe=j.probe_wall) for j in jobs]
    finish: dict[str, float] = {}
    for _ in range(10_000):
        active = [s for s in state if s["job"].name not in finish and s["work"] is not None]
        if not active:
            break
        training = [s for s in active if s["startup"] <= 0]
        starting = [s for s in active if s["startup"] > 0]
        k = len(training)
        sk = slowdown(k) if k else 1.0
        candidates = [s["startup"] for s in starting]
        candidates += [s["work"] * sk for s in training]
        candidates += [s["probe"] for s in training if s["probe"] is not None]
        dt = max(min(candidates), 0.0)
        t += dt
        for s in starting:
            s["startup"] -= dt
        for s in training:
            s["work"] -= dt / sk
            if s["probe"] is not None:
                s["probe"] -= dt
        for s in training:
            if s["probe"] is not None and s["probe"] <= 1e-9:
                s["work"] = None  # the probe is stopped: it never finishes
            elif s["work"] <= 1e-9:
                finish[s["job"].name] = t + s["job"].post_s
                s["work"] = None
    return finish


# ---------------------------------------------------------------------------------------------- scheduler
class RunHandle(Protocol):
    def poll(self) -> int | None: ...

    def stop(self) -> None: ...


@dataclass
class Observation:
    phase: str  # "starting", "training", "post", "done"
    step: int  # optimizer steps done (from the run's metrics.jsonl)


class Launcher(Protocol):
    def start(self, name: str) -> RunHandle: ...

    def observe(self, name: str) -> Observation: ...


@dataclass
class PendingRun:
    name: str
    profile: RunProfile


@dataclass
class RunningJob:
    item: PendingRun
    handle: RunHandle
    started: float
    probe: bool = False
    phase: str = "starting"
    step: int = 0
    train_started: float | None = None
    train_ended: float | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)
    eff_ms: float | None = None  # measured wall ms per step at the current sharing
    eff_k: int = 1


@dataclass
class RunOutcome:
    name: str
    status: str  # "done", "failed", "stopped", "not started"
    reason: str
    timing: dict[str, Any] = field(default_factory=dict)


class Scheduler:
    """Runs campaign items on one GPU inside a :class:`Budget`, as many at a time as measurement says pay off."""

    def __init__(
        self,
        items: list[PendingRun],
        budget: Budget,
        model: TimingModel,
        launcher: Launcher,
        *,
        max_concurrent: int = 1,
        max_starts: int | None = None,
        measure_s: float = 20.0,
        warmup_s: float = 5.0,
        grace: float = 0.05,
        poll_s: float = 2.0,
        free_gpu_gib: Callable[[], float | None] = lambda: None,
        free_disk_gib: Callable[[], float | None] = lambda: None,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = print,
        on_finish: Callable[[RunOutcome], None] = lambda outcome: None,
    ) -> None:
        self.pending = list(items)
        self.budget, self.model, self.launcher = budget, model, launcher
        self.max_concurrent, self.measure_s, self.warmup_s, self.grace = max_concurrent, measure_s, warmup_s, grace
        self.poll_s, self.free_gpu_gib, self.free_disk_gib, self.sleep, self.log = (
            poll_s, free_gpu_gib, free_disk_gib, sleep, log
        )  # fmt: skip
        self.max_starts, self.started, self.on_finish = max_starts, 0, on_finish
        self.failed: str | None = None  # the first run that failed: no more are started after it
        self.running: list[RunningJob] = []
        self.outcomes: dict[str, RunOutcome] = {}
        self.reasons: dict[str, str] = {}
        self.measurements: list[dict[str, Any]] = []
        self._segment = (0, budget.clock())  # (runs training, since when)

    # -- predictions
    def _slowdown(self, unknown: Callable[[int], float]) -> Callable[[int], float]:
        return lambda k: self.model.known_slowdown(k) or unknown(k)

    def _sim_job(self, job: RunningJob, now: float) -> SimulatedRun:
        p = job.item.profile
        post = self.model.post_s(p)
        if job.phase == "post":
            return SimulatedRun(job.item.name, 0.0, 0.0, max(post - (now - (job.train_ended or now)), 1.0))
        startup_left = 0.0
        if job.phase == "starting":
            startup_left = max(self.model.startup.value - (now - job.started), 5.0)
        remaining = p.steps - job.step
        if job.eff_ms is not None:  # its own measured speed, converted back to running alone (the same fallback
            # slowdown k as the pessimistic simulations use, so that they give back the measured speed)
            solo_ms = job.eff_ms / (self.model.known_slowdown(job.eff_k) or job.eff_k)
            work = remaining * solo_ms / 1e3
        else:
            work = remaining * self.model.step_s(p.arch) + self._snapshots_left(p, job.step) * self.model.snapshot.value
        return SimulatedRun(job.item.name, startup_left, work, post)

    @staticmethod
    def _snapshots_left(p: RunProfile, step: int) -> int:
        return max(p.snapshots - (step // max(p.snapshot_every, 1) + 1), 0)

    def _new_sim_job(self, item: PendingRun, probe_wall: float | None = None) -> SimulatedRun:
        p = item.profile
        return SimulatedRun(item.name, self.model.startup.value, self.model.work_s(p), self.model.post_s(p), probe_wall)

    # -- decisions
    def _decide(self, item: PendingRun, now: float) -> tuple[str, str]:
        """("start" | "probe" | "wait", why). A run that would share the GPU must leave a margin (``grace`` of the
        time left) that the enforcement does not: predictions drift between ticks, and a run started on the edge
        would be stopped again. A run alone starts whenever its prediction fits."""
        left = self.budget.deadline - now
        deadline = self.budget.deadline - (self.grace * left if self.running else 0.0)
        if not self.running:
            solo = self.model.solo_s(item.profile)
            if solo > left:
                return "wait", f"predicted {self.model.explain(item.profile)} > {left:.0f} s left"
        need_gpu = self.model.gpu_gib
        free_gpu = self.free_gpu_gib()
        if free_gpu is not None and need_gpu and free_gpu < need_gpu:
            return "wait", f"GPU memory: {free_gpu:.1f} GiB free < {need_gpu:.0f} GiB a run needs"
        snapshots = item.profile.snapshots + sum(self._snapshots_left(j.item.profile, j.step) for j in self.running)
        need_disk = self.model.snapshot_gib * snapshots * 1.2  # its snapshots and those the others have yet to write
        free_disk = self.free_disk_gib()
        if free_disk is not None and free_disk < need_disk:
            return "wait", f"disk: {free_disk:.1f} GiB free < {need_disk:.1f} GiB of snapshots"
        if not self.running:
            return "start", f"alone: {self.model.explain(item.profile)} <= {left:.0f} s left"
        jobs = [self._sim_job(j, now) for j in self.running]
        k = len(self.running) + 1
        if all(self.model.known_slowdown(i) for i in range(2, k + 1)):
            known = self.model.known_slowdown(k)
            finish = simulate(now, [*jobs, self._new_sim_job(item)], self._slowdown(float))
            late = {n: t - deadline for n, t in finish.items() if t > deadline}
            if late:
                return "wait", f"with {k} runs sharing the GPU (measured slowdown {known:.2f}): {self._late(late)}"
            return "start", f"{k} runs sharing the GPU at the measured slowdown {known:.2f} all finish in time"
        pessimistic = simulate(now, [*jobs, self._new_sim_job(item)], self._slowdown(lambda i: float(i)))
        if all(t <= deadline for t in pessimistic.values()):
            return "start", f"{k} runs finish in time even if sharing gains nothing (slowdown {k})"
        optimistic = simulate(now, [*jobs, self._new_sim_job(item)], self._slowdown(lambda i: 1 + 0.5 * (i - 1)))
        if any(t > deadline for t in optimistic.values()):
            return "wait", f"{k} runs would not all finish in time even at slowdown {1 + 0.5 * (k - 1):.1f}"
        probe = self._new_sim_job(item, probe_wall=self.measure_s + self.warmup_s + self.poll_s)
        safe = simulate(now, [*jobs, probe], self._slowdown(lambda i: float(i)))
        late = {n: t - deadline for n, t in safe.items() if t > deadline}
        if late:
            return "wait", f"probing {k} runs could make the others late ({self._late(late)})"
        return "probe", (
            f"slowdown({k}) not measured on this device: probing for {self.measure_s:.0f} s (the others finish in "
            "time even if it gains nothing)"
        )

    @staticmethod
    def _late(late: dict[str, float]) -> str:
        return ", ".join(f"{n} {d:.0f} s late" for n, d in late.items())

    # -- observation and measurement
    def _observe(self, now: float) -> None:
        for job in list(self.running):
            obs = self.launcher.observe(job.item.name)
            job.step = max(job.step, obs.step)
            if obs.phase == "training" and job.train_started is None:
                job.train_started = now
            if obs.phase in ("post", "done") and job.train_ended is None:
                job.train_ended = now
                if job.train_started is None:
                    job.train_started = now
            job.phase = obs.phase if obs.phase != "done" else "post"
            if job.phase == "training":
                job.samples.append((now, job.step))
            rc = job.handle.poll()
            if rc is not None:
                self._finish(job, now, "done" if rc == 0 else "failed", "" if rc == 0 else f"exit status {rc}")

    def _finish(self, job: RunningJob, now: float, status: str, reason: str) -> None:
        self.running.remove(job)
        p = job.item.profile
        timing = dict(started_s=job.started - self.budget.start, wall_s=now - job.started, steps_done=job.step,
                      steps=p.steps, probe=job.probe)  # fmt: skip
        if job.train_started is not None:
            timing["startup_s"] = job.train_started - job.started
        if job.train_ended is not None and job.train_started is not None:
            timing["train_s"] = job.train_ended - job.train_started
            timing["post_s"] = now - job.train_ended
        if job.eff_ms is not None:  # wall ms per step, measured with step_ms_k runs training at once
            timing.update(step_ms=job.eff_ms, step_ms_k=job.eff_k)
        self.outcomes[job.item.name] = RunOutcome(job.item.name, status, reason, timing)
        if status == "failed" and self.failed is None:
            self.failed = job.item.name
        if status == "done":
            if "startup_s" in timing:
                self.model.learn_startup(timing["startup_s"], "this window")
            if "post_s" in timing:
                self.model.learn_post(timing["post_s"], p.spline, "this window")
        self.log(
            f"[runs] {job.item.name}: {status}{' (' + reason + ')' if reason else ''} after {now - job.started:.0f} s"
        )
        self.on_finish(self.outcomes[job.item.name])

    def _measure(self, now: float) -> None:
        training = [j for j in self.running if j.phase == "training"]
        k = len(training)
        if k != self._segment[0]:
            self._segment = (k, now)
            return
        since = self._segment[1]
        rates = []
        for job in training:
            t0 = max(since, (job.train_started or now) + self.warmup_s)
            window = [(t, s) for t, s in job.samples if t >= t0]
            if len(window) < 2 or window[-1][0] - window[0][0] < self.measure_s:
                continue
            (ta, sa), (tb, sb) = window[0], window[-1]
            if sb <= sa:
                continue
            job.eff_ms, job.eff_k = 1e3 * (tb - ta) / (sb - sa), k
            rates.append(job)
        if not rates:
            return
        if k == 1:
            job = rates[0]
            p = job.item.profile
            between = p.snapshot_every < p.steps  # snapshots inside the run: they slow its steps down
            if not between:
                self.model.learn_step_ms(p.arch, job.eff_ms, "this window")
            elif self.model.step_ms.get(p.arch, Estimate(0, "prior")).source != "prior":
                # the step time is known from a measurement: the rest of this run's step time is its snapshots
                per_step_snap = job.eff_ms / 1e3 - self.model.step_s(p.arch)
                self.model.learn_snapshot(per_step_snap * p.snapshot_every, "this window")
            else:  # nothing measured yet: keep the snapshot prior and learn the step time net of it
                net_ms = job.eff_ms - 1e3 * self.model.snapshot.value / p.snapshot_every
                self.model.learn_step_ms(p.arch, max(net_ms, 0.5 * job.eff_ms), "this window")
            self._record(1, [job], 1.0)
        else:
            ratios = []
            for job in rates:
                p = job.item.profile
                if self.model.step_ms.get(p.arch, Estimate(0, "prior")).source == "prior":
                    return  # its speed alone was never measured: a ratio to a prior would be a guess
                solo_ms = self.model.step_s(p.arch) * 1e3
                if p.snapshot_every < p.steps:
                    solo_ms += self.model.snapshot.value * 1e3 / p.snapshot_every
                ratios.append(job.eff_ms / solo_ms)
            value = sum(ratios) / len(ratios)
            self.model.learn_slowdown(k, value, "this window")
            self._record(k, rates, value)

    def _record(self, k: int, jobs: list[RunningJob], slowdown: float) -> None:
        entry = dict(k=k, slowdown=round(slowdown, 4), runs={j.item.name: round(j.eff_ms, 3) for j in jobs},
                     step_ms_solo={a: round(e.value, 3) for a, e in self.model.step_ms.items()})  # fmt: skip
        if not self.measurements or self.measurements[-1]["k"] != k or self.measurements[-1]["runs"].keys() != \
                entry["runs"].keys():  # fmt: skip
            self.measurements.append(entry)
        else:
            self.measurements[-1] = entry  # the same segment, measured over a longer window

    # -- enforcement
    def _enforce(self, now: float) -> None:
        deadline = self.budget.deadline
        if now >= deadline:
            for job in list(self.running):
                job.handle.stop()
                self._finish(
                    job, now, "stopped", f"the budget ran out at step {job.step:,} of {job.item.profile.steps:,}"
                )
            return
        if not self.running or any(self._probing(j, now) for j in self.running):
            return  # a probe is measuring: its safety was checked when it started
        finish = simulate(now, [self._sim_job(j, now) for j in self.running], self._slowdown(float))
        late = {n: t - deadline for n, t in finish.items() if t > deadline}
        if not late:
            return
        if len(self.running) > 1:
            newest = max(self.running, key=lambda j: j.started)
            newest.handle.stop()
            k = len(self.running)
            self._finish(newest, now, "stopped", f"{'probe' if newest.probe else 'run'} stopped at step "
                         f"{newest.step:,}: with {k} runs sharing the GPU, {self._late(late)}")  # fmt: skip
            return
        job = self.running[0]
        over = late.get(job.item.name, 0.0)
        if job.eff_ms is not None and over > self.grace * max(deadline - now, 0.0):
            job.handle.stop()
            self._finish(job, now, "stopped", f"predicted to finish {over:.0f} s after the deadline at its measured "
                         f"{job.eff_ms:.2f} ms/step (stopped at step {job.step:,})")  # fmt: skip

    def _probing(self, job: RunningJob, now: float) -> bool:
        """A probe still inside its measurement window (start-up, warm-up, then measure_s of shared training)."""
        if not job.probe:
            return False
        return job.train_started is None or now - job.train_started < self.warmup_s + self.measure_s + 2 * self.poll_s

    # -- the loop
    def run(self) -> list[RunOutcome]:
        while True:
            now = self.budget.clock()
            self._observe(now)
            self._measure(now)
            self._enforce(now)
            now = self.budget.clock()
            if now >= self.budget.deadline:
                break
            starting = any(j.phase == "starting" for j in self.running)
            if self.failed is not None:  # fail fast: what broke one run would most likely break the next
                for item in self.pending:
                    self.reasons[item.name] = f"{self.failed} failed in this window (see its output); not started"
            elif self.max_starts is not None and self.started >= self.max_starts:
                for item in self.pending:
                    self.reasons[item.name] = f"--max-runs {self.max_starts} reached"
            elif self.pending and len(self.running) < self.max_concurrent and not starting:
                for item in list(self.pending):
                    verdict, why = self._decide(item, now)
                    self.reasons[item.name] = why
                    if verdict in ("start", "probe"):
                        self.pending.remove(item)
                        self.log(f"[runs] {item.name}: {'probe' if verdict == 'probe' else 'start'} ({why})")
                        handle = self.launcher.start(item.name)
                        self.running.append(RunningJob(item, handle, now, probe=verdict == "probe"))
                        self.started += 1
                        break
            if not self.running:
                break
            self.sleep(self.poll_s)
        for item in self.pending:
            why = self.reasons.get(item.name, "not reached")
            self.outcomes[item.name] = RunOutcome(item.name, "not started", why)
        return [self.outcomes[n] for n in self.outcomes]


def snapshot_count(steps: int, every: int, early: list[int] | tuple[int, ...] = ()) -> int:
    """Numbered snapshots a run writes: step 0, every ``every``, the early steps, the last (train.loop)."""
    marks = {0, steps} | {s for s in early if s < steps} | set(range(every, steps, every))
    return len(marks)


def fmt_s(seconds: float) -> str:
    return "∞" if math.isinf(seconds) else f"{seconds:.0f} s"
