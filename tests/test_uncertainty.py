"""Covariance of the coefficients (sandwich estimator) against Monte Carlo scatter."""
import numpy as np
import pytest

from jwst_wiimatch.core.engine import match_backgrounds
from jwst_wiimatch.core.solve import assemble
from jwst_wiimatch.core.uncertainty import coefficient_covariance

SHAPE = (30, 34)
ORIGINS = [(0, 0), (0, 8), (6, 2), (4, 10)]  # numpy order: pairs, triples and quadruples
SIZE = (24, 24)
SIGMAS = [1.0, 1.5, 0.7, 1.2]


def _draws(ndraw=200, seed=3, **kw):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE[0], :SIZE[1]]
    planes = [1.0 * k + 0.01 * (k - 1) * (xx + o[1]) - 0.005 * k * (yy + o[0])
              for k, o in enumerate(ORIGINS)]
    coefs, res = [], None
    for _ in range(ndraw):
        imgs = [p + s * rng.standard_normal(SIZE) for p, s in zip(planes, SIGMAS)]
        r = match_backgrounds(imgs, sigmas=SIGMAS, degree=1, origins=ORIGINS,
                              grid_shape=SHAPE, covariance=res is None, **kw)
        if res is None:
            res = r
        coefs.append(r.coef.ravel())
    return res, np.array(coefs)


def _naive(res):
    """A^+ restricted as the solve does, ignoring the pixels shared by pairs."""
    n = res.coef.shape[0]
    a_u, _ = assemble(n, res.degree, res.moments.S, res.moments.T)
    fixed = {i for c in res.conventions for i in c["reference"]}
    return coefficient_covariance(a_u, a_u, n, res.components, res.degree, res.frame,
                                  fixed=fixed)


@pytest.mark.parametrize("level", ["zero_sum", "lowest"])
def test_sandwich_matches_monte_carlo_and_naive_does_not(level):
    res, coefs = _draws(level=level)
    measured = coefs.std(axis=0, ddof=1)
    predicted = np.sqrt(np.diag(res.covariance))
    free = measured > 1e-12  # held images (level='lowest') have no scatter
    assert np.all(predicted[~free] < 1e-12)
    ratio = predicted[free] / measured[free]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    # background at the reference point (X = 0): the constant terms
    m = res.coef.shape[1]
    at_ref = slice(0, None, m)
    r0 = predicted[at_ref][free[at_ref]] / measured[at_ref][free[at_ref]]
    assert np.all(np.abs(r0 - 1) < 0.2), r0
    # the naive inverse of the normal matrix is measurably wrong
    # (it underestimates: about 0.75 of the measured scatter here)
    naive = np.sqrt(np.diag(_naive(res)))[free] / measured[free]
    assert np.median(naive) < 0.85 and np.max(np.abs(naive - 1)) > 0.25, naive
    # and the full covariance (correlations included) matches too
    emp = np.cov(coefs[:, free].T)
    pred = res.covariance[np.ix_(free, free)]
    scale = np.sqrt(np.outer(np.diag(emp), np.diag(emp)))
    assert np.max(np.abs(pred - emp) / scale) < 0.25


def test_covariance_off_by_default_and_results_identical():
    rng = np.random.default_rng(0)
    imgs = [rng.standard_normal(SIZE) for _ in ORIGINS]
    a = match_backgrounds(imgs, sigmas=SIGMAS, degree=1, origins=ORIGINS, grid_shape=SHAPE)
    b = match_backgrounds(imgs, sigmas=SIGMAS, degree=1, origins=ORIGINS, grid_shape=SHAPE,
                          covariance=True)
    assert a.covariance is None
    assert np.array_equal(a.coef, b.coef)
    assert b.covariance.shape == (16, 16)
    assert np.allclose(b.covariance, b.covariance.T)
    # zero sum: the sum over images of each term has no variance
    m = 4
    for t in range(m):
        rows = np.arange(t, 16, m)
        assert abs(b.covariance[np.ix_(rows, rows)].sum()) < 1e-9 * np.trace(b.covariance)


