"""Every public function documents what it takes and what it gives back (numpydoc ``Parameters``/``Returns``).

Walks the ``__all__`` of ``dbk.pp``, ``dbk.tl``, ``dbk.io``, ``dbk.datasets`` and ``dbk.pl`` (and the public methods
that the exported classes define themselves), parses each docstring's numpydoc sections with the small parser below
(numpydoc and Sphinx are not test dependencies) and checks:

- a ``Parameters`` section when the callable takes parameters (other than ``self``/``cls``);
- every parameter of the signature is documented there, and nothing is documented that the signature lacks
  (``*args``/``**kwargs`` may be written with or without their stars);
- a ``Returns`` (or, for generators, ``Yields``) section when the return annotation is not ``None``.

A class's constructor parameters are documented in the class docstring (numpydoc's convention) or in ``__init__``'s;
dataclass fields may be documented under ``Attributes`` instead; parameters named ``_...`` are private.

Then two things the docs promise about :class:`dbk.tl.DiffBulk`: one return rule for ``predict`` on a SpatialData
and on a tile table, and a repr that names the head, its context and ranks; and two about the pages: docs/index.md
shows the README's status (one source, included) and docs/method.md describes every built-in baseline.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SUBMODULES = ["pp", "tl", "io", "datasets", "pl"]

# numpydoc's section names (https://numpydoc.readthedocs.io/en/latest/format.html)
SECTIONS = {
    "Parameters",
    "Other Parameters",
    "Attributes",
    "Methods",
    "Returns",
    "Yields",
    "Receives",
    "Raises",
    "Warns",
    "Warnings",
    "See Also",
    "Notes",
    "References",
    "Examples",
}


# --------------------------------------------------------------------------------------------------- the parser


def parse_sections(doc: str | None) -> dict[str, list[str]]:
    """Section name -> its lines, for a (dedented) numpydoc docstring; the summary goes under ``""``."""
    lines = inspect.cleandoc(doc or "").splitlines()
    sections: dict[str, list[str]] = {"": []}
    current = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        underline = lines[i + 1].strip() if i + 1 < len(lines) else ""
        title = line.strip()
        if title in SECTIONS and underline and set(underline) == {"-"} and not line.startswith(" "):
            current = title
            if current in sections:
                raise ValueError(f"section {current!r} appears twice")
            sections[current] = []
            i += 2
            continue
        sections[current].append(line)
        i += 1
    return sections


def documented_names(section: list[str]) -> list[str]:
    """Names documented in a ``Parameters``-like section: its unindented ``name : type`` (or ``a, b : type``) lines."""
    names = []
    for line in section:
        if not line.strip() or line.startswith((" ", "\t")):
            continue
        head = line.split(" : ", 1)[0].strip().rstrip(":")
        for name in head.split(","):
            name = name.strip()
            if name:
                names.append(name.lstrip("*"))
    return names


def _has_content(sections: dict[str, list[str]], name: str) -> bool:
    return any(line.strip() for line in sections.get(name, []))


# ------------------------------------------------------------------------------------------ the public callables


def _own_public_methods(cls: type) -> Iterator[tuple[str, Callable]]:
    """Public methods ``cls`` defines itself (inherited ones, e.g. torch's, are their library's business)."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            continue
        if isinstance(raw, staticmethod | classmethod):
            yield name, getattr(cls, name)
        elif inspect.isfunction(raw):
            yield name, raw


def public_callables() -> list[tuple[str, Callable, type | None]]:
    """``(qualified name, callable, owning class or None)`` for every public function, class and method.

    A name of ``__all__`` that does not import comes with its exception instead of a callable.
    """
    found = []
    for sub in SUBMODULES:
        module = importlib.import_module(f"dbk.{sub}")
        for name in module.__all__:
            qual = f"dbk.{sub}.{name}"
            try:
                obj = getattr(module, name)
            except (ImportError, AttributeError) as err:  # reported by its own test case, not at collection
                found.append((qual, err, None))
                continue
            if inspect.isclass(obj):
                found.append((qual, obj, None))
                for meth_name, meth in _own_public_methods(obj):
                    found.append((f"{qual}.{meth_name}", meth, obj))
            elif callable(obj):
                found.append((qual, obj, None))
    return found


def _parameters(obj: Callable, owner: type | None) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    if inspect.isclass(obj) and target is object.__init__:
        return []
    sig = inspect.signature(target)
    names = [n for n in sig.parameters if not n.startswith("_")]  # private (e.g. a dataclass's _cache field)
    raw = vars(owner).get(obj.__name__) if owner is not None else None
    if (inspect.isclass(obj) or owner is not None) and not isinstance(raw, staticmethod) and names:
        if names[0] in ("self", "cls"):
            names = names[1:]
    if owner is not None and isinstance(raw, classmethod):
        names = [n for n in names if n != "cls"]
    return names


def _returns_something(obj: Callable) -> bool:
    if inspect.isclass(obj):
        return False
    annotation = inspect.signature(obj).return_annotation
    if annotation is inspect.Signature.empty:
        return False
    return annotation not in (None, "None")


