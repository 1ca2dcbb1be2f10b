"""calwebb_image3 integration: wiimatch in the slot of jwst's ``skymatch``.

This module needs the jwst package (``pip install "jwst-wiimatch[jwst]"``).

`WiiMatchSkyStep`
    A `~jwst_wiimatch.step.WiiMatchStep` that takes the calibrated exposures
    themselves (each on its own detector grid), as ``skymatch`` does. It
    resamples them onto one common grid with jwst's resample in single mode
    (one image per exposure group), matches the backgrounds there, and then
    evaluates each exposure's polynomial, a function of sky position, on that
    exposure's own pixels through its own WCS, records it in the exposure's
    metadata and (by default) subtracts it, so that the final ``i2d`` is
    background matched.
`WiiMatchImage3Pipeline` (``strun calwebb_image3_wiimatch``)
    jwst's ``Image3Pipeline`` with `WiiMatchSkyStep` in the ``skymatch``
    slot. Its parameters are set like those of any pipeline step:
    ``--steps.skymatch.degree=2`` or a ``steps`` entry named ``skymatch`` in
    a pipeline configuration file (see ``jwst_wiimatch/configs``).

See ``docs/pipeline.rst``.
"""

import contextlib
import json
import logging
import os
import tempfile
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from jwst.datamodels import ModelLibrary
from jwst.pipeline import Image3Pipeline
from jwst.resample.resample import ResampleImage
from jwst.resample.resample_step import GOOD_BITS
from stpipe.datamodel import AbstractDataModel

from . import adapters
from .core.inputs import check_solver
from .step import WiiMatchStep, library_copies

__all__ = ["WiiMatchSkyStep", "WiiMatchImage3Pipeline"]

log = logging.getLogger("jwst_wiimatch")

#: How the common grid is described in ``meta.wiimatch['matched_on']``.
MATCHED_ON = "exposures resampled onto one grid (jwst resample, single mode)"


