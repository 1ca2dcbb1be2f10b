"""The matching engine: inputs -> moments -> solve -> coefficients and diagnostics.

:func:`match_backgrounds` is the one place where the pieces of the core are put
together; ``match_lsq`` and the step are faces over it.
"""
import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .accumulate import _n_threads, accumulate
from .coords import make_frame
from .inputs import (_as_real_array, check_center, check_inputs, check_solver,
                     common_sigma_scale, sigma_unusable)
from .degree import choose_degree, is_auto
from .diagnostics import fit_diagnostics
from .levels import check_level_args, image_means, level_shifts, pick_extreme
from .poly import basis_loss, check_terms, coef_from_scaled, moments_to_basis, term_mask
from .robust import check_robust, robust_moments
from .uncertainty import coefficient_covariance, noise_covariance_b, zeroed_terms
from .solve import MatchWarning, _components, assemble, gram_index, pinv_tol, solve_system

__all__ = ["MatchResult", "match_backgrounds"]

log = logging.getLogger(__name__)

# The documented-basis coefficients are reported as imprecise when, evaluated
# on the grid, they differ from the fit by more than this fraction of the
# largest range of a background over the grid ...
LOSS_RTOL = 1e-6
# ... and by more than this fraction of the largest background value (float64
# evaluation itself rounds at ~1e-16 of it).
LOSS_LEVEL_RTOL = 1e-12


