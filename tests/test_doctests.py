"""Every ``>>>`` example in the package's docstrings runs and prints what it says."""
import doctest
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).parent.parent / "src" / "thinkforge"
MODULES = sorted(".".join(("thinkforge",) + p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
                 for p in PKG.rglob("*.py") if p.name != "__main__.py")


def test_the_examples_exist():
    finder = doctest.DocTestFinder()
    examples = sum(len(t.examples) for m in MODULES for t in finder.find(importlib.import_module(m)))
    assert examples >= 19


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module}"
