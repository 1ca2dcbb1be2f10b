"""Tests of WiiMatchStep on small synthetic resampled models.

Every recovery test compares against backgrounds injected by
``step_helpers.make_models``; matching fixes backgrounds only up to one
polynomial common to all models, so the tests compare differences
``P_n - P_0`` with the injected ``T_n - T_0``.
"""

import json
import logging
import os

import numpy as np
import pytest

import oracle as O
import step_helpers as h

from jwst_wiimatch import models as adapters
from jwst_wiimatch.models import WiiMatchLibrary
from jwst_wiimatch.step import WiiMatchStep

NOISE = 0.05
# the largest RMS error allowed on a recovered difference of backgrounds
# (about 10 times the noise of a mean over ~1000 pixels; the injected
# differences are ~0.5 and more)
TOL = 0.02


def check_recovery(models_in, models_out, truths, ref, tol=TOL, min_spread=10):
    """Recovered backgrounds (evaluated through each model's recorded entry)
    against the injected ones; returns the RMS error."""
    coords = h.frame_of_grid(models_in[0], ref)
    masks = [np.isfinite(m.data) for m in models_in]
    true_bkg = [O.polyval_nd(t, coords) for t in truths]
    rec_bkg = [adapters.evaluate_background(m) for m in models_out]
    err = h.relative_error(rec_bkg, true_bkg, masks)
    # the check must be able to fail: the injected differences are large
    spread = h.relative_error([np.zeros_like(t) for t in true_bkg], true_bkg, masks)
    assert spread > min_spread * tol
    assert err < tol, err
    assert h.relative_error(rec_bkg, true_bkg, masks, stat="max") < 4 * tol
    return err


def library_models(lib):
    from jwst_wiimatch.step import library_copies

    return library_copies(lib)


# ----------------------------------------------------------------------
# recovery
# ----------------------------------------------------------------------
@pytest.mark.parametrize("degree", [0, 1, 2, [2, 1]])
def test_recovery_list(degree):
    models, truths, ref = h.make_models(n=4, degree=degree, noise=NOISE)
    # the synthetic sources are identical in every model (they cancel
    # exactly): masking them (source_nsigma) would only cost pixels of this
    # small grid; robust matching itself stays on (tests/test_robust.py
    # covers the defaults)
    out = WiiMatchStep.call(models, degree=degree, source_nsigma=0)
    assert isinstance(out, list) and len(out) == 4
    check_recovery(models, out, truths, ref)
    for m in out:
        assert m.meta.cal_step.wiimatch == "COMPLETE"
        w = m.meta.wiimatch.instance
        # residual RMS of the overlaps after matching ~ sqrt(2) * noise
        assert w["rms"] == pytest.approx(np.sqrt(2) * NOISE, rel=0.2)
        assert w["rms_before"] > 2 * w["rms"]


def test_subtract_removes_relative_backgrounds():
    models, truths, ref = h.make_models(n=4, degree=1, noise=NOISE)
    out = WiiMatchStep.call(models, degree=1, subtract=True)
    coords = h.frame_of_grid(models[0], ref)
    for m_in, m_out in zip(models, out):
        assert m_out.meta.background.subtracted is True
        np.testing.assert_array_equal(np.isnan(m_in.data), np.isnan(m_out.data))
        bkg = adapters.evaluate_background(m_out)
        np.testing.assert_allclose(
            m_out.data, (m_in.data - bkg).astype(np.float32), rtol=1e-5, atol=1e-4)
    # what was removed from model n, relative to model 0, is the injected
    # difference T_n - T_0 (the common part is not determined by matching)
    removed = [m_in.data.astype(float) - m_out.data for m_in, m_out in zip(models, out)]
    t = [O.polyval_nd(c, coords) for c in truths]
    for n in range(1, len(models)):
        resid = (removed[n] - removed[0]) - (t[n] - t[0])
        good = np.isfinite(resid)
        assert good.sum() > 500
        assert np.sqrt(np.mean(resid[good] ** 2)) < TOL


