"""Mutation testing of the library's core modules: ``python tools/mutate.py [MODULE ...] [--jobs N]``.

Each mutant is one small deliberate bug — an arithmetic or comparison operator swapped, a boolean flipped, a
constant nudged, a call statement removed — made in a copy of the repository, and run against the tests that
exercise that module (``-x``: the first failing test kills it). A mutant that survives is a bug the suite would
not notice. Results go to ``mutants/report.json`` and a summary table for ``docs/testing.md``.

Why our own harness: the operators skip what a test cannot meaningfully pin (strings, docstrings, messages,
logging), and mutants run in parallel copies that import the mutated module from the copy (the editable install's
finder comes after ``PYTHONPATH`` on ``sys.path``). Each mutant runs only the tests that execute the statement it
changed: one coverage run per module (pytest-cov's per-test contexts, subprocesses measured too) maps every line to
the test ids that reach it. A test that never executes a statement cannot notice a change to it, so the selection
loses no kill; it turns hours into about an hour on 2 cores. Statements run at import time (``def`` lines, defaults,
module constants) or only outside any test's context run the module's whole test files. Not part of CI; run before
a release (``make mutate``).
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Module -> the test files that cover it, fastest and most sensitive first (``-x`` stops at the first failure).
TARGETS = {
    "instrumented_adamw/forces.py": [
        "tests/test_forces.py", "tests/test_behaviour.py", "tests/test_dropin.py", "tests/test_monitor_aggregates.py",
        "tests/test_parity.py", "tests/test_muon.py",
    ],
    "instrumented_adamw/optim.py": [
        "tests/test_behaviour.py", "tests/test_dropin.py", "tests/test_torch_optim_db.py", "tests/test_parity.py",
        "tests/test_steady_state.py", "tests/test_cpu_kernel.py", "tests/test_triton.py",
    ],
    "instrumented_adamw/functional.py": [
        "tests/test_behaviour.py", "tests/test_parity.py", "tests/test_torch_optim_db.py", "tests/test_dropin.py",
    ],
    "instrumented_adamw/monitor.py": [
        "tests/test_monitor_aggregates.py", "tests/test_steady_state.py", "tests/test_dropin.py",
        "tests/test_monitor.py", "tests/test_evidence_logging.py",
    ],
    "instrumented_adamw/weibull.py": [
        "tests/test_weibull.py", "tests/test_weibull_parity.py", "tests/test_diagnostics.py",
    ],
    "train/checkpoint.py": ["tests/test_checkpoint.py", "tests/test_train_faults.py", "tests/test_train_loop.py"],
}  # fmt: skip

#: Equivalent mutants: changes no test can observe because the program computes the same values (a shortcut for
#: zero weight decay, where x·(1 − lr·0) is x bitwise), or that differ only on hardware this suite cannot run (CUDA
#: branches, covered by tests/test_cuda.py on a GPU). Keyed by the module, the stripped source line and the change;
#: each is listed in the report with its reason and left out of the kill rate's denominator. A sixth element, the
#: mutant's ``nth``, picks one of several equal changes on one line (two ``1 - trim`` on a line, say).
_ON_ACCELERATORS = "the branch for steps on an accelerator (CPU steps take the other one): tests/test_cuda.py"
_ZERO_DECAY = "decay by 1 − lr·0 multiplies by 1.0 exactly: the shortcut saves a pass, not a value"
_W = "instrumented_adamw/weibull.py"
_C = "train/checkpoint.py"
_O = "instrumented_adamw/optim.py"
_FURTHER_OUT = "a start one rank further out: the loop that follows walks to the same exact rank"
_ABOVE_TRIM = "lower ≤ 1: the changed clip moves only bins above 1 − trim, of weight ≤ 0, dropped either way"
#: weibull.py source lines holding several listed mutants.
_LO = "lo = max(1, math.ceil(trim * n + 0.5) - 1)"
_HI = "hi = min(n, math.floor((1 - trim) * n + 0.5) + 1)"
_HI_LOOP = "while hi >= 1 and position(hi) > 1 - trim:"
_SPREAD = "if not cxx > 1e-12 * max(abs(sxx), 1e-300):"
_CLIP = "f_lo, f_hi = np.clip(lower, trim, 1 - trim), np.clip(upper, trim, 1 - trim)"
_QUAD_CALL = "return integrate.quad(g, a, b, limit=200, epsabs=1e-13, epsrel=1e-12)[0] / (b - a)"
_HI_STOPS = "position(1) = 0.5/n ≤ 0.5 < 1 − trim, so the loop stops before hi reaches 1 either way"
_QUAD = "the anchors' quadrature tolerances: the anchors move by ≤ 1.2e-13 relative, below every test's tolerance"
EQUIVALENT = {
    ("instrumented_adamw/forces.py", "recorded, 0.0, block[:, _UNMEASURED_SINCE_LAST] + unmeasured.double()",
     "operator", "Add", "Sub"): "the count is only ever compared with zero, and a count of −n is as nonzero as n",
    ("instrumented_adamw/functional.py", "if weight_decay != 0:", "constant", "0", "1"): _ZERO_DECAY,
    ("instrumented_adamw/functional.py", "torch._foreach_add_(device_state_steps, 1)", "remove_call",
     "torch._foreach_add_(device_state_steps, 1)", "pass"): _ON_ACCELERATORS,
    ("instrumented_adamw/functional.py", "torch._foreach_add_(device_state_steps, 1)", "constant", "1", "2"):
        _ON_ACCELERATORS,
    # weibull.py: the trim ranks. The closed-form start is refined by the loops to the exact rank, so a start one
    # rank further out (never inside) gives the same [lo, hi]; a start inside is caught by the rank tests.
    (_W, _LO, "constant", "1", "2", 1): _FURTHER_OUT,
    (_W, _LO, "operator", "Add", "Sub"): _FURTHER_OUT,
    (_W, _LO, "constant", "0.5", "1.0"): _FURTHER_OUT,
    (_W, _HI, "constant", "1", "2", 0): _FURTHER_OUT,
    (_W, _HI, "constant", "0.5", "1.0"): _FURTHER_OUT,
    (_W, "while lo <= n and position(lo) < trim:", "compare0", "LtE", "Lt"):
        "position(n) = (n − 0.5)/n ≥ 0.5 > trim, so the loop stops before lo reaches n either way",
    (_W, _HI_LOOP, "compare0", "GtE", "Gt"):
        _HI_STOPS,
    (_W, _HI_LOOP, "constant", "1", "2", 0):
        _HI_STOPS,
    (_W, "if a.numel() <= chunk:", "compare0", "LtE", "Lt"):
        "a tensor of exactly one chunk: the chunked branch yields that one piece, the same values",
    (_W, "w: Tensor, who: str, center: bool = False, dtype: torch.dtype | None = None", "constant", "False", "True"):
        "both callers pass center, so the default is never used",
    (_W, "sum_sq = sum_abs = 0.0", "constant", "0.0", "1.0"): "with no elements n = 0 raises before the sums are read",
    (_W, "if n < total:", "compare0", "Lt", "LtE"):
        "without zeros (n = total) the filter a[a > 0] keeps every element: the same tensor (non-finite input raises)",
    (_W, _SPREAD, "compare0", "Gt", "GtE"):
        "differs only where cxx equals 1e-12·|sxx| exactly, a floating-point tie no data can be aimed at",
    (_W, _SPREAD, "constant", "1e-300", "2e-300"):
        "the floor applies only when sxx = 0 exactly, and then cxx = 0 raises either way",
    (_W, _CLIP, "operator", "Sub", "Add", 0): _ABOVE_TRIM,
    (_W, _CLIP, "constant", "1", "2", 0): _ABOVE_TRIM,
    (_W, "keep = (weight > 0) & (counts > 0)", "compare0", "Gt", "GtE", 1):
        "weight > 0 already implies counts > 0: an empty bin has lower = upper exactly",
    **{(_W, _QUAD_CALL, "constant", a, b): _QUAD for a, b in (("200", "201"), ("1e-13", "2e-13"), ("1e-12", "2e-12"))},
    (_W, "cxy = mean(lambda f: (x(f) - mx) * (y(f) - my))", "operator", "Sub", "Add"):
        "(x + mx)(y − my) = cxy + 2·mx·mean(y − my), and mean(y − my) = 0 (likewise for y): ≤ 1e-13 apart",
    # optim.py: guards whose other branch is caught again further on
    (_O, 'if isinstance(group["lr"], Tensor) or isinstance(group["betas"][0], Tensor):', "constant", "0", "1"):
        "torch accepts betas only both floats or both tensors: betas[1] tells what betas[0] does",
    (_O, '_, foreach = _default_to_fused_or_foreach(params, group["differentiable"], use_fused=False)', "constant",
     "False", "True"): "only the helper's second result (foreach) is read; use_fused changes the first",
    (_O, "others = [ts[i] for ts in local[1 : 5 if amsgrad else 4]]", "constant", "5", "6"):
        "local holds five lists: the slice to 6 is the slice to 5",
    (_O, "params = local[0]  # then grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs", "constant", "0", "1"):
        "the grads stand in for the params: same device and dtype, and a non-contiguous param has non-contiguous "
        "moments (created like it), which the loop checks",
    (_O, 'if p.device.type != "cpu" or not p.is_contiguous() or p.is_complex():', "boolop", "Or", "And"):
        "each case is refused again below: the first tensor's device, the moments' strides (created like the param), "
        "no complex dtype served",
    # train/checkpoint.py
    (_C, "STATE_FORMAT = 2", "constant", "2", "3"):
        "a version tag the writer and the reader share: any value reads what it writes (other versions are refused "
        "by design, and no state of an older format is committed to test against)",
    (_C, "model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)", "constant", "True", "False"):
        "transformers 5 writes safetensors either way (under 4.x test_snapshot_is_a_verified_hf_directory kills it)",
    (_C, "p.mkdir(exist_ok=True)", "constant", "True", "False"):
        "the directory was just found missing: only another process creating it in between could tell",
    (_C, "elif pointer != directory.name and dir_step(Path(pointer)) < state.step:", "compare0", "Lt", "LtE"):
        "equal steps under different names: step_name never writes two names for one step",
    (_C, "local = [t for t in local if t.is_floating_point() and t.numel()]", "boolop", "And", "Or"):
        "integer and empty tensors are always finite: checking them too changes no answer",
}  # fmt: skip

#: Calls whose removal or mutation a test cannot observe by design (output for people, not for programs).
_SILENT_CALLS = {"print", "warn", "warning", "info", "debug", "write_text_note"}
#: Calls not removed: output and logging. A dropped ``warnings.warn`` is a change users see (and tests check).
_QUIET_REMOVALS = _SILENT_CALLS - {"warn"}
_SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult,
    ast.FloorDiv: ast.Div, ast.Mod: ast.FloorDiv,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip


@dataclass
class Mutant:
    module: str
    index: int
    line: int
    kind: str
    before: str
    after: str
    status: str = "pending"  # killed | survived | timeout | error | equivalent (listed in EQUIVALENT, not run)
    seconds: float = 0.0
    killer: str = ""
    tests: int = 0  # test ids run (0: the module's whole test files)
    lines: tuple[int, int] = (0, 0)  # the changed statement's lines, for selecting tests
    nth: int = 0  # among mutants with the same line, kind and change (two + on one line)
    uses: tuple[int, ...] | None = None  # an import-time statement's effect: the lines that read what it defines
    text: str = ""  # the mutated line, stripped: with ``context`` and ``occurrence``, its place across edits
    context: str = ""  # the nearest non-blank lines before and after it, stripped
    occurrence: int = 0  # among the module's lines with the same text and context, in file order


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first))
    return ids


def _skippable(node: ast.AST, parents: dict[int, ast.AST], source_lines: list[str]) -> bool:
    """Nodes inside raise/assert messages, f-strings, annotations, logging calls, or marked ``no mutate``."""
    line = getattr(node, "lineno", None)
    if line is not None and "pragma: no mutate" in source_lines[line - 1]:
        return True
    cur = node
    while id(cur) in parents:
        parent = parents[id(cur)]
        if isinstance(parent, (ast.JoinedStr, ast.Raise, ast.Assert)):
            return True
        if isinstance(parent, (ast.arg, ast.AnnAssign)) and cur is getattr(parent, "annotation", None):
            return True
        if isinstance(parent, ast.FunctionDef) and cur is parent.returns:
            return True
        if isinstance(parent, ast.Call) and _call_name(parent) in _SILENT_CALLS:
            return True
        if isinstance(parent, ast.keyword) and parent.arg == "strict":
            return True  # zip(..., strict=True): a guard against a bug elsewhere; equal lengths never notice it
        cur = parent
    return False


def _places(lines: list[str]) -> dict[int, tuple[str, str, int]]:
    """Line number -> (stripped text, its context: the nearest non-blank lines around it, and how many earlier lines
    have that text and context). The context keeps equal lines apart: with text alone, a copy of a line inserted
    above would take over the verdict of the one below it, and that one the next one's."""
    stripped = [line.strip() for line in lines]
    filled = [i for i, text in enumerate(stripped) if text]
    count: dict[tuple[str, str], int] = {}
    out = {}
    for k, i in enumerate(filled):
        before = stripped[filled[k - 1]] if k else ""
        after = stripped[filled[k + 1]] if k + 1 < len(filled) else ""
        place = (stripped[i], f"{before}\n{after}")
        out[i + 1] = (*place, count.get(place, 0))
        count[place] = count.get(place, 0) + 1
    return out


