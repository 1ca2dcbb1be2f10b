"""``strun`` runs of WiiMatchStep in a subprocess, offline, with no CRDS settings."""

import importlib.metadata
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import step_helpers as h

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _alias_registered():
    eps = importlib.metadata.entry_points(group="stpipe.steps")
    for ep in eps:
        if ep.value.startswith("jwst_wiimatch."):
            return True
    return False


def _strun(args, cwd):
    strun = shutil.which("strun")
    cmd = [strun] if strun else [sys.executable, "-m", "stpipe", "run"]
    # a bare environment: no CRDS_* variables, no STPIPE_DISABLE_CRDS_STEPPARS
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd),
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _run_and_check(tmp_path, step_name):
    from stdatamodels.jwst import datamodels

    models, truths, ref = h.make_models(n=3, degree=1)
    h.write_asn(models, tmp_path)
    inputs = {m.meta.filename: (tmp_path / m.meta.filename).read_bytes() for m in models}
    res = _strun([step_name, "asn.json", "--degree=1", "--subtract=true",
                  "--save-parameters", "wiimatch.asdf"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    log = res.stdout + res.stderr
    assert "wiimatch summary" in log
    for name, data in inputs.items():
        assert (tmp_path / name).read_bytes() == data
        out = tmp_path / name.replace("_i2d.fits", "_wiimatch.fits")
        with datamodels.open(out) as m:
            assert m.meta.cal_step.wiimatch == "COMPLETE"
            assert m.meta.background.subtracted is True
    first = {}
    for name in inputs:
        with datamodels.open(tmp_path / name.replace("_i2d.fits", "_wiimatch.fits")) as m:
            first[name] = np.array(m.data)
        os.remove(tmp_path / name.replace("_i2d.fits", "_wiimatch.fits"))
    # the saved parameter file runs again and gives the same result
    assert (tmp_path / "wiimatch.asdf").exists()
    import asdf

    with asdf.open(tmp_path / "wiimatch.asdf") as af:
        pars = dict(af.tree["parameters"])
    # typed: numbers and booleans, not the text given on the command line
    assert pars["degree"] == 1 and isinstance(pars["degree"], int)
    assert pars["subtract"] is True and pars["binning"] == 4
    res = _strun(["wiimatch.asdf", "asn.json"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in inputs:
        with datamodels.open(tmp_path / name.replace("_i2d.fits", "_wiimatch.fits")) as m:
            assert m.meta.background.subtracted is True
            np.testing.assert_allclose(m.data, first[name])


def test_strun_class_path(tmp_path):
    _run_and_check(tmp_path, "jwst_wiimatch.step.WiiMatchStep")


@pytest.mark.skipif(not _alias_registered(),
                    reason="jwst-wiimatch is not installed (no stpipe.steps entry point)")
def test_strun_alias(tmp_path):
    _run_and_check(tmp_path, "wiimatch")


def test_strun_bad_input_fails_cleanly(tmp_path):
    models, _, _ = h.make_models(n=2, shape=(20, 24))
    h.write_asn(models, tmp_path)
    res = _strun(["jwst_wiimatch.step.WiiMatchStep", "asn.json", "--solver=QR"], tmp_path)
    assert res.returncode != 0
    assert "'solver' must be one of 'RLU', 'PINV'; got 'QR'" in res.stdout + res.stderr


def test_entry_point_function():
    from jwst_wiimatch.integration import get_steps
    from stpipe.utilities import import_class

    import importlib.util

    from stpipe import Step

    steps = get_steps()
    name, alias, is_pipeline = steps[0]
    assert alias == "wiimatch" and is_pipeline is False
    cls = import_class(name, subclassof=Step)
    assert cls.class_alias == "wiimatch"
    # the calwebb pipeline is offered exactly when jwst can be imported
    has_jwst = importlib.util.find_spec("jwst") is not None
    assert len(steps) == (2 if has_jwst else 1)
    if has_jwst:
        from stpipe import Pipeline

        name, alias, is_pipeline = steps[1]
        assert alias == "calwebb_image3_wiimatch" and is_pipeline is True
        assert issubclass(import_class(name, subclassof=Pipeline), Pipeline)


def test_help_gives_an_example_and_what_is_written(tmp_path):
    res = _strun(["wiimatch", "--help"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    text = " ".join(res.stdout.split())
    assert "strun wiimatch asn.json --degree=1 --subtract=true" in text
    assert "x_i2d.fits`` -> ``x_wiimatch.fits``" in text
    assert "Input files are never changed" in text
