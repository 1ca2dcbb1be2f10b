"""Tests of the wiimatch-demo command and its example data."""

import json
import os

import numpy as np

from jwst_wiimatch import demo
from jwst_wiimatch.core import polyval_nd


def test_demo_data_properties(tmp_path):
    from stdatamodels.jwst import datamodels

    info = demo.make_demo_data(tmp_path, n=6, size=120, degree=1, seed=3)
    with open(info["asn"]) as fh:
        asn = json.load(fh)
    members = asn["products"][0]["members"]
    assert [m["expname"] for m in members] == info["files"] and len(members) == 6
    foots = []
    for f, coef in zip(info["files"], info["truths"]):
        with datamodels.open(tmp_path / f) as m:
            assert m.meta.wcs is not None and m.data.shape == (120, 120)
            foot = np.isfinite(m.data)
            foots.append(foot)
            assert 0.2 < foot.mean() < 0.5          # NaN outside the footprint
            assert np.all(np.isnan(m.err[~foot]))
            assert np.count_nonzero(m.dq & 1) >= 12  # flagged cosmic rays
            assert np.count_nonzero(m.dq & 512) > 0  # NON_SCIENCE pixels
            # noise consistent with ERR on clean pixels
            xi, eta = demo._frame(m.meta.wcs, m.data.shape, info["refpoint"])
            model = info["scene"] + polyval_nd(coef, xi, eta)
            good = foot & (m.dq == 0)
            z = (m.data - model)[good] / m.err[good]
            assert abs(np.std(z) - 1) < 0.05 and abs(np.mean(z)) < 0.05
    # dithered: footprints differ but overlap
    assert not np.array_equal(foots[0], foots[1])
    assert np.count_nonzero(foots[0] & foots[1]) > 500


def test_demo_main_recovers_backgrounds(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert demo.main([str(folder), "--n", "6", "--size", "120", "--seed", "5",
                      "--subtract"]) == 0
    text = capsys.readouterr().out
    assert "injected" in text and "recovered" in text
    outputs = sorted(p for p in os.listdir(folder) if p.endswith("_wiimatch.fits"))
    assert len(outputs) == 6
    # recompute the comparison against the injected truths
    info = demo.make_demo_data(tmp_path / "again", n=6, size=120, seed=5)
    rows = demo.compare(info, folder)
    spread = np.ptp([r[1] for r in rows])
    assert spread > 0.02  # the injected relative levels differ
    for f, injected, recovered, rms_diff, status in rows:
        assert status == "COMPLETE"
        assert abs(injected - recovered) < 2e-3
        assert rms_diff < 2e-3


def test_demo_engine_only(capsys):
    assert demo.main(["--engine-only", "--nimages", "3"]) == 0
    assert "recovered" in capsys.readouterr().out
