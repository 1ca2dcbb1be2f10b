"""Polynomial terms: exponent sets, their order, evaluation and changes of basis.

Conventions (shared with wiimatch 0.3.2):

* coordinates are ordered ``(x, y, z, ...)`` where ``x`` runs along the LAST
  numpy axis of the data arrays;
* a polynomial of degree ``(D_x, D_y, ...)`` has ``M = prod(D_j + 1)`` terms;
  term ``p = (p_x, p_y, ...)`` is ``x**p_x * y**p_y * ...`` and its flat index
  is ``numpy.ravel_multi_index(p, (D_x + 1, D_y + 1, ...))`` (C order), so that
  ``coef.reshape(D_x + 1, D_y + 1, ...)`` is the coefficient array used by
  :func:`numpy.polynomial.polynomial.polyval2d` / ``polyval3d``.

Internally the engine works in *scaled* coordinates ``u = (X - shift) / scale``
(one shift and scale per axis) where the monomials are well conditioned; this
module converts moment sums and coefficients between the scaled basis and the
documented (unscaled) basis. Coefficients are converted in exact integer
arithmetic and rounded once, so each documented coefficient is the float64
nearest to the exact value; whether float64 coefficients in the documented
basis can represent the polynomial at all (they cannot when the center is far
from the grid) is checked by :func:`basis_loss`.
"""
import math
from math import comb

import numpy as np

__all__ = [
    "TERMS",
    "check_terms",
    "exponents",
    "polyval_nd",
    "term_mask",
    "term_name",
    "coef_from_scaled",
    "moments_to_basis",
    "basis_change_1d",
    "basis_loss",
]


def exponents(degree):
    """Exponent tuples of all terms of a polynomial of the given degree.

    Parameters
    ----------
    degree : tuple of int
        Degree along each coordinate, in ``(x, y, ...)`` order.

    Returns
    -------
    numpy.ndarray
        Integer array of shape ``(M, ndim)``; row ``k`` is the exponent tuple
        of the term with flat index ``k``.
    """
    shape = tuple(int(d) + 1 for d in degree)
    return np.array(list(np.ndindex(*shape)), dtype=int).reshape(-1, len(shape))


#: kinds of term sets: ``'tensor'`` (every ``p`` with ``p_j <= D_j``, wiimatch's)
#: and ``'total'`` (those with, in addition, ``sum(p) <= max(D)``: a true plane
#: ``1, x, y`` at degree 1)
TERMS = ("tensor", "total")


def check_terms(terms):
    """Return ``terms`` as ``'tensor'`` or ``'total'`` (None: ``'tensor'``); ValueError otherwise."""
    if terms is None:
        return "tensor"
    if isinstance(terms, str) and terms.strip().lower() in TERMS:
        return terms.strip().lower()
    raise ValueError(
        f"terms={terms!r} is not one of {', '.join(repr(t) for t in TERMS)}: 'tensor' "
        "(every product x**i y**j with i, j up to the degree of their axis, wiimatch's "
        "polynomials) or 'total' (only those of total degree i + j up to the degree: "
        "degree=1 is the plane 1, x, y).")


def term_mask(degree, terms="tensor"):
    """Which terms of the tensor set of ``degree`` a polynomial of kind ``terms`` has.

    Coefficient arrays always have the tensor shape ``(D_x + 1, D_y + 1,
    ...)``; with ``terms='total'`` the terms of total degree above
    ``max(degree)`` are absent (their coefficients are 0).

    Returns
    -------
    numpy.ndarray or None
        Boolean array of length ``M`` (flat term order), or None when every
        term is present (``'tensor'``, or a set where both kinds agree).

    Examples
    --------
    >>> term_mask((1, 1), "total")  # 1, y, x, x*y: the plane leaves x*y out
    array([ True,  True,  True, False])
    >>> term_mask((1, 0), "total") is None
    True
    """
    if check_terms(terms) == "tensor":
        return None
    e = exponents(degree)
    keep = e.sum(axis=1) <= max((int(d) for d in degree), default=0)
    return None if keep.all() else keep


def term_name(p):
    """Human readable name of the term with exponents ``p``, e.g. ``'x*y^2'``."""
    letters = "xyzw"
    names = []
    for j, e in enumerate(p):
        var = letters[j] if j < len(letters) else f"x{j}"
        if e == 1:
            names.append(var)
        elif e > 1:
            names.append(f"{var}^{e}")
    return "*".join(names) if names else "1"