@dataclass
class MatchResult:
    """Result of :func:`match_backgrounds`.

    Attributes
    ----------
    coef : numpy.ndarray
        ``(N, M)`` background polynomial coefficients (the value ``match_lsq``
        returns): ``coef[n].reshape(D_x + 1, D_y + 1, ...)`` is the coefficient
        array of :func:`~jwst_wiimatch.core.polyval_nd` for image ``n`` in the
        coordinates ``X = C - eff_center``.
    degree : tuple of int
        Degree per coordinate, ``(x, y, ...)`` order.
    terms : {'tensor', 'total'}
        Which terms the polynomials have: ``'tensor'`` (all of
        ``coef[n].reshape(D_x + 1, ...)``) or ``'total'`` (those of total
        degree up to ``max(degree)``; the others are 0).
    eff_center : tuple of float
        Origin of the polynomial coordinates.
    coord_system : {'image', 'world'}
    npix : numpy.ndarray
        ``(N,)`` valid pixels of each image that overlap at least one other image.
    pair_npix : numpy.ndarray
        ``(N, N)`` number of pixels valid in both images of each pair.
    rms, rms_before : numpy.ndarray
        ``(N,)`` weighted RMS of ``(I_l - P_l) - (I_m - P_m)`` over all the
        overlaps of each image, after and before matching (NaN without overlap).
    components : list of list of int
        Connected groups of the overlap graph.
    isolated : list of int
        Images that overlap no other image (their coefficients are 0).
    undetermined : list of tuple
        ``(image, exponents)`` of coefficients the data do not determine
        (they were set to 0).
    basis_loss : float
        Largest difference, over a sample of the grid, between the fitted
        backgrounds and ``coef`` evaluated in float64 in the documented
        basis (rounding-level unless the center is far from the grid: then a
        :class:`MatchWarning` says how large it is).
    conventions : list of dict
        One per entry of ``components``: how the group's common polynomial
        was chosen. ``convention`` is ``'zero_sum'``, ``'lowest'``,
        ``'highest'``, ``'reference'`` or ``'isolated'`` (an image alone:
        coefficients 0); ``reference`` lists the images held at 0 (the
        lowest or highest image, or the group's reference images);
        ``level_shift`` is the constant added to match ``levels`` (None when
        none was given for the group, or without ``levels``).
    mean_background : numpy.ndarray, None
        ``(N,)`` mean of each image's zero-sum polynomial over its own valid
        pixels, by which ``'lowest'`` / ``'highest'`` chose (None when not
        computed).
    condition : list of float
        One per entry of ``components``: condition number of the system
        solved for the group (NaN for an image alone), see
        :attr:`jwst_wiimatch.core.solve.SolveInfo.condition`.
    diagnostics : jwst_wiimatch.core.diagnostics.FitDiagnostics
        Per pair, per image and per group: pixels, weighted residual RMS and
        normalised chi-square (1.0 = noise) before and after matching, and
        the groups' condition numbers.
    rejected : numpy.ndarray, None
        Robust matching (None without): ``(N,)`` pixels of each image left
        out of every pair that covers them (junk attributed to that image;
        where only two images overlap, a rejected pixel counts for both).
    pair_rejected : numpy.ndarray, None
        Robust matching: ``(N, N)`` pixels of each pair's overlap left out
        (weight 0); ``pair_npix`` still counts them.
    absurd : numpy.ndarray
        ``(N,)`` valid pixels left out as absurd values (see ``max_abs``);
        zeros without a cut.
    covariance : numpy.ndarray, None
        With ``covariance=True``: ``(N M, N M)`` covariance of ``coef.ravel()``
        (documented basis, image-major like ``coef``) propagated from the
        pixels' sigmas (1 where none were given) by the sandwich estimator,
        which accounts for pixels shared by several pairs; relative to each
        group's level convention (see ``docs/algorithm.rst``,
        "Uncertainties"). With robust matching, that of the last
        reweighted pass's fit (its rejections and weights). Zero between
        groups, for isolated images and for the ``undetermined`` terms.
    robust : dict, None
        Robust matching: ``method``, ``nsigma``, ``grow``, ``nclip``,
        ``passes`` (reweighted passes done), ``converged``, ``stride`` (of
        the start's lattice) and ``scale`` (per pair ``(l, m)``: the robust
        sigma of its normalised residuals; 1.0 when the sigmas are right).
    degree_scores : dict, None
        ``degree='auto'`` (None otherwise): the cross-validation that chose
        ``degree`` (see :func:`jwst_wiimatch.core.degree.choose_degree`):
        ``candidates``, ``score`` (held-out pair residual per pixel),
        ``stderr``, ``paired_stderr``, ``fold_scores``, ``nfolds``,
        ``block``, ``best``, ``chosen``.
    """

    coef: np.ndarray
    degree: tuple
    eff_center: tuple
    coord_system: str
    npix: np.ndarray
    pair_npix: np.ndarray
    rms: np.ndarray
    rms_before: np.ndarray
    components: list
    isolated: list
    undetermined: list
    frame: object = field(repr=False, default=None)
    moments: object = field(repr=False, default=None)
    basis_loss: float = 0.0
    conventions: list = field(default_factory=list)
    mean_background: np.ndarray = None
    condition: list = field(default_factory=list)
    diagnostics: object = field(repr=False, default=None)
    rejected: np.ndarray = None
    pair_rejected: np.ndarray = None
    absurd: np.ndarray = None
    robust: dict = None
    covariance: np.ndarray = None
    degree_scores: dict = None
    terms: str = "tensor"

    def equations(self):
        """The normal equations ``(a, b)`` in the documented (unscaled) basis."""
        return documented_equations(self.frame, self.moments, self.degree)


def documented_equations(frame, mom, degree):
    """Assemble ``(a, b)`` in the documented basis from moments in scaled coordinates."""
    mdeg = tuple(2 * d for d in degree)
    S = {k: moments_to_basis(v, mdeg, frame.shift, frame.scale) for k, v in mom.S.items()}
    T = {k: moments_to_basis(v, degree, frame.shift, frame.scale) for k, v in mom.T.items()}
    return assemble(mom.nimages, degree, S, T)


def _finite(mom):
    """Whether every pair sum is finite (weights can overflow with tiny sigmas)."""
    return all(np.all(np.isfinite(v)) for v in mom.S.values()) and \
        all(np.all(np.isfinite(v)) for v in mom.T.values())


def _residuals(mom, coef_u, degree):
    """Per-image weighted RMS of pair differences before and after matching."""
    n = mom.nimages
    idx = gram_index(degree)
    chi_b = np.zeros(n)
    chi_a = np.zeros(n)
    wsum = np.zeros(n)
    pair_npix = np.zeros((n, n), dtype=np.int64)
    for (l, m), s in mom.S.items():
        dc = coef_u[l] - coef_u[m]
        t = np.ravel(mom.T[(l, m)])
        after = mom.chi[(l, m)] - 2 * dc @ t + dc @ s[idx] @ dc
        w0 = float(np.ravel(s)[0])
        for i in (l, m):
            chi_b[i] += mom.chi[(l, m)]
            chi_a[i] += max(after, 0.0)
            wsum[i] += w0
        pair_npix[l, m] = pair_npix[m, l] = mom.npix[(l, m)]
    with np.errstate(invalid="ignore", divide="ignore"):
        rms_b = np.where(wsum > 0, np.sqrt(chi_b / wsum), np.nan)
        rms_a = np.where(wsum > 0, np.sqrt(chi_a / wsum), np.nan)
    return rms_a, rms_b, pair_npix


