"""Robust matching (issue 8, item 1): the engine's ``robust=`` and the steps' defaults.

Injected backgrounds are recovered within the noise with unflagged junk in one
exposure (cosmic rays, a trail, an extended transient, 1e30 fill values),
clean data are matched as well as by plain least squares, absurd values never
reach the sums, rejections are counted right, and the default (plain) engine
is unchanged.
"""

import logging
import warnings

import numpy as np
import pytest

from jwst_wiimatch.core import MatchWarning, match_backgrounds, polyval_nd
from jwst_wiimatch.core.robust import check_robust, dilate, dilate_flat, source_mask
from jwst_wiimatch.match import match_lsq

import bench_robust as br  # benchmarks/ is on pytest's pythonpath
import junk_data as jd  # benchmarks/ is on pytest's pythonpath

SHAPE = (96, 96)
SEEDS = (0, 1, 2)


def _errors(case_name, args, seeds=SEEDS, route="engine"):
    errs = []
    for seed in seeds:
        case = jd.make_junk_case(case_name, n=5, shape=SHAPE, seed=seed)
        run = br.run_engine if route == "engine" else br.run_step
        with np.errstate(all="ignore"):
            rec, _, _ = run(case, args)
        errs.append(br.background_error(rec, case.backgrounds, case.footprints)[0])
    return float(np.sqrt(np.mean(np.square(errs))))


@pytest.fixture(scope="module")
def clean_errors():
    return {"plain": _errors("clean", {}), "robust": _errors("clean", {"robust": "clip"})}


# ----------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------
def test_clean_data_as_good_as_plain(clean_errors):
    assert clean_errors["robust"] <= 1.05 * clean_errors["plain"]


@pytest.mark.filterwarnings("ignore::jwst_wiimatch.core.MatchWarning")
@pytest.mark.parametrize("case", ["cr", "trail", "transient", "fill"])
def test_junk_recovered_within_noise(case, clean_errors):
    robust = _errors(case, {"robust": "clip"})
    plain = _errors(case, {})
    # the check can fail: plain least squares is spoiled by the junk
    assert not plain <= 3 * clean_errors["plain"]
    assert robust <= 1.5 * clean_errors["plain"], (robust, clean_errors)


@pytest.mark.filterwarnings("ignore::jwst_wiimatch.core.MatchWarning")
@pytest.mark.parametrize("method", ["huber", "tukey"])
def test_reweighting_methods(method, clean_errors):
    assert _errors("cr", {"robust": method}, seeds=(0,)) <= 2 * clean_errors["plain"]
    assert _errors("trail", {"robust": method}, seeds=(0,)) <= 2 * clean_errors["plain"]


def _ref_case():
    rng = np.random.default_rng(42)
    shape = (40, 50)
    y, x = np.indices(shape)
    ims, masks, sig = [], [], []
    for k in range(3):
        im = 1.0 + 0.5 * k + 0.01 * k * x - 0.02 * y + rng.normal(0, 0.1, shape)
        m = np.zeros(shape, bool)
        m[k * 5:k * 5 + 30, k * 7:k * 7 + 35] = True
        ims.append(im.astype(np.float32))
        masks.append(m)
        sig.append(np.full(shape, 0.1, np.float32))
    ims[1][20, 20] = 1e30
    ims[2][10:13, 30:33] += 50
    return ims, masks, sig


#: match_backgrounds(*_ref_case(), degree=1) of the release before robust
#: matching (identical to the last bit on the machine that added this test)
_BEFORE = [
    "-0x1.91aa6a1a86f67p+88", "-0x1.0b56eadc1972ap+85", "-0x1.a0b8d247eee0cp+83",
    "0x1.dd1d596d07d8ep+80", "0x1.bad72efa418e6p+89", "0x1.b689970649939p+82",
    "-0x1.7ab257187d606p+85", "-0x1.e24524c436d83p+76", "-0x1.e403f3d9fc262p+88",
    "0x1.a90b6ff6a0804p+84", "0x1.e2e08baa7918ap+85", "-0x1.bef90720c4603p+80"]


