"""calwebb_image3 integration: wiimatch in the slot of jwst's ``skymatch``.

This module needs the jwst package (``pip install "jwst-wiimatch[jwst]"``).

`WiiMatchSkyStep`
    A `~jwst_wiimatch.step.WiiMatchStep` that takes the calibrated exposures
    themselves (each on its own detector grid), as ``skymatch`` does. It
    averages each exposure over blocks of detector pixels, places the blocks
    on one grid in the tangent plane (WCS evaluated at the block centres
    only), matches the backgrounds there (one polynomial per exposure
    group), and then evaluates each exposure's polynomial, a function of sky
    position, on that exposure's own pixels through its own WCS, records it
    in the exposure's metadata and (by default) subtracts it, so that the
    final ``i2d`` is background matched.
`WiiMatchImage3Pipeline` (``strun calwebb_image3_wiimatch``)
    jwst's ``Image3Pipeline`` with `WiiMatchSkyStep` in the ``skymatch``
    slot. Its parameters are set like those of any pipeline step:
    ``--steps.skymatch.degree=2`` or a ``steps`` entry named ``skymatch`` in
    a pipeline configuration file (see ``jwst_wiimatch/configs``).

See ``docs/pipeline.rst``.
"""

import contextlib
import logging
import os
import textwrap
from collections.abc import Mapping, Sequence

from jwst.datamodels import ModelLibrary
from jwst.pipeline import Image3Pipeline
from stpipe.datamodel import AbstractDataModel

from .core.inputs import check_solver
from .matching import map_models
from .models import records
from .models.library import NamedMembers, SavedOutputs
from .step import WiiMatchStep, new_library, parse_cores

__all__ = ["WiiMatchSkyStep", "WiiMatchImage3Pipeline"]

log = logging.getLogger(__name__)

#: How the matching grid is described in ``meta.wiimatch['matched_on']``.
MATCHED_ON = ("exposures averaged over blocks of detector pixels, on a grid in the "
              "tangent plane about refpoint")


class WiiMatchSkyStep(WiiMatchStep):
    """Match the backgrounds of calibrated exposures, in skymatch's place.

    The input is what ``skymatch`` receives in ``calwebb_image3``: a
    ``ModelLibrary`` of calibrated exposures (or an association, or a list of
    ``cal`` models / files when run on its own). Each exposure is reduced to
    averages of ``binning x binning`` blocks of its detector pixels (inverse
    variance weighted, DQ applied) before any WCS work; the WCS is evaluated
    at the block centres only, which are laid on a grid in the background
    frame (the tangent plane about the reference point). The members of an
    exposure group (the detectors of one exposure) share one polynomial.
    Each exposure's polynomial is then evaluated on its own pixels (from a
    lattice of WCS evaluations), recorded, and subtracted when ``subtract``
    is True (the default here).
    """

    class_alias = "wiimatch_sky"

    spec = textwrap.dedent(WiiMatchStep.spec).replace(
        "subtract = boolean(default=False)  # subtract each model's polynomial from its data",
        "subtract = boolean(default=True)  # subtract each exposure's polynomial from its data "
        "(needed for a matched i2d)",
    ).replace(
        "match_down = boolean(default=None)  # level of the matched backgrounds (jwst "
        "skymatch's parameter and meaning): True:",
        "match_down = boolean(default=True)  # level of the matched backgrounds (jwst "
        "skymatch's parameter and meaning): True (default here, as in skymatch):",
    ).replace("; None (default here): zero sum", "; None: zero sum",
    ).replace(
        "binning = integer(min=1, default=4)  # match on averages of binning x binning blocks "
        "of the grid (1: every pixel; reduced for grids under 64*binning pixels a side): "
        "smooth backgrounds stay at the noise floor with 16x less memory",
        "binning = integer(min=1, default=4)  # match on averages of binning x binning blocks "
        "of detector pixels, placed on a sky grid of cells binning input pixels wide",
    )

    # Image3Pipeline reads skymatch.skymethod for single-exposure input
    skymethod = "wiimatch"

    @staticmethod
    def get_stpipe_loggers():
        """Loggers stpipe configures: wiimatch's and jwst's."""
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
        solver = check_solver(self.solver)
        threads = parse_cores(self.maximum_cores)
        # on disk when this step or its pipeline says so (--in_memory=false)
        in_memory = bool(self.in_memory) and bool(getattr(self.parent, "in_memory", True))
        stream = self._streams_outputs(input_data)
        on_disk = stream or not in_memory
        with contextlib.ExitStack() as stack:
            scratch = self._scratch_folder(stack, on_disk, keep=not stream)
            library = self._as_library(input_data, scratch)
            if self.group_exposures:  # the detectors of one exposure share a polynomial
                groups = [list(idx) for idx in library.group_indices.values()]
            else:  # each detector on its own (jwst issue 9063)
                groups = [[k] for k in range(len(library))]
            outputs = self._plan_outputs(library, stack, stream)
            if len(groups) < 2:
                reason = (f"needs at least two exposures to match, got {len(groups)} "
                          "exposure group(s)")
                log.warning("wiimatch: %s; nothing done", reason)
                map_models(library,
                           lambda m, k: records.record_skipped(m, reason, cal_step="skymatch"),
                           modify=True, threads=1)
                saved = self._save_outputs(library, outputs, staged=False, threads=1,
                                           library_class=_SavedModelLibrary)
                return saved if stream else library
            log.info("wiimatch: %d exposures in %d exposure groups%s", len(library),
                     len(groups),
                     " (library kept on disk)" if getattr(library, "_on_disk", False) else "")
            saved = self._match_and_apply(library, stack, stream, solver, threads,
                                          kind="sky", groups=groups,
                                          extra={"matched_on": MATCHED_ON},
                                          library_class=_SavedModelLibrary, outputs=outputs,
                                          cal_step="skymatch", level_for_resample=True)
        return saved if stream else library

    # ------------------------------------------------------------------
    def _as_library(self, data, scratch=None):
        if isinstance(data, ModelLibrary):
            if self.parent is None and not getattr(data, "_on_disk", False):
                # standalone: never change the caller's models
                copies = map_models(data, lambda model, k: model.copy(), modify=False,
                                    threads=1)
                return ModelLibrary(copies, on_disk=False)
            return data
        if isinstance(data, (str, os.PathLike)):
            return new_library(_NamedModelLibrary, os.fspath(data), scratch)
        if isinstance(data, Mapping):
            return new_library(_NamedModelLibrary, dict(data), scratch)
        if isinstance(data, Sequence) and not isinstance(data, str):
            items = []
            for item in data:
                if isinstance(item, AbstractDataModel) and self.parent is None:
                    item = item.copy()
                items.append(item)
            return new_library(_NamedModelLibrary, items, scratch)
        raise TypeError(
            f"cannot use a {type(data).__name__} as input: give a ModelLibrary, an "
            "association file name or dict, or a list of cal models or file names"
        )



class _SavedModelLibrary(SavedOutputs, ModelLibrary):
    """jwst's ModelLibrary over outputs saved as they were produced."""


class _NamedModelLibrary(NamedMembers, ModelLibrary):
    """jwst's ModelLibrary; a member file that cannot be read is named in the error."""


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
