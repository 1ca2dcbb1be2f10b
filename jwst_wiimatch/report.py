"""Diagnostics of a matching run for people: metadata, log, JSON report and PNG report.

The numbers come from the engine (:mod:`jwst_wiimatch.core.diagnostics`):
per overlapping pair and per matching image (a model, or an exposure group
sharing one polynomial) the pixels used (and rejected by robust matching,
when it reports them), the weighted residual RMS before and after matching
and the normalised chi-square (1.0 = the residuals are the noise ERR
describes); per connected group of the overlap graph its degrees of freedom
and the condition number of its solved system.

This module turns them into

* the per-model entries of ``meta.wiimatch`` (`model_fields`);
* log lines and a warning when the fit's chi-square is far from 1, saying
  what that likely means (`log_diagnostics`, `assess_chi2`);
* the JSON report (`build_report`, `write_json`), written through a
  temporary name and ``os.replace``;
* with matplotlib installed (``pip install "jwst-wiimatch[plot]"``), a PNG
  report (`mosaic_sums`, `write_png`): the mosaic before and after matching,
  each exposure's fitted background, the map of the residual scatter
  between overlapping models, and the pair graph coloured by each pair's
  chi-square. matplotlib is imported only here, only when a PNG is drawn.

See ``docs/step.rst``, "Diagnostics and the report".
"""

import contextlib
import datetime
import importlib.util
import json
import logging
import os
import threading
import uuid

import numpy as np

__all__ = ["CHI2_LIMITS", "REPORT_FORMAT", "assess_chi2", "build_report",
           "engine_diagnostics", "has_matplotlib", "log_diagnostics", "model_fields",
           "mosaic_sums", "report_paths", "write_json", "write_png"]

log = logging.getLogger(__name__)

#: ``format`` of the JSON report; ``version`` grows when its layout changes.
REPORT_FORMAT = "jwst_wiimatch.report"
REPORT_VERSION = 1

#: A fit whose normalised chi-square lies outside ``(low, high)`` (widened
#: to its statistical scatter) is reported with a warning; the limits
#: depend on whether the matching images are pixels (``binning=1``) or
#: block means (``binning > 1``). Measured on the generators of
#: ``benchmarks/junk_data.py`` (``tests/test_report.py`` checks them):
#:
#: * independent noise, right ERR: 0.99 at any binning; ERR twice too large
#:   0.25, twice too small 4.0;
#: * noise correlated by resampling (bilinear, the sky cases), ERR propagated
#:   with the squared weights (right per pixel): 1.00 per pixel, 1.66 on 2x2
#:   and 2.05 on 4x4 block means (a block mean's ERR assumes independent
#:   pixels);
#: * the same with ERR as jwst's resample propagates it (the error drizzled
#:   like the data, so it keeps the input pixels' noise): 0.42 per pixel,
#:   0.68 on 2x2, 0.83 on 4x4, 0.91 on 8x8 block means;
#: * unflagged junk in one of five exposures (256 px grid): an extended
#:   +8 sigma transient 1.16 per pixel (3.3 on 4x4 blocks), a 3 px trail 4.7
#:   (34), cosmic-ray residue 157; the real-sky field's resampling residue
#:   1.8 (6.4 on 4x4 blocks).
CHI2_LIMITS = {"pixels": (0.3, 1.5), "blocks": (0.5, 3.0)}


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def has_matplotlib():
    """Whether matplotlib can be imported (the PNG report needs it)."""
    return importlib.util.find_spec("matplotlib") is not None