def enumerate_mutants(module: str) -> list[tuple[Mutant, ast.Module]]:
    """Every mutant of ``module`` with its mutated tree (one change per mutant)."""
    source = (ROOT / module).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    skip_docs = _docstrings(tree)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    sites: list[tuple[str, int, str, str]] = []  # (kind, node position in walk order, before, after)
    nodes = list(ast.walk(tree))
    for pos, node in enumerate(nodes):
        if id(node) in skip_docs or _skippable(node, parents, lines):
            continue
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _SWAP:
            sites.append(("operator", pos, type(node.op).__name__, _SWAP[type(node.op)].__name__))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in _SWAP:
                    sites.append((f"compare{k}", pos, type(op).__name__, _SWAP[type(op)].__name__))
        elif isinstance(node, ast.BoolOp) and type(node.op) in _SWAP:
            sites.append(("boolop", pos, type(node.op).__name__, _SWAP[type(node.op)].__name__))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            sites.append(("unary", pos, type(node.op).__name__, "drop"))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None:
            if isinstance(node.value, bool):
                sites.append(("constant", pos, repr(node.value), repr(not node.value)))
            elif isinstance(node.value, int):
                sites.append(("constant", pos, repr(node.value), repr(node.value + 1)))
            elif isinstance(node.value, float):
                sites.append(("constant", pos, repr(node.value), repr(node.value * 2 if node.value else 1.0)))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            if _call_name(node.value) not in _QUIET_REMOVALS:
                sites.append(("remove_call", pos, ast.unparse(node)[:60], "pass"))
    out = []
    seen: dict[tuple, int] = {}
    places = _places(lines)
    for index, (kind, pos, before, after) in enumerate(sites):
        mutated = copy.deepcopy(tree)
        target = list(ast.walk(mutated))[pos]
        _apply(target, kind, after)
        line = getattr(nodes[pos], "lineno", 0)
        span = _statement_lines(nodes[pos], parents)
        nth = seen[line, kind, before, after] = seen.get((line, kind, before, after), -1) + 1
        uses = _import_time_uses(nodes[pos], parents, tree, module)
        text, context, occurrence = places.get(line, ("", "", 0))
        mutant = Mutant(module, index, line, kind, before, after, lines=span, nth=nth, uses=uses, text=text,
                        context=context, occurrence=occurrence)  # fmt: skip
        key = (module, text, kind, before, after)
        reason = EQUIVALENT.get(key + (nth,)) or EQUIVALENT.get(key)  # with nth: one of equal changes on a line
        if reason:
            mutant.status, mutant.killer = "equivalent", reason
        out.append((mutant, mutated))
    return out


