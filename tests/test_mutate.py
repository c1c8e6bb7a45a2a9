"""The mutation harness (``tools/mutate.py``, ``make mutate``): what it mutates and which tests each mutant runs.

A wrong selection would make mutants survive that the suite kills (a selection too narrow) or waste hours (too
wide), so the rules are pinned here on a small module: one change per mutant, never inside strings or messages;
the tests run are those coverage saw executing the changed statement, in the module's test-file order, and the
whole files for statements run at import time or never seen.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # the harness imports its tables and test server from beside it
_spec = importlib.util.spec_from_file_location("mutate", ROOT / "tools" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("mutate", mutate)  # dataclasses look their module up there
_spec.loader.exec_module(mutate)

SOURCE = '''"""Docstring 1 + 2."""
LIMIT = 3


def f(x, y=2):
    if x > LIMIT and y:
        raise ValueError(f"x {x + 1} too big")
    total = (x
             + y)
    print(x - 1)
    g(x)
    return -total + x + 1
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(SOURCE)
    monkeypatch.setattr(mutate, "ROOT", tmp_path)
    return "pkg/m.py"


def test_each_mutant_is_one_change_outside_strings_and_messages(module):
    mutants = mutate.enumerate_mutants(module)
    kinds = sorted((m.line, m.kind, m.before, m.after) for m, _ in mutants)
    assert kinds == [
        (2, "constant", "3", "4"),
        (5, "constant", "2", "3"),
        (6, "boolop", "And", "Or"),
        (6, "compare0", "Gt", "GtE"),
        (8, "operator", "Add", "Sub"),
        (11, "remove_call", "g(x)", "pass"),
        (12, "constant", "1", "2"),
        (12, "operator", "Add", "Sub"),
        (12, "operator", "Add", "Sub"),
        (12, "unary", "USub", "drop"),
    ]  # not the docstring, the f-string in the raise, or print(...) and the arithmetic inside it
    assert len({mutate._key(m) for m, _ in mutants}) == len(mutants)  # --resume tells the two + of line 12 apart
    before = ast.unparse(ast.parse(SOURCE)).splitlines()
    for _, tree in mutants:
        after = ast.unparse(tree).splitlines()
        assert len(after) == len(before)
        assert sum(a != b for a, b in zip(after, before, strict=True)) == 1  # one change, nothing else moved


def test_statement_lines_cover_multiline_statements_and_only_a_compound_header(module):
    by_kind = {m.kind: m for m, _ in mutate.enumerate_mutants(module) if m.line < 12}
    assert by_kind["operator"].lines == (8, 9)  # total = (x\n + y): coverage may record either line
    assert by_kind["boolop"].lines == (6, 6)  # the if's header, not its body
    assert by_kind["remove_call"].lines == (11, 11)


def test_tests_run_are_those_executing_the_statement_else_the_whole_files(module):
    mutants = {m.kind: m for m, _ in mutate.enumerate_mutants(module) if m.line < 12}
    files = ["tests/test_b.py", "tests/test_a.py"]
    by_line = {
        2: {""},  # LIMIT = 3: at import
        6: {"tests/test_a.py::test_x", "tests/test_b.py::test_z[1]"},
        9: {"tests/test_a.py::test_y"},
        8: {"tests/test_a.py::test_x"},
    }
    assert mutate.select_tests(mutants["operator"], by_line, files) == [
        "tests/test_a.py::test_x",
        "tests/test_a.py::test_y",
    ]
    assert mutate.select_tests(mutants["boolop"], by_line, files) == [
        "tests/test_b.py::test_z[1]",
        "tests/test_a.py::test_x",
    ]  # in the order of the module's test files (fastest and most sensitive first)
    assert mutate.select_tests(mutants["remove_call"], by_line, files) is files  # never seen: run everything
    # LIMIT = 3 runs at import; what it changes shows where it is read (line 6): those tests, not whole files.
    limit = next(m for m, _ in mutate.enumerate_mutants(module) if m.line == 2)
    assert limit.uses == (6,)
    assert mutate.select_tests(limit, by_line, files) == ["tests/test_b.py::test_z[1]", "tests/test_a.py::test_x"]
    default = next(m for m, _ in mutate.enumerate_mutants(module) if m.line == 5)
    assert default.uses == tuple(range(6, 13))  # y=2: the calls that omit y run the body
    (mutate.ROOT / "tests").mkdir()
    (mutate.ROOT / "tests" / "test_c.py").write_text("from pkg.m import LIMIT\n")
    mutate._sources.cache_clear()  # the harness reads the sources once per run; this test changed them
    limit = next(m for m, _ in mutate.enumerate_mutants(module) if m.line == 2)
    assert limit.uses is None and mutate.select_tests(limit, by_line, files) is files  # read elsewhere: everything


def test_a_line_run_by_a_fixture_maps_to_the_whole_file_of_the_test_that_set_it_up(module):
    """A shared fixture runs in the setup of the first test that asks for it; the tests after it read its result."""
    assert mutate._context_tests("tests/test_a.py::test_x|run") == "tests/test_a.py::test_x"
    assert mutate._context_tests("tests/test_a.py::test_x|teardown") == "tests/test_a.py::test_x"
    assert mutate._context_tests("tests/test_a.py::test_x|setup") == "tests/test_a.py"
    assert mutate._context_tests("") == ""
    operator = next(m for m, _ in mutate.enumerate_mutants(module) if m.kind == "operator" and m.line < 12)
    lo, hi = operator.lines
    by_line = dict.fromkeys(
        range(lo, hi + 1), {"tests/test_a.py", "tests/test_a.py::test_x", "tests/test_b.py::test_z[1]"}
    )
    assert mutate.select_tests(operator, by_line, ["tests/test_b.py", "tests/test_a.py"]) == [
        "tests/test_b.py::test_z[1]",
        "tests/test_a.py",
    ]  # the file once, not its tests again


def test_summary_counts_timeouts_as_kills_but_shows_them(module):
    ms = [mutate.Mutant(module, i, 1, "k", "a", "b", status=s) for i, s in enumerate(["killed", "timeout", "survived"])]
    ms.append(mutate.Mutant(module, 3, 1, "k", "a", "b", status="equivalent", killer="same values"))
    row = mutate.summary(ms).splitlines()[-1]
    assert row == "| `pkg/m.py` | 4 | 1 | 1 | 1 | 1 | 0 | 66.7% |"  # equivalents leave the denominator
    assert "(equivalent: same values)" in mutate.survivors(ms)


def test_listed_equivalent_mutants_are_marked_and_not_run(module, monkeypatch):
    monkeypatch.setitem(mutate.EQUIVALENT, (module, "LIMIT = 3", "constant", "3", "4"), "a reason")
    marked = [m for m, _ in mutate.enumerate_mutants(module) if m.status == "equivalent"]
    assert [(m.line, m.killer) for m in marked] == [(2, "a reason")]


def test_an_equivalent_listed_with_nth_marks_only_that_one_of_equal_changes(module, monkeypatch):
    """Line 12 holds two ``+``: a sixth key element picks one of them; without it the entry marks both."""
    text = (mutate.ROOT / module).read_text().splitlines()[11].strip()
    key = (module, text, "operator", "Add", "Sub")
    for entry, expected in ((key + (1,), [1]), (key, [0, 1])):
        with monkeypatch.context() as m:
            m.setitem(mutate.EQUIVALENT, entry, "a reason")
            marked = [mu.nth for mu, _ in mutate.enumerate_mutants(module) if mu.status == "equivalent"]
        assert marked == expected


def test_retest_reruns_survivors_of_the_modules_named_and_keeps_the_others(module):
    ms = [mutate.Mutant(mod, i, i, "k", "a", "b", status=s)
          for i, (mod, s) in enumerate([(module, "killed"), (module, "survived"), ("other.py", "survived"),
                                        ("other.py", "killed")])]  # fmt: skip
    kept = mutate.carried_verdicts(ms, [module], retest=True)
    assert sorted(m.index for m in kept.values()) == [0, 2, 3]
    assert sorted(m.index for m in mutate.carried_verdicts(ms, [module], retest=False).values()) == [0, 1, 2, 3]


def test_verdicts_follow_their_lines_when_an_edit_elsewhere_moves_them(module):
    """A resumed run keeps the verdicts of lines an edit did not touch, at their new line numbers; a changed line's
    mutants are new. Verdicts saved without the line's text (older reports) take it from the module as it is."""
    before = [m for m, _ in mutate.enumerate_mutants(module)]
    for m in before:
        m.status = "killed"
    path = mutate.ROOT / module
    source = path.read_text().splitlines()
    changed = next(i for i, line in enumerate(source) if "x > LIMIT" in line)
    source[changed] = source[changed].replace("x > LIMIT", "x >= LIMIT")
    path.write_text("import math  # a new first line moves every other one\n" + "\n".join(source) + "\n")
    mutate._sources.cache_clear()
    after = [m for m, _ in mutate.enumerate_mutants(module)]
    earlier = mutate.carried_verdicts(before, [module], retest=False)
    pairs = [(earlier[mutate._key(m)], m) for m in after if mutate._key(m) in earlier]
    assert pairs and all(old.line + 1 == m.line for old, m in pairs)  # the same lines, one further down
    assert all(mutate._moved(old, m).line == m.line for old, m in pairs)  # reported where they are now
    new = [m for m in after if mutate._key(m) not in earlier]
    # The edited line (one further down now) and its neighbours, whose context it is, run again.
    assert changed + 2 in {m.line for m in new} <= {changed + 1, changed + 2, changed + 3}
    old_style = mutate.Mutant(module, 0, 3, "k", "a", "b", status="killed")  # no text: read from the module now
    (carried,) = mutate.carried_verdicts([old_style], [module], retest=False).values()
    assert carried.text == path.read_text().splitlines()[2].strip() and carried.context
    moved_away = mutate.Mutant(module, 0, 3, "k", "a", "b", status="killed", text="something else")
    (stale,) = mutate.carried_verdicts([moved_away], [module], retest=False).values()
    assert "stale" in stale.context  # its line reads otherwise now: it matches no mutant, which runs again