# ---------------------------------------------------------------------------
# from the engine's result to per-image and per-run records
# ---------------------------------------------------------------------------
def engine_diagnostics(result, usable, names, members, n, weighted):
    """Per-model metadata fields and the run's diagnostics from an engine result.

    Parameters
    ----------
    result : jwst_wiimatch.core.MatchResult
    usable : list of int
        Matching image (index in ``0..n-1``) of each engine image.
    names : list of str
        Name of every matching image.
    members : list of list of int
        Models making each matching image.
    n : int
        Number of matching images.
    weighted : bool
        Whether the weights come from ERR (else: equal weights).

    Returns
    -------
    per_image : dict
        ``{matching image: dict}`` of the fields that go into each of its
        models' ``meta.wiimatch`` (`model_fields`).
    run : dict
        The run's diagnostics: ``fit``, ``images``, ``pairs``, ``groups``
        (the layout of the JSON report's sections of those names).
    """
    diag = result.diagnostics
    d = diag.as_dict()
    group_of = {}
    for g, comp in enumerate(result.components):
        for j in comp:
            group_of[j] = g
    images = []
    for k in range(n):
        images.append({"index": k, "name": names[k], "models": list(members[k]),
                       "matched": False, "npix": 0, "rejected": None, "rms_before": None,
                       "rms": None, "chi2_before": None, "chi2": None, "dof": 0.0,
                       "group": None})
    for j, k in enumerate(usable):
        images[k].update(d["images"][j], group=group_of.get(j))
        images[k]["rejected"] = _rejected(images[k]["rejected"])
        images[k]["matched"] = bool(result.npix[j] > 0
                                    and np.all(np.isfinite(result.coef[j])))
    pairs = []
    for p in d["pairs"]:
        a, b = (usable[j] for j in p["images"])
        pairs.append({**p, "images": [a, b], "models": [list(members[a]), list(members[b])],
                      "rejected": _rejected(p["rejected"])})
    groups = []
    for g, gs in enumerate(d["groups"]):
        imgs = [usable[j] for j in gs["images"]]
        groups.append({"index": g, **gs, "images": imgs,
                       "models": sorted(k for i in imgs for k in members[i])})
    fit = {**d["fit"], "weights": "err" if weighted else "equal",
           "rejected": _rejected(d["fit"]["rejected"])}
    fit["weighted"] = bool(weighted and d["fit"]["weighted"])
    run = {"fit": fit, "images": images, "pairs": pairs, "groups": groups}

    per_image = {}
    for j, k in enumerate(usable):
        mine = []
        for p in pairs:
            if k in p["images"]:
                other = p["images"][1] if p["images"][0] == k else p["images"][0]
                mine.append({"with": names[other], "npix": p["npix"],
                             "rejected": p["rejected"], "rms_before": p["rms_before"],
                             "rms": p["rms"], "chi2": p["chi2"]})
        g = group_of.get(j)
        per_image[k] = {
            "chi2": images[k]["chi2"], "chi2_before": images[k]["chi2_before"],
            "dof": images[k]["dof"], "rejected": images[k]["rejected"],
            "fit_chi2": _num(fit["chi2"]), "weights": fit["weights"],
            "group": g, "condition": None if g is None else groups[g]["condition"],
            "pairs": mine}
    return per_image, run


def model_fields(diagnostics):
    """The ``meta.wiimatch`` fields of one model from its `engine_diagnostics` entry.

    ``chi2`` (normalised chi-square of the model's pairs after matching, 1.0
    = noise), ``chi2_before``, ``dof``, ``npix_rejected`` (None: not
    reported), ``fit_chi2`` (the whole fit's), ``weights`` (``'err'`` or
    ``'equal'``), ``group`` and ``condition`` (its group of the overlap graph
    and that group's condition number) and ``pairs``: one dict per
    overlapping model (or exposure group) ``{with, npix, rejected,
    rms_before, rms, chi2}``. Rejected counts are 0 when nothing was
    rejected (robust matching off); a value that is undefined (a NaN
    chi-square) is None, which a saved model leaves out.
    """
    if not diagnostics:
        return {}
    out = dict(diagnostics)
    out["npix_rejected"] = out.pop("rejected")
    out["pairs"] = [dict(p) for p in out["pairs"]]
    return out


def _rejected(value):
    """Rejected pixels as recorded: 0 when the engine reported none (nothing rejected)."""
    return 0 if value is None else int(value)


