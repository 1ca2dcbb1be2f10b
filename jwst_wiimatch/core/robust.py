"""Robust matching: a start that junk cannot move, then reweighted passes.

Plain least squares lets every pixel pull on the fit in proportion to its
residual: one unflagged cosmic ray, satellite trail or fill value in one
image moves every background. Robust matching (``robust=`` of
:func:`jwst_wiimatch.core.match_backgrounds`) works on the normalised pair
residuals

.. math::

    r_{lm}(k) = \\frac{(I_l - P_l) - (I_m - P_m)}{\\sqrt{\\sigma_l^2 + \\sigma_m^2}}

in three steps:

1. **Absurd values** (outside ``median +- 1e10 x spread`` of each image, e.g.
   an unflagged 1e30 fill value, or outside ``+-max_abs``) are left out before
   any sum, and counted.
2. **A robust start.** Every image is sampled on one lattice of the grid (every
   pixel on grids up to 2**18 pixels, else every ``stride``-th pixel along each
   axis), and for every overlapping pair the sampled differences
   ``I_l - I_m`` are grouped in cells (16 x 16 lattice points in 2-D): the
   median of each cell, weighted by the cell's summed weights, stands for it
   in a least-squares solve (the same normal equations, with cells for
   pixels). A cell median does not move when a few of its pixels are
   absurd, and a trail or a blob spoils only the cells it crosses. Before
   that solve, each pair's cells are screened against a high-breakdown fit
   of that pair alone (least median of squares over random elemental
   subsets, fixed seed): the cells far from it, e.g. those of a glow over
   a minority of the overlap at one edge of it, which would tilt an L1 or
   Huber fit, get weight 0. The scale ``s_lm`` of each pair's normalised
   residuals is measured there too (1.4826 x the median absolute deviation
   from the cell medians, each cell's made consistent for its number of
   samples: cells of few samples give a fraction of the sigma). A pair with
   few samples on the lattice (a small or narrow overlap on a large grid) is
   sampled again, for its cells and its scale, on a finer lattice of the box
   the two images share, its cells' weights scaled back to the lattice's
   density of samples.
3. **Reweighted passes** (at most ``nclip``) over all the pixels, block by
   block, as the plain accumulation: a pixel whose residual, given the
   previous polynomials, exceeds ``nsigma * s_lm`` is rejected *together
   with its neighbours within* ``grow`` *pixels* (a trail or a blob is
   left out with its fainter edges, not only its brightest pixels), and the
   others get weight 1 (``'clip'``), Huber's ``min(1, c/|r|)`` with
   ``c = 1.345 s`` (``'huber'``) or Tukey's biweight ``(1 - (r/c)^2)^2``
   with ``c = 4.685 s`` (``'tukey'``). The passes stop when no pair's
   polynomial difference changed by more than ``tol`` of its noise (the
   rejections would not change).

Everything is per pair and per block: nothing holds N full-grid arrays.
"""
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .coords import call_image2world
from .poly import monomials

__all__ = ["RobustOptions", "RobustPass", "check_robust", "dilate", "dilate_flat", "absurd_mask"]

#: Robust methods of ``match_backgrounds(robust=...)``.
METHODS = ("clip", "huber", "tukey")
#: A value further than this many spreads (robust sigmas) from its image's
#: median cannot be data: it is left out before the sums.
ABSURD_FACTOR = 1e10
#: Lattice points of the grid sampled for the robust start (at most).
START_POINTS = 1 << 16
#: Lattice points per cell of the start (about; a power of the dimension).
CELL_POINTS = 256
#: A pass that rejects more than this fraction of a pair's pixels is redone
#: for that pair without rejection (its polynomials did not fit it). With the
#: screened start it does not bind on glows: 0.75 changed no result on glows
#: over 40-48 % of an image (the screen fails first, at about half the cells).
LOOSE_FRACTION = 0.5
#: Start: iterations of the L1-like fit of the cell medians; then cells whose
#: median is further than START_NSIGMA of its sigmas from it are left out.
START_IRLS = 10
START_NSIGMA = 5.0
#: Start, before the joint fit: each pair's cells are screened against a
#: high-breakdown fit of that pair alone (least median of squares over
#: random elemental subsets, seeded by SCREEN_SEED and the pair, then
#: SCREEN_CSTEPS least-trimmed-squares steps); cells further than
#: START_NSIGMA of the pair's robust cell sigma from it get weight 0. Enough
#: subsets that one of them is all clean with probability 1 - SCREEN_MISS
#: when half of the cells are spoiled, at most SCREEN_SUBSETS.
SCREEN_SUBSETS = 250
SCREEN_MISS = 1e-4
SCREEN_SEED = 20240808
SCREEN_CSTEPS = 3
#: Fewest sampled pixels a cell needs to give a median.
CELL_MIN = 3
HUBER_C = 1.345
TUKEY_C = 4.685
#: 1 / Phi^-1(3/4): the MAD of a normal distribution times this is its sigma.
MAD_SIGMA = 1.4826


@dataclass
class RobustOptions:
    """Validated robust-matching options (see ``match_backgrounds``)."""

    method: str = "clip"
    nsigma: float = 4.0
    grow: int = 1
    nclip: int = 3
    tol: float = 0.2
    max_abs: float = None  # None: automatic (ABSURD_FACTOR spreads about the median)


