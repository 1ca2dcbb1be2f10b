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
from pathlib import Path

import numpy as np
from stpipe import Step
from stpipe.config_parser import ConfigObj
from stpipe.datamodel import AbstractDataModel
from stpipe.library import AbstractModelLibrary

from . import adapters
from .core.inputs import check_degree, check_solver
from .library import WiiMatchLibrary, check_association

__all__ = ["WiiMatchStep"]

log = logging.getLogger("jwst_wiimatch")

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
        dqflags = adapters.interpret_dqbits(self.dqbits)
        standalone = self.parent is None
        output, access = self._prepare(input_data, standalone)
        n = len(access)
        if n == 0:
            raise ValueError(
                "input holds no models: give an association with at least two "
                "members (or a list of two or more models)"
            )
        _Matcher(self, access, solver, dqflags).run()
        return output

    # ------------------------------------------------------------------
    def _prepare(self, data, standalone):
        """Return (output container, accessor over its models)."""
        on_disk = not self.in_memory
        if isinstance(data, AbstractModelLibrary):
            lib = data
            if standalone and not getattr(lib, "_on_disk", False):
                lib = _copy_library(lib)
            return lib, _LibraryAccess(lib)
        if isinstance(data, (str, os.PathLike)):
            path = os.fspath(data)
            if path.lower().endswith(".json"):
                if not os.path.isfile(path):
                    raise ValueError(f"association file {path!r} does not exist")
                lib = WiiMatchLibrary(path, on_disk=on_disk)
                lib.check_members_exist()
                return lib, _LibraryAccess(lib)
            model = _open_model(path, path)
            return model, _ListAccess([model])
        if isinstance(data, Mapping):
            asn = check_association(copy.deepcopy(dict(data)), name="association dict")
            lib = WiiMatchLibrary(asn, on_disk=on_disk)
            lib.check_members_exist()
            return lib, _LibraryAccess(lib)
        if isinstance(data, AbstractDataModel) and not isinstance(data, Sequence):
            model = data.copy() if standalone else data
            return model, _ListAccess([model])
        if _is_model_container(data):
            container = data.copy() if standalone else data
            return container, _ListAccess(container)
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
            return out, _ListAccess(models)
        raise TypeError(
            f"cannot use a {type(data).__name__} as input: give an association "
            "file name or dict, a list of models or file names, a ModelContainer "
            "or a model library"
        )


# ----------------------------------------------------------------------
# model access: lists and libraries behind one interface
# ----------------------------------------------------------------------
class _ListAccess:
    def __init__(self, models):
        self.models = models

    def __len__(self):
        return len(self.models)

    @contextlib.contextmanager
    def session(self):
        yield

    @contextlib.contextmanager
    def borrow(self, index, modify):
        yield self.models[index]


class _LibraryAccess:
    def __init__(self, lib):
        self.lib = lib

    def __len__(self):
        return len(self.lib)

    @contextlib.contextmanager
    def session(self):
        with self.lib:
            yield

    @contextlib.contextmanager
    def borrow(self, index, modify):
        model = self.lib.borrow(index)
        try:
            yield model
        finally:
            self.lib.shelve(model, index, modify=modify)


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


def _parse_degree(degree, ndim):
    """Degree per axis (x, y[, z]) from an int, a list, or command-line text."""
    value = degree
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        value = ",".join(str(v) for v in value)
    if isinstance(value, str):
        parts = [p for p in value.strip().strip("[]()").replace(",", " ").split() if p]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = None
        if not nums:
            raise ValueError(
                f"degree={degree!r} is not an integer or a list of integers; give "
                "e.g. degree=1 or degree=[1, 1] (one per axis: xi, eta[, wavelength])"
            )
        value = nums if len(nums) > 1 else nums[0]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_degree(value, ndim)


def _model_name(model, index):
    name = None
    try:
        name = model.meta.filename
    except AttributeError:
        pass
    return f"model {index} ({name})" if name else f"model {index}"


