"""The engine against the brute-force oracle (tests/oracle.py).

Small random problems over 1-D/2-D/3-D (and a 4-D case), degrees 0..3 and
mixed per axis, masks/sigmas/both/neither, given or default center,
image2world with center_cs 'image' and 'world', both solvers and both
``ext_return`` forms: a, b, the coordinate arrays, the effective center and
the coefficients must equal what the oracle builds from the formulas.
"""
import itertools
import warnings

import numpy as np
import pytest

import oracle as O
from jwst_wiimatch import core, lsq_optimizer, utils
from jwst_wiimatch.match import match_lsq

SHAPES = {1: (13,), 2: (7, 9), 3: (5, 6, 7)}
DEGREES = {
    1: [0, 1, 2, 3, (2,)],
    2: [0, 1, 2, 3, (3, 1), (0, 2)],
    3: [0, 1, 2, (1, 0, 2), (2, 1, 0)],
}
WEIGHTS = ["neither", "masks", "sigmas", "both", "scalar_sigmas"]
GEOMETRY = ["center_none", "center_given", "i2w_image", "i2w_world",
            "i2w_none"]


def _cases():
    cases = []
    i = 0
    for ndim in (1, 2, 3):
        for deg, wt in itertools.product(DEGREES[ndim], WEIGHTS):
            geom = GEOMETRY[i % len(GEOMETRY)]
            solver = ("RLU", "PINV")[(i // 2) % 2]
            ext = bool(i % 3)
            cases.append(pytest.param(
                ndim, deg, wt, geom, solver, ext, i,
                id=f"{ndim}d-deg{deg}-{wt}-{geom}-{solver}-ext{int(ext)}"))
            i += 1
    return cases


def make_problem(ndim, degree, weights, geometry, seed, nimages=3):
    rng = np.random.default_rng(seed)
    shape = SHAPES[ndim]
    masks = O.box_masks(rng, shape, nimages, frac=0.8, holes=0.1)
    images = [rng.normal(size=shape) + 3.0 * i for i in range(nimages)]
    sig = [rng.uniform(0.5, 2.0, size=shape) for _ in range(nimages)]
    kw = dict(degree=degree)
    if weights in ("masks", "both"):
        kw["masks"] = [m.astype(np.int8) for m in masks]
    if weights in ("sigmas", "both"):
        kw["sigmas"] = sig
    if weights == "scalar_sigmas":
        kw["sigmas"] = [0.7, 1.3, 2.0][:nimages]
        kw["masks"] = masks
    if weights in ("neither", "sigmas"):
        # offset footprints must still exist: use sigma <= 0 outside
        # the footprint when sigmas are given; plain full overlap otherwise
        if weights == "sigmas":
            kw["sigmas"] = [np.where(m, s, 0.0) for m, s in zip(masks, sig)]
    # centers inside the middle half of the grid keep the raw-monomial
    # systems reasonably conditioned (the oracle itself is not at stake)
    inner = tuple(rng.uniform(0.25 * (n - 1), 0.75 * (n - 1))
                  for n in shape[::-1])
    if geometry == "center_given":
        kw["center"] = inner
    elif geometry == "i2w_image":
        kw["image2world"] = O.smooth_image2world
        kw["center"] = inner
        kw["center_cs"] = "image"
    elif geometry == "i2w_world":
        kw["image2world"] = O.smooth_image2world
        kw["center"] = tuple(float(v) + 0.1
                             for v in O.smooth_image2world(*inner))
        kw["center_cs"] = "world"
    elif geometry == "i2w_none":
        kw["image2world"] = O.smooth_image2world
    return images, kw


def _oracle_kw(kw):
    return dict(masks=kw.get("masks"), sigmas=kw.get("sigmas"),
                degree=kw["degree"], center=kw.get("center"),
                image2world=kw.get("image2world"),
                center_cs=kw.get("center_cs", "image"))


def assert_rel(actual, expected, rtol, what):
    actual = np.asarray(actual, dtype=float)
    expected = np.asarray(expected, dtype=float)
    assert actual.shape == expected.shape, (what, actual.shape,
                                            expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = max(np.max(np.abs(expected)), 1e-300)
    err = np.max(np.abs(actual - expected)) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def assert_coords(coords, eff, cs, ocoords, oeff, ocs):
    assert cs == ocs
    assert len(coords) == len(ocoords)
    for c, oc in zip(coords, ocoords):
        c = np.asarray(c)
        assert c.shape == oc.shape
        np.testing.assert_allclose(c, oc, rtol=0,
                                   atol=1e-12 * max(1.0, np.abs(oc).max()))
    assert len(eff) == len(oeff)
    np.testing.assert_allclose(np.asarray(eff, dtype=float), oeff,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "ndim, degree, weights, geometry, solver, ext, seed", _cases())
def test_match_lsq_equals_oracle(ndim, degree, weights, geometry, solver,
                                 ext, seed):
    images, kw = make_problem(ndim, degree, weights, geometry, seed)
    okw = _oracle_kw(kw)
    coef_o, info = O.oracle_solve(images, return_info=True, **okw)
    assert info["determined"] and len(info["groups"]) == 1  # sane problem
    a_o, b_o, c_o, e_o, cs_o = O.oracle_normal_equations(images, **okw)
    with warnings.catch_warnings():
        # a well-posed problem: no warnings of these kinds
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("error", RuntimeWarning)
        res = match_lsq(images, solver=solver, ext_return=ext, **kw)
    if ext:
        assert isinstance(res, tuple) and len(res) == 6
        coef, a, b, coords, eff, cs = res
        assert_rel(a, a_o, 1e-9, "a")
        assert_rel(b, b_o, 1e-9, "b")
        assert_coords(coords, eff, cs, c_o, e_o, cs_o)
    else:
        coef = res
    assert isinstance(coef, np.ndarray)
    assert coef.dtype == np.float64
    assert_rel(coef, coef_o, 1e-8, "coef")


@pytest.mark.parametrize(
    "ndim, degree, weights, geometry, solver, ext, seed", _cases()[::4])
def test_build_lsq_eqs_and_solvers_equal_oracle(ndim, degree, weights,
                                                geometry, solver, ext, seed):
    images, kw = make_problem(ndim, degree, weights, geometry, seed)
    okw = _oracle_kw(kw)
    a_o, b_o, c_o, e_o, cs_o = O.oracle_normal_equations(images, **okw)
    coef_o = O.oracle_solve(images, **okw)
    a, b, coords, eff, cs = lsq_optimizer.build_lsq_eqs(
        images, okw["masks"], okw["sigmas"], okw["degree"],
        center=okw["center"], image2world=okw["image2world"],
        center_cs=okw["center_cs"])
    assert_rel(a, a_o, 1e-9, "a")
    assert_rel(b, b_o, 1e-9, "b")
    np.testing.assert_allclose(a, np.asarray(a).T, rtol=0,
                               atol=1e-12 * np.abs(a_o).max())
    assert_coords(coords, eff, cs, c_o, e_o, cs_o)
    n = len(images)
    # the solvers alone, fed the oracle's system
    assert_rel(lsq_optimizer.rlu_solve(a_o, b_o, n), coef_o, 1e-8, "rlu")
    assert_rel(lsq_optimizer.pinv_solve(a_o, b_o, n), coef_o, 1e-8, "pinv")
    assert_rel(lsq_optimizer.pinv_solve(a_o, b_o, n, tol=1e-12), coef_o,
               1e-8, "pinv tol")


def test_rlu_single_image_returns_zero_row():
    a = np.array([[0.0, 0.0], [0.0, 0.0]])
    with pytest.warns(UserWarning, match="only one image"):
        out = lsq_optimizer.rlu_solve(a, np.zeros(2), 1)
    assert np.shape(out) == (1, 2)
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("shape", [(6,), (5, 8), (3, 4, 5), (2, 3, 2, 3)])
@pytest.mark.parametrize("geometry", ["none", "given", "i2w_image",
                                      "i2w_world", "i2w_default"])
def test_create_coordinate_arrays(shape, geometry):
    rng = np.random.default_rng(len(shape))
    kw = {}
    if geometry == "given":
        kw["center"] = tuple(rng.uniform(0, 4, size=len(shape)))
    elif geometry.startswith("i2w"):
        kw["image2world"] = O.smooth_image2world
        if geometry != "i2w_default":
            kw["center"] = tuple(rng.uniform(0, 4, size=len(shape)))
            kw["center_cs"] = geometry[4:]
    coords, eff, cs = utils.create_coordinate_arrays(shape, **kw)
    oc, oe, ocs = O.oracle_coords(shape, kw.get("center"),
                                  kw.get("image2world"),
                                  kw.get("center_cs", "image"))
    assert_coords(coords, eff, cs, oc, oe, ocs)


def test_default_center_is_middle_in_xy_order():
    coords, eff, cs = utils.create_coordinate_arrays((17, 23))
    assert cs == "image"
    assert tuple(float(c) for c in eff) == (11.0, 8.0)
    # x runs along the last numpy axis
    assert np.all(np.asarray(coords[0])[:, 11] == 0)
    assert np.all(np.asarray(coords[1])[8, :] == 0)
    assert np.asarray(coords[0])[0, 0] == -11 and \
        np.asarray(coords[1])[0, 0] == -8


# ------------------------------------------------------------ dtypes / inputs
DTYPES = [np.float64, np.float32, np.int16, np.int32, np.int64, np.uint8,
          np.uint16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_real_dtypes(dtype, solver):
    rng = np.random.default_rng(7)
    shape = (6, 8)
    masks = O.box_masks(rng, shape, 3, frac=0.8)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -100), min(info.max, 200)
        images = [rng.integers(lo, hi, size=shape).astype(dtype)
                  for _ in range(3)]
    else:
        images = [O.dyadic(rng, shape).astype(dtype) for _ in range(3)]
    sig = [np.full(shape, 0.5, dtype=dtype if dtype in (np.float32,)
                   else np.float64) for _ in range(3)]
    coef_o = O.oracle_solve([im.astype(float) for im in images], masks, sig,
                            degree=(1, 2))
    coef = match_lsq(images, masks, sig, degree=(1, 2), solver=solver)
    assert coef.dtype == np.float64
    assert_rel(coef, coef_o, 1e-8, "coef")


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_plain_nested_lists(solver):
    rng = np.random.default_rng(8)
    shape = (5, 7)
    masks = O.box_masks(rng, shape, 3, frac=0.8)
    images = [O.dyadic(rng, shape) for _ in range(3)]
    sig = [rng.uniform(0.5, 1.5, size=shape) for _ in range(3)]
    coef_o = O.oracle_solve(images, masks, sig, degree=1, center=(1, 2))
    coef = match_lsq([im.tolist() for im in images],
                     [m.astype(int).tolist() for m in masks],
                     [s.tolist() for s in sig], degree=[1, 1],
                     center=[1, 2], solver=solver)
    assert_rel(coef, coef_o, 1e-8, "coef")
    # and lists without masks/sigmas
    coef_o = O.oracle_solve(images, degree=1)
    coef = match_lsq([im.tolist() for im in images], degree=1, solver=solver)
    assert_rel(coef, coef_o, 1e-8, "coef")


def test_four_dimensional():
    rng = np.random.default_rng(9)
    shape = (3, 4, 3, 5)
    masks = O.box_masks(rng, shape, 3, frac=0.9)
    images = [rng.normal(size=shape) for _ in range(3)]
    deg = (1, 0, 1, 1)
    okw = dict(masks=masks, sigmas=None, degree=deg)
    a_o, b_o, c_o, e_o, cs_o = O.oracle_normal_equations(images, **okw)
    coef_o = O.oracle_solve(images, **okw)
    for solver in ("RLU", "PINV"):
        coef, a, b, coords, eff, cs = match_lsq(
            images, masks, degree=deg, solver=solver, ext_return=True)
        assert coef.shape == (3, 8)
        assert_rel(a, a_o, 1e-9, "a")
        assert_rel(b, b_o, 1e-9, "b")
        assert_coords(coords, eff, cs, c_o, e_o, cs_o)
        assert_rel(coef, coef_o, 1e-8, "coef")


# ------------------------------------------------------------ fixed defects
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_masks_without_sigmas_equal_weights(solver):
    rng = np.random.default_rng(10)
    shape = (8, 6)
    masks = O.box_masks(rng, shape, 3, frac=0.7, holes=0.1)
    images = [rng.normal(size=shape) for _ in range(3)]
    coef_o = O.oracle_solve(images, masks, None, degree=1)
    coef, a, b, *_ = match_lsq(images, masks, degree=1, solver=solver,
                               ext_return=True)
    a_o, b_o, *_ = O.oracle_normal_equations(images, masks, None, 1)
    assert_rel(a, a_o, 1e-9, "a")  # w = 0.5
    assert_rel(b, b_o, 1e-9, "b")
    assert_rel(coef, coef_o, 1e-8, "coef")
    # equal sigmas give the same coefficients (weights only scale)
    coef_s = match_lsq(images, masks, [np.ones(shape)] * 3, degree=1,
                       solver=solver)
    assert_rel(coef_s, coef_o, 1e-8, "coef with unit sigmas")


@pytest.mark.parametrize("kind", ["uint8_2", "float", "bool", "int8"])
def test_mask_values_are_truthiness(kind):
    rng = np.random.default_rng(11)
    shape = (6, 7)
    bmasks = O.box_masks(rng, shape, 3, frac=0.75, holes=0.1)
    if kind == "uint8_2":
        masks = [m.astype(np.uint8) * 2 for m in bmasks]
    elif kind == "float":
        masks = [m * rng.uniform(0.1, 3.0, size=shape) for m in bmasks]
    elif kind == "bool":
        masks = bmasks
    else:
        masks = [m.astype(np.int8) * -3 for m in bmasks]
    images = [rng.normal(size=shape) for _ in range(3)]
    sig = [rng.uniform(0.5, 1.5, size=shape) for _ in range(3)]
    coef_o = O.oracle_solve(images, bmasks, sig, degree=(1, 1))
    for solver in ("RLU", "PINV"):
        coef = match_lsq(images, masks, sig, degree=(1, 1), solver=solver)
        assert_rel(coef, coef_o, 1e-8, f"coef {solver}")
        coef = match_lsq(images, masks, None, degree=(1, 1), solver=solver)
        assert_rel(coef, O.oracle_solve(images, bmasks, None, degree=(1, 1)),
                   1e-8, f"coef no sigmas {solver}")


@pytest.mark.parametrize("none_at", [0, 1, 2])
def test_none_mask_entry_is_all_valid_for_that_image_only(none_at):
    rng = np.random.default_rng(12 + none_at)
    shape = (9, 8)
    bmasks = O.box_masks(rng, shape, 3, frac=0.6, holes=0.1,
                         full_first=False)
    masks = list(bmasks)
    masks[none_at] = None
    full = list(bmasks)
    full[none_at] = np.ones(shape, dtype=bool)
    images = [rng.normal(size=shape) for _ in range(3)]
    sig = [rng.uniform(0.5, 1.5, size=shape) for _ in range(3)]
    for sigmas in (sig, None):
        coef_o = O.oracle_solve(images, full, sigmas, degree=1)
        for solver in ("RLU", "PINV"):
            coef = match_lsq(images, masks, sigmas, degree=1, solver=solver)
            assert_rel(coef, coef_o, 1e-8, f"coef {solver}")


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_nonpositive_sigmas_left_out(solver):
    rng = np.random.default_rng(13)
    shape = (7, 7)
    images = [rng.normal(size=shape) for _ in range(3)]
    sig = [rng.uniform(0.5, 1.5, size=shape) for _ in range(3)]
    bad = [rng.random(shape) < 0.2 for _ in range(3)]
    sig_bad = [np.where(b, -1.0 if i % 2 else 0.0, s)
               for i, (b, s) in enumerate(zip(bad, sig))]
    coef_o = O.oracle_solve(images, [~b for b in bad], sig, degree=1)
    coef = match_lsq(images, None, sig_bad, degree=1, solver=solver)
    assert_rel(coef, coef_o, 1e-8, "coef")


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_mixed_scalar_and_array_sigmas(solver):
    rng = np.random.default_rng(14)
    shape = (6, 9)
    masks = O.box_masks(rng, shape, 3, frac=0.8)
    images = [rng.normal(size=shape) for _ in range(3)]
    sig = [1.5, rng.uniform(0.5, 1.5, size=shape), 0.25]
    coef_o = O.oracle_solve(images, masks, sig, degree=(2, 1))
    coef = match_lsq(images, masks, sig, degree=(2, 1), solver=solver)
    assert_rel(coef, coef_o, 1e-8, "coef")


# ------------------------------------------------------------ match_backgrounds
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_match_backgrounds_diagnostics(solver):
    rng = np.random.default_rng(15)
    shape = (8, 9)
    masks = O.box_masks(rng, shape, 4, frac=0.7, holes=0.1,
                        full_first=False)
    images = [rng.normal(size=shape) for _ in range(4)]
    sig = [rng.uniform(0.5, 1.5, size=shape) for _ in range(4)]
    coef_o, info = O.oracle_solve(images, masks, sig, degree=1,
                                  return_info=True)
    res = core.match_backgrounds(images, masks, sig, degree=1, solver=solver)
    assert_rel(res.coef, coef_o, 1e-8, "coef")
    groups = {frozenset(g) for g in info["groups"]}
    comps = [list(c) for c in res.components]
    flat = [int(i) for c in comps for i in c]
    assert len(flat) == len(set(flat))
    assert {frozenset(int(i) for i in c) for c in comps if len(c) > 1} == \
        {g for g in groups if len(g) > 1}
    assert list(res.undetermined) == []
    cnt = O.overlap_counts(images, masks, sig)
    pn = np.asarray(res.pair_npix)
    off = ~np.eye(4, dtype=bool)
    np.testing.assert_array_equal(pn[off], cnt[off])
    valid = O.valid_masks(images, masks, sig)
    npix = [int(np.sum(valid[n] & np.any([valid[m] for m in range(4)
                                          if m != n], axis=0)))
            for n in range(4)]
    np.testing.assert_array_equal(np.asarray(res.npix), npix)


@pytest.mark.parametrize("shape, degree", [
    ((7,), (3,)), ((5, 6), (2, 1)), ((4, 5, 3), (1, 2, 1)),
    ((3, 2, 4, 3), (1, 1, 0, 2))])
def test_polyval_nd(shape, degree):
    rng = np.random.default_rng(16)
    c = rng.normal(size=tuple(d + 1 for d in degree))
    coords = [rng.uniform(-2, 2, size=shape) for _ in shape]
    got = core.polyval_nd(c, *coords)
    expected = O.polyval_nd(c, coords)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    P = np.polynomial.polynomial
    ref = {1: P.polyval, 2: P.polyval2d, 3: P.polyval3d}.get(len(shape))
    if ref is not None:
        if len(shape) == 1:
            expected = ref(coords[0], c)
        else:
            expected = ref(*coords, c)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
