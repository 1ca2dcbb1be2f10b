"""No silently wrong result from the engine (issue 10), checked against
independent computations: injected backgrounds, the brute-force oracle and
exact rational arithmetic.

* far centers: the basis change is exact (correctly rounded), injected
  backgrounds are recovered, and where float64 coefficients about the center
  cannot hold the fit the loss is measured and reported;
* terms the overlaps do not determine are 0, in a least-squares solution;
* 64-bit integers beyond 2**53 are matched exactly;
* tiny or huge sigmas give the result of reasonable ones;
* ``image2world`` only ever sees 1-D arrays.

The bad-input tables (errors and warnings) are in test_core_validation.py.
"""
import warnings
from fractions import Fraction

import numpy as np
import pytest

import oracle as O
from jwst_wiimatch import core, lsq_optimizer, utils
from jwst_wiimatch.core.poly import coef_from_scaled
from jwst_wiimatch.match import match_lsq

SOLVERS = ["RLU", "PINV"]


def match_warnings(rec):
    return [str(w.message) for w in rec if issubclass(w.category, core.MatchWarning)]


# ------------------------------------------------------------ exact basis change
def _expand_1d(shift, scale, degree):
    """Coefficients (in X) of ((X - shift) / scale)**k, k = 0..degree, by
    repeated multiplication of coefficient lists in exact rationals."""
    s, h = Fraction(shift), Fraction(scale)
    lin = [-s / h, 1 / h]  # (X - s) / h
    out, cur = [], [Fraction(1)]
    for _ in range(degree + 1):
        out.append(cur + [Fraction(0)] * (degree + 1 - len(cur)))
        nxt = [Fraction(0)] * (len(cur) + 1)
        for i, c in enumerate(cur):
            for j, l in enumerate(lin):
                nxt[i + j] += c * l
        cur = nxt
    return out  # out[k][i]: coefficient of X**i in u**k


@pytest.mark.parametrize("shift", [(0.0, 0.0), (-3.5, 11.0), (1e6 + 0.3, -2.5e5)])
def test_coef_from_scaled_is_correctly_rounded(shift):
    """Each documented-basis coefficient is the float64 nearest to the exact
    value (a float64 binomial expansion is off in the last bits when the
    center is far: the old conversion failed this)."""
    rng = np.random.default_rng(1)
    degree, scale = (3, 2), (17.25, 0.3)
    cu = rng.normal(size=(2, 12))
    ex = [_expand_1d(s, h, d) for s, h, d in zip(shift, scale, degree)]
    expected = np.zeros((2, 4, 3))
    for n in range(2):
        a = cu[n].reshape(4, 3)
        for i in range(4):
            for j in range(3):
                expected[n, i, j] = float(sum(
                    Fraction(a[kx, ky]) * ex[0][kx][i] * ex[1][ky][j]
                    for kx in range(4) for ky in range(3)))
    got = coef_from_scaled(cu, degree, shift, scale)
    np.testing.assert_array_equal(got, expected.reshape(2, 12))


# ------------------------------------------------------------ far center
def _injected(rng, shape=(30, 40)):
    """Three images: one sky plus per-image degree-2 backgrounds (noise-free
    differences). Returns images and the expected (zero-sum) backgrounds.
    (Total degree 2 at most: about a center at distance R (in grid
    half-widths), a term of total degree k has coefficients that cancel over
    the grid by R**k, and for k > 2 at these distances float64 cannot hold
    the digits that cancel: see the next test.)"""
    y, x = np.indices(shape, dtype=float)
    truth = [0.5 + 0.1 * x - 0.05 * y + 1e-3 * x * y + 2e-3 * x**2,
             -1.0 + 2e-3 * x * y,
             0.3 - 0.01 * y**2 + 0.05 * x]
    sky = rng.normal(size=shape)
    mean = sum(truth) / 3
    return [sky + t for t in truth], [t - mean for t in truth], (x, y)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("center", [(1e3, -1e3), (2e4, 5e4), (1e5, -2e5), (1e6, 1e6)])
def test_far_center_recovers_injected_backgrounds(center, solver):
    images, expected, (x, y) = _injected(np.random.default_rng(2))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        coef = match_lsq(images, degree=2, center=center, solver=solver)
    assert match_warnings(rec) == []
    spread = max(np.ptp(e) for e in expected)
    for n in range(3):
        got = O.polyval_nd(coef[n].reshape(3, 3), [x - center[0], y - center[1]])
        # 1e-6 of the range: the warning threshold (at 1e6 pixels the
        # rounding of the x**2 coefficients alone is ~2e-7 of it)
        np.testing.assert_allclose(got, expected[n], rtol=0, atol=1e-6 * spread)


