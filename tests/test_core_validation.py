"""Bad input is refused with ValueError/TypeError naming the argument;
non-finite pixels are left out with one warning counting them per image;
nothing is written to disk."""
import os
import re
import tempfile
import warnings

import numpy as np
import pytest

import oracle as O
from jwst_wiimatch import core, lsq_optimizer, utils
from jwst_wiimatch.match import match_lsq

ERR = (ValueError, TypeError)
SHAPE = (5, 6)


def good(n=3, seed=0):
    rng = np.random.default_rng(seed)
    images = [rng.normal(size=SHAPE) for _ in range(n)]
    masks = [np.ones(SHAPE, dtype=bool) for _ in range(n)]
    sigmas = [np.ones(SHAPE) for _ in range(n)]
    return images, masks, sigmas


def via_match_lsq(images, masks=None, sigmas=None, **kw):
    return match_lsq(images, masks, sigmas, **kw)


def via_match_backgrounds(images, masks=None, sigmas=None, **kw):
    return core.match_backgrounds(images, masks, sigmas, **kw)


def via_build(images, masks=None, sigmas=None, degree=0, **kw):
    kw.pop("solver", None)
    return lsq_optimizer.build_lsq_eqs(images, masks, sigmas, degree, **kw)


ENTRY = [via_match_lsq, via_match_backgrounds]
ENTRY_ALL = ENTRY + [via_build]


def _bad_i2w_count(x, y):
    return (x + 1.0,)


def _bad_i2w_count3(x, y):
    return (x, y, x + y)


def _bad_i2w_shape(x, y):
    # one element short, for the center (1-element arrays) and the pixels alike
    return (np.asarray(x)[:-1] + 0.0, np.asarray(y)[:-1] + 0.0)


def _i2w(x, y):
    return (np.asarray(x) * 2.0, np.asarray(y) * 3.0)


def bad_inputs():
    """Rows: (name, regex or tuple of regexes the message must all contain,
    args, kw, entry points)."""
    images, masks, sigmas = good()
    cases = []

    def add(name, match, args, kw=None, entries=ENTRY_ALL):
        for f in entries:
            cases.append(pytest.param(f, args, kw or {}, match,
                                      id=f"{name}-{f.__name__[4:]}"))

    add("images-shapes", "images",
        ([images[0], images[1][:, :5], images[2]],))
    add("images-ndim", "images",
        ([images[0], images[1][None], images[2]],))
    add("images-empty", "images", ([],), entries=ENTRY)
    add("masks-shape", "masks",
        (images, [masks[0], masks[1][:4], masks[2]], sigmas))
    add("masks-shape-nosig", "masks",
        (images, [masks[0], masks[1], masks[2].T]))
    add("masks-count", "masks", (images, masks[:2], sigmas))
    add("masks-count-more", "masks", (images, masks + masks[:1]))
    add("sigmas-shape", "sigmas",
        (images, masks, [sigmas[0], sigmas[1][:, :2], sigmas[2]]))
    add("sigmas-count", "sigmas", (images, None, sigmas[:2]))
    add("sigmas-count-more", "sigmas", (images, masks, sigmas * 2))
    add("degree-length", "degree", (images,), dict(degree=(1, 1, 1)))
    add("degree-length1", "degree", (images,), dict(degree=(1,)))
    add("degree-negative", "degree", (images,), dict(degree=-1))
    add("degree-negative-axis", "degree", (images,), dict(degree=(1, -2)))
    add("solver", "solver", (images,), dict(solver="QR"), entries=ENTRY)
    add("solver-none", "solver", (images,), dict(solver="cholesky"),
        entries=ENTRY)
    add("center-length", "center", (images,), dict(center=(1.0, 2.0, 3.0)))
    add("center_cs-invalid", "center_cs", (images,),
        dict(center=(1.0, 2.0), center_cs="sky"))
    add("center_cs-invalid-i2w", "center_cs", (images,),
        dict(center=(1.0, 2.0), center_cs="pixel", image2world=_i2w))
    add("center_cs-world-no-i2w", "center_cs|image2world", (images,),
        dict(center=(1.0, 2.0), center_cs="world"))
    add("i2w-count", "image2world", (images,),
        dict(image2world=_bad_i2w_count))
    add("i2w-count3", "image2world", (images,),
        dict(image2world=_bad_i2w_count3, center=(1.0, 1.0)))
    add("i2w-shape", "image2world", (images,),
        dict(image2world=_bad_i2w_shape, degree=1))
    # issue 10: absurd degrees are refused before any work, naming the degree,
    # the unknowns and the pixels or the memory, and what to do
    add("degree-more-terms-than-pixels",
        ("'degree'", r"\(10, 10\)", "363 unknowns", "90 pixels", "Lower the degree"),
        (images,), dict(degree=10))
    add("degree-1e9", ("'degree'", "1000000000", "unknowns", "pixels"),
        (images,), dict(degree=(1e9, 1e9)))
    add("degree-1e9-one-axis", ("'degree'", "unknowns"),
        (images,), dict(degree=(1, 10**9)))
    add("degree-float-scalar", "'degree'", (images,), dict(degree=1e9))
    add("degree-fraction", "'degree'", (images,), dict(degree=(1.5, 1)))
    add("degree-nan", "'degree'", (images,), dict(degree=(float("nan"), 1)))
    big = [np.broadcast_to(0.0, (1000, 1000))] * 2  # no memory: views of one number
    add("degree-memory", ("'degree'", r"\(400, 400\)", "321602 unknowns", "GiB",
                          "memory", "Lower the degree"),
        (big,), dict(degree=400))
    # issue 10: an axis of length 0
    add("images-zero-length-axis", ("images", r"\(0, 6\)", "length 0"),
        ([np.zeros((0, 6)), np.zeros((0, 6))],))
    add("images-zero-length-axis-1d", ("images", "length 0"),
        ([np.zeros(0), np.zeros(0)],))
    add("cutouts-zero-length-grid", ("cutouts", "length 0"),
        ([np.zeros((0, 3)), np.zeros((0, 3))],), dict(origins=[(0, 0), (0, 0)]),
        entries=[via_match_backgrounds])
    # issue 10: sigmas whose squares no common scale brings into float64
    wide = np.ones(SHAPE)
    wide[0, 0] = 1e-310
    add("sigmas-range", ("'sigmas'", r"1e-310 \(in sigmas\[0\]\)", "float64",
                         "Check the sigmas"),
        (images, None, [wide, sigmas[1], sigmas[2]]))
    return cases