def polyval_nd(coef, *coords):
    """Evaluate an N-dimensional polynomial given by a coefficient array.

    Equivalent to :func:`numpy.polynomial.polynomial.polyval2d` /
    ``polyval3d`` for any number of dimensions: ``coef[p_x, p_y, ...]`` is the
    coefficient of ``x**p_x * y**p_y * ...``.

    Parameters
    ----------
    coef : array_like
        Coefficient array with one axis per coordinate (``coef.ndim ==
        len(coords)``), e.g. ``match_lsq(...)[n].reshape(D_x + 1, D_y + 1)``.
    *coords : array_like
        Coordinates ``x, y, ...``; they are broadcast against each other.

    Returns
    -------
    numpy.ndarray
        The polynomial evaluated at the coordinates (float64).

    Examples
    --------
    >>> import numpy as np
    >>> c = np.array([[1.0, 2.0], [3.0, 0.5]])  # 1 + 2 y + 3 x + 0.5 x y
    >>> float(polyval_nd(c, 2.0, 1.0))
    10.0
    """
    coef = np.asarray(coef, dtype=float)
    if coef.ndim != len(coords):
        raise ValueError(
            f"'coef' has {coef.ndim} axes but {len(coords)} coordinate arrays were "
            "given: pass one coordinate array per axis of 'coef'."
        )
    coords = np.broadcast_arrays(*[np.asarray(c, dtype=float) for c in coords])
    return _horner(coef, coords)


def _horner(coef, coords):
    x, rest = coords[0], coords[1:]
    acc = None
    for k in range(coef.shape[0] - 1, -1, -1):
        term = _horner(coef[k], rest) if rest else np.full(x.shape, coef[k])
        acc = term if acc is None else acc * x + term
    return acc


def basis_change_1d(degree, shift, scale):
    """Matrix ``B`` with ``X**k = sum_i B[i, k] * u**i`` where ``X = shift + scale * u``.

    It maps coefficients written in the ``X`` basis to the ``u`` basis
    (``c_u = B @ c_X``) and, transposed, moment sums the other way
    (``sum w X**k = sum_i B[i, k] * sum w u**i``).
    """
    n = int(degree) + 1
    b = np.zeros((n, n))
    for k in range(n):
        for i in range(k + 1):
            b[i, k] = comb(k, i) * shift ** (k - i) * scale**i
    return b


def _inverse_change_1d(degree, shift, scale):
    """Matrix ``T`` with ``u**k = sum_i T[i, k] * X**i`` (``u = (X - shift) / scale``)."""
    n = int(degree) + 1
    t = np.zeros((n, n))
    for k in range(n):
        for i in range(k + 1):
            t[i, k] = comb(k, i) * (-shift) ** (k - i) / scale**k
    return t


def _apply_per_axis(arr, mats):
    """Contract axis ``j`` of ``arr`` (shape ``(..., n_0, n_1, ...)``) with ``mats[j]``.

    ``out[..., i_0, i_1, ...] = sum_k arr[..., k_0, k_1, ...] * prod_j mats[j][i_j, k_j]``.
    """
    lead = arr.ndim - len(mats)
    for j, m in enumerate(mats):
        arr = np.moveaxis(np.tensordot(m, arr, axes=([1], [lead + j])), 0, lead + j)
    return arr


def _exact_inverse_change_1d(degree, shift, scale):
    """:func:`_inverse_change_1d` exactly: integer matrix ``t`` and integer ``den``.

    ``T[i, k] = t[i, k] / den``. With ``shift = sn / sd`` and ``scale = hn /
    hd`` (float64 numbers are such ratios of integers, ``sd`` and ``hd``
    powers of 2), ``T[i, k] = C(k, i) (-sn)**(k-i) hd**k / (sd**(k-i) hn**k)``
    over the common denominator ``sd**D hn**D``.
    """
    d = int(degree)
    sn, sd = float(shift).as_integer_ratio()
    hn, hd = float(scale).as_integer_ratio()
    t = np.zeros((d + 1, d + 1), dtype=object)
    for k in range(d + 1):
        for i in range(k + 1):
            t[i, k] = comb(k, i) * (-sn) ** (k - i) * hd**k * sd ** (d - k + i) * hn ** (d - k)
    return t, sd**d * hn**d