def test_far_center_loss_is_measured_and_reported():
    """With noise, the fitted x**2 y**2 terms are not 0 and the polynomial
    about a center 1e6 pixels away has coefficients of 1e16 and more that
    cancel over the grid: float64 cannot hold the fit. The warning and
    ``basis_loss`` give the size of the loss, measured here independently
    over the whole grid against the fit about the grid's middle."""
    rng = np.random.default_rng(3)
    shape = (30, 40)
    y, x = np.indices(shape, dtype=float)
    images = [rng.normal(size=shape) + 0.01 * x * k for k in range(3)]
    center = (1e6, -1e6)
    ref = core.match_backgrounds(images, degree=2)
    c0 = ref.eff_center
    with pytest.warns(core.MatchWarning, match="differ from the fit by up to") as rec:
        res = core.match_backgrounds(images, degree=2, center=center)
    actual = max(np.abs(
        O.polyval_nd(res.coef[n].reshape(3, 3), [x - center[0], y - center[1]])
        - O.polyval_nd(ref.coef[n].reshape(3, 3), [x - c0[0], y - c0[1]])).max()
        for n in range(3))
    spread = max(np.ptp(O.polyval_nd(c.reshape(3, 3), [x - c0[0], y - c0[1]]))
                 for c in ref.coef)
    assert actual > 1e-3 * spread  # the loss is real ...
    assert 0.1 * actual <= res.basis_loss <= 10 * actual  # ... and measured
    assert f"{res.basis_loss:.3g}" in str(rec[0].message)
    # the fit itself is not affected: the diagnostics equal the centered run's
    np.testing.assert_allclose(res.rms, ref.rms, rtol=1e-9)


def test_centered_fit_reports_no_loss():
    images, _, _ = _injected(np.random.default_rng(4))
    res = core.match_backgrounds(images, degree=2)
    spread = max(np.ptp(O.polyval_nd(c.reshape(3, 3), O.oracle_coords((30, 40))[0]))
                 for c in res.coef)
    assert res.basis_loss <= 1e-13 * spread


# ------------------------------------------------------------ undetermined terms
def _column_problem(rng, degree):
    shape = (8, 10)
    y, x = np.indices(shape, dtype=float)
    m0 = np.zeros(shape, dtype=bool)
    m0[:, :7] = True
    m1 = np.zeros(shape, dtype=bool)
    m1[:, 6:] = True            # the two share the column x = 6 only
    sky = rng.normal(size=shape)
    images = [sky + 2.0 + 0.3 * x + 0.1 * y, sky - 1.0 - 0.2 * x + 0.05 * x * y]
    images = [im + 0.01 * rng.normal(size=shape) for im in images]
    return images, [m0, m1]


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_column_overlap_free_terms_are_zero(solver):
    """Two images that share one column say nothing about their x slopes:
    those come out 0 (the minimum-norm solution gave them values as large
    as the levels), and the result is still a least-squares solution."""
    images, masks = _column_problem(np.random.default_rng(5), (1, 1))
    coef_o, info = O.oracle_solve(images, masks, None, (1, 1), return_info=True)
    assert not info["determined"]
    with pytest.warns(core.MatchWarning, match="no information") as rec:
        res = core.match_backgrounds(images, masks, degree=(1, 1), solver=solver)
    # terms (flat order): 1, y, x, x*y
    assert np.all(res.coef[:, 2:] == 0.0), res.coef
    assert sorted(res.undetermined) == [(0, (1, 0)), (0, (1, 1)), (1, (1, 0)), (1, (1, 1))]
    assert "image 0: x, x*y; image 1: x, x*y" in " ".join(match_warnings(rec))
    # least squares: same objective and same fitted differences as lstsq
    obj = O.objective(res.coef, images, masks, None, (1, 1))
    assert obj == pytest.approx(O.objective(coef_o, images, masks, None, (1, 1)),
                                rel=1e-9, abs=1e-20)
    A = info["A"]
    np.testing.assert_allclose(A @ res.coef.ravel(), A @ coef_o.ravel(), rtol=0,
                               atol=1e-9 * np.abs(info["r"]).max())
    np.testing.assert_allclose(res.coef.sum(axis=0), 0, atol=1e-12)
    # the minimum-norm solution has a nonzero slope there: the test can fail
    assert np.abs(coef_o[:, 2]).max() > 1e-3


