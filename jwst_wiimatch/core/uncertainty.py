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
reduced system's inverse, then the level convention), so
``Cov(coef) = L Cov(b) L^T``.
"""
import itertools

import numpy as np

from .accumulate import BLOCK_PIXELS, _intersect, _prepare_image, block_shape, valid_box
from .coords import call_image2world
from .poly import coef_from_scaled, exponents

__all__ = ["noise_covariance_b", "solution_map", "coefficient_covariance"]


def _boxes(prob):
    return [valid_box(None if m is None else np.asarray(m), np.shape(img), o)
            for img, m, o in zip(prob.images, prob.masks, prob.origins)]


#: Most pixels (lattice points) summed for ``Cov(b)``: larger grids are
#: sampled on a regular lattice, each point standing for ``stride**ndim``
#: pixels (the sums are smooth functions of the footprints and sigmas).
COV_POINTS = 1 << 14


def cov_stride(shape, points=COV_POINTS):
    """Lattice step (the same along every axis) for a grid of ``shape``."""
    npix = float(np.prod(shape))
    return max(1, int(np.ceil((npix / points) ** (1.0 / len(shape)) - 1e-9)))


def _lattice_u(frame, idx):
    """Scaled coordinates ``u`` (one flat array per coordinate) of grid pixels ``idx``."""
    if frame.separable:
        return [frame.axis_u(j)[idx[frame.ndim - 1 - j]] for j in range(frame.ndim)]
    pix = [np.asarray(i, dtype=float) for i in idx][::-1]
    world = call_image2world(frame.image2world, pix, frame.ndim)
    return [(np.asarray(w, dtype=float) - c - s0) / s1
            for w, c, s0, s1 in zip(world, frame.eff_center, frame.shift, frame.scale)]


def noise_covariance_b(prob, frame, stride=None):
    """``Cov(b)`` (shape ``(N M, N M)``, scaled basis ``u``) from the pixels' sigmas.

    Uses the weights of the plain (not robust) fit, in the problem's scaled
    sigma units. Also returns that fit's normal matrix ``A`` (same shape),
    summed in the same pass. ``stride`` (default: :func:`cov_stride`): sum
    over every ``stride``-th pixel along each axis (about the middle of each
    step), times ``stride**ndim``; 1 is exact.
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

    def to_lattice(box):  # grid box -> lattice box
        return tuple((-(-(lo - off) // st), -(-(hi - off) // st)) for lo, hi in box)

    lboxes = [None if bx is None else to_lattice(bx) for bx in boxes]
    bs = block_shape(lshape, BLOCK_PIXELS)
    for start in itertools.product(*[range(0, s, b) for s, b in zip(lshape, bs)]):
        block = tuple((a, min(a + b, s)) for a, b, s in zip(start, bs, lshape))
        live = [(l, _intersect(block, bx)) for l, bx in enumerate(lboxes) if bx is not None]
        live = [(l, bx) for l, bx in live if bx is not None]
        if len(live) < 2:
            continue
        bshape = tuple(b - a for a, b in block)
        var = np.full((len(live),) + bshape, np.inf)
        for j, (l, bx) in enumerate(live):
            gbox = tuple((off + st * a, off + st * (b - 1) + 1) for a, b in bx)
            v = _prepare_image(prob, l, gbox, step=st if st > 1 else None)[1]
            var[(j,) + tuple(slice(a - b0, c - b0) for (a, c), (b0, _) in zip(bx, block))] = v
        var = var.reshape(len(live), -1)
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
        x = np.ones((nt, u[0].size))
        for k, p in enumerate(exps):
            for c, e in zip(u, p):
                if e:
                    x[k] *= c ** int(e)
        with np.errstate(divide="ignore"):
            w = 1.0 / (var[:, None, :] + var[None, :, :])  # 0 where either is invalid
        q = len(live)
        w[np.arange(q), np.arange(q)] = 0.0
        g = -w
        g[np.arange(q), np.arange(q)] = w.sum(axis=1)  # g[k, l]: image k's weight in block l
        s2 = np.where(np.isfinite(var), var, 0.0)
        v = np.einsum("kp,klp,kmp->lmp", s2, g, g, optimize=True)
        xx = (x[:, None, :] * x[None, :, :]).reshape(nt * nt, -1)
        ids = np.array([l for l, _ in live])
        out[np.ix_(ids, ids)] += (v.reshape(q * q, -1) @ xx.T).reshape(q, q, nt, nt)
        amat[np.ix_(ids, ids)] += (g.reshape(q * q, -1) @ xx.T).reshape(q, q, nt, nt)
    f = float(st) ** len(shape)
    return (f * out.transpose(0, 2, 1, 3).reshape(n * nt, n * nt),
            f * amat.transpose(0, 2, 1, 3).reshape(n * nt, n * nt))


def solution_map(a, n, components, fixed=None, held_first=True, tol=None, terms=None):
    """Linear map ``L`` with ``coef_u.ravel() = L b`` as :func:`.solve.solve_system` solves.

    Per group of two or more images: without held images, the first image's
    unknowns are dropped, the reduced system inverted (pseudo-inverse) and the
    coefficients shifted to a zero sum over the group; with held images,
    their unknowns are dropped (they stay 0). Isolated images get 0.
    ``terms`` (boolean mask of the terms present, None: all): the unknowns
    of absent terms are dropped too (their coefficients are 0).
    """
    nt = a.shape[0] // n
    act = np.arange(nt) if terms is None else np.flatnonzero(np.asarray(terms, bool))
    na = act.size
    fixed = set() if fixed is None else set(fixed)
    big = np.zeros_like(a)
    for comp in components:
        if len(comp) < 2:
            continue
        held = [i for i in comp if i in fixed]
        reduced = [i for i in comp if i not in held] if held else comp[1:]
        if not reduced:
            continue
        rows = np.concatenate([i * nt + act for i in reduced])
        inv = np.linalg.pinv(a[np.ix_(rows, rows)], hermitian=True)
        crow = np.concatenate([np.arange(i * nt, (i + 1) * nt) for i in comp])
        sub = np.zeros((len(comp) * nt, a.shape[0]))
        pos = {i: k for k, i in enumerate(comp)}
        for r, i in enumerate(reduced):
            sub[np.ix_(pos[i] * nt + act, rows)] = inv[r * na:(r + 1) * na]
        if not held:  # zero sum: subtract the group mean of every term
            s3 = sub.reshape(len(comp), nt, -1)
            s3 -= s3.mean(axis=0)
        big[crow] = sub
    return big


def coefficient_covariance(cov_b, a, n, components, degree, frame, fixed=None,
                           level_groups=None, sigma_scale=1.0, terms=None):
    """``Cov(coef)`` in the documented basis, shape ``(N M, N M)``.

    ``level_groups``: groups whose constants were shifted to given levels (mean
    of the differences over the images with a known level ``known``): pairs
    ``(comp, known)``.
    """
    nt = a.shape[0] // n
    lmap = solution_map(a, n, components, fixed=fixed, terms=terms)
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
