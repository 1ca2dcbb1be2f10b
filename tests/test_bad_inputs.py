"""Bad inputs, table-driven: each one stops with a clear error or says what it did.

Every row of ``CASES`` is a `Case`:

``id``
    the test id;
``build``
    ``build(tmp_path)``: builds the bad input under ``tmp_path`` and returns
    a function of no arguments that calls one entry point on it (use the
    ``via_*`` helpers: ``WiiMatchStep.call``, a ``strun``-like
    ``Step.from_cmdline``, ``WiiMatchSkyStep.call``, ``match_models``), and
    may check its result;
``expect``
    an exception class (the run must raise it), `Warns` (the run must emit
    that Python warning) or `Logs` (the run must log a record of that level
    on the ``jwst_wiimatch`` logger, and succeed);
``words``
    strings that the message must contain (case-insensitive), e.g. the file
    name and the array name;
``needs``
    optional modules (e.g. ``'jwst'``) without which the row is skipped;
``marks``
    pytest marks (e.g. ``pytest.mark.xfail``) for the row.

Whatever a row does, the files under ``tmp_path`` when ``build`` returns
are unchanged after the run (compared by hash). To add a case, write a
``build`` function and append a row; images are small (40 x 40) so that the
table stays fast.
"""

import hashlib
import importlib.util
import json
import logging
import os
from typing import Any, NamedTuple

import numpy as np
import pytest
from astropy.io import fits

import pipeline_helpers as ph
import step_helpers as h

SHAPE = (40, 40)
CAL_SHAPE = (40, 40)


class Warns(NamedTuple):
    """The run emits a Python warning of class ``category``."""

    category: type


class Logs(NamedTuple):
    """The run logs a record of ``level`` (e.g. ``'WARNING'``) on the package logger."""

    level: str


class Case(NamedTuple):
    id: str
    build: Any
    expect: Any
    words: tuple
    needs: tuple = ()
    marks: tuple = ()


# ---------------------------------------------------------------------------
# builders of inputs
# ---------------------------------------------------------------------------
def i2d_models(n=3, cube=False):
    """Small resampled models on one grid (exp1_i2d.fits, ...), in memory."""
    shape = (4, *SHAPE) if cube else SHAPE
    models, _, _ = h.make_models(n=n, shape=shape, cube=cube, seed=3,
                                 degree=[1, 1, 0] if cube else 1)
    return models


def cal_models(n=3):
    """Small calibrated exposures, each on its own detector grid, in memory."""
    return [ph.make_cal(k, shape=CAL_SHAPE) for k in range(n)]


def write(models, folder, name="asn.json"):
    """Save models into ``folder`` with an association; return its path."""
    return h.write_asn(models, str(folder), name=name)


def member(folder, k=1):
    """Path of the (k+1)-th i2d member written by `write`."""
    return os.path.join(str(folder), f"exp{k + 1}_i2d.fits")


def cal_member(folder, k=1):
    """Path of the (k+1)-th cal member written by `write`."""
    return os.path.join(str(folder), f"jw01234001001_0210{k + 1}_00001_nrca1_cal.fits")


def far_refpoint(models):
    """[ra, dec] on the far side of the sky from the first model's centre."""
    world = models[0].meta.wcs(*[(n - 1) / 2.0 for n in models[0].data.shape[::-1]])
    return [(float(world[0]) + 180.0) % 360.0, -float(world[1])]


# ways to break a file
def not_fits(path):
    with open(path, "w") as fh:
        fh.write("this is not a FITS file\n" * 20)


def truncate(path, keep=0.5):
    """Keep the first ``keep`` of the file (cut off the 2880-byte FITS block grid)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    cut = int(len(raw) * keep)
    with open(path, "wb") as fh:
        fh.write(raw[: cut - 1000 if cut % 2880 == 0 else cut])


def truncate_end(path):
    truncate(path, 0.95)


def empty(path):
    open(path, "wb").close()


def drop_extension(path, name):
    """Remove a FITS extension, leaving the ASDF metadata that refers to it."""
    with fits.open(path) as hdul:
        del hdul[name]
        hdul.writeto(path + ".tmp")
    os.replace(path + ".tmp", path)


def drop_err(path):
    drop_extension(path, "ERR")


def plain_fits(path):
    """A FITS image that is no JWST datamodel (no SCI, no ASDF extension)."""
    fits.HDUList([fits.PrimaryHDU(np.ones(SHAPE, np.float32))]).writeto(path, overwrite=True)


def corrupt_asdf(path):
    """Break the YAML tree of an ASDF file, or of the ASDF extension of a FITS file,
    keeping the file's size."""
    with open(path, "rb") as fh:
        raw = fh.read()
    k = raw.index(b"meta:", raw.index(b"%YAML"))
    with open(path, "wb") as fh:
        fh.write(raw[:k] + b"m: [{" + raw[k + 5:])