@pytest.mark.parametrize("solver", SOLVERS)
def test_free_terms_highest_degree_first(solver):
    """Degree 2 in x on a one-column overlap: the free x and x**2 terms are
    both 0 (never the constant, which is determined once they are)."""
    images, masks = _column_problem(np.random.default_rng(6), (2, 0))
    with pytest.warns(core.MatchWarning):
        res = core.match_backgrounds(images, masks, degree=(2, 0), solver=solver)
    assert np.all(res.coef[:, 1:] == 0.0), res.coef
    assert np.all(res.coef[:, 0] != 0.0)
    # zero in the documented basis whatever the center
    with pytest.warns(core.MatchWarning):
        coef = match_lsq(images, masks, degree=(2, 0), solver=solver, center=(-40.0, 3.0))
    assert np.all(coef[:, 1:] == 0.0), coef
    coef_o = O.oracle_solve(images, masks, None, (2, 0))
    assert O.objective(res.coef, images, masks, None, (2, 0)) == pytest.approx(
        O.objective(coef_o, images, masks, None, (2, 0)), rel=1e-9, abs=1e-20)


@pytest.mark.parametrize("solver", SOLVERS)
def test_free_slope_of_one_image_in_a_group(solver):
    """Image 2 touches image 0 along one column only: its x and x*y terms
    are free and come out 0, i.e. equal to the group's mean (zero sum),
    while the other images' terms are determined by their overlap."""
    rng = np.random.default_rng(8)
    shape = (10, 12)
    y, x = np.indices(shape, dtype=float)
    masks = [np.zeros(shape, dtype=bool) for _ in range(3)]
    masks[0][:, :9] = True
    masks[1][2:9, 1:7] = True
    masks[2][:, 8:] = True
    truth = [1 + 0.1 * x - 0.2 * y + 0.01 * x * y, -2 + 0.05 * x + 0.1 * y,
             0.5 - 0.3 * x + 0.02 * y + 0.03 * x * y]
    sky = rng.normal(size=shape)
    images = [sky + t for t in truth]
    coef_o, info = O.oracle_solve(images, masks, None, 1, return_info=True)
    with pytest.warns(core.MatchWarning, match="image 2: x, x\\*y"):
        res = core.match_backgrounds(images, masks, degree=1, solver=solver)
    assert sorted(res.undetermined) == [(2, (1, 0)), (2, (1, 1))]
    assert np.all(res.coef[2, 2:] == 0.0)
    A = info["A"]
    np.testing.assert_allclose(A @ res.coef.ravel(), A @ coef_o.ravel(), rtol=0,
                               atol=1e-9 * np.abs(info["r"]).max())


def test_lsq_optimizer_solvers_zero_free_terms():
    """The documented-basis solvers (no degree known) set free terms to 0 too."""
    images, masks = _column_problem(np.random.default_rng(9), (1, 0))
    a, b, *_ = lsq_optimizer.build_lsq_eqs(images, masks, None, (1, 0))
    for solve in (lsq_optimizer.rlu_solve, lsq_optimizer.pinv_solve):
        with pytest.warns(core.MatchWarning, match="set to 0"):
            coef = solve(a, b, 2)
        assert np.all(coef[:, 1] == 0.0), coef


# ------------------------------------------------------------ huge integers
def _int_problem(rng, shape=(6, 7)):
    y, x = np.indices(shape)
    small = [rng.integers(-50, 50, size=shape) for _ in range(3)]
    small[1] = small[1] + 3 + x
    small[2] = small[2] - 5 + 2 * y
    return small


@pytest.mark.parametrize("dtype, base", [(np.int64, 2**62), (np.int64, -2**62 - 7),
                                         (np.uint64, 2**63 + 2**62 + 1)])