def test_same_pass_normal_matrix_and_other_conventions():
    from jwst_wiimatch.core.uncertainty import noise_covariance_b
    from jwst_wiimatch.core.engine import build_moments

    rng = np.random.default_rng(1)
    imgs = [rng.standard_normal(SIZE) for _ in ORIGINS]
    prob, frame, mom = build_moments(imgs, None, SIGMAS, 1, origins=ORIGINS,
                                     grid_shape=SHAPE)
    a_u, _ = assemble(len(imgs), prob.degree, mom.S, mom.T)
    _, a_plain = noise_covariance_b(prob, frame)
    assert np.allclose(a_plain, a_u, rtol=1e-10, atol=1e-10 * np.abs(a_u).max())
    # given levels: the constants follow the levels' mean, one less free constant
    r = match_backgrounds(imgs, sigmas=SIGMAS, degree=1, origins=ORIGINS, grid_shape=SHAPE,
                          levels=[0.0, 1.0, np.nan, np.nan], covariance=True)
    c0 = r.covariance[::4, ::4]
    assert np.all(np.isfinite(r.covariance)) and np.all(np.diag(c0) > 0)
    assert abs(c0[:2, :2].sum()) < 1e-9 * np.trace(c0)  # their mean is fixed
    # robust matching and a world frame: a covariance of the right size
    r = match_backgrounds(imgs, sigmas=SIGMAS, degree=1, origins=ORIGINS, grid_shape=SHAPE,
                          robust="clip", image2world=lambda x, y: (2.0 * x, y + 0.5 * x),
                          covariance=True)
    assert r.covariance.shape == (16, 16) and np.all(np.isfinite(r.covariance))


def test_lattice_sample_close_to_every_pixel():
    from jwst_wiimatch.core.engine import build_moments
    from jwst_wiimatch.core.uncertainty import noise_covariance_b

    shape, size = (120, 136), (96, 96)
    origins = [(4 * o[0], 4 * o[1]) for o in ORIGINS]
    rng = np.random.default_rng(2)
    imgs = [rng.standard_normal(size) for _ in origins]
    sig = [np.full(size, s) * (1 + 0.2 * rng.random(size)) for s in SIGMAS]
    prob, frame, mom = build_moments(imgs, None, sig, 1, origins=origins, grid_shape=shape)
    a_u, _ = assemble(len(imgs), prob.degree, mom.S, mom.T)
    comps = [[0, 1, 2, 3]]
    exact = coefficient_covariance(noise_covariance_b(prob, frame, stride=1)[0], a_u, 4,
                                   comps, prob.degree, frame)
    coarse = coefficient_covariance(noise_covariance_b(prob, frame, stride=4)[0], a_u, 4,
                                    comps, prob.degree, frame)
    ratio = np.sqrt(np.diag(coarse) / np.diag(exact))
    assert np.all(np.abs(ratio - 1) < 0.05), ratio


def test_step_records_background_errors():
    from step_helpers import make_models

    from jwst_wiimatch.step import WiiMatchStep

    errs = {}
    for noise in (0.05, 0.1):
        models, _, _ = make_models(n=3, noise=noise, with_dq=False, seed=4)
        out = WiiMatchStep.call(models, degree=1, source_nsigma=0)
        meta = [m.meta.wiimatch.instance for m in out]
        errs[noise] = np.array([[w["background_error_at_refpoint"], w["background_error_rms"]]
                                for w in meta])
    assert np.all(errs[0.05] > 0) and np.all(np.isfinite(errs[0.05]))
    # errors scale with the noise (ERR); the sandwich is linear in sigma
    assert np.allclose(errs[0.1] / errs[0.05], 2.0, rtol=0.05)
    # without ERR the noise is unknown: nothing recorded
    models, _, _ = make_models(n=3, with_err=False, with_dq=False, seed=4)
    out = WiiMatchStep.call(models, degree=1, source_nsigma=0)
    assert "background_error_at_refpoint" not in out[0].meta.wiimatch.instance


# ---------------------------------------------------------------- robust matching
def _robust_draws(method, junk, ndraw=200, seed=3, ncov=10):
    """Coefficients of ``ndraw`` noise draws matched with ``robust=method``, ``junk(rng)``
    added to image 1 in each, and the mean predicted variance over the first ``ncov``
    draws (the rejections, and so the covariance, differ a little from draw to draw);
    also the plain fit's covariance over the same pixels (what was returned before
    the robust weights were used) in the same way."""
    from jwst_wiimatch.core.engine import build_moments
    from jwst_wiimatch.core.uncertainty import noise_covariance_b

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE[0], :SIZE[1]]
    planes = [1.0 * k + 0.01 * (k - 1) * (xx + o[1]) - 0.005 * k * (yy + o[0])
              for k, o in enumerate(ORIGINS)]
    coefs, pred, plain = [], [], []
    for i in range(ndraw):
        imgs = [p + s * rng.standard_normal(SIZE) for p, s in zip(planes, SIGMAS)]
        imgs[1] = imgs[1] + junk(rng)
        r = match_backgrounds(imgs, sigmas=SIGMAS, degree=1, origins=ORIGINS,
                              grid_shape=SHAPE, robust=method, covariance=i < ncov)
        coefs.append(r.coef.ravel())
        if i < ncov:
            pred.append(np.diag(r.covariance))
            prob, frame, _ = build_moments(imgs, None, SIGMAS, 1, origins=ORIGINS,
                                           grid_shape=SHAPE)
            cov_b, a_plain = noise_covariance_b(prob, frame)
            plain.append(np.diag(coefficient_covariance(
                cov_b, a_plain, len(imgs), r.components, r.degree, r.frame)))
    measured = np.array(coefs).std(axis=0, ddof=1)
    return (np.sqrt(np.mean(pred, axis=0)) / measured,
            np.sqrt(np.mean(plain, axis=0)) / measured)


