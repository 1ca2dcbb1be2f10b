"""The generators of benchmarks/junk_data.py inject what they say (issue 8),
and benchmarks/bench_robust.py runs end to end.

The benchmark judges robust matching by these cases, so the junk itself is
checked here: counts, amplitudes, geometry, that only the named member
carries it, and that plain matching recovers the clean backgrounds to the
noise.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import junk_data as jd

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "benchmarks")

SHAPE = (96, 96)
N = 5
JUNK = 2


@pytest.fixture(scope="module")
def junk_cases():
    return {c: jd.make_junk_case(c, n=N, shape=SHAPE, junk_member=JUNK, seed=3)
            for c in jd.JUNK_CASES}


def _engine_error(case):
    """Plain least squares (the engine, sigma = ERR) and the bench's error."""
    import bench_robust as br

    rec, _, _ = br.run_engine(case, {})
    return br.background_error(rec, case.backgrounds, case.footprints)[0]


def _diff(case, clean, k):
    return (np.asarray(case.models[k].data, dtype=np.float64)
            - np.asarray(clean.models[k].data, dtype=np.float64))


def test_models_are_resampled_exposures(junk_cases):
    case = junk_cases["clean"]
    assert len(case.models) == N
    w = case.models[0].meta.wcs
    for m, foot, bkg in zip(case.models, case.footprints, case.backgrounds):
        assert m.data.shape == SHAPE and m.meta.wcs is not None
        assert np.all(np.isfinite(m.data[foot])) and np.all(np.isnan(m.data[~foot]))
        assert np.all(m.err[foot] == jd.SIGMA) and np.all(m.wht[foot] == 1)
        assert np.all(m.dq[foot] == 0) and np.all(m.dq[~foot] & jd.DO_NOT_USE)
        assert np.all(m.wht[~foot] == 0)
        assert 0.55 < foot.mean() < 0.7
        # noise sigma 1 about the injected background
        assert np.std(m.data[foot] - bkg[foot]) == pytest.approx(jd.SIGMA, rel=0.05)
    # the analytic frame is the gwcs's
    import mosaic_data as md

    xi, eta = case.frame()
    ra, dec = w(np.array([0.0, 50.0, 95.0]), np.array([0.0, 20.0, 95.0]))
    a = np.array(md.standard_coords(ra, dec, *jd.CRVAL))
    b = np.array([xi[[0, 20, 95], [0, 50, 95]], eta[[0, 20, 95], [0, 50, 95]]])
    assert np.max(np.abs(a - b)) * 3600 < 1e-6
    # the same seed gives the same backgrounds and noise in every case
    for c in jd.JUNK_CASES:
        for k in range(N):
            if k != JUNK:
                np.testing.assert_array_equal(junk_cases[c].models[k].data,
                                              case.models[k].data)
            assert not junk_cases[c].junk_masks[k].any() or k == JUNK


def test_clean_backgrounds_recovered_to_the_noise(junk_cases):
    case = junk_cases["clean"]
    import bench_robust as br

    scale = br.unmatched_error(case)
    err = _engine_error(case)
    # injected differences of a few sigma; the noise floor of ~3000
    # overlapping pixels a pair is a few hundredths
    assert scale > 1.5
    assert 0 < err < 0.15, err


def test_cosmic_rays(junk_cases):
    case, clean = junk_cases["cr"], junk_cases["clean"]
    mask = case.junk_masks[JUNK]
    foot = case.footprints[JUNK]
    assert mask.sum() == round(jd.CR_FRACTION * foot.sum())
    assert not (mask & ~foot).any()
    d = _diff(case, clean, JUNK)
    assert np.all(d[mask] >= 20 - 1e-3) and np.all(d[mask] <= 500 + 1e-3)
    assert np.ptp(d[mask]) > 300  # spread over the range
    np.testing.assert_array_equal(d[foot & ~mask], 0.0)
    assert np.all(case.models[JUNK].dq[foot] == 0)  # unflagged


def test_trail_is_three_pixels_wide(junk_cases):
    case, clean = junk_cases["trail"], junk_cases["clean"]
    mask = case.junk_masks[JUNK]
    foot = case.footprints[JUNK]
    info = case.info["junk"]
    th = np.radians(info["angle_deg"])
    y, x = np.indices(SHAPE)
    dist = -(x - info["point"][1]) * np.sin(th) + (y - info["point"][0]) * np.cos(th)
    np.testing.assert_array_equal(mask, foot & (np.abs(dist) < 1.5))
    # pixels a column (|angle| <= 40 degrees): 3 / cos(angle), within one
    rows = np.nonzero(foot.any(axis=1))[0]
    yc = info["point"][0] + (np.arange(SHAPE[1]) - info["point"][1]) * np.tan(th)
    cols = [c for c in range(SHAPE[1]) if foot[:, c].any()
            and rows.min() + 3 <= yc[c] <= rows.max() - 3]  # band inside the footprint
    per_col = mask[:, cols].sum(axis=0)
    assert len(cols) > 20
    assert np.all(np.abs(per_col - 3 / np.cos(th)) <= 1)
    assert np.mean(per_col) * np.cos(th) == pytest.approx(3.0, abs=0.2)
    d = _diff(case, clean, JUNK)
    np.testing.assert_allclose(d[mask], 30.0, atol=1e-4)
    np.testing.assert_array_equal(d[foot & ~mask], 0.0)


def test_extended_transient(junk_cases):
    case, clean = junk_cases["transient"], junk_cases["clean"]
    mask = case.junk_masks[JUNK]
    c = case.info["junk"]["center"]
    y, x = np.nonzero(mask)
    assert np.all(np.hypot(y - c[0], x - c[1]) <= 12.0)
    assert mask.sum() == pytest.approx(np.pi * 12 ** 2, rel=0.05)
    d = _diff(case, clean, JUNK)
    np.testing.assert_allclose(d[mask], 8.0, atol=1e-4)
    np.testing.assert_array_equal(d[case.footprints[JUNK] & ~mask], 0.0)


