"""Every shell and Python recipe of README.md and docs/*.rst runs as written.

The code blocks are extracted from the pages and executed, so that the
documentation cannot drift from the code again:

* shell blocks (``.. code-block:: shell|bash|sh|console``, rst literal blocks
  whose lines carry ``$`` prompts, README fences `````shell``/`````bash``/
  `````console``) run through ``bash -euo pipefail`` (a failing line, a failed
  pipe or an unset variable fails the block), with the test environment's
  ``bin`` folder (``strun``, ``wiimatch-demo``, ``python``, ``asn_from_list``)
  on ``PATH``;
* Python blocks (``.. code-block:: python``, `````python`` fences) run as
  scripts. Blocks made of ``>>>`` lines are doctests: those of ``docs/`` run
  in ``tests/test_docs.py`` (the whole page), those of the README here;
* YAML blocks must equal the shipped configuration file of the same class;
* ``text`` blocks are not code (formulas, usage synopses); a synopsis of
  ``wiimatch-demo`` is checked against its ``--help``.

Any other block (a literal block ``::`` without prompts, a fence without a
language, an unknown language or a code directive such as
``literalinclude``) fails ``test_every_block_is_classified``: nothing is
skipped silently. Mark a block ``text`` when it is not code.

Each page's blocks run in page order in a temporary folder per page, as a
reader following the page would run them (a later block may read what an
earlier one wrote), prepared with small synthetic data whose names match the
recipes: a block that runs calwebb_image3, the skymatch-slot step or its
pipeline gets ``asn.json`` (and ``asn_image3.json``) over three calibrated
``cal`` exposures (``tests/pipeline_helpers.py``); a cube recipe gets
``cubes/*_s3d.fits`` on one grid; any other block gets ``asn.json`` over three
resampled images ``exp1_i2d.fits``..``exp3_i2d.fits`` on one grid
(``tests/step_helpers.py``) and a calibrated ``exp1_cal.fits``. Shell
variables and exports of a block that only sets variables (such as the
offline settings of ``docs/pipeline.rst``) hold for the later blocks of its
page. CRDS cannot be reached (``CRDS_SERVER_URL`` points to an address that
does not resolve, ``CRDS_PATH`` is empty) and ``STPIPE_DISABLE_CRDS_STEPPARS``
is unset unless a recipe sets it: a recipe that needs CRDS fails. Pages run
two at a time; a block identical to one already run on another page (same
commands, settings and data) reuses its outcome.

Commands that install software, need a cluster, CRDS reference files or
hours of benchmark are checked instead of run, by stand-ins first on
``PATH`` that print what they checked:

* ``pip install SPEC...``: each SPEC is ``.`` or ``jwst-wiimatch``, with
  extras (``".[test,jwst]"``) that ``pyproject.toml`` defines; nothing is
  installed;
* ``python -m pytest ARGS``: collected (``--collect-only``) in the checkout,
  not run (this is the test suite);
* ``sphinx-build ARGS``: parsed by Sphinx's own parser; the source folder
  must be ``docs`` and ``-W`` must be given (the build itself runs in
  ``tests/test_docs.py::test_site_builds_without_warnings``);
* ``python benchmarks/X.py ARGS``: the script's argument parser runs on ARGS
  and the script stops there (the benchmarks take minutes to hours);
* ``dask scheduler|worker ARGS``: parsed by dask's own command-line parser,
  not started (services that run until stopped, on other machines);
* ``strun cube_build ...`` (needs CRDS reference files and real MIRI MRS
  exposures) and ``strun ... --scheduler=tcp://...`` (a remote cluster):
  stpipe parses the command line and builds the step with its parameters
  (bad names or values fail), then the step is not run.

Needs jwst for the recipes that run jwst's pipelines or tools (skipped
without it, as the pipeline tests are).
"""

import doctest
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SOURCES = [REPO / "README.md"] + sorted(DOCS.glob("*.rst"))
HAVE_JWST = importlib.util.find_spec("jwst") is not None

#: wall-clock limit of one block
TIMEOUT = 300
#: pages run at a time
WORKERS = max(1, min(2, os.cpu_count() or 1))