def _frame(shape, center, image2world, center_cs):
    """The coordinate frame of a grid of ``shape`` for the user's ``center`` arguments."""
    return make_frame(shape, check_center(center, len(shape)), image2world, center_cs)


def build_moments(images, masks, sigmas, degree, center=None, image2world=None,
                  center_cs="image", threads=None, origins=None, grid_shape=None,
                  client=None, robust=None, max_abs=None, solver="RLU", terms=None):
    """Check the inputs and accumulate the pair moments.

    With ``robust`` (a :class:`~jwst_wiimatch.core.robust.RobustOptions`) the
    moments are those of the last reweighted pass (see :mod:`.robust`);
    ``max_abs`` (without ``robust``) leaves out values beyond +-max_abs.
    ``terms`` (``'tensor'`` or ``'total'``) sets ``prob.terms``.

    Returns
    -------
    prob : jwst_wiimatch.core.inputs.Problem
    frame : jwst_wiimatch.core.coords.Frame
    moments : jwst_wiimatch.core.accumulate.PairMoments
    """
    prob = check_inputs(images, masks, sigmas, degree, origins=origins,
                        grid_shape=grid_shape)
    prob.terms = term_mask(prob.degree, terms)
    frame = _frame(prob.shape, center, image2world, center_cs)
    log.debug("accumulating %d images of shape %s, degree %s",
              len(prob.images), prob.shape, prob.degree)
    if robust is None and max_abs is not None:
        prob.limits = [(-float(max_abs), float(max_abs))] * len(prob.images)

    def moments():
        if robust is None:
            return accumulate(prob, frame, threads=threads, client=client)
        n = len(prob.images)
        tol = pinv_tol(prob.images[0].dtype) if solver == "PINV" else None

        def solve(S, T):
            a, b = assemble(n, prob.degree, S, T)
            return solve_system(a, b, n, method=solver, tol=tol, degree=prob.degree,
                                quiet=True, terms=prob.terms)[0]

        mom, info = robust_moments(
            prob, frame, robust,
            lambda rp: accumulate(prob, frame, threads=threads, client=client, robust=rp),
            solve, threads=threads if threads is not None else _n_threads())
        mom.robust = info
        return mom

    mom = moments()
    if prob.has_sigmas and (mom.sigma_out.any() or not _finite(mom)):
        # sigmas so small or large that their squares (or the sums of the
        # weights) leave float64: a common scale changes no result
        scale = common_sigma_scale(prob.sigmas, prob.masks)
        if scale != 1.0:
            log.debug("sigmas divided by %g so that their squares fit in float64", scale)
            prob.sigmas = [s / scale if isinstance(s, float) else s for s in prob.sigmas]
            prob.sigma_scale = scale
            mom = moments()
    out = np.flatnonzero(mom.sigma_out)
    if out.size:
        counts = ", ".join(f"images[{l}]: {mom.sigma_out[l]}" for l in out)
        warnings.warn(
            "pixels whose sigma is too small or too large (next to the other sigmas) "
            "for its square to be a float64 were left out of the fit "
            f"({counts}).", MatchWarning, stacklevel=4)
    if prob.has_sigmas:
        for l in np.flatnonzero(mom.image_npix == 0):
            why = sigma_unusable(int(l), prob.sigmas[l], prob.masks[l])
            if why:
                prob.unusable[int(l)] = why
    bad = np.flatnonzero(mom.nonfinite)
    if bad.size:
        counts = ", ".join(f"images[{l}]: {mom.nonfinite[l]}" for l in bad)
        warnings.warn(
            "pixels that the masks mark valid have NaN or infinite data or sigma and were "
            f"left out of the fit ({counts}).", MatchWarning, stacklevel=4)
    bad = np.flatnonzero(mom.absurd) if mom.absurd is not None else []
    if len(bad):
        counts = ", ".join(f"images[{l}]: {mom.absurd[l]}" for l in bad)
        warnings.warn(
            "pixels with absurd values (far beyond any value of their image, e.g. unflagged "
            f"fill values) were left out of the fit ({counts}).", MatchWarning, stacklevel=4)
    if mom.bad_coords:
        warnings.warn(
            f"image2world gave non-finite coordinates for {mom.bad_coords} valid pixel(s) "
            "(summed over images); they were left out of the fit.", MatchWarning, stacklevel=4)
    return prob, frame, mom


