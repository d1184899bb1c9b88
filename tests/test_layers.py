"""The package's import graph: layers point one way, no cycles, no private names imported across modules.

Walks the AST of every module in ``medseg/`` (imports inside functions and ``TYPE_CHECKING`` blocks count too)
and checks each import against ``LAYERS``, the table the README's design section shows. A module may import
its own layer and the layers below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medseg"

# Lowest first. Each entry: layer name -> module prefixes in it (a prefix covers its submodules).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("medseg", "medseg.errors", "medseg.registry")),
    ("config", ("medseg.config", "medseg.config_inference")),
    ("io", ("medseg.io", "medseg.tracking")),
    ("runtime", ("medseg.runtime",)),
    ("data", ("medseg.data",)),
    ("planning", ("medseg.planning",)),
    ("models", ("medseg.models", "medseg.losses", "medseg.components")),
    ("metrics", ("medseg.metrics",)),
    ("inference", ("medseg.inference",)),
    ("engine", ("medseg.engine",)),
    ("evaluation", ("medseg.evaluation",)),
    ("entry points", ("medseg.workflows", "medseg.demo", "medseg.cli_common", "medseg.cli_data",
                      "medseg.cli_reference", "medseg.cli_pacs", "medseg.cli_runs", "medseg.cli_export",
                      "medseg.cli_ensemble", "medseg.cli")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """Index of the layer whose longest prefix matches ``module``."""
    best, best_len = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    if best < 0:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it to the table (and the README)")
    return best


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every medseg import in the file."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "medseg"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "medseg":
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{target}.{n}" in known]  # `from medseg.models import unet`: a module
            out += [(f"{target}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, list[str], int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def test_every_module_is_in_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_import_points_upward() -> None:
    bad = []
    for name, imps in graph().items():
        for target, _, line in imps:
            if layer_of(target) > layer_of(name):
                bad.append(f"{name}:{line} imports {target} ({LAYERS[layer_of(name)][0]} -> "
                           f"{LAYERS[layer_of(target)][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = [f"{name}:{line} imports {n} from {target}" for name, imps in graph().items()
           for target, names, line in imps for n in names
           if n.startswith("_") and not (n.startswith("__") and n.endswith("__")) and target != name]
    assert not bad, "\n".join(bad)


def test_no_private_third_party_names_are_imported() -> None:
    """``from monai.x import _private`` ties medseg to another project's internals."""
    bad = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("medseg"):
                bad += [f"{name}:{node.lineno} imports {a.name} from {node.module}" for a in node.names
                        if a.name.startswith("_") and a.name != "__version__"]
    assert not bad, "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as a list of nodes, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for root in sorted(edges):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(edges.get(root, ())))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(edges.get(nxt, ()))))
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_modules() -> None:
    g = graph()
    known = set(g)
    edges = {}
    for name, imps in g.items():
        # a package's __init__ being imported on the way to its submodule is not an edge of the design
        edges[name] = {t for t, _, _ in imps if t in known and t != name and not name.startswith(t + ".")}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def layer_table() -> str:
    """The layer table as the README shows it (lowest first)."""
    rows = ["| layer | modules |", "|---|---|"]
    rows += [f"| {name} | {', '.join(f'`{p}`' for p in prefixes)} |" for name, prefixes in LAYERS]
    return "\n".join(rows)


def test_readme_shows_this_layer_table() -> None:
    readme = (PACKAGE.parent / "README.md").read_text()
    assert layer_table() in readme, "README's layer table differs from LAYERS; paste:\n" + layer_table()
