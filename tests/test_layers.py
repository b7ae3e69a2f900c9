"""Imports point down the module table of DESIGN.md: a lower layer never imports a higher one."""
import ast
from pathlib import Path

PKG = Path(__file__).parent.parent / "src" / "thinkforge"
# lower number = lower layer; a module may import only modules of its own or a lower layer
LAYER = {"format": 0, "config": 0, "metrics": 1, "verify": 1, "sandbox": 1, "tasks": 2, "rewards": 3, "models": 1,
         "generation": 2, "scorers": 3, "search": 4, "train": 4, "evaluate": 4, "report": 5, "serve": 5, "pipeline": 6, "cli": 7}


def top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "thinkforge" and len(parts) > 1 else None


def test_no_import_points_up():
    bad = []
    for path in PKG.rglob("*.py"):
        here = path.relative_to(PKG).parts[0].removesuffix(".py")
        if here not in LAYER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                there = top(name)
                if there in LAYER and LAYER[there] > LAYER[here]:
                    bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, bad
