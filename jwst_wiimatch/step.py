"""`WiiMatchStep`: background matching of resampled JWST models as an stpipe step.

Run it as ``strun wiimatch asn.json``, as ``WiiMatchStep.call(...)``, or as
a post-hook of jwst's ``resample`` step
(``post_hooks: [jwst_wiimatch.step.WiiMatchStep]``). See ``docs/step.rst``.
"""

import contextlib
import copy
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Mapping, Sequence

import numpy as np
from stpipe import Step
from stpipe.config_parser import ConfigObj
from stpipe.datamodel import AbstractDataModel
from stpipe.library import AbstractModelLibrary

from . import report
from .core.degree import is_auto
from .core.inputs import check_solver
from .matching import (LevelChoice, apply_outcomes, default_threads, map_models,
                       match_models, parse_degree)
from .models import WiiMatchLibrary, check_association
from .models.library import SavedLibrary, member_file, open_member, outputs_association
from .models.outputs import OutputSet, remove_known_suffix, save_atomically

__all__ = ["WiiMatchStep"]

log = logging.getLogger(__name__)

_SUFFIX = "wiimatch"


class NoCRDS:
    """Mixin for an stpipe Step that has no CRDS parameter files and never contacts CRDS."""

    @classmethod
    def get_config_from_reference(cls, dataset, disable=None, crds_observatory=None):
        """Return an empty configuration: there are no CRDS parameter files."""
        return ConfigObj()

    @classmethod
    def _get_crds_parameters(cls, dataset):
        # never open the input nor contact CRDS to look for parameters
        return {}, "jwst"