def _import_time_uses(node: ast.AST, parents: dict[int, ast.AST], tree: ast.Module, module: str):
    """Where a change made at import time shows: the function-body lines that read the names the statement binds
    (a module constant, through the constants computed from it) or, for a default argument, the function's body.
    None where that cannot be told from this module alone (a name other files import, a class body, a decorator,
    a conditional definition): such mutants run the whole test files."""
    chain = [node]
    while id(chain[-1]) in parents:
        chain.append(parents[id(chain[-1])])
    top = chain[-2] if len(chain) > 1 else node  # the module-level statement holding node
    inner = [n for n in chain[:-1] if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if inner:
        fn = inner[-1]
        defaults = [*fn.args.defaults, *(d for d in fn.args.kw_defaults if d is not None)]
        if any(d in chain for d in defaults):  # a default argument: the calls that omit it run the body
            return _body_lines(fn)
        if any(chain[k] in fn.body for k in range(len(chain))):
            return None  # inside a function body: not import time (coverage selects its tests)
        return None  # a decorator or an annotation
    if not isinstance(top, (ast.Assign, ast.AnnAssign)):
        return None
    bound = _bound_names(top)
    uses: set[int] = set()
    seen: set[str] = set()
    while bound - seen:
        name = (bound - seen).pop()
        seen.add(name)
        if _used_elsewhere(name, module):
            return None
        for stmt in tree.body:
            refs = [
                n for n in ast.walk(stmt) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
            ]
            if not refs:
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = set(_body_lines(stmt))
                if not all(r.lineno in body for r in refs):
                    return None  # read in a default or decorator: import time again
                uses.update(r.lineno for r in refs)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                bound |= _bound_names(stmt)  # a constant computed from it: follow that one too
            else:
                return None  # read by a class body or module-level control flow
    return tuple(sorted(uses))


def _body_lines(fn: ast.AST) -> tuple[int, ...]:
    return tuple(line for stmt in fn.body for line in range(stmt.lineno, stmt.end_lineno + 1))


def _bound_names(stmt: ast.AST) -> set[str]:
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _used_elsewhere(name: str, module: str) -> bool:
    """Whether another source or test file names ``name`` (imports or reads it from this module)."""
    pattern = re.compile(rf"\b{re.escape(name)}\b")
    return any(path != module and pattern.search(text) for path, text in _sources(ROOT).items())


@functools.cache
def _sources(root: Path) -> dict[str, str]:
    """The repository's Python files (path relative to ``root`` -> text), read once per harness run."""
    return {
        path.relative_to(root).as_posix(): path.read_text(errors="replace")
        for part in ("instrumented_adamw", "train", "tests", "bench", "tools")
        for path in (root / part).rglob("*.py")
    }


def _call_name(call: ast.Call) -> str:
    fn = call.func
    return fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")


def _statement_lines(node: ast.AST, parents: dict[int, ast.AST]) -> tuple[int, int]:
    """Lines a test must execute to run ``node``: its statement, or a compound statement's header up to ``node``.

    Coverage may record a multi-line statement under any of its lines, so the whole range counts.
    """
    stmt = node
    while not isinstance(stmt, ast.stmt) and id(stmt) in parents:
        stmt = parents[id(stmt)]
    lo = getattr(stmt, "lineno", 0)
    compound = hasattr(stmt, "body") and stmt is not node
    hi = getattr(node, "end_lineno", lo) if compound else getattr(stmt, "end_lineno", lo)
    return lo, max(lo, hi or lo)


def covering_tests(module: str, tests: list[str], workdir: Path, env: dict[str, str]) -> dict[int, set[str]]:
    """Line of ``module`` -> the pytest ids of the tests that execute it (``""``: outside any test, e.g. import).

    Runs ``tests`` once under coverage with per-test contexts; raises if they fail without any mutant.
    """
    rc = workdir / ".coveragerc.mutate"
    rc.write_text("[run]\npatch = subprocess\n")  # the trainer's killed-and-resumed runs are subprocesses
    data = workdir / ".coverage.mutate"
    package = module.split("/")[0]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--cov={package}", "--cov-context=test",
         f"--cov-config={rc}", "--cov-report=", *tests],
        cwd=workdir, env=dict(env, COVERAGE_FILE=str(data)), capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{module}: its tests fail without any mutant; fix them first\n{done.stdout[-3000:]}")
    import coverage  # pytest-cov's dependency (the dev extra)

    measured = coverage.CoverageData(basename=str(data))
    measured.read()
    target = str((workdir / module).resolve())
    by_line: dict[int, set[str]] = {}
    for filename in measured.measured_files():
        if str(Path(filename).resolve()) != target:
            continue
        for line, contexts in measured.contexts_by_lineno(filename).items():
            by_line.setdefault(line, set()).update(map(_context_tests, contexts))
    return by_line


