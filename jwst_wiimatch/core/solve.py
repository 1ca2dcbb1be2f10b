"""Assembly and solution of the normal equations.

The system ``a c = b`` (layout and signs of wiimatch 0.3.2, see the docs) is
singular by construction: adding one polynomial to every image of a connected
group of overlapping images changes nothing. Both solvers therefore work one
connected group of the overlap graph at a time:

* the group's first image is held at zero and the reduced system is solved
  (``RLU``: LU factorisation of the equilibrated system; ``PINV``: a
  pseudo-inverse of it, truncated at ``tol`` times its largest eigenvalue);
* the group's coefficients are then shifted so that, for every term, their
  sum over the group's images is zero (the normalisation of wiimatch 0.3.2).

Images that overlap no other image get zeros; terms the data do not determine
(an overlap that is a line, say) get the minimum-norm value; every such case
is reported with a :class:`MatchWarning` naming the images and terms.
"""
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from scipy.sparse.csgraph import connected_components

from .poly import exponents, term_name

__all__ = ["MatchWarning", "SolveInfo", "assemble", "solve_system"]

# Reciprocal condition number (1-norm, equilibrated reduced system) below
# which RLU hands over to the rank-revealing path.
RLU_RCOND_MIN = 1e-12
# Terms whose sqrt(diagonal) is below this fraction of the largest are not
# equilibrated (their diagonal is rounding noise, 1e-16 of the largest).
EQUILIBRATE_MIN = 1e-8
# Squared weight of a coefficient in the null space above which it is
# reported as undetermined.
NULL_WEIGHT_MIN = 1e-6


class MatchWarning(UserWarning):
    """Something about the inputs that the result depends on (see the message)."""


@dataclass
class SolveInfo:
    """What the solver found out about the system."""

    components: list = field(default_factory=list)
    isolated: list = field(default_factory=list)
    undetermined: list = field(default_factory=list)  # (image, exponent tuple or index)


def pinv_tol(dtype):
    """wiimatch's PINV cut-off for data of ``dtype``: ``eps ** (2/3)`` (float64 for non-floats)."""
    dtype = np.dtype(dtype)
    return np.finfo(dtype if dtype.kind == "f" else np.float64).eps ** (2.0 / 3.0)


def gram_index(degree):
    """Index arrays ``idx`` with ``S[idx][p, q] == S[p + q]`` for moment arrays ``S``."""
    e = exponents(degree)
    return tuple(e[:, None, j] + e[None, :, j] for j in range(e.shape[1]))


def assemble(nimages, degree, S, T):
    """Build ``a`` and ``b`` from per-pair moments.

    Parameters
    ----------
    nimages : int
    degree : tuple of int
    S, T : dict
        ``S[(l, m)]``: coordinate moments (shape ``(2 D_x + 1, ...)``);
        ``T[(l, m)]``: data moments of ``I_l - I_m`` (shape ``(D_x + 1, ...)``),
        for ``l < m``.

    Returns
    -------
    a : numpy.ndarray, shape (N M, N M)
    b : numpy.ndarray, shape (N M,)
    """
    idx = gram_index(degree)
    nterms = idx[0].shape[0]
    a = np.zeros((nimages * nterms, nimages * nterms))
    b = np.zeros(nimages * nterms)
    for (l, m), s in S.items():
        g = s[idx]
        t = np.ravel(T[(l, m)])
        il = slice(l * nterms, (l + 1) * nterms)
        im = slice(m * nterms, (m + 1) * nterms)
        a[il, im] -= g
        a[im, il] -= g
        a[il, il] += g
        a[im, im] += g
        b[il] += t
        b[im] -= t
    return a, b


def _components(a, nimages, nterms):
    first = a[::nterms, ::nterms]
    adj = (first != 0) & ~np.eye(nimages, dtype=bool)
    ncomp, labels = connected_components(adj, directed=False)
    return [[int(i) for i in np.flatnonzero(labels == k)] for k in range(ncomp)]


def _solve_reduced(mat, rhs, method, tol):
    """Solve a symmetric positive (semi-)definite system; return (x, null-space weights)."""
    d = np.sqrt(np.abs(np.diag(mat)))
    top = np.max(d[np.isfinite(d)], initial=0.0)
    # a term whose diagonal is at the rounding level of the largest has no
    # support (e.g. a coordinate that is 0 up to rounding at every overlapping
    # pixel): scaling it up would turn rounding noise into huge coefficients
    d[~(d > EQUILIBRATE_MIN * top) | ~np.isfinite(d)] = top if top > 0 else 1.0
    ms = mat / np.outer(d, d)
    bs = rhs / d
    if method == "RLU":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            lu, piv = linalg.lu_factor(ms, check_finite=False)
        rc, info = linalg.lapack.dgecon(lu, np.linalg.norm(ms, 1), norm="1")
        if info == 0 and rc > RLU_RCOND_MIN and np.all(np.isfinite(lu)):
            x = linalg.lu_solve((lu, piv), bs, check_finite=False)
            return x / d, None
        tol = RLU_RCOND_MIN
    ev, vec = linalg.eigh(ms, check_finite=False)
    top = max(abs(ev[-1]), np.finfo(float).tiny)
    keep = ev > tol * top
    vk = vec[:, keep]
    x = vk @ ((vk.T @ bs) / ev[keep])
    null = (vec[:, ~keep] ** 2).sum(axis=1)
    return x / d, null