class WiiMatchStep(NoCRDS, Step):
    """Match the backgrounds of resampled exposures that share one pixel grid.

    For N models on a common grid (resampled images, or IFU cubes built on
    one grid), find one polynomial per model, in sky coordinates about a
    reference point (and wavelength for cubes), such that the
    inverse-variance weighted differences of every pair of overlapping
    models, after removing their polynomials, are least in the least-squares
    sense. The polynomials are recorded in ``meta.background.polynomial_info``
    and, with ``subtract=True``, subtracted from the data.

    Example: ``strun wiimatch asn.json --degree=1 --subtract=true`` writes one
    file per association member, named after it with its suffix replaced
    (``x_i2d.fits`` -> ``x_wiimatch.fits``, in ``--output_dir``): the member
    with its background subtracted, the polynomial in
    ``meta.background.polynomial_info`` and the fit in ``meta.wiimatch``.
    Input files are never changed.
    """

    class_alias = "wiimatch"

    spec = """
    degree = pass(default=1)  # polynomial degree: one integer for all axes, or one per axis (xi,eta[,wavelength]), e.g. 1 or 2,2,0 (checked and stored as integers), or auto (chosen by cross-validation on held-out overlap cells)
    terms = option('tensor', 'total', None, default=None)  # terms of the polynomials: 'tensor' (every product xi**i eta**j with i, j up to their axis' degree; degree 1 is 1, xi, eta, xi*eta) or 'total' (total degree i + j up to the degree; degree 1 is the plane 1, xi, eta); None: 'tensor', and with degree=auto both kinds are tried
    refpoint = float_list(min=2, max=3, default=None)  # reference point ra,dec or ra,dec,wavelength of the polynomial frame, e.g. 150.1,2.2; None = world coordinates of the grid center
    solver = string(default='RLU')  # linear solver: 'RLU' (LU with image 0 fixed, then zero-sum) or 'PINV' (pseudo-inverse), any case
    dqbits = string(default='~DO_NOT_USE+NON_SCIENCE')  # DQ bit flags of pixels that are used anyway (jwst's convention); '~' inverts: '~DO_NOT_USE+NON_SCIENCE' (default) leaves out pixels with DO_NOT_USE or NON_SCIENCE set; None or '' ignores DQ
    subtract = boolean(default=False)  # subtract each model's polynomial from its data
    group_exposures = boolean(default=True)  # models of one exposure (same group_id, e.g. its detectors) share one polynomial, as in jwst's skymatch; False matches each model (detector) on its own
    match_down = boolean(default=None)  # level of the matched backgrounds (jwst skymatch's parameter and meaning): True: in each group of overlapping models the one of lowest background (mean of its polynomial over its own pixels, relative to the group) keeps it (polynomial 0), the others are matched down to it; False: matched up to the highest; None (default here): zero sum, each group's coefficients sum to 0 (the mosaic keeps the mean level)
    zero_sum = boolean(default=False)  # True: the zero-sum convention whatever match_down says (how to choose it in the skymatch slot, whose match_down is True by default)
    reference = string_list(default=None)  # models held fixed (polynomial 0), the others fitted to them: member file names or indices, e.g. x_i2d.fits or 0,2; a group without one follows match_down (with a warning)
    levels = float_list(default=None)  # absolute background of each model at refpoint (data units), one per model, nan where unknown, e.g. 0.31,nan,0.29: each group's common constant is set so that the backgrounds agree with them (least squares); not with reference
    robust = string(default='clip')  # robust matching: 'clip' (default): pixels whose pair residual (normalised by the ERR of both models) exceeds nsigma robust sigmas are left out with their neighbours within grow cells, starting from cell medians that junk cannot move; 'huber' or 'tukey': down-weighted instead (slower, and a little noisier on clean data); 'none': plain least squares (wiimatch's). Absurd values (e.g. unflagged 1e30 fill values) are left out whatever this says
    nclip = integer(min=1, default=3)  # robust matching: most reweighted passes over the data (as skymatch's nclip, the number of clipping iterations); they stop as soon as the fit no longer changes the rejections (usually after one)
    nsigma = float(min=0.0, default=4.0)  # robust matching: rejection threshold in robust sigmas of each pair's normalised residuals (symmetric: a pair residual has no lower and upper side, so skymatch's lsigma and usigma do not apply)
    source_nsigma = float(min=0.0, default=10.0)  # source masking: in each model, pixels more than source_nsigma times their ERR above the local background (interpolated between medians of 16x16-pixel boxes), with their 8 neighbours, are marked (sources, and junk such as cosmic rays and trails), and the matching cells holding them are left out of that model; 0 turns it off
    grow = integer(min=0, default=1)  # robust matching: cells of the matching grid (binning x binning pixels) around a rejected one also left out, so that trails and blobs go with their fainter edges
    binning = integer(min=1, default=4)  # match on averages of binning x binning blocks of the grid (1: every pixel; reduced for grids under 64*binning pixels a side): smooth backgrounds stay at the noise floor with 16x less memory
    maximum_cores = string(default='all')  # worker threads for reading, matching and subtracting: 'all', 'half', 'quarter', 'none' (one) or a number
    scheduler = string(default=None)  # address of a dask.distributed scheduler (e.g. tcp://host:8786): models kept in files are read and reduced, and the pair sums accumulated, as tasks on its workers (needs the dask extra)
    in_memory = boolean(default=True)  # False: keep models on disk (temporary files) and never hold all models in memory at once
    report = string(default=None)  # write a JSON report of the fit (per model, pair and group: pixels, residual RMS, chi-square, condition) to this file, e.g. wiimatch_report.json (relative to output_dir when set); with matplotlib also a PNG report beside it (same name, .png)
    report_plot = boolean(default=True)  # with report: also draw the PNG report when matplotlib is installed (reads every model once more)
    output_ext = string(default='.fits')  # file name extension of saved outputs
    output_use_model = boolean(default=True)  # name outputs after each member, its known suffix replaced: x_i2d.fits -> x_wiimatch.fits (output_file, when set, names them instead: <output_file>_<k>_wiimatch.fits)
    """  # noqa: E501

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # numbers, not text, whether given on the command line or in Python
        # (--save-parameters writes them as numbers); bad values stop here
        self.degree = typed_degree(self.degree)

    # this step uses no reference files and never contacts CRDS
    reference_file_types = []  # noqa: RUF012
    prefetch_references = False

    # ------------------------------------------------------------------
    # stpipe plumbing: no CRDS (NoCRDS), our logger, our way to open files
    # ------------------------------------------------------------------
    @staticmethod
    def get_stpipe_loggers():
        """Loggers stpipe configures while the step runs."""
        return ("stpipe", "jwst_wiimatch", "py.warnings")

    @classmethod
    def _datamodels_open(cls, init, **kwargs):
        if isinstance(init, (str, os.PathLike)) and str(init).lower().endswith(".json"):
            return WiiMatchLibrary(init, **kwargs)
        if isinstance(init, (str, os.PathLike)):
            return open_member(init, f"input file {os.fspath(init)!r}", **kwargs)
        from stdatamodels.jwst import datamodels

        return datamodels.open(init, **kwargs)

    def default_suffix(self):
        """Suffix of output files: ``wiimatch``, or the step's name inside a pipeline."""
        if self.parent is not None and self.name:
            return self.name
        return _SUFFIX

    @staticmethod
    def remove_suffix(name):
        """Remove a known JWST product or step suffix (``x_cal`` -> ``x``), as jwst does."""
        return remove_known_suffix(name)

    # ------------------------------------------------------------------
    def process(self, input_data):
        """Match backgrounds of the input models.

        Parameters
        ----------
        input_data : str, dict, list, ModelContainer, AbstractModelLibrary or DataModel
            An association file name or dict, a list of models or file
            names, a jwst ``ModelContainer`` or a model library (jwst's
            ``ModelLibrary`` included, on disk or not).

        Returns
        -------
        Same kind as the input
            A library for an association (path or dict) or a library input,
            a list for a list, a ``ModelContainer`` for a ``ModelContainer``.
        """
        solver = check_solver(self.solver)
        threads = parse_cores(self.maximum_cores)
        standalone = self.parent is None
        stream = self._streams_outputs(input_data)
        on_disk = stream or not self.in_memory
        with contextlib.ExitStack() as stack:
            # a standalone run that saves its results reads the association's
            # files on demand and writes each output when it is done: memory
            # holds one model per worker thread, never all of them
            scratch = self._scratch_folder(stack, on_disk, keep=not stream)
            output, library = self._prepare(input_data, standalone, scratch=scratch)
            if len(library) == 0:
                raise ValueError(
                    "input holds no models: give an association with at least two "
                    "members (or a list of two or more models)"
                )
            outputs = self._plan_outputs(library, stack, stream)
            saved = self._match_and_apply(
                library, stack, stream, solver, threads, kind="grid", outputs=outputs,
                groups="group_id" if self.group_exposures else None)
        return saved if stream else output

    # ------------------------------------------------------------------
    def _match_and_apply(self, library, stack, stream, solver, threads, *, kind,
                         groups=None, extra=None, library_class=None, outputs=None,
                         cal_step=None, level_for_resample=False):
        """Match, record (and subtract) with this step's parameters; log the summary.

        With ``outputs`` (an `OutputSet` from `_plan_outputs`) every output is
        saved here, all or none: with ``stream`` each one as soon as it is
        done, and the library over the saved files is returned; otherwise
        after all are done (and None is returned). ``stack`` keeps the dask
        client, if any, open until the caller's block ends.
        """
        level = self._level_choice(library)
        paths = self._report_paths()
        client = stack.enter_context(dask_client(self.scheduler))
        outcomes, summary = match_models(
            library, kind=kind, groups=groups, degree=self.degree, terms=self.terms,
            refpoint=self.refpoint,
            solver=solver, dqbits=self.dqbits, binning=self.binning, threads=threads,
            client=client, level=level, robust=self._robust_args(),
            sources=float(self.source_nsigma) or None)
        # the PNG's mosaics read the models before any subtraction
        sums = (report.mosaic_sums(library, outcomes, summary, self.dqbits, threads, kind)
                if paths and paths[1] else None)
        apply_outcomes(library, outcomes, summary, subtract=bool(self.subtract),
                       solver=solver, dqbits=self.dqbits, threads=threads,
                       extra=extra, after=outputs if stream else None, client=client,
                       cal_step=cal_step, level_for_resample=level_for_resample)
        log_summary(outcomes, summary)
        saved = self._save_outputs(library, outputs, stream, threads, library_class)
        if paths:
            self._write_report(paths, outcomes, summary, sums, kind, solver)
        return saved if stream else None

    def _report_paths(self):
        """``(json, png or None)`` paths of the ``report`` parameter, checked; None unset."""
        if self.report is None or str(self.report).strip().lower() in ("", "none"):
            return None
        json_path, png_path = report.report_paths(self.report,
                                                  self.search_attr("output_dir"))
        if not self.report_plot:
            png_path = None
        elif not report.has_matplotlib():
            log.info("wiimatch: matplotlib is not installed: the JSON report only, no PNG "
                     "(pip install 'jwst-wiimatch[plot]')")
            png_path = None
        return json_path, png_path

    def _write_report(self, paths, outcomes, summary, sums, kind, solver):
        """Write the JSON (and PNG) report of a run, each atomically."""
        json_path, png_path = paths
        params = {"kind": kind, "solver": solver, "dqbits": self.dqbits,
                  "subtract": bool(self.subtract),
                  "group_exposures": bool(self.group_exposures)}
        rep = report.build_report(outcomes, summary, params, step=type(self).__name__,
                                  plot=os.path.basename(png_path) if png_path else None)
        if png_path:
            report.write_png(png_path, rep, sums)
            log.info("wiimatch: PNG report written to %s", png_path)
        report.write_json(json_path, rep)
        log.info("wiimatch: JSON report written to %s", json_path)

    def _robust_args(self):
        """Engine keyword arguments of robust matching (None: ``robust='none'``)."""
        method = "none" if self.robust is None else str(self.robust).strip().lower()
        if method in ("none", "", "false"):
            return None
        if method not in ("clip", "huber", "tukey"):
            raise ValueError(f"robust={self.robust!r}: give 'clip', 'huber', 'tukey' or "
                             "'none' (plain least squares)")
        return {"robust": method, "nsigma": float(self.nsigma), "grow": int(self.grow),
                "nclip": int(self.nclip)}

    def _level_choice(self, library):
        """The `LevelChoice` of ``match_down``, ``reference`` and ``levels``.

        Raises ValueError naming the parameter for a reference that is no
        member, or levels that are not one per member.
        """
        n = len(library)
        refs = None
        if self.reference:
            names = member_names(library)
            refs = sorted({_member_index(r, names) for r in self.reference})
        levels = None
        if self.levels:
            levels = [float(v) for v in self.levels]
            if len(levels) != n:
                raise ValueError(
                    f"levels={self.levels!r} gives {len(levels)} value(s) for {n} models: "
                    "give one per model, in input order (nan where unknown)")
            if not any(np.isfinite(levels)):
                raise ValueError(f"levels={self.levels!r} gives no level (all nan)")
            if refs is not None:
                raise ValueError("reference and levels cannot both be given: reference "
                                 "models keep background 0, levels set the backgrounds")
        match_down = None if self.zero_sum else self.match_down
        return LevelChoice(match_down=match_down, reference=refs, levels=levels)

    def _save_outputs(self, library, outputs, staged, threads=None, library_class=None):
        """Publish the outputs of a run; return the library over the saved files.

        ``staged``: every output was staged already (streamed). None when
        there is nothing for this step to save.
        """
        if outputs is None:
            return None
        if not staged:
            map_models(library, outputs.stage, modify=False, threads=threads)
        paths = outputs.commit()
        self.save_results = False  # every output is written already (run() restores it)
        return (library_class or SavedLibrary)(outputs_association(paths))

    def _streams_outputs(self, data):
        """True for a standalone run on an association that saves its results."""
        return (self.parent is None and bool(self.save_results)
                and (isinstance(data, Mapping)
                     or isinstance(data, (str, os.PathLike))
                     and os.fspath(data).lower().endswith(".json")))

    @staticmethod
    def _scratch_folder(stack, on_disk, keep=False):
        """A ``TemporaryDirectory`` in the system's temporary directory (TMPDIR), or None.

        Removed when ``stack`` closes, unless ``keep``: then it lives as long
        as the on-disk library that `new_library` gives it to.
        """
        if not on_disk:
            return None
        scratch = tempfile.TemporaryDirectory(prefix="wiimatch_scratch_")
        if not keep:
            stack.callback(scratch.cleanup)
        return scratch

    def _plan_outputs(self, library, stack, stream):
        """The checked `OutputSet` of a run that saves its own outputs, or None.

        A standalone run that saves its results writes them itself: every
        path is checked before the first write and each file is written
        under a temporary name first (see `jwst_wiimatch.models.outputs`).
        With post-hooks stpipe saves after the hooks, one file at a time
        (still atomically, see `save_model`).
        """
        if not stream and (self.parent is not None or not self.save_results
                           or getattr(self, "post_hooks", None)):
            return None
        n = len(library)
        files = [member_file(library, k) for k in range(n)]
        names = member_names(library, files)
        if self.output_use_model and not self.output_file:
            paths = [self.make_output_path(basepath=name) for name in names]
        else:
            paths = [self.make_output_path(basepath=self.output_file,
                                           idx=k if n > 1 else None) for k in range(n)]
        sources = [f"model {k} ({name})" for k, name in enumerate(names)]
        return stack.enter_context(OutputSet(paths, sources=sources,
                                             inputs=[f for f in files if f]))

    def run(self, *args, **kwargs):
        """Run the step (see `stpipe.Step.run`); its parameters are left as they were.

        A standalone run turns SIGTERM into ``SystemExit`` while it runs, so
        that a terminated run removes its scratch and staging folders.
        """
        save_results = self.save_results
        try:
            with _terminate_cleanly(self.parent is None), _log_where_stpipe_logs():
                return super().run(*args, **kwargs)
        finally:
            self.save_results = save_results

    @classmethod
    def call(cls, *args, **kwargs):
        """Create and run a new instance of the step (see `stpipe.Step.call`)."""
        if args:
            check_input_kind(args[0])
        return super().call(*args, **kwargs)

    def save_model(self, model, suffix=None, idx=None, output_file=None, force=False,
                   **components):
        """Save as `stpipe.Step.save_model` does, through a temporary name (atomic)."""
        if not isinstance(model, AbstractDataModel) or isinstance(model, Sequence):
            return super().save_model(model, suffix=suffix, idx=idx,
                                      output_file=output_file, force=force, **components)
        if output_file is None or output_file == "":
            output_file = self.output_file
        if not force and not self.save_results and not output_file:
            return None
        if (self.output_use_model and not output_file) or (
                output_file is None and not self.search_output_file):
            output_file = model.meta.filename
            idx = None
        path = self.make_output_path(basepath=output_file, suffix=suffix, idx=idx,
                                     **components)
        name = model.meta.filename
        try:
            return save_atomically(model, path)
        finally:
            if self.parent is not None:
                # later steps of the pipeline name their products after the
                # exposure, not after this intermediate file
                model.meta.filename = name

    # ------------------------------------------------------------------
    def _prepare(self, data, standalone, scratch=None):
        """Return (output container, model library over its models).

        With ``scratch`` (from `_scratch_folder`), an association is read into
        an on-disk library that keeps no model in memory, its temporary files
        in ``scratch``.
        """
        if isinstance(data, AbstractModelLibrary):
            lib = data
            if standalone and not getattr(lib, "_on_disk", False):
                lib = _copy_library(lib)
            return lib, lib
        if isinstance(data, (str, os.PathLike)):
            path = os.fspath(data)
            if path.lower().endswith(".json"):
                if not os.path.isfile(path):
                    raise ValueError(f"association file {path!r} does not exist")
                lib = new_library(WiiMatchLibrary, path, scratch)
                lib.check_members_exist()
                return lib, lib
            model = open_member(path, path)
            return model, WiiMatchLibrary([model])
        if isinstance(data, Mapping):
            asn = check_association(copy.deepcopy(dict(data)), name="association dict")
            lib = new_library(WiiMatchLibrary, asn, scratch)
            lib.check_members_exist()
            return lib, lib
        if isinstance(data, AbstractDataModel) and not isinstance(data, Sequence):
            model = data.copy() if standalone else data
            return model, WiiMatchLibrary([model])
        if _is_model_container(data):
            container = data.copy() if standalone else data
            return container, WiiMatchLibrary(list(container))
        if isinstance(data, (list, tuple)):
            models = []
            for k, item in enumerate(data):
                if isinstance(item, (str, os.PathLike)):
                    models.append(open_member(os.fspath(item), f"input {k} ({item})"))
                elif isinstance(item, AbstractDataModel):
                    models.append(item.copy() if standalone else item)
                else:
                    raise TypeError(
                        f"input list item {k} is a {type(item).__name__}; give "
                        "datamodels or file names"
                    )
            out = models if isinstance(data, list) else tuple(models)
            return out, WiiMatchLibrary(list(models))
        check_input_kind(data)
        raise _input_kind_error(data)  # pragma: no cover (check_input_kind raised)