def check_robust(robust, nsigma=4.0, grow=1, nclip=3, tol=0.2, max_abs=None):
    """`RobustOptions`, or None for plain least squares; ValueError for bad values."""
    if robust is None or robust is False or (isinstance(robust, str)
                                              and robust.strip().lower() in ("none", "")):
        return None
    if robust is True:
        robust = "clip"
    if not isinstance(robust, str) or robust.strip().lower() not in METHODS:
        raise ValueError(f"robust={robust!r} must be None, 'clip', 'huber' or 'tukey'.")
    try:
        nsigma = float(nsigma)
        grow = int(grow)
        nclip = int(nclip)
        tol = float(tol)
    except (TypeError, ValueError):
        raise ValueError(
            f"nsigma={nsigma!r}, grow={grow!r}, nclip={nclip!r}, tol={tol!r}: give "
            "numbers (nsigma > 0, grow >= 0, nclip >= 1, tol > 0).") from None
    if not (np.isfinite(nsigma) and nsigma > 0):
        raise ValueError(f"nsigma={nsigma!r} must be a positive number (e.g. 4).")
    if grow < 0:
        raise ValueError(f"grow={grow!r} must be >= 0 (pixels around a rejected pixel).")
    if nclip < 1:
        raise ValueError(f"nclip={nclip!r} must be >= 1 (reweighted passes).")
    if not tol > 0:
        raise ValueError(f"tol={tol!r} must be > 0.")
    if max_abs is not None:
        max_abs = float(max_abs)
        if not max_abs > 0:
            raise ValueError(f"max_abs={max_abs!r} must be > 0 (or None: automatic).")
    return RobustOptions(robust.strip().lower(), nsigma, grow, nclip, tol, max_abs)


@dataclass
class RobustPass:
    """What one reweighted pass of the accumulation needs."""

    method: str
    coef_u: np.ndarray  # (N, M) polynomials (scaled coordinates) the residuals are from
    t2: dict = field(default_factory=dict)  # pair -> (nsigma * s)**2; absent: no rejection
    cw: dict = field(default_factory=dict)  # pair -> c * s of Huber / Tukey
    grow: int = 1

    def weight(self, x):
        """Weight of ``x = |r| / c``."""
        if self.method == "huber":
            with np.errstate(divide="ignore"):
                return np.where(x > 1.0, 1.0 / x, 1.0)
        w = 1.0 - x * x
        np.maximum(w, 0.0, out=w)
        return w * w


