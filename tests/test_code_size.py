"""Small units: no function over ~60 lines and no module over 400 lines in ``medseg/``.

Counted from the AST: a function's body, from its first statement (the docstring) to its last line; the
signature is not counted (typer commands declare one option per line). An exception is listed below with its
reason; the list should only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medseg"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400

# module path relative to medseg/ -> why it may be longer
MODULE_EXCEPTIONS: dict[str, str] = {}
# "module:function" -> why it may be longer
FUNCTION_EXCEPTIONS: dict[str, str] = {}


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the body, docstring included, signature and decorators excluded."""
    return (fn.end_lineno or fn.lineno) - fn.body[0].lineno + 1


def test_body_lines_counts_the_body() -> None:
    fn = _functions(ast.parse("def f(\n    a: int,\n) -> int:\n    x = a\n    return x\n"))[0]
    assert body_lines(fn) == 2


def test_no_module_is_too_long() -> None:
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and rel not in MODULE_EXCEPTIONS:
            long[rel] = n
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_too_long() -> None:
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for fn in _functions(ast.parse(path.read_text())):
            n = body_lines(fn)
            key = f"{rel}:{fn.name}"
            if n > MAX_FUNCTION_LINES and key not in FUNCTION_EXCEPTIONS:
                long[key] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_exceptions_are_still_needed() -> None:
    """A listed exception that no longer applies is removed from the list."""
    for rel in MODULE_EXCEPTIONS:
        assert len((PACKAGE / rel).read_text().splitlines()) > MAX_MODULE_LINES, f"{rel} is short now: unlist it"
    for key in FUNCTION_EXCEPTIONS:
        rel, name = key.split(":")
        sizes = [body_lines(f) for f in _functions(ast.parse((PACKAGE / rel).read_text())) if f.name == name]
        assert sizes and max(sizes) > MAX_FUNCTION_LINES, f"{key} is short now (or gone): unlist it"
