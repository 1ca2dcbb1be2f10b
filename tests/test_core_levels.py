"""Level conventions of the engine (issue 9, jwst issue 5262 / skymatch's match_down).

Every expectation is computed independently: the injected backgrounds and
the oracle's brute-force least-squares tools (``tests/oracle.py``).
"""
import warnings

import numpy as np
import pytest

import oracle as O
from jwst_wiimatch.core import MatchWarning, match_backgrounds
from jwst_wiimatch.match import match_lsq

SHAPE = (30, 40)


def _boxes(boxes, shape=SHAPE):
    masks = []
    for y0, y1, x0, x1 in boxes:
        m = np.zeros(shape, dtype=bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    return masks


# a chain of boxes: images 0-1-2-3 overlap their neighbours; the left images
# sit left of the center (x = 20), the right ones right of it
CHAIN = [(0, 20, 0, 14), (5, 25, 10, 24), (8, 28, 20, 34), (10, 30, 30, 40)]


def _coords(shape=SHAPE):
    coords, _, _ = O.oracle_coords(shape)  # X = pixel - (20, 15)
    return coords


def _inject(true_coefs, masks, seed=0, noise=0.0, degree=1):
    """Images: one common sky plus each image's own background polynomial."""
    rng = np.random.default_rng(seed)
    coords = _coords()
    sky = 3.0 + np.sin(coords[0] / 3.0) * np.cos(coords[1] / 4.0)
    shp = (degree + 1, degree + 1)
    return [np.where(m, sky + O.polyval_nd(np.reshape(c, shp), coords)
                     + noise * rng.standard_normal(SHAPE), np.nan)
            for c, m in zip(true_coefs, masks)]


def _own_mean_scores(true_coefs, masks, degree=1):
    """Independent 'level' of each image: mean over its own valid pixels of its
    background minus the group's mean background (invariant to a common polynomial)."""
    coords = _coords()
    shp = (degree + 1, degree + 1)
    surf = [O.polyval_nd(np.reshape(c, shp), coords) for c in true_coefs]
    avg = np.mean(surf, axis=0)
    return np.array([np.mean((s - avg)[m]) for s, m in zip(surf, masks)])


# level at the center (c00) and gradients chosen so that the image with the
# lowest background at the center (image 3) is not the lowest over its own
# footprint: a definition by the center would pick another image
TRUE = np.array([[1.00, 0.000, 0.030, 0.0],   # [c00, c01 (y), c10 (x), c11]
                 [1.20, 0.000, -0.010, 0.0],
                 [0.90, 0.010, 0.020, 0.0],
                 [0.50, 0.000, 0.080, 0.0]])


def test_scores_distinguish_the_definitions():
    masks = _boxes(CHAIN)
    scores = _own_mean_scores(TRUE, masks)
    assert int(np.argmin(TRUE[:, 0])) == 3
    assert int(np.argmin(scores)) != 3  # the test below can tell the definitions apart


@pytest.mark.parametrize("level", ["lowest", "highest"])
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_match_down_and_up_keep_the_extreme_image(level, solver):
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks)
    scores = _own_mean_scores(TRUE, masks)
    keep = int(np.argmin(scores) if level == "lowest" else np.argmax(scores))
    r = match_backgrounds(images, masks=masks, degree=1, level=level, solver=solver)
    # the kept image's polynomial is 0; the others are the injected differences
    np.testing.assert_array_equal(r.coef[keep], 0.0)
    np.testing.assert_allclose(r.coef, TRUE - TRUE[keep], atol=1e-9)
    assert r.conventions == [{"convention": level, "reference": [keep],
                              "level_shift": None}]
    # the recorded means are those of the zero-sum polynomials over own pixels
    np.testing.assert_allclose(r.mean_background, scores, atol=1e-9)
    # with gradients the choice is by the mean relative to the group's average
    # background: another image may be matched up on average over its own
    # pixels (documented); here image 3 is (its background at the center is
    # the lowest, its own-footprint mean is not)
    coords = _coords()
    own = [np.mean(O.polyval_nd(c.reshape(2, 2), coords)[m]) for c, m in zip(r.coef, masks)]
    if level == "lowest":
        assert min(own) > -1e-9


