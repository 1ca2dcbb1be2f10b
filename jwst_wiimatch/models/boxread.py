"""Reading a FITS member by box: only the part of the grid its valid pixels occupy.

``stdatamodels.jwst.datamodels.open`` reads every array of a FITS file into
memory when it opens it (SCI, ERR, DQ, WHT, CON, VAR_*: about 290 MB for a
4100 x 4000 resampled single), although matching needs SCI, ERR, DQ and WHT
only within the box of the grid that the model's valid pixels occupy.

`open_boxed` opens a 2-D FITS member as a `BoxedMember` instead:

* the datamodel (metadata, WCS, array shapes) is built on a memory-mapped,
  unscaled ``HDUList``, so its arrays are views of the file that are never
  read (their values are raw: DQ is not yet uint32; use `BoxedMember.read`);
* a second, plain handle reads rows and boxes of the image extensions
  (``ImageHDU.section``), a few hundred rows at a time.

`BoxedMember.candidate_box` streams one array (WHT when there is one, else
SCI) to find the box outside which no pixel can be valid (``wht > 0``, or
finite data); `BoxedMember.read` then reads SCI, ERR, DQ and WHT within a
box only. The validity rules themselves stay in :mod:`.pixels`, applied to
the boxes.

Members that this cannot read exactly as stdatamodels would (ASDF files,
compressed or tiled-compressed FITS, cubes, files whose arrays are not in
the ``SCI``/``ERR``/``DQ``/``WHT`` extensions, files without a ``DATAMODL``
keyword) are opened whole with `~.library.open_member`, as are models held
in memory (they never come here).
"""

import contextlib
import os

import numpy as np

from .library import _check_file, open_member

__all__ = ["BoxedMember", "open_boxed", "open_metadata", "BOX_ARRAYS", "CHUNK_ROWS"]

#: The FITS extension that holds each model array used for matching.
BOX_ARRAYS = {"data": "SCI", "err": "ERR", "dq": "DQ", "wht": "WHT"}

#: Rows read at a time when an array is streamed.
CHUNK_ROWS = 256


class BoxedMember:
    """A 2-D FITS member whose pixel arrays are read by box.

    Attributes
    ----------
    model : stdatamodels DataModel
        The member's model on a memory-mapped file: use its metadata, WCS
        and array shapes; its arrays are read through `read` instead.
    shape : tuple of int
        The data's shape.
    """

    def __init__(self, model, mapped, plain, hdus):
        self.model = model
        self.shape = tuple(np.shape(model.data))
        self._mapped = mapped
        self._plain = plain
        self._hdus = hdus  # model attribute -> HDU of the plain handle

    def has(self, attr):
        """Whether the model has array ``attr`` (``'err'``, ``'dq'``, ``'wht'``)."""
        return attr in self._hdus

    def _dtype(self, attr):
        # the dtype stdatamodels gives (scaled HDUs, e.g. DQ as uint32), native order
        return np.dtype(self._hdus[attr].section.dtype).newbyteorder("=")

    def rows(self, attr, start, stop):
        """Rows ``[start, stop)`` of array ``attr``, whole width, in memory."""
        return np.asarray(self._hdus[attr].section[start:stop], dtype=self._dtype(attr))

    def read(self, attr, box):
        """Array ``attr`` within ``box`` (``((row0, row1), (col0, col1))``), or None.

        Reads whole rows, ``CHUNK_ROWS`` at a time, and keeps the box's columns.
        """
        if attr not in self._hdus:
            return None
        (r0, r1), (c0, c1) = box
        out = np.empty((r1 - r0, c1 - c0), dtype=self._dtype(attr))
        for a in range(r0, r1, CHUNK_ROWS):
            b = min(r1, a + CHUNK_ROWS)
            out[a - r0:b - r0] = self.rows(attr, a, b)[:, c0:c1]
        return out

    def any_rows(self, attr, test):
        """Rows and columns where ``test(chunk)`` holds somewhere, streaming ``attr``."""
        ny, nx = self.shape
        rows = np.zeros(ny, dtype=bool)
        cols = np.zeros(nx, dtype=bool)
        with np.errstate(invalid="ignore"):
            for a in range(0, ny, CHUNK_ROWS):
                b = min(ny, a + CHUNK_ROWS)
                hit = test(self.rows(attr, a, b))
                rows[a:b] = hit.any(axis=1)
                cols |= hit.any(axis=0)
        return rows, cols

    def candidate_box(self):
        """Grid box outside which no pixel can be valid, or None when none can be.

        From WHT (valid pixels have ``wht > 0``) when the model has one, else
        from SCI (valid pixels have finite data). One streamed pass.
        """
        if self.has("wht"):
            rows, cols = self.any_rows("wht", lambda w: w > 0)
        else:
            rows, cols = self.any_rows("data", np.isfinite)
        if not rows.any():
            return None
        r = np.flatnonzero(rows)
        c = np.flatnonzero(cols)
        return ((int(r[0]), int(r[-1]) + 1), (int(c[0]), int(c[-1]) + 1))

    def any_positive(self, attr):
        """Whether array ``attr`` holds a positive value anywhere (one streamed pass)."""
        ny = self.shape[0]
        with np.errstate(invalid="ignore"):
            for a in range(0, ny, CHUNK_ROWS):
                if np.any(self.rows(attr, a, min(ny, a + CHUNK_ROWS)) > 0):
                    return True
        return False

    def close(self):
        """Close the model and both file handles."""
        try:
            self.model.close()
        finally:
            self._mapped.close()
            self._plain.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _model_class(header):
    """The stdatamodels class named by a primary header's ``DATAMODL``, or None."""
    from stdatamodels.jwst import datamodels

    name = header.get("DATAMODL")
    cls = getattr(datamodels, str(name), None) if name else None
    if isinstance(cls, type) and issubclass(cls, datamodels.JwstDataModel):
        return cls
    return None


