"""Tests of the core's building blocks against independent computations."""
import numpy as np
import pytest
from numpy.polynomial import polynomial as npoly

from jwst_wiimatch.core import accumulate as acc_mod
from jwst_wiimatch.core import match_backgrounds, polyval_nd
from jwst_wiimatch.core.poly import (coef_from_scaled, coef_to_scaled, exponents,
                                     moments_to_basis, term_name)
from jwst_wiimatch.core.solve import MatchWarning
from tracing import capture_accumulators


def test_exponents_order_is_c_order_over_xyz():
    e = exponents((1, 2))
    assert e.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert [term_name(tuple(p)) for p in e[:4]] == ["1", "y", "y^2", "x"]


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_polyval_nd_equals_numpy(ndim):
    rng = np.random.default_rng(ndim)
    deg = [2, 1, 3][:ndim]
    c = rng.normal(size=[d + 1 for d in deg])
    pts = [rng.normal(size=7) for _ in range(ndim)]
    ref = {1: npoly.polyval, 2: npoly.polyval2d, 3: npoly.polyval3d}[ndim]
    expected = ref(pts[0], c) if ndim == 1 else ref(*pts, c)
    np.testing.assert_allclose(polyval_nd(c, *pts), expected, rtol=1e-13)


def test_polyval_nd_rejects_wrong_number_of_coordinates():
    with pytest.raises(ValueError, match="coef"):
        polyval_nd(np.ones((2, 2)), 1.0)


def test_scaled_basis_roundtrip_and_meaning():
    rng = np.random.default_rng(0)
    deg, shift, scale = (2, 3), (3.5, -1.25), (0.5, 40.0)
    cu = rng.normal(size=(2, 12))
    cx = coef_from_scaled(cu, deg, shift, scale)
    np.testing.assert_allclose(coef_to_scaled(cx, deg, shift, scale), cu, rtol=1e-12,
                               atol=1e-12)
    # the same polynomial evaluated directly in both bases
    x, y = rng.normal(size=5) * 3, rng.normal(size=5) * 50
    u, v = (x - shift[0]) / scale[0], (y - shift[1]) / scale[1]
    for k in range(2):
        np.testing.assert_allclose(polyval_nd(cx[k].reshape(3, 4), x, y),
                                   polyval_nd(cu[k].reshape(3, 4), u, v), rtol=1e-10)


def test_moments_to_basis_matches_direct_sums():
    rng = np.random.default_rng(1)
    x, y, w = rng.normal(size=50), rng.normal(size=50), rng.random(50)
    shift, scale = (0.3, -2.0), (2.0, 0.25)
    u, v = (x - shift[0]) / scale[0], (y - shift[1]) / scale[1]
    mu = np.array([[np.sum(w * u**i * v**j) for j in range(5)] for i in range(4)])
    mx = np.array([[np.sum(w * x**i * y**j) for j in range(5)] for i in range(4)])
    np.testing.assert_allclose(moments_to_basis(mu, (3, 4), shift, scale), mx, rtol=1e-10)


