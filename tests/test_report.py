"""Diagnostics that survive (issue 8 item 3): chi-square, pair statistics, condition
numbers, meta.wiimatch fields, the JSON and PNG reports and the chi-square warning.

The numbers are checked against brute-force sums over the pixels (numpy only,
not the engine's moments).
"""

import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy import linalg

from jwst_wiimatch import report
from jwst_wiimatch.core import match_backgrounds
from jwst_wiimatch.core.diagnostics import fit_diagnostics
from jwst_wiimatch.core.solve import assemble, solve_system
from jwst_wiimatch.step import WiiMatchStep

import junk_data as jd  # benchmarks/ is on pytest's pythonpath

SHAPE = (40, 48)
BOXES = [(0, 0, 28, 30), (8, 12, 40, 44), (14, 2, 36, 26), (2, 20, 24, 48)]


def noise_problem(seed=0, degree=1, sigma_of=None):
    """Four partly overlapping images of pure noise about planes, and their sigmas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(SHAPE, dtype=float)
    images, masks, sigmas = [], [], []
    for k, (y0, x0, y1, x1) in enumerate(BOXES):
        m = np.zeros(SHAPE, bool)
        m[y0:y1, x0:x1] = True
        sig = 0.5 + 0.5 * rng.random(SHAPE) if sigma_of is None else sigma_of(k)
        plane = 2.0 * k + 0.03 * (k - 1.5) * xx - 0.02 * k * yy
        images.append(plane + rng.normal(size=SHAPE) * sig)
        masks.append(m)
        sigmas.append(sig)
    return images, masks, sigmas


def brute_force(images, masks, sigmas, res, sigma_factor=1.0):
    """Per pair and total: npix, rms before/after, chi-square sums, from the pixels."""
    yy, xx = np.indices(SHAPE, dtype=float)
    cx, cy = res.eff_center
    deg = res.degree
    bkg = [np.polynomial.polynomial.polyval2d(xx - cx, yy - cy,
                                              res.coef[k].reshape(deg[0] + 1, deg[1] + 1))
           for k in range(len(images))]
    pairs = {}
    for l in range(len(images)):
        for m in range(l + 1, len(images)):
            ov = masks[l] & masks[m]
            if not ov.any():
                continue
            w = 1.0 / ((sigmas[l][ov] * sigma_factor) ** 2 + (sigmas[m][ov] * sigma_factor) ** 2)
            before = images[l][ov] - images[m][ov]
            after = before - bkg[l][ov] + bkg[m][ov]
            pairs[(l, m)] = {"npix": int(ov.sum()),
                             "rms_before": np.sqrt(np.sum(w * before ** 2) / w.sum()),
                             "rms": np.sqrt(np.sum(w * after ** 2) / w.sum()),
                             "chi_before": float(np.sum(w * before ** 2)),
                             "chi": float(np.sum(w * after ** 2))}
    return pairs


def test_pair_stats_match_brute_force():
    images, masks, sigmas = noise_problem(seed=1)
    res = match_backgrounds(images, masks, sigmas, degree=1)
    d = res.diagnostics
    bf = brute_force(images, masks, sigmas, res)
    assert sorted((p.l, p.m) for p in d.pairs) == sorted(bf)
    nparams = (len(images) - 1) * 4
    total = sum(v["npix"] for v in bf.values())
    for p in d.pairs:
        ref = bf[(p.l, p.m)]
        assert p.npix == ref["npix"] == res.pair_npix[p.l, p.m]
        assert p.rms_before == pytest.approx(ref["rms_before"], rel=1e-9)
        assert p.rms == pytest.approx(ref["rms"], rel=1e-8)
        assert p.chi2_before == pytest.approx(ref["chi_before"] / ref["npix"], rel=1e-9)
        # degrees of freedom shared in proportion to the pair's pixels
        assert p.dof == pytest.approx(ref["npix"] * (1 - nparams / total), rel=1e-12)
        assert p.chi2 == pytest.approx(ref["chi"] / p.dof, rel=1e-8)
        assert p.rejected is None  # not reported without robust matching
    # per image: over the image's pairs, as the engine's rms
    for i in range(len(images)):
        mine = [v for k, v in bf.items() if i in k]
        wsum = [v["chi"] / v["rms"] ** 2 for v in mine]
        rms = np.sqrt(sum(v["chi"] for v in mine) / sum(wsum))
        assert d.image_rms[i] == pytest.approx(rms, rel=1e-8)
        assert d.image_rms[i] == pytest.approx(res.rms[i], rel=1e-12)
        assert d.image_rms_before[i] == pytest.approx(res.rms_before[i], rel=1e-12)
        dof = sum(p.dof for p in d.pairs if i in (p.l, p.m))
        assert d.image_chi2[i] == pytest.approx(sum(v["chi"] for v in mine) / dof, rel=1e-8)
    assert d.npix == total and d.dof == pytest.approx(total - nparams)
    assert len(d.groups) == 1 and d.groups[0].nparams == nparams


def test_chi2_is_one_on_noise_and_four_with_err_halved():
    images, masks, sigmas = noise_problem(seed=2)
    res = match_backgrounds(images, masks, sigmas, degree=1)
    bf = brute_force(images, masks, sigmas, res)
    dof = sum(v["npix"] for v in bf.values()) - (len(images) - 1) * 4
    chi2 = sum(v["chi"] for v in bf.values()) / dof
    assert res.diagnostics.chi2 == pytest.approx(chi2, rel=1e-8)
    # pure noise with the right sigmas: 1 within the statistical scatter
    assert abs(res.diagnostics.chi2 - 1) < 4 * np.sqrt(2 / dof)

    half = match_backgrounds(images, masks, [s / 2 for s in sigmas], degree=1)
    bf_half = brute_force(images, masks, [s / 2 for s in sigmas], half)
    chi2_half = sum(v["chi"] for v in bf_half.values()) / dof
    assert half.diagnostics.chi2 == pytest.approx(chi2_half, rel=1e-8)
    assert half.diagnostics.chi2 == pytest.approx(4 * res.diagnostics.chi2, rel=1e-8)
    assert 3.5 < half.diagnostics.chi2 < 4.5
    # the rms is in data units: unchanged by the sigmas' scale
    np.testing.assert_allclose(half.rms, res.rms, rtol=1e-9)


def test_chi2_survives_sigma_rescaling():
    """Sigmas so small that the engine rescales them: chi2 is still in their units."""
    images, masks, sigmas = noise_problem(seed=3)
    # sigma**2 ~ 1e-320 is no normal float64: the engine divides the sigmas by a scale
    res = match_backgrounds([im * 1e-100 for im in images], masks,
                            [s * 1e-160 for s in sigmas], degree=1)
    ref = match_backgrounds([im * 1e60 for im in images], masks, sigmas, degree=1)
    assert res.diagnostics.chi2 == pytest.approx(ref.diagnostics.chi2, rel=1e-6)
    assert ref.diagnostics.chi2 == pytest.approx(1e120, rel=0.5)
    for p, q in zip(res.diagnostics.pairs, ref.diagnostics.pairs):
        assert p.chi2 == pytest.approx(q.chi2, rel=1e-6)
        assert p.rms * 1e160 == pytest.approx(q.rms, rel=1e-6)


def test_condition_numbers():
    images, masks, sigmas = noise_problem(seed=4)
    for solver in ("RLU", "PINV"):
        res = match_backgrounds(images, masks, sigmas, degree=1, solver=solver)
        mom = res.moments
        a, b = assemble(mom.nimages, res.degree, mom.S, mom.T)
        rows = np.arange(4, 16)  # image 0 held at zero
        ms = a[np.ix_(rows, rows)]
        d = np.sqrt(np.diag(ms))
        ms = ms / np.outer(d, d)
        assert len(res.condition) == len(res.components) == 1
        if solver == "RLU":  # 1-norm estimate: a lower bound, close to the truth
            exact = np.linalg.cond(ms, 1)
            assert 0.3 * exact <= res.condition[0] <= exact * (1 + 1e-9)
        else:
            ev = linalg.eigvalsh(ms)
            assert res.condition[0] == pytest.approx(ev[-1] / ev[0], rel=1e-9)
        assert res.diagnostics.groups[0].condition == res.condition[0]
    # an image alone has nothing to solve; a badly conditioned group says so
    coef, info = solve_system(np.eye(2), np.zeros(2), 2, degree=(0,), quiet=True)
    assert np.all(np.isnan(info.condition)) and len(info.condition) == 2
    a = np.array([[1.0, -1.0, 0, 0], [-1.0, 1.0, 0, 0], [0, 0, 1, -1], [0, 0, -1, 1]])
    a2 = np.kron(np.array([[1.0, -1.0], [-1.0, 1.0]]), np.array([[1.0, 1.0], [1.0, 1.0 + 1e-9]]))
    _, info = solve_system(a2, np.zeros(4), 2, degree=(1,), quiet=True)
    assert info.condition[0] > 1e8
    del a


def test_rejected_counts_slot_in():
    images, masks, sigmas = noise_problem(seed=5)
    res = match_backgrounds(images, masks, sigmas, degree=1)
    n = len(images)
    pair_rej = {(p.l, p.m): k + 1 for k, p in enumerate(res.diagnostics.pairs)}
    d = fit_diagnostics(res.moments, np.zeros((n, 4)), res.degree, res.components,
                        res.condition, rejected=[3, 1, 4, 1], pair_rejected=pair_rej)
    assert d.rejected == sum(pair_rej.values())
    assert [d.image(i)["rejected"] for i in range(n)] == [3, 1, 4, 1]
    assert [p.as_dict()["rejected"] for p in d.pairs] == list(pair_rej.values())
    # coefficients 0: after == before
    for p in d.pairs:
        assert p.rms == pytest.approx(p.rms_before)


# ---------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_case():
    return jd.make_junk_case("clean", n=4, shape=(96, 96), seed=3)


def _models(case, err_scale=1.0):
    out = []
    for m in case.models:
        m = m.copy()
        m.err = (np.asarray(m.err) * err_scale).astype(m.err.dtype)
        out.append(m)
    return out


def test_meta_wiimatch_fields_survive_save(clean_case, tmp_path):
    from stdatamodels.jwst import datamodels

    models = _models(clean_case)
    for k, m in enumerate(models):
        m.save(tmp_path / f"in{k}_i2d.fits")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    WiiMatchStep.call([str(tmp_path / f"in{k}_i2d.fits") for k in range(4)], binning=1,
                      save_results=True, output_dir=str(out_dir))
    names = [f"in{k}_i2d.fits" for k in range(4)]
    for k in range(4):
        with datamodels.open(out_dir / f"in{k}_wiimatch.fits") as m:
            w = m.meta.wiimatch.instance
            assert w["status"] == "COMPLETE"
            assert 0.9 < w["chi2"] < 1.1 and 0.9 < w["fit_chi2"] < 1.1
            assert w["weights"] == "err" and w["group"] == 0
            assert w["condition"] > 1 and w["dof"] > 0
            assert w["npix_rejected"] == 0  # nothing rejected without robust matching
            assert len(w["pairs"]) == 3
            for p in w["pairs"]:
                assert set(p) == {"with", "npix", "rejected", "rms_before", "rms", "chi2"}
                assert p["npix"] > 0 and p["rms"] < p["rms_before"]
                assert any(n in p["with"] for n in names if n != names[k])


def test_json_report_layout(clean_case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = WiiMatchStep.call(_models(clean_case), binning=1, report="rep",
                            report_plot=False)
    path = tmp_path / "rep.json"
    assert path.is_file() and not (tmp_path / "rep.png").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    rep = json.loads(path.read_text())
    assert rep["format"] == report.REPORT_FORMAT and rep["version"] == 1
    assert rep["step"] == "WiiMatchStep" and rep["plot"] is None
    assert set(rep) == {"format", "version", "software", "created", "step", "parameters",
                        "fit", "models", "images", "pairs", "groups", "plot"}
    assert rep["parameters"]["degree"] == [1, 1] and rep["parameters"]["kind"] == "grid"
    fit = rep["fit"]
    assert set(fit) >= {"chi2", "chi2_before", "dof", "npix", "rejected", "weights",
                        "assessment", "message"}
    assert fit["assessment"] == "ok" and fit["message"] is None
    assert len(rep["models"]) == len(rep["images"]) == 4
    assert len(rep["pairs"]) == 6 and len(rep["groups"]) == 1
    g = rep["groups"][0]
    assert g["images"] == [0, 1, 2, 3] and g["models"] == [0, 1, 2, 3]
    assert g["nparams"] == 12 and g["condition"] > 1
    assert sum(p["npix"] for p in rep["pairs"]) == fit["npix"] == g["npix"]
    for k, mo in enumerate(rep["models"]):
        assert mo["index"] == k and mo["image"] == k and mo["status"] == "COMPLETE"
        w = out[k].meta.wiimatch.instance
        assert mo["chi2"] == pytest.approx(w["chi2"])
        assert mo["rms"] == pytest.approx(w["rms"])
        assert len(mo["coefficients"]) == 4
    for p in rep["pairs"]:
        assert set(p) >= {"images", "models", "npix", "rejected", "rms_before", "rms",
                          "chi2_before", "chi2", "dof"}
    # a failure while writing leaves the previous report whole and no temporary file
    before = path.read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        report.write_json(str(path), {"x": 1})
    assert path.read_text() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_report_paths(tmp_path):
    j, p = report.report_paths("r", str(tmp_path))
    assert j == str(tmp_path / "r.json") and p == str(tmp_path / "r.png")
    j, _ = report.report_paths(str(tmp_path / "x.json"), "/nowhere")
    assert j == str(tmp_path / "x.json")
    with pytest.raises(ValueError, match="report=.*does not exist"):
        report.report_paths(str(tmp_path / "missing" / "r.json"))
    (tmp_path / "d.json").mkdir()
    with pytest.raises(ValueError, match="report=.*folder"):
        report.report_paths(str(tmp_path / "d.json"))


def test_png_report(clean_case, tmp_path):
    pytest.importorskip("matplotlib")
    WiiMatchStep.call(_models(clean_case), binning=1, report=str(tmp_path / "r.json"))
    png = tmp_path / "r.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20000
    assert json.loads((tmp_path / "r.json").read_text())["plot"] == "r.png"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_mosaic_sums_are_means(clean_case):
    """The PNG's mosaics: means of the models (before) and of data - background (after)."""
    from jwst_wiimatch.matching import match_models
    from jwst_wiimatch.models import WiiMatchLibrary, evaluate_background

    models = _models(clean_case)
    outcomes, summary = match_models(WiiMatchLibrary(models), degree=1, binning=1)
    sums = report.mosaic_sums(WiiMatchLibrary(models), outcomes, summary,
                              "~DO_NOT_USE+NON_SCIENCE")
    assert sums["factor"] == 1
    data = np.array([np.where(np.isfinite(m.data), m.data, np.nan) for m in models])
    bkgs = []
    for m, o in zip(models, outcomes):
        bkgs.append(evaluate_background(m, {"degree": list(summary.degree),
                                            "refpoint": summary.refpoint,
                                            "coefficients": o.coefficients}))
    after = data - np.array(bkgs)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells
        np.testing.assert_allclose(sums["before"], np.nanmean(data, axis=0), atol=1e-5,
                                   equal_nan=True)
        np.testing.assert_allclose(sums["after"], np.nanmean(after, axis=0), atol=1e-5,
                                   equal_nan=True)
    k = np.sum(np.isfinite(after), axis=0)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scatter = np.where(k >= 2, np.nanstd(after, axis=0), np.nan)
    np.testing.assert_allclose(sums["scatter"], scatter, atol=1e-5, equal_nan=True)


