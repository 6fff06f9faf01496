"""The layers import one way: io -> pp -> tl -> pl, with the torch core below tl.

Every module under ``src/dbk`` is parsed with :mod:`ast` (nothing is imported), and each ``import`` /
``from ... import`` in it, at module level or inside a function, relative ones resolved, is checked against the rules
below; so are the imports written as strings: the lazy exports of a package (``_EXPORTS`` handed to
``dbk._lazy.lazy_exports``, each name loaded from its module on first access) and ``importlib.import_module("...")``.
The helpers below every layer (``dbk._constants``, ``dbk._image``, ``dbk._utils`` ...) and the root package may be
imported by all.

No module imports against the flow. A lower layer reaches code above it only by being handed it: the torch core reads
SpatialData slides through the reader that ``dbk.tl`` registers (``dbk.core._slides``), and ``dbk.pp``'s corpus driver
runs the embedding step that ``dbk.tl.prepare_corpus`` hands it.
"""

from __future__ import annotations

import ast
import warnings
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

# (package, public name) -> the function it now is: names a package still answers for a higher layer after the
# function moved there, kept for compatibility. Each is a lazy export only (no code of the package calls the higher
# layer) and warns DeprecationWarning when called (test_deprecated_aliases_warn_and_forward).
DEPRECATED_ALIASES: dict[tuple[str, str], str] = {
    ("dbk.pp", "prepare"): "dbk.tl.prepare_corpus",  # a corpus up to the FM embeddings runs a model: moved to tl
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


def _relative(module: str, is_package: bool, name: str) -> str:
    """The absolute module a string such as ``"..core._data"`` names, seen from ``module``."""
    level = len(name) - len(name.lstrip("."))
    return _resolve(module, is_package, ast.ImportFrom(module=name[level:] or None, names=[], level=level))


def _lazy_exports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int, str]]:
    """``(absolute module.name, line, name)`` of each entry of a dict handed to ``lazy_exports(__name__, <dict>)``."""
    handed = {node.args[1].id for node in ast.walk(tree) if _call_name(node) == "lazy_exports"
              and len(node.args) == 2 and isinstance(node.args[1], ast.Name)}
    found = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if isinstance(getattr(node, "value", None), ast.Dict) and any(
                isinstance(t, ast.Name) and t.id in handed for t in targets):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    target = _relative(module, is_package, value.value)
                    found.append((f"{target}.{key.value}", value.lineno, key.value))
    return found


def _call_name(node: ast.AST) -> str | None:
    """``f`` of a call ``f(...)`` or ``x.f(...)``; ``None`` for anything else."""
    if not isinstance(node, ast.Call):
        return None
    return getattr(node.func, "attr", getattr(node.func, "id", None))


def _imports_of(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int, str | None]]:
    """``(absolute module, line, lazy name)`` of every import in ``tree``; ``from X import name`` also counts
    ``X.name``. A lazy export ``name`` -> ``module`` counts as ``module.name`` with its name (``None`` otherwise)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            found.append((target, node.lineno, None))
            found += [(f"{target}.{alias.name}", node.lineno, None) for alias in node.names if alias.name != "*"]
        elif _call_name(node) == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.args[0].value
            found.append((_relative(module, is_package, name) if name.startswith(".") else name, node.lineno, None))
    return found + _lazy_exports(tree, module, is_package)


def _imports(path: Path) -> list[tuple[str, int, str | None]]:
    """:func:`_imports_of` the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return _imports_of(tree, _module_name(path), path.name == "__init__.py")


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[0] == "dbk" and parts[1] in LAYERS:
        return parts[1]
    return None


