"""Part (a) of a window: the CUDA kernel checks (``tests/test_cuda.py`` with the Triton kernel compiled), skipped
where results/ holds them for this device and kernel source."""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from experiments import bundle
from experiments.campaign import committed_folder, piece_folder, source_hash
from experiments.gpu_evidence.window import ChildProcess, Window, history_wall

#: junit-xml child element of a test case -> its outcome (no child: passed).
_OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}


def _junit(path: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per-test outcomes and their counts from pytest's ``--junitxml`` report."""
    tests, summary = [], dict(passed=0, failed=0, error=0, skipped=0)
    if not path.is_file():
        return tests, summary
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in _OUTCOME:
                outcome, message = _OUTCOME[child.tag], (child.get("message") or child.text or "")[:2000]
        summary[outcome] += 1
        tests.append(dict(test=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          time_s=float(case.get("time") or 0), message=message))  # fmt: skip
    return tests, summary


def run_checks(win: Window) -> None:
    c = win.campaign
    digest = source_hash(win.root, c.checks_sources)
    folder = piece_folder("checks", win.device["slug"], digest)
    done = committed_folder(win.results, folder)
    if done is not None and "checks" not in win.redo:
        win.piece("checks", "test_cuda", "skipped", f"already in results/ for this device and code ({folder})")
        return
    estimate = history_wall(win, "checks", "") or float(c.dry.get("checks_estimate_s", 10) if win.dry
                                                          else c.checks_estimate_s)  # fmt: skip
    left = win.budget.left()
    if estimate > left:
        win.piece(
            "checks", "test_cuda", "skipped", f"estimated {estimate:.0f} s > {left:.0f} s left", estimate_s=estimate
        )
        return
    junit = win.work / "checks.xml"
    cmd = [sys.executable, "-m", "pytest", *c.checks_args, f"--junitxml={junit}"]
    t0 = time.monotonic()
    proc = ChildProcess(cmd, win.work / "checks.out", win.child_env(), win.root)
    rc = proc.wait(min(c.checks_limit_s, left))
    wall = time.monotonic() - t0
    output = bundle.read_text_tail(win.work / "checks.out")
    if rc is None:
        win.piece("checks", "test_cuda", "killed", f"ran past its limit of {min(c.checks_limit_s, left):.0f} s",
                  wall_s=wall, output_tail=output[-4000:])  # fmt: skip
        return
    tests, summary = _junit(junit)
    status = "done" if rc == 0 else "failed"
    command = ["python", "-m", "pytest", *c.checks_args]
    out = win.staging / folder
    out.mkdir(parents=True)
    (out / "checks.json").write_bytes(bundle.json_bytes(dict(exit_status=rc, summary=summary, tests=tests)))
    (out / "output.txt").write_text(output)
    env = "TRITON_INTERPRET=0 " if win.device["kind"] == "cuda" else ""
    prov = win.provenance("checks", "test_cuda", status, command, c.checks_sources, digest, wall_s=wall,
                          reproduce=f"{env}python -m pytest {' '.join(c.checks_args)}", summary=summary)  # fmt: skip
    (out / "provenance.json").write_bytes(bundle.json_bytes(prov))
    win.order.append(folder)
    what = ", ".join(f"{v} {k}" for k, v in summary.items() if v) or "no tests"
    win.piece("checks", "test_cuda", status, what if rc == 0 else f"pytest exit status {rc}: {what}",
              wall_s=wall, folder=folder)  # fmt: skip
