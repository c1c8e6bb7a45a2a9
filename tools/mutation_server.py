"""The test runs of ``tools/mutate.py``: one pytest server per repository copy, forked for each mutant so the
heavy imports are paid once, and the run of one mutant against its tests."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child_env(workdir: Path, threads: int) -> dict[str, str]:
    """The environment of a test run in ``workdir``: its copy first on the path, and ``threads`` OpenMP threads.

    Parallel workers must not oversubscribe the cores: OpenMP threads spin at every barrier, and two processes of
    two spinning threads each on 2 cores turned a 60 s test file into a 300 s timeout (a false kill)."""
    return dict(os.environ, PYTHONPATH=str(workdir), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=str(threads))


#: Imported once per worker, before any mutant: a mutant's run then starts in a forked copy of a process that has
#: them (pytest's start and these imports were 3-7 s of a 7.5 s kill). Only third-party packages: the project's
#: own modules must be imported fresh from the mutated copy, and its torch.library operators registered once.
_PRELOAD = ("numpy", "scipy.stats", "torch", "torch._dynamo", "transformers", "yaml", "pytest", "_pytest.pytester")


class Runner:
    """A pytest server for one repository copy: each run forks it, so the heavy imports are paid once.

    The server (``python tools/mutation_server.py``) reads one JSON request per line and answers with the exit code;
    the forked child runs ``pytest.main`` with its output in a log file, and is killed at the timeout.
    """

    def __init__(self, workdir: Path, threads: int) -> None:
        self.workdir = workdir
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve())], cwd=self.workdir,
                env=child_env(self.workdir, self.threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        return self.proc

    def run(self, tests: list[str], timeout: float) -> tuple[int | None, str]:
        """(pytest's exit code, or None at the timeout; its output)."""
        log = self.workdir / ".mutant.log"
        proc = self._start()
        proc.stdin.write(json.dumps({"tests": tests, "timeout": timeout, "log": str(log)}) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        if not answer:  # the server died: start a new one next time
            self.proc = None
            return -1, "the test server exited"
        return json.loads(answer)["rc"], log.read_text(errors="replace") if log.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def serve() -> None:
    """The loop of :class:`Runner`'s server (run in the copy, with its environment)."""
    import importlib
    import signal

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: output to the log, a fresh import of the project, one pytest session
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 3
            try:
                import pytest

                code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:logging", *request["tests"]]))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        # Time runs while this loop does: a harness paused with SIGSTOP (to time a benchmark on a quiet machine)
        # and continued does not turn the paused runs into timeouts.
        waited, last, rc = 0.0, time.monotonic(), None
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            now = time.monotonic()
            waited, last = waited + min(now - last, 1.0), now
            if waited > request["timeout"]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        print(json.dumps({"rc": rc}), flush=True)


def run_mutant(mutant, tree: ast.Module, runner: Runner, tests: list[str], timeout: float):
    """Run ``tests`` (files or test ids) against ``mutant`` written into the runner's copy of its module."""
    target = runner.workdir / mutant.module
    original = target.read_text()
    target.write_text(ast.unparse(ast.fix_missing_locations(tree)) + "\n")
    t0 = time.perf_counter()
    try:
        rc, output = runner.run(tests, timeout)
        if rc is None:
            mutant.status = "timeout"  # an infinite loop or a hang: counted as killed (the suite notices)
        elif rc in (0, 1, 2):  # passed; a test failed; interrupted, e.g. the mutant broke collection (a kill)
            mutant.status = "survived" if rc == 0 else "killed"
        else:
            mutant.status = "error"
        failed = [line for line in output.splitlines() if line.startswith("FAILED")]
        mutant.killer = failed[0][7:90] if failed else ""
    finally:
        target.write_text(original)
    mutant.seconds = time.perf_counter() - t0
    return mutant


if __name__ == "__main__":
    serve()