# ---------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------
def via_call(data, **kw):
    from jwst_wiimatch.step import WiiMatchStep

    return WiiMatchStep.call(data, **kw)


def via_strun(tmp_path, asn, *args):
    """``strun wiimatch asn ...``, outputs into tmp_path/out."""
    from stpipe import Step

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return Step.from_cmdline(["jwst_wiimatch.step.WiiMatchStep", str(asn),
                              f"--output_dir={out}", *args])


def via_sky(data, **kw):
    from jwst_wiimatch.pipeline import WiiMatchSkyStep

    return WiiMatchSkyStep.call(data, **kw)


def via_match(models, **kw):
    from jwst_wiimatch.matching import match_models
    from jwst_wiimatch.models import WiiMatchLibrary

    return match_models(WiiMatchLibrary(list(models)), **kw)


# ---------------------------------------------------------------------------
# the rows: build(tmp_path) -> go()
# ---------------------------------------------------------------------------
def _bad_array(models, k, attr, shape):
    arr = np.zeros(shape, dtype=np.asarray(getattr(models[k], attr)).dtype)
    setattr(models[k], attr, arr)
    return models


# arrays of the wrong shape
def dq_shape_strun(tmp_path):
    asn = write(_bad_array(i2d_models(), 1, "dq", (30, 30)), tmp_path)
    return lambda: via_strun(tmp_path, asn)


def err_shape_call(tmp_path):
    models = _bad_array(i2d_models(), 1, "err", (40, 39))
    return lambda: via_call(models)


def wht_shape_match(tmp_path):
    models = _bad_array(i2d_models(), 2, "wht", (20, 40))
    return lambda: via_match(models)


def weightmap_shape_cube(tmp_path):
    models = _bad_array(i2d_models(cube=True), 1, "weightmap", (4, 40, 20))
    return lambda: via_match(models, degree=[1, 1, 0])


def dq_shape_sky(tmp_path):
    models = _bad_array(cal_models(), 1, "dq", (30, 30))
    return lambda: via_sky(models)


def dq_shape_unused(tmp_path):
    """With dqbits=None the DQ array is not used, so its shape does not matter."""
    models = _bad_array(i2d_models(), 1, "dq", (30, 30))

    def go():
        outcomes, _ = via_match(models, dqbits=None)
        assert all(o.matched for o in outcomes)
        logging.getLogger("jwst_wiimatch").info("wiimatch: matched with DQ ignored")
    return go


# ERR that gives no weights: said, naming the model
def no_err_extension(tmp_path):
    models = i2d_models()
    models[1].err = None
    asn = write(models, tmp_path)
    with fits.open(member(tmp_path)) as hdul:
        assert "ERR" not in hdul

    def go():
        with via_call(asn) as result:
            assert len(result) == 3
    return go


def err_all_zero(tmp_path):
    models = i2d_models()
    models[2].err = np.zeros(SHAPE, np.float32)

    def go():
        outcomes, _ = via_match(models)
        assert all(o.matched for o in outcomes)
    return go


# association members that cannot be read
def _broken_member(breaker, entry="call", k=1):
    def build(tmp_path):
        asn = write(i2d_models(), tmp_path)
        breaker(member(tmp_path, k))
        if entry == "strun":
            return lambda: via_strun(tmp_path, asn)
        if entry == "list":
            return lambda: via_call([member(tmp_path, j) for j in range(3)])
        if entry == "disk":
            return lambda: via_call(asn, in_memory=False)
        return lambda: via_call(asn)
    return build


def member_corrupt_asdf(tmp_path):
    paths = []
    for m in i2d_models():
        path = str(tmp_path / m.meta.filename.replace(".fits", ".asdf"))
        m.save(path)
        paths.append(os.path.basename(path))
    corrupt_asdf(str(tmp_path / paths[1]))
    asn = tmp_path / "asn.json"
    asn.write_text(json.dumps({"products": [{"name": "t", "members": [
        {"expname": p, "exptype": "science"} for p in paths]}]}))
    return lambda: via_call(str(asn))


