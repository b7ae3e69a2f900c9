"""Imports point down the module table of DESIGN.md: a lower layer never imports a higher one, and no two
top-level modules import each other (directly or through others), function-level imports included."""
import ast
from pathlib import Path

PKG = Path(__file__).parent.parent / "src" / "thinkforge"
# lower number = lower layer; a module may import only modules of its own or a lower layer
LAYER = {"format": 0, "config": 0, "metrics": 1, "verify": 1, "sandbox": 1, "models": 1, "tasks": 2, "generation": 2,
         "rewards": 3, "scorers": 3, "sampling": 3, "preferences": 3, "verifier": 3, "train": 4, "search": 5, "evaluate": 6, "rejection": 6, "overopt": 6, "aha": 6, "attack": 6,
         "report": 7, "serve": 7, "ui": 7, "pipeline": 8, "cli": 9, "__main__": 10}


def imports(path: Path) -> list[str]:
    """Top-level thinkforge modules ``path`` imports anywhere (module level or inside functions)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from thinkforge import format` names the module in the alias
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "thinkforge" else [node.module]
        else:
            continue
        found += [n.split(".")[1] for n in names if n.startswith("thinkforge.")]
    return found


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        here = path.relative_to(PKG).parts[0].removesuffix(".py")
        g.setdefault(here, set()).update(t for t in imports(path) if t != here)
    return g


def test_every_module_has_a_layer():
    assert set(graph()) - {"__init__"} <= set(LAYER), set(graph()) - set(LAYER)


def test_no_import_points_up():
    bad = [f"{a} imports {b}" for a, bs in graph().items() if a in LAYER for b in bs if LAYER.get(b, -1) > LAYER[a]]
    assert not bad, bad


def test_no_import_cycle():
    g = graph()
    cycles = []

    def visit(node, stack):
        for nxt in sorted(g.get(node, ())):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif len(stack) < len(g):
                visit(nxt, stack + [nxt])

    for start in g:
        visit(start, [start])
    assert not cycles, cycles[:5]
