"""Results in model metadata: recording, reading back, evaluating, subtracting.

A recorded background is an entry ``{degree, refpoint, coefficients,
channel}`` of ``meta.background.polynomial_info``: a polynomial in the
background frame of :mod:`jwst_wiimatch.models.frame`. ``meta.wiimatch``
holds the run's diagnostics and says which entry is the latest.
"""

import textwrap

import numpy as np

from ..core import polyval_nd
from ..core.poly import exponents
from .frame import _get_wcs, frame_function, grid_world, model_lattice, world_to_frame

__all__ = ["pending_level", "polynomial_coefficients", "evaluate_background",
           "latest_entry", "subtract_background", "subtract_polynomial", "record_result",
           "record_skipped", "record_subtracted_level", "polynomial_mean",
           "record_pending_level"]


def pending_level(model):
    """Scalar background level recorded but not yet subtracted (e.g. by skymatch).

    Returns ``meta.background.level`` when ``meta.background.subtracted`` is
    False and the level is set, else 0.0. wiimatch fits (and subtracts) its
    polynomials on ``data - pending_level(model)``.
    """
    bkg = model.meta.background
    level = getattr(bkg, "level", None)
    if bkg.subtracted is False and level is not None and np.isfinite(level):
        return float(level)
    return 0.0


def polynomial_coefficients(info):
    """Coefficient array of one ``polynomial_info`` entry.

    Returns
    -------
    numpy.ndarray
        Array of shape ``[d + 1 for d in info['degree']]`` usable by
        ``numpy.polynomial.polynomial.polyval2d`` / ``polyval3d``.
    """
    degree = [int(d) for d in _entry(info, "degree")]
    coef = np.asarray(_entry(info, "coefficients"), dtype=np.float64)
    shape = tuple(d + 1 for d in degree)
    if coef.size != int(np.prod(shape)):
        raise ValueError(
            f"polynomial entry has {coef.size} coefficients, degree {degree} "
            f"needs {int(np.prod(shape))}"
        )
    return coef.reshape(shape)


def _entry(info, key):
    if isinstance(info, dict):
        return info[key]
    return getattr(info, key)


def evaluate_background(model, info=None, coords=None):
    """Evaluate a recorded background polynomial on any model through its WCS.

    The polynomial is expressed in the background frame described in this
    module's documentation: gnomonic standard coordinates ``(xi, eta)`` in
    degrees about ``refpoint[:2]`` (plus ``dlam = wavelength - refpoint[2]``
    for cubes). This function recomputes those coordinates for every pixel
    of ``model`` from ``model.meta.wcs``, so the model need not be on the
    grid the polynomial was fitted on. For images the WCS is evaluated on a
    lattice of pixels and the coordinates are interpolated in between
    (bicubic splines, checked to 1e-8 of the coordinates' span, see
    :class:`jwst_wiimatch.models.frame.CoordinateLattice`).

    Parameters
    ----------
    model : DataModel
        Model with ``data`` and a gwcs ``meta.wcs`` (2-D or 3-D).
    info : dict, optional
        A ``meta.background.polynomial_info`` entry (``degree``,
        ``refpoint``, ``coefficients``), from this model or any other one.
        Default: the model's own latest wiimatch entry.
    coords : tuple of numpy.ndarray, optional
        Precomputed frame coordinates for ``info['refpoint']`` (internal use).

    Returns
    -------
    numpy.ndarray
        float64 background of ``model.data``'s shape (NaN where the WCS
        gives no sky position).

    Examples
    --------
    Evaluate the background fitted on exposure 1 on another image
    ``other`` (possibly with a different grid)::

        info = model1.meta.background.polynomial_info[-1].instance
        bkg = evaluate_background(other, info)
    """
    if info is None:
        info = latest_entry(model)
    coef = polynomial_coefficients(info)
    refpoint = [float(v) for v in _entry(info, "refpoint")]
    ndim = np.ndim(model.data)
    if coef.ndim != ndim:
        if coef.ndim == 2 and ndim == 3:
            # a 2-D sky polynomial evaluated on a cube: same in every plane
            coef = coef[..., None]
            if len(refpoint) == 2:
                refpoint = refpoint + [0.0]
        else:
            raise ValueError(
                f"polynomial has {coef.ndim} coordinates but the model is {ndim}-D"
            )
    if coords is None and ndim == 2:
        # a smooth frame: interpolate from a lattice of WCS evaluations
        lattice = model_lattice(model, refpoint)
        if lattice is not None:
            ny, nx = np.shape(model.data)
            coords = lattice.box(slice(0, ny), slice(0, nx))
    if coords is None:
        world = grid_world(model)
        if len(refpoint) < len(world):
            refpoint = refpoint + [0.0] * (len(world) - len(refpoint))
        coords = world_to_frame(world, refpoint)
    return polyval_nd(coef, *coords)


