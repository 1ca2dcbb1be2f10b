"""Covariance of the fitted coefficients (sandwich estimator).

The normal equations ``A c = b`` have ``b_l = sum_m sum_p w_lm x(p) (I_l - I_m)``
(``x``: the monomials of a pixel, ``w_lm = 1 / (sigma_l**2 + sigma_m**2)``).
Each pixel of image ``l`` enters every pair ``(l, m)`` that overlaps there,
so the pair differences that share an image are correlated and ``b`` is not
distributed with covariance ``A``. With independent pixel noise,

    Cov(b) = sum_p sum_k sigma_k(p)**2 g_k(p) g_k(p)^T,

where ``g_k(p)`` is image ``k``'s contribution to ``b`` at ``p``: block ``k``
holds ``x(p) sum_m w_km(p)``, block ``m != k`` holds ``-x(p) w_km(p)``. So
``Cov(b)[(l, i), (m, j)] = sum_p V_lm(p) x_i(p) x_j(p)`` with the ``N x N``
per-pixel matrix ``V(p) = sum_k sigma_k**2 G_k G_k^T`` (``G_k`` the weights
above): one more pass over the pixels, a block of the grid at a time.

The solution is linear in ``b``: ``coef = L b`` (per connected group: the
least-squares solution with the group's normalisation and the terms the
overlaps do not determine set to 0, then the level convention), so
``Cov(coef) = L Cov(b) L^T``.

With robust matching the weights are those of the last reweighted pass
(rejections with their grown neighbourhoods, Huber / Tukey weights), in
``A`` (the pass's sums) and in ``Cov(b)``, whose pass reproduces them point
by point (:func:`_robust_weights`); they are taken as fixed.
"""
import itertools

import numpy as np
from scipy import linalg

from .accumulate import BLOCK_PIXELS, _intersect, _prepare_image, block_shape, valid_box
from .coords import call_image2world
from .poly import coef_from_scaled, exponents, monomials

__all__ = ["noise_covariance_b", "solution_map", "coefficient_covariance", "zeroed_terms"]


def _boxes(prob):
    return [valid_box(None if m is None else np.asarray(m), np.shape(img), o)
            for img, m, o in zip(prob.images, prob.masks, prob.origins)]


#: Most pixels (lattice points) summed for ``Cov(b)``: larger grids are
#: sampled on a regular lattice, each point standing for ``stride**ndim``
#: pixels (the sums are smooth functions of the footprints and sigmas).
COV_POINTS = 1 << 14


#: Most (images x images x lattice points) values of a block of the
#: ``Cov(b)`` pass (each of its few such arrays: 16 MB), whatever the
#: number of images: a mosaic of 64 exposures would otherwise hold
#: 64 x 64 x 16384 values (0.5 GB) per array.
COV_BLOCK_ELEMS = 1 << 21


def cov_stride(shape, points=COV_POINTS):
    """Lattice step (the same along every axis) for a grid of ``shape``."""
    npix = float(np.prod(shape))
    return max(1, int(np.ceil((npix / points) ** (1.0 / len(shape)) - 1e-9)))


