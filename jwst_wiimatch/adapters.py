"""Adapters between JWST datamodels and the matching engine.

This module owns everything that turns one stdatamodels model into what the
core engine needs, and everything that writes results back:

* the valid-pixel mask (finite data and error, positive error, DQ selection by a
  ``dqbits`` string, positive weight) and the per-pixel sigma;
* the world coordinates of the common pixel grid from the model's gwcs, and
  the *background frame* in which recorded polynomials are expressed;
* checks that all models share one grid;
* recording results in ``meta.background``, ``meta.cal_step`` and
  ``meta.wiimatch``, and subtracting a polynomial from the data;
* :func:`evaluate_background`, which evaluates a recorded polynomial on *any*
  model through that model's own WCS.

The background frame
--------------------
A recorded polynomial ``P`` is a function of the coordinates
``(xi, eta)`` for images and ``(xi, eta, dlam)`` for cubes, where

* ``(xi, eta)`` are the gnomonic (tangent-plane) *standard coordinates*, in
  degrees, of a sky position ``(ra, dec)`` about the reference point
  ``(ra0, dec0)`` (both ICRS degrees as given by the WCS)::

      cos c = sin(dec0) sin(dec) + cos(dec0) cos(dec) cos(ra - ra0)
      xi    = cos(dec) sin(ra - ra0) / cos c                      [rad -> deg]
      eta   = (cos(dec0) sin(dec) - sin(dec0) cos(dec) cos(ra - ra0)) / cos c

  ``xi`` grows toward East (increasing RA) and ``eta`` toward North. These
  coordinates are continuous across RA = 0 h and well defined near the
  celestial poles; positions more than 90 degrees from the reference point
  have no projection (NaN).
* ``dlam = lam - lam0`` is the spectral world coordinate of the WCS minus the
  reference wavelength ``lam0``, in the unit of the WCS spectral axis
  (microns for JWST cubes).

The reference point ``refpoint = [ra0, dec0]`` (``[ra0, dec0, lam0]`` for
cubes) is stored with the coefficients. The coefficient array
``np.reshape(coefficients, [d + 1 for d in degree])`` is the coefficient
array ``C`` of ``numpy.polynomial.polynomial.polyval2d(xi, eta, C)`` (or
``polyval3d(xi, eta, dlam, C)``), i.e. ``C[i, j]`` multiplies
``xi**i * eta**j``.
"""

import logging

import numpy as np

from .core import polyval_nd

log = logging.getLogger("jwst_wiimatch")

__all__ = [
    "DEFAULT_DQBITS",
    "FRAME",
    "interpret_dqbits",
    "valid_mask",
    "model_sigma",
    "weight_array",
    "grid_world",
    "wcs_grid_world",
    "default_refpoint",
    "tangent_plane",
    "frame_coordinates",
    "check_refpoint",
    "GridChecker",
    "pending_level",
    "polynomial_coefficients",
    "evaluate_background",
    "latest_entry",
    "subtract_background",
    "record_result",
    "record_skipped",
]

#: Default DQ selection: pixels flagged DO_NOT_USE or NON_SCIENCE are bad.
DEFAULT_DQBITS = "~DO_NOT_USE+NON_SCIENCE"

#: Name of the coordinate frame written to ``meta.wiimatch['frame']``.
FRAME = "gnomonic standard coordinates (xi, eta) in degrees about refpoint"
FRAME_CUBE = FRAME + "; dlam = spectral world coordinate - refpoint[2]"

# pixels per call to the gwcs forward transform (bounds temporary memory)
_WCS_CHUNK = 1 << 20


# --------------------------------------------------------------------------
# masks and weights
# --------------------------------------------------------------------------
def interpret_dqbits(dqbits):
    """Turn a ``dqbits`` specification into integer flags for the DQ test.

    Parameters
    ----------
    dqbits : str, int or None
        JWST-style bit-flag expression such as ``'~DO_NOT_USE+NON_SCIENCE'``
        (the flags named after ``~`` mark *bad* pixels), an integer, or
        ``None`` / ``''`` to ignore DQ altogether.

    Returns
    -------
    int or None
        The value to pass to
        `astropy.nddata.bitmask.bitfield_to_boolean_mask`, or None when DQ
        is to be ignored.

    Raises
    ------
    ValueError
        When the expression cannot be parsed (unknown flag name, bad syntax).
    """
    from astropy.nddata.bitmask import interpret_bit_flags
    from stdatamodels.jwst.datamodels.dqflags import pixel

    if dqbits is None:
        return None
    if isinstance(dqbits, str) and dqbits.strip().lower() in ("", "none"):
        return None
    try:
        return interpret_bit_flags(dqbits, flag_name_map=pixel)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"dqbits={dqbits!r} is not a valid DQ bit-flag expression ({exc}); "
            "use flag names from stdatamodels' dqflags.pixel joined with '+' "
            "(or ','), optionally preceded by '~', e.g. '~DO_NOT_USE+NON_SCIENCE', "
            "an integer, or None to ignore DQ"
        ) from None