def _problem(seed=0, n=5, shape=(70, 90)):
    rng = np.random.default_rng(seed)
    ims, masks, sigs = [], [], []
    for _ in range(n):
        m = np.zeros(shape, dtype=bool)
        y0, x0 = rng.integers(0, shape[0] // 2), rng.integers(0, shape[1] // 2)
        m[y0:y0 + shape[0] // 2 + 5, x0:x0 + shape[1] // 2 + 5] = True
        m &= rng.random(shape) > 0.1
        ims.append(rng.normal(size=shape) + rng.normal())
        masks.append(m)
        sigs.append(rng.uniform(0.5, 2.0, shape))
    return ims, masks, sigs


@pytest.mark.parametrize("world", [False, True])
def test_result_does_not_depend_on_blocks_or_threads(monkeypatch, world):
    ims, masks, sigs = _problem()
    kw = {}
    if world:
        kw = dict(image2world=lambda x, y: (10 + 0.01 * x + 1e-5 * y * y, -5 + 0.01 * y))
    ref = match_backgrounds(ims, masks, sigs, degree=2, threads=1, **kw)
    monkeypatch.setattr(acc_mod, "BLOCK_PIXELS", 300)  # many small, uneven blocks
    monkeypatch.setattr(acc_mod, "PAIR_BATCH", 3)
    small = match_backgrounds(ims, masks, sigs, degree=2, threads=2, **kw)
    np.testing.assert_allclose(small.coef, ref.coef, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(small.pair_npix, ref.pair_npix)
    np.testing.assert_array_equal(small.npix, ref.npix)
    np.testing.assert_allclose(small.rms, ref.rms, rtol=1e-9)


def test_diagnostics_against_direct_computation():
    ims, masks, sigs = _problem(seed=3, n=4)
    res = match_backgrounds(ims, masks, sigs, degree=1)
    n = len(ims)
    shape = ims[0].shape
    yy, xx = np.indices(shape, dtype=float)
    cx, cy = shape[1] // 2, shape[0] // 2
    bkg = [polyval_nd(res.coef[k].reshape(2, 2), xx - cx, yy - cy) for k in range(n)]
    for k in range(n):
        num_b = num_a = wsum = 0.0
        used = np.zeros(shape, dtype=bool)
        for m in range(n):
            if m == k:
                continue
            both = masks[k] & masks[m]
            assert res.pair_npix[k, m] == np.count_nonzero(both)
            used |= both
            w = 1.0 / (sigs[k] ** 2 + sigs[m] ** 2)
            d = ims[k] - ims[m]
            r = d - (bkg[k] - bkg[m])
            num_b += np.sum((w * d * d)[both])
            num_a += np.sum((w * r * r)[both])
            wsum += np.sum(w[both])
        assert res.npix[k] == np.count_nonzero(used)
        np.testing.assert_allclose(res.rms_before[k], np.sqrt(num_b / wsum), rtol=1e-9)
        np.testing.assert_allclose(res.rms[k], np.sqrt(num_a / wsum), rtol=1e-7)
        assert res.rms[k] < res.rms_before[k]


def test_bounding_boxes_skip_far_images_but_keep_their_pairs():
    # two pairs of images far apart on a big grid: two groups, warned
    shape = (400, 400)
    ims = [np.full(shape, v) for v in (1.0, 3.0, 10.0, 20.0)]
    masks = [np.zeros(shape, bool) for _ in range(4)]
    masks[0][:50, :50] = masks[1][10:60, 10:60] = True
    masks[2][300:, 300:] = masks[3][320:, 320:] = True
    with pytest.warns(MatchWarning, match="2 groups"):
        res = match_backgrounds(ims, masks, degree=0)
    np.testing.assert_allclose(res.coef[:, 0], [-1, 1, -5, 5], atol=1e-12)
    assert sorted(map(sorted, res.components)) == [[0, 1], [2, 3]]
    assert res.pair_npix[0, 2] == 0 and res.pair_npix[0, 1] == 40 * 40


def test_memory_is_bounded_by_blocks_not_by_images_times_grid():
    from tracing import traced_peak

    rng = np.random.default_rng(5)
    n, shape = 12, (1024, 1024)
    ims = [rng.normal(size=shape).astype(np.float32) for _ in range(n)]
    sigs = [np.ones(shape, dtype=np.float32) for _ in range(n)]
    masks = []
    for _ in range(n):
        m = np.zeros(shape, dtype=bool)
        y0, x0 = rng.integers(0, 400, 2)
        m[y0:y0 + 600, x0:x0 + 600] = True
        masks.append(m)
    one_grid_f64 = ims[0].size * 8  # 8 MB; n of them would be 96 MB
    _, peak = traced_peak(lambda: match_backgrounds(ims, masks, sigs, degree=2, threads=1))
    assert peak < 3 * one_grid_f64, f"peak {peak / 2**20:.1f} MB"


def test_thread_count_from_environment(monkeypatch):
    ims, masks, sigs = _problem(seed=7, n=3, shape=(30, 40))
    ref = match_backgrounds(ims, masks, sigs, degree=1, threads=1)
    monkeypatch.setenv("JWST_WIIMATCH_THREADS", "3")
    assert acc_mod._n_threads() == 3
    np.testing.assert_allclose(match_backgrounds(ims, masks, sigs, degree=1).coef, ref.coef,
                               rtol=1e-12, atol=1e-14)
    monkeypatch.setenv("JWST_WIIMATCH_THREADS", "many")
    with pytest.raises(ValueError, match="JWST_WIIMATCH_THREADS"):
        match_backgrounds(ims, masks, sigs, degree=1)


def test_memory_mapped_inputs_are_read_not_written(tmp_path):
    ims, masks, sigs = _problem(seed=9, n=3, shape=(40, 50))
    y, x = np.argwhere(masks[1])[0]
    ims[1][y, x] = np.nan  # a non-finite valid pixel: excluded, never overwritten
    paths, maps = [], []
    for k, im in enumerate(ims):
        p = tmp_path / f"im{k}.npy"
        np.save(p, im)
        paths.append(p)
        maps.append(np.load(p, mmap_mode="r+"))
    before = [p.read_bytes() for p in paths]
    with pytest.warns(MatchWarning, match="NaN or infinite"):
        res = match_backgrounds(maps, masks, sigs, degree=1)
    assert [p.read_bytes() for p in paths] == before
    assert np.all(np.isfinite(res.coef))


def test_degenerate_axis_reports_the_term_for_every_image():
    # one row of pixels: y == 0 everywhere, so the y terms are free for all images
    rng = np.random.default_rng(11)
    ims = [rng.normal(size=(1, 12)) + k for k in range(3)]
    with pytest.warns(MatchWarning, match="image 0: y, x\\*y; image 1"):
        res = match_backgrounds(ims, degree=1)
    assert sorted(res.undetermined) == [(i, p) for i in range(3) for p in [(0, 1), (1, 1)]]
    assert all(type(i) is int for comp in res.components for i in comp)
    # the x terms are determined: the pairwise differences of the data are matched
    x = np.arange(12) - 6.0
    fit = [res.coef[k, 0] + res.coef[k, 2] * x for k in range(3)]
    for k in range(1, 3):
        np.testing.assert_allclose(
            fit[k] - fit[0], np.polyval(np.polyfit(x, ims[k][0] - ims[0][0], 1), x), atol=1e-10)


def test_terms_without_support_do_not_explode():
    """Two images share one pixel whose y coordinate is 0 up to rounding in the
    scaled basis: only the constant is determined, the y terms have a diagonal
    of 1e-32. They must not be scaled up into 1e16 coefficients (found by
    Hypothesis); the fit must still be the least-squares optimum."""
    import warnings

    import oracle as O

    a = np.zeros((5, 2))
    b = np.zeros((5, 2))
    a[2, 1], b[2, 1] = -16.796875, 0.9375
    m = np.zeros((5, 2), dtype=bool)
    m[2, 1] = True
    kw = dict(degree=1, center=(3.308516179044907, -0.692481791239191))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = match_backgrounds([a, b], [m, m], **kw)
    assert np.all(np.abs(res.coef) < 1e3), res.coef
    # the one pixel's difference is matched exactly
    x, y = 1.0 - kw["center"][0], 2.0 - kw["center"][1]
    p = [O.polyval_nd(c.reshape(2, 2), [np.array(x), np.array(y)]) for c in res.coef]
    assert float(p[0] - p[1]) == pytest.approx(a[2, 1] - b[2, 1], rel=1e-9)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("case", ["zeros", "negative", "nan", "tiny", "clean"])
def test_fill_image_agrees_with_the_careful_path(with_mask, case):
    """_fill_image's fast paths (including sigmas <= 0 read as 'not used')
    give exactly what _prepare_image gives: data, variance, validity, counts."""
    from jwst_wiimatch.core.accumulate import _fill_image, _prepare_image
    from jwst_wiimatch.core.inputs import Problem

    rng = np.random.default_rng(3)
    shape = (30, 40)
    img = rng.normal(size=shape).astype(np.float32)
    sig = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    mask = rng.random(shape) > 0.2 if with_mask else None
    if case == "zeros":
        sig[:, :7] = 0.0  # outside a footprint within the box
    elif case == "negative":
        sig[3:9, 5:11] = -1.0
        sig[0, 0] = 0.0
    elif case == "nan":
        sig[:, :7] = 0.0
        sig[12, 20] = np.nan
    elif case == "tiny":
        sig[:, :7] = 0.0
        sig[5, 30] = 1e-30
    prob = Problem(images=[img], masks=[mask], sigmas=[sig], has_sigmas=True, shape=shape,
                   degree=(1, 1), origins=[(0, 0)])
    box = ((2, 28), (1, 39))
    d_ref, v_ref, valid_ref, counts_ref = _prepare_image(prob, 0, box)
    d = np.full(d_ref.shape, 7.0)
    v = np.full(d_ref.shape, 7.0)
    valid, counts = _fill_image(prob, 0, box, d, v)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(v, v_ref)
    np.testing.assert_array_equal(np.ones(shape, bool)[2:28, 1:39] if valid is None else valid,
                                  valid_ref)
    assert tuple(counts) == tuple(counts_ref)


@pytest.mark.parametrize("shape,degree", [((60, 80), (1, 1)), ((60, 80), (2, 1)),
                                          ((60, 80), (0, 2)), ((20, 24, 28), (1, 2, 1))])
def test_image_polys_against_monomials(monkeypatch, shape, degree):
    """The robust passes' polynomial of each image over a box equals the sum of
    its coefficients times the monomials of the scaled coordinates."""
    from jwst_wiimatch.core.poly import monomials
    from jwst_wiimatch.core.robust import _to_u

    made = capture_accumulators(monkeypatch)
    rng = np.random.default_rng(len(shape) + sum(degree))
    ims = [rng.normal(size=shape) + k for k in range(3)]
    match_backgrounds(ims, degree=degree[0] if len(set(degree)) == 1 else degree,
                      robust="clip", threads=1)
    acc = made[0]
    acc.rob.coef_u = rng.normal(size=acc.rob.coef_u.shape)  # each term its own value
    ebox = tuple((2, n - 3) for n in shape)
    labels = [2, 0]
    got = acc._image_polys(labels, ebox, None, None)
    pix = [a.ravel() for a in np.indices(tuple(hi - lo for lo, hi in ebox))]
    pix = [p + lo for p, (lo, _) in zip(pix, ebox)]
    want = acc.rob.coef_u[labels] @ monomials(_to_u(acc.frame, pix), acc.deg)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("n,degree", [(5, (1, 1)), (40, (1, 1)), (10, (2, 1)),
                                      (6, (1, 2, 1)), (7, (0,))])
def test_assemble_is_the_sum_of_the_pairs_blocks(n, degree):
    """The normal equations from pair moments equal the sum, pair by pair in the
    moments' order, of each pair's four blocks (``+G`` on the diagonal, ``-G``
    off it) and two right-hand sides (``+t``, ``-t``): bit for bit."""
    from jwst_wiimatch.core.solve import assemble, gram_index

    rng = np.random.default_rng(n)
    mshape = tuple(2 * d + 1 for d in degree)
    dshape = tuple(d + 1 for d in degree)
    pairs = [(l, m) for l in range(n) for m in range(l + 1, n) if rng.random() < 0.6]
    rng.shuffle(pairs)  # not in (l, m) order: the order of the sums is the moments'
    S = {k: rng.normal(size=mshape) for k in pairs}
    T = {k: rng.normal(size=dshape) for k in pairs}
    idx = gram_index(degree)
    M = int(np.prod(dshape))
    a_ref, b_ref = np.zeros((n * M, n * M)), np.zeros(n * M)
    for (l, m) in pairs:
        g, t = S[(l, m)][idx], T[(l, m)].ravel()
        sl, sm = slice(l * M, (l + 1) * M), slice(m * M, (m + 1) * M)
        a_ref[sl, sm] -= g
        a_ref[sm, sl] -= g
        a_ref[sl, sl] += g
        a_ref[sm, sm] += g
        b_ref[sl] += t
        b_ref[sm] -= t
    a, b = assemble(n, degree, S, T)
    np.testing.assert_array_equal(a, a_ref)
    np.testing.assert_array_equal(b, b_ref)
    a0, b0 = assemble(n, degree, {}, {})
    assert not a0.any() and not b0.any() and a0.shape == (n * M, n * M)
