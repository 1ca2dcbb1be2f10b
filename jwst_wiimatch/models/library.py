"""A model library that reads associations without the jwst package.

`WiiMatchLibrary` is an `stpipe.library.AbstractModelLibrary` for JWST
datamodels (opened with `stdatamodels.jwst.datamodels.open`). It reads
association files (JSON) itself, so ``strun wiimatch asn.json`` works with
only stpipe and stdatamodels installed. When jwst is installed, jwst's own
``ModelLibrary`` and ``ModelContainer`` are accepted by the step as well.
"""

import json
import os
from collections.abc import Mapping

from stpipe.library import AbstractModelLibrary, NoGroupID

__all__ = ["WiiMatchLibrary", "load_association", "SavedOutputs", "outputs_association",
           "member_file"]


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
        from stdatamodels.jwst import datamodels

        return datamodels.open(filename, **kwargs)

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
