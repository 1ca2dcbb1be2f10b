"""``match_models``: the one place where JWST models meet the matching engine.

Data flow, one way::

    models -> per-model reduction (valid pixels, sigma, the box they occupy,
    block averages) -> engine (cutouts of one grid) -> per-model outcomes
    -> records / subtraction (``apply_outcomes``)

Two kinds of input:

``'grid'``
    Resampled models that share one pixel grid (what ``WiiMatchStep``
    takes). Each model becomes the box of the grid its valid pixels occupy,
    averaged over ``binning x binning`` blocks of the grid (``binning=1``:
    the pixels themselves). The engine works in background-frame coordinates
    interpolated from a lattice of WCS evaluations.
``'sky'``
    Calibrated exposures, each on its own detector grid (what jwst's
    ``skymatch`` takes in ``calwebb_image3``). Each exposure is averaged over
    ``binning x binning`` blocks of detector pixels *before* any WCS work;
    the WCS is evaluated at the block centres only, which are placed on a
    grid laid out in the background frame itself (tangent plane about the
    reference point, cells ``binning`` input pixels wide). The members of an
    exposure group (detectors of one exposure) share one polynomial.

Per-model work (reading, reducing, evaluating, subtracting) runs on
``threads`` worker threads, each borrowing its own models from the library,
so at most ``threads`` models are in flight. Nothing here imports stpipe's
``Step``: the steps parse their parameters and call these functions.
"""

import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .core import match_backgrounds
from .core.binning import bin_image
from .core.inputs import check_degree
from .core.poly import coef_from_scaled
from .models import frame as fr
from .models import pixels, records

__all__ = ["Outcome", "MatchSummary", "match_models", "apply_outcomes", "map_models",
           "default_threads", "parse_degree"]

log = logging.getLogger(__name__)


def default_threads():
    """Worker threads for per-model work: the CPUs this process may use (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def map_models(library, function, *, modify, threads=None, progress=None):
    """``[function(model, index) for each model]``, on ``threads`` worker threads.

    Each worker borrows its model from ``library`` (an stpipe model library)
    and shelves it when done, so at most ``threads`` models are in flight
    (for an on-disk library, in memory). Results keep the library's order.
    With ``progress`` (a verb such as ``'read'``), every tenth of ten or more
    models is logged as ``wiimatch: read k/n models``.
    """
    n = len(library)
    threads = default_threads() if threads is None else max(1, int(threads))
    done = itertools.count(1)
    every = max(1, n // 10)

    def one(index):
        model = library.borrow(index)
        try:
            return function(model, index)
        finally:
            library.shelve(model, index, modify=modify)
            k = next(done)
            if progress and n >= 10 and k % every == 0:
                log.info("wiimatch: %s %d/%d models", progress, k, n)

    with library:
        if threads == 1 or n < 2:
            return [one(k) for k in range(n)]
        with ThreadPoolExecutor(max_workers=min(threads, n)) as pool:
            return list(pool.map(one, range(n)))


@dataclass
class Outcome:
    """What matching decided for one model."""

    name: str
    status: str = "SKIPPED"  # or "COMPLETE"
    reason: str = None
    coefficients: np.ndarray = None
    npix: int = 0  # valid input pixels of the model
    ncells: int = 0  # matching-grid cells of the model that overlap another model
    rms: float = np.nan
    rms_before: float = np.nan
    undetermined: list = field(default_factory=list)

    @property
    def matched(self):
        return self.status == "COMPLETE"


@dataclass
class MatchSummary:
    """Parameters and grid of one :func:`match_models` run."""

    degree: tuple
    refpoint: list
    frame: str
    binning: int
    grid_shape: tuple
    groups: list  # connected groups of the overlap graph, as lists of model indices


@dataclass
class _Reduced:
    """One model reduced to what matching needs."""

    name: str
    npix: int = 0
    level: float = 0.0
    has_err: bool = True
    origin: tuple = None
    data: np.ndarray = None  # weighted by ERR
    sigma: np.ndarray = None
    data_eq: np.ndarray = None  # equal weights per input pixel
    sigma_eq: np.ndarray = None
    cells: dict = None  # 'sky' kind: per-cell values and sky positions


def _model_name(model, index):
    name = getattr(model.meta, "filename", None)
    return f"model {index} ({name})" if name else f"model {index}"


def _valid_box(mask):
    rows = np.flatnonzero(mask.any(axis=tuple(range(1, mask.ndim))))
    if rows.size == 0:
        return None
    box = []
    for k in range(mask.ndim):
        others = tuple(i for i in range(mask.ndim) if i != k)
        hit = np.flatnonzero(mask.any(axis=others))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _read_pixels(model, dqflags):
    """Data minus pending level, sigma (or None), mask, level."""
    sigma = pixels.model_sigma(model)
    mask = pixels.valid_mask(model, dqflags, sigma=sigma)
    level = records.pending_level(model)
    return np.asarray(model.data), sigma, mask, level


def _reduce_box(data, sigma, mask, level, box, binning, red):
    """Fill ``red`` with the model's cutout over ``box`` (binned when 2-D)."""
    sl = tuple(slice(a, b) for a, b in box)
    d = data[sl]
    if level:
        d = d.astype(np.float64) - level
    m = mask[sl]
    s = None if sigma is None else sigma[sl]
    if binning > 1 and d.ndim == 2:
        start = (box[0][0], box[1][0])
        mean_eq, sig_eq, _, origin = bin_image(d, None, m, binning, start)
        red.data_eq, red.sigma_eq, red.origin = mean_eq, sig_eq, origin
        if s is not None:
            red.data, red.sigma, _, _ = bin_image(d, s, m, binning, start)
    else:
        red.origin = tuple(a for a, _ in box)
        valid = m.copy()
        red.data_eq = np.where(valid, d, 0.0) if not valid.all() else np.asarray(d)
        red.sigma_eq = np.where(valid, 1.0, 0.0)  # sigma 0: not used
        if s is not None:
            red.data = red.data_eq
            with np.errstate(invalid="ignore"):
                red.sigma = np.where(valid, s, 0.0)


