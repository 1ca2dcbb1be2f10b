"""Tests of jwst_wiimatch.models: masks, sigma, frame coordinates, evaluation."""

import numpy as np
import pytest

import oracle as O
import step_helpers as h

from jwst_wiimatch import models as adapters


@pytest.mark.parametrize(
    "ra0, dec0",
    [(0.0, 0.0), (359.99, 10.0), (0.01, -30.0), (150.0, 89.99), (210.0, -89.999)],
)
def test_tangent_plane_matches_vector_formula(ra0, dec0):
    rng = np.random.default_rng(3)
    # points within ~0.1 deg of the tangent point (crossing RA = 0 / the pole)
    ra = ra0 + rng.uniform(-5, 5, 200) * (0.02 if abs(dec0) < 80 else 20)
    dec = np.clip(dec0 + rng.uniform(-0.1, 0.1, 200), -90, 90)
    xi, eta = adapters.tangent_plane(ra % 360.0, dec, ra0, dec0)
    rxi, reta = h.standard_coords(ra, dec, ra0, dec0)
    np.testing.assert_allclose(xi, rxi, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(eta, reta, rtol=1e-9, atol=1e-12)


def test_tangent_plane_continuous_across_ra_zero():
    xi, eta = adapters.tangent_plane([359.999, 0.0, 0.001], [0.0, 0.0, 0.0], 0.0, 0.0)
    assert xi[0] < xi[1] < xi[2]
    np.testing.assert_allclose(xi, [-0.001, 0.0, 0.001], atol=1e-9)


def test_tangent_plane_far_side_is_nan():
    xi, eta = adapters.tangent_plane([180.0], [0.0], 0.0, 0.0)
    assert np.isnan(xi[0]) and np.isnan(eta[0])


def test_interpret_dqbits():
    assert adapters.interpret_dqbits("~DO_NOT_USE+NON_SCIENCE") == ~(1 | 512)
    assert adapters.interpret_dqbits(None) is None
    assert adapters.interpret_dqbits("") is None
    with pytest.raises(ValueError, match="dqbits"):
        adapters.interpret_dqbits("~NOT_A_FLAG+DO_NOT_USE")
    with pytest.raises(ValueError, match="dqbits"):
        adapters.interpret_dqbits("~~DO_NOT_USE")


def test_valid_mask_components():
    from stdatamodels.jwst.datamodels import ImageModel

    data = np.ones((4, 5), dtype=np.float32)
    data[0, 0] = np.nan
    err = np.full((4, 5), 0.1, dtype=np.float32)
    err[0, 1] = 0.0
    err[0, 2] = np.inf
    dq = np.zeros((4, 5), dtype=np.uint32)
    dq[1, 0] = 1  # DO_NOT_USE
    dq[1, 1] = 512  # NON_SCIENCE
    dq[1, 2] = 4  # JUMP_DET: not selected as bad by the default
    wht = np.ones((4, 5), dtype=np.float32)
    wht[2, 0] = 0.0
    m = ImageModel(data=data, err=err, dq=dq, wht=wht)
    flags = adapters.interpret_dqbits(adapters.DEFAULT_DQBITS)
    mask = adapters.valid_mask(m, flags)
    bad = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)}
    for idx in np.ndindex(mask.shape):
        assert mask[idx] == (idx not in bad), idx
    # DQ ignored
    mask = adapters.valid_mask(m, None)
    assert mask[1, 0] and mask[1, 1]


def test_sigma_absent_and_conversions():
    from stdatamodels.jwst.datamodels import IFUCubeModel, ImageModel

    m = ImageModel(data=np.ones((3, 3), dtype=np.float32))
    assert adapters.model_sigma(m) is None
    # a default-filled (all zero) ERR carries no information
    c = IFUCubeModel((2, 3, 3))
    assert adapters.model_sigma(c) is None
    c.err = np.full((2, 3, 3), 4.0, dtype=np.float32)
    c.meta.ifu.error_type = "VAR"
    np.testing.assert_allclose(adapters.model_sigma(c), 2.0)
    c.meta.ifu.error_type = "IVAR"
    np.testing.assert_allclose(adapters.model_sigma(c), 0.5)
    c.meta.ifu.error_type = "ERR"
    np.testing.assert_allclose(adapters.model_sigma(c), 4.0)


def test_frame_coordinates_of_grid():
    models, _, ref = h.make_models(n=1, shape=(12, 15), crval=(0.001, -5.0))
    xi, eta = adapters.frame_coordinates(models[0], ref)
    w = models[0].meta.wcs
    y, x = np.indices((12, 15), dtype=float)
    ra, dec = w(x, y)
    rxi, reta = h.standard_coords(ra, dec, ref[0], ref[1])
    np.testing.assert_allclose(xi, rxi, atol=1e-12)
    np.testing.assert_allclose(eta, reta, atol=1e-12)
    assert adapters.default_refpoint(models[0]) == pytest.approx(ref)