#: blocks that fail because of the code, not the recipe:
#: {(page, text that identifies the block): reason}; strict, so a fixed bug
#: makes the test fail until the entry is removed
XFAIL = {}


# --------------------------------------------------------------------------
# extraction


SHELL_LANGS = {"shell", "bash", "sh", "console", "shell-session"}
PYTHON_LANGS = {"python", "python3", "py"}
DOCTEST_LANGS = {"pycon", "doctest"}
TEXT_LANGS = {"text", "none", "output"}
YAML_LANGS = {"yaml", "yml"}


@dataclass
class Block:
    source: str      # page name relative to the repository (README.md, docs/x.rst)
    line: int        # 1-based line of the directive / fence
    lang: str        # as written ('' for rst literal blocks or bare fences)
    text: str        # the block's content, dedented
    kind: str = field(init=False)

    def __post_init__(self):
        self.kind = classify(self.lang, self.text)

    @property
    def id(self):
        return f"{self.source}:{self.line}"

    @property
    def page(self):
        return self.source


def _has_prompts(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return bool(lines) and lines[0].lstrip().startswith("$ ")


def _is_doctest(text):
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return bool(lines) and lines[0].lstrip().startswith(">>>")


def classify(lang, text):
    """'shell', 'python', 'doctest', 'yaml', 'text' or 'unclassified'."""
    lang = (lang or "").strip().lower()
    if lang in SHELL_LANGS:
        return "shell"
    if lang in PYTHON_LANGS:
        return "doctest" if _is_doctest(text) else "python"
    if lang in DOCTEST_LANGS:
        return "doctest"
    if lang in YAML_LANGS:
        return "yaml"
    if lang in TEXT_LANGS:
        return "text"
    if lang == "" and _has_prompts(text):
        return "shell"
    return "unclassified"


_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(.*)$")
#: directives whose content is code
_CODE_DIRECTIVES = {"code-block", "code", "sourcecode"}
#: directives that show or run code some other way: never silently ignored
_OTHER_CODE_DIRECTIVES = {"literalinclude", "doctest", "testcode", "testsetup",
                          "testoutput", "ipython", "jupyter-execute", "program-output",
                          "command-output", "runblock", "exec"}


def _indent(line):
    return len(line) - len(line.lstrip())


def _indented_body(lines, start, base, options=False):
    """Lines from ``start`` on indented more than ``base`` (blank lines inside
    included), dedented, after a directive's options when ``options``;
    returns (text, index after the body)."""
    i = start
    if options:
        while i < len(lines) and lines[i].strip().startswith(":") and _indent(lines[i]) > base:
            i += 1
    body = []
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        body.append(lines[i])
        i += 1
    while body and not body[-1].strip():
        body.pop()
    return textwrap.dedent("\n".join(body)).strip("\n"), i


def rst_blocks(text, source):
    """Code and literal blocks of a reStructuredText page."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            indent, name, arg = len(m.group(1)), m.group(2).lower(), m.group(3).strip()
            if name in _CODE_DIRECTIVES or name in _OTHER_CODE_DIRECTIVES:
                body, nxt = _indented_body(lines, i + 1, indent, options=True)
                lang = arg if name in _CODE_DIRECTIVES else f"<{name}>"
                blocks.append(Block(source, i + 1, lang or "<code-block without language>",
                                    body if name in _CODE_DIRECTIVES else (body or arg)))
                i = nxt
                continue
            i += 1
            continue
        stripped = line.rstrip()
        if stripped.endswith("::") and not stripped.lstrip().startswith(".."):
            body, nxt = _indented_body(lines, i + 1, _indent(line))
            if body:
                blocks.append(Block(source, i + 1, "", body))
                i = nxt
                continue
        i += 1
    return blocks


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)")


def markdown_blocks(text, source):
    """Fenced code blocks of a Markdown page."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(2), m.group(3)
        body = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j])
            j += 1
        blocks.append(Block(source, i + 1, lang,
                            textwrap.dedent("\n".join(body)).strip("\n")))
        i = j + 1
    return blocks