def test_default_engine_unchanged():
    ims, masks, sig = _ref_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MatchWarning)
        r = match_backgrounds(ims, masks, sig, degree=1)
    before = np.array([float.fromhex(v) for v in _BEFORE])
    np.testing.assert_allclose(r.coef.ravel(), before, rtol=1e-12, atol=0)
    assert r.robust is None and r.rejected is None and not r.absurd.any()
    # an explicit robust=None is the same call
    r2 = match_backgrounds(ims, masks, sig, degree=1, robust=None, max_abs=None)
    np.testing.assert_array_equal(r2.coef, r.coef)
    np.testing.assert_array_equal(match_lsq(ims, masks, sig, degree=1), r.coef)


def test_absurd_values_never_reach_the_sums():
    ims, masks, sig = _ref_case()
    ims[0][15, 12] = -1e30
    ims[2][25, 40] = 3e38  # near float32's largest
    with pytest.warns(MatchWarning, match="absurd"):
        r = match_backgrounds(ims, masks, sig, degree=1, robust="clip")
    assert r.absurd.tolist() == [1, 1, 1]
    mom = r.moments
    assert all(abs(v) < 1e12 for v in mom.chi.values())
    assert all(np.all(np.abs(t) < 1e12) for t in mom.T.values())
    # the same as leaving them out by the masks
    m2 = [m.copy() for m in masks]
    m2[0][15, 12] = m2[1][20, 20] = m2[2][25, 40] = False
    r2 = match_backgrounds(ims, m2, sig, degree=1, robust="clip")
    np.testing.assert_array_equal(r.coef, r2.coef)
    assert not r2.absurd.any()
    # an explicit cut without robust matching: plain least squares without them
    with pytest.warns(MatchWarning, match="absurd"):
        r3 = match_backgrounds(ims, masks, sig, degree=1, max_abs=1e6)
    r4 = match_backgrounds(ims, m2, sig, degree=1)
    np.testing.assert_array_equal(r3.coef, r4.coef)
    assert r3.absurd.tolist() == [1, 1, 1] and r3.robust is None


def test_rejected_counts_on_a_constructed_case():
    """Noise-free constant images: a 3 x 3 blob in image 1 where images 0, 1, 2
    overlap, and one pixel in image 0 where only images 0 and 3 overlap."""
    shape = (60, 60)
    ims = [np.full(shape, v) for v in (1.0, 2.0, 4.0, 7.0)]
    masks = [np.zeros(shape, bool) for _ in range(4)]
    masks[0][:, :] = True
    masks[1][:40, :40] = True
    masks[2][:40, :40] = True
    masks[3][45:, :] = True
    ims[1][10:13, 10:13] += 100.0
    ims[0][50, 30] += 100.0
    for grow, blob, dot in ((0, 9, 1), (1, 25, 9), (2, 49, 25)):
        r = match_backgrounds(ims, masks, degree=0, robust="clip", grow=grow)
        pr = r.pair_rejected
        assert pr[0, 1] == pr[1, 2] == blob and pr[0, 2] == 0
        assert pr[0, 3] == dot and pr[1, 3] == pr[2, 3] == 0
        assert pr[1, 0] == pr[0, 1]
        # the blob is image 1's (its every pair rejects it); the pixel where
        # only images 0 and 3 overlap counts for both
        assert r.rejected.tolist() == [dot, blob, 0, dot]
        np.testing.assert_allclose(r.coef[:, 0] - r.coef[0, 0], [0, 1, 3, 6], atol=1e-9)
        assert r.robust["method"] == "clip" and r.robust["converged"]