def test_constants_match_down_like_skymatch():
    """Degree 0: the lowest level is kept, the others are matched down to it."""
    masks = _boxes(CHAIN)
    levels = np.array([0.7, 0.4, 0.9, 0.55])
    true = np.zeros((4, 4))
    true[:, 0] = levels
    images = _inject(true, masks, noise=0.01, seed=3)
    down = match_lsq(images, masks=masks, degree=0, level="lowest")
    up = match_lsq(images, masks=masks, degree=0, level="highest")
    zs = match_lsq(images, masks=masks, degree=0)
    assert down[1, 0] == 0.0 and up[2, 0] == 0.0
    np.testing.assert_allclose(down[:, 0], levels - levels[1], atol=0.01)
    np.testing.assert_allclose(up[:, 0], levels - levels[2], atol=0.01)
    # all three are the same least-squares fit, shifted by one constant
    np.testing.assert_allclose((down - zs)[:, 0], (down - zs)[0, 0], atol=1e-12)
    np.testing.assert_allclose((up - zs)[:, 0], (up - zs)[0, 0], atol=1e-12)


def _constrained_oracle(images, masks, sigmas, degree, fixed):
    """Brute force: least squares of the pair-difference system with the fixed
    images' unknowns removed (their coefficients 0)."""
    A, r, _ = O.difference_system(images, masks, sigmas, degree)
    n = len(images)
    M = A.shape[1] // n
    keep = np.concatenate([np.arange(i * M, (i + 1) * M) for i in range(n) if i not in fixed])
    sol = np.linalg.lstsq(A[:, keep], r, rcond=None)[0]
    coef = np.zeros(n * M)
    coef[keep] = sol
    return coef.reshape(n, M), A, r


@pytest.mark.parametrize("fixed", [[1], [0, 2], [1, 3]])
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_reference_set_is_a_constrained_fit(fixed, solver):
    rng = np.random.default_rng(5)
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks, noise=0.05, seed=7)
    sigmas = [rng.uniform(0.5, 2.0, SHAPE) for _ in masks]
    images = [np.nan_to_num(im) for im in images]
    expect, A, r = _constrained_oracle(images, masks, sigmas, 1, fixed)
    got = match_backgrounds(images, masks=masks, sigmas=sigmas, degree=1,
                            reference=fixed, solver=solver)
    for i in fixed:
        np.testing.assert_array_equal(got.coef[i], 0.0)
    np.testing.assert_allclose(got.coef, expect, atol=1e-8)
    assert got.conventions[0]["convention"] == "reference"
    assert got.conventions[0]["reference"] == fixed
    if len(fixed) > 1:  # a real constraint: not a shift of the free solution
        zs = match_backgrounds(images, masks=masks, sigmas=sigmas, degree=1).coef
        shifted = zs - zs[fixed[0]]
        assert np.max(np.abs(shifted - got.coef)) > 1e-3
        assert O.objective(got.coef.ravel(), images, masks, sigmas, 1) > \
            O.objective(zs.ravel(), images, masks, sigmas, 1)


def test_single_reference_equals_the_shifted_zero_sum_fit():
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks, noise=0.05, seed=2)
    zs = match_backgrounds(images, masks=masks, degree=1).coef
    ref = match_backgrounds(images, masks=masks, degree=1, reference=2).coef
    np.testing.assert_allclose(ref, zs - zs[2], atol=1e-10)