def test_degree_and_refpoint_recorded():
    models, truths, ref = h.make_models(n=3, degree=1)
    out = WiiMatchStep.call(models, degree=[1, 1], refpoint=[150.0005, 2.0003])
    for m in out:
        info = m.meta.background.polynomial_info[-1].instance
        assert info["degree"] == [1, 1]
        assert info["refpoint"] == pytest.approx([150.0005, 2.0003])
        assert len(info["coefficients"]) == 4
        assert m.meta.background.method == "wiimatch"
        assert m.meta.wiimatch.instance["refpoint"] == pytest.approx([150.0005, 2.0003])
    check_recovery(models, out, truths, ref)


def test_pinv_solver():
    models, truths, ref = h.make_models(n=3, degree=1)
    out = WiiMatchStep.call(models, degree=1, solver="pinv")
    check_recovery(models, out, truths, ref)
    assert out[0].meta.wiimatch.instance["solver"] == "PINV"


@pytest.mark.parametrize("crval", [(0.0, 1.0), (359.9995, -20.0), (77.0, 89.995),
                                   (300.0, -89.998)])
def test_ra_zero_and_pole(crval):
    models, truths, ref = h.make_models(n=3, degree=1, crval=crval)
    out = WiiMatchStep.call(models, degree=1)
    check_recovery(models, out, truths, ref)
    assert 0.0 <= out[0].meta.wiimatch.instance["refpoint"][0] < 360.0


def test_cube():
    models, truths, ref = h.make_models(n=3, shape=(6, 24, 28), cube=True,
                                        degree=[1, 1, 1], noise=NOISE)
    out = WiiMatchStep.call(models, degree=[1, 1, 1], subtract=True)
    check_recovery(models, out, truths, ref)
    m = out[0]
    assert m.meta.wiimatch.instance["frame"] == adapters.FRAME_CUBE
    info = m.meta.background.polynomial_info[-1].instance
    assert len(info["refpoint"]) == 3 and info["degree"] == [1, 1, 1]
    assert m.meta.background.subtracted is True


def test_no_err_equal_weights(caplog):
    models, truths, ref = h.make_models(n=3, degree=1, with_err=False)
    with caplog.at_level(logging.WARNING, logger="jwst_wiimatch"):
        out = WiiMatchStep.call(models, degree=1)
    warn = [r for r in caplog.records if "ERR" in r.getMessage()]
    assert len(warn) == 1
    check_recovery(models, out, truths, ref)


def test_dq_selection_matters():
    """The NON_SCIENCE row holds garbage: ignoring DQ must spoil the plain match
    (robust matching, the default, leaves the garbage out by itself)."""
    models, truths, ref = h.make_models(n=3, degree=1)
    plain = {"robust": "none", "source_nsigma": 0}
    good = WiiMatchStep.call(models, degree=1, **plain)
    bad = WiiMatchStep.call(models, degree=1, dqbits="", **plain)
    check_recovery(models, good, truths, ref)
    with pytest.raises(AssertionError):
        check_recovery(models, bad, truths, ref)
    check_recovery(models, WiiMatchStep.call(models, degree=1, dqbits=""), truths, ref)


# ----------------------------------------------------------------------
# input kinds and outputs
# ----------------------------------------------------------------------
def test_asn_path_and_dict(tmp_path):
    models, truths, ref = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path)
    out = WiiMatchStep.call(asn, degree=1)
    assert isinstance(out, WiiMatchLibrary)
    res = library_models(out)
    check_recovery(models, res, truths, ref)
    assert [m.meta.filename for m in res] == [m.meta.filename for m in models]

    with open(asn) as fh:
        d = json.load(fh)
    for member in d["products"][0]["members"]:
        member["expname"] = str(tmp_path / member["expname"])
    out = WiiMatchStep.call(d, degree=1)
    assert isinstance(out, WiiMatchLibrary)
    check_recovery(models, library_models(out), truths, ref)


