"""Sphinx configuration for the dbk documentation.

Build offline and warning-free with::

    .venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

Cross-links to other projects' docs (intersphinx) need the internet to fetch their inventories, so they are off
unless ``DBK_DOCS_INTERSPHINX=1`` or the build runs on Read the Docs (which sets ``READTHEDOCS=True``).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
import warnings
from datetime import datetime
from importlib.metadata import PackageNotFoundError, metadata
from pathlib import Path

HERE = Path(__file__).parent
# sphinx-autodoc-typehints uses an API that Sphinx 10 removes; not our warning to act on
warnings.filterwarnings("ignore", message=".*set_application.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*set_application.*", category=PendingDeprecationWarning)
# import dbk from the source tree when it is not installed (e.g. a bare checkout)
sys.path.insert(0, str(HERE.parent / "src"))

# -- Project ------------------------------------------------------------------------------------------------------

project = "dbk"
try:
    _meta = metadata("diffbulk")
    release = _meta["Version"]
    author = _meta["Author"] or "dbk developers"
except PackageNotFoundError:  # pragma: no cover - docs built from a source tree without install
    release = "0.0.0+unknown"
    author = "dbk developers"
version = release
copyright = f"{datetime.now():%Y}, {author}"

repository_url = "https://github.com/dbk-dev/diffbulk"

# -- General ------------------------------------------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinxcontrib.mermaid",
]

INTERSPHINX = os.environ.get("DBK_DOCS_INTERSPHINX", "0") == "1" or os.environ.get("READTHEDOCS") == "True"
if INTERSPHINX:
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_timeout = 10
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable/", None),
        "pandas": ("https://pandas.pydata.org/pandas-docs/stable/", None),
        "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
        "spatialdata": ("https://spatialdata.scverse.org/en/stable/", None),
        "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
        "squidpy": ("https://squidpy.readthedocs.io/en/stable/", None),
        "torch": ("https://docs.pytorch.org/docs/stable/", None),
    }

templates_path = ["_templates"]
html_static_path = ["_static"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "jupyter_execute"]
# .rst first: autosummary writes its stubs (reST) with the first suffix
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = False

# -- MyST / myst-nb -----------------------------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist", "dollarmath", "amsmath", "substitution", "attrs_inline"]
myst_heading_anchors = 3
myst_fence_as_directive = ["mermaid"]
nb_execution_mode = "off"  # notebooks are rendered with the outputs stored in them, never executed here
nb_merge_streams = True
nb_output_stderr = "remove"

# -- autodoc / autosummary / napoleon -----------------------------------------------------------------------------

autosummary_generate = True  # stubs go to docs/generated/ (git-ignored)
# start from no stubs, so a function removed from api.md leaves no stale page behind (an orphan page is a warning)
shutil.rmtree(HERE / "generated", ignore_errors=True)
autodoc_member_order = "groupwise"
autodoc_preserve_defaults = False  # show default values, not the constant names
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
napoleon_use_ivar = True  # "Attributes" as a field list, not separate objects (``dbk.settings`` has no class context)
# dbk's Returns sections are free text naming every slot written (scanpy style), not "name : type" fields: render
# them as text under a "Returns" heading; the return type comes from the annotation (sphinx-autodoc-typehints).
napoleon_custom_sections = ["Returns"]
typehints_defaults = "braces"
typehints_use_signature = False
typehints_use_signature_return = False
always_document_param_types = False

# -- HTML ---------------------------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "dbk"
html_css_files = ["custom.css"]
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_show_sphinx = False


# -- Setup --------------------------------------------------------------------------------------------------------


class _EmptyNotebooksGlob(logging.Filter):
    """Drop the warning that the tutorials toctree (``notebooks/*``) matches nothing, while it has no notebooks yet.

    Sphinx emits it without a warning type, so ``suppress_warnings`` cannot silence it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            "didn't match any documents" in str(record.msg) and any("notebooks/" in str(a) for a in record.args or ())
        )


def _undo_returns_colon(app, what, name, obj, options, lines):
    """Remove the ``:`` that sphinx-autodoc-typehints inserts under a numpy "Returns" header.

    It inserts it (at priority 499) so that napoleon parses the section as "name : type" fields; dbk's Returns
    sections are free text, rendered by napoleon as a generic section (``napoleon_custom_sections``), where the
    ``:`` would show up as text.
    """
    for i in range(len(lines) - 2):
        if lines[i].strip().lower() == "returns" and set(lines[i + 1].strip()) == {"-"} and lines[i + 2] == ":":
            del lines[i + 2]
            return


def _no_builtin_type_doc(app, what, name, obj, options, lines):
    """Replace the docstring of a builtin type (e.g. ``dict``) shown for a module-level constant by a short note.

    autodoc documents a constant with its source comment, and otherwise with the docstring of the value's type; a
    constant re-exported lazily (``dbk.tl``) has no source comment that autodoc can find.
    """
    if what != "data" or type(obj).__module__ != "builtins" or not lines:
        return
    if "\n".join(lines).strip() != (inspect.getdoc(type(obj)) or "").strip():
        return
    note = f"A ``{type(obj).__name__}``"
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        note += " with keys " + ", ".join(f"``{k!r}``" for k in obj)
    lines[:] = [note + "."]


def setup(app):
    logging.getLogger("sphinx.sphinx.directives.other").addFilter(_EmptyNotebooksGlob())
    # after sphinx-autodoc-typehints' insertion (499), before napoleon (500)
    app.connect("autodoc-process-docstring", _undo_returns_colon, priority=499.5)
    app.connect("autodoc-process-docstring", _no_builtin_type_doc)
