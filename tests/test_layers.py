"""The layers import one way: io -> pp -> tl -> pl, with the torch core below tl.

Every module under ``src/dbk`` is parsed with :mod:`ast` (nothing is imported), and each ``import`` /
``from ... import`` in it, at module level or inside a function, relative ones resolved, is checked against the rules
below. The helpers below every layer (``dbk._constants``, ``dbk._image``, ``dbk._utils`` ...) and the root package
may be imported by all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dbk"

LAYERS = ("io", "pp", "tl", "pl", "core", "datasets")

# layer -> the layers it must not import
FORBIDDEN = {
    "io": {"pp", "tl", "pl", "core", "datasets"},
    "pp": {"tl", "pl"},  # pp -> core is allowed (core is below tl), though pp avoids it where it can
    "tl": {"pl"},
    "core": {"io", "pp", "tl", "pl", "datasets"},
}

# (module, layer it imports) pairs allowed against the flow, each with its reason; an entry whose import is gone fails
# test_known_offenders_are_still_there. The core's stage-1 data layer reaches pp inside a function, only when it is
# handed a SpatialData rather than TileArrays, so importing and training the core never loads the SpatialData stack.
KNOWN_OFFENDERS: set[tuple[str, str]] = {
    ("dbk.core._data", "pp"),  # dbk.pp._tile_sources (slide_panel, spatialdata_sources) for SpatialData inputs
    # dbk.pp.prepare (a whole corpus, up to the embeddings) calls dbk.tl.embed_tiles inside its worker function only
    ("dbk.pp._corpus", "tl"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (its ``level`` dots resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(absolute module, line)`` of every import in the file; ``from X import name`` also counts ``X.name``."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            found.append((target, node.lineno))
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names if alias.name != "*"]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "dbk" and parts[1] in LAYERS:
        return parts[1]
    return None


def _violations() -> list[tuple[str, str, str, str]]:
    """``(module, layer imported, imported module, 'file:line')`` of each import that breaks the rules."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        if layer not in FORBIDDEN:
            continue
        seen = set()
        for target, line in _imports(path):
            other = _layer(target)
            if other in FORBIDDEN[layer] and line not in seen:  # one entry per import statement
                seen.add(line)
                out.append((module, other, target, f"{path.relative_to(SRC.parents[1])}:{line}"))
    return out


def test_resolves_relative_imports():
    tree = ast.parse("from ..pp._tiles import tile_bounds\nfrom . import _x\nfrom .. import tl\n")
    nodes = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert _resolve("dbk.core._pretrainer", False, nodes[0]) == "dbk.pp._tiles"
    assert _resolve("dbk.io", True, nodes[1]) == "dbk.io"
    assert _resolve("dbk.io._st", False, nodes[2]) == "dbk"
    assert _layer("dbk.tl") == "tl" and _layer("dbk._image") is None and _layer("dbk") is None


def test_every_module_is_parsed():
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    for layer in FORBIDDEN:
        assert any(_layer(m) == layer for m in modules), f"no module of dbk.{layer} found under {SRC}"


def test_layers_import_one_way():
    offenders = [v for v in _violations() if (v[0], v[1]) not in KNOWN_OFFENDERS]
    rules = "; ".join(f"{k} imports none of {', '.join(sorted(v))}" for k, v in FORBIDDEN.items())
    listing = "\n".join(f"  {where}: {module} imports {imported}" for module, _, imported, where in offenders)
    assert not offenders, f"imports against the layering ({rules}):\n{listing}"


@pytest.mark.parametrize("pair", sorted(KNOWN_OFFENDERS))
def test_known_offenders_are_still_there(pair):
    found = {(v[0], v[1]) for v in _violations()}
    assert pair in found, f"{pair[0]} no longer imports dbk.{pair[1]}: remove {pair} from KNOWN_OFFENDERS."
