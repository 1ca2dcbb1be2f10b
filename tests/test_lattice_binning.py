"""Coordinate lattices (WCS on a few pixels, splines in between) and block averages."""
import numpy as np
import pytest

import step_helpers as h
from jwst_wiimatch.core.binning import bin_image
from jwst_wiimatch.models import frame as fr


def _distorted_wcs(shape, crval=(53.16, -27.79), pixscale=0.031, k2=2e-5):
    """A TAN gwcs with a radial (barrel-like) distortion of detector pixels."""
    from astropy.modeling import models

    w = h.tan_wcs(shape, crval, pixscale_arcsec=pixscale, rotation_deg=17.0)
    ny, nx = shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    # x' = x + k2 * (x - cx) * r**2 / n, same for y: a smooth distortion of several pixels
    dist = models.Mapping((0, 1, 0, 1)) | (
        models.Polynomial2D(3, c0_0=0, c1_0=1, **{"c3_0": k2 / nx, "c1_2": k2 / nx})
        & models.Polynomial2D(3, c0_1=1, **{"c0_3": k2 / nx, "c2_1": k2 / nx}))
    shift_in = models.Shift(-cx) & models.Shift(-cy)
    shift_out = models.Shift(cx) & models.Shift(cy)
    from gwcs import wcs

    forward = shift_in | dist | shift_out | w.forward_transform
    out = wcs.WCS([(w.input_frame, forward), (w.output_frame, None)])
    return out


@pytest.mark.parametrize("shape", [(2048, 2048), (300, 517), (5, 900), (1, 40)])
def test_lattice_error_bound_holds_at_every_pixel(shape):
    wcs = _distorted_wcs(shape)
    ref = [53.16, -27.79]
    func = fr.frame_function(wcs, ref)
    lat = fr.CoordinateLattice(func, shape)
    ny, nx = shape
    # every pixel of the grid (rows in chunks), against the WCS itself
    worst = [0.0, 0.0]
    spans = []
    exact_all = [np.empty(shape), np.empty(shape)]
    for r0 in range(0, ny, 256):
        rows = slice(r0, min(ny, r0 + 256))
        gx, gy = np.meshgrid(np.arange(nx, dtype=float), np.arange(rows.start, rows.stop,
                                                                   dtype=float))
        exact = func(gx.ravel(), gy.ravel())
        got = lat.box(rows, slice(0, nx))
        for j in range(2):
            e = np.asarray(exact[j]).reshape(gx.shape)
            exact_all[j][rows] = e
            worst[j] = max(worst[j], float(np.max(np.abs(got[j] - e))))
    spans = [float(np.ptp(e)) for e in exact_all]
    for j in range(2):
        assert worst[j] <= fr.LATTICE_RTOL * spans[j], (worst, spans, lat.step)
    # a degree-2 background evaluated from the lattice: error < 1e-6 of its range
    coef = np.array([[1.0, 30.0, 900.0], [-20.0, 400.0, 0.0], [500.0, 0.0, 0.0]])
    from numpy.polynomial.polynomial import polyval2d

    exact_bkg = polyval2d(*exact_all, coef)
    lat_bkg = polyval2d(*lat.box(slice(0, ny), slice(0, nx)), coef)
    rng_bkg = float(np.ptp(exact_bkg)) or 1.0
    assert np.max(np.abs(lat_bkg - exact_bkg)) < 1e-6 * rng_bkg


def test_lattice_uses_few_wcs_evaluations():
    shape = (2048, 2048)
    calls = []
    wcs = _distorted_wcs(shape)
    func = fr.frame_function(wcs, [53.16, -27.79])

    def counting(x, y):
        calls.append(np.size(x))
        return func(x, y)

    fr.CoordinateLattice(counting, shape)
    assert sum(calls) < 0.01 * shape[0] * shape[1]


def test_lattice_refuses_non_finite_coordinates():
    def half_sky(x, y):
        return np.where(x > 10, np.nan, x * 1.0), y * 1.0

    with pytest.raises(ValueError, match="not finite"):
        fr.CoordinateLattice(half_sky, (50, 50))


def _brute_bin(data, sigma, valid, f, start):
    """Block means by explicit loops over the blocks of the global grid."""
    ny, nx = data.shape
    y0, x0 = start
    out = {}
    for iy in range(ny):
        for ix in range(nx):
            gy, gx = iy + y0, ix + x0
            if not valid[iy, ix] or not np.isfinite(data[iy, ix]):
                continue
            w = 1.0 if sigma is None else 1.0 / sigma[iy, ix] ** 2
            key = (gy // f, gx // f)
            sw, swd, n = out.get(key, (0.0, 0.0, 0))
            out[key] = (sw + w, swd + w * data[iy, ix], n + 1)
    return out


@pytest.mark.parametrize("f,start,with_sigma", [(1, (0, 0), True), (3, (0, 0), True),
                                                (4, (5, 2), False), (7, (13, 29), True)])
def test_bin_image_against_loops(f, start, with_sigma):
    rng = np.random.default_rng(f)
    data = rng.normal(3, 1, (17, 23))
    data[2, 3] = np.nan
    sigma = rng.uniform(0.5, 2, data.shape) if with_sigma else None
    valid = rng.random(data.shape) > 0.25
    mean, sig, count, origin = bin_image(data, sigma, valid, f, start)
    ref = _brute_bin(data, sigma, valid, f, start)
    for (by, bx), (sw, swd, n) in ref.items():
        i, j = by - origin[0], bx - origin[1]
        assert mean[i, j] == pytest.approx(swd / sw, rel=1e-12)
        assert sig[i, j] == pytest.approx(1 / np.sqrt(sw), rel=1e-12)
        assert count[i, j] == n
    assert int(np.count_nonzero(count)) == len(ref)
    assert np.all(sig[count == 0] == 0)


def test_bin_image_refuses_bad_factor():
    with pytest.raises(ValueError, match="binning factor"):
        bin_image(np.ones((4, 4)), None, np.ones((4, 4), bool), 0)


@pytest.mark.parametrize("shape, rows, cols", [
    ((2048, 2048), slice(0, 2048), slice(0, 2048)),
    ((300, 517), slice(17, 150), slice(3, 517)),
    ((5, 900), slice(0, 5), slice(100, 101)),
])
def test_lattice_box_equals_the_splines(shape, rows, cols):
    """The box's matrix-product evaluation gives the splines' own values (FITPACK's)."""
    wcs = _distorted_wcs(shape)
    lat = fr.CoordinateLattice(fr.frame_function(wcs, [53.16, -27.79]), shape)
    assert lat._splines is not None
    ys = np.arange(rows.start, rows.stop, dtype=float)
    xs = np.arange(cols.start, cols.stop, dtype=float)
    got = lat.box(rows, cols)
    for g, s in zip(got, lat._splines):
        ref = s(ys, xs)
        assert g.shape == ref.shape == (ys.size, xs.size)
        np.testing.assert_allclose(g, ref, rtol=0, atol=1e-12 * float(np.ptp(ref) or 1.0))