def _select_weights(reduced, usable, names):
    """ERR weights for all, or equal weights for all when a model has no ERR."""
    missing = [names[k] for k in usable if not reduced[k].has_err]
    if missing:
        log.warning("no usable ERR array in %s: all pixels of all models get equal "
                    "weight", ", ".join(missing))
        return ([reduced[k].data_eq for k in usable], [reduced[k].sigma_eq for k in usable])
    return [reduced[k].data for k in usable], [reduced[k].sigma for k in usable]


# ---------------------------------------------------------------------------
# models on one common grid
# ---------------------------------------------------------------------------
def _reduce_grid_model(model, index, dqflags, binning, checker):
    name = _model_name(model, index)
    checker.check(model, name)
    data, sigma, mask, level = _read_pixels(model, dqflags)
    red = _Reduced(name=name, level=level, has_err=sigma is not None,
                   npix=int(np.count_nonzero(mask)))
    box = _valid_box(mask)
    if box is not None:
        _reduce_box(data, sigma, mask, level, box, binning, red)
    return red


def parse_degree(degree, ndim):
    """Degree per axis (xi, eta[, wavelength]) from an int, a list, or command-line text."""
    value = degree
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        value = ",".join(str(v) for v in value)
    if isinstance(value, str):
        parts = [p for p in value.strip().strip("[]()").replace(",", " ").split() if p]
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = None
        if not nums:
            raise ValueError(
                f"degree={degree!r} is not an integer or a list of integers; give "
                "e.g. degree=1 or degree=[1, 1] (one per axis: xi, eta[, wavelength])"
            )
        value = nums if len(nums) > 1 else nums[0]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_degree(value, ndim)


def _grid_setup(library, degree, refpoint):
    """Grid checker, degree per axis, refpoint and lattice from the first model."""
    with library:
        model = library.borrow(0)
        try:
            name = _model_name(model, 0)
            checker = fr.GridChecker(model, name)
            ndim = len(checker.shape)
            degree = parse_degree(degree, ndim)
            ref = fr.check_refpoint(refpoint, ndim)
            if ref is None:
                ref = fr.default_refpoint(model)
            elif ndim == 3 and len(ref) == 2:
                ref = ref + [fr.default_refpoint(model)[2]]
            func = fr.frame_function(model.meta.wcs, ref)
            lattice = fr.model_lattice(model, ref) if ndim == 2 else None
        finally:
            library.shelve(model, 0, modify=False)
    return checker, degree, ref, func, lattice


