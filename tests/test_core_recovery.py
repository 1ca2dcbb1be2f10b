"""Recovery of injected backgrounds, statistics under noise, and the
never-silent-NaN handling of disconnected / isolated / undetermined cases."""
import re
import warnings

import numpy as np
import pytest
from scipy import stats

import oracle as O
from jwst_wiimatch import core
from jwst_wiimatch.match import match_lsq

SOLVERS = ["RLU", "PINV"]


def inject(rng, shape, nimages, degree, coords, amp=1.0):
    """Common random sky + per-image polynomial P_n; returns images and the
    true coefficients (N, M)."""
    degt = (degree,) * len(shape) if np.ndim(degree) == 0 else tuple(degree)
    M = int(np.prod([d + 1 for d in degt]))
    sky = rng.normal(scale=5.0, size=shape)
    ctrue = rng.normal(scale=amp, size=(nimages, M))
    surf = O.surfaces(ctrue, coords, degt)
    return [sky + surf[n] for n in range(nimages)], ctrue, degt


def zero_sum(c):
    return c - c.mean(axis=0)


def user_warnings(rec):
    return [w for w in rec if issubclass(w.category, UserWarning)]


# ------------------------------------------------------------ noise-free
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape, degree, center, seed", [
    ((15,), 3, None, 1),
    ((15,), 2, (3.0,), 2),
    ((9, 11), 1, None, 3),
    ((9, 11), 2, None, 4),
    ((9, 11), (3, 1), (4.5, 3.0), 5),
    ((10, 10), (0, 2), None, 6),
    ((5, 6, 7), 1, None, 7),
    ((5, 6, 7), (2, 1, 1), (3.0, 2.0, 2.0), 8),
])
def test_noise_free_recovery(shape, degree, center, seed, solver):
    rng = np.random.default_rng(seed)
    n = 4
    masks = O.box_masks(rng, shape, n, frac=0.75, holes=0.05,
                        full_first=False)
    assert len(O.overlap_groups([np.zeros(shape)] * n, masks)) == 1
    coords, _, _ = O.oracle_coords(shape, center)
    images, ctrue, degt = inject(rng, shape, n, degree, coords)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        coef = match_lsq(images, masks, degree=degree, center=center,
                         solver=solver)
    expected = zero_sum(ctrue)
    err = np.max(np.abs(coef - expected)) / np.max(np.abs(expected))
    assert err <= 1e-9, err
    # differences between images do not depend on the normalisation
    d = (coef[1:] - coef[0]) - (ctrue[1:] - ctrue[0])
    assert np.max(np.abs(d)) <= 1e-9 * np.max(np.abs(ctrue))


# ------------------------------------------------------------ with noise
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape, degree, seed", [
    ((10, 12), 1, 1), ((10, 12), (2, 1), 2), ((25,), 2, 3),
    ((4, 5, 6), (1, 0, 1), 4)])
def test_noise_within_statistical_error(shape, degree, seed, solver):
    rng = np.random.default_rng(seed)
    n = 3
    masks = O.box_masks(rng, shape, n, frac=0.7, full_first=True)
    coords, _, _ = O.oracle_coords(shape)
    clean, ctrue, degt = inject(rng, shape, n, degree, coords)
    sig = [rng.uniform(0.05, 0.2, size=shape) for _ in range(n)]
    images = [c + rng.normal(size=shape) * s for c, s in zip(clean, sig)]
    coef = match_lsq(images, masks, sig, degree=degree, solver=solver)
    cov = O.estimator_covariance(images, masks, sig, degt)
    d = (coef - zero_sum(ctrue)).ravel()
    sd = np.sqrt(np.diag(cov))
    # every coefficient within 5 sigma of the truth ...
    assert np.all(np.abs(d) <= 5 * sd + 1e-12), np.abs(d) / sd
    # ... and jointly: chi^2 with (N-1)M degrees of freedom
    M = ctrue.shape[1]
    dof = (n - 1) * M
    chi2 = d @ np.linalg.pinv(cov, rcond=1e-10, hermitian=True) @ d
    assert chi2 <= stats.chi2.ppf(1 - 1e-6, dof), chi2
    # the estimator is the least-squares one: equal to the oracle's
    coef_o = O.oracle_solve(images, masks, sig, degt)
    assert np.max(np.abs(coef - coef_o)) <= 1e-8 * np.max(np.abs(coef_o))