def test_list_of_filenames(tmp_path):
    models, truths, ref = h.make_models(n=3, degree=1)
    h.write_asn(models, tmp_path)
    files = [str(tmp_path / m.meta.filename) for m in models]
    out = WiiMatchStep.call(files, degree=1)
    assert isinstance(out, list) and len(out) == 3
    check_recovery(models, out, truths, ref)


@pytest.mark.parametrize("on_disk", [False, True])
def test_library_input(tmp_path, on_disk):
    models, truths, ref = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path)
    lib = WiiMatchLibrary(asn, on_disk=on_disk, temp_directory=tmp_path / "tmp"
                          if on_disk else None)
    if on_disk:
        os.makedirs(tmp_path / "tmp", exist_ok=True)
    out = WiiMatchStep.call(lib, degree=1, subtract=True)
    assert isinstance(out, WiiMatchLibrary)
    res = library_models(out)
    check_recovery(models, res, truths, ref)
    assert all(m.meta.background.subtracted for m in res)


def test_library_of_models_not_modified():
    models, truths, ref = h.make_models(n=3, degree=1)
    before = [m.data.copy() for m in models]
    lib = WiiMatchLibrary(models)
    out = WiiMatchStep.call(lib, degree=1, subtract=True)
    assert out is not lib and isinstance(out, WiiMatchLibrary)
    for m, b in zip(models, before):
        np.testing.assert_array_equal(m.data, b)
        assert "wiimatch" not in m.meta.cal_step.instance
        assert m.meta.background.polynomial_info == []
    check_recovery(models, library_models(out), truths, ref)


def test_caller_models_not_modified():
    models, _, _ = h.make_models(n=3, degree=1)
    before = [m.data.copy() for m in models]
    out = WiiMatchStep.call(models, degree=1, subtract=True)
    for m, b, o in zip(models, before, out):
        assert o is not m
        np.testing.assert_array_equal(m.data, b)
        assert m.meta.background.subtracted is None
        assert not np.array_equal(o.data[np.isfinite(b)], b[np.isfinite(b)])


class _CountingLibrary(WiiMatchLibrary):
    """Records the largest number of models borrowed at the same time."""

    max_out = 0

    def borrow(self, index):
        model = super().borrow(index)
        type(self).max_out = max(type(self).max_out, len(self._ledger))
        return model


@pytest.mark.parametrize("cores,most", [("none", 1), ("2", 2)])
def test_in_memory_false_borrows_one_model_per_thread(tmp_path, cores, most):
    models, truths, ref = h.make_models(n=4, degree=1)
    asn = h.write_asn(models, tmp_path)
    os.makedirs(tmp_path / "tmp")
    lib = _CountingLibrary(asn, on_disk=True, temp_directory=tmp_path / "tmp")
    _CountingLibrary.max_out = 0
    out = WiiMatchStep.call(lib, degree=1, in_memory=False, subtract=True,
                            maximum_cores=cores)
    assert out is lib
    assert 1 <= _CountingLibrary.max_out <= most
    check_recovery(models, library_models(out), truths, ref)


def test_metadata_saved_and_reopened(tmp_path):
    from stdatamodels.jwst import datamodels

    models, truths, ref = h.make_models(n=3, degree=1)
    out = WiiMatchStep.call(models, degree=1, subtract=True)
    path = tmp_path / "saved.fits"
    out[1].save(path)
    with datamodels.open(path) as m:
        assert m.meta.cal_step.wiimatch == "COMPLETE"
        assert m.meta.background.method == "wiimatch"
        assert m.meta.background.subtracted is True
        info = m.meta.background.polynomial_info[-1].instance
        assert info["degree"] == [1, 1]
        np.testing.assert_allclose(
            info["coefficients"],
            out[1].meta.background.polynomial_info[-1].instance["coefficients"])
        w = m.meta.wiimatch.instance
        for key in ("frame", "refpoint", "npix", "rms", "rms_before",
                    "background_at_refpoint", "polynomial_index", "subtracted_entries"):
            assert key in w
        assert w["npix"] > 100
        # the recorded polynomial evaluates on the reopened model
        np.testing.assert_allclose(adapters.evaluate_background(m),
                                   adapters.evaluate_background(out[1]))