def _context_tests(context: str) -> str:
    """The tests a coverage context stands for: a test's own id for its run (and teardown), its whole file for its
    setup. A module- or class-scoped fixture runs in the setup of the first test that asks for it, and the tests
    after it read what it computed: mapping it to that first test alone let a mutant in a run that a fixture
    makes once survive the very test that checks its result."""
    test, _, phase = context.rpartition("|")
    if not test:
        return context  # "" (outside any test), or a context without a phase
    return test.split("::")[0] if phase == "setup" else test


def _coverage_cached(
    module: str, tests: list[str], workdir: Path, threads: int, out: Path
) -> tuple[dict[int, set[str]], float]:
    """:func:`covering_tests` and its wall time, kept in ``out`` while the project's sources and tests are unchanged
    (a resumed run does not pay the coverage run again)."""
    digest = hashlib.sha256(module.encode() + Path(__file__).read_bytes())  # and how the map is made
    for path in sorted(p for part in ("instrumented_adamw", "train", "tests") for p in (workdir / part).rglob("*.py")):
        digest.update(path.relative_to(workdir).as_posix().encode() + path.read_bytes())
    cache = out / f"coverage-{module.replace('/', '.')}.json"
    if cache.exists():
        kept = json.loads(cache.read_text())
        if kept["digest"] == digest.hexdigest():
            return {int(k): set(v) for k, v in kept["by_line"].items()}, kept["seconds"]
    t0 = time.perf_counter()
    by_line = covering_tests(module, tests, workdir, _env(workdir, threads))
    seconds = time.perf_counter() - t0
    cache.write_text(json.dumps({"digest": digest.hexdigest(), "seconds": seconds,
                                 "by_line": {k: sorted(v) for k, v in by_line.items()}}))  # fmt: skip
    return by_line, seconds