def weight_array(model):
    """Return the model's weight (coverage) array or None.

    ``wht`` for images, ``weightmap`` for IFU cubes.
    """
    for name in ("wht", "weightmap"):
        arr = _get_array(model, name)
        if arr is not None:
            return arr
    return None


def _get_array(model, name):
    try:
        arr = getattr(model, name)
    except AttributeError:
        return None
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.shape != np.shape(model.data):
        return None
    return arr


def model_sigma(model):
    """Per-pixel uncertainty of the data, or None when the model has no ERR.

    The ERR array is used as sigma. For IFU cubes whose
    ``meta.ifu.error_type`` says the ERR extension holds a variance
    (``VAR``), an inverse variance (``IVAR``) or an inverse error (``IERR``),
    it is converted to a standard deviation first.

    Returns
    -------
    numpy.ndarray or None
        Floating-point array of the data's shape (ERR's own precision is
        kept, so float32 ERR costs no extra memory; the engine sums in
        float64).
    """
    err = _get_array(model, "err")
    if err is None:
        return None
    err = np.asarray(err)
    if err.dtype.kind != "f":
        err = err.astype(np.float64)
    if not np.any(err > 0):
        # an ERR array with no positive value (e.g. a default-filled one)
        # carries no uncertainty information: treat it as absent
        return None
    etype = None
    try:
        etype = model.meta.ifu.error_type
    except AttributeError:
        pass
    with np.errstate(divide="ignore", invalid="ignore"):
        if etype == "VAR":
            err = np.sqrt(err)
        elif etype == "IVAR":
            err = 1.0 / np.sqrt(err)
        elif etype == "IERR":
            err = 1.0 / err
    return err


def valid_mask(model, dqflags=None, sigma=None):
    """Valid-pixel mask of one model.

    A pixel is valid when its data value is finite, its sigma (from ERR) is
    finite and positive, its DQ passes ``dqflags`` (when the model has a DQ
    array and ``dqflags`` is not None) and its weight is positive (when the
    model has a ``wht`` / ``weightmap`` array).

    Parameters
    ----------
    model : DataModel
        Model with a ``data`` array.
    dqflags : int or None
        Output of :func:`interpret_dqbits`.
    sigma : numpy.ndarray or None
        Output of :func:`model_sigma` (computed when not given).

    Returns
    -------
    numpy.ndarray of bool
    """
    from astropy.nddata.bitmask import bitfield_to_boolean_mask

    data = np.asarray(model.data)
    mask = np.isfinite(data)
    if sigma is None:
        sigma = model_sigma(model)
    if sigma is not None:
        with np.errstate(invalid="ignore"):
            mask &= np.isfinite(sigma) & (sigma > 0)
    if dqflags is not None:
        dq = _get_array(model, "dq")
        if dq is not None:
            mask &= bitfield_to_boolean_mask(
                dq, dqflags, good_mask_value=True, dtype=bool
            )
    wht = weight_array(model)
    if wht is not None:
        with np.errstate(invalid="ignore"):
            mask &= wht > 0
    return mask


# --------------------------------------------------------------------------
# world coordinates and the background frame
# --------------------------------------------------------------------------
def _get_wcs(model, what="model"):
    wcs = None
    try:
        wcs = model.meta.wcs
    except AttributeError:
        pass
    if wcs is None:
        raise ValueError(
            f"{what} has no meta.wcs: wiimatch needs the gwcs of the common "
            "(resampled) grid; run resample (e.g. with single=True) or assign a "
            "gwcs to meta.wcs"
        )
    return wcs


def _pixel_world(wcs, *pixel):
    """World coordinates (tuple of float64 arrays) of pixel positions (x, y[, z])."""
    out = wcs(*pixel, with_bounding_box=False)
    if not isinstance(out, (tuple, list)):
        out = (out,)
    return tuple(np.asarray(getattr(o, "value", o), dtype=np.float64) for o in out)