# ----------------------------------------------------------------------
# the work
# ----------------------------------------------------------------------
class _Matcher:
    """One run: read models, call the engine, write results back."""

    def __init__(self, step, access, solver, dqflags):
        self.step = step
        self.access = access
        self.solver = solver
        self.dqflags = dqflags
        self.in_memory = bool(step.in_memory)
        self.subtract = bool(step.subtract)
        self.n = len(access)

    def _progress(self, what, k):
        n = self.n
        if n >= 10 and (k + 1) % max(1, n // 10) == 0:
            log.info("wiimatch: %s %d/%d models", what, k + 1, n)

    def run(self):
        n = self.n
        names = [f"model {k}" for k in range(n)]
        with contextlib.ExitStack() as stack:
            tmpdir = None
            if not self.in_memory:
                tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="wiimatch_"))
            images, masks, sigmas = [None] * n, [None] * n, [None] * n
            npix_valid = np.zeros(n, dtype=np.int64)
            levels = np.zeros(n)
            skip = {}
            grid = None
            has_err = []
            # pass 1: read, check, build mask / sigma / data (one model at a time)
            with self.access.session():
                for k in range(n):
                    with self.access.borrow(k, modify=False) as model:
                        names[k] = _model_name(model, k)
                        if grid is None:
                            grid = adapters.GridChecker(model, names[k])
                            ndim = len(grid.shape)
                            degree = _parse_degree(self.step.degree, ndim)
                            refpoint = adapters.check_refpoint(self.step.refpoint, ndim)
                            if refpoint is None:
                                refpoint = adapters.default_refpoint(model)
                            elif ndim == 3 and len(refpoint) == 2:
                                refpoint = refpoint + [adapters.default_refpoint(model)[2]]
                            coords = adapters.frame_coordinates(model, refpoint)
                            coord_ok = np.ones(grid.shape, dtype=bool)
                            for c in coords:
                                coord_ok &= np.isfinite(c)
                        else:
                            grid.check(model, names[k])
                        sigma = adapters.model_sigma(model)
                        has_err.append(sigma is not None)
                        mask = adapters.valid_mask(model, self.dqflags, sigma=sigma)
                        mask &= coord_ok
                        levels[k] = adapters.pending_level(model)
                        data = np.asarray(model.data)
                        if levels[k] != 0.0:
                            data = data.astype(np.float64) - levels[k]
                        npix_valid[k] = int(np.count_nonzero(mask))
                        images[k], masks[k], sigmas[k] = self._keep(
                            tmpdir, k, data, mask, sigma)
                        del model, data, mask, sigma
                    self._progress("read", k)

            frame = adapters.FRAME_CUBE if ndim == 3 else adapters.FRAME
            if not coord_ok.all():
                coords = tuple(np.where(coord_ok, c, 0.0) for c in coords)
            coords = self._keep_coords(tmpdir, coords)

            if not all(has_err):
                missing = [names[k] for k in range(n) if not has_err[k]]
                log.warning(
                    "no usable ERR array in %s: all pixels of all models get equal "
                    "weight", ", ".join(missing))
                sigmas = None

            for k in range(n):
                if npix_valid[k] == 0:
                    skip[k] = "no valid pixels (data/ERR/DQ/weight)"
            usable = [k for k in range(n) if k not in skip]
            result = None
            if len(usable) < 2:
                reason = (f"fewer than two models with valid pixels ({len(usable)} of {n})")
                for k in usable:
                    skip[k] = reason
            else:
                result = self._solve(usable, images, masks, sigmas, coord_ok,
                                     coords, degree)
                for j, k in enumerate(usable):
                    if result.npix[j] == 0:
                        skip[k] = "no overlap with any other model"
                    elif not np.all(np.isfinite(result.coef[j])):
                        skip[k] = "the solver gave no finite coefficients"
                self._log_diagnostics(result, usable, names, skip)
                if len([k for k in usable if k not in skip]) < 1:
                    result = None
            del images, masks, sigmas

            # pass 2: write results back (one model at a time)
            rows = []
            index_in_result = {k: j for j, k in enumerate(usable)} if result else {}
            with self.access.session():
                for k in range(n):
                    with self.access.borrow(k, modify=True) as model:
                        if k in skip:
                            adapters.record_skipped(model, skip[k], frame=frame,
                                                    npix=int(npix_valid[k]))
                            log.warning("%s SKIPPED: %s", names[k], skip[k])
                            rows.append((names[k], int(npix_valid[k]), np.nan, np.nan,
                                         np.nan, "SKIPPED"))
                            continue
                        j = index_in_result[k]
                        coef = np.asarray(result.coef[j], dtype=np.float64)
                        undetermined = [t[1] for t in result.undetermined if t[0] == j]
                        adapters.record_result(
                            model, degree=degree, refpoint=refpoint, coefficients=coef,
                            subtract=self.subtract, frame=frame,
                            npix=int(result.npix[j]), rms=float(result.rms[j]),
                            rms_before=float(result.rms_before[j]),
                            level=levels[k],
                            solver=self.solver, dqbits=self.step.dqbits,
                            undetermined=undetermined,
                        )
                        if self.subtract:
                            bkg = adapters.evaluate_background(
                                model, {"degree": degree, "refpoint": refpoint,
                                        "coefficients": coef},
                                coords=coords)
                            bkg = np.where(coord_ok, bkg, np.nan)
                            adapters.subtract_background(model, bkg, level=levels[k])
                            del bkg
                        rows.append((names[k], int(result.npix[j]), float(coef[0]),
                                     float(result.rms_before[j]), float(result.rms[j]),
                                     "COMPLETE"))
                        del model
                    self._progress("updated", k)
        self._log_summary(rows, degree, refpoint, frame)

    # --------------------------------------------------------------
    def _keep(self, tmpdir, k, data, mask, sigma):
        """Keep arrays in memory, or in memory-mapped temporary files."""
        if tmpdir is None:
            return (np.asarray(data), mask,
                    None if sigma is None else np.asarray(sigma))
        out = []
        for name, arr in (("data", data), ("mask", mask), ("sigma", sigma)):
            if arr is None:
                out.append(None)
                continue
            path = Path(tmpdir) / f"{name}_{k}.npy"
            np.save(path, np.asarray(arr))
            out.append(np.load(path, mmap_mode="r"))
        return tuple(out)

    def _keep_coords(self, tmpdir, coords):
        if tmpdir is None:
            return coords
        out = []
        for a, c in enumerate(coords):
            path = Path(tmpdir) / f"coord_{a}.npy"
            np.save(path, c)
            out.append(np.load(path, mmap_mode="r"))
        return tuple(out)

    def _solve(self, usable, images, masks, sigmas, coord_ok, coords, degree):
        from .core import match_backgrounds

        shape = coord_ok.shape
        flat = [np.asarray(c).reshape(-1) for c in coords]

        def image2world(*pix):
            # pixel indices (x, y[, z]) -> frame coordinates, by table look-up
            idx = tuple(np.rint(np.asarray(p)).astype(np.intp) for p in pix[::-1])
            lin = np.ravel_multi_index(idx, shape)
            return tuple(f[lin] for f in flat)

        imgs = [images[k] for k in usable]
        msks = [masks[k] for k in usable]
        sigs = None if sigmas is None else [sigmas[k] for k in usable]
        log.info("wiimatch: matching %d models, degree %s, solver %s",
                 len(usable), list(degree), self.solver)
        return match_backgrounds(
            imgs, masks=msks, sigmas=sigs, degree=degree,
            center=(0.0,) * len(degree), image2world=image2world,
            center_cs="world", solver=self.solver,
        )

    def _log_diagnostics(self, result, usable, names, skip):
        groups = [[usable[j] for j in comp] for comp in result.components
                  if not all(usable[j] in skip for j in comp)]
        if len(groups) > 1:
            log.warning(
                "wiimatch: the models form %d groups that do not overlap each "
                "other; backgrounds are matched within each group only: %s",
                len(groups),
                "; ".join("[" + ", ".join(names[k] for k in g) + "]" for g in groups))
        for j, expo in result.undetermined:
            k = usable[j]
            if k not in skip:
                log.warning("wiimatch: %s: the data do not determine the term with "
                            "exponents %s (set to a minimum-norm value)",
                            names[k], tuple(int(e) for e in expo))

    def _log_summary(self, rows, degree, refpoint, frame):
        log.info("wiimatch: polynomial degree %s in %s, refpoint %s",
                 list(degree), frame, [round(v, 8) for v in refpoint])
        head = f"{'model':<52s} {'npix':>10s} {'bkg@ref':>13s} {'rms before':>12s} {'rms after':>12s}  status"
        lines = [head, "-" * len(head)]
        for name, npix, b, r0, r1, status in rows:
            lines.append(f"{name[:52]:<52s} {npix:>10d} {b:>13.6g} {r0:>12.5g} {r1:>12.5g}  {status}")
        log.info("wiimatch summary:\n%s", "\n".join(lines))