def select_tests(mutant: Mutant, by_line: dict[int, set[str]], tests: list[str]) -> list[str]:
    """The test ids that execute the mutated statement, in ``tests``' file order. For a statement run at import
    time, the tests that execute the lines reading what it defines (``Mutant.uses``); the whole files where that
    cannot be told, or where the statement runs outside any test or (as far as coverage saw) never."""
    lo, hi = mutant.lines
    ids: set[str] = set()
    for line in range(lo, hi + 1):
        ids |= by_line.get(line, set())
    if "" in ids and mutant.uses is not None:  # import time: the tests that read what the statement defines
        ids = set().union(*(by_line.get(line, set()) for line in mutant.uses)) - {""}
    if not ids or "" in ids:
        return tests
    ids = {i for i in ids if i.split("::")[0] not in ids or "::" not in i}  # a whole file covers its tests
    order = {path: k for k, path in enumerate(tests)}
    return sorted(ids, key=lambda i: (order.get(i.split("::")[0], len(order)), i))


def _apply(node: ast.AST, kind: str, after: str) -> None:
    if kind in ("operator", "boolop"):
        node.op = getattr(ast, after)()
    elif kind.startswith("compare"):
        node.ops[int(kind[7:])] = getattr(ast, after)()
    elif kind == "unary":
        node.op = ast.UAdd()  # -x -> +x; not x -> +x, which has x's truth value: the negation is gone
    elif kind == "constant":
        node.value = eval(after)  # noqa: S307 - our own repr of a literal
    elif kind == "remove_call":
        node.value = ast.Constant(value=None)


