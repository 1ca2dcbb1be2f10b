"""Accumulation of the per-pair moments that make up the normal equations.

For every unordered pair of images ``(l, m)`` whose valid pixels overlap, the
normal equations need only

* ``S[r] = sum w * u**r`` for the ``prod(2 D_j + 1)`` exponents ``r <= 2 D``,
* ``T[p] = sum w * u**p * (I_l - I_m)`` for the ``M`` exponents ``p <= D``,

over the overlap, with ``w = 1 / (sigma_l**2 + sigma_m**2)`` (``u`` are the
scaled coordinates of :mod:`.coords`). We also keep ``sum w (I_l - I_m)**2``
and the pixel count, which give residual statistics without a second pass.

The grid is processed block by block and, within a block, each image only over
the bounding box of its valid pixels and each pair only over the intersection
of the two boxes: temporaries are bounded by a block, pairs that do not
overlap cost a box intersection, and sums of blocks are sums, so blocks may be
processed in any order or in parallel.
"""
import functools
import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from .inputs import SIGMA_MAX, SIGMA_MIN

__all__ = ["PairMoments", "accumulate", "valid_box"]

# Pixels per block: bounds the temporaries (a few float64 arrays per image of
# a block) while keeping per-block Python overhead negligible.
BLOCK_PIXELS = 1 << 16
# Bound on the bytes of per-image block arrays held at once (all images).
BLOCK_BYTES = 48 << 20
# Bound on the bytes of a world block's coordinates and image2world's temporaries.
WORLD_BYTES = 16 << 20


@dataclass
class PairMoments:
    """Sums over the overlap of each pair of images (keys ``(l, m)``, ``l < m``)."""

    nimages: int
    S: dict = field(default_factory=dict)
    T: dict = field(default_factory=dict)
    chi: dict = field(default_factory=dict)
    npix: dict = field(default_factory=dict)
    image_npix: np.ndarray = None
    nonfinite: np.ndarray = None
    bad_coords: int = 0
    #: per image: valid pixels left out because their (finite, positive)
    #: sigma is too small or too large for its square to be a normal float64
    sigma_out: np.ndarray = None
    #: per image: valid pixels left out as absurd (outside ``Problem.limits``)
    absurd: np.ndarray = None
    #: robust passes: per pair, pixels of the overlap left out (weight 0);
    #: per image, pixels left out of every pair that covers them
    rejected: dict = field(default_factory=dict)
    image_rejected: np.ndarray = None
    #: what the robust passes did (see :func:`jwst_wiimatch.core.robust.robust_moments`)
    robust: dict = None
    #: the :class:`~jwst_wiimatch.core.robust.RobustPass` whose rejections and
    #: weights these sums carry (None: plain sums)
    robust_pass: object = None

    def add_pair(self, key, s, t, chi, npix):
        """Add the sums of one pair over one part of the grid."""
        if key in self.S:
            self.S[key] += s
            self.T[key] += t
            self.chi[key] += chi
            self.npix[key] += npix
        else:
            self.S[key] = s
            self.T[key] = t
            self.chi[key] = chi
            self.npix[key] = npix

    def add(self, other):
        """Add the sums of ``other`` (another part of the grid) to these."""
        for key, s in other.S.items():
            self.add_pair(key, s, other.T[key], other.chi[key], other.npix[key])
        self.image_npix += other.image_npix
        self.nonfinite += other.nonfinite
        self.bad_coords += other.bad_coords
        self.sigma_out += other.sigma_out
        if self.absurd is not None and other.absurd is not None:
            self.absurd += other.absurd
        for key, r in other.rejected.items():
            self.rejected[key] = self.rejected.get(key, 0) + r
        if self.image_rejected is not None and other.image_rejected is not None:
            self.image_rejected += other.image_rejected


def valid_box(mask, shape, origin):
    """Grid box (tuple of (start, stop)) of the nonzero pixels of ``mask``, or None.

    ``mask`` (or None: all valid) has the image's ``shape``; the image's first
    pixel sits at grid index ``origin``.
    """
    return _box_and_fill(mask, shape, origin)[0]


def _box_and_fill(mask, shape, origin):
    """:func:`valid_box`, and whether the mask marks every pixel of that box valid.

    (True without a mask: the blocks need not read a mask that is all true
    over its box.)
    """
    if any(n == 0 for n in shape):
        return None, False
    if mask is None:
        return tuple((o, o + n) for o, n in zip(origin, shape)), True
    mask = np.asarray(mask)  # a mask read by parts: whole, one at a time
    nz = mask if mask.dtype == bool else mask != 0
    box = []
    for k in range(nz.ndim):
        others = tuple(i for i in range(nz.ndim) if i != k)
        hit = np.flatnonzero(nz.any(axis=others)) if others else np.flatnonzero(nz)
        if hit.size == 0:
            return None, False
        box.append((int(hit[0]) + origin[k], int(hit[-1]) + 1 + origin[k]))
    box = tuple(box)
    return box, bool(nz[_slices(box, origin)].all())


def _intersect(a, b):
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out


def _slices(box, origin=None):
    if origin is None:
        return tuple(slice(lo, hi) for lo, hi in box)
    return tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin))


def block_shape(shape, max_pixels):
    """Split ``shape`` by halving its longest axes until a block holds <= ``max_pixels``."""
    bs = list(shape)
    while int(np.prod(bs)) > max_pixels:
        k = int(np.argmax(bs))
        if bs[k] == 1:
            break
        bs[k] = (bs[k] + 1) // 2
    return tuple(bs)