def latest_entry(model):
    """The model's latest wiimatch ``polynomial_info`` entry, as a dict.

    That is the entry ``meta.wiimatch['polynomial_index']`` points to, or the
    last entry when the model has no ``meta.wiimatch``.
    """
    entries = model.meta.background.polynomial_info
    idx = _wiimatch_meta(model).get("polynomial_index")
    if idx is None:
        if not entries:
            raise ValueError("model has no meta.background.polynomial_info entry")
        idx = len(entries) - 1
    entry = entries[idx]
    return entry.instance if hasattr(entry, "instance") else entry


def subtract_background(model, background, level=0.0):
    """Subtract ``level + background`` from ``model.data`` in place.

    NaN data stay NaN; pixels where the background is not finite are left
    unchanged. The result keeps the data's dtype; arithmetic is float64.

    Returns
    -------
    float
        Mean of ``background`` (without ``level``) over the finite data
        pixels it was subtracted from; NaN when there are none.
    """
    data = np.asarray(model.data)
    bkg = np.asarray(background, dtype=np.float64)
    good = np.isfinite(bkg)
    new = data.astype(np.float64)
    new[good] -= bkg[good] + float(level)
    model.data = new.astype(data.dtype, copy=False)
    used = good & np.isfinite(data)
    return float(bkg[used].mean()) if used.any() else float("nan")


#: Rows of an image evaluated and subtracted at a time by `subtract_polynomial`.
SUBTRACT_ROWS = 256


def subtract_polynomial(model, info, level=0.0):
    """Subtract ``level`` plus a recorded polynomial from ``model.data``, in place.

    Same result as ``subtract_background(model, evaluate_background(model,
    info), level)``, but for images the polynomial is evaluated (from a
    lattice of WCS evaluations) only over the box of finite data and a band
    of rows at a time, so no full-grid temporary is made. Cubes, and images
    whose frame is not finite everywhere, go through `evaluate_background`.

    Returns
    -------
    float
        Mean of the polynomial (without ``level``) over the finite data
        pixels it was subtracted from (NaN when there are none): the constant
        background level this subtraction removed on average.
    """
    data = np.asarray(model.data)
    lattice = model_lattice(model, _entry(info, "refpoint")[:2]) if data.ndim == 2 else None
    coef = polynomial_coefficients(info)
    if lattice is None or coef.ndim != 2:
        return subtract_background(model, evaluate_background(model, info), level=level)
    fin_rows = np.flatnonzero(np.isfinite(data).any(axis=1))
    if fin_rows.size == 0:
        return float("nan")
    fin_cols = np.flatnonzero(np.isfinite(data[fin_rows[0]:fin_rows[-1] + 1]).any(axis=0))
    cols = slice(int(fin_cols[0]), int(fin_cols[-1]) + 1)
    out = data if data.flags.writeable else data.copy()
    total, count = 0.0, 0
    for r0 in range(int(fin_rows[0]), int(fin_rows[-1]) + 1, SUBTRACT_ROWS):
        rows = slice(r0, min(r0 + SUBTRACT_ROWS, int(fin_rows[-1]) + 1))
        bkg = polyval_nd(coef, *lattice.box(rows, cols))
        band = out[rows, cols].astype(np.float64)
        good = np.isfinite(bkg)
        used = good & np.isfinite(band)
        total += float(bkg[used].sum())
        count += int(used.sum())
        band[good] -= bkg[good] + float(level)
        out[rows, cols] = band
    if out is not data:
        model.data = out
    return total / count if count else float("nan")


def _channel(model):
    for attr in ("channel", "band"):
        try:
            val = getattr(model.meta.instrument, attr)
        except AttributeError:
            val = None
        if val:
            return str(val)
    return ""


def _wiimatch_meta(model):
    try:
        node = model.meta.wiimatch
    except AttributeError:
        return {}
    if node is None:
        return {}
    inst = node.instance if hasattr(node, "instance") else node
    return dict(inst) if isinstance(inst, dict) else {}


