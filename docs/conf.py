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
autodoc_mock_imports = []

# MathJax is loaded by the reader's browser when a page is viewed; the build
# itself downloads nothing.

exclude_patterns = ["_build", "_changes_step.rst"]
templates_path = []
master_doc = "index"
root_doc = "index"

html_theme = "alabaster"
html_static_path = []
html_theme_options = {
    "description": "Least-squares background matching for JWST",
    "fixed_sidebar": False,
}
html_title = f"jwst-wiimatch {release}"


def _optional_parts(app, docname, source):
    """Add the pages and fragments that other branches may or may not have merged.

    * ``docs/pipeline.rst`` (the calwebb pipeline page) goes into the toctree of
      ``index.rst``, right after ``step``, when it exists;
    * ``docs/_changes_step.rst`` (changelog entries of the step not yet moved
      into ``CHANGES.rst``) is shown at the end of the changelog page while
      it exists.

    A toctree entry or an ``include`` of a missing file, or an empty glob,
    would be a warning (an error with ``-W``), hence this hook.
    """
    srcdir = Path(app.srcdir)
    text = source[0]
    if docname == "index" and (srcdir / "pipeline.rst").exists():
        if "\n   pipeline\n" not in text:
            text = text.replace("\n   step\n", "\n   step\n   pipeline\n", 1)
    if docname == "changes" and (srcdir / "_changes_step.rst").exists():
        text += (
            "\n\nThe step (not yet merged into CHANGES.rst)\n"
            "-------------------------------------------\n\n"
            ".. include:: _changes_step.rst\n"
        )
    source[0] = text


def setup(app):
    app.connect("source-read", _optional_parts)