def test_evaluate_background_on_another_grid():
    """A recorded polynomial evaluates on a different image through its own WCS."""
    ref = [0.002, 60.0]
    coef = np.array([[1.5, 30.0, -200.0], [-40.0, 500.0, 0.0]])
    info = {"degree": [1, 2], "refpoint": ref, "coefficients": coef.ravel().tolist()}
    from stdatamodels.jwst.datamodels import ImageModel

    other = ImageModel(data=np.zeros((20, 25), dtype=np.float32))
    other.meta.wcs = h.tan_wcs((20, 25), (359.995, 60.003), 0.2, rotation_deg=77.0)
    bkg = adapters.evaluate_background(other, info)
    y, x = np.indices((20, 25), dtype=float)
    ra, dec = other.meta.wcs(x, y)
    xi, eta = h.standard_coords(ra, dec, ref[0], ref[1])
    np.testing.assert_allclose(bkg, O.polyval_nd(coef, [xi, eta]), rtol=1e-10, atol=1e-10)


def test_evaluate_background_cube():
    models, _, ref = h.make_models(n=1, shape=(4, 10, 11), cube=True)
    coef = np.arange(8, dtype=float).reshape(2, 2, 2) + 1
    info = {"degree": [1, 1, 1], "refpoint": ref, "coefficients": coef.ravel()}
    bkg = adapters.evaluate_background(models[0], info)
    w = models[0].meta.wcs
    z, y, x = np.indices((4, 10, 11), dtype=float)
    ra, dec, lam = w(x, y, z)
    xi, eta = h.standard_coords(ra, dec, ref[0], ref[1])
    np.testing.assert_allclose(bkg, O.polyval_nd(coef, [xi, eta, lam - ref[2]]), rtol=1e-10)


def test_polynomial_coefficients_size_check():
    with pytest.raises(ValueError, match="coefficients"):
        adapters.polynomial_coefficients(
            {"degree": [1, 1], "refpoint": [0, 0], "coefficients": [1, 2, 3]})


def test_grid_checker():
    a, _, _ = h.make_models(n=1, shape=(10, 12))
    b, _, _ = h.make_models(n=1, shape=(10, 13))
    c, _, _ = h.make_models(n=1, shape=(10, 12), crval=(150.0001, 2.0))
    d, _, _ = h.make_models(n=1, shape=(10, 12), seed=5)
    chk = adapters.GridChecker(a[0], "first")
    chk.check(d[0], "same grid")  # different data, same grid: fine
    with pytest.raises(ValueError, match="second.*shape"):
        chk.check(b[0], "second")
    with pytest.raises(ValueError, match="third.*WCS"):
        chk.check(c[0], "third")
    b[0].meta.wcs = None
    with pytest.raises(ValueError, match="meta.wcs"):
        adapters.GridChecker(b[0], "nowcs")


def test_check_refpoint():
    assert adapters.check_refpoint(None, 2) is None
    assert adapters.check_refpoint([-10.0, 5.0], 2) == [350.0, 5.0]
    assert adapters.check_refpoint("1.5, 2.5", 2) == [1.5, 2.5]
    assert adapters.check_refpoint([1, 2, 5.0], 3) == [1.0, 2.0, 5.0]
    for bad in ([1.0], [1.0, 2.0, 3.0], ["a", "b"], [1.0, 95.0]):
        with pytest.raises(ValueError, match="refpoint|declination"):
            adapters.check_refpoint(bad, 2)


def test_subtract_background_keeps_nan():
    from stdatamodels.jwst.datamodels import ImageModel

    data = np.array([[1.0, np.nan], [3.0, 4.0]], dtype=np.float32)
    m = ImageModel(data=data.copy())
    adapters.subtract_background(m, np.array([[0.5, 0.5], [np.nan, 1.0]]), level=0.25)
    np.testing.assert_allclose(m.data, [[0.25, np.nan], [3.0, 2.75]])
    assert m.data.dtype == np.float32


@pytest.mark.parametrize("rows", [7, 256])
def test_subtract_polynomial_equals_full_grid_subtraction(rows, monkeypatch):
    """Band-by-band subtraction over the finite box == subtracting the evaluated array."""
    from jwst_wiimatch.models import records

    monkeypatch.setattr(records, "SUBTRACT_ROWS", rows)
    models, _, ref = h.make_models(n=1, shape=(61, 47), degree=2)
    m = models[0]
    info = {"degree": [2, 2], "refpoint": ref,
            "coefficients": list(np.arange(1.0, 10.0) * [1, 30, 900, -20, 400, 5, 7, 3, 1])}
    expected = m.copy()
    adapters.subtract_background(expected, adapters.evaluate_background(expected, info),
                                 level=0.25)
    records.subtract_polynomial(m, info, level=0.25)
    np.testing.assert_array_equal(np.isnan(m.data), np.isnan(expected.data))
    np.testing.assert_allclose(m.data, expected.data, rtol=1e-6, atol=1e-6)
    assert m.data.dtype == expected.data.dtype