# ------------------------------------------------------------ world coords
def sky_image2world(x, y):
    """0.05 deg field near RA=150, Dec=2 with mild distortion (degrees)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    u = x / 23.0
    v = y / 19.0
    ra = 150.0 + 0.05 * u + 0.002 * u * v + 0.001 * u ** 2
    dec = 2.0 + 0.05 * v - 0.0015 * u * v + 0.0008 * v ** 2
    return ra, dec


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("center, center_cs", [
    (None, "image"), ((11.0, 9.0), "image"), ((150.03, 2.02), "world")])
def test_world_coordinates_degree3(center, center_cs, solver):
    rng = np.random.default_rng(33)
    shape = (20, 24)
    n = 4
    masks = O.box_masks(rng, shape, n, frac=0.7, holes=0.05)
    coords_o, eff_o, _ = O.oracle_coords(shape, center, sky_image2world,
                                         center_cs)
    # injected surfaces: cubic polynomials in (ra, dec) offsets of unit
    # amplitude over the field
    half = 0.025
    exps = O.exponents((3, 3))
    ctrue = np.array([[rng.normal() / half ** sum(p) for p in exps]
                      for _ in range(n)])
    strue = O.surfaces(ctrue, coords_o, (3, 3))
    sky = rng.normal(scale=3.0, size=shape)
    images = [sky + s for s in strue]
    coef, a, b, coords, eff, cs = match_lsq(
        images, masks, degree=3, center=center, image2world=sky_image2world,
        center_cs=center_cs, solver=solver, ext_return=True)
    assert cs == "world"
    assert np.all(np.isfinite(coef))
    sfit = O.surfaces(coef, [np.asarray(c) for c in coords], (3, 3))
    expected = strue - strue.mean(axis=0)
    amp = np.max(np.abs(strue))
    err = np.max(np.abs(sfit - expected)) / amp
    assert err <= 1e-6, err


# ------------------------------------------------------------ groups
def disconnected_problem(rng, shape=(12, 12), degree=1):
    """Images 0,1 overlap (group A, left), 2,3,4 overlap (group B, right),
    5 alone (bottom-right corner, touched by no one), 6 has no valid pixel.
    """
    n = 7
    masks = [np.zeros(shape, dtype=bool) for _ in range(n)]
    masks[0][:6, 0:4] = True
    masks[1][:6, 1:5] = True
    masks[2][:7, 6:10] = True
    masks[3][1:7, 7:11] = True
    masks[4][:5, 6:12] = True
    masks[5][9:, 9:] = True
    coords, _, _ = O.oracle_coords(shape)
    images, ctrue, degt = inject(rng, shape, n, degree, coords)
    return images, masks, ctrue, degt


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("with_sigmas", [False, True])
def test_disconnected_groups_and_isolated(solver, with_sigmas):
    rng = np.random.default_rng(5)
    images, masks, ctrue, degt = disconnected_problem(rng)
    sig = [np.full(images[0].shape, 0.5 + 0.1 * i) for i in range(7)] \
        if with_sigmas else None
    groups = O.overlap_groups(images, masks, sig)
    assert sorted(map(sorted, groups)) == [[0, 1], [2, 3, 4], [5], [6]]
    with pytest.warns(UserWarning) as rec:
        coef = match_lsq(images, masks, sig, degree=degt, solver=solver)
    text = " ".join(str(w.message) for w in user_warnings(rec))
    for isolated in (5, 6):
        assert re.search(rf"\b{isolated}\b", text), text
    assert np.all(np.isfinite(coef))
    # isolated images get 0; each group sums to zero
    assert np.all(coef[5] == 0) and np.all(coef[6] == 0)
    np.testing.assert_allclose(O.group_sums(coef, groups), 0, atol=1e-10)
    # within each group the injected differences are recovered
    for g in ([0, 1], [2, 3, 4]):
        np.testing.assert_allclose(coef[g], zero_sum(ctrue[g]), rtol=0,
                                   atol=1e-9 * np.abs(ctrue).max())
    np.testing.assert_allclose(coef, O.oracle_solve(images, masks, sig,
                                                    degt),
                               rtol=0, atol=1e-9 * np.abs(ctrue).max())


@pytest.mark.parametrize("solver", SOLVERS)
def test_disconnected_match_backgrounds(solver):
    rng = np.random.default_rng(6)
    images, masks, ctrue, degt = disconnected_problem(rng)
    with pytest.warns(UserWarning):
        res = core.match_backgrounds(images, masks, degree=degt,
                                     solver=solver)
    assert np.all(np.isfinite(res.coef))
    comps = {frozenset(int(i) for i in c) for c in res.components}
    assert {frozenset({0, 1}), frozenset({2, 3, 4})} <= comps
    flat = [int(i) for c in res.components for i in c]
    assert len(flat) == len(set(flat))
    assert not {0, 1, 2, 3, 4} & {i for c in res.components if len(c) == 1
                                  for i in c}
    npix = np.asarray(res.npix)
    assert npix[5] == 0 and npix[6] == 0 and np.all(npix[:5] > 0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_two_images_no_overlap(solver):
    shape = (6, 6)
    m0 = np.zeros(shape, bool)
    m0[:, :3] = True
    images = [np.ones(shape), 3 * np.ones(shape)]
    with pytest.warns(UserWarning):
        coef = match_lsq(images, [m0, ~m0], degree=1, solver=solver)
    assert coef.shape == (2, 4)
    assert np.all(coef == 0)


# ------------------------------------------------------------ undetermined
@pytest.mark.parametrize("solver", SOLVERS)
def test_undetermined_term(solver):
    """Image 2 touches the others along a single column only: its constant
    and x terms cannot be separated (only c0 + c1 * x_col is determined)."""
    rng = np.random.default_rng(8)
    shape = (10, 12)
    masks = O.box_masks(rng, shape, 3, frac=0.7)
    masks[0][:] = True
    masks[0][:, 9:] = False
    masks[1][:] = False
    masks[1][2:9, 1:7] = True
    masks[2][:] = False
    masks[2][:, 8:] = True          # overlaps image 0 in column x = 8 only
    coords, _, _ = O.oracle_coords(shape)
    images, ctrue, degt = inject(rng, shape, 3, (1, 1), coords)
    coef_o, info = O.oracle_solve(images, masks, None, degt,
                                  return_info=True)
    assert not info["determined"] and len(info["groups"]) == 1
    with pytest.warns(UserWarning) as rec1:
        res = core.match_backgrounds(images, masks, degree=degt,
                                     solver=solver)
    with pytest.warns(UserWarning) as rec2:
        coef = match_lsq(images, masks, degree=degt, solver=solver)
    # the warning names the image whose terms are undetermined
    for rec in (rec1, rec2):
        text = " ".join(str(w.message) for w in user_warnings(rec))
        assert re.search(r"\b2\b", text), text
    for c in (coef, res.coef):
        assert np.all(np.isfinite(c))
        np.testing.assert_allclose(c.sum(axis=0), 0, atol=1e-9)
        # least squares optimum reached (noise-free: zero objective) and
        # the determined combinations equal the oracle's
        A, r = info["A"], info["r"]
        np.testing.assert_allclose(A @ c.ravel(), A @ coef_o.ravel(),
                                   rtol=0, atol=1e-9 * np.abs(r).max())
        assert O.objective(c, images, masks, None, degt) <= \
            1e-16 * float(r @ r) + 1e-20
    und = list(res.undetermined)
    assert und
    assert 2 in {int(img) for img, _ in und}
    for img, p in und:
        assert 0 <= int(img) < 3
        assert len(tuple(p)) == 2
        assert all(0 <= int(e) <= 1 for e in p)


# ------------------------------------------------------------ diagnostics
@pytest.mark.parametrize("solver", SOLVERS)
def test_rms_before_and_after(solver):
    rng = np.random.default_rng(9)
    shape = (7, 8)
    sky = rng.normal(size=shape)
    images = [sky, sky + 3.0]
    # sigma^2 + sigma^2 = 1: weight 1, so any weighted-RMS convention gives
    # the plain RMS of the difference, which is 3 before and 0 after
    sig = [np.full(shape, np.sqrt(0.5))] * 2
    res = core.match_backgrounds(images, None, sig, degree=0, solver=solver)
    np.testing.assert_allclose(np.asarray(res.rms_before), [3.0, 3.0],
                               rtol=1e-12)
    np.testing.assert_allclose(np.asarray(res.rms), [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(res.coef.ravel(), [-1.5, 1.5], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(res.npix), [56, 56])
    assert int(np.asarray(res.pair_npix)[0, 1]) == 56
