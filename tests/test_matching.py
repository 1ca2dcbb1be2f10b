"""``match_models``: coarse sky matching, threads, on-disk libraries, memory, streamed saves.

The sky kind (calibrated exposures on their own detector grids) needs no
jwst: the models are stdatamodels ``ImageModel`` objects with a gwcs, read
through ``WiiMatchLibrary``.
"""
import os

import numpy as np
import pytest

import oracle as O
import pipeline_helpers as ph
import step_helpers as h
from jwst_wiimatch.matching import match_models
from jwst_wiimatch.models import WiiMatchLibrary
from jwst_wiimatch.step import WiiMatchStep

SHAPE = (512, 512)  # large enough for block averages of up to 8 pixels


@pytest.fixture(scope="module")
def cal_field(tmp_path_factory):
    """Four 512 x 512 cal exposures with their own planes, saved with an association."""
    folder = tmp_path_factory.mktemp("calfield")
    models = [ph.make_cal(k, shape=SHAPE) for k in range(4)]
    asn = h.write_asn(models, str(folder))
    return asn, models


def sky_error(outcomes, summary, models):
    """Largest RMS over exposures k of (P_k - P_0) - (T_k - T_0) over exposure k's pixels."""
    err = spread = 0.0
    for k in range(1, len(models)):
        ny, nx = SHAPE
        pix = np.indices(SHAPE, dtype=float)[::-1][:, ::8, ::8]
        ra, dec = models[k].meta.wcs(*pix, with_bounding_box=False)
        xi, eta = h.standard_coords(ra, dec, *summary.refpoint[:2])
        shape = [d + 1 for d in summary.degree]
        rec = [O.polyval_nd(np.reshape(outcomes[j].coefficients, shape), [xi, eta])
               for j in (0, k)]
        true = [ph.injected_background(j, ra, dec) for j in (0, k)]
        d = (rec[1] - rec[0]) - (true[1] - true[0])
        err = max(err, float(np.sqrt(np.mean(d ** 2))))
        spread = max(spread, float(np.sqrt(np.mean((true[1] - true[0]) ** 2))))
    return err, spread


def test_sky_block_averages_keep_the_noise_floor(cal_field):
    asn, models = cal_field
    errs = {}
    for binning in (1, 4, 8):
        outcomes, summary = match_models(WiiMatchLibrary(asn), kind="sky", degree=1,
                                         binning=binning)
        assert all(o.matched for o in outcomes)
        errs[binning], spread = sky_error(outcomes, summary, models)
        assert summary.binning == binning
    # per-pixel matching is at the noise floor of this field ...
    assert spread > 100 * errs[1]
    # ... and block averages stay there (within 50 % of the per-pixel error)
    for binning in (4, 8):
        assert errs[binning] < 1.5 * errs[1] + 2e-5, errs


def test_sky_grid_cells_follow_binning(cal_field):
    asn, _ = cal_field
    _, s1 = match_models(WiiMatchLibrary(asn), kind="sky", binning=1)
    _, s4 = match_models(WiiMatchLibrary(asn), kind="sky", binning=4)
    assert s1.grid_shape[0] == pytest.approx(4 * s4.grid_shape[0], abs=4)
    assert s1.grid_shape[1] == pytest.approx(4 * s4.grid_shape[1], abs=4)


@pytest.mark.parametrize("kind", ["sky", "grid"])
def test_threads_and_on_disk_give_identical_results(cal_field, tmp_path, kind):
    if kind == "sky":
        asn, _ = cal_field
        kw = dict(kind="sky", binning=4)
    else:
        models, _, _ = h.make_models(n=5, degree=1)
        asn = h.write_asn(models, str(tmp_path))
        kw = dict(kind="grid", binning=1)
    ref, _ = match_models(WiiMatchLibrary(asn), degree=1, threads=1, **kw)
    many, _ = match_models(WiiMatchLibrary(asn), degree=1, threads=3, **kw)
    disk, _ = match_models(WiiMatchLibrary(asn, on_disk=True, temp_directory=str(tmp_path)),
                           degree=1, threads=2, **kw)
    for a, b, c in zip(ref, many, disk):
        np.testing.assert_array_equal(a.coefficients, b.coefficients)
        np.testing.assert_array_equal(a.coefficients, c.coefficients)


def _traced_peak(asn, tmp_path):
    from tracing import traced_peak

    lib = WiiMatchLibrary(asn, on_disk=True, temp_directory=str(tmp_path))
    (outcomes, _), peak = traced_peak(
        lambda: match_models(lib, kind="sky", binning=4, threads=2))
    assert all(o.matched for o in outcomes)
    return peak