def test_output_names_and_inputs_untouched(tmp_path):
    models, _, _ = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path)
    files = sorted(p for p in os.listdir(tmp_path) if p.endswith(".fits"))
    before = {f: (tmp_path / f).read_bytes() for f in files}
    WiiMatchStep.call(asn, degree=1, subtract=True, save_results=True,
                      output_dir=str(tmp_path / "out"))
    produced = sorted(os.listdir(tmp_path / "out"))
    assert produced == [f.replace("_i2d.fits", "_wiimatch.fits") for f in files]
    for f in files:
        assert (tmp_path / f).read_bytes() == before[f]


def test_rerun_on_outputs_never_overwrites_them(tmp_path):
    """x_wiimatch.fits matched again would be written to x_wiimatch.fits (the known
    suffix is replaced, as jwst does): refused, naming the file; elsewhere it runs."""
    models, _, _ = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path)
    WiiMatchStep.call(asn, save_results=True, output_dir=str(tmp_path))
    outs = sorted(p.name for p in tmp_path.glob("*_wiimatch.fits"))
    assert outs == ["exp1_wiimatch.fits", "exp2_wiimatch.fits", "exp3_wiimatch.fits"]
    before = {f: (tmp_path / f).read_bytes() for f in outs}
    asn2 = tmp_path / "asn2.json"
    asn2.write_text(json.dumps({"products": [{"members": [
        {"expname": f, "exptype": "science"} for f in outs]}]}))
    with pytest.raises(ValueError, match="exp1_wiimatch.fits is an input file"):
        WiiMatchStep.call(str(asn2), save_results=True, output_dir=str(tmp_path))
    for f in outs:
        assert (tmp_path / f).read_bytes() == before[f]
    (tmp_path / "again").mkdir()
    WiiMatchStep.call(str(asn2), save_results=True, output_dir=str(tmp_path / "again"))
    assert sorted(os.listdir(tmp_path / "again")) == outs


def test_progress_logged_for_many_models(caplog):
    models, truths, ref = h.make_models(n=10, shape=(24, 30), degree=0)
    with caplog.at_level(logging.INFO, logger="jwst_wiimatch"):
        WiiMatchStep.call(models, degree=0)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "read 10/10 models" in text and "updated 10/10 models" in text


def test_logging_summary(caplog):
    models, _, _ = h.make_models(n=3, degree=1)
    with caplog.at_level(logging.INFO, logger="jwst_wiimatch"):
        WiiMatchStep.call(models, degree=1)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "summary" in text and "rms after" in text
    for m in models:
        assert m.meta.filename in text


# ----------------------------------------------------------------------
# skymatch rules, repeated runs
# ----------------------------------------------------------------------
def test_second_run_appends_and_is_consistent():
    models, truths, ref = h.make_models(n=3, degree=1)
    once = WiiMatchStep.call(models, degree=1, subtract=True)
    twice = WiiMatchStep.call(once, degree=1, subtract=True)
    for m in twice:
        entries = m.meta.background.polynomial_info
        assert len(entries) == 2
        w = m.meta.wiimatch.instance
        assert w["subtracted_entries"] == [0, 1] and w["polynomial_index"] == 1
        # nothing left to match: the second polynomial is ~0 everywhere
        assert np.nanmax(np.abs(adapters.evaluate_background(m))) < TOL