def _member_index(item, names):
    """Index of ``item`` (an index, or a member's file name) among ``names``."""
    text = str(item).strip()
    try:
        k = int(text)
    except ValueError:
        k = None
    if k is not None:
        if not 0 <= k < len(names):
            raise ValueError(f"reference={text!r}: there are {len(names)} models "
                             f"(indices 0 to {len(names) - 1})")
        return k
    base = os.path.basename(text)
    hits = [j for j, name in enumerate(names) if name and os.path.basename(name) == base]
    if len(hits) != 1:
        raise ValueError(
            f"reference={text!r} is {'no' if not hits else 'more than one'} model's file "
            f"name; give a member file name or index: {', '.join(map(str, names))}")
    return hits[0]


def typed_degree(value):
    """``degree`` as an int (all axes) or a list of ints (one per axis).

    Raises ValueError naming ``degree`` for anything else (see
    `jwst_wiimatch.matching.parse_degree`). ``'auto'`` stays ``'auto'``.
    """
    if is_auto(value):
        return "auto"
    try:
        return int(parse_degree(value, 1)[0])
    except ValueError:
        pass
    for ndim in (2, 3):
        try:
            return [int(d) for d in parse_degree(value, ndim)]
        except ValueError as exc:
            error = exc
    raise error


def _input_kind_error(data):
    return TypeError(
        f"cannot use a {type(data).__name__} as input: give an association "
        "file name or dict, a list of models or file names, a ModelContainer "
        "or a model library"
    )