def dilate(mask, grow):
    """``mask`` (N-D bool) grown by ``grow`` pixels along every axis (a box)."""
    idx = np.nonzero(mask)
    nd = mask.ndim
    nhit = idx[0].size
    side = 2 * grow + 1
    if nhit * side ** nd < mask.size // 4:  # few pixels: mark the boxes around each
        offs = np.indices((side,) * nd).reshape(nd, -1, 1) - grow  # (nd, noff, 1)
        pts = np.stack(idx)[:, None, :] + offs  # (nd, noff, nhit)
        hi = np.array(mask.shape).reshape(nd, 1, 1) - 1
        np.clip(pts, 0, hi, out=pts)
        out = np.zeros_like(mask)
        out[tuple(pts.reshape(nd, -1))] = True
        return out
    from scipy import ndimage

    lo = [max(0, int(i.min()) - grow) for i in idx]
    hi = [min(n, int(i.max()) + grow + 1) for i, n in zip(idx, mask.shape)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    out = np.zeros_like(mask)
    out[sl] = ndimage.maximum_filter(mask[sl].view(np.uint8), size=side,
                                     mode="constant", cval=0).astype(bool)
    return out


def dilate_flat(idx, shape, grow, skip_first=False):
    """Sorted unique flat indices of the pixels within ``grow`` (a box) of flat ``idx``.

    ``skip_first``: do not grow along the first axis (a stack of planes).
    """
    nd = len(shape)
    side = 2 * grow + 1
    coords = np.stack(np.unravel_index(idx, shape))  # (nd, nhit)
    box = (1,) * skip_first + (side,) * (nd - skip_first)
    offs = np.indices(box).reshape(nd, -1, 1)  # (nd, noff, 1)
    offs[skip_first:] -= grow
    pts = coords[:, None, :] + offs
    np.clip(pts, 0, np.array(shape).reshape(nd, 1, 1) - 1, out=pts)
    return np.unique(np.ravel_multi_index(tuple(pts.reshape(nd, -1)), shape))


# ---------------------------------------------------------------------------
# lattice samples, absurd-value limits and the robust start
# ---------------------------------------------------------------------------
def lattice_stride(shape):
    """Stride of the start's lattice: at most about START_POINTS points on the grid."""
    total = float(np.prod(shape))
    return max(1, int(math.floor((total / START_POINTS) ** (1.0 / len(shape)))))


def _samples(prob, stride):
    """Per image: (lattice origin, data with NaN where not valid, variance) or None."""
    return [_lattice_sample(prob, l, _image_box(prob, l), stride)
            for l in range(len(prob.images))]


def _image_box(prob, l):
    """The grid box (numpy order) of image ``l``'s array."""
    return tuple((o, o + n) for o, n in zip(prob.origins[l], prob.images[l].shape))


def _lattice_sample(prob, l, box, step):
    """Image ``l`` at the grid points of ``box`` whose indices are multiples of
    ``step``: ``(lattice origin, data with NaN where not valid, variance)``, or
    None when none of them is valid."""
    from .accumulate import _prepare_image

    box = tuple((-(-lo // step) * step, hi) for lo, hi in box)
    if any(lo >= hi for lo, hi in box):
        return None
    d, var, valid, _ = _prepare_image(prob, l, box, step=step)
    if not valid.any():
        return None
    return tuple(lo // step for lo, _ in box), np.where(valid, d, np.nan), var


def auto_limits(samples, has_sigmas, factor=ABSURD_FACTOR):
    """Per image ``(lo, hi)``: median +- ``factor`` x its spread (None: no cut).

    The spread is the larger of the robust sigma of the sampled values
    (1.4826 MAD) and, with sigmas, their median sigma; for an image whose
    sampled values are all equal, the size of that value.
    """
    limits = []
    for smp in samples:
        if smp is None:
            limits.append(None)
            continue
        _, y, var = smp
        v = y[np.isfinite(y)]
        if v.size == 0:
            limits.append(None)
            continue
        v = _thin(v)
        med = float(np.median(v))
        scale = MAD_SIGMA * float(np.median(np.abs(v - med)))
        if has_sigmas:
            sv = _thin(var[np.isfinite(y)])
            scale = max(scale, float(np.sqrt(np.median(sv))))
        if not scale > 0:
            scale = abs(med)
        if not (np.isfinite(scale) and scale > 0):
            limits.append(None)
            continue
        limits.append((med - factor * scale, med + factor * scale))
    return limits


def absurd_mask(data, mask, sigma=None, factor=ABSURD_FACTOR, offset=None,
                grid_shape=None):
    """Valid pixels of one array whose value is absurd, or None when there is none.

    Absurd: further than ``factor`` spreads from the median of the valid
    values (the spread as in :func:`auto_limits`, from an evenly strided
    sample), or not finite where the mask says valid. Costs one pass of
    comparisons over the array.

    ``data`` may be a region of a larger array (``grid_shape``) starting at
    index ``offset`` there, holding all of its valid pixels: the sample then
    takes the larger array's stride and phase, so that the answer is the
    same as for the whole array.
    """
    data = np.asarray(data)
    mask = np.asarray(mask, dtype=bool)
    size = data.size if grid_shape is None else int(np.prod(grid_shape))
    step = max(1, int(math.sqrt(size / (4 * MEDIAN_SAMPLE))))
    offset = (0,) * data.ndim if offset is None else offset
    sl = tuple(slice((-o) % step, None, step) for o in offset)
    y = np.where(mask[sl], data[sl], np.nan).astype(np.float64)
    var = None
    if sigma is not None:
        var = np.square(np.asarray(sigma)[sl], dtype=np.float64)
    lim = auto_limits([(None, y, np.ones_like(y) if var is None else var)],
                      sigma is not None, factor)[0]
    if lim is None:
        return None
    with np.errstate(invalid="ignore"):
        bad = mask & ~((data >= lim[0]) & (data <= lim[1])) & np.isfinite(data)
    return bad if bad.any() else None


def _cells(arr, c, fill):
    """``(ncells, prod(c))``: ``arr`` cut into cells of ``c`` points per axis (an int
    or one per axis; padded with ``fill``)."""
    nd = arr.ndim
    c = (c,) * nd if np.isscalar(c) else tuple(c)
    a = np.pad(arr, [(0, (-n) % k) for n, k in zip(arr.shape, c)], constant_values=fill)
    shp = []
    for n, k in zip(a.shape, c):
        shp += [n // k, k]
    a = a.reshape(shp).transpose(list(range(0, 2 * nd, 2)) + list(range(1, 2 * nd, 2)))
    return a.reshape(-1, int(np.prod(c)))


#: Most values whose median gives a pair's scale or an image's limits.
MEDIAN_SAMPLE = 1 << 15


def _thin(v):
    """At most about MEDIAN_SAMPLE values of the 1-D ``v``, evenly strided."""
    k = v.size // MEDIAN_SAMPLE
    return v[::k] if k > 1 else v


#: A pair whose start lattice gives fewer samples than this for its scale has
#: its cells and scale measured again on a finer lattice of its overlap (about
#: 2x this many points): the cells and the median of few values scatter (a
#: scale too low rejects good pixels).
SCALE_SAMPLES = 1024
#: ``_CELL_MAD[n]``: 1.4826 x the median absolute deviation of ``n`` normal
#: values from their own median, pooled over many such cells, in units of
#: their sigma (simulated: 4e6 values for each ``n``, within 0.3 %). Cells of
#: few values give a fraction of the sigma (0.47 for 3: one deviation is 0);
#: beyond ``n = 32``, ``1 - 1.1 / n`` is within 0.15 %.
_CELL_MAD = np.array([np.nan, np.nan, 0.707, 0.466, 0.720, 0.727, 0.783, 0.819, 0.834,
                      0.863, 0.871, 0.891, 0.895, 0.910, 0.914, 0.923, 0.924, 0.932, 0.933,
                      0.941, 0.940, 0.946, 0.945, 0.951, 0.951, 0.955, 0.956, 0.959, 0.959,
                      0.962, 0.962, 0.964, 0.964])


def cell_mad_factor(n):
    """Per cell of ``n`` values: what 1.4826 x the pooled median absolute deviation
    from the cells' own medians gives for a unit sigma (see ``_CELL_MAD``)."""
    n = np.asarray(n)
    small = _CELL_MAD[np.clip(n, 2, _CELL_MAD.size - 1)]
    return np.where(n < _CELL_MAD.size, small, 1.0 - 1.1 / np.maximum(n, 1))


def _fine_samples(prob, l, m, stride, span):
    """Pair ``(l, m)`` sampled on a lattice finer than ``stride`` over the box the
    two images share within ``span`` (the grid box around the pair's valid
    start samples), about ``2 * SCALE_SAMPLES`` points: ``(step, sample of l,
    sample of m)`` as :func:`_samples` gives them, or None when the box is
    empty, would not be sampled at least twice as finely along each axis, or
    an image has no valid pixel there."""
    from .accumulate import _intersect

    box = span
    for k in (l, m):
        box = _intersect(box, _image_box(prob, k))
        if box is None:
            return None
    area = float(np.prod([b - a for a, b in box]))
    step = int(max(1, (area / (2 * SCALE_SAMPLES)) ** (1.0 / len(box))))
    if 2 * step > stride:
        return None
    fl, fm = (_lattice_sample(prob, k, box, step) for k in (l, m))
    return None if fl is None or fm is None else (step, fl, fm)


class _PairCells(NamedTuple):
    """What :func:`_pair_cells` gives for one pair."""

    med: np.ndarray  # the cells' medians of the sampled differences
    weight: np.ndarray  # the cells' summed weights
    centres: list  # the cells' pixel centres, one array per numpy axis
    scale: float  # robust sigma of the normalised residuals
    typ: float  # typical normalised difference
    cnt: np.ndarray  # valid samples per cell
    nscale: int  # samples that gave the scale
    span: tuple  # grid box (numpy order) around the valid samples


def _pair_cells(sl, sm, stride, c, deg=None):
    """Cell medians of one pair's sampled differences.

    Returns a :class:`_PairCells`, or None when the pair shares no sampled pixel.
    """
    (ol, yl, vl), (om, ym, vm) = sl, sm
    lo = [max(a, b) for a, b in zip(ol, om)]
    hi = [min(a + n, b + k) for a, b, n, k in zip(ol, om, yl.shape, ym.shape)]
    if any(a >= b for a, b in zip(lo, hi)):
        return None
    il = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, ol))
    im = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, om))
    with np.errstate(invalid="ignore"):
        D = yl[il] - ym[im]
        W = 1.0 / (vl[il] + vm[im])
    nd = D.ndim
    c = (c,) * nd if np.isscalar(c) else tuple(c)
    if deg is not None:  # 2 (D + 1) cells along each axis of the pair's overlap
        c = tuple(max(1, min(k, n // (2 * (deg[nd - 1 - a] + 1))))
                  for a, (k, n) in enumerate(zip(c, D.shape)))
    Dc = _cells(D, c, np.nan)
    valid = ~np.isnan(Dc)
    cnt = np.count_nonzero(valid, axis=1)
    ntot = int(cnt.sum())
    if ntot == 0:
        return None
    Wc = _cells(W, c, 0.0)
    Wc[~valid] = 0.0
    # pixel centre of each cell's valid samples: the cell's first lattice
    # point plus the mean offset of its valid samples within the cell
    ncell = [-(-n // k) for n, k in zip(D.shape, c)]
    first = np.indices(ncell).reshape(nd, -1) * np.array(c).reshape(nd, 1)
    offs = np.indices(c).reshape(nd, -1).astype(np.float64)
    vf = valid.astype(np.float64)
    use = cnt >= min(CELL_MIN, ntot)
    if not np.any(use):  # a few scattered samples: one cell
        Dc, Wc, valid = D.reshape(1, -1), np.where(np.isnan(D), 0.0, W).reshape(1, -1), \
            ~np.isnan(D.reshape(1, -1))
        cnt = np.array([ntot])
        pix = np.indices(D.shape).reshape(nd, -1)
        centres = [(stride * (pix[k][valid[0]].mean() + lo[k])) * np.ones(1)
                   for k in range(nd)]
    else:
        Dc, Wc, valid, cnt, vf, first = Dc[use], Wc[use], valid[use], cnt[use], vf[use], \
            first[:, use]
        centres = [stride * (first[k] + (vf @ offs[k]) / cnt + lo[k]) for k in range(nd)]
    srt = np.sort(Dc, axis=1)  # NaN last
    lo_i, hi_i = (cnt - 1) // 2, cnt // 2
    med = 0.5 * (np.take_along_axis(srt, lo_i[:, None], 1)[:, 0]
                 + np.take_along_axis(srt, hi_i[:, None], 1)[:, 0])
    weight = Wc.sum(axis=1)
    sw = np.sqrt(Wc[valid])
    # each cell's deviations from its median, made consistent for its size
    # (the pooled median of the cells' is then that of a unit normal)
    dev = (np.abs(Dc - med[:, None]) / cell_mad_factor(cnt)[:, None])[valid] * sw
    scale = MAD_SIGMA * float(np.median(_thin(dev)))
    nscale = dev.size
    typ = float(np.median(_thin(np.abs(Dc[valid]) * sw)))
    # the grid box (numpy order) around the valid samples: where a finer
    # lattice of the pair is worth reading
    vidx = np.nonzero(~np.isnan(D))
    span = tuple((stride * (lo[k] + int(vidx[k].min()) - 1) + 1,
                  stride * (lo[k] + int(vidx[k].max()) + 1)) for k in range(nd))
    return _PairCells(med, weight, centres, scale, typ, cnt, nscale, span)


def _to_u(frame, pix):
    """Scaled coordinates of pixel positions (one array per numpy axis), ``(x, y, ...)``."""
    nd = frame.ndim
    xy = pix[::-1]
    if frame.separable:
        X = xy
    else:
        X = call_image2world(frame.image2world, [np.asarray(a, float) for a in xy], nd)
    return [(np.asarray(w, float) - c - s0) / s1
            for w, c, s0, s1 in zip(X, frame.eff_center, frame.shift, frame.scale)]


def _wls(phi, y, a, sel):
    """Least squares of the cells ``sel`` with residuals standardised by ``a``
    (``phi`` ``(p, n)``, ``y`` ``(n,)``); None when not finite."""
    try:
        sol = np.linalg.lstsq((phi[:, sel] * a[sel]).T, y[sel] * a[sel], rcond=None)[0]
    except np.linalg.LinAlgError:
        return None
    return sol if np.all(np.isfinite(sol)) else None


def screen_cells(phi, y, a, rng, nsub=SCREEN_SUBSETS, nsigma=START_NSIGMA,
                 csteps=SCREEN_CSTEPS):
    """Cells of one pair that agree with a high-breakdown fit of that pair alone.

    ``phi`` ``(p, n)``: the present terms at the ``n`` cell centres; ``y``:
    the cell medians; ``a``: 1 / the noise of each cell median. The fit is
    least median of squares of the standardised residuals ``a (y - fit)``
    over random elemental subsets (``p`` cells each, fitted exactly; enough
    that one is clean with probability ``1 - SCREEN_MISS`` when half of the
    cells are spoiled, at most ``nsub``): the subset whose ``h``-th smallest
    absolute residual, ``h = n // 2 + 1``, is least; refined by ``csteps``
    least-trimmed-squares steps (the ``h`` cells of least residual
    refitted). A group of fewer than half of the cells that the polynomial
    cannot fit together with the others (a step: a glow) cannot move it,
    wherever it lies: unlike an L1 or Huber fit, it is not tilted by a
    cluster at one edge of the overlap (high leverage).

    Returns a boolean mask of the cells within ``nsigma`` of the fit in
    units of the larger of 1 (the cell noise) and the fit's robust scale
    (1.4826 x the median absolute standardised residual, small-sample
    corrected), or None when the pair has too few cells to screen
    (``n < 2 p + 1``) or no subset could be fitted.
    """
    p, n = phi.shape
    if n < 2 * p + 1:
        return None
    with np.errstate(all="ignore"):  # extreme values: overflows drop out below
        keep = _screen(phi, y, a, rng, nsub, nsigma, csteps)
    # at least half of the cells pass a finite fit: else do not screen
    return keep if keep is not None and np.count_nonzero(keep) > n // 2 else None


def _screen(phi, y, a, rng, nsub, nsigma, csteps):
    """The work of :func:`screen_cells`."""
    p, n = phi.shape
    h = n // 2 + 1
    need = math.ceil(math.log(SCREEN_MISS) / math.log1p(-0.5 ** p))
    k = min(nsub, need, math.comb(n, p))
    idx = rng.integers(0, n, (k, p))  # a repeated cell makes a singular subset
    A = np.transpose(phi[:, idx], (1, 2, 0))  # (k, p rows, p terms)
    # singular (or nearly) subsets are left out: |det| against the product
    # of the row norms (Hadamard's bound)
    rel = np.abs(np.linalg.det(A)) / np.prod(np.sqrt(np.einsum("kij,kij->ki", A, A)), 1)
    ok = rel > 1e-10
    if not ok.any():
        return None
    try:
        cand = np.linalg.solve(A[ok], y[idx[ok]][..., None])[..., 0]  # (k', p)
    except np.linalg.LinAlgError:
        return None
    res = np.abs((y[None, :] - cand @ phi) * a[None, :])  # (k', n)
    crit = np.partition(res, h - 1, axis=1)[:, h - 1]
    crit[~np.isfinite(crit)] = np.inf
    beta = cand[int(np.argmin(crit))]
    r = np.abs((y - beta @ phi) * a)
    obj = np.sum(np.square(np.partition(r, h - 1)[:h]))
    for _ in range(csteps):  # LTS concentration steps: never increase the objective
        new = _wls(phi, y, a, np.argpartition(r, h - 1)[:h])
        if new is None:
            break
        rn = np.abs((y - new @ phi) * a)
        on = np.sum(np.square(np.partition(rn, h - 1)[:h]))
        if not on < obj:
            break
        beta, r, obj = new, rn, on
    scale = MAD_SIGMA * (1.0 + 5.0 / (n - p)) * float(np.median(r))
    return r <= nsigma * max(1.0, scale)


def robust_start(prob, frame, samples, stride, solve, threads=1):
    """Start polynomials from cell medians, and each pair's residual scale.

    ``solve(S, T)`` returns the coefficients ``(N, M)`` (scaled
    coordinates) of the normal equations of moments ``S``, ``T``. Returns
    ``(coef_u, scales)``: ``scales[(l, m)] = (s, typical)``.
    """
    n = len(prob.images)
    nd = len(prob.shape)
    c = max(2, int(round(CELL_POINTS ** (1.0 / nd))))
    deg = prob.degree
    # cells per axis: at most c lattice points, and small enough that the
    # grid holds 2 (D + 1) cells along each axis (so that every term of the
    # polynomial is determined by the cell medians)
    c_fine = (c,) * nd
    c = tuple(max(1, min(c, -(-n // stride) // (2 * (deg[nd - 1 - k] + 1))))
              for k, n in enumerate(prob.shape))
    mdeg = tuple(2 * d for d in deg)
    parts, scales = [], {}
    keys = [(l, m) for l in range(n) for m in range(l + 1, n)
            if samples[l] is not None and samples[m] is not None]

    def one(key):
        """The pair's cells, and the weight factor of its cells in the joint fit."""
        res = _pair_cells(samples[key[0]], samples[key[1]], stride, c, deg)
        if res is not None and stride > 1 and res.nscale < SCALE_SAMPLES:
            # few samples on the start's lattice (a small overlap): the cells
            # of a finer lattice, whose medians and scale scatter less; their
            # weights (sums over more samples) are scaled back to the start
            # lattice's density of samples, as the other pairs' are
            fine = _fine_samples(prob, key[0], key[1], stride, res.span)
            if fine is not None:
                step, fl, fm = fine
                res2 = _pair_cells(fl, fm, step, c_fine, deg)
                if res2 is not None and res2.nscale > res.nscale:
                    return res2, (step / stride) ** nd
        return res, 1.0

    if threads > 1 and len(keys) > 1:  # sorts and array work release the GIL
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(one, keys))
    else:
        results = [one(k) for k in keys]
    factors = []
    for key, (res, factor) in zip(keys, results):
        if res is None:
            continue
        parts.append((key, res.med, res.weight, res.centres, res.cnt))
        factors.append(factor)
        scales[key] = (res.scale, res.typ)
    if not parts:
        return solve({}, {}), scales
    allc = [np.concatenate([p[3][k] for p in parts]) for k in range(nd)]
    u = _to_u(frame, allc)
    fin = np.logical_and.reduce([np.isfinite(a) for a in u])
    u = [np.where(fin, a, 0.0) for a in u]
    phi, phid = monomials(u, mdeg), monomials(u, deg)
    mshape, dshape = tuple(d + 1 for d in mdeg), tuple(d + 1 for d in deg)
    slices, pos = [], 0
    for p in parts:
        slices.append(slice(pos, pos + p[1].size))
        pos += p[1].size
    base = [np.where(fin[sl] & (p[2] > 0), f * p[2], 0.0)
            for p, sl, f in zip(parts, slices, factors)]

    def fit(weights):
        S, T = {}, {}
        for (key, med, _, _, _), sl, ww in zip(parts, slices, weights):
            if np.any(ww > 0):
                S[key] = (phi[:, sl] @ ww).reshape(mshape)
                T[key] = (phid[:, sl] @ (ww * med)).reshape(dshape)
        return solve(S, T)

    def zscores(coef):  # cell residuals in units of the noise of a cell median
        out = []
        for (key, med, w, _, _), sl in zip(parts, slices):
            l, m = key
            dp = (coef[l] - coef[m]) @ phid[:, sl]
            out.append(np.abs(med - dp) * np.sqrt(w) / (1.2533 * max(scales[key][0], 1e-300)))
        return out

    # each pair's cells screened against a high-breakdown fit of that pair
    # alone: a glow over a minority of the overlap, even at one edge of it,
    # gets weight 0 before the joint fit (which it would tilt)
    phip = phid if prob.terms is None else phid[np.asarray(prob.terms, bool)]
    def screen(j):
        (key, med, w, _, _), sl, b = parts[j], slices[j], base[j]
        good = b > 0
        if not good.any():
            return b
        a = np.sqrt(w[good]) / (1.2533 * max(scales[key][0], 1e-300))
        rng = np.random.default_rng([SCREEN_SEED, key[0], key[1]])
        keep = screen_cells(phip[:, sl][:, good], med[good], a, rng)
        if keep is None:
            return b
        sb = np.zeros_like(b)
        sb[np.flatnonzero(good)[keep]] = b[good][keep]
        return sb

    screened = [screen(j) for j in range(len(parts))]  # threads: no faster (the GIL)
    # an L1-like fit of the screened cell medians (Huber weights with c = 1
    # cell sigma), then the cells (all of them, screened or not) further
    # than START_NSIGMA of their sigmas from it are left out (started from
    # each pair's median of its screened cell medians)
    weights = []
    for (key, med, w, _, _), b in zip(parts, screened):
        good = b > 0
        mid = float(np.median(med[good])) if good.any() else 0.0
        z = np.abs(med - mid) * np.sqrt(w) / (1.2533 * max(scales[key][0], 1e-300))
        weights.append(b * np.minimum(1.0, 1.0 / np.maximum(z, 1e-12)))
    coef = fit(weights)
    for _ in range(START_IRLS):
        z = zscores(coef)
        weights = [b * np.minimum(1.0, 1.0 / np.maximum(zz, 1e-12))
                   for b, zz in zip(screened, z)]
        new = fit(weights)
        done = np.allclose(new, coef, rtol=1e-6, atol=1e-12 * (np.abs(coef).max() + 1e-300))
        coef = new
        if done:
            break
    z = zscores(coef)
    keep = [(b > 0) & (zz <= START_NSIGMA) for b, zz in zip(base, z)]
    keep = [k if k.sum() >= max(1, (b > 0).sum() // 2) else (b > 0)
            for k, b in zip(keep, base)]
    coef = fit([np.where(k, b, 0.0) for k, b in zip(keep, base)])
    return coef, scales


def pass_for(opts, coef_u, scales):
    """The `RobustPass` of polynomials ``coef_u`` with the pairs' ``scales``."""
    t2, cw = {}, {}
    const = HUBER_C if opts.method == "huber" else TUKEY_C
    for key, (s, typ) in scales.items():
        s = max(s, 1e-6 * typ, 1e-300)
        t2[key] = (opts.nsigma * s) ** 2
        cw[key] = const * s
    return RobustPass(opts.method, np.asarray(coef_u, float), t2, cw, opts.grow)


def _kept_scales(mom, coef, scales, degree):
    """Pair scales no larger than the RMS normalised residual of the pixels kept.

    A start that fitted poorly gave wide scales; once a pass has fitted the
    kept pixels, their residual RMS (clipped at 4 sigma, within 0.1 % of the
    noise's sigma) tightens the threshold of the next pass.
    """
    from .solve import gram_index

    idx = gram_index(degree)
    out = dict(scales)
    for key, (s, typ) in scales.items():
        if key not in mom.S:
            continue
        l, m = key
        kept = mom.npix[key] - mom.rejected.get(key, 0)
        if kept < 16:
            continue
        dc = coef[l] - coef[m]
        after = mom.chi[key] - 2 * dc @ np.ravel(mom.T[key]) + dc @ mom.S[key][idx] @ dc
        emp = math.sqrt(max(after, 0.0) / kept)
        if emp > 0:
            out[key] = (min(s, emp), typ)
    return out


def change_small(opts, old, new, mom, scales, degree):
    """Whether no pair's polynomial difference changed by more than ``tol`` of its noise.

    The change is measured as its weighted RMS over the pixels the pair kept
    (from the moments), in units of the pair's normalised-residual scale.
    """
    from .solve import gram_index

    idx = gram_index(degree)
    for key, s_ in mom.S.items():
        l, m = key
        if key not in scales:
            continue
        s = max(scales[key][0], 1e-6 * scales[key][1], 1e-300)
        kept = mom.npix[key] - mom.rejected.get(key, 0)
        if kept <= 0:
            continue
        s0 = float(np.ravel(s_)[0])
        if not s0 > 0:
            continue
        dc = (new[l] - new[m]) - (old[l] - old[m])
        ms = max(float(dc @ s_[idx] @ dc), 0.0) / s0  # mean square change over the pair
        if math.sqrt(ms * s0 / kept) > opts.tol * s:
            return False
    return True


def robust_moments(prob, frame, opts, accumulate_pass, solve, threads=1):
    """Pair moments of the last reweighted pass, and what the passes did.

    ``accumulate_pass(robust_pass)`` sums the moments of one pass;
    ``solve(S, T)`` gives the coefficients (scaled coordinates) of moments.
    Sets ``prob.limits`` (absurd values). Returns ``(moments, info)``; ``info``
    holds ``method``, ``nsigma``, ``grow``, ``nclip``, ``passes``,
    ``converged``, ``stride`` and ``scale`` (per pair: the robust sigma of its
    normalised residuals, 1.0 = as the sigmas say).
    """
    n = len(prob.images)
    stride = lattice_stride(prob.shape)
    samples = _samples(prob, stride)
    if opts.max_abs is not None:
        prob.limits = [(-opts.max_abs, opts.max_abs)] * n
    else:
        prob.limits = auto_limits(samples, prob.has_sigmas)
    for k, (smp, lim) in enumerate(zip(samples, prob.limits)):
        if smp is not None and lim is not None:
            y = smp[1]
            with np.errstate(invalid="ignore"):
                y[(y < lim[0]) | (y > lim[1])] = np.nan
    coef, scales = robust_start(prob, frame, samples, stride, solve, threads)
    passes, converged, mom = 0, False, None
    loosened = set()  # pairs once matched without rejection (a start that failed them)
    for _ in range(opts.nclip + 1):
        rpass = pass_for(opts, coef, scales)
        mom = accumulate_pass(rpass)
        passes += 1
        # a pass that rejects most of a pair's pixels had polynomials that do
        # not fit it (the start could not pin them down): that pair is summed
        # once without rejection, and the pass done again
        bad = {key for key, r in mom.rejected.items()
               if r > LOOSE_FRACTION * mom.npix[key] and key not in loosened}
        if bad and passes <= opts.nclip:
            loosened |= bad
            rpass = pass_for(opts, coef, {k: v for k, v in scales.items() if k not in bad})
            mom = accumulate_pass(rpass)
        mom.robust_pass = rpass  # the weights of the fit (its covariance needs them)
        new = solve(mom.S, mom.T)
        if opts.method == "clip":
            scales = _kept_scales(mom, new, scales, prob.degree)
        done = change_small(opts, coef, new, mom, scales, prob.degree)
        coef = new
        if done and (opts.method == "clip" or passes > 1):  # IRLS: reweight once more
            converged = True
            break
        if passes >= opts.nclip:
            break
    info = {"method": opts.method, "nsigma": opts.nsigma, "grow": opts.grow,
            "nclip": opts.nclip, "passes": passes, "converged": converged,
            "stride": stride, "scale": {k: float(v[0]) for k, v in scales.items()},
            "loosened": sorted(loosened)}
    return mom, info


# ---------------------------------------------------------------------------
# sources (and junk) of one image, from its own pixels
# ---------------------------------------------------------------------------
#: Side (pixels) of the tiles whose medians make the local background.
SOURCE_TILE = 16
#: Every ``SOURCE_THIN``-th pixel (per axis) of a tile gives its median.
SOURCE_THIN = 2


#: Rows of an image tested for sources at once (the temporaries of a band).
SOURCE_BAND_ROWS = 256


def _tile_weights(n, tile, m):
    """Bilinear weights between ``m`` tile centres at ``n`` pixels: ``(i0, i1, f)``."""
    t = (np.arange(n) + 0.5) / tile - 0.5
    i0 = np.clip(np.floor(t).astype(np.int64), 0, m - 1)
    i1 = np.clip(i0 + 1, 0, m - 1)
    f = np.clip(t - i0, 0.0, 1.0)
    return i0, i1, f


def _bilinear_rows(gridx, weights, rows):
    """Rows ``rows`` (a slice) of the bilinear interpolation between tile centres.

    ``gridx``: the tile values already interpolated along x (tiles_y x nx);
    ``weights``: :func:`_tile_weights` along y.
    """
    i0, i1, f = (w[rows] for w in weights)
    return gridx[i0, :] * (1 - f)[:, None] + gridx[i1, :] * f[:, None]


def _tile_stats(data, valid, tile, thin):
    """Per tile: median and robust sigma of an evenly thinned sample (NaN: none)."""
    y = np.where(valid, data, np.nan)[::thin, ::thin].astype(np.float64)
    c = tile // thin
    ny, nx = -(-y.shape[0] // c), -(-y.shape[1] // c)
    cells = _cells(y, c, np.nan)
    srt = np.sort(cells, axis=1)
    cnt = np.count_nonzero(~np.isnan(cells), axis=1)
    ok = cnt >= CELL_MIN
    k = np.maximum(cnt, 1)
    med = 0.5 * (np.take_along_axis(srt, ((k - 1) // 2)[:, None], 1)[:, 0]
                 + np.take_along_axis(srt, (k // 2)[:, None], 1)[:, 0])
    med[~ok] = np.nan
    dev = np.sort(np.abs(cells - med[:, None]), axis=1)
    mad = 0.5 * (np.take_along_axis(dev, ((k - 1) // 2)[:, None], 1)[:, 0]
                 + np.take_along_axis(dev, (k // 2)[:, None], 1)[:, 0])
    mad[~ok] = np.nan
    return med.reshape(ny, nx), MAD_SIGMA * mad.reshape(ny, nx)


def source_mask(data, valid, sigma=None, nsigma=5.0, grow=2, tile=SOURCE_TILE,
                thin=SOURCE_THIN):
    """Pixels of a 2-D image significantly above its local background, grown.

    The local background is interpolated (bilinearly, so that it follows
    gradients) between the medians of the image's ``tile x tile`` boxes
    (from every ``thin``-th pixel along each axis); a valid pixel is
    marked when it exceeds that by more than ``nsigma`` times its sigma
    (``sigma``, else the box's robust sigma), and every pixel within
    ``grow`` pixels of a marked one is marked too. Sources, and junk such as
    cosmic rays, trails and extended glows, are marked with their
    surroundings; noise alone marks ~3e-7 of the pixels at ``nsigma=5``.

    Returns a boolean array of the image's shape, or None when nothing is
    marked.
    """
    data = np.asarray(data)
    valid = np.asarray(valid, dtype=bool)
    if data.ndim != 2 or not valid.any():
        return None
    med, rsig = _tile_stats(data, valid, tile, thin)
    fill = np.nanmedian(med) if np.isfinite(med).any() else 0.0
    med = np.where(np.isfinite(med), med, fill)
    ny, nx = data.shape
    # the local background, bilinear between tile centres: along x once (one
    # row per tile row), along y band by band of rows with the test itself,
    # so that no full-image float64 temporaries are made
    xw = _tile_weights(nx, tile, med.shape[1])
    medx = med[:, xw[0]] * (1 - xw[2]) + med[:, xw[1]] * xw[2]
    yw = _tile_weights(ny, tile, med.shape[0])
    if sigma is None:
        sfill = np.nanmedian(rsig) if np.isfinite(rsig).any() else np.inf
        rsig = np.where(np.isfinite(rsig) & (rsig > 0), rsig, sfill)
        rsig = np.repeat(rsig, tile, 1)[:, :nx]  # along x; rows: rsig[row // tile]
    else:
        sigma = np.asarray(sigma)
    hit = np.empty(data.shape, dtype=bool)
    for r0 in range(0, ny, SOURCE_BAND_ROWS):
        rows = slice(r0, min(ny, r0 + SOURCE_BAND_ROWS))
        bkg = _bilinear_rows(medx, yw, rows)
        if sigma is None:
            noise = rsig[np.arange(rows.start, rows.stop) // tile]
        else:
            noise = np.asarray(sigma[rows], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            hit[rows] = valid[rows] & (data[rows] - bkg > nsigma * noise)
    if not hit.any():
        return None
    if grow:
        hit = dilate(hit, grow)
    return hit & valid
