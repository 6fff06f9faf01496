"""The API page lists exactly the public API: every name in a submodule's ``__all__``, and nothing else.

Reads docs/api.md as text (no Sphinx run): the entries are the items of its ``autosummary`` lists, written
``<submodule>.<name>`` under ``.. currentmodule:: dbk`` (or ``settings`` for ``dbk.settings``).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SUBMODULES = ["io", "datasets", "pp", "tl", "pl"]
TOP_LEVEL = ["settings"]  # top-level objects documented besides the submodules


def _eval_rst_blocks(text: str) -> list[str]:
    return re.findall(r"^```\{eval-rst\}\n(.*?)^```", text, flags=re.S | re.M)


def _autosummary_entries(text: str) -> list[tuple[str, str]]:
    """``(currentmodule, entry)`` for each item of each autosummary list in api.md, in order."""
    entries = []
    current = "dbk"
    for block in _eval_rst_blocks(text):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            m = re.match(r"\.\. currentmodule::\s*(\S+)", line.strip())
            if m:
                current = m.group(1)
            if line.strip().startswith(".. autosummary::"):
                i += 1
                while i < len(lines) and (not lines[i].strip() or lines[i].startswith((" ", "\t"))):
                    item = lines[i].strip()
                    if item and not item.startswith(":") and not item.startswith(".."):
                        entries.append((current, item))
                    i += 1
                continue
            i += 1
    return entries


@pytest.fixture(scope="module")
def entries() -> list[str]:
    """Fully qualified names listed in api.md."""
    found = _autosummary_entries(API_MD.read_text(encoding="utf-8"))
    assert found, f"no autosummary entries found in {API_MD}"
    return [f"{module}.{item}" for module, item in found]


def _public_names() -> list[str]:
    names = [f"dbk.{name}" for name in TOP_LEVEL]
    for sub in SUBMODULES:
        module = importlib.import_module(f"dbk.{sub}")
        names += [f"dbk.{sub}.{name}" for name in getattr(module, "__all__", [])]
    return names


def _resolve(qualname: str):
    module_name, _, attr = qualname.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def test_parser_reads_entries():
    text = (
        "```{eval-rst}\n.. module:: dbk.pp\n.. currentmodule:: dbk\n\n.. autosummary::\n   :toctree: generated\n\n"
        "   pp.make_tiles\n   pp.pseudobulk\n```\n\ntext\n\n```{eval-rst}\n.. autosummary::\n\n   settings\n```\n"
    )
    assert _autosummary_entries(text) == [("dbk", "pp.make_tiles"), ("dbk", "pp.pseudobulk"), ("dbk", "settings")]


def test_every_public_name_is_in_api_md(entries):
    missing = [name for name in _public_names() if name not in entries]
    assert not missing, (
        f"public names without an entry in docs/api.md: {missing}. Add each under its submodule's autosummary list "
        "(as <submodule>.<name>)."
    )


def test_every_api_md_entry_exists_and_is_public(entries):
    public = set(_public_names())
    for name in entries:
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            pytest.fail(f"docs/api.md lists {name}, which does not exist: {e}")
    not_public = [name for name in entries if name not in public]
    assert not not_public, f"docs/api.md lists names that are not in their submodule's __all__: {not_public}"


def test_api_md_has_no_duplicates(entries):
    duplicates = sorted({name for name in entries if entries.count(name) > 1})
    assert not duplicates, f"listed more than once in docs/api.md: {duplicates}"


def test_every_submodule_has_a_section():
    text = API_MD.read_text(encoding="utf-8")
    for sub in SUBMODULES:
        assert f".. module:: dbk.{sub}" in text, f"docs/api.md has no section (.. module:: dbk.{sub}) for dbk.{sub}"


def test_all_names_exist():
    for sub in SUBMODULES:
        module = importlib.import_module(f"dbk.{sub}")
        for name in getattr(module, "__all__", []):
            assert hasattr(module, name), f"dbk.{sub}.__all__ names {name!r}, which dbk.{sub} does not define"
