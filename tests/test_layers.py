"""DESIGN's layers, checked on the import statements: who may import whom inside cachedit."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cachedit"
ALLOWED = {  # layer -> the cachedit modules it may import
    "kernels": {"cachedit.kernels"},
    "sharding.py": set(),
    "config.py": set(),
    "fxpasses": {"cachedit.fxpasses", "cachedit.config", "cachedit.sharding"},
    "runtime": {"cachedit.runtime", "cachedit.kernels", "cachedit.config", "cachedit.sharding", "cachedit"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m == "cachedit" or m.startswith("cachedit.")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer):
    root = PACKAGE / layer
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    assert files
    for path in files:
        for module in _imports(path):
            ok = any(module == a or module.startswith(a + ".") for a in ALLOWED[layer])
            if module == "cachedit":  # `from cachedit import kernels` registers the ops
                ok = "cachedit" in ALLOWED[layer] or layer == "kernels"
            assert ok, f"{path.relative_to(PACKAGE.parent)} imports {module}, which the {layer} layer may not"
