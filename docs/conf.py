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
    # ships MathJax with the site, so the math renders without network access
    "sphinx-mathjax-offline",
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

# MathJax comes from the sphinx-mathjax-offline package and is copied into the
# site: neither the build nor a reader's browser downloads anything.

exclude_patterns = ["_build"]

html_theme = "alabaster"
html_theme_options = {
    "description": "Least-squares background matching for JWST",
    "fixed_sidebar": False,
}
html_title = f"jwst-wiimatch {release}"


# The calwebb pipeline integration (jwst_wiimatch.pipeline) needs jwst, which
# the documentation build does without: autodoc imports it with jwst mocked.
autodoc_mock_imports = ["jwst"]
