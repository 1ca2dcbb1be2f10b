"""The background frame: sky coordinates of a model's pixels, and grids.

This module owns the world coordinates of a model's pixels (from its gwcs),
the frame in which background polynomials are written, the check that models
share one grid, and lattices that give those coordinates at every pixel from
a few WCS evaluations.

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

import numpy as np

__all__ = ["FRAME", "FRAME_CUBE", "grid_world", "wcs_grid_world", "default_refpoint",
           "check_refpoint", "tangent_plane", "world_to_frame", "frame_coordinates",
           "GridChecker"]

#: Name of the coordinate frame written to ``meta.wiimatch['frame']``.
FRAME = "gnomonic standard coordinates (xi, eta) in degrees about refpoint"
FRAME_CUBE = FRAME + "; dlam = spectral world coordinate - refpoint[2]"

# pixels per call to the gwcs forward transform (bounds temporary memory)
_WCS_CHUNK = 1 << 20


#: What to do about a model without a WCS, for models on one common grid.
NO_WCS_GRID = ("wiimatch needs the gwcs of the common (resampled) grid; run resample "
               "(e.g. with single=True) or assign a gwcs to meta.wcs")


def _get_wcs(model, what="model", fix=NO_WCS_GRID):
    wcs = None
    try:
        wcs = model.meta.wcs
    except AttributeError:
        pass
    if wcs is None:
        raise ValueError(f"{what} has no meta.wcs: {fix}")
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
        self._pix = sample_pixels(self.shape)
        self._world = _pixel_world(wcs, *self._pix)
        ndim = len(self.shape)
        sky, w = pixel_steps(wcs, self.shape)
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


#: Largest angular distance (degrees) from the reference point to a model's
#: pixels: the tangent plane stretches distances by 1 / cos^2 of it (33x at
#: 80 degrees) and has no points at 90 degrees and beyond.
MAX_REFPOINT_DISTANCE = 80.0


def sample_pixels(shape):
    """A 3 x 3 (x 3) set of pixel positions (x, y[, z]) spanning a grid: corners,
    edge middles and centre."""
    axes = [np.array([0.0, (n - 1) / 2.0, n - 1.0]) for n in shape[::-1]]
    grids = np.meshgrid(*axes, indexing="ij")
    return [g.ravel() for g in grids]


def refpoint_distance(world, refpoint):
    """Largest angular distance (degrees) from ``refpoint`` to sky positions.

    ``world`` is ``(ra, dec[, ...])`` of sample pixels (e.g. from
    :func:`sample_pixels`); positions the WCS gives no finite value for are
    left out. Returns ``(distance, index)`` of the farthest position, or
    ``(nan, None)`` when none is finite.
    """
    sep = _angsep(refpoint[0], refpoint[1], world[0], world[1])
    fin = np.isfinite(sep)
    if not fin.any():
        return np.nan, None
    k = int(np.argmax(np.where(fin, sep, -np.inf)))
    return float(sep[k]), k


def refpoint_problem(wcs, shape, refpoint, limit=MAX_REFPOINT_DISTANCE):
    """Why ``refpoint`` cannot be the tangent point for a grid, in words, or None.

    The grid's corners, edge middles and centre must lie within ``limit``
    degrees of the reference point.
    """
    world = _pixel_world(wcs, *sample_pixels(shape))
    dist, k = refpoint_distance(world, refpoint)
    if not (dist > limit):  # within reach, or no finite sample
        return None
    ref = [round(float(v), 6) for v in refpoint[:2]]
    return (f"refpoint [ra, dec] = {ref} is {dist:.1f} degrees from part of it "
            f"(ra, dec = {float(world[0][k]):.4f}, {float(world[1][k]):.4f}); the "
            f"tangent plane about refpoint must reach every pixel within {limit:g} "
            "degrees (at 90 degrees it has no points)")


def check_refpoint_distance(model, refpoint, name, shape=None):
    """Raise ValueError naming ``refpoint`` and ``name`` when the model lies too far from it.

    See :func:`refpoint_problem`; the fix offered is a refpoint near the data.
    """
    if shape is None:
        shape = np.shape(model.data)
    problem = refpoint_problem(_get_wcs(model, name), shape, refpoint)
    if problem is not None:
        raise ValueError(
            f"{name}: {problem}; give a refpoint near the data (e.g. the centre of "
            "the field) or leave refpoint unset (None) for the default"
        )


def pixel_steps(wcs, shape):
    """Sky steps (degrees) from the centre of a grid to its neighbours along x and y.

    Returns
    -------
    sky : numpy.ndarray
        Angular distances from the central pixel to the next pixel along x
        and along y.
    world : tuple of numpy.ndarray
        World coordinates of the central pixel and of its neighbours along
        each axis (x, y[, z]), in that order.
    """
    ndim = len(shape)
    center = np.array([(n - 1) / 2.0 for n in shape[::-1]])
    pts = np.vstack([center, center + np.eye(ndim)])
    world = _pixel_world(wcs, *pts.T)
    return _angsep(world[0][0], world[1][0], world[0][1:3], world[1][1:3]), world


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
# coordinates at every pixel from a lattice of WCS evaluations
# --------------------------------------------------------------------------
#: Lattice spacing (pixels) tried first by :class:`CoordinateLattice`.
LATTICE_STEP = 64
#: Largest interpolation error allowed, relative to the span of each coordinate.
LATTICE_RTOL = 1e-8


def _lattice_nodes(n, step):
    if (n - 1) // step < 3:  # too few nodes for a cubic: every pixel is a node
        return np.arange(n, dtype=np.float64)
    nodes = np.arange(0, n, step, dtype=np.float64)
    if nodes[-1] != n - 1:
        nodes = np.append(nodes, float(n - 1))
    return nodes


class CoordinateLattice:
    """Smooth coordinates of every pixel of a 2-D grid from a few evaluations.

    ``func(x, y)`` (pixel coordinates, 1-D arrays) is evaluated on a lattice
    of nodes every ``step`` pixels (plus the last row and column) and
    interpolated with bicubic splines. When built, the interpolation is
    checked against ``func`` at the centres of the lattice cells (where a
    spline's error is largest) and the step is halved until the largest
    error is at most ``rtol`` times the span of each coordinate over the
    grid; :attr:`max_error` records the errors found. Where even a 4-pixel
    lattice is not accurate enough, ``func`` is evaluated at every pixel
    asked for. With ``rtol = 1e-8``
    a polynomial background evaluated from these coordinates is off by at
    most about ``1e-8 * degree`` of its range.

    Parameters
    ----------
    func : callable
        ``func(x, y) -> tuple of arrays`` (e.g. frame coordinates from a
        gwcs); must be finite on the grid.
    shape : tuple of int
        ``(ny, nx)`` of the grid.
    step : int, optional
        Initial lattice spacing in pixels.
    rtol : float, optional
        Largest interpolation error relative to each coordinate's span.

    Raises
    ------
    ValueError
        When ``func`` is not finite on the lattice (no smooth interpolation).
    """

    def __init__(self, func, shape, step=LATTICE_STEP, rtol=LATTICE_RTOL):
        from scipy.interpolate import RectBivariateSpline

        ny, nx = (int(n) for n in shape)
        self.shape = (ny, nx)
        step = max(1, int(step))
        while True:
            ys, xs = _lattice_nodes(ny, step), _lattice_nodes(nx, step)
            gx, gy = np.meshgrid(xs, ys)
            vals = [np.asarray(v, dtype=np.float64).reshape(gx.shape)
                    for v in func(gx.ravel(), gy.ravel())]
            if not all(np.all(np.isfinite(v)) for v in vals):
                raise ValueError("coordinates are not finite everywhere on the grid")
            ky, kx = min(3, len(ys) - 1), min(3, len(xs) - 1)
            self._splines = [RectBivariateSpline(ys, xs, v, kx=ky, ky=kx, s=0)
                             for v in vals] if len(ys) > 1 and len(xs) > 1 else None
            if self._splines is None:  # a grid one pixel wide: evaluate directly
                self._func = func
                self.step = 1
                self.max_error = [0.0] * len(vals)
                return
            spans = [max(float(np.ptp(v)), 1e-300) for v in vals]
            # check at the middles of the lattice cells
            my = (ys[:-1] + ys[1:]) / 2
            mx = (xs[:-1] + xs[1:]) / 2
            cx, cy = np.meshgrid(mx, my)
            exact = func(cx.ravel(), cy.ravel())
            errs = [float(np.max(np.abs(s.ev(cy.ravel(), cx.ravel()) - np.ravel(e))))
                    for s, e in zip(self._splines, exact)]
            if all(e <= rtol * s for e, s in zip(errs, spans)):
                break
            if step <= 4:  # not smooth enough to interpolate: evaluate directly
                self._splines = None
                self._func = func
                self.step = 1
                self.max_error = [0.0] * len(vals)
                return
            step //= 2
        self.step = step
        self.max_error = errs
        self._func = None

    def points(self, x, y):
        """Coordinates at pixel positions ``x``, ``y`` (arrays of one shape)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if self._splines is None:
            return tuple(np.asarray(v, dtype=np.float64).reshape(x.shape)
                         for v in self._func(x.ravel(), y.ravel()))
        return tuple(s.ev(y.ravel(), x.ravel()).reshape(x.shape) for s in self._splines)

    def box(self, rows, cols):
        """Coordinates of every pixel of the box ``rows x cols`` (two slices).

        The splines are tensor products: on a box of pixels their values are
        ``B_y @ C @ B_x.T``, with ``B`` the B-spline basis at the box's rows
        and columns (4 non-zeros a row) and ``C`` a spline's coefficients.
        As two matrix products (BLAS, without the interpreter lock) that is
        about three times as fast as FITPACK's grid evaluation, which keeps
        the lock, with the same values to rounding.
        """
        ys = np.arange(rows.start, rows.stop, dtype=np.float64)
        xs = np.arange(cols.start, cols.stop, dtype=np.float64)
        if self._splines is None:
            gx, gy = np.meshgrid(xs, ys)
            return self.points(gx, gy)
        ny, nx = self.shape
        if ys.size == 0 or xs.size == 0 or ys[0] < 0 or xs[0] < 0 or \
                ys[-1] > ny - 1 or xs[-1] > nx - 1:  # outside the lattice
            return tuple(s(ys, xs) for s in self._splines)
        from scipy.interpolate import BSpline

        out, bases = [], {}
        for s in self._splines:
            (ty, tx), (ky, kx) = s.get_knots(), s.degrees
            key = (ty.tobytes(), tx.tobytes(), ky, kx)
            if key not in bases:
                bases[key] = (BSpline.design_matrix(ys, ty, ky).toarray(),
                              BSpline.design_matrix(xs, tx, kx).toarray())
            by, bx = bases[key]
            c = s.get_coeffs().reshape(by.shape[1], bx.shape[1])
            out.append(np.dot(by, np.dot(c, bx.T)))
        return tuple(out)


def frame_function(wcs, refpoint):
    """``f(x, y[, z]) -> (xi, eta[, dlam])``: background-frame coordinates of pixels.

    Parameters
    ----------
    wcs : gwcs.WCS
        The forward transform of a model's grid.
    refpoint : sequence of float
        Reference point of the frame.
    """
    def func(*pixel):
        world = _pixel_world(wcs, *pixel)
        ref = list(refpoint) + [0.0] * (len(world) - len(refpoint))
        return world_to_frame(world, ref)

    return func


def model_lattice(model, refpoint, shape=None):
    """:class:`CoordinateLattice` of a 2-D model's frame coordinates (None if not smooth).

    Returns None where the frame is not finite over the whole grid (pixels
    more than 90 degrees from the reference point); callers then evaluate
    the WCS at every pixel.
    """
    if shape is None:
        shape = np.shape(model.data)
    try:
        return CoordinateLattice(frame_function(_get_wcs(model), refpoint), shape)
    except ValueError:
        return None
