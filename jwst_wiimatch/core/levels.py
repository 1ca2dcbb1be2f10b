"""Level conventions: which polynomial common to a group the solution carries.

Matching determines the backgrounds of a connected group of overlapping
images only up to one polynomial common to all of them. This module owns
the choice of that polynomial (see ``docs/algorithm.rst``, "Level
conventions"):

``'zero_sum'``
    every coefficient sums to zero over the group's images (wiimatch
    0.3.2's normalisation, the default of the engine);
``'lowest'`` / ``'highest'``
    jwst skymatch's ``match_down=True`` / ``False``: the image whose
    background is lowest (highest) keeps it, i.e. its polynomial is 0, and
    the others are fitted to it. An image's background level, for this
    choice, is the mean of its polynomial over its own valid pixels (every
    valid pixel counts once, with equal weight), computed from the
    zero-sum solution; ties go to the first image;
reference images (``reference``)
    the images of a set are held fixed (polynomials 0) and the others are
    fitted to them: a constrained least-squares fit, their unknowns dropped
    from the group's normal equations; a group without a reference image
    falls back to the convention above, with a warning;
absolute levels (``levels``)
    after the above, each group's constant term is shifted by one common
    constant, chosen so that the images' backgrounds at the center
    (``X = 0``, the refpoint of the steps) agree in the least-squares sense
    with the levels given (NaN or None: unknown).
"""
import itertools
import warnings

import numpy as np

from .accumulate import BLOCK_PIXELS, _prepare_image, block_shape
from .inputs import MatchWarning
from .poly import exponents

__all__ = ["LEVEL_CONVENTIONS", "check_level_args", "image_means", "pick_extreme",
           "level_shifts"]

#: Values of ``level`` in :func:`jwst_wiimatch.core.match_backgrounds`.
LEVEL_CONVENTIONS = ("zero_sum", "lowest", "highest")


def check_level_args(level, reference, levels, nimages):
    """Checked ``(level, reference, levels)``.

    Returns the convention name, the reference images as a sorted list of
    indices (or None) and the levels as a float array with NaN for unknown
    (or None). Raises ValueError / TypeError naming the argument.
    """
    if not isinstance(level, str) or level.lower() not in LEVEL_CONVENTIONS:
        raise ValueError(
            f"'level' must be one of {', '.join(repr(c) for c in LEVEL_CONVENTIONS)}; "
            f"got {level!r}.")
    level = level.lower()
    refs = None
    if reference is not None:
        items = [reference] if np.ndim(reference) == 0 else list(reference)
        refs = set()
        for r in items:
            if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
                raise TypeError(
                    f"'reference' must be an image index or a sequence of indices; got "
                    f"{r!r} in it.")
            if not -nimages <= int(r) < nimages:
                raise ValueError(
                    f"'reference' holds index {int(r)}, but there are {nimages} images "
                    f"(indices 0 to {nimages - 1}).")
            refs.add(int(r) % nimages)
        if not refs:
            raise ValueError("'reference' is empty: give at least one image index, or None.")
        refs = sorted(refs)
    lev = None
    if levels is not None:
        items = list(levels)
        if len(items) != nimages:
            raise ValueError(
                f"'levels' has {len(items)} values but there are {nimages} images: give "
                "one per image (None or NaN where unknown).")
        try:
            lev = np.array([np.nan if v is None else float(v) for v in items])
        except (TypeError, ValueError):
            raise TypeError(
                f"'levels' must hold numbers (None or NaN where unknown); got {levels!r}."
            ) from None
        if np.isinf(lev).any():
            raise ValueError("'levels' must be finite numbers (NaN or None where unknown).")
        if not np.isfinite(lev).any():
            raise ValueError("'levels' gives no level (all None or NaN): give at least one.")
        if refs is not None:
            raise ValueError(
                "'reference' and 'levels' cannot both be given: reference images keep "
                "background 0, levels set the background of the images that have one.")
    return level, refs, lev


def image_means(prob, frame):
    """Mean of every scaled monomial ``u**p`` over each image's own valid pixels.

    Returns an ``(N, M)`` array (rows of images without a valid pixel are
    0): the mean of an image's polynomial over its valid pixels is
    ``coef_u[n] @ means[n]``. A pixel is valid as in the fit (mask, finite
    data and sigma, usable sigma) and has finite coordinates; each counts
    once. One pass over each image's pixels, a block at a time.
    """
    exps = exponents(prob.degree)
    n = len(prob.images)
    out = np.zeros((n, len(exps)))
    for l in range(n):
        shape = np.shape(prob.images[l])
        origin = prob.origins[l]
        bs = block_shape(shape, BLOCK_PIXELS)
        sums = np.zeros(len(exps))
        count = 0
        for start in itertools.product(*[range(0, s, b) for s, b in zip(shape, bs)]):
            box = tuple((o + a, o + min(a + b, s))
                        for o, a, b, s in zip(origin, start, bs, shape))
            valid = _prepare_image(prob, l, box)[2]
            if not valid.any():
                continue
            slices = tuple(slice(a, b) for a, b in box)
            if frame.separable:
                grids = np.meshgrid(*[np.arange(a, b) for a, b in box], indexing="ij")
                u = [frame.axis_u(j)[grids[frame.ndim - 1 - j]] for j in range(frame.ndim)]
            else:
                u = frame.block_u(slices)
                valid = valid & np.logical_and.reduce([np.isfinite(c) for c in u])
            uv = [c[valid] for c in u]
            count += int(uv[0].size)
            for k, p in enumerate(exps):
                term = np.ones(uv[0].size)
                for c, e in zip(uv, p):
                    if e:
                        term = term * c ** int(e)
                sums[k] += float(term.sum())
        if count:
            out[l] = sums / count
    return out


def pick_extreme(comps, coef_u, means, highest=False):
    """Per group, the image whose mean background is lowest (highest).

    Returns ``({group index: image}, mean backgrounds (N,))``.
    """
    mean = np.einsum("nm,nm->n", coef_u, means)
    picks = {}
    for g, comp in enumerate(comps):
        vals = mean[comp]
        picks[g] = comp[int(np.argmax(vals) if highest else np.argmin(vals))]
    return picks, mean


def level_shifts(comps, coef, levels, ids=None):
    """Per-group constants that bring ``coef[:, 0]`` to ``levels`` (least squares).

    ``coef[n, 0]`` is image ``n``'s background at the center. Groups (of
    two or more images) without a given level get no shift and are named in a
    :class:`MatchWarning`. Returns ``{group index: constant}``.
    """
    ids = list(range(len(coef))) if ids is None else list(ids)
    shifts, missing = {}, []
    for g, comp in enumerate(comps):
        known = [i for i in comp if np.isfinite(levels[i])]
        if not known:
            missing.append(comp)
            continue
        shifts[g] = float(np.mean([levels[i] - coef[i, 0] for i in known]))
    if missing:
        desc = "; ".join("[" + ", ".join(str(ids[i]) for i in c) + "]" for c in missing)
        warnings.warn(
            f"no level was given for any image of the group(s) {desc}: their common "
            "level is left as the convention 'level' sets it.", MatchWarning, stacklevel=4)
    return shifts
