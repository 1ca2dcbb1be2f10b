"""Level conventions of WiiMatchStep: match_down, reference, levels (issue 9).

Expectations come from the backgrounds injected by ``step_helpers.make_models``
(evaluated with the oracle), never from the package under test.
"""
import logging

import numpy as np
import pytest

import oracle as O
import step_helpers as h

from jwst_wiimatch import models as adapters
from jwst_wiimatch.step import WiiMatchStep

TOL = 0.02  # as in test_step.py: RMS error on a recovered background (noise 0.05)


@pytest.fixture(scope="module")
def field():
    return h.make_models(n=4, degree=1, seed=3)


def _truth(models, truths, ref):
    coords = h.frame_of_grid(models[0], ref)
    return [O.polyval_nd(t, coords) for t in truths]


def _valid(m):
    ok = np.isfinite(m.data) & (np.asarray(m.dq) == 0)
    return ok


def _scores(models, true_bkg):
    """Independent 'level' of each model: mean over its own valid pixels of its
    injected background minus the models' mean background."""
    avg = np.mean(true_bkg, axis=0)
    return np.array([np.mean((t - avg)[_valid(m)]) for t, m in zip(true_bkg, models)])


def _entry(m):
    return np.asarray(adapters.latest_entry(m)["coefficients"])


def _absolute_error(out, true_bkg, models, keep):
    """Largest RMS over models of P_n - (T_n - T_keep) on the model's valid pixels."""
    worst = 0.0
    for n, m in enumerate(out):
        d = adapters.evaluate_background(m) - (true_bkg[n] - true_bkg[keep])
        worst = max(worst, float(np.sqrt(np.mean(d[_valid(models[n])] ** 2))))
    return worst


@pytest.mark.parametrize("match_down", [True, False])
def test_match_down_keeps_the_extreme_model(field, match_down):
    models, truths, ref = field
    true_bkg = _truth(models, truths, ref)
    scores = _scores(models, true_bkg)
    keep = int(np.argmin(scores) if match_down else np.argmax(scores))
    # the choice is clear on these data (not decided by the noise)
    assert np.sort(np.abs(scores - scores[keep]))[1] > 0.05
    out = WiiMatchStep.call(models, degree=1, match_down=match_down)
    np.testing.assert_array_equal(_entry(out[keep]), 0.0)
    for k, m in enumerate(out):
        w = m.meta.wiimatch.instance
        assert w["level_convention"] == ("match_down" if match_down else "match_up")
        assert w["level_reference"] is (k == keep)
    assert _absolute_error(out, true_bkg, models, keep) < TOL
    # the others are matched down (up) to it: their mean background is above (below)
    means = [np.mean(adapters.evaluate_background(m)[_valid(mi)]) for m, mi in zip(out, models)]
    sign = 1 if match_down else -1
    assert min(sign * v for k, v in enumerate(means) if k != keep) > 0.05


def test_default_is_zero_sum_and_recorded(field):
    models, truths, ref = field
    out = WiiMatchStep.call(models, degree=1)
    coefs = np.array([_entry(m) for m in out])
    np.testing.assert_allclose(coefs.sum(axis=0), 0.0, atol=1e-9 * np.abs(coefs).max())
    assert {m.meta.wiimatch.instance["level_convention"] for m in out} == {"zero_sum"}
    assert not any(m.meta.wiimatch.instance["level_reference"] for m in out)
    explicit = WiiMatchStep.call(models, degree=1, match_down=None)
    np.testing.assert_array_equal(np.array([_entry(m) for m in explicit]), coefs)


@pytest.mark.parametrize("given", [["exp3_i2d.fits"], ["2"]])
def test_reference_by_name_or_index(field, given):
    models, truths, ref = field
    true_bkg = _truth(models, truths, ref)
    out = WiiMatchStep.call(models, degree=1, reference=given)
    np.testing.assert_array_equal(_entry(out[2]), 0.0)
    assert [m.meta.wiimatch.instance["level_reference"] for m in out] == [
        False, False, True, False]
    assert {m.meta.wiimatch.instance["level_convention"] for m in out} == {"reference"}
    assert _absolute_error(out, true_bkg, models, 2) < TOL


def test_reference_set_held_fixed(field):
    models, truths, ref = field
    out = WiiMatchStep.call(models, degree=1, reference=["exp1_i2d.fits", "3"])
    np.testing.assert_array_equal(_entry(out[0]), 0.0)
    np.testing.assert_array_equal(_entry(out[3]), 0.0)
    assert np.abs(_entry(out[1])).max() > 0.1


def test_levels_give_absolute_backgrounds(field):
    models, truths, ref = field
    true_bkg = _truth(models, truths, ref)
    given = [truths[0].flat[0], np.nan, np.nan, truths[3].flat[0]]
    out = WiiMatchStep.call(models, degree=1, levels=given)
    for n, m in enumerate(out):
        w = m.meta.wiimatch.instance
        assert w["level_convention"] == "levels" and np.isfinite(w["level_shift"])
        # the background at the refpoint is the absolute one, for every model
        assert _entry(m)[0] == pytest.approx(truths[n].flat[0], abs=TOL)
        # zero-sum slopes: the background differences are still right
        d = adapters.evaluate_background(m) - true_bkg[n]
        common = np.mean([adapters.evaluate_background(o) - t for o, t in zip(out, true_bkg)],
                         axis=0)
        assert np.sqrt(np.mean((d - common)[_valid(models[n])] ** 2)) < TOL


def test_bad_level_parameters(field):
    models, _, _ = field
    with pytest.raises(ValueError, match="reference='nope.fits' is no model's file name"):
        WiiMatchStep.call(models, reference=["nope.fits"])
    with pytest.raises(ValueError, match="reference='9': there are 4 models"):
        WiiMatchStep.call(models, reference=["9"])
    with pytest.raises(ValueError, match="gives 2 value"):
        WiiMatchStep.call(models, levels=[1.0, 2.0])
    with pytest.raises(ValueError, match="cannot both be given"):
        WiiMatchStep.call(models, levels=[1.0] * 4, reference=["0"])


def test_command_line_parameters(field, tmp_path, caplog):
    """--match_down=false, --reference and --levels from the command line."""
    from stdatamodels.jwst import datamodels
    from stpipe import Step

    models, truths, ref = field
    asn = h.write_asn([m.copy() for m in models], str(tmp_path / "in"))
    out = tmp_path / "out"
    out.mkdir()
    caplog.set_level(logging.INFO, logger="jwst_wiimatch")
    Step.from_cmdline(["wiimatch", asn, "--degree=1", "--reference=exp2_i2d.fits,3",
                       f"--output_dir={out}"])
    m1 = datamodels.open(str(out / "exp2_wiimatch.fits"))
    m3 = datamodels.open(str(out / "exp4_wiimatch.fits"))
    assert m1.meta.wiimatch.instance["level_convention"] == "reference"
    np.testing.assert_array_equal(_entry(m1), 0.0)
    np.testing.assert_array_equal(_entry(m3), 0.0)
    assert "polynomial 0 (kept as it is)" in caplog.text
    step = WiiMatchStep.from_cmdline(["wiimatch", asn, "--match_down=false",
                                      "--levels=1.0,nan,nan,2.0", "--save_results=false"])
    assert step.match_down is False
    assert step.levels[0] == 1.0 and np.isnan(step.levels[1])
