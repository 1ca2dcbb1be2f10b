"""Cutout input of the engine: images given as boxes of the grid with their origins.

The cutout call must give exactly what the full-grid call gives when the
full-grid images are the cutouts embedded in an otherwise invalid grid, and
its working memory must follow the cutouts, not N x grid.
"""
import numpy as np
import pytest

import oracle as O
from jwst_wiimatch.core import match_backgrounds


def _cutout_problem(seed, grid, n, degree, with_sigmas=True, with_masks=True):
    """Random cutouts of ``grid`` and the same problem embedded in full-grid arrays."""
    rng = np.random.default_rng(seed)
    cuts, cmasks, csigs, origins = [], [], [], []
    fulls, fmasks, fsigs = [], [], []
    coords = np.indices(grid, dtype=float)
    for _ in range(n):
        size = [int(rng.integers(max(2, g // 3), g - g // 5 + 1)) for g in grid]
        org = [int(rng.integers(0, g - s + 1)) for g, s in zip(grid, size)]
        sl = tuple(slice(o, o + s) for o, s in zip(org, size))
        bkg = rng.normal(5, 1) + sum(rng.normal(0, 0.05) * c for c in coords)
        full = (bkg + rng.normal(0, 0.1, grid)).astype(np.float32)
        sig = rng.uniform(0.5, 1.5, grid).astype(np.float32)
        m = np.zeros(grid, dtype=bool)
        m[sl] = True
        m &= rng.random(grid) > 0.2  # holes inside the cutout too
        cut = full[sl].copy()
        cuts.append(cut)
        cmasks.append(m[sl].copy())
        csigs.append(sig[sl].copy())
        origins.append(tuple(org))
        # the full-grid twin holds garbage outside the cutout (masked there)
        outside = np.ones(grid, dtype=bool)
        outside[sl] = False
        full = full.copy()
        full[outside] = 1e6
        fulls.append(full)
        fmasks.append(m)
        fsigs.append(sig)
    if not with_masks:
        cmasks = None
        fmasks = []
        for o, c in zip(origins, cuts):
            m = np.zeros(grid, dtype=bool)
            m[tuple(slice(a, a + s) for a, s in zip(o, c.shape))] = True
            fmasks.append(m)
    if not with_sigmas:
        csigs = fsigs = None
    return (cuts, cmasks, csigs, origins), (fulls, fmasks, fsigs)


@pytest.mark.parametrize("grid,degree", [((37, 53), 1), ((40, 31), (2, 1)),
                                         ((9, 11, 13), 1), ((301,), 3)])
@pytest.mark.parametrize("with_sigmas", [True, False])
@pytest.mark.parametrize("with_masks", [True, False])
@pytest.mark.filterwarnings("ignore:image\\(s\\) 3 have no valid pixels")  # 3-D case
def test_cutouts_identical_to_full_grid(grid, degree, with_sigmas, with_masks):
    (cuts, cm, cs, org), (fulls, fm, fs) = _cutout_problem(
        3, grid, 5, degree, with_sigmas, with_masks)
    full = match_backgrounds(fulls, fm, fs, degree=degree)
    cut = match_backgrounds(cuts, cm, cs, degree=degree, origins=org, grid_shape=grid)
    np.testing.assert_array_equal(cut.coef, full.coef)
    np.testing.assert_array_equal(cut.pair_npix, full.pair_npix)
    np.testing.assert_array_equal(cut.npix, full.npix)
    np.testing.assert_array_equal(cut.rms, full.rms)
    assert cut.eff_center == full.eff_center


def test_cutouts_world_coordinates_identical():
    grid = (30, 44)

    def image2world(x, y):
        return 10.0 + 1e-3 * x + 1e-7 * x * y, -5.0 + 1e-3 * y - 2e-7 * x * x

    (cuts, cm, cs, org), (fulls, fm, fs) = _cutout_problem(11, grid, 4, 2)
    kw = dict(degree=2, image2world=image2world, center=(12.0, 9.0))
    full = match_backgrounds(fulls, fm, fs, **kw)
    cut = match_backgrounds(cuts, cm, cs, origins=org, grid_shape=grid, **kw)
    np.testing.assert_array_equal(cut.coef, full.coef)


def test_cutouts_against_bruteforce_oracle():
    grid = (23, 29)
    (cuts, cm, cs, org), (fulls, fm, fs) = _cutout_problem(5, grid, 4, 1)
    cut = match_backgrounds(cuts, cm, cs, degree=1, origins=org, grid_shape=grid)
    ref = O.oracle_solve(fulls, fm, fs, degree=1)
    np.testing.assert_allclose(cut.coef, ref, rtol=1e-8, atol=1e-9)


def test_default_grid_shape_is_smallest_holding_all():
    a = np.ones((3, 4))
    b = np.ones((5, 2)) * 2
    r = match_backgrounds([a, b], origins=[(0, 0), (2, 3)])
    assert r.frame.shape == (7, 5)
    # default center: middle of that grid, (x, y) order
    assert r.eff_center == (2.0, 3.0)
    assert int(r.pair_npix[0, 1]) == 1


@pytest.mark.parametrize("kwargs,words", [
    (dict(origins=[(0, 0)]), "'origins' has 1 entries"),
    (dict(origins=[(0, 0), (0,)]), "origins[1]"),
    (dict(origins=[(0, 0), (0.5, 1)]), "origins[1]"),
    (dict(origins=[(0, 0), (-1, 1)]), "negative"),
    (dict(origins=[(0, 0), (8, 0)], grid_shape=(10, 10)), "outside grid_shape"),
    (dict(origins=[(0, 0), (1, 1)], grid_shape=(10,)), "'grid_shape'"),
    (dict(grid_shape=(7, 7)), "only needed with 'origins'"),
])
def test_cutout_argument_errors(kwargs, words):
    ims = [np.ones((4, 4)), np.ones((4, 4))]
    with pytest.raises((ValueError, TypeError)) as exc:
        match_backgrounds(ims, **kwargs)
    assert words in str(exc.value)


def test_cutout_mask_and_sigma_shapes_follow_their_image():
    a, b = np.ones((3, 4)), np.ones((5, 2))
    with pytest.raises(ValueError, match=r"masks\[1\] has shape \(3, 4\) but images\[1\]"):
        match_backgrounds([a, b], masks=[None, np.ones((3, 4))], origins=[(0, 0), (1, 1)])
    with pytest.raises(ValueError, match=r"sigmas\[0\] has shape \(5, 2\) but images\[0\]"):
        match_backgrounds([a, b], sigmas=[np.ones((5, 2)), 1.0], origins=[(0, 0), (1, 1)])


def test_cutouts_memory_follows_footprints_not_grid():
    """Peak working memory far below N x grid: it must not scale with the grid."""
    from tracing import traced_peak

    rng = np.random.default_rng(1)
    grid = (4000, 4000)
    n, side = 16, 300
    cuts, org = [], []
    for k in range(n):
        cuts.append(rng.normal(size=(side, side)).astype(np.float32))
        # a chain of overlapping cutouts spread over the big grid
        org.append((200 * k + 10, 230 * k + 5))
    one_grid_f32 = grid[0] * grid[1] * 4  # 64 MB; the full-grid call would need n of them
    r, peak = traced_peak(lambda: match_backgrounds(cuts, origins=org, grid_shape=grid,
                                                    degree=1, threads=1))
    assert np.all(np.isfinite(r.coef))
    assert len(r.components) == 1
    assert peak < one_grid_f32 / 4, f"peak {peak / 2**20:.1f} MB"