# ---------------------------------------------------------------------------
# judging the chi-square
# ---------------------------------------------------------------------------
def assess_chi2(chi2, dof, weighted=True, binning=1):
    """What a fit's normalised chi-square says: ``(verdict, message)``.

    ``verdict`` is ``'ok'``, ``'high'``, ``'low'``, ``'unweighted'`` (no ERR:
    the chi-square is not a test of the noise) or ``'none'`` (no overlap);
    ``message`` says what it likely means (None for ``'ok'``). The limits
    are `CHI2_LIMITS` (``'pixels'`` for ``binning=1``, else ``'blocks'``),
    widened to 5 times the statistical scatter ``sqrt(2 / dof)`` for small
    fits.
    """
    if chi2 is None or not np.isfinite(chi2) or not dof > 0:
        return "none", None
    if not weighted:
        return "unweighted", (
            f"normalised chi-square {chi2:.3g} is in units of equal weights (a model has "
            "no usable ERR), not a test of the noise")
    spread = 5.0 * np.sqrt(2.0 / dof)
    low, high = CHI2_LIMITS["pixels" if binning <= 1 else "blocks"]
    hi = max(high, 1.0 + spread)
    lo = min(low, max(0.0, 1.0 - spread))
    ratio = np.sqrt(chi2)
    if chi2 > hi:
        msg = (f"normalised chi-square of the fit is {chi2:.3g} (1.0 = noise): the residuals "
               f"of overlapping models are {ratio:.3g} times what ERR says. Likely: sources "
               "or junk that do not cancel between exposures (unflagged cosmic rays, "
               "trails, persistence, residue of bright sources sampled differently), an ERR "
               "too small (a wrong scale, missing noise terms), or a degree too low for the "
               "backgrounds' shape. Look at the pairs of largest chi2 in meta.wiimatch or "
               "the report")
        if binning > 1:
            msg += (f"; with binning={binning}, noise correlated between neighbouring "
                    "pixels (resampling) also makes block means noisier than their ERR says "
                    "(up to chi2 ~2 from that alone)")
        return "high", msg
    if chi2 < lo:
        return "low", (
            f"normalised chi-square of the fit is {chi2:.3g} (1.0 = noise): the residuals "
            f"of overlapping models are {ratio:.3g} times what ERR says. Likely: ERR "
            "overestimated (a wrong scale or units), or noise smoothed by resampling "
            "(drizzle, interpolation) while ERR keeps the input pixels' noise (jwst's "
            "resample does: expect ~0.4 per pixel, ~0.8 with binning=4), or a bias "
            "in ERR's model; this much is not expected")
    return "ok", None


def log_diagnostics(outcomes, summary):
    """Log the groups' condition numbers, the worst pairs and the chi-square verdict."""
    run = getattr(summary, "diagnostics", None)
    if not run or not run.get("fit"):
        return
    fit = run["fit"]
    groups = [g for g in run["groups"] if len(g["images"]) > 1]
    names = {im["index"]: im["name"] for im in run["images"]}
    if groups:
        log.info("wiimatch: fit chi2 %s over %d dof (%s weights); %d group(s) of the "
                 "overlap graph, condition %s", _fmt(fit["chi2"]), int(fit["dof"]),
                 fit["weights"], len(groups),
                 ", ".join(_fmt(g["condition"]) for g in groups))
    worst = sorted((p for p in run["pairs"] if p["chi2"] is not None),
                   key=lambda p: -p["chi2"])[:3]
    if worst:
        log.info("wiimatch: pairs of largest chi2: %s", "; ".join(
            f"{names[p['images'][0]]} - {names[p['images'][1]]}: chi2 {_fmt(p['chi2'])}, "
            f"rms {_fmt(p['rms'])}, {p['npix']} pixels" for p in worst))
    verdict, msg = assess_chi2(fit["chi2"], fit["dof"], fit["weighted"],
                               getattr(summary, "binning", 1))
    if verdict in ("high", "low"):
        log.warning("wiimatch: %s", msg)
    elif verdict == "unweighted":
        log.info("wiimatch: %s", msg)


def _fmt(x):
    return "n/a" if x is None else f"{x:.4g}"


