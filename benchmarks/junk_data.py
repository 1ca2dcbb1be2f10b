"""Resampled exposures on one grid with known backgrounds and unflagged junk (issue 8).

Two families of cases, each a list of stdatamodels ``ImageModel`` s (``data``,
``err``, ``dq``, ``wht``, a TAN gwcs) on ONE pixel grid, as ``resample``
(``single=True``) would hand them to a background matcher, plus the truth:

**junk** (``make_junk_case``): ``n`` (5) exposures of an empty sky, each
valid on its own rectangle covering ~64 % of the grid (NaN, ``DO_NOT_USE``,
``WHT = 0`` outside), each with its own injected background polynomial and
Gaussian noise of sigma ``SIGMA = 1`` per pixel (``ERR = 1``). The cases
differ only by junk, unflagged (``DQ = 0``, ``ERR`` unchanged), added to
ONE member (``junk_member``, default 2); backgrounds and noise are the same
draws in every case (paired comparison):

=============  =====================================================
``clean``      nothing
``cr``         cosmic-ray residue: 1 % of the member's valid pixels,
               each +U(20, 500) sigma (uniform amplitude)
``trail``      a satellite trail: a straight band 3 px wide (pixels
               whose center is within 1.5 px of the line), +30 sigma
``transient``  an extended transient (wisp-, ghost-, claw-like): a
               flat disk of radius 12 px, +8 sigma
``fill``       ten pixels set to 1e30 (an unflagged fill value)
=============  =====================================================

**sky** (``make_sky_case``): a real sky, scikit-image's
``skimage.data.hubble_deep_field()`` (ships offline), scaled to a surface
brightness in MJy/sr (brightest pixel ``SKY_PEAK`` = 3 MJy/sr; the 8-bit
image's own sky, median, is removed and its noise soft-thresholded at 3 MAD),
observed as ``n`` (6) dithered exposures. Each exposure's detector (the
grid minus a margin of ``SKY_MARGIN`` px) sees the scene at its own
sub-pixel dither (the scene sampled by cubic spline at the detector's pixel
centers), gets Poisson-like noise ``err_det = SKY_SIGMA * sqrt(1 +
max(scene, 0) / SKY_POISSON_REF)``, and is resampled back onto the grid by
bilinear interpolation (variances propagated with the squared weights): the
two interpolations smooth each exposure differently, so bright sources
leave residue that does not cancel between exposures. The injected background
is then added on the grid. Cases:

================  ====================================================
``sky_clean``     no sources (the noise draws and ERR of a blank sky)
``sky``           the field: resampling residue only
``sky_cr``        + residual cosmic rays in every exposure: 0.05 % of
                  detector pixels at +U(20, 500) ``SKY_SIGMA`` (spread
                  over ~4 grid pixels by the resampling)
``sky_trail``     + one satellite trail (3 px wide, +30 ``SKY_SIGMA``,
                  detector frame) in member ``trail_member`` (default 2)
``sky_cr_trail``  both
================  ====================================================

Backgrounds (both families) are polynomials ``sum C[i][j] xi**i eta**j``
in gnomonic standard coordinates (xi, eta), in degrees, about the tangent
point of the grid's WCS (the world position of the grid center, the step's
default reference point); ``degree`` 0, 1 or 2 per axis (tensor terms, as
the step's ``degree``), or only the terms ``i + j <= degree`` with
``total=True``. Levels, gradients and curvatures change each background by a
few sigma across the grid: far above the noise floor of matching.

Use as a module::

    from junk_data import make_junk_case, make_sky_case
    case = make_junk_case("trail", shape=(256, 256))
    case.models, case.backgrounds, case.footprints, case.junk_masks

or as a script (writes ``<name>_i2d.fits`` files, an image3 association and
``truth.json`` with the coefficients per member)::

    python benchmarks/junk_data.py /tmp/junk --case trail --size 512
    python benchmarks/junk_data.py /tmp/sky --case sky_cr_trail

Shared pieces: the TAN gwcs and the analytic pixel -> standard coordinates
come from ``mosaic_data`` (the one WCS builder of the benchmarks).
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mosaic_data as md  # noqa: E402

#: Noise of the junk cases (Gaussian sigma per pixel = ERR).
SIGMA = 1.0
#: Grid tangent point (ICRS degrees), pixel scale (arcsec) and roll (degrees).
CRVAL = (53.16, -27.78)
PIXSCALE = 0.06
ROLL = 20.0
#: Junk of the table of issue 8.
CR_FRACTION = 0.01
CR_RANGE = (20.0, 500.0)  # sigma
TRAIL_WIDTH = 3.0  # px
TRAIL_AMP = 30.0  # sigma
TRANSIENT_RADIUS = 12.0  # px
TRANSIENT_AMP = 8.0  # sigma
FILL_VALUE = 1e30
FILL_COUNT = 10
#: The real sky.
SKY_SIGMA = 0.01  # MJy/sr: noise per detector pixel of a blank sky
SKY_LEVEL = 0.2  # MJy/sr: typical background level
SKY_PEAK = 3.0  # MJy/sr: brightest pixel of the scene
SKY_POISSON_REF = 0.2  # MJy/sr: the scene brightness whose photon noise equals SKY_SIGMA
SKY_CR_FRACTION = 5e-4
SKY_MARGIN = 6  # px: grid margin around each detector
#: Dithers (rows, columns) in grid pixels: integer and sub-pixel parts differ.
SKY_DITHERS = [(0.0, 0.0), (2.5, 1.5), (1.33, -2.67), (-1.75, 3.25),
               (-3.2, -0.6), (0.6, -3.4), (3.4, 3.8), (-2.4, -3.9), (1.9, 0.3)]

JUNK_CASES = ("clean", "cr", "trail", "transient", "fill")
SKY_CASES = ("sky_clean", "sky", "sky_cr", "sky_trail", "sky_cr_trail")
CASES = JUNK_CASES + SKY_CASES

DO_NOT_USE = 1
NON_SCIENCE = 512


@dataclass
class Case:
    """One generated case.

    Attributes
    ----------
    name : str
    models : list of ImageModel
    backgrounds : list of numpy.ndarray
        Injected background of each model on the grid (float64, everywhere).
    footprints : list of numpy.ndarray
        Valid pixels of each model (bool; junk does not change them).
    coefficients : list of numpy.ndarray
        ``C[i, j]`` of ``xi**i * eta**j`` (degrees about ``refpoint``).
    refpoint : tuple of float
        (ra, dec) of the polynomials' origin: the grid's tangent point.
    junk_masks : list of numpy.ndarray
        Grid pixels of each model that carry junk (bool; none for clean cases).
    info : dict
        Case parameters and what was injected (JSON-able).
    """

    name: str
    models: list
    backgrounds: list
    footprints: list
    coefficients: list
    refpoint: tuple
    junk_masks: list
    info: dict = field(default_factory=dict)

    def frame(self):
        """(xi, eta) in degrees about ``refpoint`` of every grid pixel."""
        return grid_frame(self.models[0].data.shape, self.info["roll"],
                          self.info["pixscale"])

    def truth(self):
        """JSON-able truth: refpoint, coefficients and junk per member."""
        return {"case": self.name, "refpoint": list(self.refpoint),
                "shape": list(self.models[0].data.shape),
                "members": {m.meta.filename: {
                    "coefficients": c.tolist(),
                    "junk_pixels": int(j.sum()),
                    "valid_pixels": int(f.sum())}
                    for m, c, j, f in zip(self.models, self.coefficients,
                                          self.junk_masks, self.footprints)},
                "info": self.info}


# ----------------------------------------------------------------------
# grid, backgrounds, models
def grid_wcs(shape, roll=ROLL, pixscale=PIXSCALE):
    """TAN gwcs of the grid: tangent point ``CRVAL`` at the grid center."""
    return md.tan_wcs(shape, CRVAL, roll, pixscale)


def grid_frame(shape, roll=ROLL, pixscale=PIXSCALE):
    """(xi, eta) degrees about ``CRVAL`` of every pixel (analytic, = the gwcs)."""
    y, x = np.indices(shape, dtype=np.float64)
    return md.pixel_to_standard(x, y, shape, CRVAL, roll, ref=CRVAL, pixscale=pixscale)


def random_backgrounds(n, shape, degree=1, seed=0, level=3.0, spread=1.0, change=3.0,
                       total=False, pixscale=PIXSCALE):
    """``n`` coefficient arrays ``(degree + 1, degree + 1)`` in (xi, eta) degrees.

    Level ``level + N(0, spread)``; every other term changes the background
    by up to ``change`` across the grid's half-width (a uniform draw in
    ``[-change, change] / 2**(i + j - 1)`` at the edge); ``total=True`` keeps
    only the terms with ``i + j <= degree`` (a true plane at degree 1).
    """
    if int(degree) not in (0, 1, 2):
        raise ValueError(f"degree must be 0, 1 or 2, not {degree!r}")
    d = int(degree)
    rng = np.random.default_rng([seed, 1])
    half = 0.5 * max(shape) * pixscale / 3600.0
    out = []
    for _ in range(n):
        c = np.zeros((d + 1, d + 1))
        for i in range(d + 1):
            for j in range(d + 1):
                if i + j == 0:
                    c[i, j] = level + spread * rng.normal()
                elif total and i + j > d:
                    continue
                else:
                    amp = change / 2.0 ** (i + j - 1)
                    c[i, j] = rng.uniform(-amp, amp) / half ** (i + j)
        out.append(c)
    return out


def image_model(data, err, dq, wht, wcs, index, name, template=None):
    """An ``ImageModel`` with the metadata a resampled (i2d) exposure has.

    ``template``: a model made by this function for the same grid, copied
    instead of setting (and validating) every metadata value again (faster).
    """
    from stdatamodels.jwst.datamodels import ImageModel

    if template is not None:
        m = template.copy()
        # in place: assigning arrays would validate them against the schema again
        m.data[...] = data
        m.err[...] = err
        m.dq[...] = dq
        m.wht[...] = wht
    else:
        m = ImageModel(data=np.asarray(data, dtype=np.float32))
        m.meta.wcs = wcs
        meta = m.meta
        meta.bunit_data = "MJy/sr"
        meta.bunit_err = "MJy/sr"
        meta.telescope = "JWST"
        meta.instrument.name = "NIRCAM"
        meta.instrument.detector = "NRCA1"
        meta.instrument.filter = "F200W"
        meta.exposure.type = "NRC_IMAGE"
        meta.observation.date = "2026-01-01"
        meta.observation.time = "00:00:00"
        meta.observation.program_number = "01234"
        meta.observation.observation_number = "001"
        meta.observation.visit_number = "001"
        meta.observation.visit_group = "01"
        meta.observation.sequence_id = "1"
        meta.observation.activity_id = "01"
        meta.cal_step.resample = "COMPLETE"
        m.err = np.asarray(err, dtype=np.float32)
        m.dq = np.asarray(dq, dtype=np.uint32)
        m.wht = np.asarray(wht, dtype=np.float32)
    m.meta.filename = f"{name}_i2d.fits"
    m.meta.observation.exposure_number = f"{index + 1:05d}"
    return m


def _finish(data, err, foot):
    """NaN / DO_NOT_USE / WHT 0 outside the footprint."""
    data = np.where(foot, data, np.nan)
    err = np.where(foot, err, np.nan)
    dq = np.where(foot, 0, DO_NOT_USE | NON_SCIENCE).astype(np.uint32)
    wht = foot.astype(np.float32)
    return data, err, dq, wht


def band_mask(shape, point, angle_deg, width):
    """Pixels whose center lies within ``width / 2`` of the line through
    ``point`` (row, col) at ``angle_deg`` from the +x axis."""
    y, x = np.indices(shape, dtype=np.float64)
    th = np.radians(angle_deg)
    dist = -(x - point[1]) * np.sin(th) + (y - point[0]) * np.cos(th)
    return np.abs(dist) < width / 2.0


def disk_mask(shape, center, radius):
    """Pixels whose center lies within ``radius`` of ``center`` (row, col)."""
    y, x = np.indices(shape, dtype=np.float64)
    return (y - center[0]) ** 2 + (x - center[1]) ** 2 <= radius ** 2


def _choose(rng, mask, count):
    """``count`` distinct pixels of ``mask`` (a flat index array)."""
    idx = np.flatnonzero(mask)
    return rng.choice(idx, size=min(int(count), idx.size), replace=False)


# ----------------------------------------------------------------------
# junk cases
def junk_footprints(n, shape):
    """Rectangles of 80 % x 80 % of the grid, shifted per exposure."""
    ny, nx = shape
    out = []
    for k in range(n):
        t = k / max(n - 1, 1) - 0.5  # -0.5 .. 0.5
        ox = int(round(t * 0.2 * nx))
        oy = int(round((0.5 - abs(t)) * 0.2 * ny - 0.05 * ny))
        y0, x0 = int(0.1 * ny) + oy, int(0.1 * nx) + ox
        f = np.zeros(shape, dtype=bool)
        f[max(y0, 0):min(y0 + int(0.8 * ny), ny), max(x0, 0):min(x0 + int(0.8 * nx), nx)] = True
        out.append(f)
    return out


def inject_junk(case, data, foot, rng, sigma=SIGMA):
    """Add the junk of ``case`` to ``data`` (in place) inside ``foot``; returns
    (junk mask, info)."""
    shape = data.shape
    junk = np.zeros(shape, dtype=bool)
    info = {}
    if case == "clean":
        return junk, info
    if case == "cr":
        count = int(round(CR_FRACTION * foot.sum()))
        idx = _choose(rng, foot, count)
        amp = rng.uniform(*CR_RANGE, idx.size) * sigma
        data.flat[idx] += amp
        junk.flat[idx] = True
        info = {"count": int(idx.size), "fraction": CR_FRACTION,
                "amplitude_sigma": list(CR_RANGE)}
    elif case == "trail":
        rows, cols = np.nonzero(foot)
        point = (rng.uniform(np.percentile(rows, 30), np.percentile(rows, 70)),
                 rng.uniform(np.percentile(cols, 30), np.percentile(cols, 70)))
        angle = float(rng.uniform(-40.0, 40.0))
        junk = band_mask(shape, point, angle, TRAIL_WIDTH) & foot
        data[junk] += TRAIL_AMP * sigma
        info = {"point": [float(p) for p in point], "angle_deg": angle,
                "width_px": TRAIL_WIDTH, "amplitude_sigma": TRAIL_AMP}
    elif case == "transient":
        rows, cols = np.nonzero(foot)
        r = TRANSIENT_RADIUS + 1
        center = (rng.uniform(rows.min() + r, rows.max() - r),
                  rng.uniform(cols.min() + r, cols.max() - r))
        junk = disk_mask(shape, center, TRANSIENT_RADIUS) & foot
        data[junk] += TRANSIENT_AMP * sigma
        info = {"center": [float(c) for c in center], "radius_px": TRANSIENT_RADIUS,
                "amplitude_sigma": TRANSIENT_AMP}
    elif case == "fill":
        idx = _choose(rng, foot, FILL_COUNT)
        data.flat[idx] = FILL_VALUE
        junk.flat[idx] = True
        info = {"count": int(idx.size), "value": FILL_VALUE}
    else:
        raise ValueError(f"unknown junk case {case!r}; one of {JUNK_CASES}")
    return junk, info


def make_junk_case(case="clean", n=5, shape=(512, 512), degree=1, seed=0,
                   junk_member=2, total=False):
    """Exposures of an empty sky with backgrounds, noise and the junk of ``case``.

    Parameters
    ----------
    case : {'clean', 'cr', 'trail', 'transient', 'fill'}
    n : int
        Number of exposures.
    shape : tuple of int
        Grid shape (rows, columns).
    degree : int
        Injected background degree per axis (0, 1 or 2).
    seed : int
        Backgrounds, noise and junk draws; the same seed gives the same
        backgrounds and noise in every case.
    junk_member : int
        The one exposure that carries the junk.
    total : bool
        Only terms of total degree <= ``degree``.

    Returns
    -------
    Case
    """
    if case not in JUNK_CASES:
        raise ValueError(f"unknown junk case {case!r}; one of {JUNK_CASES}")
    shape = tuple(int(s) for s in shape)
    if min(shape) < 4 * (TRANSIENT_RADIUS + 2):
        raise ValueError(f"shape {shape}: at least {4 * (int(TRANSIENT_RADIUS) + 2)} px a side")
    if not 0 <= junk_member < n:
        raise ValueError(f"junk_member must be in 0..{n - 1}")
    w = grid_wcs(shape)
    xi, eta = grid_frame(shape)
    coefs = random_backgrounds(n, shape, degree, seed, level=3.0 * SIGMA,
                               spread=1.0 * SIGMA, change=3.0 * SIGMA, total=total)
    foots = junk_footprints(n, shape)
    models, bkgs, junks = [], [], []
    info = {"family": "junk", "case": case, "n": n, "shape": list(shape),
            "degree": int(degree), "total": bool(total), "seed": int(seed),
            "sigma": SIGMA, "junk_member": int(junk_member), "roll": ROLL,
            "pixscale": PIXSCALE}
    for k in range(n):
        bkg = md.poly_eval(coefs[k], xi, eta)
        noise = np.random.default_rng([seed, 2, k]).standard_normal(shape)
        data = bkg + SIGMA * noise
        junk = np.zeros(shape, dtype=bool)
        if k == junk_member:
            junk, jinfo = inject_junk(case, data, foots[k],
                                      np.random.default_rng([seed, 3]))
            info["junk"] = jinfo
        d, e, dq, wht = _finish(data, np.full(shape, SIGMA), foots[k])
        models.append(image_model(d, e, dq, wht, w, k, f"junk_{case}_{k + 1}",
                                  models[0] if models else None))
        bkgs.append(bkg)
        junks.append(junk)
    return Case(case, models, bkgs, foots, coefs, CRVAL, junks, info)


# ----------------------------------------------------------------------
# the real sky
def hdf_scene(shape=None, peak=SKY_PEAK):
    """scikit-image's Hubble deep field as a surface brightness map (MJy/sr).

    The RGB image is averaged to gray; its median (the sky of the 8-bit
    image) is removed and its own noise soft-thresholded at 3 MAD
    (``max(g - median - 3 MAD, 0)``); the brightest pixel is scaled to
    ``peak``. ``shape``: a crop (rows, columns) centered as near as the
    image allows on the brightest source (None: the whole 872 x 1000 image).
    """
    from scipy import ndimage
    from skimage import data as skdata

    g = skdata.hubble_deep_field().astype(np.float64).mean(axis=-1)
    med = np.median(g)
    mad = 1.4826 * np.median(np.abs(g - med))
    flux = np.maximum(g - med - 3.0 * mad, 0.0)
    if shape is not None:
        ny, nx = (min(int(s), n) for s, n in zip(shape, g.shape))
        sm = ndimage.uniform_filter(flux, 15)
        cy, cx = np.unravel_index(np.argmax(sm), sm.shape)
        y0 = int(np.clip(cy - ny // 2, 0, g.shape[0] - ny))
        x0 = int(np.clip(cx - nx // 2, 0, g.shape[1] - nx))
        flux = flux[y0:y0 + ny, x0:x0 + nx]
    return flux * (peak / flux.max())


def resample_bilinear(det, var, origin, grid_shape):
    """Bilinear resampling of a detector image onto the grid.

    Detector pixel (i, j) is centred on grid position ``(origin[0] + i,
    origin[1] + j)``; grid pixel (Y, X) takes the bilinear interpolation of
    the detector at ``(Y - origin[0], X - origin[1])`` and the variance
    ``sum w**2 var`` of its four detector pixels. Grid pixels outside the
    detector are NaN. Returns ``(data, variance, covered)``.
    """
    h, w = det.shape
    H, W = grid_shape
    iy = int(np.floor(-origin[0]))
    fy = -origin[0] - iy
    ix = int(np.floor(-origin[1]))
    fx = -origin[1] - ix
    # grid rows Y whose detector row y0 = Y + iy (and y0 + 1 when fy > 0) exist
    ylo, yhi = max(0, -iy), min(H, h - (fy > 0) - iy)
    xlo, xhi = max(0, -ix), min(W, w - (fx > 0) - ix)
    out = np.full(grid_shape, np.nan)
    vout = np.full(grid_shape, np.nan)
    covered = np.zeros(grid_shape, dtype=bool)
    if ylo >= yhi or xlo >= xhi:
        return out, vout, covered
    acc = np.zeros((yhi - ylo, xhi - xlo))
    vacc = np.zeros_like(acc)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            wgt = wy * wx
            if wgt == 0.0:
                continue
            sl = (slice(ylo + iy + dy, yhi + iy + dy), slice(xlo + ix + dx, xhi + ix + dx))
            acc += wgt * det[sl]
            vacc += wgt * wgt * var[sl]
    out[ylo:yhi, xlo:xhi] = acc
    vout[ylo:yhi, xlo:xhi] = vacc
    covered[ylo:yhi, xlo:xhi] = True
    return out, vout, covered


def make_sky_case(case="sky", n=6, shape=None, degree=1, seed=0, trail_member=2,
                  total=False, peak=SKY_PEAK, scene=None):
    """The Hubble deep field observed as ``n`` dithered exposures, resampled.

    Parameters
    ----------
    case : {'sky_clean', 'sky', 'sky_cr', 'sky_trail', 'sky_cr_trail'}
    n : int
        Number of exposures (at most ``len(SKY_DITHERS)``).
    shape : tuple of int, None
        Grid = crop of the field (None: the whole 872 x 1000 image).
    degree, seed, total
        As in :func:`make_junk_case` (backgrounds ~``SKY_LEVEL`` with
        changes of a few ``SKY_SIGMA`` across the grid).
    trail_member : int
        The exposure that carries the satellite trail.
    peak : float
        Brightest scene pixel (MJy/sr).
    scene : numpy.ndarray, None
        A precomputed :func:`hdf_scene` (reused across cases).

    Returns
    -------
    Case
    """
    from scipy import ndimage

    if case not in SKY_CASES:
        raise ValueError(f"unknown sky case {case!r}; one of {SKY_CASES}")
    if not 1 < n <= len(SKY_DITHERS):
        raise ValueError(f"n must be 2..{len(SKY_DITHERS)}")
    if scene is None:
        scene = hdf_scene(shape, peak)
    gshape = scene.shape
    m = SKY_MARGIN
    dshape = (gshape[0] - 2 * m, gshape[1] - 2 * m)
    if min(dshape) < 4 * (TRAIL_WIDTH + 2):
        raise ValueError(f"grid {gshape} too small")
    w = grid_wcs(gshape)
    xi, eta = grid_frame(gshape)
    coefs = random_backgrounds(n, gshape, degree, seed, level=SKY_LEVEL,
                               spread=0.1 * SKY_LEVEL, change=3.0 * SKY_SIGMA, total=total)
    with_sources = case != "sky_clean"
    with_cr = case in ("sky_cr", "sky_cr_trail")
    with_trail = case in ("sky_trail", "sky_cr_trail")
    jit = np.random.default_rng([seed, 5]).uniform(-0.2, 0.2, (n, 2))
    info = {"family": "sky", "case": case, "n": n, "shape": list(gshape),
            "degree": int(degree), "total": bool(total), "seed": int(seed),
            "sigma": SKY_SIGMA, "peak": float(peak), "margin": m, "roll": ROLL,
            "pixscale": PIXSCALE, "trail_member": int(trail_member) if with_trail else None,
            "dithers": [], "cr_count": [], "trail": None}
    models, bkgs, foots, junks = [], [], [], []
    for k in range(n):
        oy, ox = np.add(SKY_DITHERS[k], jit[k])
        origin = (m + oy, m + ox)
        info["dithers"].append([float(oy), float(ox)])
        if with_sources:
            yy, xx = np.indices(dshape, dtype=np.float64)
            det = ndimage.map_coordinates(scene, [yy + origin[0], xx + origin[1]],
                                          order=3, mode="nearest")
            del yy, xx
        else:
            det = np.zeros(dshape)
        var = SKY_SIGMA ** 2 * (1.0 + np.maximum(det, 0.0) / SKY_POISSON_REF)
        det = det + np.sqrt(var) * np.random.default_rng([seed, 2, k]).standard_normal(dshape)
        jdet = np.zeros(dshape, dtype=bool)
        rng = np.random.default_rng([seed, 3, k])
        ncr = 0
        if with_cr:
            idx = _choose(rng, np.ones(dshape, dtype=bool),
                          int(round(SKY_CR_FRACTION * det.size)))
            det.flat[idx] += rng.uniform(*CR_RANGE, idx.size) * SKY_SIGMA
            jdet.flat[idx] = True
            ncr = int(idx.size)
        info["cr_count"].append(ncr)
        if with_trail and k == trail_member:
            trng = np.random.default_rng([seed, 4])
            point = (trng.uniform(0.3, 0.7) * dshape[0], trng.uniform(0.3, 0.7) * dshape[1])
            angle = float(trng.uniform(-40.0, 40.0))
            band = band_mask(dshape, point, angle, TRAIL_WIDTH)
            det[band] += TRAIL_AMP * SKY_SIGMA
            jdet |= band
            info["trail"] = {"member": int(k), "point_detector": [float(p) for p in point],
                             "angle_deg": angle, "width_px": TRAIL_WIDTH,
                             "amplitude_sigma": TRAIL_AMP, "pixels_detector": int(band.sum())}
        grid, gvar, foot = resample_bilinear(det, var, origin, gshape)
        jgrid, _, _ = resample_bilinear(jdet.astype(np.float64), var, origin, gshape)
        junk = foot & (jgrid > 0)
        bkg = md.poly_eval(coefs[k], xi, eta)
        d, e, dq, wht = _finish(grid + bkg, np.sqrt(gvar), foot)
        models.append(image_model(d, e, dq, wht, w, k, f"{case}_{k + 1}",
                                  models[0] if models else None))
        bkgs.append(bkg)
        foots.append(foot)
        junks.append(junk)
    return Case(case, models, bkgs, foots, coefs, CRVAL, junks, info)


def make_case(case, seed=0, degree=1, total=False, size=None, sky_size=None, n=None,
              scene=None):
    """Either family by case name; ``size`` (junk grid side), ``sky_size``
    (crop side, None: the whole field), ``n`` (None: 5 junk, 6 sky)."""
    if case in JUNK_CASES:
        side = 512 if size is None else int(size)
        return make_junk_case(case, n=n or 5, shape=(side, side), degree=degree,
                              seed=seed, total=total)
    shape = None if sky_size is None else (int(sky_size), int(sky_size))
    return make_sky_case(case, n=n or 6, shape=shape, degree=degree, seed=seed,
                         total=total, scene=scene)


# ----------------------------------------------------------------------
def write_case(folder, case):
    """Save the models, an image3 association and ``truth.json``; returns the
    association path."""
    os.makedirs(folder, exist_ok=True)
    names = []
    for m in case.models:
        m.save(os.path.join(folder, m.meta.filename))
        names.append(m.meta.filename)
    asn = md.write_asn(folder, names, product=f"wiimatch_{case.name}",
                       name=f"asn_{case.name}.json")
    with open(os.path.join(folder, f"truth_{case.name}.json"), "w") as fh:
        json.dump(case.truth(), fh, indent=1)
    return asn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="where to write the models, association and truth")
    ap.add_argument("--case", default="clean", choices=CASES + ("all",),
                    help="case to write ('all': every case)")
    ap.add_argument("--size", type=int, default=512, help="junk grid side (px)")
    ap.add_argument("--sky-size", type=int, default=None,
                    help="real-sky crop side (px; default the whole 872x1000 field)")
    ap.add_argument("--n", type=int, default=None, help="exposures (default 5 junk, 6 sky)")
    ap.add_argument("--degree", type=int, default=1, help="injected degree per axis (0-2)")
    ap.add_argument("--total", action="store_true", help="total-degree terms only")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cases = CASES if args.case == "all" else (args.case,)
    for name in cases:
        case = make_case(name, args.seed, args.degree, args.total, args.size,
                         args.sky_size, args.n)
        asn = write_case(args.folder, case)
        print(f"{name}: {len(case.models)} models {case.models[0].data.shape} -> {asn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
