"""The design card's layout, checked: the method module is the method (short, importing no run plumbing),
no file imports a script, nothing edits sys.path, and no function in the scripts' code is longer than a screen."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_LINES = 950  # the design card's budget for e2ediff.py
SCREEN = 80  # lines: the longest function the scripts' code may hold
SCRIPTS = ("train_toy", "train_t2i")
SCRIPT_CODE = ("train_toy.py", "train_t2i.py", "toy_training.py", "t2i_training.py", "train_utils.py")
# what e2ediff.py may import besides the standard library: the tensors, and its one memory helper
METHOD_IMPORTS = {"numpy", "torch", "selective_checkpoint"}


def python_files() -> list[Path]:
    skip = {".git", ".venv", "runs", "build"}
    return [path for path in ROOT.rglob("*.py") if not skip & set(path.relative_to(ROOT).parts)
            and "egg-info" not in str(path)]


def edits_sys_path(path: Path) -> bool:
    """Whether the file calls a method of sys.path (insert, append, extend, ...)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and ast.unparse(node.func.value) == "sys.path" for node in ast.walk(ast.parse(path.read_text())))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_method_module_fits_its_budget_and_imports_no_run_plumbing():
    source = ROOT / "e2ediff.py"
    assert len(source.read_text().splitlines()) <= METHOD_LINES
    outside_stdlib = {name for name in imported_modules(source) if name not in sys.stdlib_module_names}
    assert outside_stdlib <= METHOD_IMPORTS, f"e2ediff.py imports {sorted(outside_stdlib - METHOD_IMPORTS)}"


def test_no_file_imports_a_script_or_edits_sys_path():
    files = python_files()
    assert len(files) > 20  # the walk found the repository
    importers = [str(path.relative_to(ROOT)) for path in files if imported_modules(path) & set(SCRIPTS)]
    assert importers == []
    assert [str(path.relative_to(ROOT)) for path in files if edits_sys_path(path)] == []


@pytest.mark.parametrize("name", SCRIPT_CODE)
def test_no_function_in_the_scripts_code_is_longer_than_a_screen(name):
    tree = ast.parse((ROOT / name).read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert {name: length for name, length in lengths.items() if length > SCREEN} == {}