def check_input_kind(data):
    """Raise TypeError (saying what is accepted) unless ``data`` is a kind of input we take."""
    if isinstance(data, (str, os.PathLike, Mapping, AbstractModelLibrary, list, tuple)):
        return
    if isinstance(data, AbstractDataModel) or _is_model_container(data):
        return
    raise _input_kind_error(data)


def _is_model_container(obj):
    # jwst's ModelContainer, without importing jwst
    return (isinstance(obj, Sequence) and not isinstance(obj, (str, list, tuple))
            and type(obj).__name__ == "ModelContainer")


def new_library(cls, data, scratch=None):
    """``cls(data)``, on disk in ``scratch`` (a ``TemporaryDirectory``) when given.

    The library keeps ``scratch`` and stpipe removes it with the library.
    """
    if scratch is None:
        return cls(data, on_disk=False)
    lib = cls(data, on_disk=True, temp_directory=scratch.name)
    lib._temp_dir = scratch  # removed by AbstractModelLibrary.__del__
    return lib


def member_names(library, files=None):
    """File name of each model of a library (its member's file, else ``meta.filename``).

    ``files``: the library's `member_file` of each model, when already known.
    """
    if files is None:
        files = [member_file(library, k) for k in range(len(library))]
    if all(files):
        return [os.path.basename(f) for f in files]
    return list(library.map_function(lambda model, index: model.meta.filename,
                                     modify=False))