def _library_member_not_fits(make_models, member_path, via):
    """A jwst ModelLibrary whose member 2 stops being FITS after the library is made."""
    def build(tmp_path):
        from jwst.datamodels import ModelLibrary

        asn = write(make_models(), tmp_path)
        lib = ModelLibrary(asn, on_disk=False)  # reads the group ids while the files are good
        not_fits(member_path(tmp_path, 2))
        return lambda: via(lib)
    return build


def sky_member_truncated(tmp_path):
    asn = write(cal_models(), tmp_path)
    truncate(cal_member(tmp_path, 1), 0.95)
    return lambda: via_sky(asn)


def sky_member_missing(tmp_path):
    asn = write(cal_models(), tmp_path)
    os.remove(cal_member(tmp_path, 0))
    return lambda: via_sky(asn)


# a refpoint on the far side of the sky
def refpoint_far_call(tmp_path):
    models = i2d_models()
    return lambda: via_call(models, refpoint=far_refpoint(models))


def refpoint_far_strun(tmp_path):
    models = i2d_models()
    ref = far_refpoint(models)
    asn = write(models, tmp_path)
    return lambda: via_strun(tmp_path, asn, f"--refpoint={ref[0]},{ref[1]}")


def refpoint_far_cube(tmp_path):
    models = i2d_models(cube=True)
    return lambda: via_match(models, refpoint=far_refpoint(models), degree=[1, 1, 0])


def refpoint_far_sky(tmp_path):
    models = cal_models()
    return lambda: via_sky(models, refpoint=far_refpoint(models))


def exposure_far_from_default_refpoint(tmp_path):
    models = cal_models()
    models[2].meta.wcs = h.tan_wcs(CAL_SHAPE, far_refpoint(models), ph.PIXSCALE,
                                   sky_axes_names=("lon", "lat"), with_shape=True)

    def go():
        result = via_sky(models)
        status = list(result.map_function(lambda m, k: m.meta.cal_step.wiimatch,
                                          modify=False))
        assert status == ["COMPLETE", "COMPLETE", "SKIPPED"]
    return go


# the skymatch slot given what it cannot take
def sky_no_wcs(tmp_path):
    models = cal_models()
    models[1].meta.wcs = None
    return lambda: via_sky(models)


def sky_no_wcs_asn(tmp_path):
    models = cal_models()
    models[0].meta.wcs = None
    asn = write(models, tmp_path)
    return lambda: via_sky(asn)


def sky_resampled_i2d(tmp_path):
    asn = write(i2d_models(), tmp_path)
    return lambda: via_sky(asn)


def sky_one_resampled(tmp_path):
    models = cal_models()
    models[2].meta.cal_step.resample = "COMPLETE"
    return lambda: via_sky(models)


NAMED = "exp2_i2d.fits"
CAL2 = "jw01234001001_02102_00001_nrca1_cal.fits"

def _asn_over(tmp_path, paths):
    asn = tmp_path / "asn_files.json"
    asn.write_text(json.dumps({"products": [{"name": "t", "members": [
        {"expname": str(p), "exptype": "science"} for p in paths]}]}))
    return asn


def _expect_nothing_written(go, folder):
    def run():
        try:
            return go()
        finally:
            assert not [p for p in folder.iterdir() if p.is_file()]
    return run


def outputs_same_name(tmp_path):
    """Members a/same_i2d.fits and b/same_i2d.fits would both write same_wiimatch.fits."""
    paths = []
    for k, m in enumerate(i2d_models()):
        folder = tmp_path / ("a" if k == 0 else "b")
        folder.mkdir(exist_ok=True)
        m.meta.filename = "same_i2d.fits" if k < 2 else "other_i2d.fits"
        m.save(str(folder / m.meta.filename))
        paths.append(folder / m.meta.filename)
    asn = _asn_over(tmp_path, paths)
    (tmp_path / "out").mkdir()
    return _expect_nothing_written(lambda: via_strun(tmp_path, asn), tmp_path / "out")


def output_onto_input(tmp_path):
    """Matching x_wiimatch.fits files again in their own folder would overwrite them."""
    paths = []
    for m in i2d_models():
        m.meta.filename = m.meta.filename.replace("_i2d", "_wiimatch")
        m.save(str(tmp_path / m.meta.filename))
        paths.append(tmp_path / m.meta.filename)
    asn = _asn_over(tmp_path, paths)
    return lambda: via_call(str(asn), save_results=True, output_dir=str(tmp_path))