def test_start_not_moved_by_junk():
    """Half of the pixels of one image's overlap with the other is junk-free
    and the rest at +1e6: the cell medians start within the noise."""
    rng = np.random.default_rng(0)
    shape = (80, 80)
    ims = [rng.normal(0, 1, shape), 3 + rng.normal(0, 1, shape)]
    ims[1][:, :30] += 1e6
    r = match_backgrounds(ims, degree=0, robust="clip", max_abs=1e20)
    assert abs((r.coef[1, 0] - r.coef[0, 0]) - 3) < 0.1
    assert r.pair_rejected[0, 1] >= 30 * 80


# an extended glow (wisp-, claw- or ghost-like) over a sizeable part of one
# image: at one edge of each overlap it is a cluster at high leverage, which
# tilts an L1 or Huber start; the start screens each pair's cells first
GLOW_GEOMETRIES = {
    # 2 x 2 mosaic: half-image steps; a glow on 20 % of image 1 (its side
    # towards the others) covers 40 % of two of its overlaps
    "mosaic": ((150, 150), (100, 100), [(0, 0), (0, 50), (50, 0), (50, 50)], "left"),
    # small dithers: a glow on 30 or 40 % of image 1 (the side away from
    # image 0) covers that much of the overlap with image 3
    "dither": ((112, 112), (96, 96), [(0, 0), (0, 16), (16, 0), (16, 16)], "right"),
}


def _glow_error(geom, frac, amp, seed, robust):
    grid, shape, origins, side = GLOW_GEOMETRIES[geom]
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(shape)
    images, truth = [], []
    for k, (oy, ox) in enumerate(origins):
        c = rng.normal(0, 1, 3)
        bkg = c[0] + 2 * c[1] * ((xx + ox) / grid[1] - 0.5) + 2 * c[2] * ((yy + oy) / grid[0] - 0.5)
        im = bkg + rng.normal(0, 1, shape)
        if k == 1 and frac:
            w = int(round(frac * shape[1]))
            im[:, slice(None, w) if side == "left" else slice(shape[1] - w, None)] += amp
        images.append(im)
        truth.append(bkg)
    res = match_backgrounds(images, sigmas=[1.0] * 4, degree=1, origins=origins,
                            grid_shape=grid, robust=robust)
    shp = tuple(d + 1 for d in res.degree)
    rec = [polyval_nd(np.reshape(c, shp), xx + ox - res.eff_center[0],
                      yy + oy - res.eff_center[1]) for c, (oy, ox) in zip(res.coef, origins)]
    return max(float(np.sqrt(np.mean(np.square((rec[n] - rec[0]) - (truth[n] - truth[0])))))
               for n in range(1, 4))


def _rms(v):
    return float(np.sqrt(np.mean(np.square(v))))


@pytest.mark.parametrize("geom, frac", [("mosaic", 0.2), ("dither", 0.3), ("dither", 0.4)])
@pytest.mark.parametrize("amp", [8.0, 30.0])
def test_extended_glow_at_the_edge_of_overlaps(geom, frac, amp):
    seeds = (0, 1, 2)
    clean = _rms([_glow_error(geom, 0, 0, s, None) for s in seeds])
    plain = _rms([_glow_error(geom, frac, amp, s, None) for s in seeds])
    clip = _rms([_glow_error(geom, frac, amp, s, "clip") for s in seeds])
    assert plain > 8 * clean, (plain, clean)  # the glow spoils plain least squares
    assert clip <= 1.5 * clean, (clip, plain, clean)


def test_bad_arguments():
    ims = [np.zeros((8, 8)), np.ones((8, 8))]
    for kw in ({"robust": "median"}, {"robust": "clip", "nsigma": 0},
               {"robust": "clip", "grow": -1}, {"robust": "clip", "nclip": 0},
               {"max_abs": -1.0}):
        with pytest.raises(ValueError, match=next(iter(kw)) if len(kw) == 1 else
                           list(kw)[1]):
            match_backgrounds(ims, **kw)
    assert check_robust("none") is None and check_robust(None) is None
    assert check_robust(True).method == "clip"


