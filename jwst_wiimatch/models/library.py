"""A model library that reads associations without the jwst package.

`WiiMatchLibrary` is an `stpipe.library.AbstractModelLibrary` for JWST
datamodels (opened with `stdatamodels.jwst.datamodels.open`). It reads
association files (JSON) itself, so ``strun wiimatch asn.json`` works with
only stpipe and stdatamodels installed. When jwst is installed, jwst's own
``ModelLibrary`` and ``ModelContainer`` are accepted by the step as well.
"""

import json
import os
import re
from collections.abc import Mapping

from stpipe.library import AbstractModelLibrary, LibraryError, NoGroupID

__all__ = ["WiiMatchLibrary", "load_association", "SavedOutputs", "outputs_association",
           "member_file", "MemberError", "NamedMembers", "open_member", "member_label",
           "borrow_member", "model_group_id"]


def load_association(filename):
    """Read and check an association file.

    Parameters
    ----------
    filename : str or path-like
        JSON association: ``{"products": [{"members": [{"expname": ...,
        "exptype": ...}, ...]}, ...]}``.

    Returns
    -------
    dict
        The association, with member ``exptype`` values lower-cased
        (``"science"`` when absent).

    Raises
    ------
    ValueError
        When the file is not JSON or lacks ``products[0].members[*].expname``.
    """
    try:
        with open(filename) as fh:
            asn = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"association {os.fspath(filename)!r} is not valid JSON ({exc}); "
            "give a JSON association file (e.g. from asn_from_list)"
        ) from None
    return check_association(asn, name=os.fspath(filename))


def check_association(asn, name="association"):
    """Check the structure of an association dictionary (see `load_association`)."""
    fix = ('an association needs {"products": [{"members": [{"expname": '
           '"file.fits", "exptype": "science"}, ...]}]}')
    if not isinstance(asn, Mapping):
        raise ValueError(f"{name} is not a JSON object; {fix}")
    products = asn.get("products")
    if not isinstance(products, list) or not products:
        raise ValueError(f"{name} has no 'products'; {fix}")
    members = products[0].get("members") if isinstance(products[0], Mapping) else None
    if not isinstance(members, list):
        raise ValueError(f"{name} has no 'members' in its first product; {fix}")
    for k, member in enumerate(members):
        if not isinstance(member, Mapping) or not member.get("expname"):
            raise ValueError(f"{name}: member {k} has no 'expname'; {fix}")
        member["exptype"] = str(member.get("exptype") or "science").lower()
    return asn


# ---------------------------------------------------------------------------
# members that cannot be read: one error that names the member and the fault
# ---------------------------------------------------------------------------
class MemberError(ValueError):
    """An input file (association member) that cannot be read as a JWST datamodel."""


#: How much of a reader's own message is quoted.
_DETAIL_CHARS = 300


def _message(exc):
    """An exception's message (a KeyError's without the quotes its str adds)."""
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _reader_detail(exc):
    """A reader's exception as one short line."""
    text = " ".join(_message(exc).split())
    if len(text) > _DETAIL_CHARS:
        text = text[:_DETAIL_CHARS] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_FITS_BLOCK = 2880
#: Signatures of gzip, bzip2 and zip files.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"PK\x03\x04")