def coef_from_scaled(coef_u, degree, shift, scale):
    """Convert coefficients from the scaled basis ``u`` to the documented basis ``X``.

    The change of basis is done in exact integer arithmetic (the float64
    ``coef_u``, ``shift`` and ``scale`` are exact rationals with power-of-two
    denominators) and each result is rounded once: the returned coefficients
    are the float64 numbers nearest to the exact ones. (Whether those can
    represent the polynomial over the grid is another matter: see
    :func:`basis_loss`.)

    Parameters
    ----------
    coef_u : numpy.ndarray
        Shape ``(N, M)``: per-image coefficients of monomials of ``u``.
    degree, shift, scale : sequence
        Per-axis degree, and the shift and scale with ``u = (X - shift) / scale``.

    Returns
    -------
    numpy.ndarray
        Shape ``(N, M)``: the same polynomials written in monomials of ``X``.

    Examples
    --------
    >>> coef_from_scaled([[1.0, 2.0]], (1,), (10.0,), (0.5,))  # 1 + 2 (X - 10) / 0.5
    array([[-39.,   4.]])
    """
    shape = tuple(int(d) + 1 for d in degree)
    c = np.asarray(coef_u, dtype=float).reshape((-1,) + shape)
    if not np.all(np.isfinite(c)):
        mats = [_inverse_change_1d(d, s0, s1) for d, s0, s1 in zip(degree, shift, scale)]
        return _apply_per_axis(c, mats).reshape(c.shape[0], -1)
    changes = [_exact_inverse_change_1d(d, s0, s1) for d, s0, s1 in zip(degree, shift, scale)]
    # the coefficients as integers over one power-of-two denominator
    ratios = [v.as_integer_ratio() for v in c.ravel().tolist()]
    q = max(r[1] for r in ratios)
    num = np.array([p * (q // r) for p, r in ratios], dtype=object).reshape(c.shape)
    num = _apply_per_axis(num, [t for t, _ in changes])
    den = q * math.prod(dn for _, dn in changes)
    # int / int is correctly rounded in Python
    return np.array([v / den for v in num.ravel().tolist()]).reshape(c.shape[0], -1)


def monomials(coords, degree):
    """``(M, npoints)`` monomials of ``coords`` (one 1-D array per axis), flat term order.

    Row ``k`` is the term of :func:`exponents` row ``k`` (the tensor set of
    ``degree``), from powers by repeated multiplication.
    """
    e = exponents(degree)
    out = np.ones((e.shape[0], np.size(coords[0])))
    for j, x in enumerate(coords):
        x = np.asarray(x, dtype=float).ravel()
        pw = np.ones((int(degree[j]) + 1, x.size))
        for k in range(1, pw.shape[0]):
            pw[k] = pw[k - 1] * x
        out *= pw[e[:, j]]
    return out


def basis_loss(coef_u, coef_x, degree, shift, scale, samples):
    """How far the documented-basis coefficients are from the fit, over sample points.

    Evaluates (in float64, as a user would) the polynomials ``coef_x`` in the
    documented coordinates ``X`` and ``coef_u`` in the scaled ones ``u`` at
    the same points, and compares.

    Parameters
    ----------
    coef_u, coef_x : numpy.ndarray
        ``(N, M)`` coefficients of the same polynomials in ``u`` and in ``X``.
    degree, shift, scale : sequence
        As in :func:`coef_from_scaled`.
    samples : sequence of numpy.ndarray
        Coordinates ``X`` of sample points of the grid, one 1-D array per axis.

    Returns
    -------
    loss : float
        Largest difference between the two evaluations (over images and points).
    spread : float
        Largest range (max - min) of a fitted polynomial over the points.
    level : float
        Largest absolute value of a fitted polynomial over the points.
    """
    coef_u = np.asarray(coef_u, dtype=float)
    if coef_u.size == 0 or samples[0].size == 0:
        return 0.0, 0.0, 0.0
    u = [(np.asarray(x, dtype=float) - s0) / s1 for x, s0, s1 in zip(samples, shift, scale)]
    # einsum (no BLAS): a small product, which a threaded BLAS makes slow
    fit = np.einsum("nm,mp->np", coef_u, monomials(u, degree))
    with np.errstate(over="ignore", invalid="ignore"):
        got = np.einsum("nm,mp->np", np.asarray(coef_x, dtype=float),
                        monomials(samples, degree))
        diff = np.abs(got - fit)
    loss = float(np.max(np.where(np.isnan(diff), np.inf, diff)))
    return loss, float(np.max(np.ptp(fit, axis=1))), float(np.max(np.abs(fit)))


def coef_to_scaled(coef_x, degree, shift, scale):
    """Inverse of :func:`coef_from_scaled`."""
    shape = tuple(d + 1 for d in degree)
    mats = [basis_change_1d(d, s0, s1) for d, s0, s1 in zip(degree, shift, scale)]
    c = np.asarray(coef_x, dtype=float).reshape((-1,) + shape)
    return _apply_per_axis(c, mats).reshape(c.shape[0], -1)


def moments_to_basis(moments_u, degree, shift, scale):
    """Convert moment sums ``sum w u**r`` into ``sum w X**r``.

    Parameters
    ----------
    moments_u : numpy.ndarray
        Shape ``(..., degree_x + 1, degree_y + 1, ...)``.
    degree : sequence of int
        Highest exponent along each axis present in ``moments_u``.
    shift, scale : sequence of float
        ``X = shift + scale * u`` per axis.
    """
    mats = [basis_change_1d(d, s0, s1).T for d, s0, s1 in zip(degree, shift, scale)]
    return _apply_per_axis(np.asarray(moments_u, dtype=float), mats)
