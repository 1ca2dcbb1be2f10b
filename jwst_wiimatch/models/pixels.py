"""Pixels of one model: which are valid, and how uncertain.

A pixel is valid when its data and sigma are finite, sigma > 0, its DQ passes
the ``dqbits`` selection and its weight (``wht``/``weightmap``) is positive.
Every array used here must have the data's shape: one that does not is an
error naming the model and the array, never silently ignored.
"""

import numpy as np

__all__ = ["DEFAULT_DQBITS", "interpret_dqbits", "weight_array", "model_sigma",
           "valid_mask", "err_status", "sigma_from_err", "mask_from_arrays"]

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


def weight_array(model, name=None):
    """Return the model's weight (coverage) array or None.

    ``wht`` for images, ``weightmap`` for IFU cubes. ``name`` names the model
    in errors (default: its ``meta.filename``).

    Raises
    ------
    ValueError
        When the array's shape differs from the data's.
    """
    for attr in ("wht", "weightmap"):
        arr = _get_array(model, attr, name)
        if arr is not None:
            return arr
    return None


def _describe(model):
    try:
        filename = model.meta.filename
    except AttributeError:
        filename = None
    return f"model {filename}" if filename else "the model"


def _get_array(model, attr, name=None):
    """``model.<attr>`` as an array of the data's shape, or None when absent."""
    try:
        arr = getattr(model, attr)
    except AttributeError:
        return None
    if arr is None:
        return None
    arr = np.asarray(arr)
    shape = np.shape(model.data)
    if arr.shape != shape:
        ext = attr.upper()
        raise ValueError(
            f"{name or _describe(model)}: its {ext} array has shape {arr.shape} but its "
            f"data (SCI) array has shape {shape}; every array wiimatch uses (ERR, DQ, "
            f"WHT/WEIGHTMAP) must have the data's shape: fix or remove the {ext} array"
        )
    return arr


def err_status(model, name=None):
    """Why a model has no usable ERR: None (it has one), ``'missing'`` or ``'not positive'``.

    ``'not positive'``: an ERR array is there but holds no positive value
    (e.g. one filled with zeros by default); such an array carries no
    uncertainty and is treated as absent.
    """
    err = _get_array(model, "err", name)
    if err is None:
        return "missing"
    with np.errstate(invalid="ignore"):
        return None if np.any(np.asarray(err) > 0) else "not positive"


def model_sigma(model, name=None):
    """Per-pixel uncertainty of the data, or None when the model has no ERR.

    The ERR array is used as sigma. For IFU cubes whose
    ``meta.ifu.error_type`` says the ERR extension holds a variance
    (``VAR``), an inverse variance (``IVAR``) or an inverse error (``IERR``),
    it is converted to a standard deviation first.

    Parameters
    ----------
    model : DataModel
    name : str, optional
        How the model is named in errors (default: its ``meta.filename``).

    Returns
    -------
    numpy.ndarray or None
        Floating-point array of the data's shape (ERR's own precision is
        kept, so float32 ERR costs no extra memory; the engine sums in
        float64). None when the model has no ERR array or one without any
        positive value (see `err_status`).

    Raises
    ------
    ValueError
        When the ERR array's shape differs from the data's.
    """
    return sigma_from_err(_get_array(model, "err", name), model)


def sigma_from_err(err, model, positive=None):
    """`model_sigma` of an ERR array (the whole array, or a box of it) of ``model``.

    None when ``err`` is None or holds no positive value; ``model`` gives
    ``meta.ifu.error_type``. ``positive``: whether the model's whole ERR
    array holds a positive value, when ``err`` is only a box of it (default:
    tested on ``err``).
    """
    if err is None:
        return None
    if err.dtype.kind != "f":
        err = err.astype(np.float64)
    if positive is None:
        with np.errstate(invalid="ignore"):
            positive = np.any(err > 0)
    if not positive:
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


def valid_mask(model, dqflags=None, sigma=None, name=None):
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
    name : str, optional
        How the model is named in errors (default: its ``meta.filename``).

    Returns
    -------
    numpy.ndarray of bool

    Raises
    ------
    ValueError
        When an array used (ERR, DQ when ``dqflags`` is given, WHT or
        WEIGHTMAP) does not have the data's shape.
    """
    if sigma is None:
        sigma = model_sigma(model, name)
    dq = _get_array(model, "dq", name) if dqflags is not None else None
    return mask_from_arrays(model.data, sigma, dq, dqflags, weight_array(model, name))


def mask_from_arrays(data, sigma, dq, dqflags, wht):
    """`valid_mask` from the arrays themselves (whole, or the same box of each).

    ``sigma``, ``dq`` and ``wht`` may be None (not used).
    """
    from astropy.nddata.bitmask import bitfield_to_boolean_mask

    data = np.asarray(data)
    mask = np.isfinite(data)
    if sigma is not None:
        with np.errstate(invalid="ignore"):
            mask &= np.isfinite(sigma) & (sigma > 0)
    if dqflags is not None and dq is not None:
        mask &= bitfield_to_boolean_mask(dq, dqflags, good_mask_value=True, dtype=bool)
    if wht is not None:
        with np.errstate(invalid="ignore"):
            mask &= wht > 0
    return mask
