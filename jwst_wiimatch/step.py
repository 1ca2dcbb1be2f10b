"""`WiiMatchStep`: background matching of resampled JWST models as an stpipe step.

Run it as ``strun wiimatch asn.json``, as ``WiiMatchStep.call(...)``, or as
a post-hook of jwst's ``resample`` step
(``post_hooks: [jwst_wiimatch.step.WiiMatchStep]``). See ``docs/step.rst``.
"""

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
from stpipe import Step
from stpipe.config_parser import ConfigObj
from stpipe.datamodel import AbstractDataModel
from stpipe.library import AbstractModelLibrary

from .core.inputs import check_solver
from .matching import apply_outcomes, default_threads, match_models
from .models import WiiMatchLibrary, check_association
from .models.library import SavedLibrary, member_file, outputs_association

__all__ = ["WiiMatchStep"]

log = logging.getLogger(__name__)

_SUFFIX = "wiimatch"


class WiiMatchStep(Step):
    """Match the backgrounds of resampled exposures that share one pixel grid.

    For N models on a common grid (resampled images, or IFU cubes built on
    one grid), find one polynomial per model, in sky coordinates about a
    reference point (and wavelength for cubes), such that the
    inverse-variance weighted differences of every pair of overlapping
    models, after removing their polynomials, are least in the least-squares
    sense. The polynomials are recorded in ``meta.background.polynomial_info``
    and, with ``subtract=True``, subtracted from the data.
    """

    class_alias = "wiimatch"

    spec = """
    degree = pass(default=1)  # polynomial degree: one int for all axes, or one per axis (xi,eta[,wavelength]), e.g. 1 or 2,2,0
    refpoint = pass(default=None)  # reference point [ra, dec] or [ra, dec, wavelength] of the polynomial frame; None = world coordinates of the grid center
    solver = string(default='RLU')  # linear solver: 'RLU' (LU with image 0 fixed, then zero-sum) or 'PINV' (pseudo-inverse, minimum norm)
    dqbits = string(default='~DO_NOT_USE+NON_SCIENCE')  # DQ flags marking bad pixels (JWST bit-flag expression); None or '' ignores DQ
    subtract = boolean(default=False)  # subtract each model's polynomial from its data
    binning = integer(min=1, default=4)  # match on averages of binning x binning blocks of the grid (1: every pixel; reduced for grids under 64*binning pixels a side): smooth backgrounds stay at the noise floor with 16x less memory
    maximum_cores = string(default='all')  # worker threads for reading, matching and subtracting: 'all', 'half', 'quarter', 'none' (one) or a number
    scheduler = string(default=None)  # address of a dask.distributed scheduler (e.g. tcp://host:8786): models kept in files are read and reduced, and the pair sums accumulated, as tasks on its workers (needs the dask extra)
    in_memory = boolean(default=True)  # False: keep models on disk (temporary files) and never hold all models in memory at once
    output_ext = string(default='.fits')  # file name extension of saved outputs
    output_use_model = boolean(default=True)  # name outputs after each member: <member base>_wiimatch.fits
    """  # noqa: E501

    # this step uses no reference files and never contacts CRDS
    reference_file_types = []  # noqa: RUF012
    prefetch_references = False

    # ------------------------------------------------------------------
    # stpipe plumbing: no CRDS, our logger, our way to open files
    # ------------------------------------------------------------------
    @classmethod
    def get_config_from_reference(cls, dataset, disable=None, crds_observatory=None):
        """Return an empty configuration: wiimatch has no CRDS parameter files."""
        return ConfigObj()

    @classmethod
    def _get_crds_parameters(cls, dataset):
        # never open the input nor contact CRDS to look for parameters
        return {}, "jwst"

    @staticmethod
    def get_stpipe_loggers():
        """Loggers stpipe configures while the step runs."""
        return ("stpipe", "jwst_wiimatch", "py.warnings")

    @classmethod
    def _datamodels_open(cls, init, **kwargs):
        if isinstance(init, (str, os.PathLike)) and str(init).lower().endswith(".json"):
            return WiiMatchLibrary(init, **kwargs)
        from stdatamodels.jwst import datamodels

        return datamodels.open(init, **kwargs)

    def default_suffix(self):
        """Suffix of output files: ``wiimatch``."""
        return _SUFFIX

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
        with contextlib.ExitStack() as stack:
            # a standalone run that saves its results reads the association's
            # files on demand and writes each output when it is done: memory
            # holds one model per worker thread, never all of them
            tmpdir = (stack.enter_context(tempfile.TemporaryDirectory(prefix="wiimatch_"))
                      if stream else None)
            output, library = self._prepare(input_data, standalone, stream_dir=tmpdir)
            if len(library) == 0:
                raise ValueError(
                    "input holds no models: give an association with at least two "
                    "members (or a list of two or more models)"
                )
            saved = self._match_and_apply(library, stack, stream, solver, threads,
                                          kind="grid")
        return saved if stream else output

    # ------------------------------------------------------------------
    def _match_and_apply(self, library, stack, stream, solver, threads, *, kind,
                         groups=None, extra=None, library_class=None):
        """Match, record (and subtract) with this step's parameters; log the summary.

        With ``stream`` each output is saved as soon as it is done and the
        library over the saved files is returned (else None). ``stack`` keeps
        the dask client, if any, open until the caller's block ends.
        """
        client = stack.enter_context(dask_client(self.scheduler))
        outcomes, summary = match_models(
            library, kind=kind, groups=groups, degree=self.degree, refpoint=self.refpoint,
            solver=solver, dqbits=self.dqbits, binning=self.binning, threads=threads,
            client=client)
        paths = apply_outcomes(library, outcomes, summary, subtract=bool(self.subtract),
                               solver=solver, dqbits=self.dqbits, threads=threads,
                               extra=extra, after=self._saver(library) if stream else None,
                               client=client)
        log_summary(outcomes, summary)
        if not stream:
            return None
        return self._saved_result(paths, library_class or SavedLibrary)

    def _streams_outputs(self, data):
        """True for a standalone run on an association that saves its results."""
        return (self.parent is None and bool(self.save_results)
                and (isinstance(data, Mapping)
                     or isinstance(data, (str, os.PathLike))
                     and os.fspath(data).lower().endswith(".json")))

    def _saver(self, library):
        """A picklable ``after(model, index)`` that saves each output when done.

        Output names are those stpipe gives (``make_output_path`` of each
        member's file name), fixed before anything runs, so the saving can
        happen in worker threads or dask tasks.
        """
        paths = []
        for k in range(len(library)):
            member = member_file(library, k)
            if member is None:
                raise RuntimeError(f"association member {k} has no file")  # pragma: no cover
            paths.append(self.make_output_path(basepath=os.path.basename(member)))
        return SaveAs(paths)

    def _saved_result(self, paths, library_class=SavedLibrary):
        """The library over outputs saved by `_saver` (stpipe saves nothing more)."""
        self.save_results = False  # every output is written already
        return library_class(outputs_association(paths))

    # ------------------------------------------------------------------
    def _prepare(self, data, standalone, stream_dir=None):
        """Return (output container, model library over its models).

        With ``stream_dir`` (a temporary folder), an association is read into
        an on-disk library that keeps no model in memory.
        """
        on_disk = not self.in_memory or stream_dir is not None
        kw = {"temp_directory": stream_dir} if stream_dir is not None else {}
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
                lib = WiiMatchLibrary(path, on_disk=on_disk, **kw)
                lib.check_members_exist()
                return lib, lib
            model = _open_model(path, path)
            return model, WiiMatchLibrary([model])
        if isinstance(data, Mapping):
            asn = check_association(copy.deepcopy(dict(data)), name="association dict")
            lib = WiiMatchLibrary(asn, on_disk=on_disk, **kw)
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
                    models.append(_open_model(os.fspath(item), f"input {k} ({item})"))
                elif isinstance(item, AbstractDataModel):
                    models.append(item.copy() if standalone else item)
                else:
                    raise TypeError(
                        f"input list item {k} is a {type(item).__name__}; give "
                        "datamodels or file names"
                    )
            out = models if isinstance(data, list) else tuple(models)
            return out, WiiMatchLibrary(list(models))
        raise TypeError(
            f"cannot use a {type(data).__name__} as input: give an association "
            "file name or dict, a list of models or file names, a ModelContainer "
            "or a model library"
        )