@pytest.mark.parametrize("entry, args, kw, match", bad_inputs())
def test_bad_input_names_argument(entry, args, kw, match):
    words = (match,) if isinstance(match, str) else match
    with pytest.raises(ERR) as err:
        entry(*args, **kw)
    for w in words:
        assert re.search(w, str(err.value)), (w, str(err.value))


def test_check_size_memory_estimate():
    """The memory refusal uses the size of the normal equations: a machine
    of 1 MB refuses 2 images x 16 terms only if (32 unknowns)**2 copies
    exceed it; a 1 kB one does."""
    core.inputs.check_size((3, 3), [1000, 1000], memory=1 << 20)
    # images without any pixel (empty cutouts) are warned about, not refused
    core.inputs.check_size((5, 5), [0, 0], memory=1 << 20)
    with pytest.raises(ValueError, match="'degree'.*32 unknowns.*memory"):
        core.inputs.check_size((3, 3), [1000, 1000], memory=1000)


# ------------------------------------------------------------ warnings
def _column_pair():
    """Two images that share one column of pixels (x = 3): their x slopes are free."""
    a = np.zeros((4, 6))
    m0 = np.zeros((4, 6), dtype=bool)
    m0[:, :4] = True
    m1 = np.zeros((4, 6), dtype=bool)
    m1[:, 3:] = True
    return [a, a + 3.0], [m0, m1]


def _far_center_problem():
    rng = np.random.default_rng(0)
    y, x = np.indices((30, 40), dtype=float)
    return [rng.normal(size=(30, 40)) + 0.01 * x * k for k in range(3)]