def docstring_problems(obj: Callable, owner: type | None = None) -> list[str]:
    """What ``obj``'s docstring lacks or gets wrong, as readable lines (empty when it is complete)."""
    doc = obj.__doc__
    if inspect.isclass(obj) and obj.__init__ is not object.__init__:
        init_doc = vars(obj).get("__init__").__doc__ if "__init__" in vars(obj) else None
    else:
        init_doc = None
    if not doc or not doc.strip():
        return ["no docstring"]
    try:
        sections = parse_sections(doc)
        init_sections = parse_sections(init_doc) if init_doc else {}
    except ValueError as e:
        return [str(e)]
    problems = []
    params = _parameters(obj, owner)
    if params:
        documented = documented_names(sections.get("Parameters", [])) + documented_names(
            sections.get("Other Parameters", [])
        )
        if not documented and init_sections:
            documented = documented_names(init_sections.get("Parameters", []))
        as_attributes = False
        if not documented and inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            documented = documented_names(sections.get("Attributes", []))
            as_attributes = True  # Attributes may also list properties: only missing fields are wrong
        if not documented:
            problems.append(f"no Parameters section (takes {params})")
        else:
            wanted = [p.lstrip("*") for p in params]
            missing = [p for p in wanted if p not in documented]
            extra = [] if as_attributes else [p for p in documented if p not in wanted]
            if missing:
                problems.append(f"parameters not documented: {missing}")
            if extra:
                problems.append(f"documented but not in the signature: {extra}")
    if _returns_something(obj):
        wanted = "Yields" if inspect.isgeneratorfunction(obj) else "Returns"
        if not _has_content(sections, wanted) and not _has_content(sections, "Returns"):
            problems.append(f"no {wanted} section (annotated to return {inspect.signature(obj).return_annotation})")
    return problems


# ------------------------------------------------------------------------------------------------------ tests


def test_parser_reads_sections_and_names():
    def f(a, b, *args, c=1, **kwargs) -> int:
        """Summary.

        Parameters
        ----------
        a, b : int
            Two numbers.
        *args
            More.
        c : int, default 1
            A key: with a colon in its text.
        **kwargs
            Passed on.

        Returns
        -------
        int
            The sum.
        """
        return a + b

    sections = parse_sections(f.__doc__)
    assert documented_names(sections["Parameters"]) == ["a", "b", "args", "c", "kwargs"]
    assert _has_content(sections, "Returns")
    assert docstring_problems(f) == []


def test_checker_flags_what_is_wrong():
    def no_params(x, y) -> None:
        """Summary only."""

    def wrong_names(x, y) -> int:
        """Summary.

        Parameters
        ----------
        x : int
            One.
        z : int
            Not in the signature.
        """
        return x

    def none_returned(x) -> None:
        """Summary.

        Parameters
        ----------
        x
            One.
        """

    assert docstring_problems(no_params) == ["no Parameters section (takes ['x', 'y'])"]
    problems = docstring_problems(wrong_names)
    assert "parameters not documented: ['y']" in problems
    assert "documented but not in the signature: ['z']" in problems
    assert any(p.startswith("no Returns section") for p in problems)
    assert docstring_problems(none_returned) == []


def test_walk_finds_the_public_api():
    names = {qual for qual, _, _ in public_callables()}
    for expected in ("dbk.pp.make_tiles", "dbk.tl.fit_diffbulk", "dbk.tl.DiffBulk", "dbk.tl.DiffBulk.predict",
                     "dbk.tl.DiffBulk.load", "dbk.tl.DiffusionPretrainer.fit", "dbk.io.get_pixel_size",
                     "dbk.datasets.synthetic", "dbk.pl.spatial"):
        assert expected in names
    assert not any(".DiffBulk.cv_pearson" in n or "._" in n for n in names)  # properties and private names are not


@pytest.mark.parametrize(("qualname", "obj", "owner"),
                         [pytest.param(q, o, c, id=q.removeprefix("dbk.")) for q, o, c in public_callables()])
def test_public_docstring_is_complete(qualname, obj, owner):
    if isinstance(obj, Exception):
        pytest.fail(f"{qualname} is in __all__ but does not import: {obj!r}")
    problems = docstring_problems(obj, owner)
    assert not problems, f"{qualname}: " + "; ".join(problems)


# ------------------------------------------------------------- DiffBulk: predict's return rule, the repr's contents

TINY = {"image_size": 16, "block_out_channels": (16, 32), "gene_dim": 32, "batch_size": 8, "warmup_steps": 5,
        "log_every": 5}
# seconds on a CPU: untrained stage 1, a ridge head, a random-weight timm encoder (offline)
FIT = {"fm_size_px": 32, "preset": "tiny", "pretrain_steps": 0, "pretrain_kwargs": TINY, "tile_size_um": 32.0,
       "fusion": "ridge", "head_cv": 0, "random_state": 0}