def test_rerun_without_subtract_replaces_entry():
    models, truths, ref = h.make_models(n=3, degree=1)
    once = WiiMatchStep.call(models, degree=1)
    twice = WiiMatchStep.call(once, degree=1)
    for m1, m2 in zip(once, twice):
        assert len(m2.meta.background.polynomial_info) == 1
        assert m2.meta.background.subtracted is False
        assert m2.meta.background.level == 0.0
        np.testing.assert_allclose(
            m2.meta.background.polynomial_info[0].instance["coefficients"],
            m1.meta.background.polynomial_info[0].instance["coefficients"])
    # then subtracting: one entry, now subtracted
    third = WiiMatchStep.call(twice, degree=1, subtract=True)
    for m in third:
        assert len(m.meta.background.polynomial_info) == 1
        assert m.meta.wiimatch.instance["subtracted_entries"] == [0]
        assert m.meta.background.subtracted is True


def test_after_skymatch_pending_level():
    """skymatch with subtract=False leaves level L pending: wiimatch fits data - L."""
    models, truths, ref = h.make_models(n=3, degree=1)
    levels = [0.7, -0.2, 1.3]
    for m, lev in zip(models, levels):
        m.meta.background.level = lev
        m.meta.background.subtracted = False
        m.meta.background.method = "match"
    out = WiiMatchStep.call(models, degree=1, subtract=True)
    shifted = [t.copy() for t in truths]
    for t, lev in zip(shifted, levels):
        t.flat[0] -= lev
    check_recovery(models, out, shifted, ref)
    for m_in, m_out, lev in zip(models, out, levels):
        assert m_out.meta.background.subtracted is True
        assert m_out.meta.wiimatch.instance["pending_level"] == lev
        bkg = adapters.evaluate_background(m_out)
        np.testing.assert_allclose(m_out.data, m_in.data - lev - bkg, atol=1e-4)
        # BKGLEVEL: now the whole constant level subtracted, L plus the
        # polynomial's mean over the model's pixels
        used = np.isfinite(m_in.data) & np.isfinite(bkg)
        assert m_out.meta.background.level == pytest.approx(lev + bkg[used].mean(), abs=1e-9)


def test_after_skymatch_subtracted():
    """Data already sky-subtracted: 'subtracted' stays True even with subtract=False."""
    models, truths, ref = h.make_models(n=3, degree=1)
    for m in models:
        m.meta.background.level = 0.5
        m.meta.background.subtracted = True
    out = WiiMatchStep.call(models, degree=1, subtract=False)
    check_recovery(models, out, truths, ref)
    for m_in, m in zip(models, out):
        assert m.meta.background.subtracted is True
        assert m.meta.background.level == 0.5
        np.testing.assert_array_equal(m.data, m_in.data)


def test_level_accumulates_what_was_subtracted():
    """Already subtracted (level 0.5) and subtracted again: BKGLEVEL = 0.5 + mean P;
    a second wiimatch run with subtract=True adds its own mean."""
    models, _, _ = h.make_models(n=3, degree=1)
    for m in models:
        m.meta.background.level = 0.5
        m.meta.background.subtracted = True
    once = WiiMatchStep.call(models, degree=1, subtract=True)
    twice = WiiMatchStep.call(once, degree=1, subtract=True)
    for m_in, m1, m2 in zip(models, once, twice):
        removed1 = np.asarray(m_in.data, float) - np.asarray(m1.data, float)
        assert m1.meta.background.level == pytest.approx(0.5 + np.nanmean(removed1), abs=1e-4)
        removed2 = np.asarray(m1.data, float) - np.asarray(m2.data, float)
        assert m2.meta.background.level == pytest.approx(
            m1.meta.background.level + np.nanmean(removed2), abs=1e-4)


