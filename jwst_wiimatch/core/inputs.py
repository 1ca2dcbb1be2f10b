"""Checking and normalising the arguments of the engine.

Everything a user can pass to ``match_lsq`` is checked here once, and turned
into plain numpy arrays (never copied when they already are arrays: inputs may
be memory-mapped) so that the accumulation code can trust its inputs. Errors
name the argument and say how to fix it.
"""
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

__all__ = ["Problem", "check_inputs", "check_degree", "check_center", "check_solver",
           "check_origins"]

SOLVERS = ("RLU", "PINV")


@dataclass
class Problem:
    """Validated inputs of one matching problem."""

    images: list  # arrays on the grid, or cutouts of it (see ``origins``)
    masks: list  # entries: None (all valid) or an array of its image's shape
    sigmas: list  # entries: float (constant sigma) or an array of its image's shape
    has_sigmas: bool
    shape: tuple  # the grid's shape
    degree: tuple  # (x, y, ...) order
    origins: list = None  # grid index (numpy order) of each image's first pixel


def _as_real_array(x, what):
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged nested lists and the like
            raise TypeError(
                f"{what} could not be converted to a numeric array ({exc}); pass a "
                "numpy array (or nested lists of numbers of one shape)."
            ) from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(
            f"{what} has dtype {arr.dtype}; only real numeric data (bool, integer or "
            "float) can be matched."
        )
    return arr


def check_solver(solver):
    """Return the solver name in upper case, or raise ``ValueError``."""
    if not isinstance(solver, str) or solver.upper() not in SOLVERS:
        raise ValueError(
            f"'solver' must be one of {', '.join(repr(s) for s in SOLVERS)}; got {solver!r}."
        )
    return solver.upper()


def check_degree(degree, ndim):
    """Return ``degree`` as a tuple of ``ndim`` non-negative ints (``(x, y, ...)`` order)."""
    if isinstance(degree, (Integral, np.integer)) and not isinstance(degree, bool):
        degs = (int(degree),) * ndim
    elif isinstance(degree, str) or not np.iterable(degree):
        raise TypeError(
            f"'degree' must be an integer or a sequence of {ndim} integers (one per "
            f"axis, in (x, y, ...) order); got {degree!r}."
        )
    else:
        degs = tuple(degree)
        if len(degs) != ndim:
            raise ValueError(
                f"'degree' has {len(degs)} entries but the images have {ndim} "
                f"dimensions: give one degree per axis (in (x, y, ...) order) or a "
                "single integer."
            )
        out = []
        for d in degs:
            if isinstance(d, bool) or not isinstance(d, (Integral, np.integer)):
                if isinstance(d, (Real, np.floating)) and float(d).is_integer():
                    d = int(d)
                else:
                    raise TypeError(
                        f"'degree' entries must be integers; got {d!r} in {degree!r}."
                    )
            out.append(int(d))
        degs = tuple(out)
    if any(d < 0 for d in degs):
        raise ValueError(f"'degree' must be >= 0 along every axis; got {degree!r}.")
    return degs


def check_center(center, ndim):
    """Return ``center`` as a tuple of ``ndim`` floats, or ``None``."""
    if center is None:
        return None
    if isinstance(center, (Real, np.number)) and not isinstance(center, bool):
        vals = (float(center),) * ndim
    else:
        try:
            vals = tuple(float(c) for c in center)
        except (TypeError, ValueError):
            raise TypeError(
                f"'center' must be None, a number, or a sequence of {ndim} numbers in "
                f"(x, y, ...) order; got {center!r}."
            ) from None
    if len(vals) != ndim:
        raise ValueError(
            f"'center' has {len(vals)} coordinates but the images have {ndim} "
            "dimensions: give one coordinate per axis in (x, y, ...) order."
        )
    if not all(np.isfinite(vals)):
        raise ValueError(f"'center' must be finite; got {center!r}.")
    return vals