def solve_system(a, b, nimages, method="RLU", tol=None, image_ids=None, degree=None):
    """Solve the normal equations group by group (see the module docstring).

    Parameters
    ----------
    a : numpy.ndarray, shape (N M, N M)
    b : numpy.ndarray, shape (N M,)
    nimages : int
    method : {'RLU', 'PINV'}
    tol : float, None
        ``PINV`` cut-off relative to the largest eigenvalue of each
        equilibrated group system; default ``eps(float64) ** (2/3)``.
    image_ids : sequence, None
        Names used for images in warnings (default: their indices).
    degree : tuple of int, None
        Polynomial degree, used to name terms in warnings.

    Returns
    -------
    coef : numpy.ndarray, shape (N, M)
    info : SolveInfo
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    n = int(nimages)
    if n < 1 or a.shape != (b.size, b.size) or b.size % n:
        raise ValueError(
            f"'matrix' of shape {a.shape} and 'free_term' of size {b.size} do not "
            f"describe a system for {nimages} images."
        )
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("'matrix' and 'free_term' must be finite (they contain NaN or inf).")
    nterms = b.size // n
    if tol is None:
        tol = pinv_tol(np.float64)
    ids = list(range(n)) if image_ids is None else list(image_ids)
    coef = np.zeros((n, nterms))
    info = SolveInfo()
    info.components = _components(a, n, nterms) if n > 1 else [[0]]
    if degree is not None and int(np.prod([d + 1 for d in degree])) == nterms:
        terms = [tuple(int(v) for v in p) for p in exponents(degree)]
    else:
        terms = list(range(nterms))

    for comp in info.components:
        if len(comp) == 1:
            info.isolated.append(comp[0])
            continue
        rows = np.concatenate([np.arange(i * nterms, (i + 1) * nterms) for i in comp[1:]])
        x, null = _solve_reduced(a[np.ix_(rows, rows)], b[rows], method, tol)
        sub = np.zeros((len(comp), nterms))
        sub[1:] = x.reshape(len(comp) - 1, nterms)
        sub -= sub.mean(axis=0)
        coef[comp] = sub
        if null is not None:
            flagged = (null > NULL_WEIGHT_MIN).reshape(len(comp) - 1, nterms)
            # a term free for every other image of the group is free for the
            # group's first image too (it was only held at zero to solve)
            first = flagged.all(axis=0)
            for row, img in zip(np.vstack([first, flagged]), comp):
                info.undetermined.extend((img, terms[t]) for t in np.flatnonzero(row))

    _warn(info, n, ids)
    return coef, info


def _warn(info, n, ids):
    if n == 1:
        warnings.warn(
            "only one image was given: there is nothing to match it to, its "
            "background coefficients are 0.", MatchWarning, stacklevel=4)
        return
    if info.isolated:
        names = ", ".join(str(ids[i]) for i in info.isolated)
        warnings.warn(
            f"image(s) {names} have no valid pixels in common with any other image: "
            "their background coefficients cannot be determined and are set to 0.",
            MatchWarning, stacklevel=4)
    groups = [c for c in info.components if len(c) > 1]
    if len(groups) > 1:
        desc = "; ".join("[" + ", ".join(str(ids[i]) for i in c) + "]" for c in groups)
        warnings.warn(
            f"the images form {len(groups)} groups that do not overlap each other ({desc}): "
            "each group is matched separately, with the sum of its coefficients set to 0; "
            "levels of different groups are not related.", MatchWarning, stacklevel=4)
    if info.undetermined:
        by_image = {}
        for i, p in info.undetermined:
            by_image.setdefault(i, []).append(
                term_name(p) if isinstance(p, tuple) else f"term {p}")
        desc = "; ".join(f"image {ids[i]}: " + ", ".join(ps) for i, ps in by_image.items())
        warnings.warn(
            "the overlaps do not determine some coefficients (the system is singular "
            f"for them); they were given minimum-norm values: {desc}.",
            MatchWarning, stacklevel=4)