def _split_first_model(models):
    """Models 0a, 0b: the two halves (left/right) of model 0, one exposure (same group_id)."""
    m0 = models[0]
    nx = m0.data.shape[-1]
    cols = np.arange(nx)
    halves = []
    for name, keep in (("exp1a_i2d.fits", cols < nx // 2), ("exp1b_i2d.fits", cols >= nx // 2)):
        m = m0.copy()
        for arr in ("data", "err"):
            a = np.array(getattr(m, arr))
            a[..., ~keep] = np.nan
            setattr(m, arr, a)
        m.wht = np.where(keep, m.wht, 0).astype(np.float32)
        m.meta.filename = name
        m.meta.group_id = "exposure-1"
        halves.append(m)
    return halves + [m.copy() for m in models[1:]]


def test_detectors_of_one_exposure_share_a_polynomial(caplog):
    """The two halves of an exposure (same group_id) matched as one equal the
    whole exposure matched; group_exposures=False fits them separately."""
    models, truths, ref = h.make_models(n=3, degree=1)
    # source masking works on each model's own pixels (its local background
    # differs at the cut): off here, so that the halves are the whole
    whole = WiiMatchStep.call(models, degree=1, source_nsigma=0)
    split = _split_first_model(models)
    with caplog.at_level(logging.INFO, logger="jwst_wiimatch"):
        grouped = WiiMatchStep.call(split, degree=1, source_nsigma=0)
    assert "share one polynomial" in caplog.text and "exp1a_i2d.fits" in caplog.text
    c_whole = [np.asarray(adapters.latest_entry(m)["coefficients"]) for m in whole]
    c_grp = [np.asarray(adapters.latest_entry(m)["coefficients"]) for m in grouped]
    np.testing.assert_allclose(c_grp[0], c_whole[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(c_grp[1], c_whole[0], rtol=1e-9, atol=1e-12)
    for a, b in zip(c_grp[2:], c_whole[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

    alone = WiiMatchStep.call(split, degree=1, group_exposures=False, source_nsigma=0)
    c_alone = [np.asarray(adapters.latest_entry(m)["coefficients"]) for m in alone]
    assert not np.allclose(c_alone[0], c_alone[1], rtol=1e-6)
    check_recovery(split, alone, [truths[0], *truths], ref)


# ----------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------
def test_missing_file_in_asn(tmp_path):
    models, _, _ = h.make_models(n=3)
    asn = h.write_asn(models, tmp_path)
    os.remove(tmp_path / models[1].meta.filename)
    with pytest.raises(ValueError, match="member 1.*exp2_i2d.fits.*does not exist"):
        WiiMatchStep.call(asn)


def test_empty_asn(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"products": [{"members": []}]}))
    with pytest.raises(ValueError, match="no models"):
        WiiMatchStep.call(str(path))
    path.write_text(json.dumps({"asn_id": "x"}))
    with pytest.raises(ValueError, match="products"):
        WiiMatchStep.call(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        WiiMatchStep.call(str(path))


def test_missing_asn_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        WiiMatchStep.call(str(tmp_path / "nope.json"))


def test_mismatched_grids():
    a, _, _ = h.make_models(n=2, shape=(30, 40))
    b, _, _ = h.make_models(n=1, shape=(30, 40), crval=(150.001, 2.0))
    b[0].meta.filename = "shifted_i2d.fits"
    with pytest.raises(ValueError, match="shifted_i2d.fits.*common grid"):
        WiiMatchStep.call([a[0], a[1], b[0]])
    c, _, _ = h.make_models(n=1, shape=(31, 40))
    c[0].meta.filename = "bigger_i2d.fits"
    with pytest.raises(ValueError, match="bigger_i2d.fits.*shape"):
        WiiMatchStep.call([a[0], c[0], a[1]])


def test_missing_wcs():
    models, _, _ = h.make_models(n=3)
    models[2].meta.wcs = None
    with pytest.raises(ValueError, match="exp3_i2d.fits.*meta.wcs"):
        WiiMatchStep.call(models)


def test_all_nan_model_skipped():
    models, truths, ref = h.make_models(n=4, degree=1)
    models[2].data[...] = np.nan
    out = WiiMatchStep.call(models, degree=1, subtract=True)
    assert out[2].meta.cal_step.wiimatch == "SKIPPED"
    assert "no valid pixels" in out[2].meta.wiimatch.instance["reason"]
    assert out[2].meta.background.polynomial_info == []
    keep = [0, 1, 3]
    check_recovery([models[k] for k in keep], [out[k] for k in keep],
                   [truths[k] for k in keep], ref)


def test_single_model_skipped():
    models, _, _ = h.make_models(n=1)
    out = WiiMatchStep.call(models)
    assert out[0].meta.cal_step.wiimatch == "SKIPPED"
    assert "fewer than two" in out[0].meta.wiimatch.instance["reason"]
    one = WiiMatchStep.call(models[0])
    assert one.meta.cal_step.wiimatch == "SKIPPED"


def test_no_overlap_skipped():
    models, _, _ = h.make_models(n=2, shape=(30, 40))
    models[0].data[:, 20:] = np.nan
    models[1].data[:, :20] = np.nan
    out = WiiMatchStep.call(models, degree=0, subtract=True)
    for m_in, m in zip(models, out):
        assert m.meta.cal_step.wiimatch == "SKIPPED"
        assert "overlap" in m.meta.wiimatch.instance["reason"]
        np.testing.assert_array_equal(m.data, m_in.data)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"degree": [1, 1, 1]}, "degree.*3 entries.*2 dimensions"),
        ({"degree": "x"}, "degree"),
        ({"degree": -1}, "degree.*>= 0"),
        ({"degree": "1.5"}, "degree"),
        ({"solver": "QR"}, "solver.*RLU"),
        ({"dqbits": "~NOPE"}, "dqbits"),
        ({"refpoint": [1.0]}, "refpoint"),
    ],
)
def test_bad_parameters(kwargs, match):
    from stpipe.exceptions import ValidationError

    models, _, _ = h.make_models(n=2, shape=(20, 24))
    with pytest.raises((ValueError, TypeError, ValidationError), match=match):
        WiiMatchStep.call(models, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"degree": "x"}, "degree"), ({"degree": -1}, "degree"), ({"degree": [1, 2, 3, 4]}, "degree"),
    ({"refpoint": "abc"}, "refpoint"), ({"refpoint": [1, 2, 3, 4]}, "refpoint"),
    ({"binning": 0}, "binning")])