def test_a_copy_of_a_line_inserted_above_takes_no_verdict_of_the_lines_below(module):
    """Two functions hold the same line, one killed, one survived; a third copy is added above both. Each verdict
    stays with its own function's line, and the new copy's mutant is new (found by review: with the text alone,
    each verdict slid down to the next copy, reporting untested code as killed)."""
    path = mutate.ROOT / module
    body = "def f(a, b):\n    total = a + b\n    return total\n\n\ndef g(a, b):\n    total = a + b\n    return -total\n"
    path.write_text(body)
    mutate._sources.cache_clear()
    before = [m for m, _ in mutate.enumerate_mutants(module) if m.kind == "operator"]
    assert [m.line for m in before] == [2, 7]
    before[0].status, before[1].status = "killed", "survived"
    path.write_text("def h(a, b):\n    total = a + b\n    return total * 2\n\n\n" + body)
    mutate._sources.cache_clear()
    after = [m for m, _ in mutate.enumerate_mutants(module) if m.kind == "operator" and m.before == "Add"]
    earlier = mutate.carried_verdicts(before, [module], retest=False)
    verdicts = {m.line: earlier[mutate._key(m)].status if mutate._key(m) in earlier else "new" for m in after}
    assert verdicts == {2: "new", 7: "killed", 12: "survived"}
