"""Checking and normalising the arguments of the engine.

Everything a user can pass to ``match_lsq`` is checked here once, and turned
into plain numpy arrays (never copied when they already are arrays: inputs may
be memory-mapped) so that the accumulation code can trust its inputs. Errors
name the argument and say how to fix it.
"""
import math
import os
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

__all__ = ["Problem", "PartsArray", "check_inputs", "check_degree", "check_center",
           "check_solver", "check_origins", "check_size", "MatchWarning"]

SOLVERS = ("RLU", "PINV")

# Sigmas are used through their squares: the smallest and largest sigma whose
# square (and the sum of two squares) is a finite, normal float64.
SIGMA_MIN = float(np.sqrt(np.finfo(np.float64).tiny))
SIGMA_MAX = float(np.sqrt(np.finfo(np.float64).max / 4))
# Integers of larger magnitude are not all exactly representable in float64.
FLOAT64_EXACT_INT = 2**53
# Bytes of float64 matrices of the size of the normal equations held at once
# while they are assembled and solved (a, the reduced system, its scaled copy,
# the factorisation or eigenvectors, ``ext_return``'s copy).
NORMAL_COPIES = 5


class MatchWarning(UserWarning):
    """Something about the inputs that the result depends on (see the message)."""


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
    sigma_scale: float = 1.0  # array sigmas are divided by this (scalars already are)
    unusable: dict = field(default_factory=dict)  # image -> why it has no usable pixel
    #: per image: ``(lo, hi)`` outside which a value is left out as absurd (e.g. an
    #: unflagged fill value), or None; None: no cut (the reference behaviour)
    limits: list = None
    #: boolean mask of the terms the polynomials have (:func:`.poly.term_mask`);
    #: None: every term of the tensor set of ``degree``
    terms: object = None


class _ReadByParts:
    """What the arrays read by parts share (here and in the steps' scratch files):
    ``np.asarray`` of one reads it whole (``self[...]`` over every axis)."""

    def __array__(self, dtype=None, copy=None):
        arr = self[(slice(None),) * self.ndim]
        return arr if dtype is None else arr.astype(dtype, copy=False)


class PartsArray(_ReadByParts):
    """An input array that the engine reads by parts (blocks, strided samples).

    Wraps any object with ``shape``, ``dtype`` and numpy-style indexing by a
    tuple of slices (``obj[slices]`` returning an array): memory-mapped
    files, h5py datasets, zarr arrays, dask arrays, or a reader of your own.
    The engine then never holds more than a block of the grid of it at
    once, except for a transient whole read of one image at a time for a
    few checks (``np.asarray`` of this object reads it whole).
    """

    def __init__(self, src, what):
        self.src = src
        self.shape = tuple(int(n) for n in src.shape)
        self.dtype = np.dtype(src.dtype)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.what = what

    def __getitem__(self, key):
        """The part ``key`` (a tuple of one slice per axis), as a numpy array."""
        try:
            arr = np.asarray(self.src[key])
        except Exception as exc:
            raise TypeError(
                f"{self.what}: reading the part {_show(key)} failed ({type(exc).__name__}: "
                f"{exc}); the engine reads array-likes by slicing them with a tuple of "
                f"slices: pass a numpy array instead (np.asarray of it)."
            ) from exc
        want = tuple(len(range(*k.indices(n))) for k, n in zip(key, self.shape))
        if arr.shape != want:
            raise ValueError(
                f"{self.what}: reading the part {_show(key)} gave an array of shape "
                f"{arr.shape}, not {want}: its reader does not slice like a numpy array "
                f"of its declared shape {self.shape}; pass a numpy array instead."
            )
        if arr.dtype != self.dtype:  # e.g. a reader that scales on the way
            arr = arr.astype(self.dtype)
        return arr

    def __len__(self):
        return self.shape[0]


def _show(key):
    """``[a:b, c:d:s]`` for a tuple of slices."""
    parts = []
    for k in key:
        txt = f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}"
        parts.append(txt if k.step in (None, 1) else f"{txt}:{k.step}")
    return "[" + ", ".join(parts) + "]"


def _read_by_parts(x):
    """True for array-likes the engine reads by slicing: not numpy arrays or lists,
    with ``__getitem__``, a shape of ints and a numpy dtype (others, such as
    tensors of other libraries, are converted whole with ``np.asarray``)."""
    if isinstance(x, (np.ndarray, list, tuple)) or not hasattr(x, "__getitem__"):
        return False
    try:
        tuple(int(n) for n in x.shape)
        np.dtype(x.dtype)
    except (AttributeError, TypeError, ValueError):
        return False
    return True


def _as_real_array(x, what):
    if isinstance(x, (np.ndarray, PartsArray)):
        arr = x
    elif _read_by_parts(x):
        arr = PartsArray(x, what)
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
            f"'degree' must be an integer, a sequence of {ndim} integers (one per "
            f"axis, in (x, y, ...) order) or 'auto' (match_backgrounds); got {degree!r}."
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