def test_matplotlib_not_imported_by_the_step():
    # (jwst_wiimatch.pipeline imports jwst, which may import matplotlib itself)
    code = ("import sys, jwst_wiimatch.step, jwst_wiimatch.report, jwst_wiimatch.demo; "
            "sys.exit('matplotlib' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _chi2_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "normalised chi-square" in r.getMessage()]


@pytest.mark.parametrize("scale,expect", [(1.0, None), (0.5, "ERR too small"),
                                          (3.0, "ERR overestimated")])
def test_warning_on_badly_scaled_err(clean_case, caplog, scale, expect):
    caplog.set_level(logging.INFO, logger="jwst_wiimatch")
    out = WiiMatchStep.call(_models(clean_case, scale), binning=1)
    chi2 = out[0].meta.wiimatch.instance["fit_chi2"]
    assert chi2 == pytest.approx(1 / scale ** 2, rel=0.1)
    warned = _chi2_warnings(caplog)
    if expect is None:
        assert not warned
    else:
        assert len(warned) == 1 and expect in warned[0]


def test_assess_chi2_limits():
    assert report.assess_chi2(1.0, 1e5)[0] == "ok"
    assert report.assess_chi2(1.6, 1e5)[0] == "high"
    assert report.assess_chi2(1.6, 1e5, binning=4)[0] == "ok"
    assert report.assess_chi2(0.25, 1e5)[0] == "low"
    assert report.assess_chi2(0.45, 1e5, binning=4)[0] == "low"
    # a small fit's chi-square scatters more: no warning within 5 sigma of it
    assert report.assess_chi2(1.9, 50)[0] == "ok"
    assert report.assess_chi2(5.0, 1e5, weighted=False)[0] == "unweighted"
    assert report.assess_chi2(None, 0)[0] == "none"


@pytest.mark.slow
def test_chi2_limits_measured_on_generators():
    """The numbers behind CHI2_LIMITS: resampled noise with the right ERR (both ways
    of propagating it) is 'ok' at binning 1 and 4, junk that does not cancel is not."""
    from jwst_wiimatch.matching import match_models
    from jwst_wiimatch.models import WiiMatchLibrary

    def fit(models, binning):
        _, summary = match_models(WiiMatchLibrary(models), degree=1, binning=binning)
        f = summary.diagnostics["fit"]
        return f["chi2"], report.assess_chi2(f["chi2"], f["dof"], True, binning)[0]

    sky = jd.make_sky_case("sky_clean", seed=1)
    drizzled = []  # ERR as jwst's resample propagates it: the input pixels' noise
    for m in sky.models:
        m = m.copy()
        e = np.asarray(m.err)
        m.err = np.where(np.isfinite(e), jd.SKY_SIGMA, e).astype(e.dtype)
        drizzled.append(m)
    got = {}
    for name, models in (("exact", sky.models), ("drizzled", drizzled)):
        for b in (1, 4):
            got[name, b] = fit(models, b)
            assert got[name, b][1] == "ok", (name, b, got[name, b])
    assert got["exact", 1][0] == pytest.approx(1.0, abs=0.05)
    assert 1.6 < got["exact", 4][0] < 2.5   # correlated noise in block means
    assert 0.35 < got["drizzled", 1][0] < 0.5
    assert 0.7 < got["drizzled", 4][0] < 1.0
    trail = jd.make_junk_case("trail", n=5, shape=(256, 256), seed=3)
    assert fit(trail.models, 1)[1] == "high"


def test_sky_step_report(tmp_path, monkeypatch):
    """The skymatch slot writes the report too: no common grid, so no mosaics."""
    pytest.importorskip("jwst")
    import pipeline_helpers as ph

    from jwst_wiimatch.pipeline import WiiMatchSkyStep

    asn = ph.write_field(str(tmp_path), n=3)
    monkeypatch.chdir(tmp_path)
    WiiMatchSkyStep.call(asn, report="sky_report")
    rep = json.loads((tmp_path / "sky_report.json").read_text())
    assert rep["step"] == "WiiMatchSkyStep" and rep["parameters"]["kind"] == "sky"
    assert len(rep["models"]) == 3 and rep["groups"][0]["condition"] > 1
    assert rep["fit"]["chi2"] is not None and rep["pairs"]
    if report.has_matplotlib():
        assert (tmp_path / "sky_report.png").read_bytes()[:4] == b"\x89PNG"