def test_dilation():
    m = np.zeros((7, 9), bool)
    m[0, 0] = m[4, 5] = True
    d = dilate(m, 1)
    assert d.sum() == 4 + 9 and d[1, 1] and d[5, 6] and not d[2, 2]
    flat = dilate_flat(np.flatnonzero(m), m.shape, 1)
    np.testing.assert_array_equal(flat, np.flatnonzero(d))
    # a stack of planes grows within each plane only
    s = dilate_flat(np.array([4 * 9 + 5]), (2, 7, 9), 1, skip_first=True)
    assert s.size == 9 and np.all(s < 63)


def test_source_mask():
    rng = np.random.default_rng(3)
    y, x = np.indices((64, 80))
    data = 5 + 0.05 * x + rng.normal(0, 1, x.shape)  # a gradient of 4 sigma
    data += 200 * np.exp(-((x - 40) ** 2 + (y - 30) ** 2) / 8.0)
    valid = np.ones(data.shape, bool)
    src = source_mask(data, valid, np.ones(data.shape), nsigma=10, grow=1)
    assert src[30, 40] and src[30, 44] and not src[30, 50]
    assert src.sum() < 150  # the gradient is not a source
    assert source_mask(data - 200 * np.exp(-((x - 40) ** 2 + (y - 30) ** 2) / 8.0),
                       valid, np.ones(data.shape), nsigma=10) is None



@pytest.mark.parametrize("with_sigma", [True, False])
def test_source_mask_bands_and_brute_background(monkeypatch, with_sigma):
    """Tested band by band of rows, the mask is that of one band; and the local
    background is the bilinear interpolation of the tile medians (np.interp along
    each axis, constant beyond the outer tile centres), checked away from the
    threshold."""
    from jwst_wiimatch.core import robust as rb

    rng = np.random.default_rng(5)
    shape = (203, 150)
    y, x = np.indices(shape)
    level = 0.02 * (1 + y / 20.0)  # noise growing tenfold down the rows
    data = 3 + 0.02 * x - 0.01 * y + level * rng.standard_normal(shape)
    data += (rng.random(shape) < 0.01) * rng.uniform(0, 3, shape)  # outliers of all sizes
    valid = rng.random(shape) > 0.02
    sigma = level if with_sigma else None
    monkeypatch.setattr(rb, "SOURCE_BAND_ROWS", 10 ** 6)
    whole = rb.source_mask(data, valid, sigma, nsigma=5, grow=0)
    monkeypatch.setattr(rb, "SOURCE_BAND_ROWS", 7)
    np.testing.assert_array_equal(rb.source_mask(data, valid, sigma, nsigma=5, grow=0), whole)
    # brute force: the background from the tile medians by np.interp
    med, rsig = rb._tile_stats(data, valid, rb.SOURCE_TILE, rb.SOURCE_THIN)
    cy = (np.arange(med.shape[0]) + 0.5) * rb.SOURCE_TILE - 0.5
    cx = (np.arange(med.shape[1]) + 0.5) * rb.SOURCE_TILE - 0.5
    rows = np.array([np.interp(np.arange(shape[1]), cx, m) for m in med])
    bkg = np.array([np.interp(np.arange(shape[0]), cy, c) for c in rows.T]).T
    noise = sigma if with_sigma else np.repeat(np.repeat(rsig, rb.SOURCE_TILE, 0),
                                               rb.SOURCE_TILE, 1)[:shape[0], :shape[1]]
    z = (data - bkg) / noise
    clear = np.abs(z - 5) > 1e-6  # away from the threshold: rounding cannot flip these
    np.testing.assert_array_equal(whole[clear], (valid & (z > 5))[clear])


