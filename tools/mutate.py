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

from mutation_server import Runner, child_env, run_mutant  # noqa: E402 - beside this script
from mutation_targets import EQUIVALENT, TARGETS  # noqa: E402

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
    by_line = covering_tests(module, tests, workdir, child_env(workdir, threads))
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
    args = parser.parse_args(argv)
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
    copies = [_copy_repository(j) for j in range(args.jobs)]  # one per worker: mutants never share a file
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
            if not _run_module(module, args, earlier, results, copies[0], threads, free, save):
                return 2
    finally:
        while not free.empty():
            free.get().close()
        for d in copies:
            shutil.rmtree(d, ignore_errors=True)
    print(summary(results))
    return 0


def _copy_repository(j: int) -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"mutate{j}-"))
    for part in ("instrumented_adamw", "train", "experiments", "tests", "configs", "pyproject.toml"):
        src = ROOT / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / part)
    return d


def _run_module(module: str, args, earlier: dict, results: list[Mutant], coverage_copy: Path, threads: int,
                free: queue.Queue, save) -> bool:  # fmt: skip
    """Every mutant of ``module`` without a kept verdict, ``args.jobs`` at a time; False if coverage failed."""
    out, report = Path(args.out), Path(args.out) / "report.json"
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
        return True
    try:
        by_line, seconds = _coverage_cached(module, tests, coverage_copy, threads, out)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return False
    timeout = 3 * seconds + 60  # the coverage run is slower than any mutant's
    print(
        f"{module}: {len(mutants)} mutants against {len(tests)} test files (timeout {timeout:.0f} s)"
        + (f", {len(kept)} verdicts kept" if kept else ""),
        flush=True,
    )

    def task(m, tree):
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
    return True


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