def _violations() -> list[tuple[str, str, str, str, str | None]]:
    """``(module, layer imported, imported module, 'file:line', lazy name)`` of each import that breaks the rules."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        layer = _layer(module)
        if layer not in FORBIDDEN:
            continue
        seen = set()
        for target, line, lazy in _imports(path):
            other = _layer(target)
            if other in FORBIDDEN[layer] and (line, lazy) not in seen:  # one entry per import statement / lazy name
                seen.add((line, lazy))
                out.append((module, other, target, f"{path.relative_to(SRC.parents[1])}:{line}", lazy))
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


def test_lazy_exports_and_import_module_strings_are_imports():
    code = ('_EXPORTS = {"a": "._x", "b": "..tl._y"}\nOTHER = {"c": "..tl._z"}\n'
            '__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)\n'
            'def f():\n    importlib.import_module("dbk.tl._w")\n    importlib.import_module("..pl", __name__)\n')
    found = _imports_of(ast.parse(code), "dbk.pp", True)
    assert sorted(found) == [("dbk.pl", 6, None), ("dbk.pp._x.a", 1, "a"), ("dbk.tl._w", 5, None),
                             ("dbk.tl._y.b", 1, "b")]  # OTHER is not handed to lazy_exports
    pp_exports = {(t, lazy) for t, _, lazy in _imports(SRC / "pp" / "__init__.py")}
    assert ("dbk.pp._tiles.make_tiles", "make_tiles") in pp_exports


def test_layers_import_one_way():
    offenders = [v for v in _violations() if (v[0], v[4]) not in DEPRECATED_ALIASES]
    rules = "; ".join(f"{k} imports none of {', '.join(sorted(v))}" for k, v in FORBIDDEN.items())
    listing = "\n".join(f"  {where}: {module} imports {imported}" for module, _, imported, where, _ in offenders)
    assert not offenders, f"imports against the layering ({rules}):\n{listing}"


@pytest.mark.parametrize("alias", sorted(DEPRECATED_ALIASES))
def test_deprecated_aliases_are_lazy_exports_still_there(alias):
    found = {(v[0], v[4]): v[1] for v in _violations() if v[4] is not None}
    assert alias in found, f"{alias[0]}.{alias[1]} is no longer a lazy export against the flow: remove it from " \
                           "DEPRECATED_ALIASES."
    assert found[alias] == _layer(DEPRECATED_ALIASES[alias]), "the alias is defined in the layer of its new name"


def test_deprecated_aliases_warn_and_forward(monkeypatch):
    """``dbk.pp.prepare`` warns, then hands every argument to ``dbk.tl.prepare_corpus`` and returns what it returns."""
    import importlib
    import inspect

    import dbk
    import dbk.tl._corpus as corpus

    calls = []

    def fake(paths_or_slides, **kwargs):
        calls.append((paths_or_slides, kwargs))
        return "report"

    monkeypatch.setattr(corpus, "prepare_corpus", fake)
    with pytest.warns(DeprecationWarning, match=r"dbk\.tl\.prepare_corpus"):
        assert dbk.pp.prepare(["a.zarr"], out="corpus", fm_size_px=32) == "report"
    assert calls == [(["a.zarr"], {"out": "corpus", "fm_size_px": 32})]
    monkeypatch.undo()
    for (package, name), target in DEPRECATED_ALIASES.items():
        alias = getattr(importlib.import_module(package), name)
        module, func = target.rsplit(".", 1)
        real = getattr(importlib.import_module(module), func)
        assert alias is not real and inspect.signature(alias) == inspect.signature(real)
        assert "Deprecated alias" in alias.__doc__ and "Parameters" in alias.__doc__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name does not warn; a bad fm fails before any file is touched
        with pytest.raises(TypeError, match="fm must be a model name"):
            dbk.tl.prepare_corpus(["a.zarr"], out="never_made", fm=3)
    assert not Path("never_made").exists()


def test_the_core_reads_spatialdata_only_through_the_reader_a_layer_above_registers(monkeypatch):
    """Without a registered reader the core refuses a SpatialData (naming dbk.tl); dbk.tl registers dbk.pp's."""
    import numpy as np
    from spatialdata import SpatialData

    import dbk.tl  # noqa: F401 - registers the SpatialData reader
    from dbk.core import _slides
    from dbk.core._data import TileArrays, _as_list, _panel
    from dbk.pp._tile_sources import SpatialDataReader

    sdata = SpatialData()
    assert isinstance(_slides.slide_reader(sdata), SpatialDataReader)
    assert _as_list(sdata) == [sdata] and _panel(sdata, "dbk_table", None) == []
    arrays = TileArrays(np.zeros((2, 8, 8, 3), np.uint8), X=np.ones((2, 1)), genes=["A"])
    monkeypatch.setattr(_slides, "_READERS", [])
    assert _as_list({"x": arrays}) == [arrays]  # arrays need no reader
    for data in (sdata, [arrays, sdata]):
        with pytest.raises(TypeError, match=r"slide \d is a SpatialData.*dbk\.tl"):
            _as_list(data)
    with pytest.raises(TypeError, match=r"slide 1 is a str"):
        _as_list([arrays, "tiles.h5"])
    with pytest.raises(TypeError, match="non-empty"):
        _as_list([])


def test_a_registered_reader_gets_its_slides_in_place(monkeypatch):
    """The core hands a reader its own slides, None elsewhere (positions kept), and trains on what it returns."""
    import numpy as np

    from dbk.core import _slides
    from dbk.core._data import TileArrays, _build_sources, _Source, _TileBatches
    from dbk.core._vocab import GeneVocab

    class Slide:  # a kind of slide the core does not know
        def __init__(self, n):
            self.n = n

    seen = []

    class Reader:
        def accepts(self, slide):
            return isinstance(slide, Slide)

        def panel(self, slide, table_key, genes):
            return ["B"]

        def sources(self, slides, *, vocab, image_size, **kwargs):
            seen.append([None if s is None else s.n for s in slides])
            return [_Source(name=f"slide{i}", n=s.n, tile_size_um=None, ids=vocab.ids(["B"]), x=np.ones((s.n, 1)),
                            images=np.full((s.n, image_size, image_size, 3), 7, np.uint8))
                    for i, s in enumerate(slides) if s is not None]

    monkeypatch.setattr(_slides, "_READERS", list(_slides._READERS))
    _slides.register_slide_reader(Reader())
    _slides.register_slide_reader(Reader())  # the same class again: replaced, not added twice
    assert sum(isinstance(r, Reader) for r in _slides._READERS) == 1
    arrays = TileArrays(np.zeros((2, 8, 8, 3), np.uint8), X=np.ones((2, 1)), genes=["A"], name="arr")
    vocab = GeneVocab(["A", "B"])
    sources = _build_sources([Slide(3), arrays, Slide(4)], vocab=vocab, image_size=8, genes=None, table_key="t",
                             tiles_key="k", unlabeled_tiles_key=None)
    assert seen == [[3, None, 4]]
    assert [(s.name, s.n) for s in sources] == [("arr", 2), ("slide0", 3), ("slide2", 4)]
    batch = _TileBatches(sources)[[0, 2, 8]]
    assert batch["image"][:, 0, 0, 0].tolist() == [0, 7, 7] and batch["mask"].sum(1).tolist() == [1, 1, 1]


def test_registering_the_spatialdata_reader_loads_nothing_heavy():
    """``import dbk.tl`` registers dbk.pp's reader with the core, and loads neither torch nor spatialdata nor numpy."""
    import subprocess
    import sys

    code = ("import sys, dbk.tl\nfrom dbk.core._slides import _READERS\n"
            "print([type(r).__name__ for r in _READERS], "
            "[m for m in ('torch', 'spatialdata', 'numpy', 'dbk.core._data') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['SpatialDataReader'] []"
