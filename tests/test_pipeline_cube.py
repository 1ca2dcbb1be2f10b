"""The cube recipe of docs/pipeline.rst, on synthetic cubes, through the step.

Per-exposure IFU cubes built on one common grid (as ``cube_build`` run
exposure by exposure with the same grid parameters makes them) are saved
as ``*_s3d.fits`` files, listed in an association, and matched with the
command line of the recipe (``strun wiimatch`` = the step's class path
here, so that no installed entry point is needed). Needs no jwst.
"""

import os

import numpy as np

import oracle as O
import step_helpers as h
from test_step import NOISE, check_recovery


def test_cube_recipe_from_command_line(tmp_path, monkeypatch):
    from stdatamodels.jwst import datamodels
    from stpipe import Step

    models, truths, ref = h.make_cube_build_cubes(shape=(8, 24, 28), noise=NOISE, seed=5)
    asn = h.write_asn(models, str(tmp_path / "cubes"), name="cubes_asn.json")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "matched"
    out.mkdir()
    Step.from_cmdline(["jwst_wiimatch.step.WiiMatchStep", asn, "--degree=1,1,1",
                       "--subtract=true", f"--output_dir={out}"])

    matched = []
    for m in models:
        path = out / m.meta.filename.replace("_s3d.fits", "_wiimatch.fits")
        assert path.is_file(), sorted(os.listdir(out))
        matched.append(datamodels.open(str(path)))
    check_recovery(models, matched, truths, ref)
    for m_in, m in zip(models, matched):
        info = m.meta.background.polynomial_info[-1].instance
        assert info["degree"] == [1, 1, 1] and len(info["refpoint"]) == 3
        assert info["channel"] == "1"
        assert m.meta.background.subtracted is True
        # subtracted on every plane: data_in - data_out is the polynomial
        removed = np.asarray(m_in.data, float) - np.asarray(m.data, float)
        coords = h.frame_of_grid(m_in, info["refpoint"])
        coef = np.reshape(info["coefficients"], [d + 1 for d in info["degree"]])
        bkg = O.polyval_nd(coef, coords)
        good = np.isfinite(removed)
        assert good.sum() > 0.5 * removed.size
        # float32 data: allow its rounding (the NON_SCIENCE row holds 1e4)
        tol = 1e-5 + 2e-7 * np.abs(np.asarray(m_in.data, float)[good])
        assert np.all(np.abs(removed[good] - bkg[good]) <= tol)