def match_backgrounds(images, masks=None, sigmas=None, degree=0, center=None,
                      image2world=None, center_cs="image", solver="RLU", threads=None,
                      origins=None, grid_shape=None, client=None, level="zero_sum",
                      reference=None, levels=None, robust=None, nsigma=4.0, grow=1,
                      nclip=3, max_abs=None, covariance=False, terms=None):
    """Match the backgrounds of images on one grid; full result with diagnostics.

    Takes the arguments of :func:`jwst_wiimatch.match.match_lsq` (without
    ``ext_return``) and returns a :class:`MatchResult`. See ``match_lsq`` for
    the meaning of the arguments. Images may also be given as *cutouts* of
    the common grid (``origins``): each image is then only the box of the
    grid it covers, which keeps memory proportional to the footprints.

    Images, masks and sigma arrays may also be *read by parts*: besides
    numpy arrays (memory-mapped ones included), any object with ``shape``,
    ``dtype`` and numpy-style slicing by a tuple of slices (a reader of
    your files, an h5py or zarr dataset, a dask array) is read block by
    block of the grid and never held whole, except transiently, one image
    at a time, for a few whole-image checks. Memory then stays a few blocks
    per image in flight plus the pair sums, whatever the number of images
    (see :class:`jwst_wiimatch.core.inputs.PartsArray`); the result is the
    one of the same values given as arrays.

    Parameters
    ----------
    threads : int, None
        Worker threads for the accumulation (default: CPU count, at most 4).
    origins : sequence of sequence of int, None
        Cutout input: ``origins[n]`` is the grid index, in numpy order, of
        ``images[n][0, 0, ...]``, i.e. image ``n`` is the part
        ``grid[o0:o0 + s0, o1:o1 + s1, ...]`` of the grid. Images may then
        differ in shape (same number of dimensions); each mask and sigma
        array has the shape of its image. Grid pixels outside an image's
        cutout are not valid for that image. The result is identical to the
        full-grid call with those pixels masked. ``center``, coordinates and
        ``image2world`` refer to the whole grid, as in the full-grid call.
    grid_shape : sequence of int, None
        Shape of the grid (numpy order) for cutout input; default: the
        smallest grid that holds every cutout. The default ``center`` is the
        middle of this grid.
    client : dask.distributed.Client, None
        Accumulate the pair sums as tasks on this dask cluster (the images,
        and ``image2world``, are sent to its workers); the result equals the
        local one.
    level : {'zero_sum', 'lowest', 'highest'}
        Which polynomial common to a connected group of images the solution
        carries (matching cannot tell): ``'zero_sum'`` (default, wiimatch's
        normalisation): every coefficient sums to 0 over the group;
        ``'lowest'`` (jwst skymatch's ``match_down=True``): the image whose
        background, the mean of its polynomial over its own valid pixels,
        is lowest keeps it (its coefficients are 0) and the others are
        fitted to it; ``'highest'`` (``match_down=False``): the same with
        the highest. See ``docs/algorithm.rst``, "Level conventions".
    reference : int or sequence of int, None
        Images held fixed: their coefficients are 0 and the other images of
        their groups are fitted to them (a constrained least-squares fit:
        their unknowns are dropped from the group's normal equations). A
        group without a reference image follows ``level``, with a
        :class:`MatchWarning` naming it.
    levels : sequence of float or None, None
        Absolute background level of each image at the center (``X = 0``),
        NaN or None where unknown. Each group's polynomials are shifted by
        one constant, chosen so that their values at the center agree with
        the given levels in the least-squares sense (the mean of the
        differences); the other terms follow ``level``. A group without a
        level is named in a :class:`MatchWarning`. Not with ``reference``.
    robust : {None, 'clip', 'huber', 'tukey'}
        Robust matching (see ``docs/algorithm.rst``, "Robust matching"):
        None (default): plain least squares, wiimatch's; otherwise a start
        from cell medians of the pair differences, then at most ``nclip``
        reweighted passes in which pixels whose normalised pair residual
        exceeds ``nsigma`` robust sigmas are left out with their
        neighbours within ``grow`` pixels, and the others weighted by 1
        (``'clip'``), Huber's or Tukey's weight. Rejections are reported
        (``rejected``, ``pair_rejected``, ``robust``).
    nsigma : float
        Rejection threshold, in robust sigmas of each pair's normalised
        residuals (robust matching only).
    grow : int
        Pixels around a rejected pixel also left out (robust matching only).
    nclip : int
        Most reweighted passes (robust matching only); they stop when the
        fit no longer changes the rejections.
    max_abs : float, None
        Values with ``|value| > max_abs`` are left out before any sum and
        counted (``absurd``). None: no cut without ``robust``; with
        ``robust``, values further than ``1e10`` spreads from their image's
        median (e.g. unflagged 1e30 fill values) are.
    covariance : bool
        Also compute :attr:`MatchResult.covariance` (one more pass over the
        pixels; default False: no cost, same results).
    terms : {None, 'tensor', 'total'}
        Which products of coordinate powers the polynomials have:
        ``'tensor'`` (wiimatch's): every ``x**i y**j ...`` with each
        exponent up to its axis' degree; ``'total'``: only those whose
        exponents sum to at most ``max(degree)`` (degree 1: the plane
        ``1, x, y``; degree 2: ``1, x, y, x**2, x*y, y**2``). The
        coefficient arrays keep the tensor shape, with zeros for the
        absent terms. None: ``'tensor'``, except with ``degree='auto'``,
        which then tries both kinds (see ``docs/algorithm.rst``, "Choosing
        the degree").

    Examples
    --------
    Two 3 x 3 cutouts of a 4 x 6 grid, overlapping over a 2 x 2 box:

    >>> import numpy as np
    >>> a = np.full((3, 3), 1.0)
    >>> b = np.full((3, 3), 3.0)
    >>> r = match_backgrounds([a, b], origins=[(0, 0), (1, 1)], grid_shape=(4, 6))
    >>> r.coef.ravel().round(12) + 0.0
    array([-1.,  1.])
    >>> int(r.pair_npix[0, 1])
    4

    Returns
    -------
    MatchResult
    """
    t0 = time.perf_counter()
    method = check_solver(solver)
    ropts = check_robust(robust, nsigma=nsigma, grow=grow, nclip=nclip, max_abs=max_abs)
    if max_abs is not None and not float(max_abs) > 0:
        raise ValueError(f"max_abs={max_abs!r} must be > 0 (or None).")
    degree_scores = None
    if is_auto(degree):  # cross-validated choice, see .degree
        degree, terms, degree_scores = _auto_degree(
            images, masks, sigmas, method, dict(
                center=center, image2world=image2world, center_cs=center_cs,
                threads=threads, origins=origins, grid_shape=grid_shape, client=client,
                robust=ropts, max_abs=max_abs, solver=method),
            None if terms is None else check_terms(terms))
    terms = check_terms(terms)
    prob, frame, mom = build_moments(images, masks, sigmas, degree, center=center,
                                     image2world=image2world, center_cs=center_cs,
                                     threads=threads, origins=origins,
                                     grid_shape=grid_shape, client=client, robust=ropts,
                                     max_abs=max_abs, solver=method, terms=terms)
    n = len(prob.images)
    level, refs, lev = check_level_args(level, reference, levels, n)
    a_u, b_u = assemble(n, prob.degree, mom.S, mom.T)
    tol = pinv_tol(prob.images[0].dtype) if method == "PINV" else None
    solve = dict(method=method, tol=tol, degree=prob.degree, reasons=prob.unusable,
                 terms=prob.terms)
    if level == "zero_sum" and refs is None:  # wiimatch's normalisation
        coef_u, info = solve_system(a_u, b_u, n, **solve)
        conventions = [{"convention": "zero_sum" if len(c) > 1 else "isolated",
                        "reference": [], "level_shift": None} for c in info.components]
        means = None
    else:
        coef_u, info, conventions, means = _solve_with_level(
            a_u, b_u, n, solve, level, refs, prob, frame)
    coef = coef_from_scaled(coef_u, prob.degree, frame.shift, frame.scale)
    if lev is not None:
        comps = [c for c in info.components if len(c) > 1]
        shifts = level_shifts(comps, coef, lev)
        for g, k in shifts.items():
            coef_u[comps[g], 0] += k
            coef[comps[g], 0] += k
        groups = [i for i, c in enumerate(info.components) if len(c) > 1]
        for g, k in shifts.items():
            conventions[groups[g]]["level_shift"] = k
    cov = None
    if covariance:
        cov = _covariance(prob, frame, a_u, info, conventions, lev,
                          robust_pass=mom.robust_pass if mom.robust is not None else None)
    loss = _check_basis_loss(coef_u, coef, prob.degree, frame)
    rms, rms_before, pair_npix = _residuals(mom, coef_u, prob.degree)
    diag = fit_diagnostics(mom, coef_u, prob.degree, info.components, info.condition,
                           info.undetermined, [c["reference"] for c in conventions],
                           sigma_scale=prob.sigma_scale, weighted=prob.has_sigmas,
                           rejected=mom.image_rejected if mom.robust else None,
                           pair_rejected=mom.rejected if mom.robust else None)
    log.debug("matched %d images (%d overlapping pairs) in %.3f s",
              n, len(mom.S), time.perf_counter() - t0)
    return MatchResult(
        coef=coef, degree=prob.degree, eff_center=frame.eff_center,
        coord_system=frame.coord_system, npix=mom.image_npix, pair_npix=pair_npix,
        rms=rms, rms_before=rms_before, components=info.components,
        isolated=info.isolated, undetermined=info.undetermined, frame=frame, moments=mom,
        basis_loss=loss, conventions=conventions, mean_background=means, covariance=cov,
        condition=list(info.condition), diagnostics=diag, degree_scores=degree_scores,
        terms=terms if prob.terms is not None else "tensor", **_rejections(mom, n))


