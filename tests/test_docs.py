"""The documentation site: it builds with warnings as errors, and its examples run.

The site build needs the ``docs`` extra (``pip install ".[docs]"``) and is
skipped without Sphinx and numpydoc. The examples of the ``.rst`` pages
(``>>>`` lines) run as doctests with the runtime dependencies alone; the
docstring examples of the package run through ``--doctest-modules``
(``pyproject.toml``). The shell and Python code blocks of the pages and of
the README run in ``tests/test_recipes.py``.
"""

import doctest
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.rst") if ">>>" in p.read_text(encoding="utf-8"))


def test_pages_with_examples_are_found():
    names = {p.name for p in PAGES}
    assert {"quickstart.rst", "differences.rst", "algorithm.rst"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_rst_examples(page, monkeypatch, tmp_path):
    # run where nothing the examples might write can land in the checkout
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(
        str(page), module_relative=False, encoding="utf-8", verbose=False,
        optionflags=doctest.ELLIPSIS,
    )
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} example(s) of {page.name} failed (see stdout)"


@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("sphinx", "numpydoc", "sphinx-mathjax-offline")),
    reason='needs the docs extra: pip install ".[docs]"',
)
def test_site_builds_without_warnings(tmp_path):
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"sphinx-build failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    for page in ("index", "quickstart", "skymatch", "algorithm", "step", "pipeline", "api",
                 "performance", "differences", "changes"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    # the math renders offline: MathJax is served from the site itself
    algo = (tmp_path / "html" / "algorithm.html").read_text(encoding="utf-8")
    src = re.search(r'<script[^>]*src="([^"]*mathjax[^"]*)"', algo, re.IGNORECASE)
    assert src and not src.group(1).startswith(("http:", "https:", "//")), src
    assert (tmp_path / "html" / src.group(1)).is_file(), src.group(1)
    api = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    for name in ("jwst_wiimatch.match.match_lsq", "jwst_wiimatch.lsq_optimizer.build_lsq_eqs",
                 "jwst_wiimatch.lsq_optimizer.rlu_solve", "jwst_wiimatch.lsq_optimizer.pinv_solve",
                 "jwst_wiimatch.utils.create_coordinate_arrays",
                 "jwst_wiimatch.models.evaluate_background",
                 "jwst_wiimatch.step.WiiMatchStep"):
        assert f'id="{name}"' in api, name
