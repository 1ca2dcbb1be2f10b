"""FITS members read by box (``jwst_wiimatch.models.boxread``) give what reading them whole gives.

The standalone step reads each FITS member's SCI/ERR/DQ/WHT only within the
box of the grid its valid pixels can occupy. These tests compare, on the
same files, the reduced cutouts and the step's coefficients with those of
the whole-file path (``open_member``, forced by making ``_try_boxed`` decline),
and check that the reading pass allocates no whole-grid array for a small
footprint.
"""

import os

import numpy as np
import pytest

import step_helpers as h
from tracing import traced_peak

from jwst_wiimatch import matching
from jwst_wiimatch.models import boxread, frame as fr, pixels
from jwst_wiimatch.models.library import MemberError, open_member
from jwst_wiimatch.step import WiiMatchStep

SHAPE = (150, 170)


def _make(folder, n=4, seed=3, shape=SHAPE, absurd=False, with_dq=True, with_err=True):
    """Models on one grid whose footprints are small boxes at unaligned offsets."""
    models, truths, ref = h.make_models(n=n, shape=shape, seed=seed, with_dq=with_dq,
                                        with_err=with_err, rotation_deg=10.0)
    rng = np.random.default_rng(seed)
    ny, nx = shape
    for k, m in enumerate(models):
        y0, x0 = 7 + 11 * k, 13 + 9 * k
        keep = np.zeros(shape, bool)
        keep[y0:y0 + 70 + 3 * k, x0:x0 + 90 - 5 * k] = True
        data = np.array(m.data)
        data[~keep] = np.nan
        # sources for source masking
        for _ in range(3):
            y, x = y0 + rng.integers(5, 60), x0 + rng.integers(5, 80)
            data[y - 1:y + 2, x - 1:x + 2] += 50.0
        if absurd and k == 1:
            data[y0 + 20, x0 + 30] = 1e30  # unflagged fill value: left out as absurd
        m.data = data
        if with_err:
            err = np.array(m.err)
            err[~keep] = np.nan
            m.err = err
        m.wht = np.where(keep, 1.0, 0.0).astype(np.float32)
    asn = h.write_asn(models, str(folder))
    return asn, [os.path.join(str(folder), m.meta.filename) for m in models]


@pytest.fixture
def whole(monkeypatch):
    """Force the whole-file path (every member opened with stdatamodels)."""
    def force():
        monkeypatch.setattr(boxread, "_try_boxed", lambda path: None)
    return force


def _reduce(path, checker, binning, sources, robust, dqflags):
    with boxread.open_boxed(path, "member") as member:
        return matching._reduce_grid_model(member, 0, dqflags, binning, checker,
                                           equal=robust, sources=sources), \
            type(member).__name__


def _checker(path):
    with open_member(path) as m:
        return fr.GridChecker(m, "model 0")


FIELDS = ("origin", "npix", "absurd", "sources", "has_err", "err_note", "reason", "data",
          "sigma", "data_eq", "sigma_eq")


def _assert_same_reduction(a, b, dtypes=False):
    """The box read (``a``) and the whole read (``b``) reduced a model alike."""
    for key in FIELDS:
        va, vb = getattr(a, key), getattr(b, key)
        if isinstance(vb, np.ndarray):
            np.testing.assert_array_equal(np.asarray(va), vb, err_msg=key)
            if dtypes:  # the same type (the whole path keeps FITS' big-endian order)
                assert np.asarray(va).dtype == vb.dtype.newbyteorder("="), key
        else:
            assert va == vb, key


@pytest.mark.parametrize("binning", [1, 3])
@pytest.mark.parametrize("sources,robust", [(None, False), (5.0, False), (10.0, True)])
def test_box_reduction_equals_whole(tmp_path, whole, binning, sources, robust):
    _, paths = _make(tmp_path, absurd=True)
    dqflags = pixels.interpret_dqbits(pixels.DEFAULT_DQBITS)
    checker = _checker(paths[0])
    boxed = [_reduce(p, checker, binning, sources, robust, dqflags) for p in paths]
    assert all(kind == "BoxedMember" for _, kind in boxed)
    whole()
    full = [_reduce(p, checker, binning, sources, robust, dqflags) for p in paths]
    assert all(kind != "BoxedMember" for _, kind in full)
    assert boxed[1][0].absurd == 1
    if sources:
        assert any(r.sources for r, _ in boxed)
    for (a, _), (b, _) in zip(boxed, full):
        _assert_same_reduction(a, b, dtypes=True)


def test_box_err_edge_cases(tmp_path, whole):
    """ERR positive only outside the box, ERR all zero, no ERR, no valid pixel."""
    _, paths = _make(tmp_path, n=4)
    from stdatamodels.jwst import datamodels

    edits = {
        0: lambda m: setattr(m, "err", np.where(np.array(m.wht) > 0, 0.0,
                                                 0.05).astype(np.float32)),
        1: lambda m: setattr(m, "err", np.zeros(SHAPE, np.float32)),
        2: lambda m: setattr(m, "data", np.full(SHAPE, np.nan, np.float32)),
    }
    for k, edit in edits.items():
        with datamodels.open(paths[k]) as m:
            edit(m)
            m.save(paths[k])
    dqflags = pixels.interpret_dqbits(pixels.DEFAULT_DQBITS)
    checker = _checker(paths[3])
    boxed = [_reduce(p, checker, 1, None, False, dqflags)[0] for p in paths]
    whole()
    full = [_reduce(p, checker, 1, None, False, dqflags)[0] for p in paths]
    assert boxed[0].has_err and boxed[0].npix == 0  # ERR, but 0 where data are
    assert not boxed[1].has_err and "no positive" in boxed[1].err_note
    assert boxed[2].origin is None
    for a, b in zip(boxed, full):
        _assert_same_reduction(a, b)