def _prune_unsubtracted(model):
    """Drop the previous wiimatch entry if it was not subtracted.

    An entry that was only recorded describes background still present in
    the data; a new run describes that background again, so the old entry is
    superseded. Entries already subtracted are history and are kept.
    Returns the list of indices of wiimatch entries already subtracted.
    """
    prev = _wiimatch_meta(model)
    subtracted = [int(i) for i in prev.get("subtracted_entries", [])]
    idx = prev.get("polynomial_index")
    entries = model.meta.background.polynomial_info
    if idx is not None and idx not in subtracted and 0 <= idx < len(entries):
        del entries[idx]
        subtracted = [i - 1 if i > idx else i for i in subtracted]
    return subtracted


def _set_background_flags(model, subtracted_now):
    bkg = model.meta.background
    before = bkg.subtracted
    bkg.subtracted = bool(before) or bool(subtracted_now)
    if bkg.level is None:
        # skymatch requires a level whenever 'subtracted' is set; 0 means
        # "no scalar level pending".
        bkg.level = 0.0
    bkg.method = "wiimatch"


def record_result(model, *, degree, refpoint, coefficients, subtract, frame,
                  npix, rms, rms_before, level, solver,
                  dqbits, undetermined=(), cal_step=None, terms="tensor"):
    """Write one model's result into its metadata (and nothing into its data).

    Appends ``{degree, refpoint, coefficients, channel}`` to
    ``meta.background.polynomial_info``, sets ``meta.background.method`` to
    ``'wiimatch'``, updates ``meta.background.subtracted`` /
    ``meta.background.level`` (see the step documentation for the rules
    shared with skymatch), sets ``meta.cal_step.wiimatch = 'COMPLETE'`` and
    writes ``meta.wiimatch`` (frame, reference point, degree and ``terms``,
    pixels used, residual RMS, index of the new entry, indices of entries
    already subtracted). The coefficients always have the tensor shape: with
    ``terms='total'`` those of total degree above ``max(degree)`` are 0.
    With ``cal_step`` (e.g. ``'skymatch'``), ``meta.cal_step.<cal_step>``
    is set to ``'COMPLETE'`` as well.
    """
    subtracted_entries = _prune_unsubtracted(model)
    entries = model.meta.background.polynomial_info
    entry = {
        "degree": [int(d) for d in degree],
        "refpoint": [float(v) for v in refpoint],
        "coefficients": [float(c) for c in np.ravel(coefficients)],
        "channel": _channel(model),
        # the field is shared with mrs_imatch, whose frame differs: say whose
        "method": "wiimatch",
        "frame": str(frame),
    }
    entries.append(entry)
    index = len(model.meta.background.polynomial_info) - 1
    if subtract:
        subtracted_entries.append(index)
    _set_background_flags(model, subtract)
    model.meta.cal_step.wiimatch = "COMPLETE"
    if cal_step:
        setattr(model.meta.cal_step, cal_step, "COMPLETE")
    model.meta.wiimatch = {
        "status": "COMPLETE",
        "frame": frame,
        "refpoint": [float(v) for v in refpoint],
        "degree": [int(d) for d in degree],
        "terms": str(terms),
        "polynomial_index": int(index),
        "subtracted": bool(subtract),
        "subtracted_entries": [int(i) for i in subtracted_entries],
        "pending_level": float(level),
        "npix": int(npix),
        "rms": float(rms) if np.isfinite(rms) else None,
        "rms_before": float(rms_before) if np.isfinite(rms_before) else None,
        "background_at_refpoint": float(np.ravel(coefficients)[0]),
        "solver": str(solver),
        "dqbits": None if dqbits is None else str(dqbits),
        "undetermined_terms": [[int(e) for e in t] for t in undetermined],
    }
    _add_history(model, degree, refpoint, frame, index)


#: Most pixels of a model sampled for ``background_error_rms``.
ERROR_SAMPLE = 4096


