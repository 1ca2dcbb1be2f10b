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
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["PairMoments", "accumulate"]

# Pixels per block: bounds the temporaries (a few float64 arrays per image of
# a block) while keeping per-block Python overhead negligible.
BLOCK_PIXELS = 1 << 16
# Bound on the bytes of per-image block arrays held at once (all images).
BLOCK_BYTES = 48 << 20


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


def _valid_bbox(mask, shape, origin):
    """Grid box (tuple of (start, stop)) of the nonzero pixels of ``mask``, or None.

    ``mask`` (or None: all valid) has the image's ``shape``; the image's first
    pixel sits at grid index ``origin``.
    """
    if any(n == 0 for n in shape):
        return None
    if mask is None:
        return tuple((o, o + n) for o, n in zip(origin, shape))
    nz = mask != 0
    box = []
    for k in range(nz.ndim):
        others = tuple(i for i in range(nz.ndim) if i != k)
        hit = np.flatnonzero(nz.any(axis=others)) if others else np.flatnonzero(nz)
        if hit.size == 0:
            return None
        box.append((int(hit[0]) + origin[k], int(hit[-1]) + 1 + origin[k]))
    return tuple(box)


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


# Smallest usable sigma: its square is still a normal float64.
SIGMA_MIN = float(np.sqrt(np.finfo(np.float64).tiny))


def _prepare_image(prob, l, box):
    """Float64 data (0 where invalid), variance (inf where invalid) and validity of a box.

    Also returns the number of pixels that the mask marks valid, whose sigma
    is not <= 0, but whose data or sigma is NaN or infinite. The caller's
    arrays are only read (checks run on the input dtype, float32 stays cheap).
    """
    sl = _slices(box, prob.origins[l])
    src = np.asarray(prob.images[l][sl])
    m = prob.masks[l]
    valid = np.ones(src.shape, dtype=bool) if m is None else np.asarray(m[sl]).astype(bool)
    s = prob.sigmas[l]
    sb = None
    if isinstance(s, float):
        if not (s > SIGMA_MIN and np.isfinite(s)):
            return (np.zeros(src.shape), np.full(src.shape, np.inf),
                    np.zeros(src.shape, dtype=bool), 0)
    else:
        sb = np.asarray(s[sl])
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
    if sb is not None:
        valid &= sb > SIGMA_MIN
    if valid.all():  # common inside a footprint: plain conversions
        d = src.astype(np.float64)
        var = np.full(src.shape, s * s) if sb is None else np.square(sb, dtype=np.float64)
        return d, var, valid, nonfinite
    d = np.zeros(src.shape)
    np.copyto(d, src, where=valid)
    var = np.full(src.shape, np.inf)
    if sb is None:
        np.copyto(var, s * s, where=valid)
    else:
        np.square(sb, out=var, where=valid, dtype=np.float64)
    return d, var, valid, nonfinite