def library_copies(lib):
    """Copies of the models of a model library, in order (the library is unchanged).

    A member that cannot be read raises `MemberError` naming it.
    """
    return map_models(lib, lambda model, index: model.copy(), modify=False, threads=1)


def _copy_library(lib):
    """New library of the same class holding copies of the models."""
    return type(lib)(library_copies(lib))


@contextlib.contextmanager
def _log_where_stpipe_logs():
    """Send this package's log records where stpipe's go, while a step runs.

    ``strun`` and pipelines configure the loggers their own class names
    (``get_stpipe_loggers``); run as a hook of jwst's ``resample`` or inside
    another pipeline, ours is not among them, so its summary and warnings
    would reach neither the console nor ``--log-file``. The handlers and
    level of the ``stpipe`` logger are lent to ``jwst_wiimatch`` meanwhile.
    """
    ours = logging.getLogger("jwst_wiimatch")
    theirs = logging.getLogger("stpipe")
    lent = [h for h in theirs.handlers if h not in ours.handlers]
    if not lent:
        yield
        return
    level = ours.level
    for handler in lent:
        ours.addHandler(handler)
    if level == logging.NOTSET or level > theirs.getEffectiveLevel():
        ours.setLevel(theirs.getEffectiveLevel())
    try:
        yield
    finally:
        for handler in lent:
            ours.removeHandler(handler)
        ours.setLevel(level)