def test_bad_parameters_refused_when_the_step_is_made(kwargs, match):
    """Typed parameters: bad values stop at construction, before any input is read."""
    from stpipe.exceptions import ValidationError

    with pytest.raises((ValueError, ValidationError), match=match):
        WiiMatchStep(**kwargs)


@pytest.mark.parametrize("given, stored", [
    (1, 1), ("2", 2), ([1, 2], [1, 2]), (["1", "0"], [1, 0]), ("2,2,0", [2, 2, 0]),
    (2.0, 2)])
def test_degree_stored_as_integers(given, stored):
    step = WiiMatchStep(degree=given)
    assert step.degree == stored
    assert all(isinstance(v, int) for v in np.atleast_1d(step.degree).tolist())


def test_bad_input_type():
    with pytest.raises(TypeError, match="input"):
        WiiMatchStep.call(12)
    models, _, _ = h.make_models(n=2, shape=(20, 24))
    with pytest.raises(TypeError, match="item 1"):
        WiiMatchStep.call([models[0], 3.0])


def test_hook_logs_reach_the_parents_log(tmp_path):
    """As a hook of a step whose loggers do not include ours (jwst's resample in
    calwebb_image3), the summary, infos and warnings still reach the log file."""
    Parent = h.passthrough_step(loggers=("stpipe", "py.warnings"))
    models, _, _ = h.make_models(n=3, degree=1)
    models[2].data[:] = np.nan  # no valid pixel: skipped with a warning
    lib = WiiMatchLibrary([m.copy() for m in models])
    log_file = tmp_path / "run.log"
    from stpipe import _log  # the set-up strun makes for the parent's loggers

    cfg = _log.LogConfig(handler=f"file:{log_file}", level="INFO")
    with cfg.context(Parent.get_stpipe_loggers()):
        Parent.call(lib, post_hooks=["jwst_wiimatch.step.WiiMatchStep"], configure_log=False)
    text = log_file.read_text()
    assert "wiimatch summary" in text
    assert "jwst_wiimatch" in text and "SKIPPED" in text
    assert "WARNING" in text and "no valid pixel" in text
    # nothing lent stays behind
    assert logging.getLogger("jwst_wiimatch").handlers == []