def _auto_degree(images, masks, sigmas, method, kw, terms=None):
    """``degree='auto'``: ``(degree, terms, scores)`` chosen by :func:`.degree.choose_degree`."""
    tol = pinv_tol(_as_real_array(images[0], "images[0]").dtype) if method == "PINV" else None

    def moments_fn(fold_masks, deg):
        return build_moments(images, fold_masks, sigmas, deg, **kw)[2]

    def solve_fn(a, b, n, deg, mask=None):
        return solve_system(a, b, n, method=method, tol=tol, degree=deg, quiet=True,
                            terms=mask)[0]

    def frame_fn(shape):
        return _frame(shape, kw["center"], kw["image2world"], kw["center_cs"])

    return choose_degree(images, masks, sigmas, moments_fn=moments_fn, solve_fn=solve_fn,
                         origins=kw["origins"], grid_shape=kw["grid_shape"], terms=terms,
                         frame_fn=frame_fn)


def _covariance(prob, frame, a_u, info, conventions, lev, robust_pass=None):
    """:attr:`MatchResult.covariance` (see :mod:`.uncertainty`).

    ``a_u``: the normal matrix of the fit (with robust matching, the last
    pass's: its rejections and weights); ``robust_pass``: that pass (its
    weights are reproduced in ``Cov(b)``). The terms the solver set to 0
    (``info.undetermined``) have zero rows and columns.
    """
    fixed = {i for c in conventions for i in c["reference"]}
    lgroups = None
    if lev is not None:
        lgroups = []
        for c in info.components:
            known = [i for i in c if np.isfinite(lev[i])]
            if len(c) > 1 and known:
                lgroups.append((c, known))
    cov_b, _ = noise_covariance_b(prob, frame, robust=robust_pass)
    return coefficient_covariance(cov_b, a_u, len(prob.images),
                                  info.components, prob.degree, frame, fixed=fixed,
                                  level_groups=lgroups, sigma_scale=prob.sigma_scale,
                                  terms=prob.terms,
                                  zeroed=zeroed_terms(info.undetermined, prob.degree))


