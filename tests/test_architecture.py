"""The layout holds: the library's layers import only downwards, nothing has import cycles, the library never
imports the apps, the trainer never imports the experiments, and no module outgrows a reader (docs/architecture.md).

Imports are read from the source (every ``import`` statement, also those inside functions), so a lazy import that
breaks a rule fails here as well as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIB = "instrumented_adamw"

#: The library's layers, lowest first: a module may import its own layer and those before it, never one after.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("instrumented_adamw.utils", "instrumented_adamw.taxonomy")),
    ("kernels", ("instrumented_adamw.kernels",)),
    ("optim", ("instrumented_adamw.optim", "instrumented_adamw")),  # the package's facade re-exports optim
    ("weibull", ("instrumented_adamw.weibull",)),
    ("monitor", ("instrumented_adamw.sinks", "instrumented_adamw.alerts", "instrumented_adamw.monitor")),
    (
        "integrations",
        (
            "instrumented_adamw.hf",
            "instrumented_adamw.lightning",
            "instrumented_adamw.torchtitan",
            "instrumented_adamw.deepspeed",
        ),
    ),  # fmt: skip
    ("analysis", ("instrumented_adamw.analysis",)),
    ("cli", ("instrumented_adamw.cli",)),
]
MAX_LINES = 600


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(*tops: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for top in tops for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import statement; ``from X import y`` yields ``X.y`` too
    where ``y`` is a submodule, so importing a module through its package counts as importing the module."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body} | {id(n) for n in ast.walk(tree) if _under_module_level_block(tree, n)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, id(node) in top_level))
            for a in node.names:
                sub = f"{base}.{a.name}"
                where = root / sub.replace(".", "/")
                if where.with_suffix(".py").is_file() or where.is_dir():
                    found.append((sub, id(node) in top_level))
    return found


def _under_module_level_block(tree: ast.Module, node: ast.AST) -> bool:
    """Imports in module-level ``if``/``try`` blocks run at import time too."""
    for top in tree.body:
        if isinstance(top, (ast.If, ast.Try)) and any(n is node for n in ast.walk(top)):
            return True
    return False


def layer_of(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    return None if best is None else best[0]


def test_every_library_module_sits_in_a_layer():
    unplaced = [module_name(p) for p in python_files(LIB) if layer_of(module_name(p)) is None]
    assert not unplaced, f"modules outside every layer of tests/test_architecture.py LAYERS: {unplaced}"


def layer_violations(root: Path = ROOT) -> list[str]:
    wrong = []
    for path in python_files(LIB, root=root):
        me = module_name(path, root)
        mine = layer_of(me)
        for target, _ in imports_of(path, root):
            if target.split(".")[0] in ("train", "experiments", "bench", "tests", "tools"):
                wrong.append(f"{me} imports the app module {target}")
            elif target.split(".")[0] == LIB:
                theirs = layer_of(target)
                if mine is not None and theirs is not None and theirs > mine:
                    wrong.append(f"{me} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return wrong


def test_the_library_imports_only_downwards():
    wrong = layer_violations()
    assert not wrong, "\n".join(wrong)


def test_the_trainer_never_imports_the_experiments():
    wrong = [f"{module_name(p)} imports {t}" for p in python_files("train") for t, _ in imports_of(p)
             if t.split(".")[0] == "experiments"]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Module-level imports of the library and both apps form no cycle (a cycle makes import order matter). The
    implicit import of a module's parent packages is no edge: a package's ``__init__`` re-exporting its modules
    is the usual facade, and Python binds the parent before the child runs."""
    files = python_files(LIB, "train", "experiments")
    known = {module_name(p) for p in files}
    graph = {module_name(p): {t for t, top in imports_of(p) if top and t in known} for p in files}
    for name in list(graph):
        graph[name].discard(name)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The rules can fail: a kernel that imports the monitor lazily, and a module that imports the trainer."""
    lib = tmp_path / LIB
    (lib / "kernels").mkdir(parents=True)
    (lib / "monitor.py").write_text("X = 1\n")
    (lib / "kernels" / "bad.py").write_text("def f():\n    from instrumented_adamw.monitor import X\n    return X\n")
    (lib / "kernels" / "app.py").write_text("from train import loop\n")
    (lib / "kernels" / "fine.py").write_text("from . import bad\nfrom instrumented_adamw.utils import extras\n")
    assert sorted(layer_violations(tmp_path)) == [
        "instrumented_adamw.kernels.app imports the app module train",
        "instrumented_adamw.kernels.bad (kernels) imports instrumented_adamw.monitor (monitor)",
    ]


def test_no_module_outgrows_a_reader():
    """Outside tests, no Python module over 600 lines."""
    long = {str(p.relative_to(ROOT)): n for p in python_files(LIB, "train", "experiments", "bench", "tools")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}  # fmt: skip
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_wheel_holds_the_library_only(tmp_path):
    """The wheel pip builds from this checkout installs ``instrumented_adamw`` and nothing else (no ``train``, no
    experiments), with the C kernel's source it compiles at first use."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"  # a copy of the whole checkout but .git, .venv and caches: the build writes nothing here
    skip = (".git", ".venv", "__pycache__", "*.egg-info", "build", "runs", ".cache", ".gpu", "mutants", "results")
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*skip))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("instrumented_adamw-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {LIB}, sorted(tops)
    assert f"{LIB}/kernels/cpu_adamw.c" in names
    packages = {n.rpartition("/")[0] for n in names if n.endswith("/__init__.py")}
    assert packages >= {LIB, f"{LIB}/optim", f"{LIB}/kernels", f"{LIB}/weibull", f"{LIB}/analysis", f"{LIB}/utils"}


def test_the_cli_help_imports_nothing_heavy():
    """`instrumented-adamw --help` answers without the fits' and figures' dependencies; the fit methods it offers
    are the diagnostics' own."""
    import subprocess
    import sys

    from instrumented_adamw import cli
    from instrumented_adamw.weibull import diagnostics

    assert cli.FIT_METHODS == diagnostics.FIT_METHODS
    code = ("import sys; from instrumented_adamw.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('scipy', 'transformers', 'matplotlib', 'torch._dynamo', 'safetensors')"
            " if m in sys.modules))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