def grid_world(model, shape=None):
    """World coordinates of every pixel of the model's grid.

    Parameters
    ----------
    model : DataModel
        Model whose ``meta.wcs`` (gwcs) defines the grid.
    shape : tuple, optional
        numpy shape of the grid (default: ``model.data.shape``).

    Returns
    -------
    tuple of numpy.ndarray
        ``(ra, dec)`` or ``(ra, dec, wavelength)`` arrays of ``shape``
        (float64, degrees for RA/Dec), from the gwcs forward transform
        called in (x, y[, z]) order.
    """
    if shape is None:
        shape = np.shape(model.data)
    return wcs_grid_world(_get_wcs(model), shape)


def wcs_grid_world(wcs, shape):
    """World coordinates of every pixel of a grid of numpy ``shape`` through ``wcs``.

    See `grid_world`; the forward transform is called on blocks of pixels
    to bound temporary memory.
    """
    ndim = len(shape)
    size = int(np.prod(shape))
    outs = [np.empty(size, dtype=np.float64) for _ in range(ndim)]
    for start in range(0, size, _WCS_CHUNK):
        flat = np.arange(start, min(size, start + _WCS_CHUNK))
        idx = np.unravel_index(flat, shape)  # numpy order (z, y, x)
        world = _pixel_world(wcs, *[i.astype(np.float64) for i in idx[::-1]])
        if len(world) != ndim:
            raise ValueError(
                f"meta.wcs returns {len(world)} world coordinates for a "
                f"{ndim}-D grid; wiimatch needs (ra, dec) for images and "
                "(ra, dec, wavelength) for cubes"
            )
        for o, w in zip(outs, world):
            o[flat] = w
    return tuple(o.reshape(shape) for o in outs)


def default_refpoint(model, shape=None):
    """World coordinates of the grid center, used as the default reference point.

    The center is pixel ``((n_x - 1) / 2, (n_y - 1) / 2[, (n_z - 1) / 2])``.

    Returns
    -------
    list of float
        ``[ra0, dec0]`` or ``[ra0, dec0, lam0]``.
    """
    wcs = _get_wcs(model)
    if shape is None:
        shape = np.shape(model.data)
    center = [np.array([(n - 1) / 2.0]) for n in shape[::-1]]
    world = _pixel_world(wcs, *center)
    ref = [float(w[0]) for w in world]
    if not np.all(np.isfinite(ref)):
        raise ValueError(
            "the WCS gives no finite world coordinates at the grid center; "
            "give refpoint=[ra, dec] (or [ra, dec, wavelength]) explicitly"
        )
    ref[0] = ref[0] % 360.0
    return ref


def check_refpoint(refpoint, ndim):
    """Validate a user ``refpoint`` for an ``ndim``-D grid.

    Returns a list of floats of length 2 (images) or 2-3 (cubes), or None.
    """
    if refpoint is None:
        return None
    if isinstance(refpoint, (list, tuple)) and any(isinstance(v, str) for v in refpoint):
        refpoint = ",".join(str(v) for v in refpoint)
    if isinstance(refpoint, str):
        txt = refpoint.strip().strip("[]()")
        if txt.lower() in ("", "none"):
            return None
        refpoint = [t for t in txt.replace(",", " ").split()]
    try:
        ref = [float(v) for v in refpoint]
    except (TypeError, ValueError):
        raise ValueError(
            f"refpoint={refpoint!r} is not a list of numbers; give [ra, dec] in "
            "degrees (cubes may add the wavelength: [ra, dec, wavelength]) or None"
        ) from None
    if len(ref) < 2 or len(ref) > max(2, ndim) or not np.all(np.isfinite(ref)):
        raise ValueError(
            f"refpoint={refpoint!r} must hold 2 finite values [ra, dec] for images, "
            f"or 2-3 values [ra, dec[, wavelength]] for cubes (grid is {ndim}-D)"
        )
    if abs(ref[1]) > 90:
        raise ValueError(f"refpoint declination {ref[1]} is outside [-90, 90] degrees")
    ref[0] = ref[0] % 360.0
    return ref


