"""terms='total': polynomials of total degree (degree 1 is the true plane 1, x, y).

Checked against the brute-force dense least-squares solution of ``oracle``
with the columns of the absent terms removed, and against its exact
covariance of the estimator.
"""
import warnings

import numpy as np
import pytest

import oracle as O

from jwst_wiimatch.core import MatchWarning
from jwst_wiimatch.core.engine import match_backgrounds
from jwst_wiimatch.core.poly import check_terms, exponents, term_mask
from jwst_wiimatch.match import match_lsq

CASES = [((24, 30), (1, 1)), ((24, 30), (2, 2)), ((24, 30), (2, 1)), ((20, 26), (3, 3)),
         ((8, 10, 12), (1, 1, 1)), ((8, 10, 12), (2, 1, 1))]


def _problem(shape, seed, n=4):
    rng = np.random.default_rng(seed)
    masks = O.box_masks(rng, shape, n, frac=0.7, holes=0.05)
    images = [rng.normal(size=shape) + 2.0 * i for i in range(n)]
    sigmas = [rng.uniform(0.5, 2.0, size=shape) for _ in range(n)]
    return images, masks, sigmas


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("shape,degree", CASES, ids=[f"{len(s)}d-{d}" for s, d in CASES])
@pytest.mark.parametrize("geometry", ["image", "world"])
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_total_equals_dense_least_squares(shape, degree, geometry, solver):
    images, masks, sigmas = _problem(shape, seed=sum(shape) + sum(degree))
    kw = dict(masks=masks, sigmas=sigmas, degree=degree)
    if geometry == "world":
        kw["image2world"] = O.smooth_image2world
    res = match_backgrounds(images, terms="total", solver=solver, **kw)
    expected = O.oracle_solve(images, terms="total", **kw)
    top = max(degree)
    absent = np.array([sum(p) > top for p in exponents(degree)])
    assert absent.any()
    assert res.terms == "total"
    assert np.all(res.coef[:, absent] == 0.0)  # exactly: never fitted
    assert _rel(res.coef, expected) < 1e-8
    # a subset of the tensor terms: never a smaller objective than the tensor fit,
    # and the total fit is the best among polynomials of those terms
    tensor = match_backgrounds(images, **kw).coef
    okw = {k: v for k, v in kw.items()}
    f_total = O.objective(res.coef, images, **okw)
    assert O.objective(tensor, images, **okw) <= f_total * (1 + 1e-12)
    rng = np.random.default_rng(1)
    nudged = res.coef + 1e-3 * rng.normal(size=res.coef.shape) * ~absent
    assert O.objective(nudged, images, **okw) > f_total


def test_tensor_default_unchanged_and_match_lsq_face():
    images, masks, sigmas = _problem((24, 30), seed=5)
    plain = match_lsq(images, masks, sigmas, degree=1)
    np.testing.assert_array_equal(match_lsq(images, masks, sigmas, degree=1, terms="tensor"),
                                  plain)
    total = match_lsq(images, masks, sigmas, degree=1, terms="total")
    assert np.all(total[:, 3] == 0) and np.any(plain[:, 3] != 0)
    coef, a, b, *_ = match_lsq(images, masks, sigmas, degree=1, terms="total",
                               ext_return=True)
    assert a.shape == (4 * 4, 4 * 4) and b.shape == (16,)  # the tensor layout
    np.testing.assert_array_equal(coef, total)


def test_injected_planes_recovered():
    # planes under noise: the plane fit recovers them at least as well as the
    # bilinear one (one term fewer per image, no x*y to absorb noise)
    rng = np.random.default_rng(7)
    shape = (80, 96)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    truth = [(rng.normal(0, 3), rng.normal(0, 0.02), rng.normal(0, 0.02)) for _ in range(5)]
    masks = O.box_masks(rng, shape, 5, frac=0.6, full_first=False)
    images = [c + gx * (xx - 48) + gy * (yy - 40) + rng.normal(0, 1.0, shape)
              for c, gx, gy in truth]
    res = match_backgrounds(images, masks, [1.0] * 5, degree=1, terms="total")
    got = res.coef.reshape(5, 2, 2)
    assert np.all(got[:, 1, 1] == 0)
    t = np.array(truth)
    t -= t.mean(axis=0)
    est = np.stack([got[:, 0, 0], got[:, 1, 0], got[:, 0, 1]], axis=1)  # 1, x, y
    # the per-image surfaces over each footprint agree with the truth to the noise
    err = []
    for k in range(5):
        e = (est[k, 0] - t[k, 0]) + (est[k, 1] - t[k, 1]) * (xx - 48) \
            + (est[k, 2] - t[k, 2]) * (yy - 40)
        err.append(np.sqrt(np.mean(e[masks[k]] ** 2)))
    assert max(err) < 0.1  # noise 1 per pixel, thousands of pixels per overlap