def test_levels_are_recovered():
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks)
    given = [TRUE[0, 0], None, np.nan, TRUE[3, 0]]
    r = match_backgrounds(images, masks=masks, degree=1, levels=given)
    # the constants (backgrounds at the center) are the absolute ones; the
    # other terms follow the zero sum
    np.testing.assert_allclose(r.coef[:, 0], TRUE[:, 0], atol=1e-9)
    np.testing.assert_allclose(r.coef[:, 1:], TRUE[:, 1:] - TRUE[:, 1:].mean(axis=0),
                               atol=1e-9)
    # inconsistent levels: the least-squares constant (mean of the differences)
    zs = match_backgrounds(images, masks=masks, degree=1).coef
    noisy = [1.1, 1.0, None, 0.4]
    r2 = match_backgrounds(images, masks=masks, degree=1, levels=noisy)
    k = np.mean([noisy[i] - zs[i, 0] for i in (0, 1, 3)])
    np.testing.assert_allclose(r2.coef[:, 0], zs[:, 0] + k, atol=1e-12)
    np.testing.assert_allclose(r2.coef[:, 1:], zs[:, 1:], atol=1e-12)
    assert r2.conventions[0]["level_shift"] == pytest.approx(k)


def test_levels_with_match_down_keep_its_slopes():
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks)
    down = match_backgrounds(images, masks=masks, degree=1, level="lowest")
    both = match_backgrounds(images, masks=masks, degree=1, level="lowest",
                             levels=list(TRUE[:, 0]))
    np.testing.assert_allclose(both.coef[:, 1:], down.coef[:, 1:], atol=1e-12)
    np.testing.assert_allclose(both.coef[:, 0], TRUE[:, 0], atol=1e-9)


def test_zero_sum_default_unchanged():
    rng = np.random.default_rng(11)
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks, noise=0.1, seed=4)
    sigmas = [rng.uniform(0.5, 2.0, SHAPE) for _ in masks]
    default = match_backgrounds(images, masks=masks, sigmas=sigmas, degree=1).coef
    explicit = match_backgrounds(images, masks=masks, sigmas=sigmas, degree=1,
                                 level="zero_sum").coef
    np.testing.assert_array_equal(default, explicit)
    clean = [np.nan_to_num(im) for im in images]
    np.testing.assert_allclose(default, O.oracle_solve(clean, masks, sigmas, 1), atol=1e-9)


def _two_groups():
    # group A: images 0, 1, 2 (left half); group B: images 3, 4 (right half)
    masks = _boxes([(0, 20, 0, 12), (5, 25, 6, 16), (10, 30, 10, 18),
                    (0, 20, 22, 34), (8, 30, 28, 40)])
    true = np.array([[0.6, 0.0, 0.01, 0.0], [0.3, 0.0, -0.01, 0.0], [0.9, 0.01, 0.0, 0.0],
                     [1.4, 0.0, 0.02, 0.0], [1.1, -0.01, 0.0, 0.0]])
    return masks, true


def test_two_groups_each_their_own_lowest():
    masks, true = _two_groups()
    images = _inject(true, masks)
    with pytest.warns(MatchWarning, match="lowest background set to 0"):
        r = match_backgrounds(images, masks=masks, degree=1, level="lowest")
    assert r.components == [[0, 1, 2], [3, 4]]
    for comp in r.components:
        scores = _own_mean_scores(true[comp], [masks[i] for i in comp])
        keep = comp[int(np.argmin(scores))]
        np.testing.assert_array_equal(r.coef[keep], 0.0)
        np.testing.assert_allclose(r.coef[comp], true[comp] - true[keep], atol=1e-9)
        assert r.conventions[r.components.index(comp)]["reference"] == [keep]


def test_group_without_reference_falls_back_with_a_warning():
    masks, true = _two_groups()
    images = _inject(true, masks)
    with pytest.warns(MatchWarning, match=r"no reference image in the group\(s\) of "
                                          r"images \[3, 4\]"):
        r = match_backgrounds(images, masks=masks, degree=1, reference=[1])
    np.testing.assert_array_equal(r.coef[1], 0.0)
    np.testing.assert_allclose(r.coef[:3], true[:3] - true[1], atol=1e-9)
    np.testing.assert_allclose(r.coef[3:].sum(axis=0), 0.0, atol=1e-12)  # zero sum
    assert [c["convention"] for c in r.conventions] == ["reference", "zero_sum"]
    # falling back to match_down instead
    with pytest.warns(MatchWarning, match="follows level='lowest'"):
        r2 = match_backgrounds(images, masks=masks, degree=1, reference=[1],
                               level="lowest")
    assert [c["convention"] for c in r2.conventions] == ["reference", "lowest"]
    keep = r2.conventions[1]["reference"][0]
    np.testing.assert_allclose(r2.coef[3:], true[3:] - true[keep], atol=1e-9)