def test_post_hook_in_another_step():
    """A post-hook receives the parent's result: the library is updated in place."""
    Producer = h.passthrough_step(loggers=("stpipe", "jwst_wiimatch"))

    models, truths, ref = h.make_models(n=3, degree=1)
    lib = WiiMatchLibrary([m.copy() for m in models])
    out = Producer.call(lib, post_hooks=["jwst_wiimatch.step.WiiMatchStep"])
    res = library_models(out)
    assert all(m.meta.cal_step.wiimatch == "COMPLETE" for m in res)
    check_recovery(models, res, truths, ref)


def test_two_groups_matched_separately(caplog):
    """Two pairs that do not overlap each other: each pair is matched, a warning says so."""
    models, truths, ref = h.make_models(n=4, shape=(30, 60), degree=0)
    for k, m in enumerate(models):
        if k < 2:
            m.data[:, 28:] = np.nan
        else:
            m.data[:, :32] = np.nan
    with caplog.at_level(logging.WARNING, logger="jwst_wiimatch"):
        out = WiiMatchStep.call(models, degree=0)
    assert all(m.meta.cal_step.wiimatch == "COMPLETE" for m in out)
    assert any("2 groups" in r.getMessage() for r in caplog.records)
    for a, b in ((0, 1), (2, 3)):
        rec = out[b].meta.background.polynomial_info[-1].instance["coefficients"][0] \
            - out[a].meta.background.polynomial_info[-1].instance["coefficients"][0]
        assert rec == pytest.approx(truths[b][0, 0] - truths[a][0, 0], abs=TOL)


def test_asn_in_memory_false(tmp_path, monkeypatch):
    models, truths, ref = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path)
    monkeypatch.chdir(tmp_path)  # the on-disk library keeps its files here
    out = WiiMatchStep.call(asn, degree=1, in_memory=False, subtract=True)
    assert isinstance(out, WiiMatchLibrary) and out._on_disk
    res = library_models(out)
    check_recovery(models, res, truths, ref)
    assert all(m.meta.background.subtracted for m in res)


def test_header_says_background_was_matched(tmp_path):
    """Read with astropy alone, a saved output says the background was matched, by
    what, and where the polynomial is; BKGLEVEL is the level subtracted."""
    from astropy.io import fits

    models, _, _ = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path / "in")
    WiiMatchStep.call(asn, degree=1, subtract=True, save_results=True,
                      output_dir=str(tmp_path))
    for m_in in models:
        path = tmp_path / m_in.meta.filename.replace("_i2d.fits", "_wiimatch.fits")
        hdr = fits.getheader(path, 0)
        assert hdr["BKGMETH"] == "wiimatch" and hdr["BKGSUB"] is True
        history = " ".join(str(c) for c in hdr.get("HISTORY", []))
        history = " ".join(history.split())
        assert "background matched by wiimatch" in history
        assert "meta.background.polynomial_info[0]" in history
        with fits.open(path) as hdul:
            data_out = hdul["SCI"].data.astype(float)
        # BKGLEVEL: the mean of what was subtracted over the model's finite pixels
        diff = np.asarray(m_in.data, float) - data_out
        good = np.isfinite(diff)
        assert hdr["BKGLEVEL"] == pytest.approx(diff[good].mean(), abs=1e-4)
        assert abs(hdr["BKGLEVEL"]) > 0.01
        from stdatamodels.jwst import datamodels

        with datamodels.open(path) as m:
            entry = m.meta.background.polynomial_info[0].instance
            assert entry["method"] == "wiimatch" and "xi, eta" in entry["frame"]