def output_is_folder(tmp_path):
    asn = h.write_asn(i2d_models(), tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "exp2_wiimatch.fits").mkdir()
    return _expect_nothing_written(lambda: via_strun(tmp_path, asn), tmp_path / "out")


def empty_grid(tmp_path):
    """Models whose data have an axis of length 0."""
    from stdatamodels.jwst.datamodels import ImageModel

    models = []
    for m in i2d_models():
        e = ImageModel(data=np.zeros((0, SHAPE[1]), np.float32))
        e.meta.wcs, e.meta.filename = m.meta.wcs, m.meta.filename
        models.append(e)
    return lambda: via_call(models)


def call_on_array(tmp_path):
    return lambda: via_call(np.zeros((3, 10, 10)))


CASES = [
    # arrays whose shape differs from the data's
    Case("dq-shape-strun", dq_shape_strun, ValueError,
         (NAMED, "DQ array", "(30, 30)", "(40, 40)")),
    Case("err-shape-call", err_shape_call, ValueError,
         ("model 1", NAMED, "ERR array", "(40, 39)", "(40, 40)")),
    Case("wht-shape-match_models", wht_shape_match, ValueError,
         ("model 2", "exp3_i2d.fits", "WHT", "(20, 40)")),
    Case("weightmap-shape-cube", weightmap_shape_cube, ValueError,
         ("model 1", "WEIGHTMAP", "(4, 40, 20)", "(4, 40, 40)")),
    Case("dq-shape-sky", dq_shape_sky, ValueError, ("model 1", CAL2, "DQ", "(30, 30)"),
         needs=("jwst",)),
    Case("dq-shape-unused-with-dqbits-none", dq_shape_unused, Logs("INFO"),
         ("matched with DQ ignored",)),
    # an ERR that gives no weights
    Case("no-err-extension", no_err_extension, Logs("WARNING"),
         (NAMED, "has no ERR array", "equal weight")),
    Case("err-all-zero", err_all_zero, Logs("WARNING"),
         ("exp3_i2d.fits", "no positive value", "equal weight")),
    # association members that cannot be read
    Case("member-not-fits", _broken_member(not_fits), ValueError,
         ("member 1", NAMED, "neither a FITS nor an ASDF")),
    Case("member-not-fits-first", _broken_member(not_fits, k=0), ValueError,
         ("member 0", "exp1_i2d.fits", "neither a FITS nor an ASDF")),
    Case("member-truncated-strun", _broken_member(truncate_end, "strun"), ValueError,
         ("member 1", NAMED, "truncated")),
    Case("member-truncated-in-data-on-disk", _broken_member(truncate, "disk"), ValueError,
         ("member 1", NAMED, "truncated")),
    Case("member-corrupt-asdf-extension", _broken_member(corrupt_asdf, "strun"), ValueError,
         ("member 1", NAMED, "FITS file is damaged", "ERROR loading embedded ASDF")),
    Case("member-empty", _broken_member(empty), ValueError, ("member 1", NAMED, "empty")),
    Case("member-err-extension-removed", _broken_member(drop_err, "strun"), ValueError,
         ("member 1", NAMED, "ERR extension")),
    Case("member-plain-fits", _broken_member(plain_fits), ValueError,
         ("member 1", NAMED, "no data (SCI) array")),
    Case("member-corrupt-asdf", member_corrupt_asdf, ValueError,
         ("member 1", "exp2_i2d.asdf", "ASDF file is damaged")),
    Case("list-member-not-fits", _broken_member(not_fits, "list"), ValueError,
         ("input 1", NAMED, "FITS")),
    Case("list-member-err-extension-removed", _broken_member(drop_err, "list"), ValueError,
         ("input 1", NAMED, "ERR")),
    Case("library-member-not-fits", _library_member_not_fits(i2d_models, member, via_call),
         ValueError,
         ("member 2", "exp3_i2d.fits", "neither a FITS"), needs=("jwst",)),
    Case("sky-member-truncated", sky_member_truncated, ValueError,
         ("member 1", CAL2, "truncated"), needs=("jwst",)),
    Case("sky-member-missing", sky_member_missing, ValueError,
         ("member 0", "jw01234001001_02101_00001_nrca1_cal.fits", "does not exist"),
         needs=("jwst",)),
    Case("sky-member-not-fits-in-library",
         _library_member_not_fits(cal_models, cal_member, via_sky), ValueError,
         ("member 2", "jw01234001001_02103_00001_nrca1_cal.fits", "neither a FITS"),
         needs=("jwst",)),
    # a refpoint on the far side of the sky
    Case("refpoint-far-call", refpoint_far_call, ValueError,
         ("refpoint", "degrees from", "model 0", "exp1_i2d.fits")),
    Case("refpoint-far-strun", refpoint_far_strun, ValueError,
         ("refpoint", "degrees from", "exp1_i2d.fits")),
    Case("refpoint-far-cube", refpoint_far_cube, ValueError,
         ("refpoint", "degrees from", "model 0")),
    Case("refpoint-far-sky", refpoint_far_sky, ValueError,
         ("refpoint", "degrees from", "model 0"), needs=("jwst",)),
    Case("exposure-far-from-default-refpoint", exposure_far_from_default_refpoint,
         Logs("WARNING"), ("model 2", "SKIPPED", "too far from the default refpoint"),
         needs=("jwst",)),
    # the skymatch slot given what it cannot take
    Case("sky-no-wcs", sky_no_wcs, ValueError, ("model 1", CAL2, "no meta.wcs", "assign_wcs"),
         needs=("jwst",)),
    Case("sky-no-wcs-asn", sky_no_wcs_asn, ValueError,
         ("model 0", "jw01234001001_02101_00001_nrca1_cal.fits", "assign_wcs"),
         needs=("jwst",)),
    Case("sky-resampled-i2d", sky_resampled_i2d, ValueError,
         ("exp1_i2d.fits", "already resampled", "WiiMatchStep"), needs=("jwst",)),
    Case("sky-one-resampled", sky_one_resampled, ValueError,
         ("model 2", "already resampled", "cal_step.resample", "WiiMatchStep"),
         needs=("jwst",)),
    # outputs that would be lost or overwritten: refused before anything is written
    Case("outputs-same-name-two-folders", outputs_same_name, ValueError,
         ("outputs 0", "and 1", "same_wiimatch.fits", "would both be written")),
    Case("output-onto-its-input", output_onto_input, ValueError,
         ("exp1_wiimatch.fits", "is an input file", "output_dir")),
    Case("output-path-is-a-folder", output_is_folder, ValueError,
         ("exp2_wiimatch.fits", "existing folder")),
    Case("empty-grid", empty_grid, ValueError, ("model 0", "exp1_i2d.fits", "(0, 40)",
                                                "length 0")),
    Case("call-on-an-array", call_on_array, TypeError,
         ("ndarray", "give an association")),
]


