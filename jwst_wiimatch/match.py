"""Optimal (least-squares) matching of image intensities: the main entry point.

A drop-in for ``wiimatch.match.match_lsq`` (wiimatch 0.3.2) with the same
signature, conventions and return values, with its defects fixed (see the
documentation, "Differences from wiimatch 0.3.2"), and a cost that follows the
pixels where images overlap.
"""
from .core.engine import match_backgrounds
from .core.inputs import SOLVERS

__all__ = ["match_lsq", "SUPPORTED_SOLVERS"]

SUPPORTED_SOLVERS = list(SOLVERS)


def match_lsq(images, masks=None, sigmas=None, degree=0, center=None,
              image2world=None, center_cs="image", ext_return=False, solver="RLU",
              level="zero_sum", reference=None, levels=None, robust=None, nsigma=4.0,
              grow=1, nclip=3, max_abs=None, terms=None):
    r"""Polynomial backgrounds that match image intensities in the least-squares sense.

    Finds, for every image ``n``, the polynomial ``P_n`` that minimises

    .. math::

        L = \sum_{n \neq m} \sum_k
            \frac{[I_n(k) - I_m(k) - P_n(k) + P_m(k)]^2}{\sigma_n^2(k) + \sigma_m^2(k)}

    over the pixels ``k`` where both images are valid. Subtracting ``P_n`` from
    image ``n`` matches the images.

    Parameters
    ----------
    images : list of array_like
        Images (1-D, 2-D, 3-D, ...) on one common pixel grid: all of one shape,
        at least one pixel along every axis. Any real dtype; sums are
        accumulated in float64 (64-bit integer images all within ``2**53`` of
        each other are kept exact by a common offset). Arrays read by parts
        (files read on demand, dask arrays) are accepted too: see
        :func:`jwst_wiimatch.core.match_backgrounds`.
    masks : list of array_like or None, None, optional
        One per image; nonzero elements mark valid pixels; a ``None`` entry
        means every pixel of that image is valid. ``None``: all valid.
    sigmas : list of array_like or float, None, optional
        One uncertainty array (or number) per image. Pixels whose sigma is
        ``<= 0`` are not used. ``None``: equal weights. Only the ratios of the
        sigmas matter: sigmas too small or large for their squares
        (``1e-200``) are divided by a common factor.
    degree : int or sequence of int, optional
        Polynomial degree per coordinate, in ``(x, y, ...)`` order (``x`` is
        the last numpy axis); an int applies to every coordinate. A degree
        whose terms (``N * prod(D_j + 1)``) outnumber the pixels, or whose
        normal equations would not fit in memory, is refused (``ValueError``).
    center : sequence of float, float, None, optional
        Origin of the polynomial coordinates in ``(x, y, ...)`` order;
        ``None``: the middle of the grid, ``shape[::-1][j] // 2``, converted
        to world coordinates when ``image2world`` is given. A center far from
        the grid makes coefficients that float64 cannot hold precisely (a
        warning says by how much).
    image2world : callable, None, optional
        ``f(x, y, ...)`` mapping pixel coordinates (1-D arrays, ``(x, y, ...)``
        order) to world coordinates, element-wise, one array per axis. When
        given, the polynomials are in world coordinates. It may be called
        several times, on parts of the grid, and always with 1-D arrays (the
        center too is passed as arrays of one element); mostly on a few
        hundred pixels per block of the grid, from which
        the world monomials are interpolated with a checked error (see
        "Algorithm" in the documentation).
    center_cs : {'image', 'world'}, optional
        Coordinate system of ``center``; ``'world'`` requires ``image2world``.
    ext_return : bool, optional
        Also return the normal equations and the coordinates (see Returns).
    solver : {'RLU', 'PINV'}, optional
        ``'RLU'``: LU solution of the system reduced by holding one image per
        overlapping group at zero; ``'PINV'``: pseudo-inverse solution. Both
        then shift each group's coefficients to a zero sum over its images
        (with the default ``level``).
    level : {'zero_sum', 'lowest', 'highest'}, optional
        Which polynomial common to each connected group the coefficients
        carry: the zero sum (default, wiimatch's), or jwst skymatch's
        ``match_down`` convention: the image of lowest (``'lowest'``) or
        highest (``'highest'``) background, the mean of its polynomial over
        its own valid pixels, gets coefficients 0 (an addition to wiimatch
        0.3.2; see :func:`jwst_wiimatch.core.match_backgrounds`).
    reference : int or sequence of int, None, optional
        Images held fixed (coefficients 0); the others are fitted to them.
    levels : sequence of float or None, None, optional
        Absolute background of each image at the center (NaN/None:
        unknown); each group's constant is set to agree with them.
    robust : {None, 'clip', 'huber', 'tukey'}, optional
        Robust matching (an addition to wiimatch 0.3.2): None (default)
        is plain least squares, as wiimatch; otherwise pixels whose pair
        residual is not noise are left out (with their surroundings) or
        down-weighted, from a start that junk cannot move. See
        :func:`jwst_wiimatch.core.match_backgrounds` and
        ``docs/algorithm.rst``, "Robust matching".
    nsigma, grow, nclip : float, int, int, optional
        Rejection threshold (robust sigmas), pixels grown around a rejected
        pixel, most reweighted passes (robust matching only).
    max_abs : float, None, optional
        Leave out values with ``|value| > max_abs`` before any sum (None:
        no cut without ``robust``; an automatic one with it).
    terms : {None, 'tensor', 'total'}, optional
        ``'tensor'`` (None, the default; wiimatch's): every term
        ``x**i y**j ...`` with each exponent up to its axis' degree;
        ``'total'`` (an addition to wiimatch 0.3.2): only those of total
        degree ``i + j + ...`` up to ``max(degree)`` (degree 1: the plane
        ``1, x, y``). The coefficients keep the tensor layout below, with 0
        for the absent terms; so do ``a`` and ``b``, which then also hold
        the rows of the absent terms (the solution leaves those out).

    Returns
    -------
    bkg_poly_coeff : numpy.ndarray
        ``(N, M)`` float64 array, ``M = prod(D_j + 1)``; row ``n`` holds the
        coefficients of image ``n``'s polynomial, ordered so that
        ``bkg_poly_coeff[n].reshape(D_x + 1, D_y + 1, ...)`` is the coefficient
        array of :func:`numpy.polynomial.polynomial.polyval2d` (``polyval3d``,
        ...) in the coordinates ``X = C - eff_center``.
    a : numpy.ndarray
        ``(N M, N M)`` matrix of the normal equations (``ext_return`` only).
    b : numpy.ndarray
        ``(N M,)`` free terms (``ext_return`` only).
    coord_arrays : tuple of numpy.ndarray
        Coordinates ``X`` of every pixel, ``(x, y, ...)`` order (``ext_return`` only).
    eff_center : tuple
        The origin of the coordinates (``ext_return`` only).
    coord_system : {'image', 'world'}
        (``ext_return`` only).

    Warns
    -----
    jwst_wiimatch.core.MatchWarning
        When images do not overlap (each connected group is matched on its own,
        isolated images get zeros), when an image's sigmas leave it no usable
        pixel, when the overlaps leave coefficients undetermined (they are set
        to 0), when valid pixels hold NaN/inf (they are skipped), when integer
        images exceed float64's exact range, or when the coefficients about a
        far ``center`` cannot represent the fit to float64 precision.

    Examples
    --------
    >>> import numpy as np
    >>> from jwst_wiimatch.match import match_lsq
    >>> im1 = np.zeros((5, 5, 4), dtype=float)
    >>> cbg = 1.32 * np.ones_like(im1)
    >>> ind = np.indices(im1.shape, dtype=float)
    >>> im3 = cbg + 0.15 * ind[0] + 0.62 * ind[1] + 0.74 * ind[2]
    >>> mask = np.ones_like(im1, dtype=np.int8)
    >>> sigma = np.ones_like(im1, dtype=float)
    >>> coef = match_lsq([im1, im3], [mask, mask], [sigma, sigma],
    ...                  degree=(1, 1, 1), center=(0, 0, 0))
    >>> np.round(coef, 10) + 0.0
    array([[-0.66 , -0.075, -0.31 ,  0.   , -0.37 ,  0.   ,  0.   ,  0.   ],
           [ 0.66 ,  0.075,  0.31 ,  0.   ,  0.37 ,  0.   ,  0.   ,  0.   ]])
    """
    res = match_backgrounds(images, masks=masks, sigmas=sigmas, degree=degree,
                            center=center, image2world=image2world,
                            center_cs=center_cs, solver=solver, level=level,
                            reference=reference, levels=levels, robust=robust,
                            nsigma=nsigma, grow=grow, nclip=nclip, max_abs=max_abs,
                            terms=terms)
    if not ext_return:
        return res.coef
    a, b = res.equations()
    return res.coef, a, b, res.frame.coordinates(), res.eff_center, res.coord_system