# ----------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::jwst_wiimatch.core.MatchWarning")
@pytest.mark.parametrize("case", ["cr", "trail", "fill"])
def test_step_robust_by_default(case, caplog):
    clean = _errors("clean", {"robust": "none", "source_nsigma": 0}, seeds=(0, 1),
                    route="step")
    with caplog.at_level(logging.WARNING, logger="jwst_wiimatch"):
        robust = _errors(case, {}, seeds=(0, 1), route="step")
    plain = _errors(case, {"robust": "none", "source_nsigma": 0}, seeds=(0, 1),
                    route="step")
    assert robust <= 1.5 * clean, (robust, clean)
    if case == "fill":  # absurd values are left out whatever robust says
        assert "absurd values" in caplog.text
        assert plain <= 1.5 * clean
    else:  # the check can fail: plain least squares is spoiled by the junk
        assert not plain <= 3 * clean


def test_step_records_robust_fields():
    from jwst_wiimatch.step import WiiMatchStep

    case = jd.make_junk_case("fill", n=3, shape=SHAPE, seed=0)
    out = WiiMatchStep.call([m.copy() for m in case.models], configure_log=False)
    info = [m.meta.wiimatch.instance for m in out]
    assert all(i["robust"] == "clip" and i["robust_nsigma"] == 4.0 and i["robust_grow"] == 1
               and i["robust_nclip"] == 3 and i["robust_passes"] >= 1 for i in info)
    assert [i["npix_absurd"] for i in info] == [0, 0, jd.FILL_COUNT]
    assert all("npix_sources" in i for i in info)
    plain = WiiMatchStep.call([m.copy() for m in case.models], configure_log=False,
                              robust="none")
    assert [m.meta.wiimatch.instance["robust"] for m in plain] == ["none"] * 3
    # the fill values are left out whatever robust says
    assert np.all(np.abs([m.meta.wiimatch.instance["background_at_refpoint"]
                          for m in plain]) < 100)
    with pytest.raises(ValueError, match="robust="):
        WiiMatchStep.call([m.copy() for m in case.models], configure_log=False,
                          robust="median")


def _cosmic_ray_field(seed=2, n=5, shape=(300, 320)):
    """Overlapping images with hundreds of cosmic rays each, everywhere."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    imgs, sigs, masks = [], [], []
    for _ in range(n):
        im = rng.normal(2, 1) + 1e-3 * xx * rng.normal() + 0.05 * rng.standard_normal(shape)
        ys, xs = rng.integers(0, shape[0], 400), rng.integers(0, shape[1], 400)
        im[ys, xs] += rng.uniform(1, 20, 400)
        m = np.zeros(shape, bool)
        y0, x0 = rng.integers(0, 100, 2)
        m[y0:y0 + 200, x0:x0 + 220] = True
        imgs.append(im)
        sigs.append(np.full(shape, 0.05))
        masks.append(m)
    return imgs, masks, sigs


@pytest.mark.parametrize("grow", [1, 2])
@pytest.mark.parametrize("world", [False, True])
def test_rejections_do_not_depend_on_block_cuts(monkeypatch, grow, world):
    """A rejected pixel takes its neighbours within ``grow`` out of the pair's sums
    also across the edge of an accumulation block: the pixels left out, and so the
    coefficients, are those of one whole-grid block whatever the block size."""
    imgs, masks, sigs = _cosmic_ray_field()
    kw = dict(masks=masks, sigmas=sigs, degree=1, robust="clip", grow=grow, threads=1)
    rtol = 1e-10
    if world:
        kw["image2world"] = lambda x, y: (150 + 3e-5 * x + 1e-11 * x * y, 2 + 3e-5 * y)
        # each block's world moments come from series checked to the
        # rounding of right ascensions near 150 degrees (test_world_fit.py):
        # other blocks, other series
        rtol = 1e-8
    _same_for_any_blocks(monkeypatch, imgs, kw, (1 << 12, 1000), min_rejected=1000, rtol=rtol)


def _same_for_any_blocks(monkeypatch, imgs, kw, block_pixels, min_rejected, rtol=1e-10):
    """Rejections and coefficients with blocks of ``block_pixels`` equal one block's."""
    from jwst_wiimatch.core import accumulate as acc_mod

    monkeypatch.setattr(acc_mod, "BLOCK_PIXELS", 1 << 17)  # the whole grid: one block
    ref = match_backgrounds(imgs, **kw)
    assert ref.pair_rejected.sum() > min_rejected
    for pixels in block_pixels:
        monkeypatch.setattr(acc_mod, "BLOCK_PIXELS", pixels)
        got = match_backgrounds(imgs, **kw)
        np.testing.assert_array_equal(got.pair_rejected, ref.pair_rejected)
        np.testing.assert_array_equal(got.rejected, ref.rejected)
        np.testing.assert_allclose(got.coef, ref.coef, rtol=rtol,
                                   atol=rtol * np.abs(ref.coef).max())