def _lattice_box(box, st, off):
    """Lattice index ranges of the points (grid pixels ``off + st * k``) in grid ``box``."""
    return tuple((-(-(lo - off) // st), -(-(hi - off) // st)) for lo, hi in box)


def _lattice_u(frame, idx):
    """Scaled coordinates ``u`` (one flat array per coordinate) of grid pixels ``idx``.

    Indices outside the grid (neighbours of lattice points at its edge) are
    clipped for image frames: no image is valid there.
    """
    if frame.separable:
        return [frame.axis_u(j)[np.clip(idx[frame.ndim - 1 - j], 0,
                                        frame.shape[frame.ndim - 1 - j] - 1)]
                for j in range(frame.ndim)]
    pix = [np.asarray(i, dtype=float) for i in idx][::-1]
    world = call_image2world(frame.image2world, pix, frame.ndim)
    return [(np.asarray(w, dtype=float) - c - s0) / s1
            for w, c, s0, s1 in zip(world, frame.eff_center, frame.shift, frame.scale)]


def _read_shifted(prob, l, gbox, block, st, off, shift):
    """Data and variance of image ``l`` at the lattice points of ``block`` moved by ``shift``.

    ``block``: lattice index ranges; lattice point ``a`` is grid pixel
    ``off + st * a`` (each axis), moved by ``shift`` (grid pixels, numpy
    order). Points outside the image's valid box ``gbox`` are not valid:
    data 0, variance inf. Returns two arrays of the block's shape.
    """
    bshape = tuple(b - a for a, b in block)
    d = np.zeros(bshape)
    var = np.full(bshape, np.inf)
    sub, src = [], []
    for (a0, a1), (lo, hi), o in zip(block, gbox, shift):
        first = max(a0, -(-(lo - off - o) // st))
        last = min(a1, (hi - 1 - off - o) // st + 1)
        if first >= last:
            return d, var
        sub.append(slice(first - a0, last - a0))
        src.append((off + st * first + o, off + st * (last - 1) + o + 1))
    dd, vv, valid, _ = _prepare_image(prob, l, tuple(src), step=st if st > 1 else None)
    d[tuple(sub)] = np.where(valid, dd, 0.0)
    var[tuple(sub)] = np.where(valid, vv, np.inf)
    return d, var


def _robust_weights(w, prob, frame, rpass, ids, boxes, block, st, off, cover, d0, var0):
    """Multiply the pair weights ``w`` (``(q, q, npts)``) by the final pass's factors.

    Reproduces what the accumulation does in the pass ``rpass`` (a
    :class:`.robust.RobustPass`) at the lattice points of ``block`` where
    ``cover``, for each pair of the live images ``ids``: a factor 0 where the
    pair's normalised residual, given the pass's polynomials, exceeds its
    threshold at the point or at a pixel within ``grow`` of it (the rejected
    pixels and their neighbourhoods), else 1 (``'clip'``) or the Huber /
    Tukey weight of the residual at the point. ``d0``, ``var0``: data and
    variance of the live images at the points (``(q, npts)``).
    """
    q = len(ids)
    keys = [(min(a, b), max(a, b)) for a in ids for b in ids]
    t2 = np.array([rpass.t2.get(k, np.inf) for k in keys]).reshape(q, q)
    cw = np.array([rpass.cw.get(k, np.inf) for k in keys]).reshape(q, q)
    coef = np.asarray(rpass.coef_u)[ids]
    grids = np.meshgrid(*[off + st * np.arange(a, b) for a, b in block], indexing="ij")
    pts = [g.ravel()[cover] for g in grids]

    def residuals(shift, d, var):
        u = _lattice_u(frame, [p + o for p, o in zip(pts, shift)])
        if not frame.separable:
            ok = np.logical_and.reduce([np.isfinite(c) for c in u])
            var = np.where(ok, var, np.inf)
            u = [np.where(ok, c, 0.0) for c in u]
        return d - coef @ monomials(u, prob.degree), var

    def normalised(e, var, a):  # squared normalised residuals of pairs (a, b > a)
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = (e[a] - e[a + 1:]) ** 2 / (var[a] + var[a + 1:])
        return np.where(np.isfinite(r2), r2, 0.0)  # 0 where not valid

    e0, v0 = residuals((0,) * len(block), d0, var0)
    if rpass.method != "clip":
        for a in range(q - 1):
            with np.errstate(divide="ignore", invalid="ignore"):
                x = np.sqrt(normalised(e0, v0, a)) / cw[a, a + 1:, None]
            wt = rpass.weight(np.where(np.isfinite(x), x, 0.0))
            w[a, a + 1:] *= wt
            w[a + 1:, a] *= wt
    if not np.isfinite(t2).any():
        return
    g = int(rpass.grow)
    for shift in itertools.product(range(-g, g + 1), repeat=len(block)):
        if any(shift):
            dv = [_read_shifted(prob, l, boxes[l], block, st, off, shift) for l in ids]
            d = np.stack([x.ravel()[cover] for x, _ in dv])
            var = np.stack([v.ravel()[cover] for _, v in dv])
            e, var = residuals(shift, d, var)
        else:
            e, var = e0, v0
        for a in range(q - 1):
            hit = normalised(e, var, a) > t2[a, a + 1:, None]
            w[a, a + 1:][hit] = 0.0
            w[a + 1:, a][hit] = 0.0


def noise_covariance_b(prob, frame, stride=None, robust=None):
    """``Cov(b)`` (shape ``(N M, N M)``, scaled basis ``u``) from the pixels' sigmas.

    Uses the pair weights of the fit, in the problem's scaled sigma units:
    the plain fit's, or with ``robust`` (the last
    :class:`~.robust.RobustPass` of robust matching) those of that pass,
    reproduced point by point (see :func:`_robust_weights`). Also returns the
    normal matrix ``A`` of the same weights (same shape), summed in the same
    pass. ``stride`` (default: :func:`cov_stride`): sum over every
    ``stride``-th pixel along each axis (about the middle of each step),
    times ``stride**ndim``; 1 is exact.
    """
    exps = exponents(prob.degree)
    n, nt = len(prob.images), len(exps)
    out = np.zeros((n, n, nt, nt))
    amat = np.zeros((n, n, nt, nt))
    boxes = _boxes(prob)
    shape = frame.shape
    st = cov_stride(shape) if stride is None else int(stride)
    off = st // 2
    lshape = tuple(max(0, -(-(s - off) // st)) for s in shape)

    lboxes = [None if bx is None else _lattice_box(bx, st, off) for bx in boxes]
    # a block holds (images x images x points) weights: as many points as
    # keep them within COV_BLOCK_ELEMS for the images of the problem
    bs = block_shape(lshape, max(64, min(BLOCK_PIXELS, COV_BLOCK_ELEMS // max(1, n * n))))
    for start in itertools.product(*[range(0, s, b) for s, b in zip(lshape, bs)]):
        block = tuple((a, min(a + b, s)) for a, b, s in zip(start, bs, lshape))
        live = [(l, _intersect(block, bx)) for l, bx in enumerate(lboxes) if bx is not None]
        live = [(l, bx) for l, bx in live if bx is not None]
        if len(live) < 2:
            continue
        ids = [l for l, _ in live]
        dv = [_read_shifted(prob, l, boxes[l], block, st, off, (0,) * len(block))
              for l in ids]
        var = np.stack([v.ravel() for _, v in dv])
        cover = np.isfinite(var).sum(axis=0) >= 2
        if not cover.any():
            continue
        var = var[:, cover]
        grids = np.meshgrid(*[off + st * np.arange(a, b) for a, b in block], indexing="ij")
        u = _lattice_u(frame, [g.ravel()[cover] for g in grids])
        if not frame.separable:
            ok = np.logical_and.reduce([np.isfinite(c) for c in u])
            var[:, ~ok] = np.inf
            u = [np.where(ok, c, 0.0) for c in u]
        x = monomials(u, prob.degree)
        with np.errstate(divide="ignore"):
            w = 1.0 / (var[:, None, :] + var[None, :, :])  # 0 where either is invalid
        if robust is not None:
            d0 = np.stack([d.ravel()[cover] for d, _ in dv])
            _robust_weights(w, prob, frame, robust, ids, boxes, block, st, off, cover,
                            d0, var)
        q = len(live)
        w[np.arange(q), np.arange(q)] = 0.0
        g = -w
        g[np.arange(q), np.arange(q)] = w.sum(axis=1)  # g[k, l]: image k's weight in block l
        s2 = np.where(np.isfinite(var), var, 0.0)
        v = np.einsum("kp,klp,kmp->lmp", s2, g, g, optimize=True)
        xx = (x[:, None, :] * x[None, :, :]).reshape(nt * nt, -1)
        idx = np.array(ids)
        out[np.ix_(idx, idx)] += (v.reshape(q * q, -1) @ xx.T).reshape(q, q, nt, nt)
        amat[np.ix_(idx, idx)] += (g.reshape(q * q, -1) @ xx.T).reshape(q, q, nt, nt)
    f = float(st) ** len(shape)
    return (f * out.transpose(0, 2, 1, 3).reshape(n * nt, n * nt),
            f * amat.transpose(0, 2, 1, 3).reshape(n * nt, n * nt))


def solution_map(a, n, components, fixed=None, terms=None, zeroed=None):
    """Linear map ``L`` with ``coef_u.ravel() = L b`` as :func:`.solve.solve_system` solves.

    Per group of two or more images, the estimator is the least-squares
    solution that satisfies the group's normalisation: without held images,
    every term sums to 0 over the group; with held images (``fixed``), their
    unknowns are 0. ``terms`` (boolean mask of the terms present, None: all):
    the unknowns of absent terms are 0 too. ``zeroed`` (pairs ``(image,
    flat term)``, see :func:`zeroed_terms`): the unknowns the overlaps do not
    determine, which the solver set to 0 (of the least-squares solutions,
    the one with these 0); their rows of ``L`` are 0. Isolated images get 0.

    With ``Z`` an orthonormal basis of the unknowns that satisfy the
    constraints, ``L = Z (Z^T A Z)^+ Z^T``: the constraints only choose among
    the least-squares solutions (they move along the null space of ``A``),
    so this is the solver's solution for every ``b`` in the range of ``A``
    (where ``b`` and its noise lie).
    """
    nt = a.shape[0] // n
    act = np.arange(nt) if terms is None else np.flatnonzero(np.asarray(terms, bool))
    fixed = set() if fixed is None else set(fixed)
    zero = set() if zeroed is None else {(int(i), int(t)) for i, t in zeroed}
    big = np.zeros_like(a)
    for comp in components:
        if len(comp) < 2:
            continue
        held = [i for i in comp if i in fixed]
        free = [i for i in comp if i not in held]
        keep = [(i, t) for i in free for t in act if (i, t) not in zero]
        if not keep or len(free) < (1 if held else 2):
            continue
        rows = np.array([i * nt + t for i, t in keep])
        if held:
            z = np.eye(len(keep))
        else:  # zero sum of every term over the group's (kept) unknowns
            c = np.zeros((act.size, len(keep)))
            pos = {t: k for k, t in enumerate(act)}
            for j, (_, t) in enumerate(keep):
                c[pos[t], j] = 1.0
            z = linalg.null_space(c)
        if z.shape[1] == 0:
            continue
        red = z.T @ a[np.ix_(rows, rows)] @ z
        inv = np.linalg.pinv(0.5 * (red + red.T), hermitian=True)
        big[np.ix_(rows, rows)] = z @ inv @ z.T
    return big


def zeroed_terms(undetermined, degree):
    """``(image, flat term)`` of :attr:`.solve.SolveInfo.undetermined` entries.

    The entries name terms by exponent tuple (or, without a degree, by flat
    index); flat indices follow :func:`.poly.exponents` (C order).
    """
    flat = {tuple(int(v) for v in p): k for k, p in enumerate(exponents(degree))}
    return [(int(i), p if isinstance(p, (int, np.integer)) else flat[tuple(int(v) for v in p)])
            for i, p in undetermined]


def coefficient_covariance(cov_b, a, n, components, degree, frame, fixed=None,
                           level_groups=None, sigma_scale=1.0, terms=None, zeroed=None):
    """``Cov(coef)`` in the documented basis, shape ``(N M, N M)``.

    ``level_groups``: groups whose constants were shifted to given levels (mean
    of the differences over the images with a known level ``known``): pairs
    ``(comp, known)``. ``zeroed``: ``(image, flat term)`` of the unknowns the
    solver set to 0 because the overlaps do not determine them (see
    :func:`solution_map`); their rows and columns are 0.
    """
    nt = a.shape[0] // n
    lmap = solution_map(a, n, components, fixed=fixed, terms=terms, zeroed=zeroed)
    cov = lmap @ cov_b @ lmap.T
    t = coef_from_scaled(np.eye(nt), degree, frame.shift, frame.scale)  # coef_X = coef_u @ t
    big_t = np.kron(np.eye(n), t)
    cov = big_t.T @ cov @ big_t
    if level_groups:
        shift = np.eye(n * nt)
        for comp, known in level_groups:
            for i in comp:
                for j in known:
                    shift[i * nt, j * nt] -= 1.0 / len(known)
        cov = shift @ cov @ shift.T
    cov *= sigma_scale ** 2
    return 0.5 * (cov + cov.T)