def _match_grid(library, degree, refpoint, solver, dqflags, binning, threads):
    checker, degree, ref, func, lattice = _grid_setup(library, degree, refpoint)
    ndim = len(checker.shape)
    b = binning if ndim == 2 else 1
    if binning > 1 and ndim != 2:
        log.info("wiimatch: binning applies to 2-D images; cubes are matched per pixel")
    log.info("wiimatch: reading %d models (%s)", len(library),
             f"{b}x{b} blocks" if b > 1 else "every pixel")
    reduced = map_models(library, lambda m, k: _reduce_grid_model(m, k, dqflags, b, checker),
                         modify=False, threads=threads, progress="read")
    grid_shape = tuple(-(-n // b) for n in checker.shape) if b > 1 else checker.shape

    if lattice is not None:
        def image2world(*pix):  # matching-grid cells -> frame coordinates
            x, y = (np.asarray(p, dtype=np.float64) * b + (b - 1) / 2.0 for p in pix)
            return lattice.points(x, y)
    elif b > 1:  # pragma: no cover - 2-D grids without a smooth frame
        def image2world(*pix):
            return func(*(np.asarray(p, dtype=np.float64) * b + (b - 1) / 2.0 for p in pix))
    else:
        image2world = func

    frame = fr.FRAME_CUBE if ndim == 3 else fr.FRAME

    def engine(images, sigmas, origins):
        return match_backgrounds(
            images, masks=None, sigmas=sigmas, degree=degree, center=(0.0,) * ndim,
            image2world=image2world, center_cs="world", solver=solver, threads=threads,
            origins=origins, grid_shape=grid_shape)

    outcomes, groups = _solve(reduced, engine, lambda c: c)
    return outcomes, MatchSummary(degree=degree, refpoint=ref, frame=frame, binning=b,
                                  grid_shape=grid_shape, groups=groups)


# ---------------------------------------------------------------------------
# calibrated exposures, each on its own detector grid
# ---------------------------------------------------------------------------
def _pixel_scale_deg(wcs, shape):
    """Angular size (degrees) of a pixel at the middle of a detector grid."""
    cy, cx = ((n - 1) / 2.0 for n in shape)
    ra, dec = fr._pixel_world(wcs, np.array([cx, cx + 1.0, cx]), np.array([cy, cy, cy + 1.0]))[:2]
    sep = fr._angsep(ra[0], dec[0], ra[1:], dec[1:])
    return float(np.sqrt(sep[0] * sep[1]))


#: Blocks along the shorter side of a detector that coarse matching keeps at least.
MIN_BLOCKS = 64


def effective_binning(binning, shape):
    """``binning``, capped so that a detector keeps >= ``MIN_BLOCKS`` blocks per side."""
    return max(1, min(int(binning), min(shape) // MIN_BLOCKS))


def _reduce_sky_model(model, index, dqflags, binning):
    name = _model_name(model, index)
    data, sigma, mask, level = _read_pixels(model, dqflags)
    if data.ndim != 2:
        raise ValueError(f"{name}: data is {data.ndim}-D; the skymatch slot takes 2-D "
                         "calibrated images")
    binning = effective_binning(binning, data.shape)
    red = _Reduced(name=name, level=level, has_err=sigma is not None,
                   npix=int(np.count_nonzero(mask)))
    if red.npix == 0:
        return red
    wcs = fr._get_wcs(model, name)
    d = data if not level else data.astype(np.float64) - level
    mean_eq, sig_eq, count, _ = bin_image(d, None, mask, binning)
    if sigma is not None:
        mean, sig, _, _ = bin_image(d, sigma, mask, binning)
    else:
        mean, sig = mean_eq, sig_eq
    iy, ix = np.nonzero(count)
    # block centres in detector pixels; the WCS is evaluated there only
    world = fr._pixel_world(wcs, ix * binning + (binning - 1) / 2.0,
                            iy * binning + (binning - 1) / 2.0)
    red.cells = {
        "ra": world[0], "dec": world[1],
        "w": 1.0 / sig[iy, ix] ** 2, "d": mean[iy, ix],
        "w_eq": 1.0 / sig_eq[iy, ix] ** 2, "d_eq": mean_eq[iy, ix],
        "scale": _pixel_scale_deg(wcs, data.shape) * binning,
    }
    return red


def _coverage_center(reduced):
    """(ra, dec) of the mean direction of every block of every exposure."""
    v = np.zeros(3)
    for r in reduced:
        if r.cells is None:
            continue
        ra, dec = np.radians(r.cells["ra"]), np.radians(r.cells["dec"])
        ok = np.isfinite(ra) & np.isfinite(dec)
        v += [np.sum(np.cos(dec[ok]) * np.cos(ra[ok])),
              np.sum(np.cos(dec[ok]) * np.sin(ra[ok])), np.sum(np.sin(dec[ok]))]
    ra0 = float(np.degrees(np.arctan2(v[1], v[0])) % 360.0)
    dec0 = float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))))
    return [ra0, dec0]


