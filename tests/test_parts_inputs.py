"""Inputs read by parts: the engine on array-likes that it slices block by block.

``match_backgrounds`` takes, besides numpy arrays, any object with ``shape``,
``dtype`` and numpy-style slicing (files read on demand, dask arrays, ...),
wrapped in :class:`jwst_wiimatch.core.inputs.PartsArray`. The results must be
those of the same values given as arrays, and the memory the engine holds
must not grow with the number of images times their size. ``match_models``
keeps the models' matching images in scratch files read this way.
"""
import contextlib
import os
import tempfile

import numpy as np
import pytest

import step_helpers as h
from tracing import traced_peak

from jwst_wiimatch import matching
from jwst_wiimatch.core import match_backgrounds
from jwst_wiimatch.core.inputs import PartsArray
from jwst_wiimatch.models import scratch


class Recorder:
    """An array read only by slicing, which records the size of every read."""

    def __init__(self, arr):
        self._arr = arr
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.reads = []

    def __getitem__(self, key):
        part = self._arr[key]
        self.reads.append(part.size)
        return part.copy()


class NpyReader:
    """Reads a ``.npy`` file by parts (maps it, copies the part, unmaps it)."""

    def __init__(self, path):
        self.path = path
        mm = np.load(path, mmap_mode="r")
        self.shape, self.dtype = mm.shape, mm.dtype

    def __getitem__(self, key):
        return np.array(np.load(self.path, mmap_mode="r")[key])


GRID = (300, 340)


def _cutouts(n=5, side=(140, 170), seed=4, grid=GRID, holes=True):
    """Cutouts of one grid with plane backgrounds, noise, masks and sigmas."""
    rng = np.random.default_rng(seed)
    images, masks, sigmas, origins = [], [], [], []
    for k in range(n):
        o = (int(rng.integers(0, grid[0] - side[0])), int(rng.integers(0, grid[1] - side[1])))
        yy, xx = np.mgrid[o[0]:o[0] + side[0], o[1]:o[1] + side[1]]
        sig = rng.uniform(0.04, 0.06, side).astype(np.float32)
        img = (rng.normal(3, 1) + rng.normal(0, 1e-3) * xx + rng.normal(0, 1e-3) * yy
               + sig * rng.standard_normal(side)).astype(np.float32)
        if k == 1:
            img[20:23, 30:33] += 40.0  # junk that robust matching leaves out
        m = np.ones(side, bool)
        if holes:
            m[rng.integers(0, side[0], 50), rng.integers(0, side[1], 50)] = False
            img[~m] = np.nan
        images.append(img)
        masks.append(m)
        sigmas.append(sig)
        origins.append(o)
    return images, masks, sigmas, origins


def _world(x, y):
    return 150.0 + 3e-5 * x + 1e-11 * x * y, 2.0 + 3e-5 * y - 1e-11 * x * x


def _same(a, b):
    np.testing.assert_array_equal(a.coef, b.coef)
    np.testing.assert_array_equal(a.npix, b.npix)
    np.testing.assert_array_equal(a.rms, b.rms)
    if a.covariance is not None or b.covariance is not None:
        np.testing.assert_array_equal(a.covariance, b.covariance)