class WiiMatchSkyStep(WiiMatchStep):
    """Match the backgrounds of calibrated exposures, in skymatch's place.

    The input is what ``skymatch`` receives in ``calwebb_image3``: a
    ``ModelLibrary`` of calibrated exposures (or an association, or a list of
    ``cal`` models / files when run on its own). The exposure groups of the
    library (the detectors of one exposure) are resampled together onto one
    common grid with jwst's ``ResampleImage`` (as ``resample`` does with
    ``single=True``); `WiiMatchStep` matches those images; each exposure's
    polynomial is then evaluated on every member of its group through the
    member's own WCS, recorded there, and subtracted when ``subtract`` is
    True (the default here).
    """

    class_alias = "wiimatch_sky"

    spec = textwrap.dedent(WiiMatchStep.spec).replace(
        "subtract = boolean(default=False)  # subtract each model's polynomial from its data",
        "subtract = boolean(default=True)  # subtract each exposure's polynomial from its data "
        "(needed for a matched i2d)",
    ) + textwrap.dedent("""
    pixel_scale_ratio = float(default=1.0)  # pixel scale of the internal common grid relative to the input pixels (>1: coarser, faster)
    pixfrac = float(min=0.0, max=1.0, default=1.0)  # drizzle pixfrac of the internal resampling
    kernel = option('square','gaussian','point','turbo','lanczos2','lanczos3',default='square')  # drizzle kernel of the internal resampling
    """)  # noqa: E501

    # Image3Pipeline reads skymatch.skymethod for single-exposure input
    skymethod = "wiimatch"

    @staticmethod
    def get_stpipe_loggers():
        """Loggers stpipe configures: wiimatch's and jwst's (for resample)."""
        return (*WiiMatchStep.get_stpipe_loggers(), "jwst", "stcal")

    def process(self, input_data):
        """Match, record and subtract the backgrounds of calibrated exposures.

        Parameters
        ----------
        input_data : ModelLibrary, str, dict or list
            A jwst ``ModelLibrary`` (as in ``calwebb_image3``), an association
            file name or dict, or a list of ``cal`` models or file names.

        Returns
        -------
        ModelLibrary
            The exposures, with ``meta.background.polynomial_info``,
            ``meta.background.method = 'wiimatch'``,
            ``meta.background.subtracted`` and ``meta.cal_step.wiimatch``.
        """
        check_solver(self.solver)
        adapters.interpret_dqbits(self.dqbits)
        # on disk when this step or its pipeline says so (--in_memory=false)
        in_memory = bool(self.in_memory) and bool(getattr(self.parent, "in_memory", True))
        library = self._as_library(input_data, in_memory)
        groups = [list(idx) for idx in library.group_indices.values()]
        if len(groups) < 2:
            reason = (f"needs at least two exposures to match, got {len(groups)} "
                      "exposure group(s)")
            log.warning("wiimatch: %s; nothing done", reason)
            self._mark_all_skipped(library, reason)
            return library

        with contextlib.ExitStack() as stack:
            tmpdir = None
            if not in_memory:
                tmpdir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="wiimatch_sky_"))
            singles = self._resample_singles(library, groups, tmpdir)
            matcher = WiiMatchStep(
                name="wiimatch_on_common_grid", parent=self,
                degree=self.degree, refpoint=self.refpoint, solver=self.solver,
                dqbits=self.dqbits, subtract=False, in_memory=in_memory,
            )
            # parent is set: the step updates the singles library in place
            matcher.process(singles)
            results = self._collect(singles)
            del singles
        self._apply(library, groups, results)
        return library

    # ------------------------------------------------------------------
    def _as_library(self, data, in_memory):
        on_disk = not in_memory
        if isinstance(data, ModelLibrary):
            if self.parent is None and not getattr(data, "_on_disk", False):
                # standalone: never change the caller's models
                return ModelLibrary(library_copies(data), on_disk=False)
            return data
        if isinstance(data, (str, os.PathLike)):
            return ModelLibrary(os.fspath(data), on_disk=on_disk)
        if isinstance(data, Mapping):
            return ModelLibrary(dict(data), on_disk=on_disk)
        if isinstance(data, Sequence) and not isinstance(data, str):
            items = []
            for item in data:
                if isinstance(item, AbstractDataModel) and self.parent is None:
                    item = item.copy()
                items.append(item)
            return ModelLibrary(items, on_disk=on_disk)
        raise TypeError(
            f"cannot use a {type(data).__name__} as input: give a ModelLibrary, an "
            "association file name or dict, or a list of cal models or file names"
        )

    def _resample_singles(self, library, groups, tmpdir):
        """One image per exposure group on one common grid (jwst's resample)."""
        resampler = ResampleImage(
            library, output=None, enable_var=False, compute_err="driz_err",
            pixfrac=self.pixfrac, kernel=self.kernel, fillval="NAN",
            weight_type="ivm", good_bits=GOOD_BITS, blendheaders=False,
            wcs_pars={"pixel_scale_ratio": self.pixel_scale_ratio},
        )
        log.info("wiimatch: resampling %d exposure groups onto one %s grid",
                 len(groups), "x".join(str(n) for n in resampler.output_array_shape))
        models = []
        for k, indices in enumerate(groups):
            single = resampler.resample_group(indices).copy()
            # jwst names it after the group's first exposure
            single.meta.filename = f"{k}_{single.meta.filename}"
            if tmpdir is not None:
                path = os.path.join(tmpdir, single.meta.filename)
                single.save(path)
                single.close()
                single = path
            models.append(single)
        del resampler
        if tmpdir is not None:
            log.info("wiimatch: common-grid images kept on disk in %s", tmpdir)
            return _disk_library(models, tmpdir)
        return ModelLibrary(models, on_disk=False)

    @staticmethod
    def _collect(singles):
        """Per single: (polynomial entry or None, its meta.wiimatch dict)."""
        out = []
        with singles:
            for k in range(len(singles)):
                model = singles.borrow(k)
                info = dict(model.meta.wiimatch.instance)
                entry = None
                if info.get("status") == "COMPLETE":
                    entry = adapters.latest_entry(model)
                    entry = {key: entry[key] for key in ("degree", "refpoint",
                                                         "coefficients")}
                out.append((entry, info))
                singles.shelve(model, k, modify=False)
                del model
        return out

    def _apply(self, library, groups, results):
        """Record (and subtract) each group's polynomial on its own exposures."""
        subtract = bool(self.subtract)
        with library:
            for (entry, info), indices in zip(results, groups):
                for index in indices:
                    model = library.borrow(index)
                    if entry is None:
                        adapters.record_skipped(
                            model, info.get("reason", "not matched"),
                            frame=info.get("frame"), npix=info.get("npix", 0))
                        log.warning("wiimatch: %s SKIPPED: %s", model.meta.filename,
                                    info.get("reason"))
                    else:
                        level = adapters.pending_level(model)
                        adapters.record_result(
                            model, degree=entry["degree"], refpoint=entry["refpoint"],
                            coefficients=np.asarray(entry["coefficients"]),
                            subtract=subtract, frame=info["frame"],
                            npix=info["npix"], rms=_num(info.get("rms")),
                            rms_before=_num(info.get("rms_before")), level=level,
                            solver=info["solver"], dqbits=info["dqbits"],
                            undetermined=info.get("undetermined_terms", ()),
                        )
                        model.meta.wiimatch = {**model.meta.wiimatch.instance,
                                               "matched_on": MATCHED_ON}
                        if subtract:
                            # the polynomial is a function of sky position:
                            # evaluate it on this exposure's own pixels
                            bkg = adapters.evaluate_background(model, entry)
                            adapters.subtract_background(model, bkg, level=level)
                            del bkg
                        log.info("wiimatch: %s: background polynomial (%g at refpoint) "
                                 "%s", model.meta.filename, entry["coefficients"][0],
                                 "subtracted" if subtract else "recorded")
                    library.shelve(model, index, modify=True)
                    del model

    def _mark_all_skipped(self, library, reason):
        with library:
            for index in range(len(library)):
                model = library.borrow(index)
                adapters.record_skipped(model, reason)
                library.shelve(model, index, modify=True)
                del model