def _rejections(mom, n):
    """The robust-matching fields of :class:`MatchResult`."""
    absurd = np.zeros(n, dtype=np.int64) if mom.absurd is None else mom.absurd
    if mom.robust is None:
        return {"absurd": absurd}
    pair = np.zeros((n, n), dtype=np.int64)
    for (l, m), r in mom.rejected.items():
        pair[l, m] = pair[m, l] = r
    return {"absurd": absurd, "rejected": mom.image_rejected.copy(), "pair_rejected": pair,
            "robust": mom.robust}


def _solve_with_level(a_u, b_u, n, solve, level, refs, prob, frame):
    """Solve with reference images or the lowest / highest image of each group held at 0.

    Returns ``(coef_u, info, conventions, means)`` (see :class:`MatchResult`).
    """
    nterms = b_u.size // n
    comps = _components(a_u, n, nterms) if n > 1 else [[0]]
    fixed, conv, fallback = set(), [], []
    for comp in comps:
        held = [i for i in comp if refs is not None and i in refs]
        if len(comp) == 1:
            conv.append({"convention": "isolated", "reference": [], "level_shift": None})
        elif held:
            fixed.update(held)
            conv.append({"convention": "reference", "reference": held, "level_shift": None})
        else:
            if refs is not None:
                fallback.append(comp)
            conv.append({"convention": level, "reference": [], "level_shift": None})
    if fallback:
        desc = "; ".join("[" + ", ".join(str(i) for i in c) + "]" for c in fallback)
        warnings.warn(
            f"no reference image in the group(s) of images {desc}: their common level "
            f"follows level={level!r} instead.", MatchWarning, stacklevel=3)
    means = None
    extreme = [g for g, c in enumerate(conv) if c["convention"] in ("lowest", "highest")]
    if extreme:
        coef0, _ = solve_system(a_u, b_u, n, quiet=True, **solve)
        table = image_means(prob, frame)
        picks, means = pick_extreme([comps[g] for g in extreme], coef0, table,
                                    highest=level == "highest")
        for j, g in enumerate(extreme):
            conv[g]["reference"] = [picks[j]]
            fixed.add(picks[j])
    note = {"zero_sum": "with the sum of its coefficients set to 0",
            "lowest": "with the polynomial of its image of lowest background set to 0",
            "highest": "with the polynomial of its image of highest background set to 0"}
    if refs is not None:
        note = ("with the polynomials of its reference images set to 0 (groups without "
                f"one: {note[level]})")
    else:
        note = note[level]
    coef_u, info = solve_system(a_u, b_u, n, fixed=fixed, group_note=note, **solve)
    return coef_u, info, conv, means


