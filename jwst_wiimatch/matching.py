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
    ``skymatch`` takes in ``calwebb_image3``). The matching grid is laid out
    in the background frame itself: the tangent plane about the reference
    point, in cells ``binning`` input pixels wide. Each valid pixel of an
    exposure goes to the cell holding its centre, so a cell averages the same
    patch of sky in every exposure (inverse-variance weighted); pixel
    positions come from a lattice of WCS evaluations with bicubic
    interpolation (:class:`~jwst_wiimatch.models.frame.CoordinateLattice`),
    not from the WCS at every pixel. The members of an exposure group (the
    detectors of one exposure) share one polynomial.

Per-model work (reading, reducing, evaluating, subtracting) runs on
``threads`` worker threads, each borrowing its own models from the library,
so at most ``threads`` models are in flight. What each model is reduced to
(its matching image, or its cell sums) waits for the match in a scratch
file (:mod:`jwst_wiimatch.models.scratch`) that the engine reads by parts,
so memory does not grow with the number of models. Nothing here imports stpipe's
``Step``: the steps parse their parameters and call these functions.
"""

import contextlib
import gc
import itertools
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from .core import MatchWarning, match_backgrounds
from .core.accumulate import valid_box
from .core.binning import bin_image, weighted_mean
from .core.degree import candidate_name, is_auto
from .core.inputs import check_degree
from .core.poly import check_terms
from .core.poly import coef_from_scaled
from .core.robust import absurd_mask, source_mask
from .models import frame as fr
from . import report
from .models import boxread, pixels, records, scratch
from .models.library import (borrow_member, member_file, member_label, model_group_id,
                              open_member)

__all__ = ["Outcome", "MatchSummary", "LevelChoice", "match_models", "apply_outcomes", "map_models",
           "default_threads", "parse_degree"]

log = logging.getLogger(__name__)


def default_threads():
    """Worker threads for per-model work: the CPUs this process may use (at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _call_on_file(path, function, index, what=None, opener=None):
    """``function(model, index)`` on the model read from the file ``path``.

    ``opener(path, what)`` (default `open_member`) opens it, as a context
    manager. A file that cannot be read raises
    `~jwst_wiimatch.models.library.MemberError` naming ``what`` (default:
    ``'association member <index> (<file>)'``).
    """
    what = what or f"association member {index} ({os.path.basename(os.fspath(path))})"
    with (opener or open_member)(path, what) as model:
        return function(model, index)


def map_models(library, function, *, modify, threads=None, progress=None, client=None,
               read_only=False, opener=None):
    """``[function(model, index) for each model]``, on ``threads`` worker threads.

    Each worker borrows its model from ``library`` (an stpipe model library)
    and shelves it when done, so at most ``threads`` models are in flight
    (for an on-disk library, in memory). Results keep the library's order.
    With ``progress`` (a verb such as ``'read'``), every tenth of ten or more
    models is logged as ``wiimatch: read k/n models``. With a dask
    ``client`` and ``modify=False``, models that the library would read from
    files are read and processed by tasks on the cluster instead (the files
    must be visible to its workers). ``read_only=True`` promises that
    ``function`` changes nothing: models kept in files are then read from
    them directly, so that an in-memory library does not keep them.
    ``opener(path, what)`` (a context manager, default `open_member`) opens
    the models read from files (with ``read_only`` or on the cluster); e.g.
    `~jwst_wiimatch.models.boxread.open_boxed`, whose `BoxedMember` then
    reaches ``function`` in place of a model.
    """
    n = len(library)
    threads = default_threads() if threads is None else max(1, int(threads))
    done = itertools.count(1)
    every = max(1, n // 10)
    # models that the library would read from files, when nothing is kept:
    # read them where the work is done
    paths = [member_file(library, k) for k in range(n)] if not modify else [None] * n
    labels = [member_label(library, k) for k in range(n)]
    if client is not None:
        if n and all(paths):
            log.info("wiimatch: %d models to %s on the dask cluster", n, progress or "process")
            futures = client.map(_call_on_file, paths, [function] * n, range(n), labels,
                                 [opener] * n, pure=False)
            return client.gather(futures)
        log.info("wiimatch: models held in memory are processed here, not on the cluster")

    def one(index):
        try:
            if read_only and paths[index] is not None:
                return _call_on_file(paths[index], function, index, labels[index],
                                     opener)
            model = borrow_member(library, index)
            try:
                return function(model, index)
            finally:
                library.shelve(model, index, modify=modify)
        finally:
            # a datamodel holds reference cycles (asdf tree, WCS): free the
            # one just used now, not when the collector next runs
            gc.collect()
            k = next(done)
            if progress and n >= 10 and k % every == 0:
                log.info("wiimatch: %s %d/%d models", progress, k, n)

    # objects older than this run are left out of the per-model collections
    # (a full collection of a process that imported jwst takes 0.1 s)
    gc.freeze()
    try:
        with library:
            if threads == 1 or n < 2:
                return [one(k) for k in range(n)]
            # each worker's matrix products on one BLAS thread: BLAS threads
            # under every worker would oversubscribe the cores and busy-wait
            # (the lattice's products took three times as long); set before
            # the workers start, which is when they take the limit
            with threadpool_limits(limits=1, user_api="blas"), \
                    ThreadPoolExecutor(max_workers=min(threads, n)) as pool:
                return list(pool.map(one, range(n)))
    finally:
        gc.unfreeze()


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
    #: how the group's common level was chosen (``meta.wiimatch`` keys
    #: ``level_convention``, ``level_reference`` and ``level_shift``)
    level: dict = None
    #: fit diagnostics of the model's matching image (chi-square, pairs...):
    #: the ``meta.wiimatch`` fields of `jwst_wiimatch.report.model_fields`
    diagnostics: dict = None
    #: valid pixels left out as absurd values (e.g. unflagged fill values)
    absurd: int = 0
    #: valid pixels marked as sources or junk by source masking (``sources``
    #: of `match_models`); the matching cells holding them are left out
    sources: int = 0
    #: robust matching of the run (``meta.wiimatch`` keys ``robust``,
    #: ``robust_nsigma``, ``robust_grow``, ``robust_nclip``, ``robust_passes``,
    #: ``npix_absurd``); None: not recorded
    robust: dict = None
    #: ``(M, M)`` covariance of ``coefficients`` (None without ERR in every
    #: model: the noise is then unknown), see `jwst_wiimatch.core.uncertainty`
    covariance: np.ndarray = None

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
    #: the run's fit diagnostics (``fit``, ``images``, ``pairs``, ``groups``:
    #: see `jwst_wiimatch.report.engine_diagnostics`), None when nothing was solved
    diagnostics: dict = None
    #: the polynomials' terms: 'tensor' or 'total' (see `match_models`)
    terms: str = "tensor"


@dataclass
class _Reduced:
    """One model reduced to what matching needs."""

    name: str
    npix: int = 0
    has_err: bool = True
    err_note: str = None  # why the model has no usable ERR
    reason: str = None  # why the model has no cells, when not for lack of valid pixels
    origin: tuple = None
    data: np.ndarray = None  # weighted by ERR
    sigma: np.ndarray = None
    data_eq: np.ndarray = None  # equal weights per input pixel
    sigma_eq: np.ndarray = None
    cells: dict = None  # 'sky' kind: per-cell values and sky positions
    group_id: str = None  # the model's exposure (meta.group_id), when known
    absurd: int = 0  # valid pixels left out as absurd values
    sources: int = 0  # valid pixels marked as sources (their cells left out)


def _model_name(model, index):
    name = getattr(model.meta, "filename", None)
    return f"model {index} ({name})" if name else f"model {index}"


#: Why a model's ERR gives no weights, as said in the warning (see `pixels.err_status`).
_ERR_NOTES = {"missing": "has no ERR array",
              "not positive": "has an ERR array with no positive value (e.g. one filled "
                              "with zeros by default)"}


def _read_pixels(model, dqflags, name):
    """Data minus pending level, sigma (or None), mask, level, why no sigma (or None).

    Raises ValueError naming ``name`` when an array used (ERR, DQ, WHT /
    WEIGHTMAP) does not have the data's shape.
    """
    sigma = pixels.model_sigma(model, name)
    mask = pixels.valid_mask(model, dqflags, sigma=sigma, name=name)
    level = records.pending_level(model)
    note = _ERR_NOTES[pixels.err_status(model, name)] if sigma is None else None
    return np.asarray(model.data), sigma, mask, level, note


def _absurd_cut(data, mask, sigma, name, offset=None, grid_shape=None):
    """The mask without absurd values (e.g. unflagged 1e30 fill values), and their count.

    Always applied by the steps (whatever ``robust``): such a value cannot be
    data and would otherwise reach the sums, or a block average.
    """
    bad = absurd_mask(data, mask, sigma, offset=offset, grid_shape=grid_shape)
    if bad is None:
        return mask, 0
    count = int(np.count_nonzero(bad))
    log.warning("wiimatch: %s: %d valid pixel(s) with absurd values (further than 1e10 "
                "robust sigmas from the model's median, e.g. unflagged fill values) left "
                "out", name, count)
    return mask & ~bad, count


#: Pixels around a source pixel also marked (source masking).
SOURCE_GROW = 1


def _sources(data, mask, sigma, nsigma, red):
    """The model's source mask (None: none, or not asked); its count goes to ``red``."""
    if not nsigma or np.ndim(data) != 2:
        return None
    src = source_mask(data, mask, sigma, nsigma=float(nsigma), grow=SOURCE_GROW)
    if src is not None:
        red.sources = int(np.count_nonzero(src))
    return src


def _warn_equal_weights(notes):
    """Log that equal weights replace ERR weights, naming each model without a usable ERR."""
    log.warning("wiimatch: %s: all pixels of all models get equal weight (unit sigma) "
                "instead of 1/ERR**2", "; ".join(f"{n} {note}" for n, note in notes))


def _reduce_box(data, sigma, mask, level, box, binning, red, equal=False, src=None,
                offset=None):
    """Fill ``red`` with the model's cutout over ``box`` (binned when 2-D).

    ``box`` is on the grid; ``offset`` (default: zeros) is the grid index
    of ``data[0, ...]`` (and of the other arrays), when they are a box of
    the grid themselves.

    ``equal``: a block's value is the plain mean of its valid pixels (its
    sigma propagated from ERR), not the ERR-weighted mean. ERR weights
    within a block differ between exposures wherever ERR follows the data
    (Poisson noise of sources, each exposure sampling them at its own
    dither), so weighted block means of the same patch of sky differ by
    more than noise; plain means measure the same patch in every exposure.
    ``src`` (a mask of the model's shape, or None): blocks holding a marked
    pixel are left out (with ``binning=1``: the marked pixels).
    """
    offset = (0,) * len(box) if offset is None else offset
    sl = tuple(slice(a - o, b - o) for (a, b), o in zip(box, offset))
    d = data[sl]
    if level:
        d = d.astype(np.float64) - level
    m = mask[sl]
    s = None if sigma is None else sigma[sl]
    if src is not None and not (binning > 1 and d.ndim == 2):
        m = m & ~src[sl]
    if binning > 1 and d.ndim == 2:
        start = (box[0][0], box[1][0])
        mean_eq, sig_eq, _, origin = bin_image(d, None, m, binning, start)
        red.data_eq, red.sigma_eq, red.origin = mean_eq, sig_eq, origin
        if s is not None and equal:
            var_mean, _, count, _ = bin_image(np.square(s, dtype=np.float64), None,
                                              m & np.isfinite(s) & (s > 0), binning, start)
            with np.errstate(divide="ignore", invalid="ignore"):
                red.sigma = np.where(count > 0, np.sqrt(var_mean / np.maximum(count, 1)),
                                     0.0)
            red.data = mean_eq
        elif s is not None:
            red.data, red.sigma, _, _ = bin_image(d, s, m, binning, start)
        if src is not None:  # blocks holding a source pixel: not used
            hit = bin_image(np.zeros(m.shape), None, src[sl] & m, binning, start)[2] > 0
            for key in ("data_eq", "sigma_eq", "data", "sigma"):
                arr = getattr(red, key)
                if arr is not None:
                    arr = np.array(arr, dtype=np.float64)
                    arr[hit] = 0.0
                    setattr(red, key, arr)
    else:
        red.origin = tuple(a for a, _ in box)
        red.data_eq = np.where(m, d, 0.0) if not m.all() else np.asarray(d)
        if s is not None:
            red.data = red.data_eq
            with np.errstate(invalid="ignore"):
                red.sigma = np.where(m, s, 0.0)
            # sigma_eq is not kept (8 bytes per pixel of the box): `_eq_sigma`
            # derives it from sigma, 0 exactly where m is False
        else:
            red.sigma_eq = np.where(m, 1.0, 0.0)  # sigma 0: not used


def _eq_sigma(red):
    """The equal-weight sigmas of a reduced model: 1 where it is valid, 0 elsewhere.

    Kept when the model has no ERR; else derived from its sigma (0 where not
    valid, > 0 where valid) when asked, i.e. only when another model lacks ERR.
    """
    if red.sigma_eq is not None or red.sigma is None:
        return red.sigma_eq
    return scratch.positive_as_one(red.sigma)


def _spill(red, store):
    """Move ``red``'s matching images (or cell sums) into scratch files of ``store``.

    None: keep them in memory. Returns ``red``.
    """
    if store is None:
        return red
    done = {}
    for key in ("data_eq", "data", "sigma", "sigma_eq"):
        arr = getattr(red, key)
        if isinstance(arr, np.ndarray):
            if id(arr) not in done:  # data and data_eq may be one array
                done[id(arr)] = store.put(arr)
            setattr(red, key, done[id(arr)])
    if red.cells is not None:
        red.cells = {k: store.put(v) if isinstance(v, np.ndarray) else v
                     for k, v in red.cells.items()}
    return red


def _scratch(client):
    """A scratch store for the run's matching images (not with a dask cluster, whose
    workers may not see this machine's temporary directory: they stay in memory,
    as they do where no temporary directory can be made)."""
    if client is not None:
        return contextlib.nullcontext()
    try:
        return scratch.ScratchStore()
    except OSError as exc:
        log.warning("wiimatch: no scratch directory could be made in the system temporary "
                    "directory (%s); the models' matching images stay in memory (set "
                    "TMPDIR to a writable directory to keep memory bounded)", exc)
        return contextlib.nullcontext()


def _select_weights(reduced, usable, names):
    """ERR weights for all, or equal weights for all when a model has no ERR."""
    missing = [(names[k], reduced[k].err_note) for k in usable if not reduced[k].has_err]
    if missing:
        _warn_equal_weights(missing)
        return ([reduced[k].data_eq for k in usable], [_eq_sigma(reduced[k]) for k in usable])
    return [reduced[k].data for k in usable], [reduced[k].sigma for k in usable]


# ---------------------------------------------------------------------------
# models on one common grid
# ---------------------------------------------------------------------------
def _reduce_grid_model(model, index, dqflags, binning, checker, equal=False, sources=None):
    if isinstance(model, boxread.BoxedMember):
        return _reduce_grid_boxed(model, index, dqflags, binning, checker, equal=equal,
                                  sources=sources)
    name = _model_name(model, index)
    checker.check(model, name)
    data, sigma, mask, level, note = _read_pixels(model, dqflags, name)
    red = _Reduced(name=name, has_err=sigma is not None, err_note=note,
                   group_id=model_group_id(model))
    return _reduce_read(red, data, sigma, mask, level, binning, equal, sources)


def _reduce_read(red, data, sigma, mask, level, binning, equal, sources, offset=None,
                 shape=None):
    """Absurd-value cut, source masking and reduction of one model's pixels into ``red``.

    ``data`` (and ``sigma``, ``mask``) are the whole grid, or with
    ``offset`` the region of the grid of ``shape`` that starts there.
    """
    mask, red.absurd = _absurd_cut(data, mask, sigma, red.name, offset, shape)
    red.npix = int(np.count_nonzero(mask))
    box = valid_box(mask, mask.shape, (0,) * mask.ndim if offset is None else offset)
    src = _sources(data, mask, sigma, sources, red)
    if box is not None:
        _reduce_box(data, sigma, mask, level, box, binning, red, equal=equal, src=src,
                    offset=offset)
    return red


#: Margin and alignment (pixels) of the region read around a model's candidate box:
#: the tiles of source masking (`~jwst_wiimatch.core.robust.source_mask`: 16 x 16
#: pixel boxes aligned with the array, every 2nd pixel) stay those of the whole
#: grid, and so does its interpolation between tile centres within the box.
_BOX_MARGIN = 16


def _read_region(cand, shape):
    """The grid region read around candidate box ``cand``: aligned, one tile beyond."""
    t = _BOX_MARGIN
    return tuple((max(0, (a // t - 1) * t), min(n, (-(-b // t) + 1) * t))
                 for (a, b), n in zip(cand, shape))


def _boxed_err(member, region, model):
    """Sigma within ``region`` (None: no usable ERR) and why not, as `_read_pixels` says."""
    if not member.has("err"):
        return None, _ERR_NOTES["missing"]
    err = member.read("err", region)
    with np.errstate(invalid="ignore"):
        # whether the whole ERR holds a positive value: streamed only when
        # the region holds none
        positive = bool(np.any(err > 0)) or member.any_positive("err")
    sigma = pixels.sigma_from_err(err, model, positive=positive)
    return sigma, None if sigma is not None else _ERR_NOTES["not positive"]


def _reduce_grid_boxed(member, index, dqflags, binning, checker, equal=False, sources=None):
    """`_reduce_grid_model` of a FITS member read by box (identical result).

    One streamed pass finds the box outside which nothing can be valid
    (`~jwst_wiimatch.models.boxread.BoxedMember.candidate_box`); SCI, ERR,
    DQ and WHT are read within that box (plus an aligned margin) only, and
    the same validity rules, absurd-value cut and source masking are
    applied there.
    """
    model = member.model
    name = _model_name(model, index)
    checker.check(model, name)
    # the shapes of ERR, DQ and WHT: checked (and named) as when read whole
    pixels._get_array(model, "err", name)
    if dqflags is not None:
        pixels._get_array(model, "dq", name)
    pixels.weight_array(model, name)
    shape = member.shape
    level = records.pending_level(model)
    cand = member.candidate_box()
    region = _read_region(cand, shape) if cand is not None else ((0, 1), (0, 1))
    offset = tuple(a for a, _ in region)
    sigma, note = _boxed_err(member, region, model)
    red = _Reduced(name=name, has_err=sigma is not None, err_note=note,
                   group_id=model_group_id(model))
    if cand is None:
        return red
    data = member.read("data", region)
    dq = member.read("dq", region) if dqflags is not None else None
    mask = pixels.mask_from_arrays(data, sigma, dq, dqflags, member.read("wht", region))
    del dq
    return _reduce_read(red, data, sigma, mask, level, binning, equal, sources, offset, shape)


#: Cells along the shorter side of a grid or detector that binning keeps at least.
MIN_CELLS = 64


def _capped_binning(binning, shape, what):
    """``binning``, reduced (and logged) so that ``shape`` keeps >= MIN_CELLS cells a side."""
    cap = max(1, min(shape) // MIN_CELLS)
    if binning > cap:
        log.info("wiimatch: binning %d reduced to %d: %s is %dx%d pixels and keeps at "
                 "least %d cells per side", binning, cap, what, shape[-1], shape[-2],
                 MIN_CELLS)
        return cap
    return binning


def parse_degree(degree, ndim):
    """Degree per axis (xi, eta[, wavelength]) from an int, a list, or command-line text."""
    if is_auto(degree):  # chosen by cross-validation, see jwst_wiimatch.core.degree
        return "auto"
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
                f"degree={degree!r} is not an integer, a list of integers or 'auto'; "
                "give e.g. degree=1, degree=[1, 1] (one per axis: xi, eta[, "
                "wavelength]) or degree='auto' (chosen by cross-validation)"
            )
        value = nums if len(nums) > 1 else nums[0]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_degree(value, ndim)


@contextlib.contextmanager
def _first_model(library):
    """The library's first model, read from its file when it has one (so that an
    in-memory library does not start caching models), else borrowed. For
    metadata, WCS and shapes only: a FITS file's pixel arrays are not read."""
    path = member_file(library, 0)
    if path is not None:
        with boxread.open_metadata(path, member_label(library, 0)) as model:
            yield model
        return
    with library:
        model = borrow_member(library, 0)
        try:
            yield model
        finally:
            library.shelve(model, 0, modify=False)


def _grid_setup(library, degree, refpoint):
    """Grid checker, degree per axis, refpoint and lattice from the first model."""
    with _first_model(library) as model:
        name = _model_name(model, 0)
        checker = fr.GridChecker(model, name)
        _check_not_empty(checker.shape, name)
        ndim = len(checker.shape)
        degree = parse_degree(degree, ndim)
        ref = fr.check_refpoint(refpoint, ndim)
        if ref is None:
            ref = fr.default_refpoint(model)
        else:  # the grid is common: its samples on model 0 stand for every model
            fr.check_refpoint_distance(model, ref, name)
            if ndim == 3 and len(ref) == 2:
                ref = ref + [fr.default_refpoint(model)[2]]
        func = fr.frame_function(model.meta.wcs, ref)
        lattice = fr.model_lattice(model, ref) if ndim == 2 else None
    return checker, degree, ref, func, lattice


def _check_not_empty(shape, name):
    """ValueError naming ``name`` when its data have an axis of length 0."""
    if 0 in tuple(shape):
        raise ValueError(f"{name}: its data array has shape {tuple(shape)}, with an axis of "
                         "length 0: there are no pixels to match; check the file")


def _grid_groups(reduced, groups):
    """Exposure groups of the grid kind: lists of model indices sharing one polynomial.

    ``groups`` is a list of lists, ``'group_id'`` (models with the same
    ``meta.group_id``, or the same exposure by ``meta.observation``, share
    one; models without one stand alone) or None (each model alone).
    """
    if groups is None:
        return [[k] for k in range(len(reduced))]
    if groups != "group_id":
        return [list(g) for g in groups]
    by_id, out = {}, []
    for k, red in enumerate(reduced):
        if red.group_id is None:
            out.append([k])
        elif red.group_id in by_id:
            by_id[red.group_id].append(k)
        else:
            by_id[red.group_id] = [k]
            out.append(by_id[red.group_id])
    return out


def _combine_grid_group(members):
    """One matching image from a group's cutouts: inverse-variance means on their union box."""
    placed = [r for r in members if r.origin is not None]
    g = _Reduced(name=members[0].name, npix=sum(r.npix for r in members),
                 has_err=all(r.has_err for r in members),
                 err_note=next((r.err_note for r in members if not r.has_err), None))
    if not placed:
        g.reason = next((r.reason for r in members if r.reason), None)
        return g
    def sigmas(r, skey):
        return _eq_sigma(r) if skey == "sigma_eq" else r.sigma

    for dkey, skey in (("data_eq", "sigma_eq"), ("data", "sigma")):
        if any(sigmas(r, skey) is None for r in placed):
            continue
        parts = []
        for r in placed:
            sig = np.asarray(sigmas(r, skey), dtype=np.float64)
            with np.errstate(divide="ignore"):
                w = np.where(sig > 0, 1.0 / np.square(sig), 0.0)
            parts.append((r.origin, [w, w * np.asarray(getattr(r, dkey), dtype=np.float64)]))
        g.origin, (sw, swd) = _union_sums(parts)
        mean, sigma = weighted_mean(sw, swd)
        setattr(g, dkey, mean)
        setattr(g, skey, sigma)
    return g


def _match_grid(library, degree, refpoint, solver, dqflags, binning, threads, client,
                groups=None, level=None, robust=None, sources=None, terms=None):
    checker, degree, ref, func, lattice = _grid_setup(library, degree, refpoint)
    ndim = len(checker.shape)
    b = _capped_binning(binning, checker.shape, "the common grid") if ndim == 2 else 1
    if binning > 1 and ndim != 2:
        log.info("wiimatch: binning applies to 2-D images; cubes are matched per pixel")
    log.info("wiimatch: reading %d models (%s)", len(library),
             f"{b}x{b} blocks" if b > 1 else "every pixel")
    # the cutouts go to scratch files as soon as each model is reduced, and
    # the engine reads them by parts: memory does not grow with their number
    with _scratch(client) as store:
        def reduce(model, k):
            return _spill(_reduce_grid_model(model, k, dqflags, b, checker,
                                             equal=robust is not None, sources=sources), store)

        reduced = map_models(library, reduce, modify=False, threads=threads, progress="read",
                             client=client, read_only=True, opener=boxread.open_boxed)
        _log_scratch(store, "cutouts")
        grid_shape = tuple(-(-n // b) for n in checker.shape) if b > 1 else checker.shape
        groups = _grid_groups(reduced, groups)
        shared = [g for g in groups if len(g) > 1]
        if shared:
            log.info("wiimatch: %d groups of models share one polynomial each (same exposure): "
                     "%s", len(shared), "; ".join(
                         "[" + ", ".join(reduced[k].name for k in g) + "]" for g in shared))

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

        def engine(images, sigmas, origins, **level_args):
            nonlocal degree, terms
            res = match_backgrounds(
                images, masks=None, sigmas=sigmas, degree=degree, center=(0.0,) * ndim,
                image2world=image2world, center_cs="world", solver=solver, threads=threads,
                origins=origins, grid_shape=grid_shape, client=client, terms=terms,
                **level_args, **(robust or {}))
            degree, terms = res.degree, res.terms  # the chosen ones with degree='auto'
            return res

        diag = {}
        if not shared:
            outcomes, components = _solve(reduced, engine, lambda c: c, level=level, diag=diag)
        else:
            gred = [_spill(_combine_grid_group([reduced[k] for k in g]), store) for g in groups]
            outcomes, components = _spread(reduced, groups, *_solve(
                gred, engine, lambda c: c, level=level, members=groups, diag=diag))
        if is_auto(degree):  # nothing was matched: no degree was chosen
            degree = (0,) * ndim
        return outcomes, MatchSummary(degree=degree, refpoint=ref, frame=frame, binning=b,
                                      grid_shape=grid_shape, groups=components,
                                      diagnostics=diag or None, terms=check_terms(terms))


def _spread(reduced, groups, goutcomes, gcomponents):
    """Per-model outcomes and components from those of the exposure groups."""
    outcomes = [None] * len(reduced)
    for members, go in zip(groups, goutcomes):
        for k in members:
            outcomes[k] = Outcome(**{**go.__dict__, "name": reduced[k].name,
                                     "npix": reduced[k].npix, "absurd": reduced[k].absurd,
                                     "sources": reduced[k].sources})
    components = [sorted(k for j in comp for k in groups[j]) for comp in gcomponents]
    return outcomes, components


# ---------------------------------------------------------------------------
# calibrated exposures, each on its own detector grid
# ---------------------------------------------------------------------------
def _pixel_scale_deg(wcs, shape):
    """Angular size (degrees) of a pixel at the middle of a detector grid."""
    sky, _ = fr.pixel_steps(wcs, shape)
    return float(np.sqrt(sky[0] * sky[1]))


#: What to do about a calibrated exposure without a WCS.
_NO_WCS_SKY = ("the skymatch slot needs each calibrated exposure's own gwcs: run "
               "assign_wcs (calwebb_image2) on it first")


def _resampled_why(model):
    """Why a model looks resampled (an i2d rather than a cal exposure), or None."""
    try:
        if str(model.meta.cal_step.resample).upper() == "COMPLETE":
            return "meta.cal_step.resample is COMPLETE"
    except AttributeError:
        pass
    try:
        wht = model.wht
    except AttributeError:
        wht = None
    if wht is not None:
        return "it carries a WHT (resampling weight) array"
    return None


def _check_exposure(model, name):
    """The gwcs of a calibrated 2-D exposure; ValueError naming ``name`` for anything else."""
    why = _resampled_why(model)
    if why is not None:
        raise ValueError(
            f"{name} is already resampled ({why}): the skymatch slot (WiiMatchSkyStep, "
            "calwebb_image3_wiimatch) takes calibrated exposures on their own detector "
            "grids (cal or crf files); for resampled images that share one grid use "
            "WiiMatchStep (strun wiimatch)")
    shape = np.shape(model.data)
    if len(shape) != 2:
        raise ValueError(f"{name}: data is {len(shape)}-D; the skymatch slot takes 2-D "
                         "calibrated images")
    _check_not_empty(shape, name)
    return fr._get_wcs(model, name, fix=_NO_WCS_SKY)


def _sky_setup(library, refpoint, binning):
    """Reference point, cell size (degrees) and binning of the sky grid, from the first model.

    ``binning`` is reduced where the detector would have fewer than
    ``MIN_CELLS`` cells along its shorter side.
    """
    with _first_model(library) as model:
        name = _model_name(model, 0)
        wcs = _check_exposure(model, name)
        shape = np.shape(model.data)
        binning = _capped_binning(binning, shape, name)
        ref = fr.check_refpoint(refpoint, 2)
        if ref is None:
            ref = fr.default_refpoint(model)
        step = binning * _pixel_scale_deg(wcs, shape)
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"{name}: the WCS gives no pixel scale at the detector centre")
    return ref, step, binning


def _sky_cells(model, name, ref, step):
    """Sky-grid cell (x, y) of every pixel, from a lattice of WCS evaluations."""
    shape = np.shape(model.data)
    func = fr.frame_function(fr._get_wcs(model, name, fix=_NO_WCS_SKY), ref)
    lattice = fr.model_lattice(model, ref)
    if lattice is not None:
        xi, eta = lattice.box(slice(0, shape[0]), slice(0, shape[1]))
    else:  # pixels far from the reference point: the WCS at every pixel
        pix = np.indices(shape, dtype=np.float64)[::-1]
        xi, eta = (np.asarray(c).reshape(shape) for c in func(pix[0].ravel(), pix[1].ravel()))
    # floor(xi / step + 0.5), in place (xi and eta are this function's own
    # arrays): no full-detector temporaries
    xi, eta = (a if a.dtype == np.float64 and a.flags.writeable else
               np.array(a, dtype=np.float64) for a in (xi, eta))
    with np.errstate(invalid="ignore"):
        for a in (xi, eta):
            np.divide(a, step, out=a)
            a += 0.5
            np.floor(a, out=a)
    return xi, eta


def _reduce_sky_model(model, index, dqflags, ref, step, ref_given, sources=None):
    """Sums of one exposure's pixels over the cells of the sky grid that hold them.

    Every valid pixel goes to the cell that contains its centre, so a cell
    averages the same patch of sky in every exposure (up to the pixels on
    its border); the WCS is evaluated on a lattice only. An exposure too far
    from the reference point for its tangent plane is an error when the
    refpoint was given (``ref_given``), else it is skipped with that reason.
    """
    name = _model_name(model, index)
    wcs = _check_exposure(model, name)
    data, sigma, mask, level, note = _read_pixels(model, dqflags, name)
    mask, absurd = _absurd_cut(data, mask, sigma, name)
    red = _Reduced(name=name, has_err=sigma is not None, err_note=note,
                   npix=int(np.count_nonzero(mask)), absurd=absurd)
    if ref_given:
        fr.check_refpoint_distance(model, ref, name)
    else:
        problem = fr.refpoint_problem(wcs, data.shape, ref)
        if problem is not None:
            red.reason = (f"too far from the default refpoint (the centre of model 0): "
                          f"{problem}")
            return red
    if red.npix == 0:
        return red
    src = _sources(data, mask, sigma, sources, red)
    cx, cy = _sky_cells(model, name, ref, step)
    ok = mask & np.isfinite(cx) & np.isfinite(cy)
    if not ok.any():
        red.npix = 0
        return red
    cx, cy = cx[ok].astype(np.int64), cy[ok].astype(np.int64)
    d = data[ok].astype(np.float64) - level
    x0, y0 = int(cx.min()), int(cy.min())
    shape = (int(cy.max()) - y0 + 1, int(cx.max()) - x0 + 1)
    flat = (cy - y0) * shape[1] + (cx - x0)
    size = shape[0] * shape[1]
    # summed in float64, kept in float32 (relative 6e-8 of a cell's value):
    # these are held for every exposure until the solve
    sums = {"n": np.bincount(flat, minlength=size), "nd": np.bincount(flat, d, minlength=size)}
    if sigma is not None:
        var = np.square(sigma[ok], dtype=np.float64)
        v = np.bincount(flat, var, minlength=size)
        w = np.divide(1.0, var, out=var)  # (one array per pixel, not two)
        sums["w"] = np.bincount(flat, w, minlength=size)
        sums["wd"] = np.bincount(flat, w * d, minlength=size)
        sums["v"] = v
    if src is not None:  # cells holding a source pixel: not used
        hit = np.bincount(flat, src[ok], minlength=size) > 0
        for v in sums.values():
            v[hit] = 0
    red.cells = {"origin": (y0, x0), "shape": shape,
                 **{k: v.reshape(shape).astype(np.float32) for k, v in sums.items()}}
    return red


def _union_sums(parts):
    """Sum arrays placed at grid origins on the union of their boxes.

    ``parts``: ``[(origin, [array, ...]), ...]`` (every array of a part has
    the part's shape). Returns ``(origin, [sum, ...])``.
    """
    ndim = len(parts[0][0])
    lo = [min(o[a] for o, _ in parts) for a in range(ndim)]
    hi = [max(o[a] + arrs[0].shape[a] for o, arrs in parts) for a in range(ndim)]
    out = [np.zeros([h - l for l, h in zip(lo, hi)]) for _ in parts[0][1]]
    for origin, arrs in parts:
        sl = tuple(slice(origin[a] - lo[a], origin[a] - lo[a] + arrs[0].shape[a])
                   for a in range(ndim))
        for o, arr in zip(out, arrs):
            o[sl] += arr
    return tuple(lo), out


def _combine_cells(cells_list, keys):
    """Sum a group's cell sums on the union of their boxes: (origin, sums...)."""
    return _union_sums([(c["origin"], [c[k] for k in keys]) for c in cells_list])


def _log_scratch(store, what):
    if store is not None and store.nbytes:
        log.info("wiimatch: the models' %s (%.0f MB) wait in scratch files in %s until "
                 "the match is done", what, store.nbytes / 1e6, store.path)


def _match_sky(library, groups, degree, refpoint, solver, dqflags, binning, threads, client,
               level=None, robust=None, sources=None, terms=None):
    # each exposure's cell sums, then each group's matching image, wait in
    # scratch files (read back one group at a time, and by parts by the engine)
    with _scratch(client) as store:
        degree = parse_degree(degree, 2)
        ref, step, binning = _sky_setup(library, refpoint, binning)
        log.info("wiimatch: reading %d exposures onto a grid of %.3g arcsec cells (%d input "
                 "pixels) in the tangent plane about (%.6f, %.6f)", len(library), step * 3600,
                 binning, ref[0], ref[1])
        ref_given = refpoint is not None and fr.check_refpoint(refpoint, 2) is not None
        reduced = map_models(
            library, lambda m, k: _spill(_reduce_sky_model(m, k, dqflags, ref, step, ref_given,
                                                           sources=sources), store),
            modify=False, threads=threads, progress="read", client=client, read_only=True)
        _log_scratch(store, "cell sums")

        # ERR weights for all, or equal weights for all when an exposure has no ERR
        missing = [(r.name, r.err_note) for r in reduced if r.cells is not None and not r.has_err]
        if missing:
            _warn_equal_weights(missing)
        keys = ("n", "nd") if missing else ("w", "wd")
        if robust is not None and not missing:  # plain cell means (see _reduce_box)
            keys = ("n", "nd", "v")
        # one matching image per exposure group, on a grid whose cell (0, 0) is
        # the lowest cell any exposure reached; each exposure's sums are dropped
        # as soon as its group is built
        gred = []
        for members in groups:
            cells = [reduced[k].cells for k in members if reduced[k].cells is not None]
            g = _Reduced(name=reduced[members[0]].name,
                         npix=sum(reduced[k].npix for k in members), has_err=not missing)
            if cells:
                g.origin, sums = _combine_cells(cells, keys)
                if len(keys) == 3:
                    sn, snd, sv = sums
                    with np.errstate(divide="ignore", invalid="ignore"):
                        g.data = np.where(sn > 0, snd / np.maximum(sn, 1), 0.0)
                        sigma = np.where(sn > 0, np.sqrt(sv) / np.maximum(sn, 1), 0.0)
                else:
                    g.data, sigma = weighted_mean(*sums)
                g.sigma = sigma.astype(np.float32)
            else:
                g.reason = next((reduced[k].reason for k in members if reduced[k].reason), None)
            for k in members:
                reduced[k].cells = None
            gred.append(_spill(g, store))
        placed = [g for g in gred if g.origin is not None]
        gy0 = min((g.origin[0] for g in placed), default=0)
        gx0 = min((g.origin[1] for g in placed), default=0)
        for g in placed:
            g.origin = (g.origin[0] - gy0, g.origin[1] - gx0)
        grid_shape = (max((g.origin[0] + g.data.shape[0] for g in placed), default=1),
                      max((g.origin[1] + g.data.shape[1] for g in placed), default=1))
        center = (float(-gx0), float(-gy0))  # the reference point's cell, (x, y)
        log.info("wiimatch: matching %d exposure groups on a %dx%d grid", len(groups),
                 grid_shape[1], grid_shape[0])

        def engine(images, sigmas, origins, **level_args):
            nonlocal degree, terms
            res = match_backgrounds(images, masks=None, sigmas=sigmas, degree=degree,
                                    center=center, solver=solver, threads=threads,
                                    origins=origins, grid_shape=grid_shape, client=client,
                                    terms=terms, **level_args, **(robust or {}))
            degree, terms = res.degree, res.terms  # the chosen ones with degree='auto'
            return res

        def to_frame(coef):  # grid-cell units -> degrees of the tangent plane
            return coef_from_scaled(coef[None, :], degree, (0.0, 0.0), (step, step))[0]

        diag = {}
        outcomes, groups_models = _spread(reduced, groups, *_solve(
            gred, engine, to_frame, level=level, members=groups, diag=diag))
        if is_auto(degree):  # nothing was matched: no degree was chosen
            degree = (0, 0)
        return outcomes, MatchSummary(degree=degree, refpoint=ref, frame=fr.FRAME,
                                      binning=binning, grid_shape=grid_shape,
                                      groups=groups_models, diagnostics=diag or None)


# ---------------------------------------------------------------------------
# the solve, shared by both kinds
# ---------------------------------------------------------------------------
#: Names of the engine's level conventions in ``meta.wiimatch['level_convention']``.
_CONVENTION_NAMES = {"zero_sum": "zero_sum", "lowest": "match_down",
                     "highest": "match_up", "reference": "reference"}


@dataclass
class LevelChoice:
    """Which polynomial common to a group of overlapping models the results carry.

    Matching fixes backgrounds only up to one polynomial common to each
    connected group (see ``docs/step.rst``, "The level of the matched
    backgrounds").

    Attributes
    ----------
    match_down : bool, None
        jwst skymatch's ``match_down``: True: the model of lowest background
        (the mean of its zero-sum polynomial over its own valid pixels) keeps
        it, its polynomial 0; False: the highest; None: the zero sum.
    reference : list of int, None
        Models held fixed (polynomials 0); a group without one follows
        ``match_down`` (a warning names it).
    levels : list of float, None
        Per model, its absolute background at the refpoint (NaN: unknown):
        each group's constant is set to agree with them (least squares).
    """

    match_down: bool = None
    reference: list = None
    levels: list = None

    def engine_args(self, members):
        """Keyword arguments of ``match_backgrounds`` for images made of ``members``.

        ``members[j]``: the model indices that make engine image ``j`` (an
        exposure group shares one polynomial): it is a reference when one of
        them is; its level is the mean of its members' given levels.
        """
        level = {None: "zero_sum", True: "lowest", False: "highest"}[
            None if self.match_down is None else bool(self.match_down)]
        args = {"level": level}
        if self.reference:
            refs = set(self.reference)
            args["reference"] = [j for j, m in enumerate(members) if refs & set(m)]
            if not args["reference"]:  # no reference model can be matched
                args["reference"] = None
                args["no_reference"] = True
        if self.levels is not None:
            vals = []
            for m in members:
                given = [float(self.levels[k]) for k in m if np.isfinite(self.levels[k])]
                vals.append(float(np.mean(given)) if given else np.nan)
            args["levels"] = vals if np.isfinite(vals).any() else None
        return args


def _engine_level_args(level, members):
    """Engine keyword arguments of a `LevelChoice` (None: the engine's default)."""
    if level is None:
        return {}
    return level.engine_args(members)


def _record_levels(outcomes, usable, result, names, args):
    """Set each matched outcome's ``level`` from the engine's per-group conventions."""
    conventions = getattr(result, "conventions", None) or []
    for comp, conv in zip(result.components, conventions):
        models = [usable[j] for j in comp]
        if len(comp) > 1 and (args.get("reference") or args.get("no_reference")) \
                and conv["convention"] != "reference":
            log.warning("wiimatch: no reference model in the group [%s]: its common level "
                        "follows match_down=%s instead",
                        ", ".join(names[k] for k in models),
                        {"zero_sum": "None (zero sum)", "lowest": "True",
                         "highest": "False"}[conv["convention"]])
        if len(comp) > 1 and args.get("levels") is not None and conv["level_shift"] is None:
            log.warning("wiimatch: no level given for any model of the group [%s]: its "
                        "common level follows the convention %s",
                        ", ".join(names[k] for k in models),
                        _CONVENTION_NAMES.get(conv["convention"], conv["convention"]))
        for j, k in zip(comp, models):
            if not outcomes[k].matched:
                continue
            name = _CONVENTION_NAMES.get(conv["convention"], conv["convention"])
            info = {"level_convention": name,
                    "level_reference": bool(j in conv["reference"])}
            if conv.get("level_shift") is not None:
                info["level_convention"] = "levels"
                info["level_shift"] = float(conv["level_shift"])
            outcomes[k].level = info


def _robust_fields(result):
    """``meta.wiimatch`` fields saying how robust matching ran (``robust='none'`` without)."""
    info = getattr(result, "robust", None)
    if not info:
        return {"robust": "none"}
    return {"robust": info["method"], "robust_nsigma": float(info["nsigma"]),
            "robust_grow": int(info["grow"]), "robust_nclip": int(info["nclip"]),
            "robust_passes": int(info["passes"])}


def _degree_fields(result):
    """``meta.wiimatch['degree_choice']`` with ``degree='auto'`` (empty otherwise)."""
    info = getattr(result, "degree_scores", None)
    if not info:
        return {}
    log.info("wiimatch: degree='auto' chose degree %s (held-out pair residual per cell "
             "%s for degrees %s)", candidate_name(info["chosen"], info["chosen_terms"]),
             [round(v, 6) for v in info["score"]], info["labels"])
    return {"degree_choice": {k: (list(v) if isinstance(v, list) else v)
                              for k, v in info.items()}}


def _frame_covariance(cov, j, nimages, to_frame):
    """Image ``j``'s block of the engine's covariance, in the frame's basis."""
    m = cov.shape[0] // nimages
    block = cov[j * m:(j + 1) * m, j * m:(j + 1) * m]
    t = np.array([np.ravel(to_frame(e)) for e in np.eye(m)])  # linear map
    return t.T @ block @ t


def _solve(reduced, engine, to_frame, level=None, members=None, diag=None):
    """Run the engine on the usable reduced images; one Outcome per reduced image.

    ``level`` (a `LevelChoice`) chooses each group's common level;
    ``members[k]`` lists the models that make reduced image ``k`` (default:
    model ``k``). ``diag`` (a dict) receives the run's fit diagnostics.
    """
    n = len(reduced)
    names = [r.name for r in reduced]
    outcomes = [Outcome(name=r.name, npix=r.npix, absurd=r.absurd, sources=r.sources)
                for r in reduced]
    usable = [k for k in range(n) if reduced[k].origin is not None]
    for k in range(n):
        if k not in usable:
            outcomes[k].reason = reduced[k].reason or "no valid pixels (data/ERR/DQ/weight)"
    if len(usable) < 2:
        for k in usable:
            outcomes[k].reason = (f"fewer than two models with valid pixels "
                                  f"({len(usable)} of {n})")
        return outcomes, [[k] for k in usable]
    images, sigmas = _select_weights(reduced, usable, names)
    origins = [reduced[k].origin for k in usable]
    members = [[k] for k in range(n)] if members is None else members
    args = _engine_level_args(level, [members[k] for k in usable])
    errors = all(reduced[k].has_err for k in usable)  # else the noise is unknown
    with warnings.catch_warnings():
        # said below with model names
        warnings.filterwarnings("ignore", "no reference image in the group|no level was "
                                "given", MatchWarning)
        result = engine(images, sigmas, origins, covariance=errors,
                        **{k: v for k, v in args.items() if k != "no_reference"})
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
            o.robust = {**_robust_fields(result), **_degree_fields(result)}
            if result.covariance is not None:
                o.covariance = _frame_covariance(result.covariance, j, len(usable), to_frame)
    if level is not None:
        _record_levels(outcomes, usable, result, names, args)
    per_image, run = report.engine_diagnostics(
        result, usable, names, members, n, all(reduced[k].has_err for k in usable))
    for k, d in per_image.items():
        outcomes[k].diagnostics = d
    if diag is not None:
        diag.update(run)
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
                        "%s (set to 0: the overlaps carry no information on it)", names[k], expo)
    return outcomes, groups


def match_models(library, *, kind="grid", groups=None, degree=1, refpoint=None,
                 solver="RLU", dqbits=pixels.DEFAULT_DQBITS, binning=1, threads=None,
                 client=None, level=None, robust=None, sources=None, terms=None):
    """Match the backgrounds of the models of a library.

    Parameters
    ----------
    library : stpipe.library.AbstractModelLibrary
        The models (read one per worker thread at a time; never modified here).
    kind : {'grid', 'sky'}
        ``'grid'``: resampled models on one common grid; ``'sky'``:
        calibrated exposures on their own detector grids (see the module
        documentation).
    groups : list of list of int, 'group_id' or None
        Models that share one polynomial (exposure groups): lists of model
        indices, or (``'grid'`` kind) ``'group_id'``: models of one exposure
        (same ``meta.group_id``, else same ``meta.observation`` exposure) share
        one; default: each model alone.
    degree : int or tuple of int or 'auto'
        Polynomial degree per frame axis (xi, eta[, wavelength]); ``'auto'``:
        chosen by cross-validation on held-out overlap cells (recorded in
        ``meta.wiimatch['degree_choice']``, see ``docs/step.rst``).
    terms : {None, 'tensor', 'total'}
        The polynomials' terms (see :func:`jwst_wiimatch.core.match_backgrounds`):
        ``'tensor'`` (every product of powers up to each axis' degree) or
        ``'total'`` (total degree up to the degree: degree 1 is the plane
        ``1, xi, eta``); None: ``'tensor'``, and both tried with ``'auto'``.
    refpoint : sequence of float, None
        Reference point ``[ra, dec[, wavelength]]``; default: the centre of
        the grid (``'grid'``) or of the first model's detector (``'sky'``).
    solver : {'RLU', 'PINV'}
    dqbits : str, int, None
        Good DQ bits (see :func:`jwst_wiimatch.models.interpret_dqbits`).
    binning : int
        Block size, in input pixels, of the matching images (1: every pixel).
    threads : int, None
        Worker threads for per-model work and the engine (default: the CPUs).
    client : dask.distributed.Client, None
        Run the reading of models kept in files, and the engine's pair sums,
        as tasks on this dask cluster (see ``docs/performance.rst``).
    level : LevelChoice, None
        How the common level of each group of overlapping models is chosen
        (None: the zero sum, without recording it in the outcomes).
    robust : dict, None
        Robust matching: keyword arguments of
        :func:`jwst_wiimatch.core.match_backgrounds` (``robust``,
        ``nsigma``, ``grow``, ``nclip``), on the matching grid (cells of
        ``binning`` pixels); None: plain least squares. Absurd pixel values
        are left out (and counted) whatever this says. With robust matching,
        a block's value is the plain mean of its valid pixels (see
        `_reduce_box`).
    sources : float, None
        Source masking: in each 2-D model, pixels more than ``sources``
        times their ERR above the local background (medians of 32 x 32
        pixel boxes), and those within 2 pixels of them, are marked; the
        matching cells (blocks) holding them are left out of that model.
        None or 0: off.

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
    if terms is not None:
        terms = check_terms(terms)
    if kind == "grid":
        return _match_grid(library, degree, refpoint, solver, dqflags, binning, threads,
                           client, groups=groups, level=level, robust=robust,
                           sources=sources, terms=terms)
    if kind == "sky":
        if groups is None:
            groups = [[k] for k in range(len(library))]
        return _match_sky(library, groups, degree, refpoint, solver, dqflags, binning,
                          threads, client, level=level, robust=robust, sources=sources,
                          terms=terms)
    raise ValueError(f"kind={kind!r} must be 'grid' or 'sky'")


# ---------------------------------------------------------------------------
# writing results back
# ---------------------------------------------------------------------------
def _apply_one(model, outcome, summary, subtract, solver, dqbits, extra, cal_step,
               level_for_resample=False):
    if not outcome.matched:
        records.record_skipped(model, outcome.reason, frame=summary.frame, npix=outcome.npix,
                               cal_step=cal_step)
        log.warning("wiimatch: %s SKIPPED: %s", outcome.name, outcome.reason)
        return
    level = records.pending_level(model)
    records.record_result(
        model, degree=summary.degree, refpoint=summary.refpoint, terms=summary.terms,
        coefficients=outcome.coefficients, subtract=subtract, frame=summary.frame,
        npix=outcome.npix, rms=outcome.rms, rms_before=outcome.rms_before, level=level,
        solver=solver, dqbits=dqbits, undetermined=outcome.undetermined, cal_step=cal_step)
    if extra or outcome.level or outcome.diagnostics or outcome.robust:
        model.meta.wiimatch = {**model.meta.wiimatch.instance, **(extra or {}),
                               **(outcome.level or {}),
                               **report.model_fields(outcome.diagnostics),
                               **(outcome.robust or {}),
                               **({"npix_absurd": int(outcome.absurd),
                                   "npix_sources": int(outcome.sources)} if outcome.robust
                                  else {})}
    if outcome.covariance is not None:
        model.meta.wiimatch = {**model.meta.wiimatch.instance, **records.background_errors(
            model, summary.degree, summary.refpoint, outcome.covariance)}
    if subtract:
        entry = {"degree": list(summary.degree), "refpoint": summary.refpoint,
                 "coefficients": outcome.coefficients}
        mean = records.subtract_polynomial(model, entry, level=level)
        records.record_subtracted_level(model, mean)
    elif level_for_resample and model.meta.background.subtracted is False:
        entry = {"degree": list(summary.degree), "refpoint": summary.refpoint,
                 "coefficients": outcome.coefficients}
        records.record_pending_level(model, level + records.polynomial_mean(model, entry))


def apply_outcomes(library, outcomes, summary, *, subtract, solver, dqbits, threads=None,
                   extra=None, after=None, client=None, cal_step=None,
                   level_for_resample=False):
    """Record each model's outcome in its metadata and subtract it when asked.

    The polynomial is evaluated on each model's own pixels through its own
    WCS (from a lattice of WCS evaluations, see
    :class:`jwst_wiimatch.models.frame.CoordinateLattice`).

    Parameters
    ----------
    after : callable, None
        ``after(model, index)`` called on each updated model before it is
        shelved (e.g. to save it at once); the library is then not asked to
        keep the change (``modify=False``). Returns are collected in order.
    client : dask.distributed.Client, None
        With ``after``, models kept in files are updated (and saved by
        ``after``, which must then be picklable) by tasks on the cluster.
    cal_step : str, None
        Name of the jwst step this run stands in for (``'skymatch'`` in
        the skymatch slot): its ``meta.cal_step`` status (``S_SKYMAT``) is
        set too.
    level_for_resample : bool
        Without ``subtract``: set ``meta.background.level`` of each matched
        model whose background is not subtracted to its pending level plus
        the mean of its polynomial over its pixels, as jwst's skymatch
        records its levels, so that resample and outlier_detection subtract
        that constant (the skymatch slot).

    Returns
    -------
    list
        What ``after`` returned for each model (None without ``after``).
    """
    def one(model, k):
        _apply_one(model, outcomes[k], summary, subtract, solver, dqbits, extra, cal_step,
                   level_for_resample)
        return after(model, k) if after is not None else None

    return map_models(library, one, modify=after is None, threads=threads,
                      progress="updated", client=client if after is not None else None)