def background_errors(model, degree, refpoint, covariance):
    """``meta.wiimatch`` fields of the 1-sigma error of a model's background polynomial.

    ``covariance`` is the ``(M, M)`` covariance of the model's coefficients
    (the frame's basis). Returns ``background_error_at_refpoint`` (the error
    of the constant term: the background at the reference point) and
    ``background_error_rms``: the RMS, over the model's pixels with finite
    data (a regular sample of at most :data:`ERROR_SAMPLE` of them), of the
    error of the polynomial's value there. Both relative to the group's level
    convention (see ``docs/algorithm.rst``, "Uncertainties").
    """
    cov = np.asarray(covariance, dtype=float)
    out = {"background_error_at_refpoint": float(np.sqrt(max(cov[0, 0], 0.0))),
           "background_error_rms": None}
    data = model.data
    ndim = np.ndim(data)
    if len(degree) != ndim:
        return out
    shape = np.shape(data)
    step = max(1, int(np.ceil((np.prod(shape) / ERROR_SAMPLE) ** (1.0 / ndim))))
    idx = np.meshgrid(*[np.arange(step // 2, n, step) for n in shape], indexing="ij")
    finite = np.isfinite(np.asarray(data)[tuple(idx)])
    if not finite.any():
        return out
    pix = [i[finite].astype(np.float64) for i in idx][::-1]  # x, y[, z]
    try:
        coords = frame_function(_get_wcs(model), refpoint)(*pix)
    except Exception:  # no usable WCS here: the error at the refpoint only
        return out
    x = np.ones((len(cov), pix[0].size))
    for k, e in enumerate(exponents(tuple(int(d) for d in degree))):
        for c, p in zip(coords, e):
            if p:
                x[k] *= np.asarray(c, dtype=float) ** int(p)
    var = np.einsum("ip,ij,jp->p", x, cov, x)
    var = var[np.isfinite(var)]
    if var.size:
        out["background_error_rms"] = float(np.sqrt(max(float(np.mean(var)), 0.0)))
    return out


def _add_history(model, degree, refpoint, frame, index):
    """FITS HISTORY cards: what matched the background and where the polynomial is."""
    from .. import __version__

    text = (f"jwst_wiimatch {__version__}: background matched by wiimatch, polynomial "
            f"degree {[int(d) for d in degree]} in {frame}, refpoint "
            f"{[round(float(v), 8) for v in refpoint]}; coefficients in the ASDF "
            f"extension, meta.background.polynomial_info[{int(index)}]")
    # one card per line, broken between words (a HISTORY card holds 72 characters)
    add = getattr(model, "add_history_entry", None)
    for line in textwrap.wrap(text, width=70):
        if add is not None:
            add(line)
        else:  # pragma: no cover - stdatamodels without add_history_entry
            model.history.append(line)


def record_subtracted_level(model, mean_background):
    """Add a subtraction's mean to ``meta.background.level`` (BKGLEVEL).

    Called after the polynomial (and any pending level) was subtracted and
    ``subtracted`` set: the level becomes all the constant background
    subtracted so far, the level it held (pending, or subtracted before)
    plus the mean of the polynomial over the model's pixels. With
    ``subtracted`` True, resample and outlier_detection do not subtract it
    again.
    """
    if np.isfinite(mean_background):
        bkg = model.meta.background
        bkg.level = float(bkg.level or 0.0) + float(mean_background)
        node = _wiimatch_meta(model)
        node["level_subtracted"] = float(bkg.level)
        model.meta.wiimatch = node


def polynomial_mean(model, info):
    """Mean of a recorded polynomial over the model's finite data pixels (NaN if none)."""
    bkg = evaluate_background(model, info)
    used = np.isfinite(bkg) & np.isfinite(np.asarray(model.data))
    return float(bkg[used].mean()) if used.any() else float("nan")


def record_pending_level(model, level):
    """Leave a constant for resample to subtract: ``meta.background.level`` (subtracted False).

    jwst's resample and outlier_detection subtract ``meta.background.level``
    from a model whose ``meta.background.subtracted`` is False, as they do
    with the levels jwst's skymatch records when it does not subtract. Also
    kept in ``meta.wiimatch['level_for_resample']``. A NaN level changes nothing.
    """
    if np.isfinite(level):
        model.meta.background.level = float(level)
        node = _wiimatch_meta(model)
        node["level_for_resample"] = float(level)
        model.meta.wiimatch = node


def record_skipped(model, reason, frame=None, npix=0, cal_step=None):
    """Mark a model SKIPPED: ``meta.cal_step.wiimatch`` (and ``<cal_step>``), ``meta.wiimatch``.

    Background metadata and data are left as they are.
    """
    prev = _wiimatch_meta(model)
    model.meta.cal_step.wiimatch = "SKIPPED"
    if cal_step:
        setattr(model.meta.cal_step, cal_step, "SKIPPED")
    model.meta.wiimatch = {
        "status": "SKIPPED",
        "reason": str(reason),
        "frame": frame,
        "npix": int(npix),
        "polynomial_index": prev.get("polynomial_index"),
        "subtracted_entries": [int(i) for i in prev.get("subtracted_entries", [])],
    }