def test_sky_memory_does_not_grow_with_exposures(tmp_path):
    """tracemalloc peak with 4 and with 16 exposures (on disk): the same, not N x detector."""
    models = []
    for k in range(16):
        m = ph.make_cal(k % 4, shape=SHAPE, seed=200 + k)
        m.meta.filename = f"exp{k:02d}_cal.fits"
        models.append(m)
    one_exposure = sum(np.asarray(getattr(models[0], a)).nbytes
                       for a in ("data", "err", "dq", "var_rnoise", "var_poisson", "var_flat"))
    few = h.write_asn(models[:4], str(tmp_path / "few"))
    many = h.write_asn(models, str(tmp_path / "many"))
    del models
    _traced_peak(few, tmp_path)  # warm-up: imports and caches
    peak_few = _traced_peak(few, tmp_path)
    peak_many = _traced_peak(many, tmp_path)
    # 12 more exposures held at once would add 12 * one_exposure (72 MB); allow
    # a quarter of that for the cell sums kept per exposure and for garbage
    # that the collector has not reached yet
    assert peak_many < peak_few + 3 * one_exposure, (peak_few / 2**20, peak_many / 2**20)
    assert peak_many < 12 * one_exposure


def test_standalone_run_saves_each_output_once_done(tmp_path):
    """A standalone run that saves (strun) writes outputs as they are done and
    returns a library over them, equal to the in-memory result."""
    models, truths, ref = h.make_models(n=4, degree=1)
    asn = h.write_asn(models, str(tmp_path / "in"))
    out_dir = tmp_path / "out"
    lib = WiiMatchStep.call(asn, degree=1, subtract=True, save_results=True,
                            output_dir=str(out_dir))
    mem = WiiMatchStep.call(asn, degree=1, subtract=True)
    names = sorted(os.listdir(out_dir))
    assert names == sorted(m.meta.filename.replace("_i2d.fits", "_wiimatch.fits")
                           for m in models)
    with lib, mem:
        for k in range(len(lib)):
            a, b = lib.borrow(k), mem.borrow(k)
            assert a.meta.filename == names[k] or a.meta.filename in names
            np.testing.assert_array_equal(a.data, b.data)
            assert (a.meta.background.polynomial_info[-1].instance["coefficients"]
                    == b.meta.background.polynomial_info[-1].instance["coefficients"])
            lib.shelve(a, k, modify=False)
            mem.shelve(b, k, modify=False)
    # nothing was left in the working directory or beside the inputs
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_bad_binning_and_kind_are_refused(cal_field):
    asn, _ = cal_field
    with pytest.raises(ValueError, match="binning=0"):
        match_models(WiiMatchLibrary(asn), kind="sky", binning=0)
    with pytest.raises(ValueError, match="kind='cube'"):
        match_models(WiiMatchLibrary(asn), kind="cube")


def test_standalone_default_binning_keeps_the_noise_floor(caplog):
    """On a 320 x 300 grid the default binning (4) recovers the injected
    backgrounds as well as matching every pixel; small grids keep 64 cells."""
    import oracle as O
    from jwst_wiimatch.models import evaluate_background

    models, truths, ref = h.make_models(n=4, shape=(300, 320), degree=1, noise=0.05)
    coords = h.frame_of_grid(models[0], ref)
    masks = [np.isfinite(m.data) for m in models]
    true_bkg = [O.polyval_nd(t, coords) for t in truths]
    errs = {}
    for binning in (1, 4):
        with caplog.at_level("INFO", logger="jwst_wiimatch"):
            out = WiiMatchStep.call(models, degree=1, binning=binning)
        rec = [evaluate_background(m) for m in out]
        errs[binning] = h.relative_error(rec, true_bkg, masks)
    spread = h.relative_error([np.zeros_like(t) for t in true_bkg], true_bkg, masks)
    assert spread > 100 * errs[1]
    assert errs[4] < 1.5 * errs[1] + 1e-4, errs
    assert "reading 4 models (4x4 blocks)" in caplog.text
    caplog.clear()
    small, _, _ = h.make_models(n=3, shape=(48, 56), degree=1)
    with caplog.at_level("INFO", logger="jwst_wiimatch"):
        WiiMatchStep.call(small, degree=1)
    assert "binning 4 reduced to 1" in caplog.text
