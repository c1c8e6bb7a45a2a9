"""Part (b) of a window: the GPU benchmarks, all in one worker process (one interpreter and import for all), each
only if its estimate fits the time left; skipped where results/ holds them for this device and code."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

from experiments import bundle
from experiments.campaign import committed_folder, piece_folder, source_hash
from experiments.gpu_evidence.window import WORKER_START_S, ChildProcess, Window, free_gpu_cache, history_wall


def run_benchmarks(win: Window) -> None:
    c = win.campaign
    todo = []
    for spec in c.bench:
        digest = source_hash(win.root, spec.sources)
        folder = piece_folder("bench", win.device["slug"], digest, spec.name)
        if committed_folder(win.results, folder) is not None and "bench" not in win.redo:
            win.piece("bench", spec.name, "skipped", f"already in results/ for this device and code ({folder})")
            continue
        estimate = history_wall(win, "bench", spec.name) or float(c.dry.get("bench_estimate_s", 8) if win.dry
                                                                    else spec.estimate_s)  # fmt: skip
        args = list(c.bench_smoke_args if win.dry else spec.args)
        out = str(win.work / "bench" / spec.name)
        todo.append(dict(name=spec.name, script=spec.script, args=args, estimate_s=estimate, folder=folder,
                         digest=digest, sources=list(spec.sources), out=out))  # fmt: skip
    if not todo:
        return
    limit = min(c.bench_limit_s, win.budget.left())
    if limit < WORKER_START_S + min(t["estimate_s"] for t in todo):
        for t in todo:
            win.piece("bench", t["name"], "skipped", f"estimated {WORKER_START_S:.0f} s to start the benchmark process "
                      f"+ {t['estimate_s']:.0f} s > {limit:.0f} s left", estimate_s=t["estimate_s"])  # fmt: skip
        return
    spec_file = win.work / "bench_spec.json"
    # An absolute deadline (the wall clock both processes share): the worker's own start-up counts against it.
    spec_file.write_text(json.dumps(dict(scripts=todo, deadline=time.time() + limit), indent=1))
    t0 = time.monotonic()
    proc = ChildProcess([sys.executable, "-m", "experiments.gpu_evidence", "bench-worker", str(spec_file)],
                        win.work / "bench.out",
                win.child_env(), win.root)  # fmt: skip
    rc = proc.wait(limit)  # the worker keeps to the deadline itself; this is the backstop
    for t in todo:
        status_file = Path(t["out"]) / "status.json"
        if not status_file.is_file():
            why = "the benchmark process was stopped at its limit" if rc is None else f"not reached (worker exit {rc})"
            win.piece("bench", t["name"], "killed" if rc is None else "skipped", why, estimate_s=t["estimate_s"])
            continue
        st = json.loads(status_file.read_text())
        if st["status"] == "skipped":
            win.piece("bench", t["name"], "skipped", st["reason"], estimate_s=t["estimate_s"])
            continue
        out = win.staging / t["folder"]
        out.mkdir(parents=True)
        result = Path(t["out"]) / "result.json"
        if result.is_file():
            shutil.copy(result, out / "result.json")
        (out / "output.txt").write_text(bundle.read_text_tail(Path(t["out"]) / "output.txt"))
        command = ["python", t["script"], *t["args"], "--json", "result.json"]
        prov = win.provenance("bench", t["name"], st["status"], command, t["sources"], t["digest"],
                              wall_s=st["wall_s"], reproduce=" ".join(command), error=st.get("error"))  # fmt: skip
        (out / "provenance.json").write_bytes(bundle.json_bytes(prov))
        win.order.append(t["folder"])
        win.piece("bench", t["name"], st["status"], st.get("error", "")[-300:], wall_s=st["wall_s"],
                  folder=t["folder"])  # fmt: skip
    win.log(f"[bench] {time.monotonic() - t0:.0f} s in all")


def bench_worker(spec_file: Path) -> int:
    """Run each benchmark script in this one process (one interpreter and import for all, the GPU state freed
    between them), each only if its estimate fits the time left; write status.json per script."""
    import runpy

    spec = json.loads(spec_file.read_text())
    deadline = float(spec["deadline"])  # time.time() of the driver's deadline for this part
    sys.path.insert(0, str(Path("bench").resolve()))
    for t in spec["scripts"]:
        out = Path(t["out"])
        out.mkdir(parents=True, exist_ok=True)
        left = deadline - time.time()
        if t["estimate_s"] > left:
            status = dict(status="skipped", reason=f"estimated {t['estimate_s']:.0f} s > {left:.0f} s left")
            (out / "status.json").write_text(json.dumps(status))
            continue
        argv = [t["script"], *t["args"], "--json", str(out / "result.json")]
        print(f"=== {' '.join(argv)}", flush=True)
        t0 = time.monotonic()
        status = dict(status="done")
        with (out / "output.txt").open("w") as log, contextlib.redirect_stdout(TeeStream(sys.stdout, log)):
            saved = sys.argv
            sys.argv = argv
            try:
                runpy.run_path(t["script"], run_name="__main__")
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    status = dict(status="failed", error=str(exc.code))
            except Exception:  # a benchmark that breaks is a result to report, not a reason to stop the others
                status = dict(status="failed", error=traceback.format_exc()[-4000:])
            finally:
                sys.argv = saved
        free_gpu_cache()
        status["wall_s"] = time.monotonic() - t0
        (out / "status.json").write_text(json.dumps(status))
    return 0


class TeeStream:
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()
