"""Independent brute-force reference computations for the core engine tests.

Nothing here imports ``jwst_wiimatch``: every quantity is rebuilt straight from
the formulas in ``wiimatch-0.3.2-behaviour.md`` with simple, slow, dense code,
so that the engine can be checked against it on small problems.

Conventions (as documented for the reference implementation):

* coordinates are in (x, y, z, ...) order, x being the LAST numpy axis;
* the flat coefficient index of exponent tuple ``p`` (in (x, y, ...) order) is
  the C-order ravel of ``p`` in a ``(D_x+1, D_y+1, ...)`` grid;
* pixels of the ordered pair (l, m) are those valid in both images, where
  valid means: mask truthy (None = all valid), data finite and, with sigmas,
  sigma finite and > 0;
* weight ``w = 1 / (sigma_l**2 + sigma_m**2)``, or 0.5 without sigmas.
"""
import itertools

import numpy as np

__all__ = [
    "default_center", "oracle_coords", "exponents", "design_matrix",
    "valid_masks", "pair_weights", "oracle_normal_equations",
    "overlap_groups", "difference_system", "oracle_solve", "objective",
    "surfaces", "polyval_nd", "group_sums", "estimator_covariance",
]


# ---------------------------------------------------------------- coordinates
def default_center(shape):
    """Middle of the grid in (x, y, ...) order: ``shape[::-1][j] // 2``."""
    return tuple(float(n // 2) for n in reversed(tuple(shape)))


def oracle_coords(shape, center=None, image2world=None, center_cs="image"):
    """Coordinate arrays (x, y, ...), effective center and coordinate system."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    # pixel index grids, numpy axis order, then reversed to (x, y, ...)
    axes = np.meshgrid(*[np.arange(n, dtype=float) for n in shape],
                       indexing="ij")
    pix = [axes[ndim - 1 - j] for j in range(ndim)]
    if center is None:
        center = default_center(shape)
        center_cs = "image"
    center = tuple(float(c) for c in center)
    if image2world is None:
        eff = center
        coords = [pix[j] - eff[j] for j in range(ndim)]
        return coords, eff, "image"
    world = image2world(*[p.ravel() for p in pix])
    world = [np.asarray(w, dtype=float).reshape(shape) for w in world]
    if center_cs == "image":
        eff = tuple(float(np.asarray(v)) for v in image2world(*center))
    else:
        eff = center
    coords = [world[j] - eff[j] for j in range(ndim)]
    return coords, eff, "world"


def exponents(degree):
    """All exponent tuples (x, y, ...) in flat-coefficient (C) order."""
    return list(itertools.product(*[range(int(d) + 1) for d in degree]))


def design_matrix(coords, degree, terms="tensor"):
    """(npix, M) matrix of monomials x**p0 * y**p1 * ... on raveled grid.

    ``terms='total'``: the columns of terms with ``sum(p) > max(degree)`` are
    0 (such a term is absent; the minimum-norm solutions below give it 0).
    """
    top = max(int(d) for d in degree) if len(degree) else 0
    cols = []
    for p in exponents(degree):
        col = np.ones(coords[0].size)
        if terms == "total" and sum(p) > top:
            col = np.zeros(coords[0].size)
        for c, e in zip(coords, p):
            col = col * c.ravel() ** e
        cols.append(col)
    return np.stack(cols, axis=1)


def polyval_nd(coef_nd, coords):
    """Evaluate sum_p C[p] * prod_j coords[j]**p[j] with explicit loops.

    ``coords`` is a sequence in (x, y, ...) order, matching the axes of
    ``coef_nd``. The one brute-force polynomial evaluator of the tests (the
    step and pipeline helpers use it too).
    """
    coef_nd = np.asarray(coef_nd, dtype=float)
    out = np.zeros(np.shape(coords[0]))
    for p in itertools.product(*[range(n) for n in coef_nd.shape]):
        term = np.full(np.shape(coords[0]), coef_nd[p])
        for c, e in zip(coords, p):
            term = term * np.asarray(c, dtype=float) ** e
        out = out + term
    return out


def surfaces(coef, coords, degree):
    """Background surfaces of all images on the grid, shape (N,) + shape."""
    shp = tuple(d + 1 for d in degree)
    return np.stack([polyval_nd(np.asarray(c).reshape(shp), coords)
                     for c in coef])


# ---------------------------------------------------------------- pixels/weights
def _as_float(a):
    return np.asarray(a, dtype=np.float64)


def valid_masks(images, masks=None, sigmas=None):
    """Per-image boolean validity (flattened)."""
    n = len(images)
    out = []
    for i in range(n):
        im = _as_float(images[i])
        v = np.isfinite(im)
        if masks is not None and masks[i] is not None:
            m = np.asarray(masks[i])
            v = v & np.array([bool(x) for x in m.ravel()]).reshape(m.shape)
        if sigmas is not None and sigmas[i] is not None:
            s = np.broadcast_to(_as_float(sigmas[i]), im.shape)
            v = v & np.isfinite(s) & (s > 0)
        out.append(v.ravel())
    return out


def pair_weights(sigmas, shape, l, m):
    """Per-pixel weight (flattened) for pair (l, m)."""
    npix = int(np.prod(shape))
    if sigmas is None:
        return np.full(npix, 0.5)
    sl = np.broadcast_to(_as_float(sigmas[l]), shape).ravel()
    sm = np.broadcast_to(_as_float(sigmas[m]), shape).ravel()
    with np.errstate(all="ignore"):
        return 1.0 / (sl ** 2 + sm ** 2)


def _degree_tuple(degree, ndim):
    if np.ndim(degree) == 0:
        return (int(degree),) * ndim
    return tuple(int(d) for d in degree)


# ---------------------------------------------------------------- normal eqs
def oracle_normal_equations(images, masks=None, sigmas=None, degree=0,
                            center=None, image2world=None, center_cs="image"):
    """Brute-force (a, b, coords, eff_center, coord_system).

    Loops over ordered pairs and over every (p, q) element, exactly as the
    formulas read:

        b[(l,p)]       =  sum_{m != l} sum_K X^p (I_l - I_m) w
        a[(l,p),(m,q)] = -sum_K X^(p+q) w                        (m != l)
        a[(l,p),(l,q)] = -sum_{m != l} a[(l,p),(m,q)]
    """
    images = [_as_float(im) for im in images]
    shape = images[0].shape
    ndim = len(shape)
    degree = _degree_tuple(degree, ndim)
    coords, eff, cs = oracle_coords(shape, center, image2world, center_cs)
    exps = exponents(degree)
    M = len(exps)
    N = len(images)
    valid = valid_masks(images, masks, sigmas)
    flat_c = [c.ravel() for c in coords]

    def mono(p, k):
        out = np.ones(int(k.sum()))
        for c, e in zip(flat_c, p):
            out = out * c[k] ** e
        return out

    a = np.zeros((N * M, N * M))
    b = np.zeros(N * M)
    for l in range(N):
        for m in range(N):
            if l == m:
                continue
            k = valid[l] & valid[m]
            w = pair_weights(sigmas, shape, l, m)[k]
            diff = images[l].ravel()[k] - images[m].ravel()[k]
            for ip, p in enumerate(exps):
                b[l * M + ip] += np.sum(mono(p, k) * diff * w)
                for iq, q in enumerate(exps):
                    pq = tuple(x + y for x, y in zip(p, q))
                    a[l * M + ip, m * M + iq] = -np.sum(mono(pq, k) * w)
    for l in range(N):
        for ip in range(M):
            for iq in range(M):
                a[l * M + ip, l * M + iq] = -sum(
                    a[l * M + ip, m * M + iq] for m in range(N) if m != l)
    return a, b, coords, eff, cs


# ---------------------------------------------------------------- solving
def overlap_counts(images, masks=None, sigmas=None):
    """(N, N) number of pixels valid in both images (diagonal: own count)."""
    valid = valid_masks(images, masks, sigmas)
    n = len(valid)
    out = np.zeros((n, n), dtype=int)
    for l in range(n):
        for m in range(n):
            out[l, m] = int(np.sum(valid[l] & valid[m]))
    return out


def overlap_groups(images, masks=None, sigmas=None):
    """Connected components (sorted lists) of the overlap graph."""
    cnt = overlap_counts(images, masks, sigmas)
    n = len(cnt)
    seen = [False] * n
    groups = []
    for s in range(n):
        if seen[s]:
            continue
        stack, comp = [s], []
        seen[s] = True
        while stack:
            u = stack.pop()
            comp.append(u)
            for v in range(n):
                if v != u and not seen[v] and cnt[u, v] > 0:
                    seen[v] = True
                    stack.append(v)
        groups.append(sorted(comp))
    return groups


def difference_system(images, masks=None, sigmas=None, degree=0, center=None,
                      image2world=None, center_cs="image", terms="tensor"):
    """Weighted pairwise difference system A c ~= r over unordered pairs.

    One row per (pair l < m, pixel k valid in both):
    ``sqrt(w) * (X(k) c_l - X(k) c_m) ~= sqrt(w) * (I_l(k) - I_m(k))``.
    Returns (A, r, pair_index) where pair_index lists (l, m, flat pixel).
    """
    images = [_as_float(im) for im in images]
    shape = images[0].shape
    degree = _degree_tuple(degree, len(shape))
    coords, _, _ = oracle_coords(shape, center, image2world, center_cs)
    X = design_matrix(coords, degree, terms)
    M = X.shape[1]
    N = len(images)
    valid = valid_masks(images, masks, sigmas)
    rows, rhs, index = [], [], []
    for l in range(N):
        for m in range(l + 1, N):
            k = np.flatnonzero(valid[l] & valid[m])
            if k.size == 0:
                continue
            sw = np.sqrt(pair_weights(sigmas, shape, l, m)[k])
            blk = np.zeros((k.size, N * M))
            blk[:, l * M:(l + 1) * M] = X[k] * sw[:, None]
            blk[:, m * M:(m + 1) * M] = -X[k] * sw[:, None]
            rows.append(blk)
            rhs.append(sw * (images[l].ravel()[k] - images[m].ravel()[k]))
            index.extend((l, m, int(kk)) for kk in k)
    if rows:
        A = np.vstack(rows)
        r = np.concatenate(rhs)
    else:
        A = np.zeros((0, N * M))
        r = np.zeros(0)
    return A, r, index


def _constraint_rows(groups, N, M):
    C = []
    for g in groups:
        for k in range(M):
            row = np.zeros(N * M)
            for n in g:
                row[n * M + k] = 1.0
            C.append(row)
    return np.array(C).reshape(-1, N * M)


def oracle_solve(images, masks=None, sigmas=None, degree=0, center=None,
                 image2world=None, center_cs="image", return_info=False, terms="tensor"):
    """Least-squares solution with per-group zero-sum normalisation.

    Solves the stacked dense system ``[A; C] c ~= [r; 0]`` with ``lstsq``
    where C holds, for every connected group of the overlap graph and every
    coefficient, a row summing that coefficient over the group's images.
    C's rows lie in the null space of A, so the stacked least-squares
    problem decouples: A c is the least-squares optimum and C c = 0 exactly
    (isolated images therefore get 0).  Columns are scaled per exponent (the
    same factor for every image) for conditioning, which keeps C's rows in
    the null space of the scaled A.
    """
    images = [_as_float(im) for im in images]
    shape = images[0].shape
    N = len(images)
    degree = _degree_tuple(degree, len(shape))
    M = len(exponents(degree))
    A, r, _ = difference_system(images, masks, sigmas, degree, center,
                                image2world, center_cs, terms)
    groups = overlap_groups(images, masks, sigmas)
    coords, _, _ = oracle_coords(shape, center, image2world, center_cs)
    X = design_matrix(coords, degree, terms)
    scale = np.max(np.abs(X), axis=0)
    scale[scale == 0] = 1.0
    D = np.tile(1.0 / scale, N)
    C = _constraint_rows(groups, N, M)
    cscale = np.max(np.abs(A)) if A.size else 1.0
    big = np.vstack([A * D, cscale * C * D])
    rhs = np.concatenate([r, np.zeros(C.shape[0])])
    sol, _, rank, sv = np.linalg.lstsq(big, rhs, rcond=None)
    coef = (sol * D).reshape(N, M)
    if not return_info:
        return coef
    # rank deficiency beyond the per-group common polynomial
    if A.shape[0]:
        sa = np.linalg.svd(A * D, compute_uv=False)
        tol = sa.max() * max(A.shape) * np.finfo(float).eps * 1e3
        rank_a = int(np.sum(sa > tol))
    else:
        rank_a = 0
    full_rank = sum((len(g) - 1) * M for g in groups)
    info = dict(groups=groups, rank=rank_a, full_rank=full_rank,
                determined=(rank_a == full_rank), A=A, r=r)
    return coef, info


def objective(coef, images, masks=None, sigmas=None, degree=0, center=None,
              image2world=None, center_cs="image"):
    """Weighted sum of squared residual pairwise differences (unordered)."""
    A, r, _ = difference_system(images, masks, sigmas, degree, center,
                                image2world, center_cs)
    res = A @ np.asarray(coef, dtype=float).ravel() - r
    return float(res @ res)


def group_sums(coef, groups):
    """Per-group sums over images of every coefficient, shape (G, M)."""
    coef = np.asarray(coef)
    return np.array([coef[g].sum(axis=0) for g in groups])


def estimator_covariance(images, masks, sigmas, degree, center=None,
                         image2world=None, center_cs="image", terms="tensor",
                         exclude=None):
    """Exact covariance of the zero-sum estimator under independent
    Gaussian pixel noise of standard deviation ``sigmas[n]`` per image.

    The estimator is linear in the data, ``c = L r`` with r the weighted
    pair differences; r = D n where n is the stacked pixel noise.  So
    ``cov = L D diag(sigma^2) D^T L^T`` (pair differences share pixels, so
    they are correlated: this is not the naive (A^T A)^-1).

    ``exclude``: pairs ``(image, flat term)`` of unknowns held at 0 (their
    columns of A are zeroed and a row pins each to 0), for the estimator
    that sets the terms the overlaps do not determine to 0.
    """
    images = [_as_float(im) for im in images]
    shape = images[0].shape
    N = len(images)
    P = int(np.prod(shape))
    degree = _degree_tuple(degree, len(shape))
    M = len(exponents(degree))
    A, r, index = difference_system(images, masks, sigmas, degree, center,
                                    image2world, center_cs, terms)
    groups = overlap_groups(images, masks, sigmas)
    C = _constraint_rows(groups, N, M)
    if exclude:
        cols = [i * M + t for i, t in exclude]
        A[:, cols] = 0.0
        C = np.vstack([C, np.eye(N * M)[cols]])
    cscale = np.max(np.abs(A))
    big = np.vstack([A, cscale * C])
    L = np.linalg.pinv(big)[:, :A.shape[0]]
    Dm = np.zeros((A.shape[0], N * P))
    for row, (l, m, k) in enumerate(index):
        sw = np.sqrt(pair_weights(sigmas, shape, l, m)[k])
        Dm[row, l * P + k] = sw
        Dm[row, m * P + k] = -sw
    var = np.concatenate([
        np.broadcast_to(_as_float(sigmas[n]), shape).ravel() ** 2
        for n in range(N)])
    G = L @ Dm
    return (G * var) @ G.T


# ---------------------------------------------------------------- test problems
def smooth_image2world(*x):
    """A smooth affine + mildly non-linear image -> world map, any ndim.

    Works on scalars and arrays alike; returns a tuple in (x, y, ...) order.
    """
    n = len(x)
    out = []
    for j in range(n):
        xj = np.asarray(x[j], dtype=float)
        xk = np.asarray(x[(j + 1) % n], dtype=float)
        out.append(0.3 * (j + 1) + 1.1 * xj + (0.2 * xk if n > 1 else 0.0)
                   + 0.01 * xj * xk)
    return tuple(out)


def box_masks(rng, shape, nimages, frac=0.75, holes=0.0, full_first=True):
    """Offset box footprints: image 0 covers everything (when full_first),
    the others random boxes covering ``frac`` of every axis, plus random
    holes.  Returns boolean arrays."""
    masks = []
    for i in range(nimages):
        m = np.zeros(shape, dtype=bool)
        if i == 0 and full_first:
            m[...] = True
        else:
            sl = []
            for n in shape:
                ln = max(1, int(np.ceil(frac * n)))
                st = int(rng.integers(0, n - ln + 1))
                sl.append(slice(st, st + ln))
            m[tuple(sl)] = True
        if holes:
            m &= rng.random(shape) >= holes
        masks.append(m)
    return masks


def dyadic(rng, shape, scale=64, lo=-50, hi=50):
    """Random values exactly representable in float32 (and their
    differences too): multiples of 1/scale in [lo, hi]."""
    return np.round(rng.uniform(lo, hi, size=shape) * scale) / scale
