"""Test hook: kill the process at a named point, so the fault-injection tests (``tests/test_train_faults.py``) can
kill a run exactly where a power cut or ``kill -9`` could strike — mid-save, right after a rename — rather than
wherever a timer happens to land.

``INSTRUMENTED_ADAMW_FAULT=POINT:STEP`` sends SIGKILL to this process when it passes ``POINT`` at optimizer step
``STEP``. Unset (always, outside tests), a call costs one environment lookup. Points:

* ``step`` — after an optimizer step, before its logging and saving;
* ``log`` — after a log step's records are written;
* ``snapshot.written`` — a snapshot's files and manifest written in its temporary directory, not yet renamed;
* ``snapshot.renamed`` — the snapshot directory renamed into place;
* ``resume.written`` — a resume state written and checksummed in its temporary directory, not yet renamed;
* ``resume.renamed`` — the resume state renamed into place, ``latest.json`` not yet switched;
* ``resume.pointer`` — ``latest.json`` switched, older states not yet deleted.
"""

from __future__ import annotations

import os
import signal

ENV = "INSTRUMENTED_ADAMW_FAULT"
POINTS = ("step", "log", "snapshot.written", "snapshot.renamed", "resume.written", "resume.renamed", "resume.pointer")


def fault_point(name: str, step: int) -> None:
    spec = os.environ.get(ENV)
    if spec and spec == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