def _coefficients(asn, **kw):
    from jwst_wiimatch.step import library_copies

    out = library_copies(WiiMatchStep.call(asn, **kw))
    return [np.asarray(m.meta.background.polynomial_info[-1].coefficients)
            for m in out], [dict(m.meta.wiimatch.instance) for m in out]


@pytest.mark.parametrize("kw", [{"binning": 1}, {"binning": 2, "robust": "clip"},
                                {"binning": 1, "source_nsigma": 0, "degree": 2}])
def test_step_box_read_bit_identical(tmp_path, whole, kw):
    asn, _ = _make(tmp_path, absurd=True)
    coef_box, meta_box = _coefficients(asn, **kw)
    whole()
    coef_whole, meta_whole = _coefficients(asn, **kw)
    for a, b in zip(coef_box, coef_whole):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(meta_box, meta_whole):
        assert a.get("npix") == b.get("npix")
        assert a.get("npix_absurd") == b.get("npix_absurd")


def test_box_read_without_dq_or_err(tmp_path, whole):
    asn, _ = _make(tmp_path, with_dq=False, with_err=False)
    coef_box, _ = _coefficients(asn, binning=1)
    whole()
    coef_whole, _ = _coefficients(asn, binning=1)
    for a, b in zip(coef_box, coef_whole):
        np.testing.assert_array_equal(a, b)


def test_members_not_read_by_box(tmp_path):
    """ASDF files and cubes are opened whole; bad files still name the member."""
    models, _, _ = h.make_models(n=1, shape=(20, 24))
    asdf_path = str(tmp_path / "m.asdf")
    models[0].save(asdf_path)
    with boxread.open_boxed(asdf_path, "member 0") as m:
        assert not isinstance(m, boxread.BoxedMember)
    cubes, _, _ = h.make_models(n=1, shape=(4, 20, 24), cube=True)
    cube_path = str(tmp_path / "c.fits")
    cubes[0].save(cube_path)
    with boxread.open_boxed(cube_path, "member 0") as m:
        assert not isinstance(m, boxread.BoxedMember)
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"SIMPLE  =" + b" " * 100)
    with pytest.raises(MemberError, match="association member 3"):
        with boxread.open_boxed(str(bad), "association member 3 (bad.fits)"):
            pass


def test_reading_pass_allocates_no_whole_grid_array(tmp_path, whole):
    """A member whose footprint is ~1 % of the grid: the box path's peak is a few
    rows, the whole path's several full-grid arrays."""
    from stdatamodels.jwst.datamodels import ImageModel

    shape = (1200, 1100)
    models, _, _ = h.make_models(n=1, shape=(40, 44))
    w = h.tan_wcs(shape, (150.0, 2.0))
    data = np.full(shape, np.nan, np.float32)
    data[500:620, 300:410] = np.random.default_rng(2).normal(1.0, 0.05, (120, 110))
    data[530, 333] = 1e30  # absurd: the cut samples every 3rd pixel of the grid
    m = ImageModel(data=data)
    m.err = np.where(np.isfinite(data), 0.05, np.nan).astype(np.float32)
    m.wht = np.isfinite(data).astype(np.float32)
    m.meta.wcs = w
    m.meta.filename = "big.fits"
    path = str(tmp_path / "big.fits")
    m.save(path)
    image_bytes = data.nbytes  # 5.3 MB
    dqflags = pixels.interpret_dqbits(pixels.DEFAULT_DQBITS)
    checker = _checker(path)

    def peak(kind):
        with boxread.open_boxed(path, "member") as member:
            assert (type(member).__name__ == "BoxedMember") == (kind == "box")
            red, size = traced_peak(lambda: matching._reduce_grid_model(
                member, 0, dqflags, 1, checker, sources=10.0))
            assert red.npix == 120 * 110 - 1 and red.absurd == 1
            return size, red

    box, rbox = peak("box")
    whole()
    full, rfull = peak("whole")
    _assert_same_reduction(rbox, rfull)
    # streaming: CHUNK_ROWS rows at a time (1.1 MB here), never a whole image
    assert box < 0.6 * image_bytes, (box, image_bytes)
    assert full > 2 * image_bytes, (full, image_bytes)


def test_binning1_keeps_no_equal_weight_sigmas():
    """With ERR, a binning=1 cutout keeps data and sigma only (the equal-weight
    sigmas are derived when another model lacks ERR, with the same values)."""
    rng = np.random.default_rng(4)
    data = rng.normal(1.0, 0.1, (30, 40)).astype(np.float32)
    sigma = np.full(data.shape, 0.1, np.float32)
    mask = rng.random(data.shape) > 0.3
    red = matching._Reduced(name="m")
    matching._reduce_box(data, sigma, mask, 0.0, ((2, 25), (3, 37)), 1, red)
    assert red.sigma_eq is None and red.sigma is not None
    np.testing.assert_array_equal(matching._eq_sigma(red),
                                  np.where(mask[2:25, 3:37], 1.0, 0.0))
    assert matching._eq_sigma(red).dtype == np.float64
    bare = matching._Reduced(name="m")
    matching._reduce_box(data, None, mask, 0.0, ((2, 25), (3, 37)), 1, bare)
    np.testing.assert_array_equal(bare.sigma_eq, matching._eq_sigma(red))
