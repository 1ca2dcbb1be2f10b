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

With ``fixed`` images (a reference set), a group holding some of them is
solved instead with those images' unknowns dropped from its normal equations
(their polynomials are 0: a constrained least-squares fit), and no shift
follows; groups without a fixed image keep the zero sum.

Images that overlap no other image get zeros. When the overlaps do not
determine some terms (an overlap that is a line, say), the solution is not
unique; of the least-squares solutions we return the one in which a set of
those terms, highest total degree first, is exactly zero (in the scaled basis
the engine solves in, and therefore in the documented basis too, see
:func:`_zero_free_terms`): a value the data carry no information on is not
made up. (wiimatch 0.3.2 gave NaN, or the minimum-norm solution, whose free
terms can be as large as the determined ones.) Every such case is reported
with a :class:`MatchWarning` naming the images and terms.
"""
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg
from scipy.sparse.csgraph import connected_components

from .inputs import MatchWarning
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
# A term is chosen to be set to zero only when its weight in the remaining
# free directions is at least this fraction of the largest weight of any
# term: higher-degree terms are preferred, but not at the price of a badly
# conditioned choice.
PICK_MIN = 0.25


@dataclass
class SolveInfo:
    """What the solver found out about the system."""

    components: list = field(default_factory=list)
    isolated: list = field(default_factory=list)
    undetermined: list = field(default_factory=list)  # (image, exponent tuple or index)
    #: one per entry of ``components``: condition number of the equilibrated
    #: system solved for the group (RLU: 1-norm estimate, ``1 / rcond``;
    #: rank-revealing path: largest over smallest kept eigenvalue); NaN for
    #: a group with nothing to solve (an image alone, or all held fixed)
    condition: list = field(default_factory=list)


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
    if not S:
        return a, b
    keys = list(S)
    lm = np.array(keys, dtype=np.intp).reshape(-1, 2)
    G = np.stack([S[k] for k in keys])[(slice(None),) + idx]  # (pairs, M, M), symmetric
    t = np.stack([np.ravel(T[k]) for k in keys])  # (pairs, M)
    a4 = a.reshape(nimages, nterms, nimages, nterms)
    # off the diagonal each block holds one pair (l < m)
    a4[lm[:, 0], :, lm[:, 1], :] = -G
    a4[lm[:, 1], :, lm[:, 0], :] = -G
    # on it, every pair adds to both its images' blocks; interleaved
    # (l0, m0, l1, m1, ...), the additions come in the pairs' order
    both = lm.ravel()
    np.add.at(a4, (both, slice(None), both, slice(None)), np.repeat(G, 2, axis=0))
    np.add.at(b.reshape(nimages, nterms), both, np.stack([t, -t], axis=1).reshape(-1, nterms))
    return a, b


def _components(a, nimages, nterms):
    first = a[::nterms, ::nterms]
    adj = (first != 0) & ~np.eye(nimages, dtype=bool)
    ncomp, labels = connected_components(adj, directed=False)
    return [[int(i) for i in np.flatnonzero(labels == k)] for k in range(ncomp)]


def _solve_reduced(mat, rhs, method, tol):
    """Solve a symmetric positive (semi-)definite system.

    Returns ``(x, null, d, cond)``: a least-squares solution, the directions
    of the (numerical) null space as columns (None when there is none), the
    equilibration factors (the system was solved for ``d * x``) and the
    condition number of the equilibrated system (see `SolveInfo.condition`).
    """
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
            return x / d, None, d, float(1.0 / rc)
        tol = RLU_RCOND_MIN
    ev, vec = linalg.eigh(ms, check_finite=False)
    top = max(abs(ev[-1]), np.finfo(float).tiny)
    keep = ev > tol * top
    vk = vec[:, keep]
    x = vk @ ((vk.T @ bs) / ev[keep])
    null = vec[:, ~keep]
    cond = float(top / ev[keep][0]) if keep.any() else float("inf")
    return x / d, (null / d[:, None] if null.shape[1] else None), d, cond


def _pick_rows(q, priority):
    """Greedy choice of ``k = q.shape[1]`` rows of ``q`` that form a regular matrix.

    Pivoted Gram-Schmidt on the rows, taking at each step, among the rows
    whose remaining norm is at least ``PICK_MIN`` times the largest, one of
    the highest ``priority`` (the largest norm among those).
    """
    res = np.array(q, dtype=float)
    sel = []
    for _ in range(q.shape[1]):
        norms = np.sqrt(np.einsum("ij,ij->i", res, res))
        norms[sel] = 0.0
        best = norms.max()
        if not best > 0:
            break
        cand = np.flatnonzero(norms >= PICK_MIN * best)
        cand = cand[priority[cand] == priority[cand].max()]
        j = int(cand[np.argmax(norms[cand])])
        sel.append(j)
        v = res[j] / norms[j]
        res -= np.outer(res @ v, v)
    return sel


def _zero_free_terms(sub, null, d, priority, free=None):
    """Among the least-squares solutions of a group, one with free terms set to 0.

    Parameters
    ----------
    sub : numpy.ndarray, shape (G, M)
        A least-squares solution of the group, normalised to a zero sum of
        every term over the group's images.
    null : numpy.ndarray, shape ((G - 1) M, k)
        Directions of the null space of the reduced system (first image held
        at zero) in which ``sub`` is free.
    d : numpy.ndarray, shape ((G - 1) M,)
        Equilibration factors of the reduced system (used to weigh terms
        when choosing which to set to zero).
    priority : numpy.ndarray, shape (M,)
        Preference of each term (its total degree): higher first.
    free : sequence of int, None
        With fixed images: the group's images (positions within the group)
        whose unknowns make the reduced system (``null`` then has
        ``len(free) M`` rows); the others are held at 0 and stay 0, and no
        zero-sum shift is made. None: the reduced system is the group's
        images but the first, with the zero-sum normalisation.

    Returns
    -------
    sub : numpy.ndarray
        The solution ``sub + Z t`` (``Z``: the free directions, normalised to
        a zero sum like ``sub``) in which ``k`` terms chosen by
        :func:`_pick_rows` are exactly zero: still a least-squares solution
        with the same normalisation, as ``Z`` is in the null space.
    zeroed : list of (int, int)
        ``(image within group, term)`` of every free term that is now 0.

    Setting the highest-degree free terms to zero first keeps the choice
    independent of the coordinates' shift: a polynomial whose terms of an
    upper set of exponents are 0 has the same terms 0 about any center.
    """
    g, m = sub.shape
    k = null.shape[1]
    z = np.zeros((g, m, k))
    if free is None:
        z[1:] = null.reshape(g - 1, m, k)
        z -= z.mean(axis=0)
    else:  # fixed images: their rows stay 0 (and are never chosen)
        z[list(free)] = null.reshape(len(free), m, k)
    z = z.reshape(g * m, k)
    # weigh each term like the equilibrated system does, to choose the rows
    w = np.tile(d.reshape(-1, m).max(axis=0), g)
    q, _ = np.linalg.qr(z * w[:, None])
    sel = _pick_rows(q, np.tile(np.asarray(priority), g))
    flat = sub.ravel().copy()
    if sel:
        if len(sel) == k:
            t = linalg.solve(z[sel], flat[sel], check_finite=False)
        else:  # (rounding left fewer independent rows: zero those it can)
            t = np.linalg.lstsq(z[sel], flat[sel], rcond=None)[0]
        shift = z @ t
        flat -= shift
        flat[sel] = 0.0
        scale = np.max(np.abs(sub), initial=0.0) + np.max(np.abs(shift), initial=0.0)
    else:
        scale = np.max(np.abs(sub), initial=0.0)
    # other free terms that the choice made 0 (e.g. the last image's, by the
    # zero sum) are 0 up to rounding: make them exactly 0 and report them
    free = np.einsum("ij,ij->i", q, q) > NULL_WEIGHT_MIN
    tiny = free & (np.abs(flat) <= 64 * np.finfo(float).eps * scale)
    flat[tiny] = 0.0
    zeroed = sorted(set(sel) | set(np.flatnonzero(tiny).tolist()))
    return flat.reshape(g, m), [divmod(int(r), m) for r in zeroed]


def solve_system(a, b, nimages, method="RLU", tol=None, image_ids=None, degree=None,
                 reasons=None, fixed=None, quiet=False, group_note=None, terms=None):
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
        Polynomial degree, used to name terms in warnings and to prefer
        setting the highest-degree free terms to zero.
    reasons : dict, None
        ``{image: text}``: why an image has no usable pixel (e.g. its
        sigmas), said in the warning about images that overlap nothing.
    fixed : collection of int, None
        Images held at zero (a reference set): in every group that holds
        some, their unknowns are dropped from the group's normal equations
        and the other images are fitted to them (no zero-sum shift). Groups
        without a fixed image are normalised to the zero sum.
    quiet : bool
        Issue no warning (the caller solves again, or reports itself).
    group_note : str, None
        How each group's common polynomial was chosen, as said in the
        warning about groups that do not overlap (default: the zero sum).
    terms : numpy.ndarray, None
        Boolean mask (length ``M``) of the terms the polynomials have (see
        :func:`.poly.term_mask`): the unknowns of the other terms are dropped
        from the normal equations and their coefficients are 0. None: all.

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
        names = [tuple(int(v) for v in p) for p in exponents(degree)]
        priority = np.array([sum(p) for p in names])
    else:
        # without the degree, the flat index: the last term is the highest
        names = list(range(nterms))
        priority = np.arange(nterms)

    act = np.arange(nterms) if terms is None else np.flatnonzero(np.asarray(terms, bool))
    if terms is not None and np.asarray(terms).shape != (nterms,):
        raise ValueError(f"'terms' must be a mask of {nterms} terms; got shape "
                         f"{np.asarray(terms).shape}.")
    nact = act.size
    fixed = set() if fixed is None else {int(i) for i in fixed}
    for comp in info.components:
        info.condition.append(float("nan"))
        if len(comp) == 1:
            info.isolated.append(comp[0])
            continue
        held = [j for j, i in enumerate(comp) if i in fixed]
        free = [j for j in range(len(comp)) if j not in held] if held else None
        reduced = comp[1:] if free is None else [comp[j] for j in free]
        sub = np.zeros((len(comp), nact))
        if not reduced:  # every image of the group is held at zero
            continue
        rows = np.concatenate([i * nterms + act for i in reduced])
        x, null, d, info.condition[-1] = _solve_reduced(a[np.ix_(rows, rows)], b[rows],
                                                        method, tol)
        if free is None:
            sub[1:] = x.reshape(len(comp) - 1, nact)
            sub -= sub.mean(axis=0)
        else:
            sub[free] = x.reshape(len(free), nact)
        if null is not None:
            sub, zeroed = _zero_free_terms(sub, null, d, priority[act], free=free)
            info.undetermined.extend((comp[i], names[act[t]]) for i, t in zeroed)
        coef[np.ix_(comp, act)] = sub

    info.undetermined.sort()
    if not quiet:
        _warn(info, n, ids, reasons or {}, group_note)
    return coef, info


def _warn(info, n, ids, reasons, group_note=None):
    if n == 1:
        warnings.warn(
            "only one image was given: there is nothing to match it to, its "
            "background coefficients are 0.", MatchWarning, stacklevel=4)
        return
    explained = [i for i in info.isolated if i in reasons]
    if explained:
        desc = "; ".join(f"image {ids[i]} ({reasons[i]})" for i in explained)
        warnings.warn(
            f"no pixel can be used in: {desc}; their background coefficients cannot "
            "be determined and are set to 0.", MatchWarning, stacklevel=4)
    others = [i for i in info.isolated if i not in reasons]
    if others:
        names = ", ".join(str(ids[i]) for i in others)
        warnings.warn(
            f"image(s) {names} have no valid pixels in common with any other image: "
            "their background coefficients cannot be determined and are set to 0.",
            MatchWarning, stacklevel=4)
    groups = [c for c in info.components if len(c) > 1]
    if len(groups) > 1:
        desc = "; ".join("[" + ", ".join(str(ids[i]) for i in c) + "]" for c in groups)
        how = group_note or "with the sum of its coefficients set to 0"
        warnings.warn(
            f"the images form {len(groups)} groups that do not overlap each other ({desc}): "
            f"each group is matched separately, {how}; "
            "levels of different groups are not related.", MatchWarning, stacklevel=4)
    if info.undetermined:
        by_image = {}
        for i, p in info.undetermined:
            by_image.setdefault(i, []).append(
                term_name(p) if isinstance(p, tuple) else f"term {p}")
        desc = "; ".join(f"image {ids[i]}: " + ", ".join(ps) for i, ps in by_image.items())
        warnings.warn(
            "the overlaps carry no information on some coefficients (the system is "
            "singular for them), so they were set to 0 (of the least-squares "
            f"solutions, the one with these terms 0): {desc}.",
            MatchWarning, stacklevel=4)
