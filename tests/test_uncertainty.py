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