def _memory_bytes():
    """Physical memory of this machine in bytes (None when it cannot be told)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes):
    return f"{nbytes / 2**30:.3g} GiB"


def check_size(degree, sizes, memory=None):
    """Refuse a degree whose unknowns cannot be solved for, before any work.

    Parameters
    ----------
    degree : tuple of int
        Validated degree, ``(x, y, ...)`` order.
    sizes : sequence of int
        Number of pixels of each image.
    memory : int, None
        Bytes available (default: the machine's physical memory).

    Raises
    ------
    ValueError
        When the unknowns (``N * prod(D_j + 1)``) outnumber the pixels of the
        images (when there are any), or when the normal equations would not
        fit in memory.
    """
    n = len(sizes)
    nterms = math.prod(d + 1 for d in degree)
    unknowns = n * nterms
    npix = int(sum(sizes))
    if unknowns > npix > 0:  # (no pixel at all: every image is warned about)
        raise ValueError(
            f"'degree' {degree} gives {nterms} polynomial terms per image, {unknowns} "
            f"unknowns for {n} image(s), more than the {npix} pixels of the images: "
            "the fit cannot determine them. Lower the degree (one term per axis and "
            "degree: prod(degree + 1) terms per image)."
        )
    need = NORMAL_COPIES * 8 * unknowns**2
    need += 8 * (n * (n - 1) // 2) * (math.prod(2 * d + 1 for d in degree) + nterms)
    memory = _memory_bytes() if memory is None else memory
    if memory is not None and need > memory:
        raise ValueError(
            f"'degree' {degree} gives {unknowns} unknowns ({n} image(s) x {nterms} "
            f"terms): the normal equations would need about {_gib(need)} of memory, "
            f"more than the {_gib(memory)} of this machine. Lower the degree, or match "
            "fewer images at once."
        )


class OffsetInteger:
    """An integer image minus a common integer offset, read as int64 by blocks.

    Matching depends only on differences between images, so subtracting one
    integer from all of them changes nothing, and it keeps integers beyond
    2**53 exact when they are converted to float64 for the sums. Indexing
    (``img[slices]``) returns ``int64``; ``shape``, ``ndim`` and ``dtype``
    are those an array would have.
    """

    def __init__(self, arr, offset):
        self.arr = arr
        self.offset = int(offset)
        self.shape = arr.shape
        self.ndim = arr.ndim
        self.dtype = np.dtype(np.int64)

    def __getitem__(self, key):
        # modulo 2**64, right wherever the difference fits in int64 (it does
        # wherever the mask marks the pixel valid: checked in check_inputs)
        a = np.asarray(self.arr[key]).astype(np.uint64)
        return (a - np.uint64(self.offset % 2**64)).view(np.int64)


def _int_range(arr, mask):
    """(min, max) as Python ints over the pixels ``mask`` marks valid, or None."""
    arr = np.asarray(arr)  # arrays read by parts: whole, one image at a time
    if mask is None:
        if arr.size == 0:
            return None
        return int(arr.min()), int(arr.max())
    ok = np.asarray(mask).astype(bool)
    if not ok.any():
        return None
    info = np.iinfo(arr.dtype)
    return (int(np.min(arr, where=ok, initial=info.max)),
            int(np.max(arr, where=ok, initial=info.min)))


def _exact_integers(imgs, masks):
    """Make 64-bit integer images exact in float64 when a common offset can.

    Returns the images (some wrapped in :class:`OffsetInteger`); warns with
    :class:`MatchWarning` when values that float64 cannot hold remain,
    naming the images and the size of the rounding.
    """
    big = [k for k, im in enumerate(imgs) if im.dtype.kind in "iu" and im.dtype.itemsize >= 8]
    if not big:
        return imgs
    ranges = {k: _int_range(imgs[k], masks[k]) for k in big}
    ranges = {k: r for k, r in ranges.items() if r is not None}
    if not ranges or all(max(-lo, hi) <= FLOAT64_EXACT_INT for lo, hi in ranges.values()):
        return imgs
    offset = 0
    if all(im.dtype.kind in "iu" for im in imgs):
        # all integers: one common offset keeps them exact
        for k, im in enumerate(imgs):
            if k not in big:
                r = _int_range(im, masks[k])
                if r is not None:
                    ranges[k] = r
        lo = min(r[0] for r in ranges.values())
        hi = max(r[1] for r in ranges.values())
        if hi - lo < 2**63:
            offset = (lo + hi) // 2
            imgs = [OffsetInteger(im, offset) for im in imgs]
    lost = {k: max(abs(lo - offset), abs(hi - offset)) for k, (lo, hi) in ranges.items()}
    lost = {k: v for k, v in lost.items() if v > FLOAT64_EXACT_INT}
    if lost:
        desc = ", ".join(
            f"images[{k}]: values up to {float(v):.3g}, rounded by up to "
            f"{2.0 ** (v.bit_length() - 54):.3g}" for k, v in sorted(lost.items()))
        where = "" if offset == 0 else f" (after subtracting {offset} from every image)"
        warnings.warn(
            "integer images hold values beyond 2**53, which float64 cannot represent "
            f"exactly{where}: the sums are made in float64, so these values are "
            f"rounded ({desc}). Subtract a common level from the images first.",
            MatchWarning, stacklevel=5)
    return imgs


def _sigma_range(s, mask):
    """``(usable, lo, hi)``: pixels with a usable sigma and its smallest/largest value.

    Usable: the mask marks the pixel valid and its sigma is finite and > 0.
    """
    s = np.asarray(s)
    if s.size == 0:
        return 0, np.inf, 0.0
    if s.dtype.kind != "f":
        s = s.astype(np.float64)
    lo, hi = float(np.min(s)), float(np.max(s))
    if mask is None and lo > 0 and np.isfinite(hi):
        return s.size, lo, hi
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(s) & (s > 0)
    if mask is not None:
        ok &= np.asarray(mask).astype(bool)
    usable = int(np.count_nonzero(ok))
    if not usable:
        return 0, np.inf, 0.0
    return usable, float(np.min(s, where=ok, initial=np.inf)), \
        float(np.max(s, where=ok, initial=0.0))


def sigma_unusable(k, sigma, mask):
    """Why ``sigmas[k]`` leaves image ``k`` no usable pixel, or None when it does not."""
    if isinstance(sigma, float):
        if sigma > 0 and np.isfinite(sigma):
            return None
        return f"sigmas[{k}] = {sigma!r} is not a positive finite number"
    if math.prod(np.shape(sigma)) == 0 or _sigma_range(sigma, mask)[0]:
        return None
    where = "every pixel" if mask is None else "every pixel the mask marks valid"
    return f"sigmas[{k}] is zero, negative or non-finite at {where}"


def common_sigma_scale(sigmas, masks):
    """A factor to divide all sigmas by so that their squares can be summed in float64.

    The solution does not depend on a common scale of all the weights
    ``1 / (sigma_l**2 + sigma_m**2)``; sigmas too small (``1e-200``) or too
    large for their squares are made usable by dividing all of them by the
    geometric middle of their range (the engine does this only when some
    pixel's sigma is out of range: it costs a pass over the sigmas).

    Raises
    ------
    ValueError
        When the usable sigmas span a range whose squares no common factor
        brings into float64.
    """
    lo, hi, klo, khi = np.inf, 0.0, None, None
    for k, (s, m) in enumerate(zip(sigmas, masks)):
        if isinstance(s, float):
            n, slo, shi = (1, s, s) if s > 0 and np.isfinite(s) else (0, 0.0, 0.0)
        else:
            n, slo, shi = _sigma_range(s, m)
        if n and slo < lo:
            lo, klo = slo, k
        if n and shi > hi:
            hi, khi = shi, k
    if not hi > 0:
        return 1.0
    # the geometric middle of the range becomes 1 (in logs: no overflow)
    scale = 2.0 ** ((math.log2(lo) + math.log2(hi)) / 2)
    if not (SIGMA_MIN < lo / scale and hi / scale <= SIGMA_MAX):
        raise ValueError(
            f"'sigmas' span {lo:.3g} (in sigmas[{klo}]) to {hi:.3g} (in sigmas[{khi}]): "
            "their squares cannot be held in float64 together, even after a common "
            "rescaling. Check the sigmas (give 0 or NaN for pixels not to use)."
        )
    return scale


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
    if origins is None and 0 in shape:
        raise ValueError(
            f"images[0] has shape {shape}, with an axis of length 0: every axis of the "
            "images needs at least one pixel."
        )
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
        if 0 in shape:
            raise ValueError(
                f"the cutouts (images placed at origins) span a grid of shape {shape}, "
                "with an axis of length 0: give 'grid_shape' or cutouts with at least "
                "one pixel along every axis."
            )

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

    degs = check_degree(degree, len(shape))
    check_size(degs, [im.size for im in imgs])
    unusable = {}
    if has_sigmas:  # scalars only here: arrays are checked while they are summed
        unusable = {k: sigma_unusable(k, s, None) for k, s in enumerate(sig)
                    if isinstance(s, float)}
        unusable = {k: v for k, v in unusable.items() if v}
    imgs = _exact_integers(imgs, msk)
    return Problem(
        images=imgs,
        masks=msk,
        sigmas=sig,
        has_sigmas=has_sigmas,
        shape=shape,
        degree=degs,
        origins=orgs,
        unusable=unusable,
    )