def axis_cuts(n, length, edges):
    """Cut ``range(n)`` into pieces of at most about ``length`` that respect ``edges``.

    The pieces start at every edge (positions where some image's box starts or
    ends), so that, within a block, the boxes cover all or nothing of the
    block along this axis and the stacked pair operations of the block waste
    no work on pixels outside a pair's overlap. Pieces between two edges are
    split evenly; pieces shorter than ``length / 4`` are merged into the
    previous one (a little waste rather than many tiny blocks). Returns the
    list of ``(start, stop)``.
    """
    cuts = sorted({0, n} | {int(e) for e in edges if 0 < e < n})
    pieces = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        k = -(-(b - a) // length)
        bounds = [a + (b - a) * i // k for i in range(k + 1)]
        pieces.extend(zip(bounds[:-1], bounds[1:]))
    small = max(1, length // 4)
    out = []
    for a, b in pieces:
        if out and (b - a < small or out[-1][1] - out[-1][0] < small) \
                and b - out[-1][0] <= length + small:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _sigma_block(prob, l, sl):
    """Sigmas of image ``l`` over slices ``sl``, divided by the problem's common scale."""
    sb = np.asarray(prob.sigmas[l][sl])
    if sb.dtype.kind != "f":  # integer sigmas: float reductions (initial=inf) need floats
        sb = sb.astype(np.float64)
    if prob.sigma_scale != 1.0:
        sb = sb / prob.sigma_scale
    return sb


def _read_box(prob, l, box, step=None, mask=True):
    """Image ``l``'s data, mask (None: no mask) and sigmas (None: a number) over ``box``.

    ``step`` (an int) takes every ``step``-th pixel of the box along each axis.
    The mask and sigmas are as given (the mask may be a view of the input).
    ``mask=False``: the mask is not read (known to be all true there).
    """
    sl = _slices(box, prob.origins[l])
    if step is not None:
        sl = tuple(slice(s.start, s.stop, step) for s in sl)
    src = np.asarray(prob.images[l][sl])
    m = prob.masks[l] if mask else None
    mb = None if m is None else np.asarray(m[sl]).astype(bool, copy=False)
    sb = None if isinstance(prob.sigmas[l], float) else _sigma_block(prob, l, sl)
    return src, mb, sb


def _prepare_image(prob, l, box, step=None, read=None):
    """Float64 data (0 where invalid), variance (inf where invalid) and validity of a box.

    Also returns ``(nonfinite, sigma_out, absurd)``: the number of pixels that the
    mask marks valid, whose sigma is not <= 0, but whose data or sigma is NaN
    or infinite; the number of valid, finite pixels whose sigma is > 0
    but outside ``[SIGMA_MIN, SIGMA_MAX]`` (left out: see
    :func:`jwst_wiimatch.core.inputs.common_sigma_scale`); and the number of
    the remaining pixels whose value is outside the image's
    ``prob.limits`` (left out as absurd). The caller's
    arrays are only read (checks run on the input dtype, float32 stays cheap).
    ``step`` (an int) takes every ``step``-th pixel of the box along each axis.
    ``read``: what :func:`_read_box` gave for the box, when it was read already.
    """
    src, mb, sb = _read_box(prob, l, box, step) if read is None else read
    valid = np.ones(src.shape, dtype=bool) if mb is None else mb.astype(bool)  # a copy
    s = prob.sigmas[l]
    if isinstance(s, float):
        if not SIGMA_MIN < s <= SIGMA_MAX:
            out = 0
            if s > 0 and np.isfinite(s):
                out = int(np.count_nonzero(valid & np.isfinite(src)))
            return (np.zeros(src.shape), np.full(src.shape, np.inf),
                    np.zeros(src.shape, dtype=bool), (0, out, 0))
    fin = np.isfinite(src)
    if sb is not None:
        fin &= np.isfinite(sb)
    nonfinite = 0
    if not fin.all():
        bad = valid & ~fin
        if sb is not None:
            bad &= ~(sb <= 0)  # sigma <= 0 means "not used", not "non-finite"
        nonfinite = int(np.count_nonzero(bad))
        valid &= fin
    out = 0
    if sb is not None:
        with np.errstate(invalid="ignore"):
            # float64 bounds (not cast to the sigmas' dtype, where they overflow)
            good = (sb > np.float64(SIGMA_MIN)) & (sb <= np.float64(SIGMA_MAX))
        if not good.all():
            out = int(np.count_nonzero(valid & ~good & (sb > 0)))
            valid &= good
    absurd = 0
    lim = None if prob.limits is None else prob.limits[l]
    if lim is not None:
        with np.errstate(invalid="ignore"):
            inside = (src >= lim[0]) & (src <= lim[1])
        if not inside.all():
            absurd = int(np.count_nonzero(valid & ~inside))
            valid &= inside
    if valid.all():  # common inside a footprint: plain conversions
        d = src.astype(np.float64)
        var = np.full(src.shape, s * s) if sb is None else np.square(sb, dtype=np.float64)
        return d, var, valid, (nonfinite, out, absurd)
    d = np.zeros(src.shape)
    np.copyto(d, src, where=valid)
    var = np.full(src.shape, np.inf)
    if sb is None:
        np.copyto(var, s * s, where=valid)
    else:
        np.square(sb, out=var, where=valid, dtype=np.float64)
    return d, var, valid, (nonfinite, out, absurd)


def _fill_image(prob, l, box, d, var, mask_full=False):
    """Write image ``l`` over ``box`` into its slots of a block's stacks.

    ``d`` and ``var`` are views of the box's shape. On return they hold what
    :func:`_prepare_image` gives: data (0 where not valid) and variance (inf
    where not valid). Returns ``(valid, counts)``: the validity (None when
    every pixel of the box is valid) and the counts of
    :func:`_prepare_image`. The common cases (every pixel the mask marks valid is finite,
    with a usable sigma) cost a few whole-box operations, which release the
    GIL; anything else goes through :func:`_prepare_image`. ``mask_full``:
    the image's mask is all true over its valid box (not read then).
    """
    s = prob.sigmas[l]
    if isinstance(s, float) and not SIGMA_MIN < s <= SIGMA_MAX:
        d[...] = 0.0
        var[...] = np.inf
        return np.zeros(d.shape, dtype=bool), _prepare_image(prob, l, box)[3]
    read = _read_box(prob, l, box, mask=not mask_full)
    src, mb, sb = read
    if mb is not None and mb.all():
        mb = None
    ok = True
    if sb is not None:  # sigmas whose squares are normal float64 numbers
        lo = float(np.min(sb) if mb is None else np.min(sb, where=mb, initial=np.inf))
        if lo <= 0:
            # sigmas <= 0 mark pixels not used (e.g. outside a footprint
            # within its box): a mask of them keeps such boxes on the fast
            # path. (A NaN sigma makes the minimum NaN: the careful path
            # counts it.)
            used = ~(sb <= 0)
            mb = used if mb is None else (mb & used)
            lo = float(np.min(sb, where=mb, initial=np.inf))
        # (no finite float32 sigma is too large: the upper bound needs no
        # pass there, an infinite one is caught by the finiteness test below)
        big = sb.dtype.kind == "f" and float(np.finfo(sb.dtype).max) > SIGMA_MAX
        ok = lo > SIGMA_MIN and (not big or float(
            np.max(sb) if mb is None else np.max(sb, where=mb, initial=0.0)) <= SIGMA_MAX)
    if ok:
        if mb is None:
            np.copyto(d, src)
            if sb is None:
                var.fill(s * s)
            else:
                np.square(sb, out=var, dtype=np.float64)
        else:
            d[...] = 0.0
            var[...] = np.inf
            np.copyto(d, src, where=mb)
            if sb is None:
                np.copyto(var, s * s, where=mb)
            else:
                np.square(sb, out=var, where=mb, dtype=np.float64)
        # A finite sum of d * var over the valid pixels means every term is
        # finite: the data and the variances are (var > 0 there). An overflow
        # of the sum only sends us down the careful path.
        if mb is None:
            ok = np.isfinite(np.vdot(d, var))
        else:
            ok = np.isfinite(np.add.reduce(d, axis=None)) and \
                np.isfinite(np.max(var, where=mb, initial=0.0))
        lim = None if prob.limits is None else prob.limits[l]
        if ok and lim is not None:  # values outside the limits: the careful path
            w = True if mb is None else mb
            ok = float(np.min(d, where=w, initial=np.inf)) >= lim[0] and \
                float(np.max(d, where=w, initial=-np.inf)) <= lim[1]
    if ok:
        return mb, (0, 0, 0)
    dd, vv, valid, counts = _prepare_image(prob, l, box, read=read)  # not read again
    d[...] = dd
    var[...] = vv
    return (None if valid.all() else valid), counts


@functools.lru_cache(maxsize=64)
def _pairs(k):
    """Pairs ``i < j`` of ``k`` stacked images: index arrays and lists (cached)."""
    ia, ib = np.triu_indices(k, 1)
    ia.flags.writeable = False
    ib.flags.writeable = False
    return ia, ib, tuple(ia.tolist()), tuple(ib.tolist())


def _powers(u, maxdeg):
    """``u ** k`` for ``k = 0 .. maxdeg``, stacked on a new first axis."""
    out = np.empty((maxdeg + 1,) + np.shape(u))
    out[0] = 1.0
    for k in range(1, maxdeg + 1):
        np.multiply(out[k - 1], u, out=out[k])
    return out


def _contract_separable(arr, axis_powers, sub):
    """Moments of a stack of weight boxes for image (separable) coordinates.

    ``arr`` has shape ``(B, s_0, ..., s_{n-1})`` (numpy order); the result
    ``out[b, r_x, r_y, ...] = sum arr[b] * prod_j P_j[i_j, r_j]`` has its
    exponent axes in ``(x, y, ...)`` order. ``sub`` are the box's slices.
    BLAS products throughout (they release the GIL). The first (slowest)
    pixel axis goes first, one ``P^T @ box`` per box: a few rows of output
    over the whole box, twice as fast as the skinny product the other
    axes make and it shrinks what they have to read by ``s_0 / R``. Each other
    axis is then contracted last axis first, its exponent axis moved in front
    of the remaining pixel axes.
    """
    nd = arr.ndim - 1
    nb = arr.shape[0]
    if nd > 1:
        pt = axis_powers[nd - 1][sub[0]].T  # (R, s_0): the first axis' powers
        flat = arr.reshape(nb, arr.shape[1], -1)
        # one batched product (a BLAS product per box, in one call: the
        # interpreter lock is handed over once, not once per box)
        arr = np.matmul(pt, flat).reshape((nb * pt.shape[0],) + arr.shape[2:])
    for j in range(nd - 1 if nd > 1 else 1):
        p = axis_powers[j][sub[nd - 1 - j]]
        shape = arr.shape[:-1] + (p.shape[1],)
        arr = np.dot(arr.reshape(-1, arr.shape[-1]), p).reshape(shape)
        if j < nd - 2:
            arr = np.ascontiguousarray(np.moveaxis(arr, -1, 1 + j))
    if nd > 1:  # (B, R_first, r_x, ...) -> (B, r_x, ..., R_first)
        arr = np.moveaxis(arr.reshape((nb, pt.shape[0]) + arr.shape[1:]), 1, -1)
    return arr


# Most pairs whose weights are stacked at once, and bound on the elements of
# one such stack (pairs x pixels): the stacks are few whole-array operations
# (which release the GIL) and the moments one matrix product per stack.
PAIR_BATCH = 64
STACK_ELEMS = 1 << 17
# World coordinates: bound on all the values a chunk holds (three stacks of
# pairs x pixels, the chunk's monomials, ``prod(2 D + 1)`` per pixel, and
# their powers). A chunk costs some 40 numpy calls, so smaller chunks, which
# would fit a core's cache better, lose more in overhead than they gain
# (measured: 1 << 17 is 15% slower than 1 << 19, 1 << 21 20% slower); with
# few pairs the bound keeps the monomials of a chunk to a few MB instead of
# those of the whole block.
WORLD_CHUNK_ELEMS = 1 << 19


# World coordinates: a block's moments from Chebyshev series of its world
# monomials (see _Accumulator._world_fit) when the series agree with the
# monomials to WORLD_FIT_TOL of their magnitude; the series' degree per axis
# is at most twice the polynomial's total degree (exact for an affine frame)
# plus WORLD_FIT_EXTRA; a fit is tried where the block has at least
# WORLD_FIT_MIN_GAIN times as many pixels as the fit evaluates the frame at.
WORLD_FIT = True
WORLD_FIT_TOL = 1e-12
WORLD_FIT_EXTRA = 6
WORLD_FIT_MIN_GAIN = 8
# Blocks whose fits are made ahead at a time when threads run the blocks.
FITS_AHEAD = 64
# Grids of at most this many blocks keep their blocks' fits (about 20 KB each
# at degree 2) between the passes of a robust match.
FIT_CACHE_BLOCKS = 1024


class _WorldFit(NamedTuple):
    """A block's world monomials as tensor Chebyshev series (axes in ``(x, y, ...)`` order)."""

    bases_S: list  # per axis: (pixels of the block's axis, degree + 1) Chebyshev values
    bases_T: list  # the same, for the monomials of T (lower degrees)
    CS: np.ndarray  # (rows of the world monomials, product of the degrees + 1)
    CT: np.ndarray  # (their first rows, T's monomials, ...)


@functools.lru_cache(maxsize=1024)
def _fit_axis(lo, hi, kmax):
    """Nodes, check grid and Chebyshev tables of :meth:`_Accumulator._world_fit`
    along one axis of a block (pixels ``lo:hi``, at most ``kmax + 1`` nodes;
    cached: blocks share their cuts). None: no set of distinct nodes."""
    n = hi - lo
    mid, half = (lo + hi - 1) / 2.0, max((n - 1) / 2.0, 0.5)
    if n <= kmax + 1:  # every pixel a node: exact along this axis
        nodes = grid = np.arange(lo, hi, dtype=float)
    else:
        k = np.arange(kmax + 1)
        nodes = np.unique(np.rint(mid - half * np.cos((2 * k + 1) * np.pi / (2 * kmax + 2))))
        between = np.rint((nodes[:-1] + nodes[1:]) / 2.0)
        grid = np.union1d(nodes, np.concatenate([[lo, hi - 1.0], between]))
    if nodes.size != min(n, kmax + 1):
        return None
    cheb = np.polynomial.chebyshev.chebvander
    deg = nodes.size - 1
    res = _FitAxis(grid=grid, nodes=np.searchsorted(grid, nodes),
                   inv=np.linalg.inv(cheb((nodes - mid) / half, deg)),
                   vander=cheb((grid - mid) / half, deg),
                   basis=cheb((np.arange(lo, hi, dtype=float) - mid) / half, deg))
    for a in res:
        a.flags.writeable = False
    return res


def _along_axes(mats, arr):
    """``arr`` (``(rows, n_1, ..., n_d)``) with matrix ``mats[j]`` applied along
    axis ``j + 1``: ``out[r, a, b, ...] = sum mats[0][a, i] mats[1][b, k] ... arr[r, i, k, ...]``."""
    if len(mats) == 2:
        return np.matmul(np.matmul(mats[0], arr), mats[1].T)
    for j, m in enumerate(mats):
        arr = np.moveaxis(np.tensordot(m, arr, axes=([1], [j + 1])), 0, j + 1)
    return arr


def _tensor_values(C, tables):
    """Values over a box of ``k`` tensor-product polynomials: ``C`` ``(k, K_x, K_y,
    ...)`` their coefficients, ``tables[j]`` ``(pixels along axis j, K_j)`` the
    basis along each axis, both in ``(x, y, ...)`` order. Returns ``(k, pixels)``,
    the box's pixels in numpy (C) order."""
    k, nd = C.shape[0], C.ndim - 1
    if nd == 2:  # B_y C^T B_x^T per polynomial: two matrix products, no transposed copy
        return np.matmul(np.matmul(tables[1], C.transpose(0, 2, 1)), tables[0].T).reshape(k, -1)
    vals = _along_axes(list(tables), C)  # axes (k, x, y, ...)
    return np.ascontiguousarray(vals.transpose((0,) + tuple(range(nd, 0, -1)))).reshape(k, -1)


def _outer_rows(pows, sizes):
    """Row-wise tensor products of per-axis values: ``pows[j]`` ``(n, >= sizes[j])``,
    ``(x, y, ...)`` order; returns ``(n, prod(sizes))``, C order over ``sizes``."""
    phi = pows[0][:, :sizes[0]]
    for p, sz in zip(pows[1:], sizes[1:]):
        phi = (phi[:, :, None] * p[:, None, :sz]).reshape(phi.shape[0], -1)
    return phi


class _FitAxis(NamedTuple):
    """One axis of a block for :meth:`_Accumulator._world_fit` (pixel indices)."""

    grid: np.ndarray  # where the frame is evaluated: the nodes, between them, the ends
    nodes: np.ndarray  # positions of the nodes in ``grid``
    inv: np.ndarray  # inverse of the Chebyshev matrix at the nodes
    vander: np.ndarray  # (grid, degree + 1) Chebyshev values on the grid
    basis: np.ndarray  # (pixels of the axis, degree + 1) Chebyshev values


class _BlockSums(NamedTuple):
    """What one block adds: per pair (rows of ``keys``) and per image."""

    keys: list  # (l, m), l < m
    S: np.ndarray  # (P, prod(2 D + 1)) moments of w
    T: np.ndarray  # (P, prod(D + 1)) moments of w (I_l - I_m)
    chi: np.ndarray  # (P,)
    npix: np.ndarray  # (P,) int64
    image_npix: np.ndarray  # (n,) int64
    nonfinite: np.ndarray  # (n, 3) int64: non-finite, sigma out of range, absurd
    bad_coords: int
    rejected: np.ndarray = None  # (P,) int64, robust passes: pixels left out per pair
    image_rejected: np.ndarray = None  # (n,) int64: left out of all the image's pairs


class _Sums:
    """Running sums of block results, one row per pair met so far."""

    def __init__(self, n, nS, nT):
        self.n = n
        self.rows = {}
        self.S = np.zeros((16, nS))
        self.T = np.zeros((16, nT))
        self.chi = np.zeros(16)
        self.npix = np.zeros(16, dtype=np.int64)
        self.image_npix = np.zeros(n, dtype=np.int64)
        self.nonfinite = np.zeros((n, 3), dtype=np.int64)
        self.bad_coords = 0
        self.rejected = np.zeros(16, dtype=np.int64)
        self.image_rejected = np.zeros(n, dtype=np.int64)

    def _grow(self, need):
        cap = max(need, 2 * len(self.chi))
        for name in ("S", "T", "chi", "npix", "rejected"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], dtype=old.dtype)
            new[:len(old)] = old
            setattr(self, name, new)

    def add(self, part):
        self.image_npix += part.image_npix
        self.nonfinite += part.nonfinite
        self.bad_coords += part.bad_coords
        if part.image_rejected is not None:
            self.image_rejected += part.image_rejected
        if not part.keys:
            return
        rows = self.rows
        idx = [rows.setdefault(k, len(rows)) for k in part.keys]
        if len(rows) > len(self.chi):
            self._grow(len(rows))
        # keys of one block are distinct, so fancy-index += adds every row
        self.S[idx] += part.S
        self.T[idx] += part.T
        self.chi[idx] += part.chi
        self.npix[idx] += part.npix
        if part.rejected is not None:
            self.rejected[idx] += part.rejected

    def moments(self, mshape, dshape):
        res = PairMoments(self.n, image_npix=self.image_npix,
                          nonfinite=self.nonfinite[:, 0].copy(),
                          sigma_out=self.nonfinite[:, 1].copy(),
                          absurd=self.nonfinite[:, 2].copy(),
                          bad_coords=self.bad_coords,
                          image_rejected=self.image_rejected)
        for key, r in self.rows.items():
            res.S[key] = self.S[r].reshape(mshape).copy()
            res.T[key] = self.T[r].reshape(dshape).copy()
            res.chi[key] = float(self.chi[r])
            res.npix[key] = int(self.npix[r])
            res.rejected[key] = int(self.rejected[r])
        return res


class _Accumulator:
    def __init__(self, prob, frame, bboxes, robust=None, mask_full=None):
        #: a :class:`jwst_wiimatch.core.robust.RobustPass` (None: plain sums)
        self.rob = robust
        #: hits near the blocks' edges (see :meth:`band_hits`)
        self._hits = None
        #: world frames: the blocks' fits made ahead (see :meth:`prepare_fits`), by box
        self._fits = {}
        #: world frames: keep the fits in the frame for the next pass
        self.cache_fits = False
        #: per image: its mask is all true over its valid box (not read by blocks)
        self.mask_full = [False] * len(prob.images) if mask_full is None else mask_full
        self.prob = prob
        self.frame = frame
        self.bboxes = bboxes
        self.n = len(prob.images)
        self.deg = prob.degree
        self.mdeg = tuple(2 * d for d in self.deg)
        self.mshape = tuple(d + 1 for d in self.mdeg)
        self.dshape = tuple(d + 1 for d in self.deg)
        self.dsl = tuple(slice(0, d + 1) for d in self.deg)
        if frame.separable:
            self.axis_powers = [np.ascontiguousarray(_powers(frame.axis_u(j), self.mdeg[j]).T)
                                for j in range(frame.ndim)]
        else:
            self._mono_setup()
            self._const_row = int(np.flatnonzero(np.all(self._mono_rows == 0, axis=1))[0])

    def _world_monomials(self, u, ok, out=None):
        """Monomials of scaled world coordinates (``u``: one flat array per axis).

        Returns ``phi`` (``R x npix``: ``u**r`` for every ``r <= 2 D``) and
        ``phid`` (the rows ``r <= D``), the first rows of ``phi``: each
        monomial is computed once, the powers of each axis are rows of the
        table, and each other row is one product. Row ``i`` of ``phi`` is the
        monomial of C-order index ``mono_order[i]`` over ``r <= 2 D``, row
        ``i`` of ``phid`` the one of index ``dmono_order[i]`` over ``r <= D``
        (see :meth:`_mono_setup`). Where ``ok`` (None: everywhere) is False
        the rows other than the constant one are 0.

        ``out`` (a float64 buffer of at least ``R`` values per pixel)
        receives the table: no allocation per chunk. The products are taken
        in axis order (``(u_x**a * u_y**b) * u_z**c``), the powers by
        repeated multiplication, so every value is the one of the plain
        outer product of the powers.
        """
        npix = u[0].size
        nrow = len(self.mono_order)
        if out is None:
            out = np.empty(nrow * npix)
        phi = out[:nrow * npix].reshape(nrow, npix)
        for op in self._mono_plan:
            kind = op[0]
            if kind == "one":
                phi[op[1]] = 1.0
            elif kind == "copy":  # u_j (0 where not ok)
                _, j, row = op
                if ok is None:
                    phi[row] = u[j]
                else:
                    phi[row] = 0.0
                    np.copyto(phi[row], u[j], where=ok)
            elif kind == "pow":  # u_j**k = u_j**(k - 1) * u_j
                np.multiply(phi[op[2]], phi[op[3]], out=phi[op[1]])
            else:  # rows of one segment: outer product of two others
                _, dst, a0, na, b0, nb = op
                np.multiply(phi[a0:a0 + na, None, :], phi[None, b0:b0 + nb, :],
                            out=phi[dst:dst + na * nb].reshape(na, nb, npix))
        return phi, phi[:len(self.dmono_order)]

    def _mono_setup(self):
        """Layout and plan of :meth:`_world_monomials`' table.

        Each axis' exponents split into three parts: ``0``, ``1 .. D_j``
        (low) and ``D_j + 1 .. 2 D_j`` (high). A segment takes one part per
        axis; its rows are the C-order product of its parts. The segments
        without a high part (the monomials ``r <= D``) come first. A segment
        with one non-zero part is a run of powers of that axis; one with
        several is the outer product of the segment without its last
        non-zero axis and that axis' powers, both already in the table.
        """
        nd = len(self.deg)
        parts = [[(0, 1), (1, d + 1), (d + 1, 2 * d + 1)] for d in self.deg]
        segs = [p for p in itertools.product(range(3), repeat=nd)
                if all(parts[j][p[j]][1] > parts[j][p[j]][0] for j in range(nd))]
        segs.sort(key=lambda p: 2 in p)  # stable: the low segments first
        start, rows, size = {}, [], {}
        for p in segs:
            start[p] = len(rows)
            rng = [range(*parts[j][p[j]]) for j in range(nd)]
            seg_rows = list(itertools.product(*rng))
            size[p] = len(seg_rows)
            rows.extend(seg_rows)
        plan = []
        for p in sorted(segs, key=lambda p: sum(1 for x in p if x)):
            nz = [j for j in range(nd) if p[j]]
            if not nz:
                plan.append(("one", start[p]))
            elif len(nz) == 1:
                j = nz[0]
                zero = (0,) * nd
                for r in range(*parts[j][p[j]]):
                    e = list(zero)
                    e[j] = r
                    row = rows.index(tuple(e))
                    if r == 1:
                        plan.append(("copy", j, row))
                    else:
                        e[j] = r - 1
                        prev = rows.index(tuple(e))
                        e[j] = 1
                        plan.append(("pow", row, prev, rows.index(tuple(e))))
            else:
                j = nz[-1]
                head = tuple(0 if i == j else x for i, x in enumerate(p))
                tail = tuple(x if i == j else 0 for i, x in enumerate(p))
                plan.append(("outer", start[p], start[head], size[head],
                             start[tail], size[tail]))
        self._mono_plan = plan
        #: exponents (``(x, y, ...)`` order) of each row of the world monomials
        self._mono_rows = np.array(rows).reshape(len(rows), nd)
        #: C-order index (over ``r <= 2 D``) of each row of the world monomials
        self.mono_order = np.ravel_multi_index(np.array(rows).T, self.mshape)
        nT = int(np.prod(self.dshape))
        #: C-order index (over ``r <= D``) of each of their first rows
        self.dmono_order = np.ravel_multi_index(np.array(rows[:nT]).T, self.dshape)

    def _monomial_size(self):
        """Values per pixel of :meth:`_world_monomials`' buffer."""
        return int(np.prod(self.mshape))

    def _world_fit(self, ebox):
        """The world monomials of a block as tensor Chebyshev series of its pixel indices.

        World coordinates are smooth functions of the pixel indices, and so
        are their monomials: over a block, each is a short tensor series of
        Chebyshev polynomials of the block's (scaled) pixel indices. The
        block's world moments are then the series' coefficients times the
        moments of the pair weights against those polynomials, which are
        separable (as image coordinates' are): no world coordinates, no
        monomials per pixel. The series interpolate the monomials at
        ``K + 1`` pixels per axis near the Chebyshev points (``K``: twice the
        polynomial's total degree, an affine frame's exact degree, plus
        :data:`WORLD_FIT_EXTRA`), are cut per axis where the coefficients
        left out sum to a quarter of the tolerance, and are checked at the
        pixels between the nodes and at the block's edges: the series must
        agree with the monomials there to the tolerance, ``WORLD_FIT_TOL``
        times their largest magnitude on the block, or, when larger, what
        the rounding of the world coordinates themselves makes of the
        monomials (coordinates far from the frame's center, such as right
        ascensions near 150 degrees over a field of a few arcminutes, are
        known only to about ``1e-16 * 150`` degrees). Otherwise, or when a
        world coordinate there is not finite, or when the block is too
        small for a fit to pay, returns None (the block's monomials are
        then computed at every pixel).

        Returns a :class:`_WorldFit` (axes in ``(x, y, ...)`` order).
        """
        nd = len(ebox)
        npx = math.prod(b - a for a, b in ebox)
        kmax = sum(self.mdeg) + WORLD_FIT_EXTRA
        axes = [_fit_axis(*ebox[nd - 1 - j], kmax) for j in range(nd)]  # (x, y, ...)
        if any(a is None for a in axes) or \
                math.prod(a.grid.size for a in axes) * WORLD_FIT_MIN_GAIN > npx:
            return None
        gshape = tuple(a.grid.size for a in axes)
        pix = [np.broadcast_to(a.grid.reshape((1,) * j + (-1,) + (1,) * (nd - 1 - j)),
                               gshape).ravel() for j, a in enumerate(axes)]
        u = self.frame.points_u(pix)
        # (a sum is finite when every term is; one that overflows only
        # sends the block to the per-pixel path)
        if not np.isfinite(sum(float(np.sum(a)) for a in u)):
            return None
        nrow = len(self.mono_order)
        F = self._world_monomials(u, None)[0].reshape((nrow,) + gshape)
        # the monomials are known no better than the world coordinates:
        # those far from the frame's center (degrees near RA 150 over a
        # small field) carry the rounding of their size, relative to the scale
        fr = self.frame
        noise = max(np.finfo(float).eps * (abs(c) + abs(s0)) / s1
                    for c, s0, s1 in zip(fr.eff_center, fr.shift, fr.scale))
        tol = max(WORLD_FIT_TOL, 8 * sum(self.mdeg) * noise) * max(1.0, float(np.abs(F).max()))
        # coefficients of the interpolating series: the values at the nodes
        # times the inverse of each axis' Chebyshev matrix
        C = _along_axes([a.inv for a in axes], F[(slice(None),) + np.ix_(*[a.nodes
                                                                          for a in axes])])
        C[self._const_row] = 0.0  # the constant monomial: exactly the first polynomial
        C[(self._const_row,) + (0,) * nd] = 1.0
        # per axis and monomial, the sums of the coefficients' magnitudes
        # from each degree up
        A = np.abs(C)
        tails = []
        for j in range(nd):
            mag = A.sum(axis=tuple(a for a in range(1, nd + 1) if a != j + 1))
            tails.append(np.cumsum(mag[:, ::-1], axis=1)[:, ::-1])
        parts = []
        for nr in (nrow, len(self.dmono_order)):  # S's monomials, then T's (the first rows)
            # per axis, the lowest degree beyond which the coefficients of
            # every monomial sum to less than a quarter of the tolerance
            keep = []
            for t in tails:
                ok = np.flatnonzero(t[:nr].max(axis=0) <= tol / (4 * nd))
                keep.append(max(1, int(ok[0])) if ok.size else t.shape[1])
            Cr = C[(slice(0, nr),) + tuple(slice(0, k) for k in keep)]
            # the check: the cut series against the monomials on the grid
            fitted = _along_axes([a.vander[:, :k] for a, k in zip(axes, keep)], Cr)
            if not np.abs(fitted - F[:nr]).max() <= tol:
                return None
            parts.append(([a.basis[:, :k] for a, k in zip(axes, keep)],  # (cached tables)
                          Cr.reshape(nr, -1)))
        return _WorldFit(parts[0][0], parts[1][0], parts[0][1], parts[1][1])

    def _image_polys(self, labels, ebox, u, ok, fit=None):
        """``(k, npx)`` values of the current polynomials of images ``labels`` on ``ebox``.

        From the image coordinates' power tables, the series ``fit`` of the
        block's world monomials (:meth:`_world_fit`), or the world
        coordinates ``u`` (``ok``: where they are finite)."""
        coef = self.rob.coef_u[labels]
        k = len(labels)
        nd = len(ebox)
        if fit is not None:
            # each polynomial as a series of the block's Chebyshev polynomials
            P = np.dot(coef[:, self.dmono_order], fit.CT).reshape(
                (k,) + tuple(b.shape[1] for b in fit.bases_T))
            return _tensor_values(P, fit.bases_T)
        if self.frame.separable:
            sl = _slices(ebox)
            return _tensor_values(
                coef.reshape((k,) + self.dshape),
                [self.axis_powers[j][sl[nd - 1 - j]][:, :self.deg[j] + 1] for j in range(nd)])
        npix = u[0].size
        pows = [_powers(a if ok is None else np.where(ok, a, 0.0), d)
                for a, d in zip(u, self.deg)]
        phid = pows[0]
        for p in pows[1:]:
            phid = (phid[:, None, :] * p[None, :, :]).reshape(-1, npix)
        return coef @ phid

    def _monomials_at(self, idx, eshape, origin, u, fit=None):
        """``(n, prod(2 D + 1))`` and ``(n, prod(D + 1))`` monomials at flat indices of a box.

        World frames: from the block's series ``fit`` when given, else from
        the world coordinates ``u`` of the box."""
        nd = len(eshape)
        if fit is not None:
            coords = np.unravel_index(idx, eshape)

            def series(bases, C, order, size):
                vals = _outer_rows([b[coords[nd - 1 - j]] for j, b in enumerate(bases)],
                                   [b.shape[1] for b in bases])
                out = np.empty((idx.size, size))
                out[:, order] = np.dot(vals, C.T)
                return out

            return (series(fit.bases_S, fit.CS, self.mono_order, int(np.prod(self.mshape))),
                    series(fit.bases_T, fit.CT, self.dmono_order, int(np.prod(self.dshape))))
        if self.frame.separable:
            coords = np.unravel_index(idx, eshape)
            pows = [self.axis_powers[j][coords[nd - 1 - j] + origin[nd - 1 - j]]
                    for j in range(nd)]
        else:
            pows = [_powers(a[idx], md).T for a, md in zip(u, self.mdeg)]
        return _outer_rows(pows, self.mshape), _outer_rows(pows, self.dshape)

    def _robust_chunk(self, W, resid, runs, t2, cw, seeds, g0, p0, p1):
        """Robust pass, one chunk (pairs ``g0 ...``, pixels ``p0:p1``): collect the
        pixels beyond the threshold (``seeds``) and, for Huber / Tukey, multiply
        the weights ``W`` by the robust weights. The rejected pixels and their
        surroundings are taken out of the sums afterwards (`_reject`)."""
        R = np.empty_like(W)
        for a, bsel, j0, j1 in runs:  # resid: each image's data minus its polynomial
            np.subtract(resid[a, p0:p1], resid[bsel, p0:p1], out=R[j0:j1])
        np.multiply(R, R, out=R)
        np.multiply(R, W, out=R)  # squared normalised residual (0 where not valid)
        # rows (pairs) with a pixel beyond the threshold, then their pixels
        for i in np.flatnonzero(R.max(axis=1) > t2):
            seeds[g0 + int(i)].append(np.flatnonzero(R[i] > t2[i]) + p0)
        if self.rob.method != "clip":
            np.sqrt(R, out=R)
            R /= cw[:, None]
            W *= self.rob.weight(R)

    def _reject(self, seeds, S, T, chi, D, V, polys, eshape, origin, labels, ial, ibl, u,
                keys, halo=None, fit=None):
        """Take the rejected pixels of each pair, grown by ``grow``, out of its sums.

        ``halo`` (from :meth:`_halo`): flat indices (pairs x box) of the
        pixels within ``grow`` of a rejected pixel just outside the box, left
        out as well. Returns ``(rejected, image_rejected)``: per pair, the
        pixels left out; per image (all images), the pixels left out of
        every pair of the block that covers them (every other image valid
        there).
        """
        from .robust import dilate_flat

        rob = self.rob
        P = len(seeds)
        npx = D.shape[1]
        rejected = np.zeros(P, dtype=np.int64)
        image_rejected = np.zeros(self.n, dtype=np.int64)
        parts = [np.concatenate(sd) + j * npx for j, sd in enumerate(seeds) if sd]
        if not parts and (halo is None or halo.size == 0):
            return rejected, image_rejected
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if rob.grow and flat.size:  # grown within each pair's plane only (sorted, unique)
            flat = dilate_flat(flat, (P,) + tuple(eshape), rob.grow, skip_first=True)
        else:
            flat = np.unique(flat)
        if halo is not None and halo.size:
            flat = np.union1d(flat, halo)
        j, idx = np.divmod(flat, npx)
        ia, ib = np.asarray(ial)[j], np.asarray(ibl)[j]
        v = V[ia, idx] + V[ib, idx]
        fin = np.isfinite(v)
        if not fin.all():
            j, idx, ia, ib, v = j[fin], idx[fin], ia[fin], ib[fin], v[fin]
        if idx.size == 0:
            return rejected, image_rejected
        w = 1.0 / v
        df = D[ia, idx] - D[ib, idx]
        if rob.method != "clip":
            cw = np.array([rob.cw.get(key, np.inf) for key in keys])[j]
            r = np.abs(df - (polys[ia, idx] - polys[ib, idx])) * np.sqrt(w)
            w = w * rob.weight(r / cw)
        phi, phid = self._monomials_at(idx, eshape, origin, u, fit)
        wd = w * df
        # sums per pair of the rejected pixels' contributions: ``flat`` is
        # sorted, so each pair's pixels are one run (one reduceat for all
        # the monomials)
        rows, starts = np.unique(j, return_index=True)
        S[rows] -= np.add.reduceat(w[:, None] * phi, starts, axis=0)
        T[rows] -= np.add.reduceat(wd[:, None] * phid, starts, axis=0)
        chi -= np.bincount(j, wd * df, minlength=P)
        rejected += np.bincount(j, minlength=P)
        # a pixel of image i is rejected from all its pairs when the pairs of i
        # that reject it are as many as the other images valid there
        code = np.concatenate([ia * npx + idx, ib * npx + idx])
        code, count = np.unique(code, return_counts=True)
        img, pix = np.divmod(code, npx)
        upix, inv = np.unique(pix, return_inverse=True)
        nvalid = np.count_nonzero(np.isfinite(V[:, upix]), axis=0)
        alls = count == nvalid[inv] - 1
        if alls.any():
            np.add.at(image_rejected, np.asarray(labels)[img[alls]], 1)
        return rejected, image_rejected

    def band_hits(self, per_axis, max_pix, mapper=map):
        """Test, once for the whole grid, the pixels near the blocks' edges.

        A rejected pixel takes its neighbours within ``grow`` out of the
        pair's sums, also those across a block edge. Every pixel within
        ``grow`` of a cut between blocks (the bands along the cuts) is
        tested like the pixels of a block (the pair's normalised residual
        beyond its threshold, given the pass's polynomials), a few long
        pieces at a time instead of thin slabs around every block. Each
        block then takes from these hits the ones just outside it
        (:meth:`_halo`), so that the pixels left out do not depend on where
        the blocks are cut. ``per_axis``: the blocks' pieces along each axis
        (numpy order); ``max_pix``: the most pixels of a piece (the blocks'
        bound, which keeps images x pixels bounded); ``mapper``: map, or a
        pool's map.
        """
        self._hits = None
        g = int(self.rob.grow) if self.rob is not None else 0
        if not g or not any(np.isfinite(t) for t in self.rob.t2.values()):
            return
        shape = self.prob.shape
        nd = len(shape)
        # a piece holds a few (images x pixels) arrays: at most a quarter of
        # a block's pixels per image it reaches
        elems = max(1, max_pix // 4)
        # the images' boxes as arrays (an empty box where an image has none)
        blo = np.array([[a for a, _ in b] if b is not None else [1] * nd
                        for b in self.bboxes]).reshape(self.n, nd)
        bhi = np.array([[e for _, e in b] if b is not None else [0] * nd
                        for b in self.bboxes]).reshape(self.n, nd)
        pieces = []  # (box, images it reaches)
        for k in range(nd):
            other = [i for i in range(nd) if i != k]
            for c in (a for a, _ in per_axis[k][1:]):
                band = (max(0, c - g), min(shape[k], c + g))
                # the band cut like the blocks along the other axes, runs of
                # them along the last one joined while the images they reach
                # times their pixels stay within the bound
                ax = other[-1] if other else k
                rest = other[:-1]
                segs = np.array(per_axis[ax]) if other else np.array([band])
                for fixed in itertools.product(*[per_axis[i] for i in rest]):
                    def box_of(a, b):
                        return tuple(band if i == k else (int(a), int(b)) if i == ax
                                     else fixed[rest.index(i)] for i in range(nd))

                    whole = box_of(segs[0, 0], segs[-1, 1])
                    lo = np.array([a for a, _ in whole])
                    hi = np.array([b for _, b in whole])
                    cand = np.flatnonzero(np.all((blo < hi) & (bhi > lo), axis=1))
                    if cand.size < 2:  # no pair reaches this part of the band
                        continue
                    reach = (blo[cand, ax][:, None] < segs[None, :, 1]) & \
                        (bhi[cand, ax][:, None] > segs[None, :, 0])
                    across = math.prod(b - a for i, (a, b) in enumerate(whole) if i != ax)
                    r0, acc = None, None
                    for q in range(len(segs)):
                        if r0 is not None:
                            both = acc | reach[:, q]
                            if int(both.sum()) * across * (segs[q, 1] - segs[r0, 0]) <= elems:
                                acc = both
                                continue
                            pieces.append((box_of(segs[r0, 0], segs[q - 1, 1]), cand[acc]))
                        r0, acc = q, reach[:, q]
                    pieces.append((box_of(segs[r0, 0], segs[-1, 1]), cand[acc]))
        found = [h for h in mapper(self._piece_hits, pieces) if h is not None]
        if not found:
            return
        code = np.concatenate([c for c, _ in found])
        pts = np.concatenate([p for _, p in found], axis=1)
        # bands cross at the corners of the blocks: each hit once
        flat = np.ravel_multi_index(tuple(pts), shape)
        _, first = np.unique(np.stack([code, flat]), axis=1, return_index=True)
        code, pts = code[first], pts[:, first]
        order = np.argsort(pts[0], kind="stable")
        self._hits = (code[order], pts[:, order])

    def _piece_hits(self, piece):
        """Hits (pair codes ``l * n + m``, grid points) of one piece of a band."""
        box, labels = piece
        labels = [int(l) for l in labels]
        if len(labels) < 2:
            return None
        ia, ib = [], []
        t2 = []
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                t = self.rob.t2.get((labels[a], labels[b]), np.inf)
                if np.isfinite(t):
                    ia.append(a)
                    ib.append(b)
                    t2.append(t)
        if not ia:
            return None
        ia, ib = np.array(ia), np.array(ib)
        hits = self._slab_hits(box, labels, ia, ib, np.array(t2))
        if hits is None:
            return None
        j, pts = hits
        lab = np.asarray(labels)
        return lab[ia[j]] * self.n + lab[ib[j]], pts

    def _halo(self, ebox, labels, ial, ibl):
        """Pixels of ``ebox`` that rejected pixels just outside it take out of its pairs.

        From the hits of :meth:`band_hits`: those of the block's pairs
        within ``grow`` outside ``ebox`` (a pixel of the block outside
        ``ebox`` is valid in no image: no hits there). Returns flat indices
        into ``(pairs,) + box shape``, sorted (None: nothing).
        """
        if self._hits is None:
            return None
        g = int(self.rob.grow)
        nd = len(ebox)
        outer = tuple((max(0, lo - g), min(n, hi + g)) for (lo, hi), n in
                      zip(ebox, self.prob.shape))
        if outer == ebox:
            return None
        code, pts = self._hits
        i0, i1 = np.searchsorted(pts[0], [outer[0][0], outer[0][1]])
        if i0 == i1:
            return None
        code, pts = code[i0:i1], pts[:, i0:i1]
        lo = np.array([a for a, _ in ebox]).reshape(nd, 1)
        hi = np.array([b for _, b in ebox]).reshape(nd, 1)
        olo = np.array([a for a, _ in outer]).reshape(nd, 1)
        ohi = np.array([b for _, b in outer]).reshape(nd, 1)
        near = np.all((pts >= olo) & (pts < ohi), axis=0) & \
            ~np.all((pts >= lo) & (pts < hi), axis=0)
        if not near.any():
            return None
        code, pts = code[near], pts[:, near]
        # the block's pair (row of its sums) of each hit, if the block has it
        bcode = np.asarray(labels)[np.asarray(ial)] * self.n + \
            np.asarray(labels)[np.asarray(ibl)]
        order = np.argsort(bcode)
        pos = np.searchsorted(bcode[order], code)
        pos[pos == bcode.size] = 0
        mine = bcode[order][pos] == code
        if not mine.any():
            return None
        j, pts = order[pos[mine]], pts[:, mine]
        eshape = tuple(b - a for a, b in ebox)
        npx = math.prod(eshape)
        offs = np.indices((2 * g + 1,) * nd).reshape(nd, -1, 1) - g
        near = pts[:, None, :] + offs  # (nd, noff, nhit)
        lo3, hi3 = lo[:, :, None], hi[:, :, None]
        inside = np.all((near >= lo3) & (near < hi3), axis=0)  # (noff, nhit)
        if not inside.any():
            return None
        jj = np.broadcast_to(j, inside.shape)[inside]
        loc = tuple((near[i] - lo3[i])[inside] for i in range(nd))
        return np.unique(jj * npx + np.ravel_multi_index(loc, eshape))

    def _slab_hits(self, slab, labels, ia, ib, t2v):
        """Pairs and grid pixels of ``slab`` beyond the pairs' thresholds (a piece of a band)."""
        boxes = [_intersect(self.bboxes[l], slab) for l in labels]
        if sum(b is not None for b in boxes) < 2:  # no pair there: nothing to read
            return None
        sshape = tuple(hi - lo for lo, hi in slab)
        m = math.prod(sshape)
        k = len(labels)
        # the validity rules of _prepare_image, for all the images at once
        # (the slabs are thin: one set of operations per slab, not per image)
        X = np.full((k, m), np.nan)  # data, NaN where an image does not reach
        S = np.full((k, m), np.nan)  # sigma (scaled)
        M = np.zeros((k, m), dtype=bool)  # the mask
        lims = np.tile([-np.inf, np.inf], (k, 1))
        for i, (l, box) in enumerate(zip(labels, boxes)):
            if box is None:
                continue
            src, mb, sb = _read_box(self.prob, l, box)
            sub = _slices(box, tuple(lo for lo, _ in slab))
            X[i].reshape(sshape)[sub] = src
            S[i].reshape(sshape)[sub] = self.prob.sigmas[l] if sb is None else sb
            M[i].reshape(sshape)[sub] = True if mb is None else mb
            lim = None if self.prob.limits is None else self.prob.limits[l]
            if lim is not None:  # compared as in the image's own dtype
                kind = src.dtype if src.dtype.kind == "f" else np.float64
                lims[i] = np.asarray(lim, dtype=kind)
        with np.errstate(invalid="ignore"):
            valid = M & np.isfinite(X) & np.isfinite(S) & (S > SIGMA_MIN) & (S <= SIGMA_MAX)
            valid &= (X >= lims[:, :1]) & (X <= lims[:, 1:])
        D = np.where(valid, X, 0.0)
        V = np.where(valid, np.square(S), np.inf)
        any_valid = valid.any(axis=1)
        live = any_valid[ia] & any_valid[ib]
        if not live.any():
            return None
        u = ok = None
        if not self.frame.separable:
            u = [a.ravel() for a in self.frame.block_u(_slices(slab))]
            ok = np.logical_and.reduce([np.isfinite(a) for a in u])
            V[:, ~ok] = np.inf
            if ok.all():
                ok = None
        resid = D - self._image_polys(labels, slab, u, ok)
        sel = np.flatnonzero(live)
        r2 = resid[ia[sel]] - resid[ib[sel]]  # as the block's chunks compute it
        np.multiply(r2, r2, out=r2)
        np.multiply(r2, np.divide(1.0, V[ia[sel]] + V[ib[sel]]), out=r2)
        hit = r2 > t2v[sel, None]
        if not hit.any():
            return None
        j, idx = np.nonzero(hit)
        pts = np.stack(np.unravel_index(idx, sshape)) + \
            np.array([lo for lo, _ in slab]).reshape(-1, 1)
        return sel[j], pts

    def _block_boxes(self, block_box):
        """The images that reach a block, as ``[(image, box within the block)]``,
        and the box they cover together (None: no image)."""
        boxes = []
        for l in range(self.n):
            if self.bboxes[l] is None:
                continue
            box = _intersect(self.bboxes[l], block_box)
            if box is not None:
                boxes.append((l, box))
        if not boxes:
            return boxes, None
        ebox = tuple((min(b[k][0] for _, b in boxes), max(b[k][1] for _, b in boxes))
                     for k in range(len(block_box)))
        return boxes, ebox

    def prepare_fits(self, blocks):
        """The series of :meth:`_world_fit` for the blocks with pairs among
        ``blocks``, ahead of them (they replace those of earlier blocks): the
        fits are many small operations, which hold the interpreter lock, and
        run faster alone than between other threads' blocks."""
        fits = {}
        for b in blocks:
            boxes, ebox = self._block_boxes(tuple((s.start, s.stop) for s in b))
            if len(boxes) > 1 and ebox not in fits:
                fits[ebox] = self._fit_for(ebox)
        self._fits = fits

    def _fit_for(self, ebox):
        """:meth:`_world_fit` of a box, kept in the frame's cache when the grid
        has few enough blocks (see :data:`FIT_CACHE_BLOCKS`)."""
        if not self.cache_fits:
            return self._world_fit(ebox)
        key = (self.deg, ebox)
        fit = self.frame.fits.get(key, False)
        if fit is False:
            fit = self.frame.fits[key] = self._world_fit(ebox)
        return fit

    def block(self, bslices):
        n = self.n
        image_npix = np.zeros(n, dtype=np.int64)
        nonfinite = np.zeros((n, 3), dtype=np.int64)
        nS, nT = int(np.prod(self.mshape)), int(np.prod(self.dshape))
        empty = _BlockSums([], np.zeros((0, nS)), np.zeros((0, nT)), np.zeros(0),
                           np.zeros(0, dtype=np.int64), image_npix, nonfinite, 0)
        boxes, ebox = self._block_boxes(tuple((s.start, s.stop) for s in bslices))
        if not boxes:
            return empty
        if len(boxes) == 1:  # no pairs; only the non-finite pixels to count
            l, box = boxes[0]
            read = _read_box(self.prob, l, box, mask=not self.mask_full[l])
            nonfinite[l] += _prepare_image(self.prob, l, box, read=read)[3]
            return empty

        # Stacks of the images' data and variance over the part of the
        # block that some image covers (flattened).
        origin = tuple(lo for lo, _ in ebox)
        eshape = tuple(hi - lo for lo, hi in ebox)
        npx = int(np.prod(eshape))
        rowlen = npx // eshape[0]
        k = len(boxes)
        labels = [l for l, _ in boxes]
        subs = [_slices(box, origin) for _, box in boxes]
        full = [box == ebox for _, box in boxes]
        D = np.empty((k, npx))
        V = np.empty((k, npx))
        valids = []
        for i, (l, box) in enumerate(boxes):
            Di, Vi = D[i].reshape(eshape), V[i].reshape(eshape)
            if not full[i]:
                Di.fill(0.0)
                Vi.fill(np.inf)
            valid, nf = _fill_image(self.prob, l, box, Di[subs[i]], Vi[subs[i]],
                                    self.mask_full[l])
            nonfinite[l] += nf
            valids.append(valid)

        Q = None  # validity rows (1.0 / 0.0), only where some box is partly valid

        def validity():
            q = np.zeros((k,) + eshape)
            for i in range(k):
                q[i][subs[i]] = 1.0 if valids[i] is None else valids[i]
            return q.reshape(k, npx)

        if any(v is not None for v in valids):
            Q = validity()
        bad_coords = 0
        u = ok = None
        # world frames: the moments (and a robust pass's polynomials) from
        # series of the world monomials when they fit
        fit = None
        if WORLD_FIT and not self.frame.separable:
            fit = self._fits[ebox] if ebox in self._fits else self._fit_for(ebox)
        sep = self.frame.separable or fit is not None
        if not sep:
            u = [a.ravel() for a in self.frame.block_u(_slices(ebox))]
            ok = np.ones(npx, dtype=bool)
            for a in u:
                ok &= np.isfinite(a)
            if ok.all():
                ok = None
            else:
                if Q is None:
                    Q = validity()
                notok = ~ok
                bad_coords = int(np.count_nonzero(Q[:, notok]))
                Q[:, notok] = 0.0
                D[:, notok] = 0.0
                V[:, notok] = np.inf

        # Pixel counts: pixels valid in both images of each pair, and pixels
        # of each image that another image also covers. From the boxes when
        # every box is all valid; else from products of the 0/1 validity rows
        # (sums of ones: exact integers).
        ia, ib, ial, ibl = _pairs(k)
        if Q is None:
            gp = []
            for a, b in zip(ial, ibl):
                pb = _intersect(boxes[a][1], boxes[b][1])
                gp.append(0 if pb is None else math.prod([hi - lo for lo, hi in pb]))
            gp = np.array(gp, dtype=np.int64)
            if all(full):
                image_npix[labels] += npx
            else:
                cover = np.zeros(eshape, dtype=np.int32)
                for sub in subs:
                    cover[sub] += 1
                for i, l in enumerate(labels):
                    image_npix[l] += np.count_nonzero(cover[subs[i]] > 1)
        else:
            G = np.dot(Q, Q.T)
            gp = np.rint(G[ia, ib]).astype(np.int64)
            multi = (Q.sum(axis=0) > 1).astype(float)
            image_npix[labels] += np.rint(np.dot(Q, multi)).astype(np.int64)
        sel = gp > 0
        if not sel.any():
            return _BlockSums([], empty.S, empty.T, empty.chi, empty.npix,
                              image_npix, nonfinite, bad_coords)
        ial = [a for a, s_ in zip(ial, sel) if s_]
        ibl = [b for b, s_ in zip(ibl, sel) if s_]
        npix = gp[sel]
        keys = [(labels[a], labels[b]) for a, b in zip(ial, ibl)]
        P = len(keys)
        S = np.zeros((P, nS))
        T = np.zeros((P, nT))
        chi = np.zeros(P)
        rob = self.rob
        if rob is not None:
            polys = self._image_polys(labels, ebox, u, ok, fit)
            resid = D - polys  # 0 - P where not valid (its weights are 0)
            t2v = np.array([rob.t2.get(key, np.inf) for key in keys])
            cwv = np.array([rob.cw.get(key, np.inf) for key in keys])
            seeds = [[] for _ in range(P)]

        # Groups of at most PAIR_BATCH pairs, over chunks of rows of the
        # box holding at most about STACK_ELEMS values per stack: a handful
        # of large operations per chunk (they release the GIL), and the
        # moments as matrix products over the chunk. The stacks live in two
        # buffers allocated once per block and reused by every chunk.
        if sep:
            # whole rows of the box for as many pairs as fit: few chunks
            # (the monomials cost nothing to slice)
            group = max(1, min(PAIR_BATCH, STACK_ELEMS // npx))
        else:
            # all pairs at once over fewer rows: the chunk's monomials are
            # computed once for all the pairs of the chunk
            group = PAIR_BATCH
        groups = []
        for g0 in range(0, P, group):
            g1 = min(P, g0 + group)
            # runs of pairs sharing their first image: one operation each
            runs = []
            j = g0
            while j < g1:
                a = ial[j]
                e = j + 1
                while e < g1 and ial[e] == a:
                    e += 1
                bs = ibl[j:e]
                bsel = slice(bs[0], bs[-1] + 1) if bs[-1] - bs[0] == e - j - 1 else bs
                runs.append((a, bsel, j - g0, e - g0))
                j = e
            groups.append((g0, g1, runs))
        cmax = min(P, group)
        if sep:
            rows = max(1, STACK_ELEMS // (cmax * rowlen))
        else:
            rows = max(1, WORLD_CHUNK_ELEMS // ((3 * cmax + self._monomial_size()) * rowlen))
        mmax = min(rows, eshape[0]) * rowlen
        xbuf = np.empty(2 * cmax * mmax)
        dbuf = np.empty(cmax * mmax)

        def pair_stacks(g0, g1, runs, p0, p1):
            """Weights ``W`` and weighted differences ``WD`` (stacked in ``X``) of
            pairs ``g0:g1`` over pixels ``p0:p1``; adds their chi sums."""
            c, m = g1 - g0, p1 - p0
            X = xbuf[:2 * c * m].reshape(2, c, m)
            W, WD = X[0], X[1]
            DF = dbuf[:c * m].reshape(c, m)
            for a, bsel, j0, j1 in runs:
                np.add(V[a, p0:p1], V[bsel, p0:p1], out=W[j0:j1])
                np.subtract(D[a, p0:p1], D[bsel, p0:p1], out=DF[j0:j1])
            # 1 / W by division: the same values as np.reciprocal, whose
            # float64 loop is not vectorised (twice the time of a divide)
            np.divide(1.0, W, out=W)
            if rob is not None:
                self._robust_chunk(W, resid, runs, t2v[g0:g1], cwv[g0:g1], seeds,
                                   g0, p0, p1)
            np.multiply(W, DF, out=WD)
            # a BLAS dot per pair, all in one batched product (one hand-over
            # of the interpreter lock, not one per pair); its rounding of
            # sum(w d**2) also agrees with that of the products below, so
            # that chi - T**2 / S cancels well
            chi[g0:g1] += np.matmul(WD[:, None, :], DF[:, :, None])[:, 0, 0]
            return X

        def row_chunks():
            """The stacks of each group of pairs over chunks of whole rows of
            the box: ``(g0, g1, r0, r1, X)`` with ``X`` of shape
            ``(2, pairs, rows) + eshape[1:]``."""
            for g0, g1, runs in groups:
                c = g1 - g0
                rows = max(1, STACK_ELEMS // (c * rowlen))
                for r0 in range(0, eshape[0], rows):
                    r1 = min(eshape[0], r0 + rows)
                    X = pair_stacks(g0, g1, runs, r0 * rowlen, r1 * rowlen)
                    yield g0, g1, r0, r1, X.reshape((2, c, r1 - r0) + eshape[1:])

        if fit is not None:
            # the weights' moments against the series' polynomials of the
            # block's pixel indices (separable), then the series' coefficients
            MS = np.zeros((P, fit.CS.shape[1]))
            MT = np.zeros((P, fit.CT.shape[1]))
            local = tuple(slice(0, m) for m in eshape[1:])
            bases_S = [np.ascontiguousarray(b) for b in fit.bases_S]
            bases_T = [np.ascontiguousarray(b) for b in fit.bases_T]
            for g0, g1, r0, r1, X in row_chunks():
                sub = (slice(r0, r1),) + local
                MS[g0:g1] += _contract_separable(X[0], bases_S, sub).reshape(g1 - g0, -1)
                MT[g0:g1] += _contract_separable(X[1], bases_T, sub).reshape(g1 - g0, -1)
            S[:, self.mono_order] = np.dot(MS, fit.CS.T)
            T[:, self.dmono_order] = np.dot(MT, fit.CT.T)
        elif self.frame.separable:
            for g0, g1, r0, r1, X in row_chunks():
                c = g1 - g0
                sub = (slice(origin[0] + r0, origin[0] + r1),) + _slices(ebox)[1:]
                mom = _contract_separable(X.reshape((2 * c,) + X.shape[2:]),
                                          self.axis_powers, sub)
                S[g0:g1] += mom[:c].reshape(c, nS)
                T[g0:g1] += mom[c:][(slice(None),) + self.dsl].reshape(c, nT)
        else:
            # chunks of rows outside, groups of pairs inside: the monomials of
            # a chunk are computed once (into a reused buffer) for all pairs
            # S's and T's columns in the order of the monomials' rows until the end
            mbuf = np.empty(self._monomial_size() * mmax)
            for r0 in range(0, eshape[0], rows):
                r1 = min(eshape[0], r0 + rows)
                p0, p1 = r0 * rowlen, r1 * rowlen
                phi, phid = self._world_monomials(
                    [a[p0:p1] for a in u], None if ok is None else ok[p0:p1], out=mbuf)
                for g0, g1, runs in groups:
                    X = pair_stacks(g0, g1, runs, p0, p1)
                    S[g0:g1] += np.dot(X[0], phi.T)
                    T[g0:g1] += np.dot(X[1], phid.T)
            S[:, self.mono_order] = S.copy()
            T[:, self.dmono_order] = T.copy()
        if rob is not None:
            halo = self._halo(ebox, labels, ial, ibl) if rob.grow else None
            rejected, image_rejected = self._reject(
                seeds, S, T, chi, D, V, polys, eshape, origin, labels, ial, ibl, u, keys,
                halo, fit)
            return _BlockSums(keys, S, T, chi, npix, image_npix, nonfinite, bad_coords,
                              rejected, image_rejected)
        return _BlockSums(keys, S, T, chi, npix, image_npix, nonfinite, bad_coords)


def _n_threads():
    env = os.environ.get("JWST_WIIMATCH_THREADS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(
                f"JWST_WIIMATCH_THREADS must be a positive integer; got {env!r}."
            ) from None
    return max(1, min(4, os.cpu_count() or 1))


def accumulate(prob, frame, threads=None, client=None, robust=None):
    """Sum the pair moments of a validated problem over the whole grid.

    Parameters
    ----------
    prob : jwst_wiimatch.core.inputs.Problem
    frame : jwst_wiimatch.core.coords.Frame
    threads : int, None
        Worker threads (blocks are independent); default: the number of CPUs
        (at most 4), or the ``JWST_WIIMATCH_THREADS`` environment variable.
    client : dask.distributed.Client, None
        Compute the blocks as tasks on this cluster (any object with dask's
        ``scatter``, ``map`` and ``gather`` will do): the problem is sent to
        the workers once, each task sums a run of consecutive blocks, and the
        block sums are added here in block order, so the result is the same
        as the local one.
    robust : jwst_wiimatch.core.robust.RobustPass, None
        A robust pass: pixels whose pair residual (given the pass's
        polynomials) is beyond its threshold are left out with their
        surroundings, and the others weighted (see :mod:`.robust`).

    Returns
    -------
    PairMoments
    """
    nthreads = threads if threads is not None else _n_threads()
    pool = ThreadPoolExecutor(max_workers=nthreads) if nthreads > 1 else None
    try:
        return _accumulate(prob, frame, pool, client, robust)
    finally:
        if pool is not None:
            pool.shutdown()


#: Tasks per dask worker thread when blocks run on a cluster.
TASKS_PER_WORKER = 4


def _blocks_on_worker(acc, blocks):
    """The sums of ``blocks`` (in order), computed on a dask worker."""
    with threadpool_limits(limits=1, user_api="blas"):
        return [acc.block(b) for b in blocks]


def _on_cluster(client, acc, blocks):
    """Block sums computed as dask tasks, returned in block order."""
    nthreads = sum(client.nthreads().values()) or 1
    ntasks = max(1, min(len(blocks), TASKS_PER_WORKER * nthreads))
    edges = np.linspace(0, len(blocks), ntasks + 1).round().astype(int)
    runs = [blocks[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]
    shared = client.scatter(acc, broadcast=True, hash=False)
    futures = client.map(_blocks_on_worker, [shared] * len(runs), runs, pure=False)
    for parts in client.gather(futures):
        yield from parts


def _accumulate(prob, frame, pool, client=None, robust=None):
    n = len(prob.images)
    # the masks' boxes are whole-mask reductions: in the pool too
    mapper = map if pool is None else pool.map
    boxes = list(mapper(_box_and_fill, prob.masks, [im.shape for im in prob.images],
                        prob.origins))
    acc = _Accumulator(prob, frame, [b for b, _ in boxes], robust,
                       mask_full=[f for _, f in boxes])
    bboxes = acc.bboxes

    # a block holds data, variance and validity (float64) of each image
    max_pix = min(BLOCK_PIXELS, max(4096, BLOCK_BYTES // (24 * n)))
    if not frame.separable:
        # world frames also hold the block's coordinates (ndim per pixel)
        # and image2world's temporaries; the monomials are made per chunk of
        # the block (see WORLD_CHUNK_ELEMS), not for the whole block
        max_pix = min(max_pix, max(1024, WORLD_BYTES // (8 * (frame.ndim + 16))))
    bshape = block_shape(prob.shape, max_pix)
    per_axis = [axis_cuts(n_ax, b, [e for box in bboxes if box is not None for e in box[k]])
                for k, (n_ax, b) in enumerate(zip(prob.shape, bshape))]
    blocks = [tuple(slice(a, b) for a, b in pcs) for pcs in itertools.product(*per_axis)]
    acc.cache_fits = len(blocks) <= FIT_CACHE_BLOCKS

    acc_sums = _Sums(n, int(np.prod(acc.mshape)), int(np.prod(acc.dshape)))
    # The products here are small: a multi-threaded BLAS only adds overhead
    # (and contention with our own threads, which keep the cores busy).
    # Block results are added in block order whatever the threads: the sums
    # do not depend on the number of threads.
    with threadpool_limits(limits=1, user_api="blas"):
        if robust is not None:  # before the blocks (and before a cluster gets acc)
            acc.band_hits(per_axis, max_pix, mapper)
        if client is not None:
            for part in _on_cluster(client, acc, blocks):
                acc_sums.add(part)
        elif pool is not None and len(blocks) > 1:
            # world frames: the fits of a run of blocks made ahead of them
            # (a run at a time: the fits are held only while their run goes)
            ahead = WORLD_FIT and not frame.separable
            step = FITS_AHEAD if ahead else len(blocks)
            for i in range(0, len(blocks), step):
                run = blocks[i:i + step]
                if ahead:
                    acc.prepare_fits(run)
                for part in pool.map(acc.block, run):
                    acc_sums.add(part)
            acc.prepare_fits([])
        else:
            for b in blocks:
                acc_sums.add(acc.block(b))
    return acc_sums.moments(acc.mshape, acc.dshape)
