"""Building and solving the normal equations (the ``wiimatch.lsq_optimizer`` API).

``build_lsq_eqs`` returns the system in the documented basis (monomials of the
coordinates ``X = C - eff_center``), ``rlu_solve`` and ``pinv_solve`` solve such
a system. ``match_lsq`` does not go through these: it solves the same system
in well-scaled coordinates and converts the solution, which is more accurate.
"""
import numpy as np

from .core.engine import build_moments, documented_equations
from .core.solve import pinv_tol, solve_system

__all__ = ["build_lsq_eqs", "rlu_solve", "pinv_solve"]


def build_lsq_eqs(images, masks, sigmas, degree, center=None, image2world=None,
                  center_cs="image"):
    """Build the normal equations ``a c = b`` of the matching problem.

    Parameters are those of :func:`jwst_wiimatch.match.match_lsq` (``masks``
    and ``sigmas`` may be ``None``).

    Returns
    -------
    a : numpy.ndarray
        ``(N M, N M)`` symmetric matrix; ``a[(l, p), (m, q)] = -sum w X^(p+q)``
        over the overlap of images ``l != m``, diagonal blocks minus the sum
        of the off-diagonal blocks of their row.
    b : numpy.ndarray
        ``(N M,)``: ``b[(l, p)] = sum_{m != l} sum w X^p (I_l - I_m)``.
    coord_arrays : tuple of numpy.ndarray
        Coordinates ``X`` of every pixel, ``(x, y, ...)`` order.
    eff_center : tuple of float
    coord_system : {'image', 'world'}

    Examples
    --------
    >>> import numpy as np
    >>> im = [np.zeros((3, 4)), np.ones((3, 4))]
    >>> a, b, coords, center, cs = build_lsq_eqs(im, None, None, degree=0)
    >>> a
    array([[ 6., -6.],
           [-6.,  6.]])
    >>> b
    array([-6.,  6.])
    """
    prob, frame, mom = build_moments(images, masks, sigmas, degree, center=center,
                                     image2world=image2world, center_cs=center_cs)
    a, b = documented_equations(frame, mom, prob.degree)
    return a, b, frame.coordinates(), frame.eff_center, frame.coord_system


def rlu_solve(matrix, free_term, nimages):
    """Solve the normal equations by LU decomposition of the reduced system.

    Within each connected group of overlapping images, the unknowns of the
    group's first image are held at zero, the rest of the (equilibrated)
    system is LU-solved, and the group's coefficients are shifted so that each
    coefficient sums to zero over the group. Rank-deficient groups fall back
    to the eigen-decomposition, and the terms the system leaves free are set
    to zero (the last terms of the flat order first: without the degree, the
    flat index stands for the order); isolated images get zeros; both are
    warned.

    Parameters
    ----------
    matrix : numpy.ndarray
        ``(N M, N M)`` matrix from :func:`build_lsq_eqs`.
    free_term : numpy.ndarray
        ``(N M,)`` free terms.
    nimages : int
        Number of images ``N``.

    Returns
    -------
    numpy.ndarray
        ``(N, M)`` coefficients.
    """
    coef, _ = solve_system(matrix, free_term, nimages, method="RLU")
    return coef


def pinv_solve(matrix, free_term, nimages, tol=None):
    """Solve the normal equations with a pseudo-inverse.

    Works group by group like :func:`rlu_solve`, with a pseudo-inverse of
    each group's equilibrated reduced system in place of the LU solution;
    terms the system leaves free are set to zero as in :func:`rlu_solve`
    (not given their minimum-norm values, as wiimatch 0.3.2 did).

    Parameters
    ----------
    matrix, free_term, nimages
        As in :func:`rlu_solve`.
    tol : float, None, optional
        Eigenvalues smaller than ``tol`` times the largest are treated as 0.
        Default: ``eps(matrix.dtype) ** (2/3)``.

    Returns
    -------
    numpy.ndarray
        ``(N, M)`` coefficients.
    """
    matrix = np.asarray(matrix)
    if tol is None:
        tol = pinv_tol(matrix.dtype)
    coef, _ = solve_system(matrix, free_term, nimages, method="PINV", tol=tol)
    return coef