def _env(workdir: Path, threads: int) -> dict[str, str]:
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

    The server (``python tools/mutate.py --serve``) reads one JSON request per line and answers with the exit code;
    the forked child runs ``pytest.main`` with its output in a log file, and is killed at the timeout.
    """

    def __init__(self, workdir: Path, threads: int) -> None:
        self.workdir = workdir
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve"], cwd=self.workdir,
                env=_env(self.workdir, self.threads), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
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


def run_mutant(mutant: Mutant, tree: ast.Module, runner: Runner, tests: list[str], timeout: float) -> Mutant:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/mutate.py", description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(TARGETS), help=f"default: {' '.join(TARGETS)}")
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="mutants run in parallel")
    parser.add_argument("--limit", type=int, default=0, help="only the first N mutants per module (a smoke run)")
    parser.add_argument("--out", default=str(ROOT / "mutants"))
    parser.add_argument("--resume", action="store_true", help="keep the verdicts in OUT/report.json; run the rest")
    parser.add_argument(
        "--retest",
        action="store_true",
        help="with --resume: run the survivors again (after adding tests; kills are kept)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="print the table and the surviving mutants of OUT/report.json (markdown); run nothing",
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.report:
        kept = [
            Mutant(**{**d, "lines": tuple(d["lines"])})
            for d in json.loads((Path(args.out) / "report.json").read_text())
        ]
        print(summary(kept) + "\n\n" + survivors(kept))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.json"
    earlier = {}
    if args.resume and report.exists():
        verdicts = [Mutant(**{**d, "lines": tuple(d["lines"])}) for d in json.loads(report.read_text())]
        earlier = carried_verdicts(verdicts, args.modules, args.retest)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    copies = []
    for j in range(args.jobs):  # one copy of the repository per worker: mutants never share a file
        d = Path(tempfile.mkdtemp(prefix=f"mutate{j}-"))
        for part in ("instrumented_adamw", "train", "tests", "configs", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, d / part)
        copies.append(d)
    results: list[Mutant] = [m for m in earlier.values() if m.module not in args.modules]
    free: queue.Queue[Runner] = queue.Queue()
    for d in copies:
        free.put(Runner(d, threads))

    def save() -> None:  # after every mutant: a killed run keeps its verdicts for --resume
        tmp = report.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(m) for m in results], indent=1))
        tmp.replace(report)

    try:
        for module in args.modules:
            tests = TARGETS[module]
            mutants = enumerate_mutants(module)
            if args.limit:
                mutants = mutants[: args.limit]
            kept = [_moved(earlier[_key(m)], m) for m, _ in mutants if _key(m) in earlier and m.status != "equivalent"]
            results.extend(kept)
            results.extend(m for m, _ in mutants if m.status == "equivalent")  # listed, never run
            mutants = [(m, tree) for m, tree in mutants if _key(m) not in earlier and m.status != "equivalent"]
            if not mutants:
                print(f"{module}: all {len(kept)} verdicts kept from {report}")
                continue
            try:
                by_line, seconds = _coverage_cached(module, tests, copies[0], threads, out)
            except RuntimeError as err:
                print(err, file=sys.stderr)
                return 2
            timeout = 3 * seconds + 60  # the coverage run is slower than any mutant's
            print(
                f"{module}: {len(mutants)} mutants against {len(tests)} test files (timeout {timeout:.0f} s)"
                + (f", {len(kept)} verdicts kept" if kept else ""),
                flush=True,
            )

            def task(m, tree, tests=tests, timeout=timeout, by_line=by_line):
                selected = select_tests(m, by_line, tests)
                m.tests = 0 if selected is tests else len(selected)
                runner = free.get()  # a copy runs one mutant at a time
                try:
                    return run_mutant(m, tree, runner, selected, timeout)
                finally:
                    free.put(runner)

            with ThreadPoolExecutor(args.jobs) as pool:
                futures = [pool.submit(task, m, tree) for m, tree in mutants]
                for f in futures:
                    m = f.result()
                    results.append(m)
                    save()
                    if m.status not in ("killed", "timeout"):
                        print(f"  {m.status} {m.module}:{m.line} {m.kind} {m.before} -> {m.after}", flush=True)
    finally:
        while not free.empty():
            free.get().close()
        for d in copies:
            shutil.rmtree(d, ignore_errors=True)
    print(summary(results))
    return 0


def survivors(results: list[Mutant]) -> str:
    """The surviving mutants as a markdown list, by module and line."""
    out = []
    for m in sorted(results, key=lambda m: (m.module, m.line, m.index)):
        if m.status in ("survived", "error", "equivalent"):
            note = {"survived": "", "error": " (error: the tests did not run)"}.get(
                m.status, f" (equivalent: {m.killer})"
            )
            out.append(f"- `{m.module}:{m.line}` {m.kind}: `{m.before}` → `{m.after}`{note}")
    return "\n".join(out) if out else "(none)"


def carried_verdicts(verdicts: list[Mutant], modules: list[str], retest: bool) -> dict[tuple, Mutant]:
    """The saved verdicts a ``--resume`` keeps, by mutant: all of them, or with ``--retest`` all but the survivors
    of the modules being run (every verdict of the other modules stays as it was). Verdicts saved before mutants
    carried their line's context take it from the module as it is now, at their line number (the identity they
    had), where that line still reads the same; the others can match nothing and run again."""
    kept = ("killed", "timeout") if retest else ("killed", "timeout", "survived")
    places = {}
    for m in verdicts:
        if not m.context:
            if m.module not in places:
                path = ROOT / m.module
                places[m.module] = _places(path.read_text().splitlines()) if path.exists() else {}
            text, context, occurrence = places[m.module].get(m.line, ("", "", 0))
            if m.text and m.text != text:
                context = f"<stale: line {m.line} reads otherwise now>"
            m.text, m.context, m.occurrence = m.text or text, context or f"<line {m.line}>", occurrence
    return {_key(m): m for m in verdicts if m.status in kept or m.module not in modules}


def _key(m: Mutant) -> tuple:
    """A mutant's identity across runs: the same change on the same line of code, by its text, the lines around
    it and which of the module's equal ones it is, so an edit elsewhere that moves lines keeps the verdicts of
    the lines it did not touch. Not its index, which a change to the harness's rules renumbers."""
    return (m.module, m.text, m.context, m.occurrence, m.kind, m.before, m.after, m.nth)


def _moved(verdict: Mutant, now: Mutant) -> Mutant:
    """A kept verdict, at the place its mutant has now."""
    return replace(verdict, index=now.index, line=now.line, lines=now.lines, uses=now.uses)


def summary(results: list[Mutant]) -> str:
    rows = [
        "| module | mutants | equivalent | killed by a test | killed by timeout | survived | errors | kill rate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for module in dict.fromkeys(m.module for m in results):
        ms = [m for m in results if m.module == module]
        n = {s: sum(m.status == s for m in ms) for s in ("equivalent", "killed", "timeout", "survived", "error")}
        rate = 100 * (n["killed"] + n["timeout"]) / max(len(ms) - n["equivalent"], 1)
        counts = " | ".join(str(n[s]) for s in ("equivalent", "killed", "timeout", "survived", "error"))
        rows.append(f"| `{module}` | {len(ms)} | {counts} | {rate:.1f}% |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