def _tiled(seed: int, sample: str):
    import dbk

    sd = dbk.datasets.synthetic(shape=(512, 512), n_genes=8, include_cells=False, random_state=seed)
    sd.attrs["sample"] = sample
    dbk.pp.make_tiles(sd, tile_size_um=32.0)
    dbk.pp.pseudobulk(sd)
    return sd


def _encoder():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()


@pytest.fixture(scope="module")
def rank2_model(one_thread):
    """Reduced-rank ridge head (target rank 2) with 48 µm spatial context."""
    import dbk

    dbk.settings.progress = False
    return dbk.tl.fit_diffbulk(_tiled(0, "train"), fm=_encoder(), rank=2, context_um=48.0, **FIT)


def test_predict_returns_the_predictions_for_a_spatialdata_and_for_a_table(rank2_model):
    import anndata as ad
    import numpy as np
    import pandas as pd
    from spatialdata import SpatialData

    model = rank2_model
    slide = _tiled(1, "new")
    out = model.predict(slide)
    table = slide.tables["dbk_table"]
    assert isinstance(out, pd.DataFrame) and list(out.columns) == model.genes
    assert out.index.equals(table.obs_names)
    np.testing.assert_array_equal(out.to_numpy(), table.obsm["dbk_pred"].to_numpy())  # what was written

    again = model.predict(table.copy())  # a tile table with the features: the same rule, the same numbers
    assert isinstance(again, pd.DataFrame)
    np.testing.assert_allclose(again.to_numpy(), out.to_numpy(), rtol=1e-6)

    fresh = _tiled(2, "other")
    copied = model.predict(fresh, copy=True)  # copy=True: the modified copy, the input untouched
    assert isinstance(copied, SpatialData) and copied is not fresh
    assert "dbk_pred" in copied.tables["dbk_table"].obsm and "dbk_pred" not in fresh.tables["dbk_table"].obsm
    bare = table.copy()
    del bare.obsm["dbk_pred"]
    copied_table = model.predict(bare, copy=True, key_added="p")
    assert isinstance(copied_table, ad.AnnData) and copied_table is not bare
    assert "p" in copied_table.obsm and "p" not in bare.obsm


def test_repr_names_head_rank_context_stage1_and_effective_rank(rank2_model, tmp_path):
    import dbk

    model = rank2_model
    text = repr(model)
    assert "fusion 'ridge' target rank 2, context 48 µm" in text
    assert "/ untrained" in text  # stage 1 not trained (pretrain_steps=0)
    r = model.effective_rank
    assert r["predictions"] <= 2  # rank-2 predictions carry at most two patterns
    assert f"effective prediction rank {r['predictions']} (targets {r['targets']})" in text
    assert "chosen from" not in text  # one head, no selection

    picked = dbk.tl.DiffBulk(pretrainer=model.pretrainer, head=model.head, fm=model.fm, scalers=model.scalers,
                             config={**model.config, "head_selection": {"candidates": {"name": ["a", "b", "c"]}}})
    assert "context 48 µm (chosen from 3 heads by inner CV)" in repr(picked)

    path = model.save(tmp_path / "m")
    assert repr(dbk.tl.DiffBulk.load(path, device="cpu")) == text  # the head's rank and context survive a reload


def test_repr_of_a_late_fused_head_without_context(one_thread):
    import dbk

    dbk.settings.progress = False
    model = dbk.tl.fit_diffbulk(_tiled(0, "train"), fm=_encoder(), rank="auto", blend="late", **FIT)
    ranks = "/".join("full" if r is None else str(r) for r in model.head.block_rank_)
    assert f"fusion 'ridge' late (FM weight {model.head.blend_weight_:g}, ranks {ranks}), no context" in repr(model)


# ------------------------------------------------------------------------------ the docs' status and baselines

ROOT = Path(__file__).resolve().parents[1]
STATUS_START = "<!-- status:start (docs/index.md includes the lines between these markers) -->"
STATUS_END = "<!-- status:end -->"


def test_docs_index_status_is_the_readme_status():
    """One source: docs/index.md includes the README's status lines and states no number of its own."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count(STATUS_START) == 1 and readme.count(STATUS_END) == 1
    status = readme[readme.index(STATUS_START) + len(STATUS_START):readme.index(STATUS_END)]
    assert "Status:" in status and "0.132" in status  # the fragment is the status, with its numbers

    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    include = f"```{{include}} ../README.md\n:start-after: {STATUS_START}\n:end-before: {STATUS_END}\n```"
    assert include in index
    numbers = re.findall(r"\b0\.\d{3}\b", index.replace(include, ""))
    assert not numbers, f"docs/index.md states numbers of its own beside the README's status: {numbers}"


def test_method_md_lists_every_builtin_baseline():
    from dbk.tl._baselines import BASELINES

    text = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    section = text[text.index("## Baselines"):]
    missing = [b for b in BASELINES if f'(`"{b}"`' not in section]
    assert not missing, f"docs/method.md's Baselines section does not describe {missing}"