def test_fill_values(junk_cases):
    case = junk_cases["fill"]
    m = case.models[JUNK]
    hit = np.asarray(m.data) == np.float32(1e30)
    assert hit.sum() == 10
    np.testing.assert_array_equal(hit, case.junk_masks[JUNK])
    assert np.all(m.dq[hit] == 0) and np.all(m.err[hit] == jd.SIGMA) and np.all(m.wht[hit] > 0)


def test_resample_bilinear():
    ramp = np.add.outer(np.arange(20.0), 2 * np.arange(30.0))  # 1 y + 2 x
    var = np.ones_like(ramp)
    out, vout, cov = jd.resample_bilinear(ramp, var, (3.5, 2.25), (30, 40))
    y, x = np.indices(out.shape)
    np.testing.assert_allclose(out[cov], ((y - 3.5) + 2 * (x - 2.25))[cov], atol=1e-12)
    np.testing.assert_allclose(vout[cov], (0.5 ** 2 * 2) * (0.25 ** 2 + 0.75 ** 2))
    assert cov.sum() == 19 * 29  # one row and column lost to the interpolation
    assert np.all(np.isnan(out[~cov]))


@pytest.fixture(scope="module")
def sky_cases():
    pytest.importorskip("skimage")
    scene = jd.hdf_scene((96, 112))
    return {c: jd.make_sky_case(c, shape=(96, 112), scene=scene, seed=1)
            for c in jd.SKY_CASES}


def test_sky_field(sky_cases):
    clean, sky = sky_cases["sky_clean"], sky_cases["sky"]
    assert len(sky.models) == 6 and sky.models[0].data.shape == (96, 112)
    assert not any(j.any() for c in ("sky_clean", "sky") for j in sky_cases[c].junk_masks)
    # the footprints differ (dithers) and overlap mostly
    foots = np.array(sky.footprints)
    assert len({f.tobytes() for f in foots}) == 6
    assert foots.all(axis=0).mean() > 0.6
    # sources with Poisson-like ERR; a blank sky's ERR is the sky noise only
    src = [np.asarray(m.data) - b for m, b in zip(sky.models, sky.backgrounds)]
    assert max(np.nanmax(s) for s in src) > 100 * jd.SKY_SIGMA
    assert np.nanmax(sky.models[0].err) > 2 * np.nanmax(clean.models[0].err)
    assert np.nanmax(clean.models[0].err) <= jd.SKY_SIGMA * (1 + 1e-6)
    # resampling residue: exposures differ at bright sources beyond their noise
    both = sky.footprints[0] & sky.footprints[1]
    e = np.hypot(sky.models[0].err, sky.models[1].err)
    resid = np.abs(src[1] - src[0])[both] / e[both]
    assert np.max(resid) > 10
    # the blank sky matches to the noise with plain least squares
    assert _engine_error(clean) < 0.2 * 3 * jd.SKY_SIGMA


def test_sky_cosmic_rays_and_trail(sky_cases):
    dshape = tuple(s - 2 * jd.SKY_MARGIN for s in (96, 112))
    cr = sky_cases["sky_cr"]
    ncr = round(jd.SKY_CR_FRACTION * dshape[0] * dshape[1])
    assert cr.info["cr_count"] == [ncr] * 6
    assert all(j.any() for j in cr.junk_masks)
    # each detector hit spreads over at most 2 x 2 grid pixels
    assert all(ncr <= j.sum() <= 4 * ncr for j in cr.junk_masks)
    trail = sky_cases["sky_trail"]
    k = trail.info["trail_member"]
    assert [bool(j.any()) for j in trail.junk_masks] == [i == k for i in range(6)]
    t = trail.info["trail"]
    assert t["width_px"] == 3 and t["amplitude_sigma"] == 30
    # the trail adds its flux: 30 sigma x its detector pixels (the grid keeps
    # it but for what the resampling drops at the edges)
    d = (np.nan_to_num(np.asarray(trail.models[k].data, dtype=np.float64))
         - np.nan_to_num(np.asarray(sky_cases["sky"].models[k].data, dtype=np.float64)))
    assert d.sum() == pytest.approx(30 * jd.SKY_SIGMA * t["pixels_detector"], rel=0.05)
    both = sky_cases["sky_cr_trail"]
    assert both.info["cr_count"] == [ncr] * 6 and both.info["trail"]["member"] == k


def test_bench_robust_quick_runs(tmp_path):
    out = tmp_path / "robust.json"
    # one junk and one sky case (their clean cases are added), tiny sizes
    cases = "fill,sky_cr_trail"
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        cases = "fill"
    cmd = [sys.executable, os.path.join(BENCH, "bench_robust.py"), "--quick",
           "--size", "64", "--sky-size", "80", "--seeds", "1", "--cases", cases,
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "target" in proc.stdout and "fill" in proc.stdout
    res = json.loads(out.read_text())
    rows = res["results"]["step"]
    assert {"clean", "fill"} <= set(rows)
    assert rows["clean"]["ratio"] == pytest.approx(1.0)  # same args as plain
    assert 0 < rows["clean"]["error"] < 1
    assert rows["fill"]["target"] == 1.5 and rows["fill"]["ratio_against"] == "clean"
    assert rows["clean"]["target"] == 1.05
    if "sky_cr_trail" in rows:
        assert rows["sky_cr_trail"]["target"] == 2.0
        assert rows["sky_cr_trail"]["ratio_against"] == "sky_clean"
    for r in rows.values():
        assert not r["failures"]
        assert r["time_s"] > 0