def _cosmic_rays(rng):
    """1 % of the pixels hit, +20 .. +500 sigma (new positions in every draw)."""
    hit = rng.random(SIZE) < 0.01
    out = np.zeros(SIZE)
    out[hit] = rng.uniform(20, 500, hit.sum()) * SIGMAS[1]
    return out


def _glow(rng):
    """+30 sigma over the columns 17.. of image 1: a third of its overlap with
    image 3 (with the grown edge, 160 of 440 pixels) and a little of image 2's."""
    out = np.zeros(SIZE)
    out[:, 17:] = 30 * SIGMAS[1]
    return out


@pytest.mark.parametrize("method", ["clip", "huber"])
def test_robust_covariance_matches_monte_carlo_with_cosmic_rays(method):
    ratio, _ = _robust_draws(method, _cosmic_rays)
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


@pytest.mark.parametrize("method", ["clip", pytest.param("huber", marks=pytest.mark.slow)])
def test_robust_covariance_with_a_large_rejected_region(method):
    # rejection removes a third of one overlap: the errors of the slopes of the
    # images it connects grow, and only the weights of the fit say so
    ratio, plain = _robust_draws(method, _glow)
    assert np.all(np.abs(ratio - 1) < 0.2), ratio
    # the plain fit's covariance over the same pixels underestimates them
    # (about 0.62 of the measured scatter for image 1's x slope)
    assert np.min(plain) < 0.75, plain


def _junk_problem(k=1, seed=1):
    shape, size = (30 * k, 34 * k), (24 * k, 24 * k)
    origins = [(k * o[0], k * o[1]) for o in ORIGINS]
    rng = np.random.default_rng(seed)
    imgs = [rng.standard_normal(size) * s for s in SIGMAS]
    hit = rng.random(size) < 0.01
    imgs[1][hit] += rng.uniform(20, 500, hit.sum()) * SIGMAS[1]
    imgs[1][:, 17 * k:] += 30 * SIGMAS[1]
    return imgs, origins, shape


@pytest.mark.parametrize("method", ["clip", "huber", "tukey"])
@pytest.mark.parametrize("world", [False, True])
def test_robust_weights_reproduced_point_by_point(method, world):
    # Cov(b)'s pass reproduces the last reweighted pass's weights: at every
    # pixel (stride 1), its normal matrix is the fit's
    from jwst_wiimatch.core.engine import build_moments
    from jwst_wiimatch.core.robust import check_robust
    from jwst_wiimatch.core.uncertainty import noise_covariance_b

    imgs, origins, shape = _junk_problem()
    i2w = (lambda x, y: (2.0 * x + 0.01 * x * y, y + 0.5 * x)) if world else None
    for grow, rtol in ((0, 1e-12), (1, 1e-3)):
        # (grown rejections: the accumulation grows them within its blocks only)
        prob, frame, mom = build_moments(imgs, None, SIGMAS, 1, origins=origins,
                                         grid_shape=shape, image2world=i2w,
                                         robust=check_robust(method, grow=grow))
        assert sum(mom.rejected.values()) > 100
        a_u, _ = assemble(len(imgs), prob.degree, mom.S, mom.T)
        _, a_rob = noise_covariance_b(prob, frame, stride=1, robust=mom.robust_pass)
        _, a_plain = noise_covariance_b(prob, frame, stride=1)
        top = np.abs(a_u).max()
        assert np.abs(a_rob - a_u).max() < rtol * top
        assert np.abs(a_plain - a_u).max() > 0.03 * top


def test_robust_lattice_sample_close_to_every_pixel():
    from jwst_wiimatch.core.engine import build_moments
    from jwst_wiimatch.core.robust import check_robust
    from jwst_wiimatch.core.uncertainty import cov_stride, noise_covariance_b

    imgs, origins, shape = _junk_problem(k=8)
    assert cov_stride(shape) > 1
    prob, frame, mom = build_moments(imgs, None, SIGMAS, 1, origins=origins,
                                     grid_shape=shape, robust=check_robust("clip"))
    a_u, _ = assemble(len(imgs), prob.degree, mom.S, mom.T)
    comps = [[0, 1, 2, 3]]
    exact = coefficient_covariance(
        noise_covariance_b(prob, frame, stride=1, robust=mom.robust_pass)[0], a_u, 4,
        comps, prob.degree, frame)
    coarse = coefficient_covariance(
        noise_covariance_b(prob, frame, robust=mom.robust_pass)[0], a_u, 4,
        comps, prob.degree, frame)
    ratio = np.sqrt(np.diag(coarse) / np.diag(exact))
    assert np.all(np.abs(ratio - 1) < 0.03), ratio