def bad_input_warnings():
    """Rows: (name, args, kw, regexes one MatchWarning must all contain,
    regex no MatchWarning may match). Inputs the engine accepts, but whose
    result depends on something the user must hear about (issue 10:
    nothing silently wrong)."""
    images, masks, sigmas = good()
    zeros = np.zeros(SHAPE)
    nans = np.full(SHAPE, np.nan)

    def overlap_blamed(k):  # the old message, which blamed the overlaps
        return rf"image\(s\) ([0-9]+, )*{k}\b.*in common with any other image"

    rows = [
        ("sigmas-all-zero", (images, None, [zeros, sigmas[1], sigmas[2]]), {},
         (r"sigmas\[0\]", "zero, negative or non-finite", "every pixel"),
         overlap_blamed(0)),
        ("sigmas-all-nan-masked", (images, masks, [sigmas[0], nans, sigmas[2]]), {},
         (r"sigmas\[1\]", "non-finite", "mask marks valid"), overlap_blamed(1)),
        ("sigmas-negative", (images, None, [sigmas[0], sigmas[1], -sigmas[2]]), {},
         (r"sigmas\[2\]", "negative"), overlap_blamed(2)),
        ("sigmas-scalar-zero", (images, None, [1.0, 0.0, 1.0]), {},
         (r"sigmas\[1\] = 0.0", "positive finite"), overlap_blamed(1)),
        ("sigmas-scalar-inf", (images, None, [np.inf, 1.0, 1.0]), {},
         (r"sigmas\[0\] = inf", "positive finite"), overlap_blamed(0)),
        ("int64-beyond-2**53-with-float",
         ([np.full(SHAPE, 2**62 + 1, dtype=np.int64), images[1]],), {},
         (r"images\[0\]", r"2\*\*53", "rounded by up to 512"), r"images\[1\]"),
        ("uint64-spread-beyond-2**53",
         ([np.array([[1, 2**63 + 5]] * 3, dtype=np.uint64),
           np.array([[3, 2**63 + 7]] * 3, dtype=np.uint64)],), {},
         (r"images\[0\]", r"images\[1\]", r"2\*\*53", "rounded by up to"), None),
        ("free-terms-set-to-zero", _column_pair(), dict(degree=(1, 0)),
         ("no information", "set to 0", "image 0: x; image 1: x"), "minimum-norm"),
        ("far-center", (_far_center_problem(),), dict(degree=2, center=(1e6, -1e6)),
         ("float64", "center", "differ from the fit by up to", "range of",
          "center=None"), None),
    ]
    return [pytest.param(args, kw, words, never, id=name)
            for name, args, kw, words, never in rows]


@pytest.mark.parametrize("args, kw, words, never", bad_input_warnings())
@pytest.mark.parametrize("entry", ENTRY)
def test_bad_input_warns(entry, args, kw, words, never):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        entry(*args, **kw)
    texts = [str(w.message) for w in rec if issubclass(w.category, core.MatchWarning)]
    hits = [t for t in texts if all(re.search(w, t) for w in words)]
    assert len(hits) == 1, (words, texts)
    if never:
        assert not any(re.search(never, t) for t in texts), (never, texts)


@pytest.mark.parametrize("kw, match", [
    (dict(center=(1.0, 2.0), center_cs="sky"), "center_cs"),
    (dict(center=(1.0, 2.0), center_cs="world"), "center_cs|image2world"),
    (dict(center=(1.0,)), "center"),
    (dict(image2world=_bad_i2w_count), "image2world"),
    (dict(image2world=_bad_i2w_shape), "image2world"),
])
def test_create_coordinate_arrays_bad_input(kw, match):
    with pytest.raises(ERR, match=match):
        utils.create_coordinate_arrays(SHAPE, **kw)