def _check_basis_loss(coef_u, coef, degree, frame):
    """Warn when ``coef`` (documented basis) cannot hold the fit to float64 precision.

    The conversion itself is exact up to one rounding per coefficient; but
    with a center far from the grid, the polynomial written about the center
    has huge coefficients that cancel over the grid, and float64 numbers of
    that size cannot carry the cancelling digits. Measured by evaluating both
    forms on a sample of the grid (corners included). Returns the loss.
    """
    if not any(degree) or not np.any(coef_u):
        return 0.0
    loss, spread, level = basis_loss(coef_u, coef, degree, frame.shift, frame.scale,
                                     frame.sample_coords())
    if loss > max(LOSS_RTOL * spread, LOSS_LEVEL_RTOL * level):
        far = max(abs(s) / h for s, h in zip(frame.shift, frame.scale))
        warnings.warn(
            f"the coefficients cannot represent the fitted backgrounds to float64 "
            f"precision in the documented basis (polynomials about the center "
            f"{tuple(float(c) for c in frame.eff_center)}, which lies {far:.3g} "
            f"half-widths of the grid away from the grid's middle): evaluated in float64 "
            f"at a sample of the grid's pixels they differ from the fit by up to "
            f"{loss:.3g}, against a background "
            f"range of {spread:.3g} over the grid. Use a center on or near the grid "
            "(e.g. center=None) or a lower degree.", MatchWarning, stacklevel=3)
    return loss