def _check_per_image(value, name, n, kind, fix):
    """Raise unless ``value`` is a sequence of ``n`` entries (one per image)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"'{name}' must be None or {kind}.")
    if len(value) != n:
        raise ValueError(
            f"'{name}' has {len(value)} entries but there are {n} images: {fix}."
        )


def check_origins(origins, grid_shape, shapes):
    """Validate cutout origins (and the grid shape) for images of ``shapes``.

    Returns
    -------
    origins : list of tuple of int
        Grid index (numpy order) of each image's first pixel.
    grid_shape : tuple of int
    """
    n, ndim = len(shapes), len(shapes[0])
    _check_per_image(origins, "origins", n,
                     f"a list of {n} index tuples (numpy order), the grid position of "
                     "each image's first pixel",
                     "give one origin (grid index of the cutout's first pixel, numpy "
                     "order) per image")
    out = []
    for k, o in enumerate(origins):
        try:
            vals = tuple(np.atleast_1d(np.asarray(o)).tolist())
        except Exception:
            vals = None
        if (vals is None or len(vals) != ndim
                or not all(isinstance(v, Integral) and not isinstance(v, bool)
                           or isinstance(v, float) and v.is_integer() for v in vals)):
            raise ValueError(
                f"origins[{k}] = {o!r} must be {ndim} integers (numpy order: the grid "
                f"index of images[{k}][0, ...])."
            )
        vals = tuple(int(v) for v in vals)
        if any(v < 0 for v in vals):
            raise ValueError(f"origins[{k}] = {vals} has a negative index: cutouts must "
                             "lie inside the grid.")
        out.append(vals)
    ends = [tuple(o + s for o, s in zip(org, shp)) for org, shp in zip(out, shapes)]
    if grid_shape is None:
        grid = tuple(max(e[j] for e in ends) for j in range(ndim))
    else:
        try:
            grid = tuple(int(v) for v in grid_shape)
        except (TypeError, ValueError):
            raise TypeError(f"'grid_shape' must be a tuple of {ndim} integers; got "
                            f"{grid_shape!r}.") from None
        if len(grid) != ndim or any(v < 1 for v in grid):
            raise ValueError(f"'grid_shape' must be {ndim} positive integers; got "
                             f"{grid_shape!r}.")
        for k, e in enumerate(ends):
            if any(a > b for a, b in zip(e, grid)):
                raise ValueError(
                    f"images[{k}] (shape {shapes[k]}) placed at origins[{k}] = {out[k]} "
                    f"reaches {e}, outside grid_shape {grid}: make the grid larger or "
                    "crop the cutout."
                )
    return out, grid


def check_inputs(images, masks, sigmas, degree, origins=None, grid_shape=None):
    """Validate ``images``, ``masks``, ``sigmas`` and ``degree``.

    With ``origins``, images are cutouts of a grid of ``grid_shape`` (default:
    the smallest grid holding them all), each of its own shape; masks and
    sigmas have the shape of their image.

    Returns
    -------
    Problem
    """
    if isinstance(images, np.ndarray) and images.ndim >= 2:
        images = list(images)
    if images is None or isinstance(images, (str, bytes)) or not hasattr(images, "__len__"):
        raise TypeError(
            "'images' must be a list of arrays (one per image, all of one shape); "
            f"got {type(images).__name__}."
        )
    if len(images) == 0:
        raise ValueError("'images' is empty: pass a list of at least one image array.")
    imgs = [_as_real_array(im, f"images[{k}]") for k, im in enumerate(images)]
    shape = imgs[0].shape
    if len(shape) == 0:
        raise ValueError("images[0] is a scalar: images must be arrays with ndim >= 1.")
    for k, im in enumerate(imgs):
        if origins is None and im.shape != shape:
            raise ValueError(
                f"images[{k}] has shape {im.shape} but images[0] has shape {shape}: "
                "all images must be on one common pixel grid."
            )
        if origins is not None and im.ndim != len(shape):
            raise ValueError(
                f"images[{k}] has {im.ndim} dimensions but images[0] has {len(shape)}: "
                "cutouts of one grid have the grid's number of dimensions."
            )
    n = len(imgs)
    if origins is None:
        if grid_shape is not None and tuple(grid_shape) != shape:
            raise ValueError(
                f"'grid_shape' {tuple(grid_shape)} differs from the images' shape "
                f"{shape}; it is only needed with 'origins' (cutouts)."
            )
        orgs = [(0,) * len(shape)] * n
    else:
        orgs, shape = check_origins(origins, grid_shape, [im.shape for im in imgs])

    if masks is None:
        msk = [None] * n
    else:
        _check_per_image(masks, "masks", n, f"a list of {n} arrays",
                         "give one mask per image (None for an image whose pixels are "
                         "all valid)")
        msk = []
        for k, m in enumerate(masks):
            if m is None:
                msk.append(None)
                continue
            arr = _as_real_array(m, f"masks[{k}]")
            if arr.shape != imgs[k].shape:
                raise ValueError(
                    f"masks[{k}] has shape {arr.shape} but images[{k}] has shape "
                    f"{imgs[k].shape}."
                )
            msk.append(arr)

    has_sigmas = sigmas is not None
    sig = [1.0] * n
    if sigmas is not None:
        if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__"):
            raise TypeError(f"'sigmas' must be None or a list of {n} arrays or numbers.")
        n_none = sum(s is None for s in sigmas)
        if n_none == len(sigmas):
            has_sigmas = False
        elif n_none:
            raise ValueError(
                "'sigmas' mixes None with arrays/numbers: give a sigma for every image, "
                "or pass sigmas=None for equal weights."
            )
        if len(sigmas) != n:
            raise ValueError(
                f"'sigmas' has {len(sigmas)} entries but there are {n} images: give one "
                "sigma (array or number) per image."
            )
        if has_sigmas:
            sig = []
            for k, s in enumerate(sigmas):
                arr = _as_real_array(s, f"sigmas[{k}]")
                if arr.ndim == 0:
                    sig.append(float(arr))
                elif arr.shape != imgs[k].shape:
                    raise ValueError(
                        f"sigmas[{k}] has shape {arr.shape} but images[{k}] has shape "
                        f"{imgs[k].shape}: give an array of the image's shape or a number."
                    )
                else:
                    sig.append(arr)

    return Problem(
        images=imgs,
        masks=msk,
        sigmas=sig,
        has_sigmas=has_sigmas,
        shape=shape,
        degree=check_degree(degree, len(shape)),
        origins=orgs,
    )
