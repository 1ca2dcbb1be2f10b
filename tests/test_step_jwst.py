"""WiiMatchStep with jwst's containers and jwst's skymatch (skipped without jwst)."""

import os
import sys

import numpy as np
import pytest

jwst_datamodels = pytest.importorskip("jwst.datamodels")

sys.path.insert(0, os.path.dirname(__file__))
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
    out = WiiMatchStep.call(sky, degree=1, subtract=True)
    shifted = [t.copy() for t in truths]
    for t, lev in zip(shifted, levels):
        t.flat[0] -= lev
    # skymatch already removed the constant offsets: what is left is smaller
    check_recovery(models, out, shifted, ref, tol=TOL / 2, min_spread=6)
    for m, lev in zip(out, levels):
        assert m.meta.background.level == lev
        assert m.meta.background.subtracted is True
