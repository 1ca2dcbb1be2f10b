"""Property-based checks: random small valid problems (shapes, dtypes,
degrees, masks with random holes, sigmas, centers, solvers) never raise,
never return NaN, satisfy the zero-sum normalisation per connected group
(isolated images 0) and agree with the brute-force oracle."""
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle as O
from jwst_wiimatch import core
from jwst_wiimatch.match import match_lsq

MAX_SIDE = {1: 12, 2: 6, 3: 4}
DTYPES = [np.float64, np.float32, np.int16, np.int32, np.uint8]


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(2, MAX_SIDE[ndim]),
                                min_size=ndim, max_size=ndim)))
    n = draw(st.integers(1, 4))
    if draw(st.booleans()):
        degree = draw(st.integers(0, 2))
    else:
        degree = tuple(draw(st.lists(st.integers(0, 2), min_size=ndim,
                                     max_size=ndim)))
    # more terms than pixels is refused up front (ValueError naming 'degree',
    # tested in test_core_validation); keep the problems valid
    degt = (degree,) * ndim if np.ndim(degree) == 0 else degree
    if np.prod([d + 1 for d in degt]) > np.prod(shape):
        degree = tuple(min(d, k - 1) for d, k in zip(degt, shape[::-1]))
    dtype = draw(st.sampled_from(DTYPES))
    mask_kind = draw(st.sampled_from(
        ["none", "bool", "uint8", "float", "some_none", "boxes"]))
    sigma_kind = draw(st.sampled_from(
        ["none", "scalar", "array", "array_nonpositive"]))
    holes = draw(st.sampled_from([0.0, 0.1, 0.3, 0.6]))
    center = draw(st.sampled_from(["none", "inside", "outside"]))
    solver = draw(st.sampled_from(["RLU", "PINV"]))
    as_list = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))

    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        lo = 0 if dtype == np.uint8 else -100
        images = [rng.integers(lo, 100, size=shape).astype(dtype)
                  for _ in range(n)]
    else:
        images = [O.dyadic(rng, shape).astype(dtype) for _ in range(n)]

    valid = [rng.random(shape) >= holes for _ in range(n)]
    if mask_kind == "boxes":
        valid = [v & b for v, b in
                 zip(valid, O.box_masks(rng, shape, n, frac=0.6,
                                        full_first=False))]
    if mask_kind == "none":
        masks = None
    elif mask_kind == "bool":
        masks = valid
    elif mask_kind == "uint8":
        masks = [v.astype(np.uint8) * rng.integers(1, 4) for v in valid]
    elif mask_kind == "float":
        masks = [v * rng.uniform(0.2, 2.0, size=shape) for v in valid]
    else:
        masks = [None if i % 2 else v for i, v in enumerate(valid)]

    if sigma_kind == "none":
        sigmas = None
    elif sigma_kind == "scalar":
        sigmas = [float(rng.uniform(0.5, 2.0)) for _ in range(n)]
    else:
        sigmas = [rng.uniform(0.5, 2.0, size=shape) for _ in range(n)]
        if sigma_kind == "array_nonpositive":
            for s in sigmas:
                s[rng.random(shape) < holes / 2] = 0.0
                s[rng.random(shape) < holes / 4] = -1.0

    if center == "none":
        cen = None
    elif center == "inside":
        cen = tuple(float(rng.uniform(0, k - 1)) for k in shape[::-1])
    else:
        cen = tuple(float(rng.uniform(-3, k + 3)) for k in shape[::-1])
    kw = dict(degree=degree, center=cen, solver=solver)
    if as_list:
        images = [im.tolist() for im in images]
        if masks is not None:
            masks = [None if m is None else m.tolist() for m in masks]
    return images, masks, sigmas, kw


def _float_images(images):
    return [np.asarray(im, dtype=np.float64) for im in images]