def page_blocks(path):
    text = path.read_text(encoding="utf-8")
    source = path.relative_to(REPO).as_posix()
    return markdown_blocks(text, source) if path.suffix == ".md" else rst_blocks(text, source)


BLOCKS = [b for p in SOURCES for b in page_blocks(p)]
RUNNABLE = [b for b in BLOCKS if b.kind in ("shell", "python")]


def shell_commands(block):
    """The script of a shell block: for prompted (console) blocks, the
    ``$`` lines and their continuations, without the output lines."""
    if not _has_prompts(block.text):
        return block.text
    out, cont = [], False
    for ln in block.text.splitlines():
        s = ln.lstrip()
        if s.startswith("$ "):
            out.append(s[2:])
        elif cont:
            out.append(ln)
        else:
            continue
        cont = out[-1].rstrip().endswith("\\")
    return "\n".join(out)


_ASSIGNMENT = re.compile(r"^(export\s+)?[A-Za-z_]\w*=")


def sets_variables_only(block):
    """True for a shell block whose commands only set (and export)
    variables: its settings hold for the later blocks of its page."""
    if block.kind != "shell":
        return False
    lines = [ln.strip() for ln in shell_commands(block).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    return bool(lines) and all(_ASSIGNMENT.match(ln) for ln in lines)


_CAL = re.compile(r"calwebb_image3|Image3Pipeline|WiiMatchSkyStep|asn_image3")
_CUBES = re.compile(r"cube_build|_s3d\b|cubes_asn")


def data_kind(block):
    """Which synthetic data the block's folder holds (see the module doc)."""
    if _CUBES.search(block.text):
        return "cubes"
    if _CAL.search(block.text):
        return "cal"
    return "resampled"


def needs_jwst(block):
    return data_kind(block) in ("cal", "cubes")


# --------------------------------------------------------------------------
# the extractor itself


def test_extractor_classifies_and_refuses():
    rst = textwrap.dedent("""\
        Title
        =====

        Run::

            strun wiimatch asn.json

        Prompted::

            $ strun wiimatch asn.json \\
                --degree=2
            output line

        .. code-block:: python
           :caption: example

           print(1)

        .. code-block:: ini

           [x]

        .. literalinclude:: ../x.py

        .. math::

           a = b

        >>> 1 + 1
        2
        """)
    blocks = rst_blocks(rst, "x.rst")
    got = [(b.line, b.lang, b.kind) for b in blocks]
    assert got == [(4, "", "unclassified"), (8, "", "shell"), (14, "python", "python"),
                   (19, "ini", "unclassified"), (23, "<literalinclude>", "unclassified")], got
    assert shell_commands(blocks[1]) == "strun wiimatch asn.json \\\n    --degree=2"
    assert blocks[2].text == "print(1)"
    md = "a\n\n```\nls\n```\n\n```bash\nls -l\n```\n\n~~~python\nx = 1\n~~~\n"
    got = [(b.line, b.lang, b.kind, b.text) for b in markdown_blocks(md, "R.md")]
    assert got == [(3, "", "unclassified", "ls"), (7, "bash", "shell", "ls -l"),
                   (11, "python", "python", "x = 1")], got
    assert sets_variables_only(Block("p", 1, "shell", 'export A=1\n# c\nB="x y"'))
    assert not sets_variables_only(Block("p", 1, "shell", "export A=1\nstrun x"))


def test_every_block_is_classified():
    bad = [f"{b.id}: lang={b.lang!r}: {b.text.splitlines()[0] if b.text else ''!r}"
           for b in BLOCKS if b.kind == "unclassified"]
    assert not bad, (
        "code blocks that tests/test_recipes.py cannot classify (give them a language: "
        "shell, python, yaml, or text when they are not code):\n" + "\n".join(bad))


def test_blocks_are_found():
    kinds = {}
    for b in BLOCKS:
        kinds.setdefault(b.source, set()).add(b.kind)
    assert {"shell", "python"} <= kinds["README.md"]
    assert {"shell", "python", "yaml"} <= kinds["docs/pipeline.rst"]
    assert {"shell", "python", "text"} <= kinds["docs/step.rst"]
    assert len(RUNNABLE) >= 25, len(RUNNABLE)


def test_ci_runs_the_readme_test_command():
    readme = [b for b in BLOCKS if b.source == "README.md" and b.kind == "shell"
              and "pytest" in b.text]
    assert [b.text for b in readme] == ['pip install ".[test,jwst]" && python -m pytest']
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == readme[0].text


# --------------------------------------------------------------------------
# the environment: stand-ins, offline settings, synthetic data

_STANDINS = {
    "pip": r'''
import sys, tomllib
from pathlib import Path
REPO = Path(sys.argv.pop(1))
args = sys.argv[1:]
def fail(msg):
    sys.exit(f"recipe check: pip {' '.join(args)}: {msg}")
if not args or args[0] != "install" or len(args) < 2:
    fail("only 'pip install SPEC...' is checked in recipes")
meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
extras = set(meta.get("optional-dependencies", {}))
for spec in args[1:]:
    if spec.startswith("-"):
        fail(f"option {spec} is not checked")
    base, _, rest = spec.partition("[")
    if base not in (".", meta["name"]):
        fail(f"{spec}: expected '.' (a clone) or {meta['name']!r}")
    wanted = {e.strip() for e in rest.rstrip("]").split(",") if e.strip()} if rest else set()
    if rest and not rest.endswith("]"):
        fail(f"{spec}: malformed extras")
    if wanted - extras:
        fail(f"{spec}: unknown extras {sorted(wanted - extras)}; pyproject.toml has {sorted(extras)}")
print(f"recipe check: pip {' '.join(args)}: specs and extras valid, nothing installed")
''',
    "sphinx-build": r'''
import sys
from pathlib import Path
REPO = Path(sys.argv.pop(1))
args = sys.argv[1:]
try:
    from sphinx.cmd.build import get_parser
except ImportError:
    get_parser = None
if get_parser is not None:
    ns = get_parser().parse_args(args)     # exits 2 on a bad option
    source, warnings_are_errors = ns.sourcedir, ns.warningiserror
else:
    positional = [a for a in args if not a.startswith("-")]
    source, warnings_are_errors = positional[-2], "-W" in args
if Path(source) != Path("docs") or not (REPO / "docs" / "conf.py").is_file():
    sys.exit(f"recipe check: sphinx-build: source folder {source!r} is not the docs folder")
if not warnings_are_errors:
    sys.exit("recipe check: sphinx-build: -W (warnings as errors, as CI) is missing")
print(f"recipe check: sphinx-build {' '.join(args)}: options valid, not run "
      "(tests/test_docs.py builds the site)")
''',
    "python": r'''
import os, subprocess, sys
from pathlib import Path
REPO = Path(sys.argv.pop(1))
REAL = sys.argv.pop(1)
args = sys.argv[1:]
if args[:2] == ["-m", "pytest"]:
    cmd = [REAL, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args[2:]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    print(f"recipe check: python -m pytest {' '.join(args[2:])}: collected, not run: {tail[0]}")
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
    sys.exit(proc.returncode)
if args and args[0].startswith("benchmarks/") and args[0].endswith(".py"):
    code = (
        "import argparse, runpy, sys\n"
        "parse = argparse.ArgumentParser.parse_args\n"
        "def check(self, *a, **k):\n"
        "    parse(self, *a, **k)\n"
        "    print('recipe check: python ' + ' '.join(sys.argv) + ': arguments valid, not run')\n"
        "    raise SystemExit(0)\n"
        "argparse.ArgumentParser.parse_args = check\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "raise SystemExit('recipe check: the script parsed no arguments')\n"
    )
    sys.exit(subprocess.run([REAL, "-c", code, *args], cwd=REPO).returncode)
os.execv(REAL, [REAL, *args])
''',
    "dask": r'''
import sys
args = sys.argv[1:]
if not args or args[0] not in ("scheduler", "worker"):
    sys.exit(f"recipe check: dask {' '.join(args)}: only 'dask scheduler|worker' is checked")
if args[0] == "scheduler":
    from distributed.cli.dask_scheduler import main
else:
    from distributed.cli.dask_worker import main
main.make_context(f"dask {args[0]}", list(args[1:]))   # exits 2 on a bad option
print(f"recipe check: dask {' '.join(args)}: options valid, not started")
''',
    "strun": r'''
import os, sys
REAL = sys.argv.pop(1)
args = sys.argv[1:]
check_only = (args[:1] == ["cube_build"]
              or any(a.startswith("--scheduler=tcp://") for a in args))
if not check_only:
    os.execv(REAL, [REAL, *args])
os.environ["STPIPE_DISABLE_CRDS_STEPPARS"] = "true"
from stpipe import _cmdline
build = _cmdline._build_step_from_args
def build_only(*a, **k):
    step, positional = build(*a, **k)
    def not_run(*ignored):
        print(f"recipe check: strun {' '.join(args)}: command line valid, step built, not run")
    step.run = not_run
    return step, positional
_cmdline._build_step_from_args = build_only
sys.argv = [REAL, *args]
from stpipe._cli.strun import main
sys.exit(main())
''',
}


@pytest.fixture(scope="session")
def recipe_env(tmp_path_factory):
    """Environment of the recipes: stand-ins first on PATH, then the test
    environment's bin folder; CRDS unreachable."""
    root = tmp_path_factory.mktemp("recipes")
    stand = root / "bin"
    stand.mkdir()
    venv_bin = Path(sys.executable).parent
    real = {name: shutil.which(name, path=str(venv_bin)) or shutil.which(name)
            for name in ("python", "strun")}
    real["python"] = real["python"] or sys.executable
    for name, code in _STANDINS.items():
        extra = {"pip": [str(REPO)], "sphinx-build": [str(REPO)], "dask": [],
                 "python": [str(REPO), real["python"]], "strun": [real["strun"] or ""]}[name]
        script = root / f"standin_{name.replace('-', '_')}.py"
        script.write_text(code, encoding="utf-8")
        exe = stand / name
        argv = " ".join(f"'{a}'" for a in [sys.executable, str(script), *extra])
        exe.write_text(f'#!/bin/bash\nexec {argv} "$@"\n', encoding="utf-8")
        exe.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STPIPE_", "CRDS_", "PYTEST_", "COV_"))}
    env["PATH"] = os.pathsep.join([str(stand), str(venv_bin), env.get("PATH", "")])
    env["CRDS_SERVER_URL"] = "https://crds.invalid"
    env["CRDS_PATH"] = str(root / "crds_cache")
    env["MPLBACKEND"] = "Agg"
    os.makedirs(env["CRDS_PATH"])
    return {"root": root, "env": env}


def _write_resampled(folder):
    import pipeline_helpers as ph
    import step_helpers as h

    models, _, _ = h.make_models(n=3, shape=(48, 56), crval=ph.FIELD, seed=3)
    h.write_asn(models, str(folder), name="asn.json")
    cal = ph.make_cal(0)
    cal.save(str(folder / "exp1_cal.fits"))


def _write_cal(folder):
    import pipeline_helpers as ph

    path = ph.write_field(str(folder), n=3)
    shutil.copyfile(path, folder / "asn.json")


def _write_cubes(folder):
    import step_helpers as h

    models, _, _ = h.make_cube_build_cubes(shape=(6, 20, 24), noise=0.01, seed=5)
    cubes = folder / "cubes"
    cubes.mkdir()
    for m in models:
        m.save(str(cubes / m.meta.filename))


_DATA = {"resampled": _write_resampled, "cal": _write_cal, "cubes": _write_cubes}


@dataclass
class Outcome:
    rc: int
    output: str
    script: str
    cwd: Path


class Pages:
    """Runs each page's blocks in page order, each at most once.

    Pages are independent, so up to ``WORKERS`` pages run at a time. A block
    identical to one already run (same commands, same variable settings,
    same kind of data) on another page is not run again: its outcome is
    reused (the pages' later blocks do not read what such a block writes).
    """

    def __init__(self, root, env):
        self.root, self.env = root, env
        self.done = {}        # block id -> Outcome
        self.same = {}        # (kind, script) -> [threading.Event, Outcome]
        self.lock = threading.Lock()
        self.page_locks = {b.page: threading.Lock() for b in RUNNABLE}
        self.pool = ThreadPoolExecutor(max_workers=WORKERS)

    def folder(self, block):
        kind = data_kind(block)
        path = self.root / re.sub(r"\W", "_", block.page) / kind
        if not path.exists():
            partial = path.with_name(kind + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            _DATA[kind](partial)
            partial.rename(path)
        return path

    def prelude(self, block):
        """Variable settings of the page's earlier set-only blocks."""
        earlier = [b for b in RUNNABLE if b.page == block.page and b.line < block.line]
        return "\n".join(shell_commands(b) for b in earlier if sets_variables_only(b))

    def script(self, block):
        if block.kind == "python":
            code = self.root / "scripts" / (re.sub(r"\W", "_", block.id) + ".py")
            code.parent.mkdir(exist_ok=True)
            code.write_text(block.text + "\n", encoding="utf-8")
            body = f'python "{code}"'
        else:
            body = shell_commands(block)
        return f"set -euo pipefail\n{self.prelude(block)}\n{body}\n"

    def start(self, blocks):
        """Start the pages of ``blocks``, each up to its last block listed."""
        last = {}
        for b in blocks:
            last[b.page] = max(last.get(b.page, 0), b.line)
        # the pages with most pipeline runs first
        order = sorted(last, key=lambda page: -sum(
            b.text.count("strun") + b.text.count(".call(") for b in RUNNABLE if b.page == page))
        return {page: self.pool.submit(self._page, page, last[page]) for page in order}

    def run(self, block):
        self.pool.submit(self._page, block.page, block.line).result()
        return self.done[block.id]

    def _page(self, page, line):
        with self.page_locks[page]:
            for b in RUNNABLE:
                if b.page == page and b.line <= line and b.id not in self.done:
                    if HAVE_JWST or not needs_jwst(b):
                        self.done[b.id] = self._run_once(b)

    def _run_once(self, block):
        script = self.script(block)
        key = (data_kind(block), script.replace(str(self.root), ""))
        if block.kind == "python":
            key = (data_kind(block), self.prelude(block), block.text)
        with self.lock:
            entry = self.same.get(key)
            owner = entry is None
            if owner:
                entry = self.same[key] = [threading.Event(), None, block.id]
        if not owner:
            entry[0].wait()
            first = entry[1]
            return Outcome(first.rc, f"[same block as {entry[2]}, not run again]\n"
                           + first.output, first.script, first.cwd)
        try:
            entry[1] = self._execute(block, script)
        finally:
            if entry[1] is None:
                entry[1] = Outcome(-1, "[the test harness failed]", script, self.root)
            entry[0].set()
        return entry[1]

    def _execute(self, block, script):
        cwd = self.folder(block)
        path = self.root / "scripts" / (re.sub(r"\W", "_", block.id) + ".sh")
        path.parent.mkdir(exist_ok=True)
        path.write_text(script, encoding="utf-8")
        try:
            proc = subprocess.run(["bash", str(path)], cwd=cwd, env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=TIMEOUT)
            return Outcome(proc.returncode, proc.stdout, script, cwd)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            return Outcome(-1, out + f"\n[timed out after {TIMEOUT} s]", script, cwd)


@pytest.fixture(scope="session")
def pages(recipe_env, request):
    runner = Pages(recipe_env["root"], recipe_env["env"])
    # start every selected recipe's page now, WORKERS pages at a time
    selected = [item.callspec.params.get("block") for item in request.session.items
                if getattr(item, "originalname", None) == "test_recipe"
                and hasattr(item, "callspec")]
    runner.start([b for b in selected if isinstance(b, Block)])
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)


def _params(blocks):
    out = []
    for b in blocks:
        marks = [pytest.mark.xfail(strict=True, reason=reason)
                 for (page, needle), reason in XFAIL.items()
                 if b.source == page and needle in b.text]
        if needs_jwst(b):
            marks.append(pytest.mark.skipif(not HAVE_JWST,
                                            reason='needs jwst: pip install ".[jwst]"'))
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


# --------------------------------------------------------------------------
# the recipes


@pytest.mark.parametrize("block", _params(RUNNABLE))
def test_recipe(block, pages):
    outcome = pages.run(block)
    print(f"--- {block.id} in {outcome.cwd} ---\n{outcome.output[-3000:]}")   # shown by -rP
    if outcome.rc != 0:
        pytest.fail(
            f"{block.id}: the {block.kind} recipe failed (exit {outcome.rc}) in "
            f"{outcome.cwd}:\n--- block ---\n{block.text}\n--- output (end) ---\n"
            f"{outcome.output[-6000:]}", pytrace=False)


def _shipped_configs():
    import asdf

    from jwst_wiimatch.configs import CONFIGS, config_path

    out = {}
    for name in CONFIGS:
        with asdf.open(config_path(name), lazy_load=False) as af:
            tree = {k: v for k, v in af.tree.items()
                    if k not in ("asdf_library", "history")}
        out[name] = json.loads(json.dumps(tree))
    return out


def _normalised(tree):
    tree = dict(tree)
    tree.setdefault("parameters", {})
    return tree


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS
                                   if b.kind == "yaml"])