def tangent_plane(ra, dec, ra0, dec0):
    """Gnomonic standard coordinates of (ra, dec) about (ra0, dec0).

    Parameters
    ----------
    ra, dec : array_like
        Sky positions in degrees.
    ra0, dec0 : float
        Reference point (tangent point) in degrees.

    Returns
    -------
    xi, eta : numpy.ndarray
        Standard coordinates in degrees (float64); NaN for positions 90
        degrees or more from the reference point.

    Examples
    --------
    >>> xi, eta = tangent_plane([359.9, 0.1], [0.0, 0.0], 0.0, 0.0)
    >>> bool(xi[0] < 0 < xi[1])
    True
    """
    ra = np.radians(np.asarray(ra, dtype=np.float64))
    dec = np.radians(np.asarray(dec, dtype=np.float64))
    a0 = np.radians(float(ra0))
    d0 = np.radians(float(dec0))
    dra = ra - a0
    cosd = np.cos(dec)
    sind = np.sin(dec)
    cosdra = np.cos(dra)
    cosc = np.sin(d0) * sind + np.cos(d0) * cosd * cosdra
    with np.errstate(divide="ignore", invalid="ignore"):
        good = cosc > 0
        inv = np.where(good, 1.0 / np.where(good, cosc, 1.0), np.nan)
        xi = np.degrees(cosd * np.sin(dra) * inv)
        eta = np.degrees((np.cos(d0) * sind - np.sin(d0) * cosd * cosdra) * inv)
    return xi, eta


def world_to_frame(world, refpoint):
    """Background-frame coordinates of world coordinates.

    Parameters
    ----------
    world : tuple of array_like
        ``(ra, dec)`` or ``(ra, dec, wavelength)``.
    refpoint : sequence of float
        ``[ra0, dec0]`` or ``[ra0, dec0, lam0]`` (same length as ``world``).

    Returns
    -------
    tuple of numpy.ndarray
        ``(xi, eta)`` or ``(xi, eta, dlam)``, see the module documentation.
    """
    xi, eta = tangent_plane(world[0], world[1], refpoint[0], refpoint[1])
    out = [xi, eta]
    for k in range(2, len(world)):
        out.append(np.asarray(world[k], dtype=np.float64) - float(refpoint[k]))
    return tuple(out)


def frame_coordinates(model, refpoint, shape=None):
    """Background-frame coordinates of every pixel of a model's grid.

    Parameters
    ----------
    model : DataModel
        Any model with ``meta.wcs``; 2-D (image) or 3-D (cube).
    refpoint : sequence of float
        Reference point of the frame (see :func:`evaluate_background`).
    shape : tuple, optional
        numpy shape of the grid (default ``model.data.shape``).

    Returns
    -------
    tuple of numpy.ndarray
        ``(xi, eta[, dlam])`` arrays of the grid's shape.
    """
    world = grid_world(model, shape=shape)
    return world_to_frame(world, refpoint)


# --------------------------------------------------------------------------
# common grid
# --------------------------------------------------------------------------
class GridChecker:
    """Check that models share the grid (shape and WCS) of the first one.

    The WCS is compared at a 3 x 3 (x 3) set of sample pixels spanning the
    grid: sky positions must agree to 1e-3 of the pixel scale and spectral
    coordinates to 1e-3 of the spectral step.
    """

    def __init__(self, model, name):
        self.name = name
        self.shape = tuple(np.shape(model.data))
        if len(self.shape) not in (2, 3):
            raise ValueError(
                f"{name}: data is {len(self.shape)}-D; wiimatch handles 2-D images "
                "and 3-D cubes"
            )
        wcs = _get_wcs(model, name)
        axes = [np.array([0.0, (n - 1) / 2.0, n - 1.0]) for n in self.shape[::-1]]
        grids = np.meshgrid(*axes, indexing="ij")
        self._pix = [g.ravel() for g in grids]
        self._world = _pixel_world(wcs, *self._pix)
        # pixel scale: world steps from the grid center to its neighbours
        # along x, y (and z)
        ndim = len(self.shape)
        center = np.array([(n - 1) / 2.0 for n in self.shape[::-1]])
        pts = np.vstack([center, center + np.eye(ndim)])
        w = _pixel_world(wcs, *pts.T)
        sky = _angsep(w[0][0], w[1][0], w[0][1:3], w[1][1:3])
        ok = np.all(np.isfinite(sky)) and np.all(sky > 0)
        self._sky_tol = 1e-3 * float(np.min(sky)) if ok else 1e-9
        self._spec_tol = None
        if ndim == 3:
            dl = abs(float(w[2][3] - w[2][0]))
            self._spec_tol = 1e-3 * dl if np.isfinite(dl) and dl > 0 else 1e-12

    def check(self, model, name):
        """Raise ValueError naming ``name`` when the model's grid differs."""
        shape = tuple(np.shape(model.data))
        if shape != self.shape:
            raise ValueError(
                f"{name} does not share the common grid: data shape {shape} differs "
                f"from {self.shape} of {self.name}; wiimatch needs all models "
                "resampled onto one grid (e.g. resample with single=True)"
            )
        wcs = _get_wcs(model, name)
        world = _pixel_world(wcs, *self._pix)
        if len(world) != len(self._world):
            raise ValueError(
                f"{name} does not share the common grid: its WCS has "
                f"{len(world)} world axes, {self.name} has {len(self._world)}"
            )
        sep = _angsep(world[0], world[1], self._world[0], self._world[1])
        fin0 = np.isfinite(sep)
        bad = not np.array_equal(fin0, np.isfinite(self._world[0]) & np.isfinite(self._world[1]))
        bad = bad or bool(np.any(sep[fin0] > self._sky_tol))
        if len(world) == 3:
            dl = np.abs(world[2] - self._world[2])
            fin = np.isfinite(dl)
            bad = bad or bool(np.any(dl[fin] > self._spec_tol))
        if bad:
            raise ValueError(
                f"{name} does not share the common grid: its WCS differs from "
                f"that of {self.name}; wiimatch needs all models resampled onto "
                "one grid (e.g. resample with single=True)"
            )


