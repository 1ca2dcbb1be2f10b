"""WiiMatchStep with jwst's containers and jwst's skymatch (skipped without jwst)."""

import numpy as np
import pytest

jwst_datamodels = pytest.importorskip("jwst.datamodels")

import oracle as O  # noqa: E402
import step_helpers as h  # noqa: E402
from test_step import TOL, check_recovery, library_models  # noqa: E402

from jwst_wiimatch.step import WiiMatchStep  # noqa: E402

ModelContainer = jwst_datamodels.ModelContainer
ModelLibrary = jwst_datamodels.ModelLibrary


def test_model_container():
    models, truths, ref = h.make_models(n=3, degree=1)
    container = ModelContainer([m.copy() for m in models])
    out = WiiMatchStep.call(container, degree=1, subtract=True)
    assert isinstance(out, ModelContainer) and out is not container
    assert len(out) == 3
    check_recovery(models, list(out), truths, ref)
    for m_in, m in zip(models, container):
        np.testing.assert_array_equal(m.data, m_in.data)


@pytest.mark.parametrize("on_disk", [False, True])
def test_jwst_model_library(tmp_path, on_disk, monkeypatch):
    models, truths, ref = h.make_models(n=3, degree=1)
    asn = h.write_asn(models, tmp_path)
    monkeypatch.chdir(tmp_path)  # on-disk libraries write their temporary files here
    lib = ModelLibrary(asn, on_disk=on_disk)
    out = WiiMatchStep.call(lib, degree=1, subtract=True, in_memory=not on_disk)
    assert isinstance(out, ModelLibrary)
    res = library_models(out)
    assert [m.meta.filename for m in res] == [m.meta.filename for m in models]
    check_recovery(models, res, truths, ref)


def test_skymatch_after_wiimatch(monkeypatch):
    from jwst.skymatch import SkyMatchStep

    # jwst's own steps need this to run offline; wiimatch does not
    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "true")

    models, truths, ref = h.make_models(n=3, degree=0)
    matched = WiiMatchStep.call(models, degree=0, subtract=True)
    # skymatch accepts the result when its own 'subtract' agrees
    lib = SkyMatchStep.call(ModelLibrary(list(matched)), skymethod="global",
                            subtract=True)
    res = library_models(lib)
    assert all(m.meta.cal_step.skymatch == "COMPLETE" for m in res)
    assert all(m.meta.background.subtracted is True for m in res)
    # ... and refuses, by its own rule, a 'subtract' that disagrees
    with pytest.raises(ValueError, match="inconsistent"):
        SkyMatchStep.call(ModelLibrary([m.copy() for m in matched]),
                          skymethod="global", subtract=False)


def test_wiimatch_after_skymatch_pending_level(monkeypatch):
    from jwst.skymatch import SkyMatchStep

    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "true")

    models, truths, ref = h.make_models(n=3, degree=1)
    lib = SkyMatchStep.call(ModelLibrary([m.copy() for m in models]),
                            skymethod="match", subtract=False)
    sky = library_models(lib)
    levels = [m.meta.background.level for m in sky]
    assert all(m.meta.background.subtracted is False for m in sky)
    # plain block means without source masking: this test is about the pending
    # level, at a precision (TOL / 2) that masking the few cells of this small
    # grid's sources would cost
    out = WiiMatchStep.call(sky, degree=1, subtract=True, source_nsigma=0)
    shifted = [t.copy() for t in truths]
    for t, lev in zip(shifted, levels):
        t.flat[0] -= lev
    # skymatch already removed the constant offsets: what is left is smaller
    check_recovery(models, out, shifted, ref, tol=TOL / 2, min_spread=6)
    for m_in, m, lev in zip(sky, out, levels):
        assert m.meta.background.subtracted is True
        # BKGLEVEL: skymatch's level plus the mean of wiimatch's polynomial
        # over the model's pixels, i.e. the mean of all that was subtracted
        removed = np.asarray(m_in.data, float) - np.asarray(m.data, float)
        assert m.meta.background.level == pytest.approx(np.nanmean(removed), abs=1e-4)
        assert m.meta.wiimatch.instance["pending_level"] == lev


def _as_cal(models):
    """Give synthetic models what jwst's resample needs of a cal product."""
    from jwst.assign_wcs.util import update_s_region_imaging

    for k, m in enumerate(models):
        foot = np.isfinite(m.data)
        m.dq[~foot] |= 1
        m.data[~foot] = 0.0
        m.err[~foot] = 0.0
        for name in ("var_rnoise", "var_poisson", "var_flat"):
            setattr(m, name, np.where(foot, m.err ** 2 / 3, 0).astype(np.float32))
        ex = m.meta.exposure
        ex.exposure_time = ex.measurement_time = ex.duration = 100.0
        ex.start_time, ex.mid_time, ex.end_time = 60000.0 + k, 60000.005 + k, 60000.01 + k
        m.meta.photometry.pixelarea_steradians = 2.35e-13
        m.meta.photometry.pixelarea_arcsecsq = 0.01
        m.meta.bunit_data = m.meta.bunit_err = "MJy/sr"
        m.meta.filename = f"exp{k + 1}_cal.fits"
        wi = m.meta.wcsinfo
        wi.ctype1, wi.ctype2 = "RA---TAN", "DEC--TAN"
        wi.crval1, wi.crval2 = wi.ra_ref, wi.dec_ref = 150.0, 2.0
        wi.v2_ref = wi.v3_ref = wi.roll_ref = wi.v3yangle = 0.0
        wi.vparity = -1
        update_s_region_imaging(m)
        m.meta.instrument.filter, m.meta.instrument.pupil = "F200W", "CLEAR"
        m.meta.instrument.detector, m.meta.instrument.channel = "NRCA1", "SHORT"
        obs = m.meta.observation
        obs.program_number, obs.observation_number, obs.visit_number = "1", "1", "1"
        obs.visit_group, obs.sequence_id, obs.activity_id = "1", "1", "1"
        obs.exposure_number = str(k + 1)
    return models


def test_post_hook_of_resample_single(monkeypatch):
    """resample single=True hands its per-exposure library to the wiimatch hook."""
    from jwst.resample import ResampleStep

    from jwst_wiimatch.models import evaluate_background, latest_entry

    monkeypatch.setenv("STPIPE_DISABLE_CRDS_STEPPARS", "true")
    models, truths, ref = h.make_models(n=3, shape=(60, 70), degree=1, rotation_deg=0)
    originals = [m.copy() for m in models]
    lib = ResampleStep.call(ModelLibrary(_as_cal(models)), single=True,
                            post_hooks=["jwst_wiimatch.step.WiiMatchStep"])
    res = library_models(lib)
    assert len(res) == 3
    for m in res:
        assert m.meta.cal_step.wiimatch == "COMPLETE"
        assert m.meta.wiimatch.instance["rms"] < m.meta.wiimatch.instance["rms_before"] / 3
    # the polynomials fitted on resample's grid, evaluated on the original
    # models through their own WCS, recover the injected differences
    coords = h.frame_of_grid(originals[0], ref)
    masks = [np.isfinite(m.data) for m in originals]
    true_bkg = [O.polyval_nd(t, coords) for t in truths]
    rec = [evaluate_background(o, latest_entry(m)) for o, m in zip(originals, res)]
    assert h.relative_error(rec, true_bkg, masks) < 2 * TOL