def _group_cutout(cells_list, x0, y0, step, weights):
    """Inverse-variance combination of a group's blocks on its box of the sky grid."""
    xs, ys, ws, wds = [], [], [], []
    for c in cells_list:
        ok = np.isfinite(c["xi"]) & np.isfinite(c["eta"])
        xs.append(np.rint((c["xi"][ok] - x0) / step).astype(np.int64))
        ys.append(np.rint((c["eta"][ok] - y0) / step).astype(np.int64))
        w = c["w_eq" if weights == "eq" else "w"][ok]
        ws.append(w)
        wds.append(w * c["d_eq" if weights == "eq" else "d"][ok])
    xs, ys = np.concatenate(xs), np.concatenate(ys)
    if xs.size == 0:
        return None, None, None
    bx, by = int(xs.min()), int(ys.min())
    shape = (int(ys.max()) - by + 1, int(xs.max()) - bx + 1)
    flat = (ys - by) * shape[1] + (xs - bx)
    sw = np.bincount(flat, np.concatenate(ws), minlength=shape[0] * shape[1])
    swd = np.bincount(flat, np.concatenate(wds), minlength=shape[0] * shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(sw > 0, swd / np.where(sw > 0, sw, 1.0), 0.0)
        sig = np.where(sw > 0, 1.0 / np.sqrt(np.where(sw > 0, sw, 1.0)), 0.0)
    return mean.reshape(shape), sig.reshape(shape), (by, bx)


def _match_sky(library, groups, degree, refpoint, solver, dqflags, binning, threads):
    degree = parse_degree(degree, 2)
    log.info("wiimatch: reducing %d exposures to %dx%d pixel blocks", len(library),
             binning, binning)
    reduced = map_models(library, lambda m, k: _reduce_sky_model(m, k, dqflags, binning),
                         modify=False, threads=threads, progress="read")
    ref = fr.check_refpoint(refpoint, 2)
    if ref is None:
        if not any(r.cells is not None for r in reduced):
            ref = [0.0, 0.0]
        else:
            ref = _coverage_center(reduced)
    scales = [r.cells["scale"] for r in reduced if r.cells is not None]
    step = min(scales) if scales else 1.0  # block size on the sky, degrees
    xi_lo = eta_lo = np.inf
    xi_hi = eta_hi = -np.inf
    for r in reduced:
        if r.cells is None:
            continue
        xi, eta = fr.tangent_plane(r.cells["ra"], r.cells["dec"], ref[0], ref[1])
        r.cells["xi"], r.cells["eta"] = xi, eta
        if np.any(np.isfinite(xi)):
            xi_lo, xi_hi = min(xi_lo, np.nanmin(xi)), max(xi_hi, np.nanmax(xi))
            eta_lo, eta_hi = min(eta_lo, np.nanmin(eta)), max(eta_hi, np.nanmax(eta))
    if not np.isfinite(xi_lo):
        xi_lo = eta_lo = 0.0
        xi_hi = eta_hi = 0.0
    # grid nodes every `step` degrees from (xi_lo, eta_lo); node (0, 0) is there
    grid_shape = (int(np.rint((eta_hi - eta_lo) / step)) + 1,
                  int(np.rint((xi_hi - xi_lo) / step)) + 1)
    log.info("wiimatch: matching on a %dx%d grid of %.3g arcsec cells in the tangent "
             "plane about (%.6f, %.6f)", grid_shape[1], grid_shape[0], step * 3600,
             ref[0], ref[1])

    # one matching image per exposure group
    gred = []
    for members in groups:
        cells = [reduced[k].cells for k in members if reduced[k].cells is not None]
        g = _Reduced(name=reduced[members[0]].name,
                     npix=sum(reduced[k].npix for k in members),
                     has_err=all(reduced[k].has_err for k in members))
        if cells:
            g.data_eq, g.sigma_eq, g.origin = _group_cutout(cells, xi_lo, eta_lo, step, "eq")
            g.data, g.sigma, _ = _group_cutout(cells, xi_lo, eta_lo, step, "err")
        gred.append(g)
    for r in reduced:
        r.cells = None

    center = (-xi_lo / step, -eta_lo / step)  # the reference point, in grid cells

    def engine(images, sigmas, origins):
        return match_backgrounds(images, masks=None, sigmas=sigmas, degree=degree,
                                 center=center, solver=solver, threads=threads,
                                 origins=origins, grid_shape=grid_shape)

    def to_frame(coef):  # grid-cell units -> degrees of the tangent plane
        return coef_from_scaled(coef[None, :], degree, (0.0, 0.0), (step, step))[0]

    goutcomes, ggroups = _solve(gred, engine, to_frame)
    outcomes = [None] * len(library)
    for members, go in zip(groups, goutcomes):
        for k in members:
            o = Outcome(**{**go.__dict__, "name": reduced[k].name, "npix": reduced[k].npix})
            outcomes[k] = o
    groups_models = [sorted(k for j in comp for k in groups[j]) for comp in ggroups]
    return outcomes, MatchSummary(degree=degree, refpoint=ref, frame=fr.FRAME,
                                  binning=binning, grid_shape=grid_shape,
                                  groups=groups_models)


# ---------------------------------------------------------------------------
# the solve, shared by both kinds
# ---------------------------------------------------------------------------
def _solve(reduced, engine, to_frame):
    """Run the engine on the usable reduced images; one Outcome per reduced image."""
    n = len(reduced)
    names = [r.name for r in reduced]
    outcomes = [Outcome(name=r.name, npix=r.npix) for r in reduced]
    usable = [k for k in range(n) if reduced[k].origin is not None]
    for k in range(n):
        if k not in usable:
            outcomes[k].reason = "no valid pixels (data/ERR/DQ/weight)"
    if len(usable) < 2:
        for k in usable:
            outcomes[k].reason = (f"fewer than two models with valid pixels "
                                  f"({len(usable)} of {n})")
        return outcomes, [[k] for k in usable]
    images, sigmas = _select_weights(reduced, usable, names)
    origins = [reduced[k].origin for k in usable]
    result = engine(images, sigmas, origins)
    for j, k in enumerate(usable):
        o = outcomes[k]
        if result.npix[j] == 0:
            o.reason = "no overlap with any other model"
        elif not np.all(np.isfinite(result.coef[j])):
            o.reason = "the solver gave no finite coefficients"
        else:
            o.status = "COMPLETE"
            o.coefficients = np.asarray(to_frame(np.asarray(result.coef[j], float)))
            o.ncells = int(result.npix[j])
            o.rms = float(result.rms[j])
            o.rms_before = float(result.rms_before[j])
            o.undetermined = [tuple(int(e) for e in t[1]) for t in result.undetermined
                              if t[0] == j]
    groups = [[usable[j] for j in comp] for comp in result.components]
    matched = [g for g in groups if any(outcomes[k].matched for k in g)]
    if len(matched) > 1:
        log.warning(
            "wiimatch: the models form %d groups that do not overlap each other; "
            "backgrounds are matched within each group only: %s", len(matched),
            "; ".join("[" + ", ".join(names[k] for k in g) + "]" for g in matched))
    for k in usable:
        for expo in outcomes[k].undetermined:
            log.warning("wiimatch: %s: the data do not determine the term with exponents "
                        "%s (set to a minimum-norm value)", names[k], expo)
    return outcomes, groups


def match_models(library, *, kind="grid", groups=None, degree=1, refpoint=None,
                 solver="RLU", dqbits=pixels.DEFAULT_DQBITS, binning=1, threads=None):
    """Match the backgrounds of the models of a library.

    Parameters
    ----------
    library : stpipe.library.AbstractModelLibrary
        The models (read one per worker thread at a time; never modified here).
    kind : {'grid', 'sky'}
        ``'grid'``: resampled models on one common grid; ``'sky'``:
        calibrated exposures on their own detector grids (see the module
        documentation).
    groups : list of list of int, None
        ``'sky'`` only: models that share one polynomial (exposure groups);
        default: each model alone.
    degree : int or tuple of int
        Polynomial degree per frame axis (xi, eta[, wavelength]).
    refpoint : sequence of float, None
        Reference point ``[ra, dec[, wavelength]]``; default: the grid centre
        (``'grid'``) or the centre of the exposures' coverage (``'sky'``).
    solver : {'RLU', 'PINV'}
    dqbits : str, int, None
        Good DQ bits (see :func:`jwst_wiimatch.models.interpret_dqbits`).
    binning : int
        Block size, in input pixels, of the matching images (1: every pixel).
    threads : int, None
        Worker threads for per-model work and the engine (default: the CPUs).

    Returns
    -------
    outcomes : list of Outcome
        One per model, in library order.
    summary : MatchSummary
    """
    dqflags = pixels.interpret_dqbits(dqbits)
    binning = int(binning)
    if binning < 1:
        raise ValueError(f"binning={binning} must be a positive integer (1: every pixel)")
    if len(library) == 0:
        raise ValueError("the input holds no models: give at least two")
    if kind == "grid":
        return _match_grid(library, degree, refpoint, solver, dqflags, binning, threads)
    if kind == "sky":
        if groups is None:
            groups = [[k] for k in range(len(library))]
        return _match_sky(library, groups, degree, refpoint, solver, dqflags, binning,
                          threads)
    raise ValueError(f"kind={kind!r} must be 'grid' or 'sky'")


# ---------------------------------------------------------------------------
# writing results back
# ---------------------------------------------------------------------------
def _apply_one(model, outcome, summary, subtract, solver, dqbits, extra):
    if not outcome.matched:
        records.record_skipped(model, outcome.reason, frame=summary.frame, npix=outcome.npix)
        log.warning("wiimatch: %s SKIPPED: %s", outcome.name, outcome.reason)
        return
    level = records.pending_level(model)
    records.record_result(
        model, degree=summary.degree, refpoint=summary.refpoint,
        coefficients=outcome.coefficients, subtract=subtract, frame=summary.frame,
        npix=outcome.npix, rms=outcome.rms, rms_before=outcome.rms_before, level=level,
        solver=solver, dqbits=dqbits, undetermined=outcome.undetermined)
    if extra:
        model.meta.wiimatch = {**model.meta.wiimatch.instance, **extra}
    if subtract:
        entry = {"degree": list(summary.degree), "refpoint": summary.refpoint,
                 "coefficients": outcome.coefficients}
        records.subtract_background(model, records.evaluate_background(model, entry),
                                    level=level)


def apply_outcomes(library, outcomes, summary, *, subtract, solver, dqbits, threads=None,
                   extra=None):
    """Record each model's outcome in its metadata and subtract it when asked.

    The polynomial is evaluated on each model's own pixels through its own
    WCS (from a lattice of WCS evaluations, see
    :class:`jwst_wiimatch.models.frame.CoordinateLattice`).
    """
    map_models(library,
               lambda m, k: _apply_one(m, outcomes[k], summary, subtract, solver, dqbits,
                                       extra),
               modify=True, threads=threads, progress="updated")
