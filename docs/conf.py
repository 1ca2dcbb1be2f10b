"""Sphinx configuration of the jwst-wiimatch documentation.

Build (warnings are errors, as in CI)::

    pip install ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The build needs no network: intersphinx is loaded but has no mapping, and the
theme (alabaster) ships with Sphinx.
"""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# document the package of this checkout, even when another copy is installed
sys.path.insert(0, str(DOCS.parent))

import jwst_wiimatch  # noqa: E402

project = "jwst-wiimatch"
author = "jwst-wiimatch developers"
copyright = "2026, jwst-wiimatch developers"  # noqa: A001
release = jwst_wiimatch.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
    "numpydoc",
]

# CI has no internet access: no inventories are fetched. Cross-references to
# numpy, scipy, stpipe, ... stay plain text.
intersphinx_mapping = {}

# numpydoc: render the numpydoc sections; list no class members automatically
# (the API page names what it documents) and never fetch or cross-link types.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"

# MathJax is loaded by the reader's browser when a page is viewed; the build
# itself downloads nothing.

exclude_patterns = ["_build"]

html_theme = "alabaster"
html_theme_options = {
    "description": "Least-squares background matching for JWST",
    "fixed_sidebar": False,
}
html_title = f"jwst-wiimatch {release}"


def _add_pipeline_page(app, docname, source):
    """Put ``pipeline`` into the toctree of ``index.rst`` when ``docs/pipeline.rst`` exists.

    The calwebb pipeline page is written on another branch; until it is
    merged the site builds without it. A toctree entry for a missing page,
    or an empty glob, would be a warning (an error with ``-W``), hence this
    hook. The entry goes right after ``step``.
    """
    if docname != "index" or not (Path(app.srcdir) / "pipeline.rst").exists():
        return
    if "\n   pipeline\n" not in source[0]:
        source[0] = source[0].replace("\n   step\n", "\n   step\n   pipeline\n", 1)


def setup(app):
    app.connect("source-read", _add_pipeline_page)