def _cosmic_ray_field_nd(shape, seed=3, n=4):
    """Overlapping boxes of an N-D grid with outliers, and their masks."""
    rng = np.random.default_rng(seed)
    imgs, sigs, masks = [], [], []
    for _ in range(n):
        im = rng.normal(2, 1) + 0.05 * rng.standard_normal(shape)
        hits = tuple(rng.integers(0, s, im.size // 100) for s in shape)
        im[hits] += rng.uniform(1, 20, im.size // 100)
        m = np.zeros(shape, bool)
        lo = [int(rng.integers(0, s // 3)) for s in shape]
        m[tuple(slice(a, a + 2 * s // 3) for a, s in zip(lo, shape))] = True
        imgs.append(im)
        sigs.append(np.full(shape, 0.05))
        masks.append(m)
    return imgs, masks, sigs


@pytest.mark.parametrize("shape", [(20000,), (24, 30, 28)])
def test_rejections_do_not_depend_on_block_cuts_nd(monkeypatch, shape):
    """The same in 1-D and 3-D: the bands of pixels tested around the blocks'
    cuts have one axis (1-D) or two (3-D) besides the cut's."""
    imgs, masks, sigs = _cosmic_ray_field_nd(shape)
    kw = dict(masks=masks, sigmas=sigs, degree=1, robust="clip", grow=1, threads=2)
    _same_for_any_blocks(monkeypatch, imgs, kw, (1 << 12, 700), min_rejected=100)


# ----------------------------------------------------------------------
# the start's pair scales
# ----------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(3,), (4,), (7,), (16,), (50,), (3, 5, 8, 13, 30, 90)])
def test_cell_deviations_are_consistent_whatever_the_cell_size(sizes):
    """1.4826 x the pooled median absolute deviation from each cell's own median,
    each cell's divided by its factor, is the sigma, for any mixture of cell
    sizes (without the factors, cells of 3 give about half of it)."""
    from jwst_wiimatch.core.robust import MAD_SIGMA, cell_mad_factor

    rng = np.random.default_rng(sum(sizes))
    devs, raw = [], []
    for n in sizes:
        x = 2.5 * rng.normal(size=(400_000 // n, n))
        d = np.abs(x - np.median(x, axis=1)[:, None])
        raw.append(d.ravel())
        devs.append((d / cell_mad_factor(np.full(len(x), n))[:, None]).ravel())
    scale = MAD_SIGMA * np.median(np.concatenate(devs)) / 2.5
    assert abs(scale - 1.0) < 0.01, scale
    if sizes == (3,):  # the check can fail: the uncorrected spread is far off
        assert MAD_SIGMA * np.median(np.concatenate(raw)) / 2.5 < 0.5


def test_small_overlaps_get_the_noise_scale():
    """A pair that shares a small corner of a large grid (a coarse start lattice
    over it) is given the scale of its noise, and nothing of it is rejected
    wholesale (which needed a pass over all pairs again)."""
    rng = np.random.default_rng(11)
    grid = (1400, 1400)
    boxes = [((0, 0), (700, 700)), ((640, 640), (760, 760)), ((0, 660), (700, 740)),
             ((660, 0), (740, 700))]
    images, sigmas, origins = [], [], []
    for k, ((y0, x0), shp) in enumerate(boxes):
        y, x = np.indices(shp)
        sig = rng.uniform(0.5, 1.5, shp)
        images.append(0.3 * k + 1e-4 * (x + x0) - 2e-4 * (y + y0) + sig * rng.normal(size=shp))
        sigmas.append(sig)
        origins.append((y0, x0))
    res = match_backgrounds(images, sigmas=sigmas, origins=origins, grid_shape=grid,
                            degree=1, robust="clip")
    info = res.robust
    assert info["stride"] > 1 and info["loosened"] == []
    small = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)]  # 60x60 to 80x40 pixels
    scales = [info["scale"][k] for k in small if k in info["scale"]]
    assert len(scales) >= 4
    assert all(abs(s - 1.0) < 0.15 for s in scales), scales


def _tile_mosaic(seed, tile=400, overlap=24):
    """3 x 3 tiles with narrow overlaps (a coarse start lattice over them)."""
    rng = np.random.default_rng(seed)
    n = 3 * tile - 2 * overlap
    images, sigmas, origins = [], [], []
    for i in range(3):
        for j in range(3):
            y0, x0 = i * (tile - overlap) + rng.integers(0, 3), j * (tile - overlap) + rng.integers(0, 3)
            shp = (min(tile, n - y0), min(tile, n - x0))
            y, x = np.indices(shp)
            sig = rng.uniform(0.5, 1.5, shp)
            a = rng.normal(size=3)
            images.append(a[0] + 1e-3 * (a[1] * (x + x0) + a[2] * (y + y0))
                          + sig * rng.normal(size=shp))
            sigmas.append(sig)
            origins.append((y0, x0))
    return images, sigmas, origins, (n, n)


def test_start_is_closer_with_finer_cells_on_narrow_overlaps(monkeypatch):
    """Pairs with few samples on the start's lattice get their cells from a finer
    lattice of their overlap: the start is closer to the first pass's fit (the
    passes stop sooner), compared with the start lattice alone."""
    import math

    import jwst_wiimatch.core.robust as R
    from jwst_wiimatch.core.solve import gram_index

    got = {}
    start = R.robust_start

    def recording_start(*a, **k):
        coef, sc = start(*a, **k)
        got["start"] = coef.copy()
        return coef, sc

    change = R.change_small

    def recording_change(opts, old, new, mom, scales, degree):
        if "change" not in got:  # the first pass against the start
            idx = gram_index(degree)
            worst = 0.0
            for (l, m), s_ in mom.S.items():
                kept = mom.npix[(l, m)] - mom.rejected.get((l, m), 0)
                dc = (new[l] - new[m]) - (got["start"][l] - got["start"][m])
                worst = max(worst, math.sqrt(max(float(dc @ s_[idx] @ dc), 0.0) / kept))
            got["change"] = worst
        return change(opts, old, new, mom, scales, degree)

    monkeypatch.setattr(R, "robust_start", recording_start)
    monkeypatch.setattr(R, "change_small", recording_change)

    def run(samples):
        monkeypatch.setattr(R, "SCALE_SAMPLES", samples)
        out = []
        for seed in range(4):
            images, sigmas, origins, grid = _tile_mosaic(seed)
            got.clear()
            res = match_backgrounds(images, sigmas=sigmas, origins=origins, grid_shape=grid,
                                    degree=1, robust="clip")
            assert res.robust["stride"] > 1
            out.append((got["change"], res.robust["passes"]))
        return np.array(out)

    fine, coarse = run(R.SCALE_SAMPLES), run(0)
    assert fine[:, 0].mean() < 0.85 * coarse[:, 0].mean(), (fine, coarse)
    assert fine[:, 1].sum() <= coarse[:, 1].sum()