def _angsep(ra1, dec1, ra2, dec2):
    """Angular separation in degrees (Vincenty formula)."""
    r1, d1, r2, d2 = (np.radians(np.atleast_1d(np.asarray(v, dtype=np.float64)))
                      for v in (ra1, dec1, ra2, dec2))
    dra = r2 - r1
    num = np.hypot(np.cos(d2) * np.sin(dra),
                   np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(dra))
    den = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


# --------------------------------------------------------------------------
# background bookkeeping
# --------------------------------------------------------------------------
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
    grid the polynomial was fitted on.

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
    """
    data = np.asarray(model.data)
    bkg = np.asarray(background, dtype=np.float64) + float(level)
    good = np.isfinite(bkg)
    new = data.astype(np.float64)
    new[good] -= bkg[good]
    model.data = new.astype(data.dtype, copy=False)


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
                  dqbits, undetermined=()):
    """Write one model's result into its metadata (and nothing into its data).

    Appends ``{degree, refpoint, coefficients, channel}`` to
    ``meta.background.polynomial_info``, sets ``meta.background.method`` to
    ``'wiimatch'``, updates ``meta.background.subtracted`` /
    ``meta.background.level`` (see the step documentation for the rules
    shared with skymatch), sets ``meta.cal_step.wiimatch = 'COMPLETE'`` and
    writes ``meta.wiimatch`` (frame, reference point, pixels used, residual
    RMS, index of the new entry, indices of entries already subtracted).
    """
    subtracted_entries = _prune_unsubtracted(model)
    entries = model.meta.background.polynomial_info
    entry = {
        "degree": [int(d) for d in degree],
        "refpoint": [float(v) for v in refpoint],
        "coefficients": [float(c) for c in np.ravel(coefficients)],
        "channel": _channel(model),
    }
    entries.append(entry)
    index = len(model.meta.background.polynomial_info) - 1
    if subtract:
        subtracted_entries.append(index)
    _set_background_flags(model, subtract)
    model.meta.cal_step.wiimatch = "COMPLETE"
    model.meta.wiimatch = {
        "status": "COMPLETE",
        "frame": frame,
        "refpoint": [float(v) for v in refpoint],
        "degree": [int(d) for d in degree],
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


def record_skipped(model, reason, frame=None, npix=0):
    """Mark a model SKIPPED: ``meta.cal_step.wiimatch`` and ``meta.wiimatch``.

    Background metadata and data are left as they are.
    """
    prev = _wiimatch_meta(model)
    model.meta.cal_step.wiimatch = "SKIPPED"
    model.meta.wiimatch = {
        "status": "SKIPPED",
        "reason": str(reason),
        "frame": frame,
        "npix": int(npix),
        "polynomial_index": prev.get("polynomial_index"),
        "subtracted_entries": [int(i) for i in prev.get("subtracted_entries", [])],
    }