def _num(value):
    return np.nan if value is None else float(value)


def _disk_library(paths, tmpdir):
    """An on-disk library over saved files (read one at a time)."""
    members = [{"expname": os.path.basename(p), "exptype": "science"} for p in paths]
    asn = {"asn_id": "wiimatch", "asn_pool": "wiimatch",
           "products": [{"name": "wiimatch_singles", "members": members}]}
    path = os.path.join(tmpdir, "wiimatch_singles_asn.json")
    with open(path, "w") as fh:
        json.dump(asn, fh)
    return ModelLibrary(path, on_disk=True, temp_directory=tmpdir)


class WiiMatchImage3Pipeline(Image3Pipeline):
    """jwst's ``calwebb_image3`` with `WiiMatchSkyStep` in the skymatch slot.

    Every other step, and the way the pipeline calls them, is jwst's own.
    Set wiimatch's parameters as those of the ``skymatch`` step, e.g.
    ``strun calwebb_image3_wiimatch asn.json --steps.skymatch.degree=2``.
    """

    class_alias = "calwebb_image3_wiimatch"
    spec = Image3Pipeline.spec
    step_defs = {**Image3Pipeline.step_defs, "skymatch": WiiMatchSkyStep}

    @staticmethod
    def get_stpipe_loggers():
        """Loggers stpipe configures: jwst's, plus the wiimatch logger."""
        return (*Image3Pipeline.get_stpipe_loggers(), "jwst_wiimatch")
