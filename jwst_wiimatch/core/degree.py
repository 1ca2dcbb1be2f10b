"""Automatic choice of the polynomial degree by cross-validation over the overlaps.

The fitted residual RMS cannot choose the degree: it can only fall as terms
are added, while the true error of the backgrounds grows once the extra terms
fit noise. Instead, the overlap pixels are split into ``nfolds`` *spatially
blocked* folds (square blocks of the grid, each block in one fold, so that
correlated neighbours do not leak from the training to the held-out pixels);
each candidate degree is fitted on all folds but one and scored on the
held-out fold's pair differences, for every fold in turn.

The moments are sums, so one accumulation per fold (at the largest candidate
degree) gives everything: the training sums are the totals minus the fold's,
moments of a lower degree are the leading parts of those of the highest, and
the held-out weighted sum of squares of a fit ``c`` is
``chi - 2 dc . T + dc^T S dc`` from the held-out fold's own moments.

Held-out blocks lie inside the overlaps, so the scores measure how well a
candidate interpolates; the parts of each footprint that no other image
covers are extrapolated, where extra terms swing freely. With the frame of
the problem at hand, each candidate is therefore judged by an estimate of
its true error over the footprints: twice the excess of its held-out score
over the best (its bias, squared; see ``BIAS_WEIGHT``) plus the variance of its fitted polynomials
averaged over each image's own valid pixels (from the covariance of the
coefficients, :mod:`.uncertainty`).
"""
import dataclasses
import logging
import warnings

import numpy as np
from threadpoolctl import threadpool_limits

from .inputs import check_inputs
from .poly import exponents, monomials, term_mask
from .solve import _components, assemble, gram_index

__all__ = ["DEGREE_CANDIDATES", "candidate_polynomials", "choose_degree", "is_auto"]

log = logging.getLogger(__name__)

#: candidate degrees (the same on every axis); 3 only with enough pixels
DEGREE_CANDIDATES = (0, 1, 2, 3)
#: kinds of polynomials tried at each degree when none is asked for: the
#: total-degree set (a plane at degree 1) and the tensor set
TERM_KINDS = ("total", "tensor")
#: overlap pixels needed per unknown (images x terms) for a candidate to be tried
MIN_PIXELS_PER_UNKNOWN = 20
NFOLDS = 5
#: weight of a candidate's held-out score excess (its squared bias where
#: images overlap) against its variance over the footprints: a missing term
#: weighs more over whole footprints, which reach beyond the overlaps, and
#: images that overlap misfit alike there (their differences hide part of
#: it). 1 (no such allowance) gave at worst 1.21 times the best fixed
#: polynomial's error per case on benchmarks/bench_degree.py, 1.5 1.20, 2
#: 1.20 and 1.08 on its two geometries.
BIAS_WEIGHT = 2.0
#: fold blocks: 1/BLOCK_DIV of the grid's shortest side, at most BLOCK_MAX pixels
BLOCK_DIV = 8
BLOCK_MAX = 32


def is_auto(degree):
    """Whether ``degree`` asks for the automatic choice (the string ``'auto'``)."""
    return isinstance(degree, str) and degree.strip().lower() == "auto"


