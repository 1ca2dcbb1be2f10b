"""`WiiMatchStep`: background matching of resampled JWST models as an stpipe step.

Run it as ``strun wiimatch asn.json``, as ``WiiMatchStep.call(...)``, or as
a post-hook of jwst's ``resample`` step
(``post_hooks: [jwst_wiimatch.step.WiiMatchStep]``). See ``docs/step.rst``.
"""

import copy
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
from stpipe import Step
from stpipe.config_parser import ConfigObj
from stpipe.datamodel import AbstractDataModel
from stpipe.library import AbstractModelLibrary

from .core.inputs import check_solver
from .matching import apply_outcomes, default_threads, match_models
from .models import WiiMatchLibrary, check_association

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
    binning = integer(min=1, default=1)  # match on averages of binning x binning blocks of the grid (1: every pixel); 4 or 8 keep smooth backgrounds at the noise floor with 16-64x less memory and work
    maximum_cores = string(default='all')  # worker threads for reading, matching and subtracting: 'all', 'half', 'quarter', 'none' (one) or a number
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
        output, library = self._prepare(input_data, standalone)
        if len(library) == 0:
            raise ValueError(
                "input holds no models: give an association with at least two "
                "members (or a list of two or more models)"
            )
        outcomes, summary = match_models(
            library, kind="grid", degree=self.degree, refpoint=self.refpoint,
            solver=solver, dqbits=self.dqbits, binning=self.binning, threads=threads)
        apply_outcomes(library, outcomes, summary, subtract=bool(self.subtract),
                       solver=solver, dqbits=self.dqbits, threads=threads)
        log_summary(outcomes, summary)
        return output

    # ------------------------------------------------------------------
    def _prepare(self, data, standalone):
        """Return (output container, model library over its models)."""
        on_disk = not self.in_memory
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
                lib = WiiMatchLibrary(path, on_disk=on_disk)
                lib.check_members_exist()
                return lib, lib
            model = _open_model(path, path)
            return model, WiiMatchLibrary([model])
        if isinstance(data, Mapping):
            asn = check_association(copy.deepcopy(dict(data)), name="association dict")
            lib = WiiMatchLibrary(asn, on_disk=on_disk)
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
    models = []
    with lib:
        for k in range(len(lib)):
            m = lib.borrow(k)
            models.append(m.copy())
            lib.shelve(m, k, modify=False)
    return models


def _copy_library(lib):
    """New library of the same class holding copies of the models."""
    return type(lib)(library_copies(lib))


def _open_model(path, what):
    from stdatamodels.jwst import datamodels

    try:
        return datamodels.open(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{what}: cannot open {path!r} as a datamodel ({exc})") from None


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