def test_world_center_cs_ignored_without_center():
    # center_cs is documented as ignored when center is None
    images, masks, sigmas = good()
    coef = match_lsq(images, masks, sigmas, center_cs="world")
    np.testing.assert_allclose(coef, O.oracle_solve(images, masks, sigmas),
                               rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------ non-finite
def _nonfinite_problem(rng, use_masks):
    shape = (9, 10)
    n = 3
    images = [rng.normal(size=shape) + i for i in range(n)]
    sigmas = [rng.uniform(0.5, 1.5, size=shape) for _ in range(n)]
    masks = [np.ones(shape, dtype=bool) for _ in range(n)]
    if use_masks:
        for m in masks:
            m[rng.random(shape) < 0.1] = False
    common = np.flatnonzero(np.logical_and.reduce(masks).ravel())
    pick = rng.choice(common, size=7 + 13, replace=False)
    bad0, bad2 = pick[:7], pick[7:]
    im0 = images[0].ravel().copy()
    im0[bad0[:4]] = np.nan
    im0[bad0[4:6]] = np.inf
    im0[bad0[6:]] = -np.inf
    images[0] = im0.reshape(shape)
    s2 = sigmas[2].ravel().copy()
    s2[bad2[:10]] = np.inf
    s2[bad2[10:]] = np.nan
    sigmas[2] = s2.reshape(shape)
    # non-finite values under the mask must be ignored silently
    if use_masks:
        hidden = np.flatnonzero(~masks[1].ravel())[:3]
        im1 = images[1].ravel().copy()
        im1[hidden] = np.nan
        images[1] = im1.reshape(shape)
    return images, masks if use_masks else None, sigmas


def _user_texts(rec):
    return [str(w.message) for w in rec if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
@pytest.mark.parametrize("use_masks", [False, True])
@pytest.mark.parametrize("entry", ENTRY)
def test_nonfinite_pixels_left_out_and_counted(solver, use_masks, entry):
    """Image 0 has 7 unmasked non-finite data pixels (NaN, inf, -inf),
    image 2 has 13 unmasked non-finite sigmas (10 inf, 3 NaN): both counts
    must be reported, and the fit must equal the oracle's without them."""
    rng = np.random.default_rng(21)
    images, masks, sigmas = _nonfinite_problem(rng, use_masks)
    expected = O.oracle_solve(images, masks, sigmas, degree=1)
    with pytest.warns(UserWarning) as rec:
        out = entry(images, masks, sigmas, degree=1, solver=solver)
    coef = out if isinstance(out, np.ndarray) else out.coef
    text = " | ".join(_user_texts(rec))
    assert re.search(r"\b7\b", text), text
    assert re.search(r"\b13\b", text), text
    assert np.all(np.isfinite(coef))
    np.testing.assert_allclose(coef, expected, rtol=0,
                               atol=1e-9 * np.abs(expected).max())


def test_nonfinite_counts_in_a_single_warning():
    rng = np.random.default_rng(21)
    images, masks, sigmas = _nonfinite_problem(rng, True)
    with pytest.warns(UserWarning) as rec:
        match_lsq(images, masks, sigmas, degree=1)
    counting = [t for t in _user_texts(rec)
                if re.search(r"\b7\b", t) and re.search(r"\b13\b", t)]
    assert len(counting) == 1, _user_texts(rec)


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_nan_sigma_counted(solver):
    """NaN (not only inf) in unmasked sigmas is non-finite input: counted."""
    rng = np.random.default_rng(24)
    shape = (6, 7)
    images = [rng.normal(size=shape) for _ in range(3)]
    sigmas = [np.ones(shape) for _ in range(3)]
    sigmas[1][1, 2] = np.nan
    sigmas[1][3, 4] = np.nan
    sigmas[1][5, 6] = np.nan
    expected = O.oracle_solve(images, None, sigmas, degree=1)
    with pytest.warns(UserWarning) as rec:
        coef = match_lsq(images, None, sigmas, degree=1, solver=solver)
    assert re.search(r"\b3\b", " | ".join(_user_texts(rec))), \
        _user_texts(rec)
    np.testing.assert_allclose(coef, expected, rtol=0,
                               atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_nonfinite_without_sigmas(solver):
    rng = np.random.default_rng(22)
    shape = (6, 8)
    images = [rng.normal(size=shape) for _ in range(3)]
    images[1][2, 3] = np.nan
    images[1][4, 5] = np.inf
    expected = O.oracle_solve(images, None, None, degree=(1, 0))
    with pytest.warns(UserWarning, match=r"\b2\b"):
        coef = match_lsq(images, degree=(1, 0), solver=solver)
    assert np.all(np.isfinite(coef))
    np.testing.assert_allclose(coef, expected, rtol=0,
                               atol=1e-9 * np.abs(expected).max())


# ------------------------------------------------------------ inputs intact
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
@pytest.mark.parametrize("weights", ["neither", "masks", "sigmas", "both"])
def test_inputs_not_modified(weights, solver):
    """The caller's arrays (including their non-finite values) are left
    exactly as they were."""
    rng = np.random.default_rng(25)
    shape = (6, 7)
    images = [rng.normal(size=shape) for _ in range(3)]
    images[1][2, 3] = np.nan
    images[2][4, 5] = -np.inf
    masks = [rng.random(shape) > 0.1 for _ in range(3)] \
        if weights in ("masks", "both") else None
    sigmas = [rng.uniform(0.5, 1.5, size=shape) for _ in range(3)] \
        if weights in ("sigmas", "both") else None
    if sigmas is not None:
        sigmas[0][1, 1] = np.inf
        sigmas[0][2, 2] = -1.0
    snapshot = [[x.copy() for x in lst] if lst is not None else None
                for lst in (images, masks, sigmas)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        match_lsq(images, masks, sigmas, degree=1, solver=solver)
        core.match_backgrounds(images, masks, sigmas, degree=1,
                               solver=solver)
    for lst, snap in zip((images, masks, sigmas), snapshot):
        if lst is None:
            continue
        for x, y in zip(lst, snap):
            np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------ no temp files
def test_no_temporary_files(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    tmpd = tmp_path / "tmp"
    work.mkdir()
    tmpd.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmpd))
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(var, str(tmpd))
    rng = np.random.default_rng(23)
    shape = (12, 13)
    masks = O.box_masks(rng, shape, 4, frac=0.7)
    images = [rng.normal(size=shape).astype(np.float32) for _ in range(4)]
    sig = [np.ones(shape, dtype=np.float32)] * 4
    before = os.getcwd()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for solver in ("RLU", "PINV"):
            match_lsq(images, masks, sig, degree=1, solver=solver)
            match_lsq(images, masks, None, degree=2, solver=solver,
                      ext_return=True)
            core.match_backgrounds(images, masks, sig, degree=1,
                                   solver=solver)
    assert os.getcwd() == before
    assert list(work.iterdir()) == []
    assert list(tmpd.iterdir()) == []