# ---------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------
def _hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[path] = hashlib.sha256(fh.read()).hexdigest()
    return out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _params():
    out = []
    for case in CASES:
        marks = list(case.marks)
        missing = [m for m in case.needs if importlib.util.find_spec(m) is None]
        if missing:
            marks.append(pytest.mark.skip(reason=f"needs the optional {', '.join(missing)}"))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def _check_words(message, words):
    low = message.lower()
    missing = [w for w in words if w.lower() not in low]
    assert not missing, f"message lacks {missing}: {message}"


@pytest.mark.parametrize("case", _params())
def test_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    go = case.build(tmp_path)
    before = _hashes(tmp_path)
    handler = _Records()
    logger = logging.getLogger("jwst_wiimatch")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        if isinstance(case.expect, type) and issubclass(case.expect, BaseException):
            with pytest.raises(case.expect) as info:
                go()
            _check_words(str(info.value), case.words)
        elif isinstance(case.expect, Warns):
            with pytest.warns(case.expect.category) as record:
                go()
            texts = [str(w.message) for w in record
                     if issubclass(w.category, case.expect.category)]
            assert any(all(x.lower() in t.lower() for x in case.words) for t in texts), \
                f"no warning holds {case.words}: {texts}"
        elif isinstance(case.expect, Logs):
            go()
            level = logging.getLevelName(case.expect.level)
            texts = [r.getMessage() for r in handler.records if r.levelno == level]
            assert any(all(x.lower() in t.lower() for x in case.words) for t in texts), \
                f"no {case.expect.level} record holds {case.words}: {texts}"
        else:  # pragma: no cover - a malformed row
            raise TypeError(f"unknown expectation {case.expect!r}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    # the input files are never modified
    after = _hashes(tmp_path)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"input files changed or removed: {changed}"


def test_every_case_id_is_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