def test_covariance_matches_exact_estimator_covariance():
    rng = np.random.default_rng(3)
    shape = (16, 18)
    masks = O.box_masks(rng, shape, 3, frac=0.75)
    sig = [0.8, 1.2, 1.5]
    images = [rng.normal(size=shape) for _ in range(3)]
    res = match_backgrounds(images, masks, sig, degree=2, terms="total", covariance=True)
    exact = O.estimator_covariance(images, masks, sig, (2, 2), terms="total")
    absent = ~np.tile(term_mask((2, 2), "total"), 3)
    assert np.all(res.covariance[absent] == 0) and np.all(res.covariance[:, absent] == 0)
    assert _rel(res.covariance, exact) < 1e-6


def test_undetermined_terms_named_among_present_ones():
    # overlaps that are one column (x constant): the x terms are undetermined
    shape = (20, 20)
    a = np.zeros(shape, bool)
    a[:, :11] = True
    b = np.zeros(shape, bool)
    b[:, 10:] = True
    rng = np.random.default_rng(0)
    images = [rng.normal(size=shape), rng.normal(size=shape) + 1]
    with pytest.warns(MatchWarning, match=r"image 0: x(?!\*y)") as rec:
        res = match_backgrounds(images, [a, b], degree=1, terms="total")
    text = " ".join(str(w.message) for w in rec)
    assert "x*y" not in text
    assert [p for i, p in res.undetermined if i == 0] == [(1, 0)]
    assert np.all(res.coef[:, 3] == 0)


@pytest.mark.parametrize("bad", ["plane", "TOTALS", 1, ""])
def test_bad_terms_refused(bad):
    images, masks, sigmas = _problem((10, 12), seed=1, n=2)
    with pytest.raises(ValueError, match="terms="):
        match_backgrounds(images, masks, sigmas, degree=1, terms=bad)


def test_term_mask_and_check():
    assert term_mask((2, 2), "tensor") is None
    assert term_mask((0, 0), "total") is None
    m = term_mask((2, 2), "total")
    assert [tuple(p) for p in exponents((2, 2))[m]] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0)]
    # per-axis degrees still bound each exponent
    m = term_mask((2, 1), "total")
    assert [tuple(p) for p in exponents((2, 1))[m]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert check_terms(None) == "tensor" and check_terms(" Total ") == "total"


def test_total_with_robust_and_levels_and_cutouts():
    # the mask reaches every solve: robust passes, level conventions, cutouts
    rng = np.random.default_rng(11)
    shape = (40, 48)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    masks = O.box_masks(rng, shape, 4, frac=0.7, full_first=False)
    images = [0.5 * k + 0.01 * k * xx + rng.normal(0, 0.1, shape) for k in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kw in (dict(robust="clip"), dict(level="lowest"), dict(reference=[1])):
            res = match_backgrounds(images, masks, [0.1] * 4, degree=2, terms="total", **kw)
            assert np.all(res.coef[:, ~term_mask((2, 2), "total")] == 0), kw
    boxes = [tuple(slice(int(np.flatnonzero(m.any(axis=1 - ax))[0]),
                         int(np.flatnonzero(m.any(axis=1 - ax))[-1]) + 1) for ax in (0, 1))
             for m in masks]
    cut = match_backgrounds([im[b] for im, b in zip(images, boxes)],
                            [m[b] for m, b in zip(masks, boxes)], [0.1] * 4, degree=2,
                            terms="total", origins=[(b[0].start, b[1].start) for b in boxes],
                            grid_shape=shape)
    full = match_backgrounds(images, masks, [0.1] * 4, degree=2, terms="total")
    np.testing.assert_array_equal(cut.coef, full.coef)


def test_step_records_total_degree_planes(caplog):
    import logging

    import step_helpers as h

    from jwst_wiimatch.step import WiiMatchStep

    models, truths, ref = h.make_models(n=3, degree=1, noise=0.05)
    with caplog.at_level(logging.INFO):
        out = WiiMatchStep.call(models, degree=1, terms="total", source_nsigma=0)
    assert "polynomial degree [1, 1] (total degree)" in caplog.text
    for m in out:
        w = m.meta.wiimatch.instance
        assert w["terms"] == "total" and list(w["degree"]) == [1, 1]
        entry = m.meta.background.polynomial_info[-1].instance
        assert len(entry["coefficients"]) == 4 and entry["coefficients"][3] == 0.0
    plain = WiiMatchStep.call(h.make_models(n=3, degree=1, noise=0.05)[0], degree=1,
                              source_nsigma=0)
    assert all(m.meta.wiimatch.instance["terms"] == "tensor" for m in plain)
    assert any(m.meta.background.polynomial_info[-1].instance["coefficients"][3] != 0
               for m in plain)


def test_step_refuses_unknown_terms():
    from jwst_wiimatch.step import WiiMatchStep

    with pytest.raises(Exception, match="terms|plane"):
        WiiMatchStep(terms="plane")