@pytest.mark.parametrize("use_masks", [False, True])
def test_huge_integer_images_are_exact(dtype, base, use_masks):
    """Values near 2**62 / 2**63 differ by small integers: matched exactly
    (float64 conversion alone rounds them by 512 or more), without warning.
    Masked pixels may hold anything (here 0, far from the valid values)."""
    rng = np.random.default_rng(10)
    small = _int_problem(rng)
    masks = None
    if use_masks:
        masks = [rng.random(small[0].shape) > 0.2 for _ in range(3)]
    images = []
    for k, s in enumerate(small):
        im = np.array([base + int(v) for v in s.ravel()], dtype=dtype).reshape(s.shape)
        if use_masks:
            im[~masks[k]] = 0
        images.append(im)
    expected = O.oracle_solve([s.astype(float) for s in small], masks, None, 1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        coef = match_lsq(images, masks, degree=1)
    assert match_warnings(rec) == []
    np.testing.assert_allclose(coef, expected, rtol=0, atol=1e-9)
    # and the float64 conversion alone would not do: the test can fail
    naive = O.oracle_solve([im.astype(float) for im in images], masks, None, 1)
    assert np.abs(naive - expected).max() > 1e-3


def test_integer_sigmas_beyond_2_53():
    """Integer sigmas are used through float64 squares: relative rounding of
    1e-16 in a weight does not matter, and nothing overflows."""
    rng = np.random.default_rng(11)
    images = [rng.normal(size=(5, 6)) for _ in range(3)]
    sig = [np.full((5, 6), 2**62 + k, dtype=np.int64) for k in range(3)]
    sig[1][2, 3] = 2**61
    expected = O.oracle_solve(images, None, [s.astype(float) for s in sig], 1)
    coef = match_lsq(images, None, sig, degree=1)
    np.testing.assert_allclose(coef, expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------ tiny / huge sigmas
@pytest.mark.parametrize("factor", [1e-200, 1e-160, 1e-152, 1e150, 1e200])
@pytest.mark.parametrize("kind", ["array", "scalar", "log-spread"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_sigma_scale_does_not_matter(factor, kind, solver):
    """The solution does not depend on a common scale of the sigmas: sigmas
    whose squares leave float64 (1e-200) give the result of the same sigmas
    at a reasonable scale (computed by the oracle), without warning."""
    rng = np.random.default_rng(12)
    shape = (6, 7)
    images = [rng.normal(size=shape) + k for k in range(3)]
    masks = O.box_masks(rng, shape, 3, frac=0.8)
    if kind == "scalar":
        sig = [0.5, 1.0, 2.0]
    elif kind == "array":
        sig = [rng.uniform(0.5, 2.0, size=shape) for _ in range(3)]
    else:  # 1e-3 .. 1e3: some pixels need the rescaling, others not
        sig = [10.0 ** rng.uniform(-3, 3, size=shape) for _ in range(3)]
    expected = O.oracle_solve(images, masks, sig, 1)
    scaled = [s * factor for s in sig]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        coef = match_lsq(images, masks, scaled, degree=1, solver=solver)
    assert match_warnings(rec) == []
    np.testing.assert_allclose(coef, expected, rtol=1e-8,
                               atol=1e-10 * np.abs(expected).max())


def test_tiny_sigmas_keep_diagnostics():
    rng = np.random.default_rng(13)
    images = [rng.normal(size=(5, 6)) + k for k in range(2)]
    ref = core.match_backgrounds(images, None, [1.0, 2.0], degree=0)
    res = core.match_backgrounds(images, None, [1e-200, 2e-200], degree=0)
    np.testing.assert_allclose(res.coef, ref.coef, rtol=1e-12)
    np.testing.assert_allclose(res.rms, ref.rms, rtol=1e-12)
    np.testing.assert_allclose(res.rms_before, ref.rms_before, rtol=1e-12)


# ------------------------------------------------------------ image2world
class _OneDOnly:
    """image2world that refuses anything but 1-D arrays, and records the calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, y):
        self.calls += 1
        for a in (x, y):
            assert isinstance(a, np.ndarray) and a.ndim == 1, (type(a), np.ndim(a))
        return O.smooth_image2world(x, y)


@pytest.mark.parametrize("center", [None, (2.0, 3.0)])
@pytest.mark.parametrize("ext_return", [False, True])
def test_image2world_gets_1d_arrays(center, ext_return):
    rng = np.random.default_rng(14)
    shape = (6, 7)
    images = [rng.normal(size=shape) + k for k in range(3)]
    f = _OneDOnly()
    out = match_lsq(images, degree=1, center=center, image2world=f, ext_return=ext_return)
    coef = out[0] if ext_return else out
    expected = O.oracle_solve(images, None, None, 1, center=center,
                              image2world=O.smooth_image2world)
    np.testing.assert_allclose(coef, expected, rtol=1e-8, atol=1e-10)
    lsq_optimizer.build_lsq_eqs(images, None, None, 1, center=center, image2world=f)
    utils.create_coordinate_arrays(shape, center=center, image2world=f)
    assert f.calls > 3