# ---------------------------------------------------------------- undetermined terms
def _line_overlap():
    """Images 0 and 1 overlap over a box, image 2 meets image 1 along one column:
    image 2's x slope (relative to the others) is not determined."""
    import oracle as O

    shape = (20, 30)
    masks = [np.zeros(shape, bool) for _ in range(3)]
    masks[0][:, :14] = True
    masks[1][:, 6:21] = True
    masks[2][:, 20:] = True
    sig = [0.8, 1.2, 1.5]
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    truth = [np.zeros(shape), 2.0 + 0.05 * xx, -1.0 + 0.02 * yy]
    return O, masks, sig, rng, truth


@pytest.mark.parametrize("terms", ["tensor", "total"])
def test_undetermined_terms_fixed_at_zero_in_covariance(terms):
    from jwst_wiimatch.core.poly import exponents

    O, masks, sig, rng, truth = _line_overlap()
    images = [t + s * rng.standard_normal(t.shape) for t, s in zip(truth, sig)]
    with pytest.warns(Warning, match="no information"):
        res = match_backgrounds(images, masks, sig, degree=1, terms=terms, covariance=True)
    assert res.undetermined
    flat = {tuple(p): k for k, p in enumerate(exponents(res.degree).tolist())}
    m = res.coef.shape[1]
    zeroed = [(i, flat[tuple(p)]) for i, p in res.undetermined]
    rows = [i * m + t for i, t in zeroed]
    assert np.all(res.coef.ravel()[rows] == 0)
    cov = res.covariance
    assert np.all(cov[rows] == 0) and np.all(cov[:, rows] == 0)
    exact = O.estimator_covariance(images, masks, sig, (1, 1), terms=terms, exclude=zeroed)
    assert np.abs(cov - exact).max() < 1e-6 * np.abs(exact).max()
    # the minimum-norm solution (the map used before) is another estimator:
    # its free terms vary, and its constants' errors are about 10 % smaller
    from jwst_wiimatch.core.engine import build_moments
    from jwst_wiimatch.core.uncertainty import noise_covariance_b

    prob, frame, mom = build_moments(images, masks, sig, 1, terms=terms)
    a_u, _ = assemble(len(images), prob.degree, mom.S, mom.T)
    minnorm = coefficient_covariance(noise_covariance_b(prob, frame)[0], a_u, len(images),
                                     res.components, res.degree, frame, terms=prob.terms)
    assert np.all(np.diag(minnorm)[rows] > 0)
    assert np.abs(np.sqrt(np.diag(minnorm)[::m] / np.diag(exact)[::m]) - 1).max() > 0.05
    # and the scatter of the returned coefficients over noise draws agrees
    coefs = []
    for _ in range(200):
        imgs = [t + s * rng.standard_normal(t.shape) for t, s in zip(truth, sig)]
        with pytest.warns(Warning, match="no information"):
            r = match_backgrounds(imgs, masks, sig, degree=1, terms=terms)
        assert r.undetermined == res.undetermined
        coefs.append(r.coef.ravel())
    measured = np.array(coefs).std(axis=0, ddof=1)
    assert np.all(measured[rows] == 0)
    free = np.diag(cov) > 0
    ratio = np.sqrt(np.diag(cov)[free]) / measured[free]
    assert np.all(np.abs(ratio - 1) < 0.2), ratio


def test_covariance_pass_memory_does_not_grow_as_images_squared_times_grid():
    # 40 images over one 128 x 128 grid: a block of the whole lattice would
    # hold 40 x 40 x 16384 pair weights (210 MB per array, several arrays);
    # blocks sized for the number of images keep each under 16 MB
    from tracing import traced_peak

    from jwst_wiimatch.core.engine import build_moments
    from jwst_wiimatch.core.uncertainty import noise_covariance_b

    rng = np.random.default_rng(0)
    imgs = [rng.normal(size=(128, 128)) for _ in range(40)]
    prob, frame, _ = build_moments(imgs, None, [1.0] * 40, 0)
    (cov_b, amat), peak = traced_peak(lambda: noise_covariance_b(prob, frame))
    assert peak < 100e6, peak / 1e6
    # and the sums are those of the exact pass: every pair weighs 1 / 2 per pixel
    assert amat[0, 0] == pytest.approx(39 * 128 * 128 / 2.0)
    # Var(b_0) per pixel: w**2 Var(39 I_0 - sum of the others) = (39**2 + 39) / 4
    assert cov_b[0, 0] == pytest.approx(128 * 128 * (39 ** 2 + 39) / 4.0)