@contextlib.contextmanager
def _terminate_cleanly(active):
    """While active (main thread, default SIGTERM handling): SIGTERM raises SystemExit."""
    if (not active or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame):
        log.error("wiimatch: terminated (SIGTERM); removing temporary files, "
                  "no output of this run is published")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def dask_client(address):
    """A ``dask.distributed.Client`` connected to ``address`` (None: no client)."""
    if address is None or str(address).strip().lower() in ("", "none"):
        yield None
        return
    try:
        from dask.distributed import Client
    except ImportError:
        raise ValueError(
            f"scheduler={address!r} needs dask.distributed: pip install "
            "'jwst-wiimatch[dask]', or leave scheduler unset to use this machine's cores"
        ) from None
    try:
        client = Client(str(address), timeout=30)
    except (OSError, TimeoutError) as exc:
        raise ValueError(f"cannot connect to the dask scheduler at {address!r} ({exc}); "
                         "check the address, or leave scheduler unset") from None
    log.info("wiimatch: using the dask cluster at %s (%d workers)", address,
             len(client.scheduler_info().get("workers", {})))
    try:
        yield client
    finally:
        client.close()


def parse_cores(value):
    """Worker threads from ``maximum_cores``: 'all', 'half', 'quarter', 'none' or a number."""
    total = default_threads()
    text = str(value).strip().lower()
    named = {"all": total, "half": max(1, total // 2), "quarter": max(1, total // 4),
             "none": 1}
    if text in named:
        return named[text]
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(
            f"maximum_cores={value!r}: give 'all', 'half', 'quarter', 'none' (one "
            "thread) or a positive number of threads"
        )
    return n


def log_summary(outcomes, summary):
    """Log the per-model table of a run."""
    log.info("wiimatch: polynomial degree %s%s in %s, refpoint %s",
             list(summary.degree), " (total degree)" if summary.terms == "total" else "",
             summary.frame, [round(v, 8) for v in summary.refpoint])
    head = (f"{'model':<52s} {'npix':>10s} {'rejected':>9s} {'bkg@ref':>13s} "
            f"{'rms before':>12s} {'rms after':>12s} {'chi2':>8s}  status")
    lines = [head, "-" * len(head)]
    for o in outcomes:
        b = float(o.coefficients[0]) if o.matched else np.nan
        d = o.diagnostics or {}
        rej = "-" if d.get("rejected") is None else str(d["rejected"])
        chi2 = np.nan if d.get("chi2") is None else d["chi2"]
        lines.append(f"{o.name[:52]:<52s} {o.npix:>10d} {rej:>9s} {b:>13.6g} "
                     f"{o.rms_before:>12.5g} {o.rms:>12.5g} {chi2:>8.3g}  {o.status}")
    log.info("wiimatch summary:\n%s", "\n".join(lines))
    _log_robust(outcomes)
    report.log_diagnostics(outcomes, summary)
    levels = [o for o in outcomes if o.matched and o.level]
    if levels:
        kinds = sorted({o.level["level_convention"] for o in levels})
        kept = [o.name for o in levels if o.level["level_reference"]]
        log.info("wiimatch: level of the matched backgrounds: %s%s", ", ".join(kinds),
                 f"; polynomial 0 (kept as it is): {', '.join(kept)}" if kept else "")


def _log_robust(outcomes):
    """Log how robust matching ran and what each model lost before matching."""
    done = [o for o in outcomes if o.matched and o.robust]
    if not done:
        return
    r = done[0].robust
    if r.get("robust", "none") == "none":
        log.info("wiimatch: plain least squares (robust='none')")
    else:
        log.info("wiimatch: robust matching %s (nsigma %g, grow %d): %d reweighted "
                 "pass(es) of at most %d; the 'rejected' column counts the matching "
                 "cells left out of all of a model's pairs", r["robust"],
                 r["robust_nsigma"], r["robust_grow"], r["robust_passes"],
                 r["robust_nclip"])
    lost = [o for o in outcomes if o.absurd or o.sources]
    if lost:
        log.info("wiimatch: pixels left out before matching (absurd values / marked by "
                 "source masking): %s", "; ".join(f"{o.name}: {o.absurd} / {o.sources}"
                                                   for o in lost))