def test_levels_per_group_and_missing_group_warned():
    masks, true = _two_groups()
    images = _inject(true, masks)
    with pytest.warns(MatchWarning, match=r"no level was given for any image of the "
                                          r"group\(s\) \[3, 4\]"):
        r = match_backgrounds(images, masks=masks, degree=1,
                              levels=[None, true[1, 0], None, None, None])
    np.testing.assert_allclose(r.coef[:3, 0], true[:3, 0], atol=1e-9)
    np.testing.assert_allclose(r.coef[3:].sum(axis=0), 0.0, atol=1e-12)
    assert r.conventions[1]["level_shift"] is None


def test_reference_with_undetermined_terms_stays_least_squares():
    """An overlap that is one column leaves x slopes free: the reference stays
    0, the result is a least-squares solution of the constrained problem."""
    masks = _boxes([(0, 30, 0, 21), (0, 30, 20, 40), (0, 30, 10, 30)])
    masks[2][:] = False
    masks[2][:, 20] = True  # image 2 overlaps the others on one column only
    masks[2][:, 21:30] = True
    masks[0][:, 21:] = False
    true = np.array([[0.5, 0.01, 0.02, 0.0], [0.8, 0.0, -0.01, 0.0], [0.2, 0.02, 0.0, 0.0]])
    images = [np.nan_to_num(im) for im in _inject(true, masks, noise=0.01, seed=9)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MatchWarning)
        r = match_backgrounds(images, masks=masks, degree=1, reference=0)
    expect, A, rhs = _constrained_oracle(images, masks, None, 1, [0])
    np.testing.assert_array_equal(r.coef[0], 0.0)
    res_got = A @ r.coef.ravel() - rhs
    res_exp = A @ expect.ravel() - rhs
    assert res_got @ res_got == pytest.approx(res_exp @ res_exp, rel=1e-9)


def test_bad_level_arguments():
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks)
    with pytest.raises(ValueError, match="'level' must be one of"):
        match_backgrounds(images, masks=masks, level="down")
    with pytest.raises(ValueError, match="'reference' holds index 7"):
        match_backgrounds(images, masks=masks, reference=[7])
    with pytest.raises(TypeError, match="'reference' must be an image index"):
        match_backgrounds(images, masks=masks, reference=["a"])
    with pytest.raises(ValueError, match="'levels' has 2 values"):
        match_backgrounds(images, masks=masks, levels=[1.0, 2.0])
    with pytest.raises(ValueError, match="gives no level"):
        match_backgrounds(images, masks=masks, levels=[None] * 4)
    with pytest.raises(ValueError, match="cannot both be given"):
        match_backgrounds(images, masks=masks, levels=[1.0] * 4, reference=0)


def test_cutouts_and_world_coordinates_agree_with_full_grid():
    """The mean over own pixels is computed the same way for cutouts and for a
    world frame (image2world a linear map: the same choice of image)."""
    masks = _boxes(CHAIN)
    images = _inject(TRUE, masks)
    full = match_backgrounds(images, masks=masks, degree=1, level="lowest")
    cut, origins = [], []
    for im, (y0, y1, x0, x1) in zip(images, CHAIN):
        cut.append(im[y0:y1, x0:x1])
        origins.append((y0, x0))
    c = match_backgrounds(cut, degree=1, level="lowest", origins=origins,
                          grid_shape=SHAPE)
    np.testing.assert_allclose(c.coef, full.coef, atol=1e-9)
    np.testing.assert_allclose(c.mean_background, full.mean_background, atol=1e-9)

    def i2w(x, y):
        return 150.0 + 1e-4 * x, 2.0 + 1e-4 * y

    w = match_backgrounds(images, masks=masks, degree=1, level="lowest", image2world=i2w)
    assert w.conventions[0]["reference"] == full.conventions[0]["reference"]
    np.testing.assert_allclose(w.mean_background, full.mean_background, atol=1e-8)