def _is_plain_fits(path):
    """A local, uncompressed FITS file (the only kind read by box)."""
    if not isinstance(path, (str, os.PathLike)) or "://" in os.fspath(path):
        return False
    try:
        with open(path, "rb") as fh:
            return fh.read(9) == b"SIMPLE  ="
    except OSError:
        return False


def _open_mapped_model(path):
    """(model on a memory-mapped HDUList, that HDUList), or None when not possible."""
    from astropy.io import fits

    # unscaled: a scaled HDU (DQ: int32 with BZERO, read as uint32) cannot be
    # memory-mapped scaled; the model's arrays are only used for their shapes
    mapped = fits.open(path, memmap=True, lazy_load_hdus=True, do_not_scale_image_data=True)
    try:
        cls = _model_class(mapped[0].header)
        if cls is None:
            mapped.close()
            return None
        return cls(mapped), mapped
    except Exception:  # noqa: BLE001 - the whole-file reader names the fault
        mapped.close()
        return None


def _try_boxed(path):
    """A `BoxedMember` for ``path``, or None when it is not to be read by box."""
    from astropy.io import fits

    if not _is_plain_fits(path):
        return None
    opened = _open_mapped_model(path)
    if opened is None:
        return None
    model, mapped = opened
    plain = None
    try:
        data = getattr(model, "data", None)
        if data is None or np.ndim(data) != 2:
            raise LookupError
        plain = fits.open(path, memmap=False, lazy_load_hdus=True)
        hdus = {}
        for attr, ext in BOX_ARRAYS.items():
            arr = getattr(model, attr, None)  # an absent array is None (not made)
            if arr is None:
                continue
            hdu = plain[ext]  # KeyError: the array is elsewhere
            if type(hdu) not in (fits.ImageHDU, fits.PrimaryHDU) or \
                    tuple(hdu.shape) != tuple(np.shape(arr)):
                raise LookupError
            hdus[attr] = hdu
        if getattr(model, "weightmap", None) is not None:
            raise LookupError  # cubes' weights: read whole
        return BoxedMember(model, mapped, plain, hdus)
    except Exception:  # noqa: BLE001 - anything unusual: read the member whole
        model.close()
        mapped.close()
        if plain is not None:
            plain.close()
        return None


@contextlib.contextmanager
def open_boxed(path, what=None):
    """A member to read by box (`BoxedMember`) when possible, else the whole model.

    Parameters
    ----------
    path : str or path-like
        The member's file.
    what : str, optional
        How the file is named in errors (see `~.library.open_member`).

    Yields
    ------
    BoxedMember or DataModel
        A `BoxedMember` for a 2-D FITS image whose arrays can be read by box;
        otherwise the model opened with `~.library.open_member` (which names
        the member in any error).
    """
    what = what or "input file"
    _check_file(what, path)
    member = _try_boxed(path)
    if member is None:
        with open_member(path, what) as model:
            yield model
        return
    with member:
        yield member


@contextlib.contextmanager
def open_metadata(path, what=None):
    """The member's model, its pixel arrays left in the file when it is read by box.

    For setup work that needs metadata, WCS and shapes only.
    """
    with open_boxed(path, what) as member:
        yield member.model if isinstance(member, BoxedMember) else member