def _weights(img_l, img_m, out):
    """Fill ``out[0]`` with ``w = 1 / (var_l + var_m)`` and ``out[1]`` with ``w (d_l - d_m)``.

    ``img_l`` and ``img_m`` are ``(data, variance)`` boxes (variance is inf
    where a pixel is not valid, so ``w`` is 0 there). Returns ``sum w (d_l - d_m)**2``.
    """
    (dl, vl), (dm, vm) = img_l, img_m
    w, wd = out[0], out[1]
    np.add(vl, vm, out=w)
    np.reciprocal(w, out=w)
    diff = dl - dm
    np.multiply(w, diff, out=wd)
    return float(np.vdot(wd, diff))


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
    """
    nd = arr.ndim - 1
    for k in range(nd - 1, -1, -1):
        arr = np.tensordot(arr, axis_powers[nd - 1 - k][sub[k]], axes=([k + 1], [0]))
    return arr


# Pairs whose weights are stacked into one matrix product (world coordinates).
PAIR_BATCH = 32


class _Pair(NamedTuple):
    """A pair of images overlapping in a block: what its sums need."""

    key: tuple  # (l, m), l < m
    box: tuple  # intersection of the two images' boxes, grid coordinates
    img_l: tuple  # (data, variance) of image l over the box
    img_m: tuple
    npix: int  # pixels valid in both


class _Accumulator:
    def __init__(self, prob, frame, bboxes):
        self.prob = prob
        self.frame = frame
        self.bboxes = bboxes
        self.n = len(prob.images)
        self.deg = prob.degree
        self.mdeg = tuple(2 * d for d in self.deg)
        self.dsl = tuple(slice(0, d + 1) for d in self.deg)
        if frame.separable:
            self.axis_powers = [np.ascontiguousarray(_powers(frame.axis_u(j), self.mdeg[j]).T)
                                for j in range(frame.ndim)]

    def _world_monomials(self, bslices):
        """Monomials of the block's scaled world coordinates.

        Returns ``phi`` (``R x npix``: ``u**r`` for every ``r <= 2 D``, C order
        over ``(r_x, r_y, ...)``) and the mask of pixels whose coordinates are
        finite (block shape).
        """
        u = self.frame.block_u(bslices)
        ok = np.ones(u[0].shape, dtype=bool)
        for a in u:
            ok &= np.isfinite(a)
        npix = ok.size
        phi = np.ones((1, npix))
        for j, a in enumerate(u):
            p = _powers(np.where(ok, a, 0.0).ravel(), self.mdeg[j])
            phi = (phi[:, None, :] * p[None, :, :]).reshape(-1, npix)
        return phi, ok

    def block(self, bslices):
        n = self.n
        res = PairMoments(n, image_npix=np.zeros(n, dtype=np.int64),
                          nonfinite=np.zeros(n, dtype=np.int64))
        block_box = tuple((s.start, s.stop) for s in bslices)
        origin = tuple(s.start for s in bslices)
        boxes = []
        for l in range(n):
            if self.bboxes[l] is None:
                continue
            box = _intersect(self.bboxes[l], block_box)
            if box is not None:
                boxes.append((l, box))
        if not boxes:
            return res

        phi = ok = None
        if not self.frame.separable and len(boxes) > 1:
            phi, ok = self._world_monomials(bslices)

        active = []
        count = np.zeros([hi - lo for lo, hi in block_box], dtype=np.int32)
        for l, box in boxes:
            d, var, valid, nonfinite = _prepare_image(self.prob, l, box)
            res.nonfinite[l] += nonfinite
            if ok is not None:
                bad = valid & ~ok[_slices(box, origin)]
                if bad.any():
                    res.bad_coords += int(np.count_nonzero(bad))
                    valid &= ~bad
                    var[bad] = np.inf
                    d[bad] = 0.0
            if not valid.any():
                continue
            count[_slices(box, origin)] += valid
            active.append((l, box, d, var, valid))

        for l, box, _, _, valid in active:
            res.image_npix[l] += np.count_nonzero(valid & (count[_slices(box, origin)] > 1))

        pairs = []
        for (l, bl, dl, vl, ql), (m, bm, dm, vm, qm) in itertools.combinations(active, 2):
            pbox = _intersect(bl, bm)
            if pbox is None:
                continue
            sl_l = _slices(pbox, [lo for lo, _ in bl])
            sl_m = _slices(pbox, [lo for lo, _ in bm])
            npix = int(np.count_nonzero(ql[sl_l] & qm[sl_m]))
            if npix:
                pairs.append(_Pair((l, m), pbox, (dl[sl_l], vl[sl_l]), (dm[sl_m], vm[sl_m]), npix))
        if not pairs:
            return res

        if self.frame.separable:
            for p in pairs:
                buf = np.empty((2,) + p.img_l[0].shape)
                chi = _weights(p.img_l, p.img_m, buf)
                mom = _contract_separable(buf, self.axis_powers, _slices(p.box))
                res.add_pair(p.key, mom[0], mom[1][(Ellipsis,) + self.dsl], chi, p.npix)
        else:
            bshape = ok.shape
            rowlen = int(np.prod(bshape[1:]))
            mshape = tuple(2 * d + 1 for d in self.deg)
            # flat indices, among the moments r <= 2D, of the data terms p <= D
            dcols = np.ravel_multi_index(
                tuple(np.array(list(np.ndindex(*[d + 1 for d in self.deg]))).T), mshape)
            for start in range(0, len(pairs), PAIR_BATCH):
                chunk = pairs[start:start + PAIR_BATCH]
                nc = len(chunk)
                # rows (first numpy axis) of the block that this chunk touches
                r0 = min(p.box[0][0] for p in chunk) - origin[0]
                r1 = max(p.box[0][1] for p in chunk) - origin[0]
                wb = np.zeros((2, nc, r1 - r0) + bshape[1:])
                chis = []
                for i, p in enumerate(chunk):
                    sub = (slice(None), i) + _slices(p.box, (origin[0] + r0,) + origin[1:])
                    chis.append(_weights(p.img_l, p.img_m, wb[sub]))
                # one product for the weights and the weighted differences of
                # every pair of the chunk: the monomials are read once
                mom = wb.reshape(2 * nc, -1) @ phi[:, r0 * rowlen:r1 * rowlen].T
                dshape = tuple(d + 1 for d in self.deg)
                for i, p in enumerate(chunk):
                    res.add_pair(p.key, mom[i].reshape(mshape),
                                 mom[nc + i][dcols].reshape(dshape), chis[i], p.npix)
        return res


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


def accumulate(prob, frame, threads=None):
    """Sum the pair moments of a validated problem over the whole grid.

    Parameters
    ----------
    prob : jwst_wiimatch.core.inputs.Problem
    frame : jwst_wiimatch.core.coords.Frame
    threads : int, None
        Worker threads (blocks are independent); default: the number of CPUs
        (at most 4), or the ``JWST_WIIMATCH_THREADS`` environment variable.

    Returns
    -------
    PairMoments
    """
    n = len(prob.images)
    bboxes = [_valid_bbox(m, im.shape, o)
              for m, im, o in zip(prob.masks, prob.images, prob.origins)]
    acc = _Accumulator(prob, frame, bboxes)

    nmom = int(np.prod([2 * d + 1 for d in prob.degree]))
    max_pix = min(BLOCK_PIXELS, max(4096, BLOCK_BYTES // (24 * n)))
    if not frame.separable:
        # world frames also hold the block's monomials (nmom per pixel), the
        # stacked pair weights (2 * PAIR_BATCH) and image2world's temporaries
        max_pix = min(max_pix, max(1024, (1 << 21) // (nmom + 2 * PAIR_BATCH + 16)))
    bshape = block_shape(prob.shape, max_pix)
    starts = [range(0, n_ax, b) for n_ax, b in zip(prob.shape, bshape)]
    blocks = [tuple(slice(s, min(s + b, n_ax)) for s, b, n_ax in zip(st, bshape, prob.shape))
              for st in itertools.product(*starts)]

    total = PairMoments(n, image_npix=np.zeros(n, dtype=np.int64),
                        nonfinite=np.zeros(n, dtype=np.int64))
    nthreads = threads if threads is not None else _n_threads()
    # The products here are small: a multi-threaded BLAS only adds overhead
    # (and contention with our own threads, which keep the cores busy).
    with threadpool_limits(limits=1, user_api="blas"):
        if nthreads > 1 and len(blocks) > 1:
            with ThreadPoolExecutor(max_workers=nthreads) as pool:
                for part in pool.map(acc.block, blocks):
                    total.add(part)
        else:
            for b in blocks:
                total.add(acc.block(b))
    return total
