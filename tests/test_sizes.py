"""Size limits on the code (issue 22): a module a reader can hold, functions that do one thing.

No module over MAX_MODULE_LINES lines; no function (nested ones and methods included) over
MAX_FUNCTION_LINES lines or MAX_PARAMS parameters. Parameters count positional-only, ordinary and
keyword-only ones, not `self`/`cls`, `*args` or `**kwargs`; a function that needs more takes a small
frozen dataclass of the related ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The packages held to the limits (issue 22).
PACKAGES = ("cnnclf", "sweeps", "reports")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MAX_PARAMS = 6


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in (*a.posonlyargs, *a.args)]
    return len(names) + len(a.kwonlyargs) - (1 if names and names[0] in ("self", "cls") else 0)


def lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    return fn.end_lineno - fn.lineno + 1  # decorators not counted, its docstring is


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_over_the_line_limit(package):
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _modules(package)}
    assert sizes, f"no modules in {package}/"
    over = [f"{m}: {n} lines" for m, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not over, "\n".join(over)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_over_the_line_or_parameter_limit(package):
    over = [
        f"{p.relative_to(ROOT).as_posix()}:{fn.lineno} {fn.name}: {lines(fn)} lines, {params(fn)} parameters"
        for p in _modules(package)
        for fn in _functions(p)
        if lines(fn) > MAX_FUNCTION_LINES or params(fn) > MAX_PARAMS
    ]
    assert not over, "\n".join(over)


def test_the_checker_counts_lines_and_parameters():
    src = "class A:\n    def m(self, a, /, b, *args, c, **kw):\n        x = 1\n        return x\n"
    (fn,) = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)]
    assert params(fn) == 3 and lines(fn) == 3
