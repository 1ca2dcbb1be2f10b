"""Pixels of one model: which are valid, and how uncertain.

A pixel is valid when its data and sigma are finite, sigma > 0, its DQ passes
the ``dqbits`` selection and its weight (``wht``/``weightmap``) is positive.
"""

import numpy as np

__all__ = ["DEFAULT_DQBITS", "interpret_dqbits", "weight_array", "model_sigma",
           "valid_mask"]

#: Default DQ selection: pixels flagged DO_NOT_USE or NON_SCIENCE are bad.
DEFAULT_DQBITS = "~DO_NOT_USE+NON_SCIENCE"


def interpret_dqbits(dqbits):
    """Turn a ``dqbits`` specification into integer flags for the DQ test.

    Parameters
    ----------
    dqbits : str, int or None
        JWST-style bit-flag expression such as ``'~DO_NOT_USE+NON_SCIENCE'``
        (the flags named after ``~`` mark *bad* pixels), an integer, or
        ``None`` / ``''`` to ignore DQ altogether.

    Returns
    -------
    int or None
        The value to pass to
        `astropy.nddata.bitmask.bitfield_to_boolean_mask`, or None when DQ
        is to be ignored.

    Raises
    ------
    ValueError
        When the expression cannot be parsed (unknown flag name, bad syntax).
    """
    from astropy.nddata.bitmask import interpret_bit_flags
    from stdatamodels.jwst.datamodels.dqflags import pixel

    if dqbits is None:
        return None
    if isinstance(dqbits, str) and dqbits.strip().lower() in ("", "none"):
        return None
    try:
        return interpret_bit_flags(dqbits, flag_name_map=pixel)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(
            f"dqbits={dqbits!r} is not a valid DQ bit-flag expression ({exc}); "
            "use flag names from stdatamodels' dqflags.pixel joined with '+' "
            "(or ','), optionally preceded by '~', e.g. '~DO_NOT_USE+NON_SCIENCE', "
            "an integer, or None to ignore DQ"
        ) from None


def weight_array(model):
    """Return the model's weight (coverage) array or None.

    ``wht`` for images, ``weightmap`` for IFU cubes.
    """
    for name in ("wht", "weightmap"):
        arr = _get_array(model, name)
        if arr is not None:
            return arr
    return None


def _get_array(model, name):
    try:
        arr = getattr(model, name)
    except AttributeError:
        return None
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.shape != np.shape(model.data):
        return None
    return arr


def model_sigma(model):
    """Per-pixel uncertainty of the data, or None when the model has no ERR.

    The ERR array is used as sigma. For IFU cubes whose
    ``meta.ifu.error_type`` says the ERR extension holds a variance
    (``VAR``), an inverse variance (``IVAR``) or an inverse error (``IERR``),
    it is converted to a standard deviation first.

    Returns
    -------
    numpy.ndarray or None
        Floating-point array of the data's shape (ERR's own precision is
        kept, so float32 ERR costs no extra memory; the engine sums in
        float64).
    """
    err = _get_array(model, "err")
    if err is None:
        return None
    err = np.asarray(err)
    if err.dtype.kind != "f":
        err = err.astype(np.float64)
    if not np.any(err > 0):
        # an ERR array with no positive value (e.g. a default-filled one)
        # carries no uncertainty information: treat it as absent
        return None
    etype = None
    try:
        etype = model.meta.ifu.error_type
    except AttributeError:
        pass
    with np.errstate(divide="ignore", invalid="ignore"):
        if etype == "VAR":
            err = np.sqrt(err)
        elif etype == "IVAR":
            err = 1.0 / np.sqrt(err)
        elif etype == "IERR":
            err = 1.0 / err
    return err


def valid_mask(model, dqflags=None, sigma=None):
    """Valid-pixel mask of one model.

    A pixel is valid when its data value is finite, its sigma (from ERR) is
    finite and positive, its DQ passes ``dqflags`` (when the model has a DQ
    array and ``dqflags`` is not None) and its weight is positive (when the
    model has a ``wht`` / ``weightmap`` array).

    Parameters
    ----------
    model : DataModel
        Model with a ``data`` array.
    dqflags : int or None
        Output of :func:`interpret_dqbits`.
    sigma : numpy.ndarray or None
        Output of :func:`model_sigma` (computed when not given).

    Returns
    -------
    numpy.ndarray of bool
    """
    from astropy.nddata.bitmask import bitfield_to_boolean_mask

    data = np.asarray(model.data)
    mask = np.isfinite(data)
    if sigma is None:
        sigma = model_sigma(model)
    if sigma is not None:
        with np.errstate(invalid="ignore"):
            mask &= np.isfinite(sigma) & (sigma > 0)
    if dqflags is not None:
        dq = _get_array(model, "dq")
        if dq is not None:
            mask &= bitfield_to_boolean_mask(
                dq, dqflags, good_mask_value=True, dtype=bool
            )
    wht = weight_array(model)
    if wht is not None:
        with np.errstate(invalid="ignore"):
            mask &= wht > 0
    return mask
