"""Scratch files for the matching images of a run.

Each model is reduced to what matching needs: a cutout of the common grid
(its data and sigma over the box its valid pixels occupy, binned or not) or,
for calibrated exposures, its sums over the cells of the sky grid. The
engine needs all of them at once; held in memory they would grow with the
number of models (8 bytes per pixel of every model's box with
``binning=1``: several GB for a few hundred singles). Instead, each is
written to a file in the system temporary directory as soon as its model is
reduced, and read back when needed: the engine reads the files by parts
(:class:`~jwst_wiimatch.core.inputs.PartsArray`), every read mapping the
file, copying the part asked for and unmapping it, so the process holds one
block of the grid per image at a time, not the files.

The files live in one temporary directory per run, removed when the run
ends (also on errors).
"""
import collections
import itertools
import math
import mmap
import os
import tempfile
import threading

import numpy as np

from ..core.inputs import _ReadByParts

__all__ = ["ScratchStore", "ScratchArray", "positive_as_one"]


class ScratchArray(_ReadByParts):
    """An array kept in a ``.npy`` file of a :class:`ScratchStore`, read by parts.

    ``arr[slices]`` returns a copy of that part (numpy array); ``shape``
    and ``dtype`` are the array's. The store keeps the files of recent
    reads mapped (a bounded number of them), and after each read tells the
    system that the mapped pages are not needed: the process holds the
    copies it asked for, not the files.
    """

    def __init__(self, store, path, shape, dtype, offset):
        self.store = store
        self.path = path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.offset = offset  # bytes before the data (the .npy header)

    def __getitem__(self, key):
        view, release = self.store._view(self)
        try:
            return np.array(view[key])
        finally:
            release()


class _Positive(_ReadByParts):
    """1.0 where an array read by parts is > 0, else 0.0 (float64), read by parts."""

    dtype = np.dtype(np.float64)

    def __init__(self, src):
        self.src = src
        self.shape = tuple(src.shape)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        return (np.asarray(self.src[key]) > 0).astype(np.float64)


def positive_as_one(arr):
    """1.0 where ``arr`` > 0, else 0.0: an array, or for a scratch array one read by parts."""
    if isinstance(arr, (ScratchArray, _Positive)):
        return _Positive(arr)
    return np.where(np.asarray(arr) > 0, 1.0, 0.0)


class ScratchStore:
    """A temporary directory of cutout files for one run (a context manager).

    ``put(arr)`` writes ``arr`` to a new file and returns a
    :class:`ScratchArray` reading it; the directory and its files are
    removed on ``close`` (or leaving the ``with`` block).
    """

    def __init__(self, prefix="wiimatch-"):
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = self._dir.name
        self._names = itertools.count(1)  # next() is atomic: one name per call
        self._lock = threading.Lock()
        self._open = collections.OrderedDict()  # path -> (mmap, array view), recent last
        #: bytes written so far
        self.nbytes = 0

    #: Files kept mapped at once (each holds a file descriptor).
    MAX_OPEN = 64

    def _view(self, arr):
        """A read-only array view of ``arr``'s file, and a function to call after reading."""
        with self._lock:
            entry = self._open.pop(arr.path, None)
            if entry is None:
                with open(arr.path, "rb") as fh:
                    m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                view = np.frombuffer(m, dtype=arr.dtype, count=math.prod(arr.shape),
                                     offset=arr.offset).reshape(arr.shape)
                entry = (m, view)
            self._open[arr.path] = entry
            while len(self._open) > self.MAX_OPEN:  # closed once no read uses it
                self._open.popitem(last=False)
        m, view = entry

        def release():
            # drop the pages from this process (they stay in the page cache)
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED") and not m.closed:
                m.madvise(mmap.MADV_DONTNEED)

        return view, release

    def put(self, arr):
        arr = np.ascontiguousarray(arr)
        name = os.path.join(self.path, f"cutout-{next(self._names):06d}.npy")
        try:
            np.save(name, arr, allow_pickle=False)
        except OSError as exc:
            raise OSError(
                f"wiimatch: could not write a scratch file of {arr.nbytes / 1e6:.1f} MB in "
                f"{self.path} ({exc}); the matching images of all models wait there "
                f"until the match is done: point TMPDIR at a directory with room for "
                f"them (about {self.nbytes / 1e6:.0f} MB were written before this one)."
            ) from exc
        with self._lock:
            self.nbytes += arr.nbytes
        mapped = np.load(name, mmap_mode="r")
        offset = mapped.offset  # where the data start, after the .npy header
        del mapped
        return ScratchArray(self, name, arr.shape, arr.dtype, offset)

    def close(self):
        with self._lock:
            self._open.clear()  # mappings close once no read uses them
        self._dir.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