# ---------------------------------------------------------------------------
# the JSON report
# ---------------------------------------------------------------------------
def report_paths(report, output_dir=None):
    """``(json_path, png_path)`` of the ``report`` parameter.

    ``report`` is the JSON file's path; ``.json`` is appended when it has
    another extension or none. A relative path is taken in ``output_dir``
    (when set), like the step's outputs. The PNG lies beside it, with the
    extension ``.png``. Raises ValueError naming ``report`` when its folder
    does not exist or is not writable, or when it is a folder.
    """
    text = os.fspath(report).strip()
    if not text:
        raise ValueError("report='': give a file name for the JSON report, e.g. "
                         "report=wiimatch_report.json (or leave it unset)")
    if not text.lower().endswith(".json"):
        text += ".json"
    if not os.path.isabs(text) and output_dir:
        text = os.path.join(os.fspath(output_dir), text)
    path = os.path.abspath(text)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise ValueError(f"report={report!r}: {path} is a folder; give a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"report={report!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"report={report!r}: the folder {folder} is not writable")
    return path, path[: -len(".json")] + ".png"


def build_report(outcomes, summary, parameters=None, plot=None, step=None):
    """The JSON-able report of a run (layout: ``docs/step.rst``, "The JSON report").

    Parameters
    ----------
    outcomes : list of jwst_wiimatch.matching.Outcome
    summary : jwst_wiimatch.matching.MatchSummary
    parameters : dict, None
        Parameters of the run to record (JSON-able values).
    plot : str, None
        File name of the PNG report written beside it.
    step : str, None
        Name of the step class that ran.
    """
    from . import __version__

    run = getattr(summary, "diagnostics", None) or {}
    fit = dict(run.get("fit") or {"weights": None, "weighted": False, "chi2": None,
                                  "chi2_before": None, "dof": 0.0, "npix": 0,
                                  "rejected": None})
    verdict, msg = assess_chi2(fit.get("chi2"), fit.get("dof", 0), fit.get("weighted", False),
                               getattr(summary, "binning", 1))
    fit["assessment"] = verdict
    fit["message"] = msg
    image_of = {}
    for im in run.get("images", []):
        for k in im["models"]:
            image_of[k] = im["index"]
    models = []
    for k, o in enumerate(outcomes):
        d = o.diagnostics or {}
        models.append({
            "index": k, "name": o.name, "status": o.status, "reason": o.reason,
            "image": image_of.get(k), "npix": int(o.npix), "ncells": int(o.ncells),
            "rejected": d.get("rejected"),
            "background_at_refpoint": _num(o.coefficients[0]) if o.matched else None,
            "coefficients": ([float(c) for c in np.ravel(o.coefficients)]
                             if o.matched else None),
            "rms_before": _num(o.rms_before), "rms": _num(o.rms),
            "chi2_before": d.get("chi2_before"), "chi2": d.get("chi2"),
            "dof": d.get("dof", 0.0)})
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "software": {"jwst_wiimatch": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "parameters": {
            "degree": [int(d) for d in summary.degree],
            "refpoint": [float(v) for v in summary.refpoint],
            "frame": str(summary.frame), "binning": int(summary.binning),
            "grid_shape": [int(v) for v in summary.grid_shape],
            **(parameters or {})},
        "fit": fit,
        "models": models,
        "images": run.get("images", []),
        "pairs": run.get("pairs", []),
        "groups": run.get("groups", []),
        "plot": plot,
    }


@contextlib.contextmanager
def _atomic_path(path):
    """A temporary name beside ``path``, renamed onto it (``os.replace``) on success."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, report):
    """Write ``report`` as JSON to ``path`` atomically (temporary name, then ``os.replace``).

    Non-finite numbers are written as ``null``. Returns ``path``.
    """
    text = json.dumps(_clean(report), indent=1, allow_nan=False)
    with _atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
    return path


def _clean(obj):
    """JSON-able copy: numpy scalars and arrays to Python, NaN and inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj


# ---------------------------------------------------------------------------
# the PNG report
# ---------------------------------------------------------------------------
#: Longest side, in cells, of the mosaic images of the PNG report.
MOSAIC_SIDE = 256
#: Longest side, in cells, of each exposure's background thumbnail.
THUMB_SIDE = 64
#: Rows of a model read and evaluated at a time for the PNG report.
BAND_ROWS = 256


def _block_sum(arr, factor):
    """Sums of ``factor x factor`` blocks of a band of full rows (NaN counts as 0)."""
    ny, nx = arr.shape
    py, px = -ny % factor, -nx % factor
    a = np.pad(np.nan_to_num(arr, nan=0.0), ((0, py), (0, px)))
    s = a.reshape(a.shape[0] // factor, factor, a.shape[1] // factor, factor).sum(axis=(1, 3))
    return s


def mosaic_sums(library, outcomes, summary, dqbits, threads=None, kind="grid"):
    """Binned sums for the PNG report's images (grid kind, 2-D grids), or None.

    Reads every model once more (before any subtraction), a band of rows at
    a time; holds the mosaic sums (at most ``MOSAIC_SIDE`` cells a side) and
    one background thumbnail per model, never a full grid per model.

    Returns
    -------
    dict or None
        ``before``, ``after`` (mean over models of ``data - level`` and of
        ``data - level - background``), ``scatter`` (RMS across overlapping
        models of their matched cell means about the cell's mean, NaN where
        fewer than two), ``backgrounds`` (per model thumbnail of its fitted
        background, None when not matched), ``centers`` (per model, the
        centroid (x, y) of its valid pixels in mosaic cells) and ``factor``.
        None for cubes or the ``'sky'`` kind.
    """
    from .core import polyval_nd
    from .matching import _read_pixels, map_models
    from .models import pixels
    from .models.frame import model_lattice

    if kind != "grid" or len(summary.degree) != 2:
        return None
    dqflags = pixels.interpret_dqbits(dqbits)
    lock = threading.Lock()
    holder = {}

    def one(model, k):
        data = np.asarray(model.data)
        if data.ndim != 2:
            return None
        full = data.shape
        factor = max(1, -(-max(full) // MOSAIC_SIDE))
        tfactor = max(1, -(-max(full) // THUMB_SIDE))
        mshape = (-(-full[0] // factor), -(-full[1] // factor))
        tshape = (-(-full[0] // tfactor), -(-full[1] // tfactor))
        d, _, mask, level, _ = _read_pixels(model, dqflags, f"model {k}")
        o = outcomes[k]
        coef = lattice = None
        if o.matched:
            coef = np.asarray(o.coefficients, float).reshape([g + 1 for g in summary.degree])
            lattice = model_lattice(model, summary.refpoint[:2])
        cnt = np.zeros(mshape)
        s_b = np.zeros(mshape)
        s_p = np.zeros(mshape)
        t_p = np.zeros(tshape)
        t_n = np.zeros(tshape)
        rows_all = np.flatnonzero(mask.any(axis=1))
        if rows_all.size == 0:
            return None
        unit = int(np.lcm(factor, tfactor))  # bands start on block edges of both
        step = unit * max(1, BAND_ROWS // unit)
        r0 = (int(rows_all[0]) // unit) * unit
        full_bkg = None
        if coef is not None and lattice is None:  # no smooth frame: the WCS everywhere
            from .models.records import evaluate_background

            full_bkg = evaluate_background(model, {"degree": list(summary.degree),
                                                   "refpoint": summary.refpoint,
                                                   "coefficients": np.ravel(coef)})
        for a in range(r0, int(rows_all[-1]) + 1, step):
            rows = slice(a, min(a + step, full[0]))
            cols = slice(0, full[1])
            m = mask[rows]
            if not m.any():
                continue
            val = np.where(m, d[rows].astype(np.float64) - level, np.nan)
            if lattice is not None:
                bkg = polyval_nd(coef, *lattice.box(rows, cols))
            elif full_bkg is not None:
                bkg = full_bkg[rows]
            else:
                bkg = np.full(m.shape, np.nan)
            bkg = np.where(m & np.isfinite(bkg), bkg, np.nan)
            ok = np.isfinite(bkg) if coef is not None else m
            val = np.where(ok, val, np.nan)
            band_rows = slice(a // factor, a // factor + -(-(rows.stop - a) // factor))
            cnt[band_rows] += _block_sum(np.where(ok, 1.0, np.nan), factor)
            s_b[band_rows] += _block_sum(val, factor)
            s_p[band_rows] += _block_sum(bkg, factor)
            trows = slice(a // tfactor, a // tfactor + -(-(rows.stop - a) // tfactor))
            t_p[trows] += _block_sum(bkg, tfactor)
            t_n[trows] += _block_sum(np.where(np.isfinite(bkg), 1.0, np.nan), tfactor)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_after = (s_b - s_p) / cnt
            yy, xx = np.nonzero(cnt)
        center = ((float(np.average(xx, weights=cnt[yy, xx])),
                   float(np.average(yy, weights=cnt[yy, xx]))) if yy.size else None)
        have = cnt > 0
        with lock:
            if not holder:
                holder.update(cnt=np.zeros(mshape), before=np.zeros(mshape),
                              bkg=np.zeros(mshape), m1=np.zeros(mshape),
                              m2=np.zeros(mshape), k=np.zeros(mshape), factor=factor)
            holder["cnt"] += cnt
            holder["before"] += s_b
            holder["bkg"] += s_p
            if o.matched:
                holder["m1"][have] += mean_after[have]
                holder["m2"][have] += mean_after[have] ** 2
                holder["k"][have] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            thumb = np.where(t_n > 0, t_p / t_n, np.nan) if o.matched else None
        return thumb, center

    res = map_models(library, one, modify=False, threads=threads, read_only=True)
    if not holder:
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        cnt = holder["cnt"]
        before = np.where(cnt > 0, holder["before"] / cnt, np.nan)
        after = np.where(cnt > 0, (holder["before"] - holder["bkg"]) / cnt, np.nan)
        k = holder["k"]
        m1 = holder["m1"] / np.where(k > 0, k, 1)
        scatter = np.where(k >= 2, np.sqrt(np.clip(holder["m2"] / np.where(k > 0, k, 1)
                                                  - m1 ** 2, 0, None)), np.nan)
    return {"before": before, "after": after, "scatter": scatter,
            "backgrounds": [r[0] if r else None for r in res],
            "centers": [r[1] if r else None for r in res], "factor": holder["factor"]}


def write_png(path, report, sums=None):
    """Draw the PNG report (needs matplotlib) and write it atomically to ``path``.

    ``report`` is the dict of `build_report`; ``sums`` the result of
    `mosaic_sums` (None: only the pair graph and the per-model statistics,
    e.g. for the ``'sky'`` kind). Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    fit = report["fit"]
    fig.suptitle(
        f"wiimatch: degree {report['parameters']['degree']}, "
        f"{len(report['models'])} models; fit chi2 = {_fmt(fit.get('chi2'))} "
        f"(1 = noise; before matching {_fmt(fit.get('chi2_before'))}), "
        f"{fit.get('weights')} weights" + ("" if fit.get("assessment") in ("ok", None)
                                           else f"  [{fit['assessment']}]"))
    images = report["images"]
    names = [im["name"] for im in images]

    # mosaics
    if sums is not None:
        both = np.concatenate([sums["before"][np.isfinite(sums["before"])],
                               sums["after"][np.isfinite(sums["after"])]])
        lo, hi = (np.percentile(both, [2, 98]) if both.size else (0.0, 1.0))
        for ax, key, title in ((axes[0, 0], "before", "mosaic before matching"),
                               (axes[0, 1], "after", "mosaic after matching")):
            im = ax.imshow(sums[key], origin="lower", vmin=lo, vmax=hi, cmap="gray")
            ax.set_title(f"{title} (mean of models, {sums['factor']}x{sums['factor']} px "
                         "cells)", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
        sc = sums["scatter"]
        fin = sc[np.isfinite(sc)]
        im = axes[0, 2].imshow(sc, origin="lower", cmap="magma",
                               vmax=np.percentile(fin, 99) if fin.size else None)
        axes[0, 2].set_title("overlap residual: RMS across overlapping models\nof their "
                             "matched cell means (data units)", fontsize=9)
        fig.colorbar(im, ax=axes[0, 2], shrink=0.8)
        _thumbs(fig, axes[1, 1], sums["backgrounds"], report["models"])
    else:
        for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 1]):
            ax.text(0.5, 0.5, "no common grid\n(calibrated exposures: see the pair graph)",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()

    # the pair graph
    ax = axes[1, 0]
    pos = _node_positions(report, sums)
    pairs = [p for p in report["pairs"] if p["images"][0] in pos and p["images"][1] in pos]
    if pairs:
        vals = np.array([p["chi2"] if p["chi2"] is not None else np.nan for p in pairs])
        segs = [[pos[p["images"][0]], pos[p["images"][1]]] for p in pairs]
        npx = np.array([p["npix"] for p in pairs], float)
        lc = LineCollection(segs, cmap="coolwarm", linewidths=1 + 4 * npx / npx.max())
        lc.set_array(np.log10(np.clip(vals, 1e-3, None)))
        lc.set_clim(-1.0, 1.0)  # chi2 0.1 (blue) .. 1 (noise, white) .. 10 (red)
        ax.add_collection(lc)
        cb = fig.colorbar(lc, ax=ax, shrink=0.8, extend="both")
        cb.set_label("log10 pair chi2 (0 = noise)")
    for i, (x, y) in pos.items():
        ax.plot(x, y, "o", color="k" if images[i]["matched"] else "r", ms=6)
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title("pair graph: width ~ pixels, colour = chi2 after matching", fontsize=9)
    ax.autoscale()
    ax.set_aspect("equal", adjustable="datalim")

    # per-image statistics
    ax = axes[1, 2]
    x = np.arange(len(images))
    rb = np.array([im["rms_before"] if im["rms_before"] is not None else np.nan
                   for im in images])
    ra = np.array([im["rms"] if im["rms"] is not None else np.nan for im in images])
    ch = np.array([im["chi2"] if im["chi2"] is not None else np.nan for im in images])
    ax.bar(x - 0.2, rb, 0.4, label="rms before", color="0.7")
    ax.bar(x + 0.2, ra, 0.4, label="rms after", color="C0")
    ax.set_ylabel("weighted residual RMS (data units)")
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in x], fontsize=8)
    ax.set_xlabel("matching image (see the legend below the graph, or the JSON report)")
    ax2 = ax.twinx()
    ax2.plot(x, ch, "s", color="C3", label="chi2 after")
    ax2.axhline(1.0, color="C3", lw=0.8, ls=":")
    ax2.set_ylabel("normalised chi2 (1 = noise)", color="C3")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title("per image", fontsize=9)
    legend = "\n".join(f"{i}: {n}" for i, n in enumerate(names[:12]))
    if len(names) > 12:
        legend += f"\n... ({len(names) - 12} more)"
    axes[1, 0].text(0.0, -0.12, legend, transform=axes[1, 0].transAxes, fontsize=6,
                    va="top", family="monospace")
    with _atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def _node_positions(report, sums):
    """Graph node position of each matching image: its footprint's centroid, or a circle."""
    images = report["images"]
    pos = {}
    if sums is not None:
        for im in images:
            cs = [sums["centers"][k] for k in im["models"] if sums["centers"][k] is not None]
            if cs:
                pos[im["index"]] = (float(np.mean([c[0] for c in cs])),
                                    float(np.mean([c[1] for c in cs])))
    if len(pos) < len(images):
        n = len(images)
        for im in images:
            if im["index"] not in pos:
                t = 2 * np.pi * im["index"] / max(n, 1)
                pos[im["index"]] = (float(np.cos(t)), float(np.sin(t)))
    return pos


def _thumbs(fig, ax, thumbs, models):
    """A montage of the models' fitted backgrounds (one colour scale)."""
    have = [(k, t) for k, t in enumerate(thumbs) if t is not None]
    ax.set_title("fitted background of each model (one colour scale)", fontsize=9)
    ax.set_axis_off()
    if not have:
        return
    ncol = int(np.ceil(np.sqrt(len(have))))
    nrow = int(np.ceil(len(have) / ncol))
    th, tw = have[0][1].shape
    mont = np.full((nrow * (th + 2), ncol * (tw + 2)), np.nan)
    for j, (k, t) in enumerate(have):
        r, c = divmod(j, ncol)
        r = nrow - 1 - r
        mont[r * (th + 2):r * (th + 2) + t.shape[0], c * (tw + 2):c * (tw + 2) + t.shape[1]] = t
        ax.text(c * (tw + 2) + 2, r * (th + 2) + th - 2, str(k), fontsize=7, va="top",
                bbox={"facecolor": "w", "edgecolor": "none", "pad": 1}, zorder=5)
    im = ax.imshow(mont, origin="lower", cmap="viridis")
    fig.colorbar(im, ax=ax, shrink=0.8)