CASES = {
    "plain": dict(degree=1),
    "world": dict(degree=2, image2world=_world, center_cs="world"),
    "robust": dict(degree=1, robust="clip", covariance=True),
    "huber": dict(degree=1, robust="huber"),
    "auto": dict(degree="auto"),
    "pinv-total": dict(degree=2, terms="total", solver="PINV"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_by_parts_equals_arrays(case):
    images, masks, sigmas, origins = _cutouts()
    kw = dict(origins=origins, grid_shape=GRID, threads=1, **CASES[case])
    ref = match_backgrounds(images, masks=masks, sigmas=sigmas, **kw)
    rec = [Recorder(a) for a in images + sigmas]
    mrec = [Recorder(m) for m in masks]
    got = match_backgrounds(rec[:5], masks=mrec, sigmas=rec[5:], **kw)
    _same(got, ref)
    assert all(r.reads for r in rec + mrec)  # every input was read by slicing


def test_read_by_parts_threads_and_dask_arrays():
    """Threads read parts concurrently; a dask array is read by parts too."""
    da = pytest.importorskip("dask.array")
    images, masks, sigmas, origins = _cutouts(seed=9)
    kw = dict(origins=origins, grid_shape=GRID, degree=1, robust="clip")
    ref = match_backgrounds(images, masks=masks, sigmas=sigmas, threads=1, **kw)
    lazy = [da.from_array(a, chunks=64) for a in images]
    got = match_backgrounds(lazy, masks=masks, sigmas=[Recorder(s) for s in sigmas],
                            threads=3, **kw)
    _same(got, ref)


def test_block_reads_are_small():
    """Accumulation reads blocks, not whole images: its reads are parts of an image."""
    grid = (600, 700)
    images, _, sigmas, origins = _cutouts(n=4, side=(400, 450), grid=grid, holes=False)
    rec = [Recorder(a) for a in images]
    match_backgrounds(rec, sigmas=sigmas, origins=origins, grid_shape=grid, degree=1,
                      threads=1)
    size = images[0].size
    for r in rec:
        blocks = [s for s in r.reads if s < size]
        assert len(blocks) >= 4
        assert max(blocks) <= size // 2


def test_masks_all_true_over_their_box_are_not_read_by_blocks():
    """A mask that is all true over its valid box (here: a frame of false around a
    true rectangle) is read whole once per pass, for its box, and not again by
    the blocks; one with holes is read by the blocks. Same results either way."""
    grid = (600, 700)
    images, _, sigmas, origins = _cutouts(n=4, side=(400, 450), grid=grid, holes=False)
    masks = []
    for k, img in enumerate(images):
        m = np.zeros(img.shape, bool)
        m[10 + k:380, 5:440 - k] = True
        masks.append(m)
    masks[2] = masks[2].copy()
    masks[2][200, 200] = False  # a hole: this one is read block by block
    kw = dict(sigmas=sigmas, origins=origins, grid_shape=grid, degree=1, threads=1)
    ref = match_backgrounds(images, masks=masks, **kw)
    rec = [Recorder(m) for m in masks]
    got = match_backgrounds(images, masks=rec, **kw)
    _same(got, ref)
    size = images[0].size
    for k, r in enumerate(rec):
        parts = [n for n in r.reads if n < size]
        assert r.reads and (len(parts) >= 4 if k == 2 else not parts), (k, r.reads)


def test_reader_with_wrong_shape_is_named():
    images, masks, sigmas, origins = _cutouts(n=3)

    class Bad(Recorder):
        def __getitem__(self, key):
            return super().__getitem__(key)[:-1]  # one row short

    with pytest.raises(ValueError, match=r"images\[1\].*shape.*does not slice like"):
        match_backgrounds([images[0], Bad(images[1]), images[2]], sigmas=sigmas,
                          origins=origins, grid_shape=GRID, degree=1)
    with pytest.raises(TypeError, match=r"sigmas\[0\] has dtype"):
        match_backgrounds(images, sigmas=[Recorder(s.astype(complex)) for s in sigmas],
                          origins=origins, grid_shape=GRID, degree=1)


def test_parts_array_whole_read():
    a = np.arange(12.0).reshape(3, 4)
    p = PartsArray(Recorder(a), "images[0]")
    np.testing.assert_array_equal(np.asarray(p), a)
    assert np.asarray(p, dtype=np.float32).dtype == np.float32
    assert (p.shape, p.ndim, p.size, len(p)) == ((3, 4), 2, 12, 3)


def _strip(n, side=(400, 300), step=150, seed=0):
    """``n`` images in a row, each overlapping the next by half: two deep everywhere."""
    rng = np.random.default_rng(seed)
    grid = (side[0], step * (n - 1) + side[1])
    images, sigmas, origins = [], [], []
    for k in range(n):
        sig = np.full(side, 0.05, np.float32)
        images.append((rng.normal(3, 1) + sig * rng.standard_normal(side)).astype(np.float32))
        sigmas.append(sig)
        origins.append((0, step * k))
    return images, sigmas, origins, grid


@pytest.mark.parametrize("extra", [{}, {"robust": "clip"}, {"covariance": True}])
def test_memory_does_not_grow_with_images_times_size(tmp_path, monkeypatch, extra):
    """Files read by parts, overlaps two deep: 4x the images (of ~1 MB of data and
    sigma each) add a small fraction of their size to the engine's peak.

    (The covariance pass holds images x images x points per block, at most
    ``COV_BLOCK_ELEMS`` values per array whatever the number of images: made
    small here, so that the bound is reached with few images.)
    """
    from jwst_wiimatch.core import uncertainty

    monkeypatch.setattr(uncertainty, "COV_BLOCK_ELEMS", 1 << 15)

    def run(n):
        images, sigmas, origins, grid = _strip(n, seed=n)
        readers = []
        for k, arr in enumerate(images + sigmas):
            path = str(tmp_path / f"{n}-{k}.npy")
            np.save(path, arr)
            readers.append(NpyReader(path))
        nbytes = sum(a.nbytes for a in images + sigmas)
        del images, sigmas
        _, peak = traced_peak(lambda: match_backgrounds(
            readers[:n], sigmas=readers[n:], origins=origins, grid_shape=grid, degree=1,
            threads=1, **extra))
        return peak, nbytes

    p4, d4 = run(4)
    p16, d16 = run(16)
    assert p16 - p4 < 0.15 * (d16 - d4)
    assert p16 < 0.5 * d16


# ---------------------------------------------------------------------------
# the step's binning=1 path: cutouts in scratch files
# ---------------------------------------------------------------------------
def test_scratch_store_round_trip_and_cleanup(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a = np.arange(30, dtype=np.float32).reshape(5, 6)
    with scratch.ScratchStore() as store:
        s = store.put(a)
        assert os.path.dirname(s.path) == store.path
        np.testing.assert_array_equal(s[1:4, ::2], a[1:4, ::2])
        np.testing.assert_array_equal(np.asarray(s), a)
        pos = scratch.positive_as_one(s)
        np.testing.assert_array_equal(pos[0:2, 0:3], (a[0:2, 0:3] > 0).astype(float))
        assert store.nbytes == a.nbytes
    assert os.listdir(tmp_path) == []


def _grid_library(n=4, shape=(60, 70)):
    from jwst_wiimatch.models.library import WiiMatchLibrary

    models, _, _ = h.make_models(n=n, shape=shape, seed=5, rotation_deg=10.0)
    return WiiMatchLibrary(models)


@pytest.mark.parametrize("kw", [{}, {"robust": {"robust": "clip"}}, {"degree": "auto"},
                                {"groups": [[0, 1], [2], [3]]}])
def test_binning1_scratch_equals_memory(tmp_path, monkeypatch, kw):
    """``binning=1`` results are those of cutouts kept in memory; the scratch
    directory (in the system temporary directory) is gone after the run."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    puts = []
    put = scratch.ScratchStore.put

    def counting_put(self, arr):
        puts.append(arr.nbytes)
        return put(self, arr)

    monkeypatch.setattr(scratch.ScratchStore, "put", counting_put)
    out, summary = matching.match_models(_grid_library(), binning=1, **kw)
    assert puts and os.listdir(tmp_path) == []
    monkeypatch.setattr(matching, "_spill", lambda red, store: red)
    ref, ref_summary = matching.match_models(_grid_library(), binning=1, **kw)
    assert summary.degree == ref_summary.degree
    for a, b in zip(out, ref):
        assert a.status == b.status == "COMPLETE"
        np.testing.assert_array_equal(a.coefficients, b.coefficients)
        assert a.ncells == b.ncells


@pytest.mark.parametrize("binning", [1, 2])
def test_matching_images_wait_in_files(monkeypatch, binning):
    """What the per-model reduction hands on is a file reader, not pixels (any
    binning); with a dask client they stay in memory."""
    seen = []
    solve = matching._solve

    def spy(reduced, *args, **kwargs):
        seen.extend(reduced)
        return solve(reduced, *args, **kwargs)

    monkeypatch.setattr(matching, "_solve", spy)
    _, summary = matching.match_models(_grid_library(shape=(200, 220)), binning=binning)
    assert summary.binning == binning
    assert len(seen) == 4
    for r in seen:
        assert isinstance(r.data, scratch.ScratchArray)
        assert isinstance(r.sigma, scratch.ScratchArray)
    assert isinstance(matching._scratch(object()), contextlib.nullcontext)


def test_sky_cells_wait_in_files(tmp_path, monkeypatch):
    """Calibrated exposures: the cell sums and the group images go to scratch files,
    removed after the run, with the results of sums kept in memory."""
    import pipeline_helpers as ph
    from jwst_wiimatch.models.library import WiiMatchLibrary

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    models = [ph.make_cal(k) for k in range(4)]
    puts = []
    put = scratch.ScratchStore.put
    monkeypatch.setattr(scratch.ScratchStore, "put",
                        lambda self, arr: puts.append(arr.shape) or put(self, arr))
    out, _ = matching.match_models(WiiMatchLibrary(models), kind="sky", degree=1)
    assert len(puts) >= 4 * 2 + 4 * 2  # cells of each exposure, then each group's image
    assert os.listdir(tmp_path / "tmp") == []
    monkeypatch.setattr(matching, "_spill", lambda red, store: red)
    ref, _ = matching.match_models(WiiMatchLibrary([ph.make_cal(k) for k in range(4)]),
                                   kind="sky", degree=1)
    for a, b in zip(out, ref):
        assert a.status == b.status == "COMPLETE"
        np.testing.assert_array_equal(a.coefficients, b.coefficients)


def test_scratch_write_error_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with scratch.ScratchStore() as store:
        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(np, "save", full)
        with pytest.raises(OSError, match=r"scratch file.*TMPDIR") as err:
            store.put(np.zeros((10, 10), np.float32))
        assert store.path in str(err.value)


def test_unsliceable_reader_is_named():
    """An array-like that cannot be sliced with a tuple of slices: a clear error."""
    images, masks, sigmas, origins = _cutouts(n=3)

    class OneDOnly(Recorder):
        def __getitem__(self, key):
            if isinstance(key, tuple):
                raise KeyError(key)
            return super().__getitem__(key)

    with pytest.raises(TypeError, match=r"images\[2\]: reading the part .*np.asarray"):
        match_backgrounds([images[0], images[1], OneDOnly(images[2])], sigmas=sigmas,
                          origins=origins, grid_shape=GRID, degree=1)


def test_no_temporary_directory_keeps_images_in_memory(tmp_path, monkeypatch, caplog):
    """Where no scratch directory can be made, matching still runs (images in memory)
    and says how to keep memory bounded."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/tmp")

    monkeypatch.setattr(scratch.ScratchStore, "__init__", refuse)
    with caplog.at_level("WARNING", logger="jwst_wiimatch"):
        out, _ = matching.match_models(_grid_library(), binning=1)
    assert all(o.status == "COMPLETE" for o in out)
    assert any("TMPDIR" in r.getMessage() for r in caplog.records)