def test_yaml_block_is_a_shipped_config(block):
    yaml = pytest.importorskip("yaml")
    shown = _normalised(yaml.safe_load(block.text))
    shipped = {name: _normalised(tree) for name, tree in _shipped_configs().items()}
    same_class = [name for name, tree in shipped.items() if tree["class"] == shown["class"]]
    assert len(same_class) == 1, f"{block.id}: no single shipped config of class {shown['class']}"
    assert shown == shipped[same_class[0]], (
        f"{block.id} differs from the shipped {same_class[0]}")


def test_demo_synopsis_matches_help(recipe_env):
    """``text`` blocks that show ``wiimatch-demo`` options name real options."""
    synopses = [b for b in BLOCKS if b.kind == "text" and b.text.startswith("wiimatch-demo")]
    assert synopses
    proc = subprocess.run(["wiimatch-demo", "--help"], env=recipe_env["env"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for b in synopses:
        for option in re.findall(r"(?<![\w-])--[\w-]+", b.text):
            assert option in proc.stdout, f"{b.id}: {option} is not an option of wiimatch-demo"


def test_readme_doctests(tmp_path, monkeypatch):
    """``>>>`` blocks of the README (those of docs/ run in tests/test_docs.py)."""
    monkeypatch.chdir(tmp_path)
    readme = [b for b in BLOCKS if b.source == "README.md" and b.kind == "doctest"]
    if not readme:
        return
    test = doctest.DocTestParser().get_doctest(
        "\n\n".join(b.text for b in readme), {}, "README.md", "README.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.failures == 0


def test_docs_doctest_blocks_run_in_test_docs():
    import test_docs

    pages = {p.relative_to(REPO).as_posix() for p in test_docs.PAGES}
    for b in BLOCKS:
        if b.kind == "doctest" and b.source != "README.md":
            assert b.source in pages, b.id


def test_configs_copy(tmp_path, capsys):
    """``python -m jwst_wiimatch.configs --copy``, which the recipes of
    docs/pipeline.rst run before ``strun <config>.asdf``."""
    import filecmp

    from jwst_wiimatch.configs import CONFIGS, config_path
    from jwst_wiimatch.configs.__main__ import main

    assert main([]) == 0
    assert capsys.readouterr().out.split() == [config_path(n) for n in CONFIGS]
    target = tmp_path / "cfg"
    assert main(["--copy", str(target)]) == 0
    for name in CONFIGS:
        assert filecmp.cmp(config_path(name), target / name, shallow=False)
    assert main(["--copy", str(target)]) == 0          # the same files: nothing to do
    edited = target / CONFIGS[0]
    edited.write_text(edited.read_text() + "# mine\n")
    capsys.readouterr()
    assert main(["--copy", str(target)]) == 1          # an edited copy is kept
    assert "not overwritten" in capsys.readouterr().err
    assert edited.read_text().endswith("# mine\n")
    assert main(["--copy", str(target), "--force"]) == 0
    assert filecmp.cmp(config_path(CONFIGS[0]), edited, shallow=False)