def _fold_labels(shape, block, nfolds, seed=0):
    """Fold of every grid pixel: blocks of ``block`` pixels per side, shuffled."""
    nb = [max(1, -(-n // block)) for n in shape]
    order = np.random.default_rng(seed).permutation(int(np.prod(nb))) % nfolds
    blocks = order.reshape(nb)
    idx = np.ix_(*[np.arange(n) // block for n in shape])
    return blocks[idx]


def candidate_polynomials(ndim, degrees=DEGREE_CANDIDATES, terms=None):
    """The ``(degree, terms, mask)`` candidates, fewest terms first.

    ``terms``: ``'tensor'`` or ``'total'`` to try only that kind; None: both
    (a set that both kinds give, such as degree 0, once, as ``'tensor'``).
    """
    kinds = TERM_KINDS if terms is None else (terms,)
    out, seen = [], set()
    for d in degrees:
        for kind in kinds:
            mask = term_mask((d,) * ndim, kind)
            key = (d, None if mask is None else tuple(mask))
            if key in seen:
                continue
            seen.add(key)
            out.append((d, kind if mask is not None else "tensor", mask))
    nterms = [(d + 1) ** ndim if m is None else int(m.sum()) for d, _, m in out]
    order = sorted(range(len(out)), key=lambda k: (nterms[k], out[k][0]))
    return [out[k] for k in order]


def candidate_name(degree, terms):
    """Label of a candidate, e.g. ``'1'`` (tensor) or ``'1 (total)'``."""
    return f"{degree}" if terms == "tensor" else f"{degree} ({terms})"


def footprint_moments(prob, frame, stride):
    """Per image: the mean of ``x x^T`` over its valid pixels (every ``stride``-th).

    ``x`` are the monomials of ``prob.degree`` (tensor set, flat order) of
    the scaled coordinates of ``frame``. Returns a list of ``(M, M)``
    arrays (None for an image without a valid pixel).
    """
    from .uncertainty import _boxes, _lattice_box, _lattice_u, _read_shifted

    off = stride // 2
    out = []
    for l, box in enumerate(_boxes(prob)):
        lbox = None if box is None else _lattice_box(box, stride, off)
        if lbox is None or any(b <= a for a, b in lbox):
            out.append(None)
            continue
        var = _read_shifted(prob, l, box, lbox, stride, off, (0,) * len(lbox))[1]
        ok = np.isfinite(var)
        if not ok.any():
            out.append(None)
            continue
        grids = np.meshgrid(*[off + stride * np.arange(a, b) for a, b in lbox], indexing="ij")
        u = _lattice_u(frame, [g[ok] for g in grids])
        fin = np.logical_and.reduce([np.isfinite(c) for c in u])
        x = monomials([c[fin] for c in u], prob.degree)
        out.append(x @ x.T / max(x.shape[1], 1))
    return out


def _footprint_variance(prob, frame, cands, dmax):
    """Per candidate: the variance of its fitted backgrounds over the footprints.

    Averaged over the images (each over its own valid pixels), in the
    problem's sigma units. From one lattice pass
    (:func:`.uncertainty.noise_covariance_b`) at the top degree, whose
    normal matrix and noise covariance hold those of every candidate.
    Returns ``(variances, sum_w)``, ``sum_w`` the sum of the pair weights
    over the overlaps in the same units; None when they cannot be computed
    (no overlap, non-finite sums).
    """
    from .uncertainty import cov_stride, noise_covariance_b, solution_map

    nd = len(prob.shape)
    prob = dataclasses.replace(prob, degree=(dmax,) * nd)
    st = cov_stride(frame.shape)
    cov_b, amat = noise_covariance_b(prob, frame, stride=st)
    fps = footprint_moments(prob, frame, st)
    n = len(prob.images)
    mt = (dmax + 1) ** nd
    sw = -sum(amat[l * mt, m * mt] for l in range(n) for m in range(l + 1, n))
    if not (sw > 0) or not np.all(np.isfinite(cov_b)) or not np.all(np.isfinite(amat)):
        return None
    out = []
    for d, _, mask in cands:
        # the candidate's terms in the top degree's flat order
        sel = np.array([np.ravel_multi_index(tuple(p), (dmax + 1,) * nd)
                        for p in exponents((d,) * nd)])
        if mask is not None:
            sel = sel[mask]
        rows = np.concatenate([l * mt + sel for l in range(n)])
        a = amat[np.ix_(rows, rows)]
        k = sel.size
        comps = _components(a, n, k) if n > 1 else [[0]]
        lmap = solution_map(a, n, comps)
        cov = lmap @ cov_b[np.ix_(rows, rows)] @ lmap.T
        var = [float(np.trace(cov[l * k:(l + 1) * k, l * k:(l + 1) * k] @ f[np.ix_(sel, sel)]))
               for l, f in enumerate(fps) if f is not None]
        out.append(float(np.mean(var)) if var else np.nan)
    return np.array(out), sw


class _FoldMask:
    """The mask of one image within fold ``k``, read by parts (see `.inputs.PartsArray`).

    ``labels`` are the grid's fold labels; the image (of ``shape``) starts at
    grid index ``origin``; ``base`` is its own mask or None.
    """

    dtype = np.dtype(bool)

    def __init__(self, labels, k, origin, shape, base):
        self.labels, self.k, self.origin, self.base = labels, k, tuple(origin), base
        self.shape = tuple(shape)

    def __getitem__(self, key):
        grid_key = tuple(slice((s.start or 0) + o, (s.stop if s.stop is not None else n) + o,
                               s.step)
                         for s, o, n in zip(key, self.origin, self.shape))
        lab = self.labels[grid_key] == self.k
        if self.base is not None:
            lab &= np.asarray(self.base[key], dtype=bool)
        return lab


def choose_degree(images, masks, sigmas, nfolds=NFOLDS, block=None,
                  candidates=DEGREE_CANDIDATES, moments_fn=None, solve_fn=None,
                  origins=None, grid_shape=None, terms=None, frame_fn=None):
    """Pick a degree by k-fold cross-validation of the held-out pair residuals.

    ``moments_fn(masks, degree)`` returns the :class:`PairMoments` of the
    problem with the given masks (so that robust matching, absurd-value cuts
    and cutouts work as in the fit itself); ``solve_fn(a, b, n, degree,
    mask)`` solves the normal equations for the terms of ``mask`` (None: all;
    zero-sum convention; the held-out residuals do not depend on the
    convention). Each degree of ``candidates`` is tried with the kinds of
    terms ``terms`` (None: ``'total'`` and ``'tensor'``), fewest terms first.

    Returns
    -------
    degree : tuple of int
        With ``frame_fn`` (a function of the grid's shape giving the
        problem's :class:`.coords.Frame`): the candidate of least estimated
        true error over the footprints, ``risk = BIAS_WEIGHT * (score -
        min(score)) + variance`` (the excess held-out score estimates its
        squared bias where the images overlap;
        ``variance`` is that of its fitted backgrounds averaged over each
        image's valid pixels, see :func:`_footprint_variance`; both in units
        of half the variance of a pair difference). Without it: the
        candidate with the fewest terms whose per-fold score differences
        from the best candidate average within one standard error (of those
        differences) of zero.
    terms : str
        Its kind of terms, ``'tensor'`` or ``'total'``.
    scores : dict
        ``{'candidates', 'terms', 'labels', 'score', 'stderr',
        'paired_stderr', 'variance', 'risk', 'fold_scores', 'nfolds',
        'block', 'best', 'best_terms', 'chosen', 'chosen_terms'}``
        (``variance`` and ``risk`` NaN without ``frame_fn``); ``candidates`` holds
        the degrees and ``terms`` their kinds, in the order tried; ``score``
        is the held-out weighted squared pair residual per pixel (a
        normalised chi-square, 1.0 = noise, when the sigmas are right); NaN
        for a candidate not tried.
    """
    prob = check_inputs(images, masks, sigmas, 0, origins=origins, grid_shape=grid_shape)
    ndim = len(prob.shape)
    shape = prob.shape
    if block is None:
        block = int(max(4, min(BLOCK_MAX, min(shape) // BLOCK_DIV)))
    labels = _fold_labels(shape, block, nfolds)
    n = len(prob.images)
    dmax = max(candidates)
    cands = candidate_polynomials(ndim, candidates, terms)

    def fold_masks(k):  # read by parts: no mask of a whole image is held
        return [_FoldMask(labels, k, prob.origins[i], im.shape, prob.masks[i])
                for i, im in enumerate(prob.images)]

    top = (dmax,) * ndim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once, by the fit itself
        folds = [moments_fn(fold_masks(k), top) for k in range(nfolds)]
    keys = sorted(set().union(*(f.S for f in folds)))
    totS = {key: sum(f.S[key] for f in folds if key in f.S) for key in keys}
    totT = {key: sum(f.T[key] for f in folds if key in f.T) for key in keys}
    npix = sum(sum(f.npix.values()) for f in folds)
    scores, errs, fold_scores = [], [], []
    for d, _, mask in cands:
        deg = (d,) * ndim
        nterms = (d + 1) ** ndim if mask is None else int(mask.sum())
        if npix < MIN_PIXELS_PER_UNKNOWN * n * nterms or not keys:
            scores.append(np.nan)
            errs.append(np.nan)
            fold_scores.append([np.nan] * nfolds)
            continue
        ms = tuple(slice(0, 2 * d + 1) for _ in range(ndim))
        ts = tuple(slice(0, d + 1) for _ in range(ndim))
        idx = gram_index(deg)
        per_fold, ssr_all, pix_all = [], 0.0, 0
        for f in folds:
            S = {key: totS[key][ms] - (f.S[key][ms] if key in f.S else 0) for key in keys}
            T = {key: totT[key][ts] - (f.T[key][ts] if key in f.T else 0) for key in keys}
            a, b = assemble(n, deg, S, T)
            coef = np.asarray(solve_fn(a, b, n, deg, mask)).reshape(n, -1)
            ssr, pix = 0.0, 0
            for key, s in f.S.items():
                l, m = key
                dc = coef[l] - coef[m]
                t = np.ravel(f.T[key][ts])
                g = s[ms][idx]
                ssr += max(f.chi[key] - 2 * dc @ t + dc @ g @ dc, 0.0)
                pix += f.npix[key]
            per_fold.append(ssr / pix if pix else np.nan)
            ssr_all += ssr
            pix_all += pix
        scores.append(ssr_all / pix_all if pix_all else np.nan)
        fold_scores.append(per_fold)
        ok = np.isfinite(per_fold)
        errs.append(float(np.std(np.asarray(per_fold)[ok], ddof=1) / np.sqrt(ok.sum()))
                    if ok.sum() > 1 else 0.0)
    sc = np.array(scores, dtype=float)
    paired = [np.nan] * len(cands)
    if not np.isfinite(sc).any():
        chosen = best = 0
    else:
        ib = int(np.nanargmin(sc))
        best = chosen = ib
        for j in range(len(cands)):
            if not np.isfinite(sc[j]):
                continue
            # per-fold differences from the best: the folds' own scatter
            # (how much overlap each fold holds, how noisy it is) cancels
            diff = np.asarray(fold_scores[j]) - np.asarray(fold_scores[ib])
            diff = diff[np.isfinite(diff)]
            se = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
            paired[j] = se
            if chosen == best and j < ib and diff.size and diff.mean() <= se:
                chosen = j
    # the estimate of each candidate's true error over the footprints
    variance = risk = [np.nan] * len(cands)
    if frame_fn is not None and np.isfinite(sc).any() and npix:
        with threadpool_limits(limits=1, user_api="blas"):  # small products
            fv = _footprint_variance(prob, frame_fn(shape), cands, dmax)
        if fv is not None:
            half = 0.5 * npix / fv[1]  # half the mean variance of a pair difference
            variance = fv[0] / half
            risk = BIAS_WEIGHT * (sc - np.nanmin(sc)) + variance
            if np.isfinite(risk).any():
                chosen = int(np.nanargmin(risk))
    rule = ("the least estimated error over the footprints" if np.isfinite(risk).any()
            else "the fewest terms within one standard error")
    labels = [candidate_name(d, k) for d, k, _ in cands]
    info = {"candidates": [d for d, _, _ in cands], "terms": [k for _, k, _ in cands],
            "labels": labels, "score": [float(s) for s in sc],
            "stderr": [float(e) for e in errs],
            "paired_stderr": [float(e) for e in paired],
            "variance": [float(v) for v in variance], "risk": [float(r) for r in risk],
            "fold_scores": [[float(v) for v in f] for f in fold_scores],
            "nfolds": nfolds, "block": block,
            "best": cands[best][0], "best_terms": cands[best][1],
            "chosen": cands[chosen][0], "chosen_terms": cands[chosen][1]}
    log.info("degree='auto': held-out pair residual per pixel %s, footprint variance %s "
             "for degrees %s; chose %s (best held-out %s; %s)",
             [round(s, 6) for s in info["score"]], [round(v, 6) for v in info["variance"]],
             labels, labels[chosen], labels[best], rule)
    return (cands[chosen][0],) * ndim, cands[chosen][1], info