def _check(coef, images, masks, sigmas, kw):
    fimages = _float_images(images)
    shape = fimages[0].shape
    ndim = len(shape)
    degree = kw["degree"]
    degt = (degree,) * ndim if np.ndim(degree) == 0 else tuple(degree)
    M = int(np.prod([d + 1 for d in degt]))
    n = len(fimages)

    coef = np.asarray(coef)
    assert coef.shape == (n, M)
    assert coef.dtype == np.float64
    assert np.all(np.isfinite(coef)), coef

    ref, info = O.oracle_solve(fimages, masks, sigmas, degt,
                               center=kw["center"], return_info=True)
    groups = info["groups"]
    scale = max(1.0, np.abs(ref).max())
    # zero-sum per connected group; isolated images are exactly 0
    for g in groups:
        if len(g) == 1:
            assert np.all(coef[g[0]] == 0), (g, coef[g[0]])
        else:
            s = coef[g].sum(axis=0)
            assert np.all(np.abs(s) <= 1e-8 * max(scale,
                                                  np.abs(coef).max())), s
    # least-squares optimum: the predicted pairwise differences A c are
    # unique even when some coefficient is undetermined.  The engine works
    # on the normal equations, so allow their accuracy, eps * cond(A)**2
    # (cond over A's numerical rank), on top of a 1e-7 floor.
    A, r = info["A"], info["r"]
    info["cond"] = np.inf
    if A.shape[0] and info["rank"]:
        sv = np.linalg.svd(A, compute_uv=False)
        cond = info["cond"] = sv[0] / sv[info["rank"] - 1]
        pa = A @ coef.ravel()
        pr = A @ ref.ravel()
        tol = max(1e-7, 1e-16 * cond ** 2) * max(1.0, np.abs(r).max())
        assert np.max(np.abs(pa - pr)) <= tol, (np.max(np.abs(pa - pr)),
                                                cond)
        # and, when everything is determined and reasonably conditioned,
        # the coefficients themselves
        if info["determined"] and cond < 1e5:
            err = np.max(np.abs(coef - ref)) / scale
            assert err <= 1e-8, (err, cond)
    return groups, info


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_match_lsq_properties(problem):
    images, masks, sigmas, kw = problem
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        coef = match_lsq(images, masks, sigmas, **kw)
    groups, info = _check(coef, images, masks, sigmas, kw)
    if len(images) > 1 and len(groups) > 1:
        assert any(issubclass(w.category, UserWarning) for w in rec), \
            "disconnected overlap graph without a UserWarning"


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_match_backgrounds_properties(problem):
    images, masks, sigmas, kw = problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = core.match_backgrounds(images, masks, sigmas, **kw)
    groups, info = _check(res.coef, images, masks, sigmas, kw)
    fimages = _float_images(images)
    n = len(fimages)
    comps = [[int(i) for i in c] for c in res.components]
    flat = [i for c in comps for i in c]
    assert len(flat) == len(set(flat))
    assert {frozenset(c) for c in comps if len(c) > 1} == \
        {frozenset(g) for g in groups if len(g) > 1}
    cnt = O.overlap_counts(fimages, masks, sigmas)
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_array_equal(np.asarray(res.pair_npix)[off], cnt[off])
    valid = O.valid_masks(fimages, masks, sigmas)
    for i in range(n):
        others = [valid[j] for j in range(n) if j != i]
        expected = int(np.sum(valid[i] & np.any(others, axis=0))) \
            if others else 0
        assert int(np.asarray(res.npix)[i]) == expected
    has = np.asarray(res.npix) > 0
    assert np.all(np.isfinite(np.asarray(res.rms)[has]))
    assert np.all(np.isfinite(np.asarray(res.rms_before)[has]))
    if info["determined"] and info["cond"] < 1e5 and len(groups) == 1 \
            and n > 1:
        assert list(res.undetermined) == []


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_single_image_is_zero(solver):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coef = match_lsq([np.arange(12.0).reshape(3, 4)], degree=1,
                         solver=solver)
    assert coef.shape == (1, 4)
    assert np.all(coef == 0)