def _fits_shortfall(fh, size):
    """Bytes the HDUs of a FITS file declare beyond its end (0: none missing).

    Walks the headers (80-character cards in 2880-byte blocks) and the data
    sizes they declare (BITPIX, NAXISn, PCOUNT, GCOUNT); stops at the first
    header it cannot read.
    """
    pos = 0
    while pos < size:
        cards, end = {}, False
        while not end:
            fh.seek(pos)
            block = fh.read(_FITS_BLOCK)
            if len(block) < _FITS_BLOCK:
                return pos + _FITS_BLOCK - size
            pos += _FITS_BLOCK
            for i in range(0, _FITS_BLOCK, 80):
                card = block[i:i + 80].decode("ascii", "replace")
                key = card[:8].strip()
                if key == "END":
                    end = True
                    break
                if card[8:10] == "= " and key not in cards:
                    cards[key] = card[10:].split("/")[0].strip()
        try:
            naxis = int(cards.get("NAXIS", 0))
            npix = 0
            if naxis:
                npix = 1
                for k in range(1, naxis + 1):
                    npix *= int(cards[f"NAXIS{k}"])
            nbytes = (abs(int(cards.get("BITPIX", 8))) // 8
                      * int(cards.get("GCOUNT", 1)) * (int(cards.get("PCOUNT", 0)) + npix))
        except (KeyError, ValueError):
            return 0
        pos += -(-nbytes // _FITS_BLOCK) * _FITS_BLOCK
    return max(0, pos - size)


def file_problem(path):
    """What is wrong with an input file before any reader sees it, in words, or None.

    Checks that the file exists, is not empty, starts like FITS or ASDF and,
    for FITS, holds all the bytes its headers declare (a truncated FITS file
    can open without an error and lack its last extensions). Reads only the
    headers. Paths with ``://`` (URLs) and compressed files are not checked.
    """
    path = os.fspath(path)
    if "://" in path:
        return None
    if not os.path.exists(path):
        return "the file does not exist"
    if os.path.isdir(path):
        return "it is a folder, not a file"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(80)
            short = _fits_shortfall(fh, size) if head.startswith(b"SIMPLE  =") else 0
    except OSError as err:
        return f"the file cannot be read ({err.strerror or err})"
    if size == 0:
        return "the file is empty"
    if head.startswith(_COMPRESSED):  # left to the reader (astropy opens .fits.gz)
        return None
    if short:
        return (f"the FITS file is truncated: its headers declare {short} bytes more "
                f"than its {size} bytes (an interrupted copy or write?)")
    if not head.startswith((b"SIMPLE  =", b"#ASDF")):
        return f"it is neither a FITS nor an ASDF file (it starts with {head[:16]!r})"
    return None


def diagnose_file(path, exc=None):
    """What is wrong with a file that a datamodel could not be read from, in words.

    `file_problem` if it finds one, else the reader's exception ``exc`` as
    one line.
    """
    problem = file_problem(path)
    if problem is not None:
        return problem
    if "://" in os.fspath(path):
        return _reader_detail(exc) if exc is not None else "it cannot be read"
    with open(path, "rb") as fh:
        kind = "FITS" if fh.read(9) == b"SIMPLE  =" else "ASDF"
    if exc is None:
        return f"the {kind} file is damaged"
    missing = re.search(r"Extension \('?([A-Za-z0-9_]+)'?, *\d+\) not found", _message(exc))
    if missing:
        return (f"its metadata refers to the {missing.group(1)} extension, which the "
                f"{kind} file lacks (was the extension removed from the file?)")
    return f"the {kind} file is damaged or incomplete ({_reader_detail(exc)})"


def _check_file(what, path):
    """Raise `MemberError` naming ``what`` when `file_problem` finds one."""
    if isinstance(path, (str, os.PathLike)) and file_problem(path) is not None:
        raise _unreadable(what, path)


def _unreadable(what, path, exc=None):
    return MemberError(
        f"{what}: cannot read {os.fspath(path)!r} as a JWST datamodel: "
        f"{diagnose_file(path, exc)}; replace the file or remove it from the input"
    )


def open_member(path, what=None, **kwargs):
    """Open an input file as a JWST datamodel, or raise one error that names it.

    Parameters
    ----------
    path : str or path-like
        The file (FITS or ASDF).
    what : str, optional
        How the file is named in the error, e.g. ``'association member 2
        (jw..._cal.fits)'`` (default: ``'input file'``).
    **kwargs
        Passed to ``stdatamodels.jwst.datamodels.open``.

    Raises
    ------
    MemberError
        (a ValueError) naming ``what``, the file and what is wrong with it:
        missing, empty, not FITS/ASDF, truncated, damaged, or a model with no
        ``data`` array.
    """
    from stdatamodels.jwst import datamodels

    what = what or "input file"
    _check_file(what, path)
    try:
        model = datamodels.open(path, **kwargs)
    except MemberError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader fault becomes one named error
        raise _unreadable(what, path, exc) from None
    try:
        data = model.data
    except Exception:  # noqa: BLE001 - no data array, or one that cannot be read
        data = None
    if data is None:
        kind = type(model).__name__
        model.close()
        raise MemberError(
            f"{what}: {os.fspath(path)!r} opens as a {kind} with no data (SCI) array; "
            "wiimatch needs JWST image or cube products (cal, i2d, s3d)"
        )
    return model


def member_label(library, index):
    """``'association member k (expname)'`` or ``'model k'`` when the library has no names."""
    members = getattr(library, "_members", None) or []
    name = None
    if index < len(members) and isinstance(members[index], Mapping):
        name = members[index].get("expname")
    return f"association member {index} ({name})" if name else f"model {index}"


def _file_label(library, filename):
    """`member_label` of the member read from ``filename`` (``'input file'`` if none)."""
    members = getattr(library, "_members", None) or []
    for k, member in enumerate(members):
        try:
            if library._member_to_filename(member) == os.fspath(filename):
                return member_label(library, k)
        except (AttributeError, KeyError, TypeError):
            break
    return "input file"


def borrow_member(library, index):
    """``library.borrow(index)``, with faults of reading the member's file named.

    A member that cannot be read raises `MemberError` naming its index and
    file; the library's own errors (borrowing twice, a closed library) pass
    unchanged.
    """
    try:
        return library.borrow(index)
    except (MemberError, LibraryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the reader's fault, named
        path = None
        try:
            path = library._member_to_filename(library._members[index])
        except (AttributeError, IndexError, KeyError, TypeError):
            pass
        if path is None:
            raise
        raise _unreadable(member_label(library, index), path, exc) from None


class NamedMembers:
    """Mixin for a model library: faults of reading a member name the member.

    Wraps the two places where a library reads its members' files, opening a
    model (``_datamodels_open``) and reading its group id from the file
    (``_filename_to_group_id``), so that a missing, damaged or foreign file
    raises one `MemberError` naming the member's index and file.
    """

    def _datamodels_open(self, filename, **kwargs):
        _check_file(_file_label(self, filename), filename)
        try:
            return super()._datamodels_open(filename, **kwargs)
        except MemberError:
            raise
        except Exception as exc:  # noqa: BLE001 - the reader's fault, named
            raise _unreadable(_file_label(self, filename), filename, exc) from None

    def _filename_to_group_id(self, filename):
        _check_file(_file_label(self, filename), filename)
        try:
            return super()._filename_to_group_id(filename)
        except (NoGroupID, MemberError):
            raise
        except Exception as exc:  # noqa: BLE001 - the reader's fault, named
            raise _unreadable(_file_label(self, filename), filename, exc) from None


class WiiMatchLibrary(AbstractModelLibrary):
    """Model library for JWST datamodels that needs no jwst package.

    Parameters are those of `stpipe.library.AbstractModelLibrary`: an
    association file name or dict, or a list of models; ``on_disk=True``
    keeps models in temporary files between uses.

    Examples
    --------
    >>> lib = WiiMatchLibrary("asn.json", on_disk=True)  # doctest: +SKIP
    >>> with lib:                                         # doctest: +SKIP
    ...     model = lib.borrow(0)
    ...     lib.shelve(model, 0, modify=False)
    """

    def check_members_exist(self):
        """Raise ValueError naming the first association member whose file is missing."""
        for k, member in enumerate(self._members):
            path = self._member_to_filename(member)
            if "://" not in path and not os.path.isfile(path):
                raise ValueError(
                    f"association member {k} ({member['expname']!r}) does not exist "
                    f"(looked for {path}); fix the association or add the file"
                )

    @property
    def crds_observatory(self):
        """Observatory name, ``'jwst'`` (the library never queries CRDS itself)."""
        return "jwst"

    def _datamodels_open(self, filename, **kwargs):
        return open_member(filename, _file_label(self, filename), **kwargs)

    @classmethod
    def _load_asn(cls, filename):
        return load_association(filename)

    def _filename_to_group_id(self, filename):
        # group ids are not used by wiimatch; each member gets its own
        raise NoGroupID(f"no group_id read from {filename}")

    def _model_to_group_id(self, model):
        group_id = getattr(model.meta, "group_id", None)
        if group_id:
            return group_id
        raise NoGroupID(f"{model} has no meta.group_id")

    def _model_to_exptype(self, model):
        exptype = None
        try:
            exptype = model.meta.asn.exptype
        except AttributeError:
            pass
        return exptype or "science"

    def _model_to_filename(self, model):
        return model.meta.filename or "model.fits"

    def _assign_member_to_model(self, model, member):
        model.meta.asn.exptype = member.get("exptype", "science")
        if member.get("group_id"):
            model.meta.group_id = member["group_id"]
        asn = self._asn
        if "table_name" in asn:
            model.meta.asn.table_name = asn["table_name"]
        if "asn_pool" in asn:
            model.meta.asn.pool_name = asn["asn_pool"]


#: The meta.observation attributes that identify one exposure (jwst's group_id).
_EXPOSURE_KEYS = ("program_number", "observation_number", "visit_number", "visit_group",
                  "sequence_id", "activity_id", "exposure_number")


def model_group_id(model):
    """The exposure a model belongs to, or None when its metadata do not say.

    ``meta.group_id`` when set (jwst's libraries and skymatch use it), else an
    id made from the ``meta.observation`` attributes that identify one
    exposure (program, observation, visit, visit group, sequence, activity,
    exposure number): the detectors of one exposure get the same id.
    """
    group_id = getattr(model.meta, "group_id", None)
    if group_id:
        return str(group_id)
    try:
        obs = model.meta.observation
        values = [getattr(obs, key, None) for key in _EXPOSURE_KEYS]
    except AttributeError:
        return None
    if any(v in (None, "") for v in values):
        return None
    return "exposure:" + "/".join(str(v) for v in values)


class SavedOutputs:
    """Mixin for a library over outputs that a step already finalized and saved.

    stpipe calls ``finalize_result`` on a step's library result, which reads
    (and, on disk, rewrites) every model; a step that saved each output as
    soon as it was done has already finalized it, so this does nothing.
    """

    def finalize_result(self, step, reference_files_used):
        """Nothing to do: each model was finalized before it was saved."""


class SavedLibrary(SavedOutputs, WiiMatchLibrary):
    """A `WiiMatchLibrary` over outputs that were saved as they were produced."""


def outputs_association(paths, name="wiimatch_outputs"):
    """An association dict (absolute paths) over saved output files."""
    members = [{"expname": os.path.abspath(p), "exptype": "science"} for p in paths]
    return {"asn_id": "wiimatch", "asn_pool": "wiimatch",
            "products": [{"name": name, "members": members}]}


def member_file(library, index):
    """The file a library reads model ``index`` from, or None.

    None when the model is held in memory or was changed (kept in a
    temporary file), i.e. when the file does not hold what the library
    would return. Used to read models where they are processed (dask
    workers) instead of through the library.
    """
    members = getattr(library, "_members", None)
    if not members or index >= len(members):
        return None
    if index in (getattr(library, "_loaded_models", None) or {}):
        return None
    if index in (getattr(library, "_temp_filenames", None) or {}):
        return None
    try:
        path = library._member_to_filename(members[index])
    except (AttributeError, KeyError, TypeError):
        return None
    return path if os.path.isfile(path) else None