def _is_model_container(obj):
    # jwst's ModelContainer, without importing jwst
    return (isinstance(obj, Sequence) and not isinstance(obj, (str, list, tuple))
            and type(obj).__name__ == "ModelContainer")


def library_copies(lib):
    """Copies of the models of a model library, in order (the library is unchanged)."""
    return list(lib.map_function(lambda model, index: model.copy(), modify=False))


def _copy_library(lib):
    """New library of the same class holding copies of the models."""
    return type(lib)(library_copies(lib))


def _open_model(path, what):
    from stdatamodels.jwst import datamodels

    try:
        return datamodels.open(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{what}: cannot open {path!r} as a datamodel ({exc})") from None


class SaveAs:
    """``after(model, index)`` for `apply_outcomes`: save model ``index`` to ``paths[index]``."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __call__(self, model, index):
        path = self.paths[index]
        model.save(path)
        log.info("Saved model in %s", path)
        return path


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
    log.info("wiimatch: polynomial degree %s in %s, refpoint %s",
             list(summary.degree), summary.frame, [round(v, 8) for v in summary.refpoint])
    head = (f"{'model':<52s} {'npix':>10s} {'bkg@ref':>13s} {'rms before':>12s} "
            f"{'rms after':>12s}  status")
    lines = [head, "-" * len(head)]
    for o in outcomes:
        b = float(o.coefficients[0]) if o.matched else np.nan
        lines.append(f"{o.name[:52]:<52s} {o.npix:>10d} {b:>13.6g} {o.rms_before:>12.5g} "
                     f"{o.rms:>12.5g}  {o.status}")
    log.info("wiimatch summary:\n%s", "\n".join(lines))
