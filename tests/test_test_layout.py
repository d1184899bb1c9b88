"""Test modules do not import from each other: shared helpers live in ``tests.helpers`` (fixtures in conftest).

A test module importing another one's helpers runs (and collects) that module's imports and couples the two
files; this walks every ``tests/**/test_*.py`` and fails on any import (top-level or inside a function,
absolute or relative) of a name from another test module.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def _is_test_module(module: str) -> bool:
    return module.split(".")[0] == "tests" and module.rsplit(".", 1)[-1].startswith("test_")


def imported_test_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported test module) for each import in ``source`` (the module ``module``) of another test module."""
    package = module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join([*base, *([node.module] if node.module else [])])
            else:
                origin = node.module or ""
            targets = [origin, *(f"{origin}.{a.name}" for a in node.names)]  # `from tests.x import test_y`
        else:
            continue
        found += [(node.lineno, t) for t in targets if _is_test_module(t) and t != module]
    return found


def test_no_test_module_imports_another() -> None:
    offences = []
    for path in sorted(TESTS.rglob("test_*.py")):
        module = _module_of(path)
        for line, target in imported_test_modules(path.read_text(), module):
            offences.append(f"{path.relative_to(TESTS.parent)}:{line} imports {target} (move it to tests/helpers.py)")
    assert not offences, "\n".join(offences)


def test_checker_sees_every_import_form() -> None:
    src = ("from tests.inference.test_geometry import _package\n"
           "import tests.io.test_manifest\n"
           "from tests.inference import test_streaming\n"
           "from .test_geometry import oracle_model\n"
           "def f():\n    from tests.test_losses import fg_prob\n"
           "from tests.helpers import run_cli\nfrom tests.conftest import REPO\nfrom tests.images2d_data import H\n"
           "from . import helpers\nimport test_streaming_like_but_not_in_tests\n")
    got = sorted({t for _, t in imported_test_modules(src, "tests.inference.test_x")})
    assert got == ["tests.inference.test_geometry", "tests.inference.test_streaming", "tests.io.test_manifest",
                   "tests.test_losses"]
    assert imported_test_modules("from . import test_x\n", "tests.inference.test_x") == []  # itself is not another
