"""Benchmark of matching on data with unflagged junk and on a real sky (issue 8).

Runs a matcher on every case of ``junk_data.py`` (the junk table of issue 8
and the Hubble-deep-field sky) and prints, per case, the background error,
its ratio to the error on the clean data of the same family, the issue's
target and the wall time. The steps match robustly by default; the baseline
of plain least squares is ``--step-args '{"robust": "none", "source_nsigma": 0}'``
(and ``--plain-step-args`` the same for the clean rows' reference).

Routes
    ``step``    ``WiiMatchStep.call(models, **step_args)`` on in-memory
                models (default parameters unless ``--step-args``); the
                recovered background of each model is its recorded polynomial
                evaluated through its WCS (``jwst_wiimatch.models.evaluate_background``).
    ``engine``  ``jwst_wiimatch.core.match_backgrounds(images, masks, sigmas,
                degree=1, image2world=<pixel -> (xi, eta) degrees>, **engine_args)``
                with the step's validity rule (finite data and ERR, ERR > 0,
                no DO_NOT_USE / NON_SCIENCE, WHT > 0) and sigma = ERR, at full
                resolution (no binning).

Background error (the number in the table). Matching determines backgrounds
only up to one polynomial common to all exposures, so only differences are
compared. With ``P_n`` the recovered and ``T_n`` the injected background of
exposure ``n`` on the grid, ``r = 0`` the reference exposure (junk is injected
into another member, 2), and ``F_n`` the valid pixels (footprint) of ``n``::

    d_n(k) = (P_n(k) - P_r(k)) - (T_n(k) - T_r(k))
    error  = max over n != r of  sqrt( mean over k in F_n | F_r of d_n(k)**2 )

i.e. the worst exposure's RMS error of its background relative to the
reference exposure, over the pixels either of them covers (in the units of
the data: sigma = 1 for the junk family, MJy/sr for the sky family, where the
blank-sky noise is 0.01 per detector pixel). With ``--seeds K`` every case is
generated and matched for seeds 0..K-1 (the same backgrounds and noise in
every case of a seed) and the table shows the root mean square of the K
errors; a failed or non-finite run counts as an infinite error.

Ratios and targets (issue 8)
    junk cases (``cr``, ``trail``, ``transient``, ``fill``): error / error on
    ``clean``, target <= 1.5; ``sky_cr_trail``: error / error on
    ``sky_clean`` (no sources, same noise draws), target <= 2 (``sky``,
    ``sky_cr`` and ``sky_trail`` are shown against the same clean error, with
    no target); ``clean`` and ``sky_clean``: error / error of PLAIN least
    squares on the same data (``--plain-step-args`` / ``--plain-engine-args``,
    default ``{}``: today's defaults, so today's ratio is 1 by definition),
    target <= 1.05.

Usage::

    python benchmarks/bench_robust.py --quick          # 128^2 junk, 256^2 sky crop, < 1 min
    python benchmarks/bench_robust.py                  # 512^2 junk, the 872x1000 field, 3 seeds
    python benchmarks/bench_robust.py --route both --json robust.json
    python benchmarks/bench_robust.py --step-args '{"robust": "tukey"}' \\
        --plain-step-args '{"robust": "none", "source_nsigma": 0}'   # against plain LS
    python benchmarks/bench_robust.py --route engine --engine-args '{"robust": "clip"}'

Wall time is the matcher call alone (mean over seeds), not generation or
evaluation; tests never assert on it.
"""

import argparse
import json
import logging
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
import junk_data as jd  # noqa: E402
import mosaic_data as md  # noqa: E402

REFERENCE = 0
#: case -> (what the ratio is against, target ratio or None)
TARGETS = {
    "clean": ("plain", 1.05),
    "cr": ("clean", 1.5),
    "trail": ("clean", 1.5),
    "transient": ("clean", 1.5),
    "fill": ("clean", 1.5),
    "sky_clean": ("plain", 1.05),
    "sky": ("sky_clean", None),
    "sky_cr": ("sky_clean", None),
    "sky_trail": ("sky_clean", None),
    "sky_cr_trail": ("sky_clean", 2.0),
}
CLEAN = {"junk": "clean", "sky": "sky_clean"}
QUICK = {"size": 128, "sky_size": 256, "seeds": 2}
FULL = {"size": 512, "sky_size": 0, "seeds": 3}


# ----------------------------------------------------------------------
def background_error(recovered, truths, footprints, reference=REFERENCE):
    """(error, per-exposure RMS list) as defined in the module docstring."""
    per = []
    for n in range(len(truths)):
        if n == reference:
            per.append(0.0)
            continue
        d = (recovered[n] - recovered[reference]) - (truths[n] - truths[reference])
        sel = footprints[n] | footprints[reference]
        with np.errstate(over="ignore", invalid="ignore"):
            val = float(np.sqrt(np.mean(np.square(d[sel]))))
        per.append(val if np.isfinite(val) else float("inf"))
    return max(per), per


class _Warnings(logging.Handler):
    """Collects WARNING and above records (of any logger) during one run."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if "history attribute will soon be deprecated" in msg:
            return  # stdatamodels' own deprecation notice, not about matching
        self.messages.append(f"{record.name}: {msg.strip().splitlines()[0][:200]}")


def valid_mask(model):
    """The step's default validity rule, for the engine route."""
    data = np.asarray(model.data)
    err = np.asarray(model.err)
    ok = np.isfinite(data) & np.isfinite(err) & (err > 0)
    ok &= (np.asarray(model.dq) & (jd.DO_NOT_USE | jd.NON_SCIENCE)) == 0
    ok &= np.asarray(model.wht) > 0
    return ok


def run_step(case, args, quiet=True):
    """WiiMatchStep on in-memory copies; returns (recovered, seconds, status)."""
    from jwst_wiimatch.models import evaluate_background
    from jwst_wiimatch.step import WiiMatchStep

    models = [m.copy() for m in case.models]
    kw = dict(args)
    if quiet:
        kw.setdefault("configure_log", False)  # no stpipe log handlers: no INFO flood
    t0 = time.perf_counter()
    out = WiiMatchStep.call(models, **kw)
    dt = time.perf_counter() - t0
    rec, status = [], []
    for m in out:
        st = m.meta.cal_step.wiimatch
        status.append(str(st))
        try:
            rec.append(evaluate_background(m))
        except Exception:  # SKIPPED: nothing recorded
            rec.append(np.full(m.data.shape, np.nan))
    return rec, dt, status


def run_engine(case, args, quiet=True):
    """match_backgrounds on arrays; returns (recovered, seconds, status)."""
    from jwst_wiimatch.core import match_backgrounds, polyval_nd

    shape = case.models[0].data.shape
    roll, pixscale = case.info["roll"], case.info["pixscale"]

    def image2world(x, y):
        return md.pixel_to_standard(x, y, shape, jd.CRVAL, roll, ref=jd.CRVAL,
                                    pixscale=pixscale)

    images = [np.asarray(m.data) for m in case.models]
    masks = [valid_mask(m) for m in case.models]
    sigmas = [np.asarray(m.err) for m in case.models]
    kw = {"degree": 1, "image2world": image2world}
    kw.update(args)
    t0 = time.perf_counter()
    res = match_backgrounds(images, masks, sigmas, **kw)
    dt = time.perf_counter() - t0
    xi, eta = case.frame()
    shp = tuple(d + 1 for d in res.degree)
    rec = [polyval_nd(np.asarray(c).reshape(shp), xi - res.eff_center[0],
                      eta - res.eff_center[1]) for c in res.coef]
    status = ["isolated" if n in res.isolated else "ok" for n in range(len(images))]
    return rec, dt, status


def measure(case, route, args, quiet=True):
    """One run of one case: dict of error, per-exposure errors, time, status,
    warnings (logged WARNING records and Python warnings)."""
    handler = _Warnings()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rec, dt, status = (run_step if route == "step" else run_engine)(
                    case, args, quiet)
                err, per = background_error(rec, case.backgrounds, case.footprints)
                failure = None
            except Exception as exc:  # a crash is a result too
                err, per, dt, status = float("inf"), [], float("nan"), []
                failure = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        root.removeHandler(handler)
    msgs = handler.messages + [
        f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:200]}"
        for w in caught if not issubclass(w.category, (DeprecationWarning,
                                                       PendingDeprecationWarning))
        and "history attribute will soon be deprecated" not in str(w.message)]
    return {"error": err, "per_exposure": per, "time_s": dt, "status": status,
            "warnings": msgs, "failure": failure}


def unmatched_error(case):
    """The error with no matching at all (P_n = 0): the scale of the problem."""
    zeros = [np.zeros_like(b) for b in case.backgrounds]
    return background_error(zeros, case.backgrounds, case.footprints)[0]


# ----------------------------------------------------------------------
def _rms(values):
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or not np.all(np.isfinite(v)):
        return float("inf")
    return float(np.sqrt(np.mean(v * v)))


def _fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, float) and not np.isfinite(v):
        return "inf" if v > 0 else "nan"
    if spec.endswith("f") and abs(v) >= 1e5:
        return format(v, ".1e")
    return format(v, spec)


def run_all(cases, routes, step_args, plain_step_args, engine_args, plain_engine_args,
            seeds, size, sky_size, degree, verbose=False):
    """Every case x route x seed; returns the results dict (see ``--json``)."""
    args = {"step": step_args, "engine": engine_args}
    plain = {"step": plain_step_args, "engine": plain_engine_args}
    results = {r: {} for r in routes}
    plain_res = {r: {} for r in routes}
    gen_time = 0.0
    scene = None
    for seed in range(seeds):
        for name in cases:
            t0 = time.perf_counter()
            if name in jd.SKY_CASES and scene is None:
                scene = jd.hdf_scene(None if not sky_size else (sky_size, sky_size))
            case = jd.make_case(name, seed=seed, degree=degree, size=size,
                                sky_size=sky_size or None, scene=scene)
            gen_time += time.perf_counter() - t0
            for route in routes:
                r = measure(case, route, args[route], quiet=not verbose)
                r["unmatched"] = unmatched_error(case)
                results[route].setdefault(name, []).append(r)
                if TARGETS[name][0] == "plain":
                    p = (r if plain[route] == args[route]
                         else measure(case, route, plain[route], quiet=not verbose))
                    plain_res[route].setdefault(name, []).append(p)
                if verbose:
                    print(f"  seed {seed} {route:<6} {name:<13} error {r['error']:.3e}  "
                          f"{r['time_s']:.2f} s  {r['failure'] or ''}", flush=True)
    summary = {}
    for route in routes:
        rows = {}
        for name in cases:
            runs = results[route][name]
            rows[name] = {
                "error": _rms([x["error"] for x in runs]),
                "errors_per_seed": [x["error"] for x in runs],
                "per_exposure": [x["per_exposure"] for x in runs],
                "unmatched_error": _rms([x["unmatched"] for x in runs]),
                "time_s": float(np.mean([x["time_s"] for x in runs])),
                "status": sorted({s for x in runs for s in x["status"]}),
                "warnings": sorted({w for x in runs for w in x["warnings"]}),
                "failures": sorted({x["failure"] for x in runs if x["failure"]}),
            }
        for name, row in rows.items():
            against, target = TARGETS[name]
            if against == "plain":
                base = _rms([x["error"] for x in plain_res[route][name]])
                row["plain_error"] = base
            else:
                base = rows[against]["error"] if against in rows else None
            ratio = (row["error"] / base if base not in (None, 0.0) and np.isfinite(base)
                     else None)
            if ratio is not None and not np.isfinite(ratio):
                ratio = float("inf")
            row.update({"ratio_against": against, "ratio": ratio, "target": target,
                        "meets": (None if target is None or ratio is None
                                  else bool(ratio <= target))})
        summary[route] = rows
    return summary, gen_time


def print_table(route, rows, head_note):
    print(f"\nroute: {route}  ({head_note})")
    head = (f"{'case':<14}{'error':>11}{'ratio':>10}{'against':>11}{'target':>8}"
            f"{'meets':>7}{'time s':>9}  status / warnings")
    print(head)
    print("-" * (len(head) + 20))
    for name, r in rows.items():
        meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "NO")
        status = ",".join(r["status"]) if r["status"] else "-"
        note = status
        if r["warnings"]:
            note += f"; {len(r['warnings'])} warning(s)"
        if r["failures"]:
            note += f"; FAILED {r['failures'][0][:60]}"
        tgt = "-" if r["target"] is None else f"{r['target']:g}x"
        print(f"{name:<14}{_fmt(r['error'], '.3e'):>11}{_fmt(r['ratio'], '.2f'):>10}"
              f"{r['ratio_against']:>11}{tgt:>8}{meets:>7}{_fmt(r['time_s'], '.2f'):>9}  {note}")


def _have_skimage():
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"small sizes ({QUICK['size']}^2 junk grid, {QUICK['sky_size']}^2 "
                         f"sky crop, {QUICK['seeds']} seeds)")
    ap.add_argument("--cases", default="all",
                    help="comma-separated cases (default all): " + ",".join(jd.CASES)
                    + "; the clean case of each family asked for is always added")
    ap.add_argument("--route", default="step", choices=("step", "engine", "both"))
    ap.add_argument("--step-args", default="{}",
                    help="JSON dict of WiiMatchStep parameters, e.g. '{\"degree\": 2}'")
    ap.add_argument("--plain-step-args", default="{}",
                    help="JSON dict of the step parameters of PLAIN least squares, the "
                         "reference of the clean rows (default {}: today's defaults)")
    ap.add_argument("--engine-args", default="{}",
                    help="JSON dict of match_backgrounds keywords (over degree=1)")
    ap.add_argument("--plain-engine-args", default="{}",
                    help="JSON dict of match_backgrounds keywords of plain least squares")
    ap.add_argument("--size", type=int, default=None, help="junk grid side (px)")
    ap.add_argument("--sky-size", type=int, default=None,
                    help="sky crop side (px); 0: the whole 872x1000 field")
    ap.add_argument("--seeds", type=int, default=None, help="noise/background seeds")
    ap.add_argument("--degree", type=int, default=1,
                    help="injected background degree per axis (0-2; the step's default "
                         "fit degree is 1)")
    ap.add_argument("--json", default=None, help="write the numbers to this file")
    ap.add_argument("--verbose", action="store_true", help="a line per run, and step logs")
    args = ap.parse_args(argv)

    mode = QUICK if args.quick else FULL
    size = args.size or mode["size"]
    sky_size = mode["sky_size"] if args.sky_size is None else args.sky_size
    seeds = args.seeds or mode["seeds"]
    parsed = {}
    for key in ("step_args", "plain_step_args", "engine_args", "plain_engine_args"):
        try:
            parsed[key] = json.loads(getattr(args, key))
        except json.JSONDecodeError as exc:
            ap.error(f"--{key.replace('_', '-')}: not JSON ({exc})")
        if not isinstance(parsed[key], dict):
            ap.error(f"--{key.replace('_', '-')}: a JSON object (dict) is needed")
    cases = jd.CASES if args.cases == "all" else tuple(
        c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in cases if c not in jd.CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(jd.CASES)}")
    if any(c in jd.SKY_CASES for c in cases) and not _have_skimage():
        if args.cases != "all":
            ap.error("the sky cases need scikit-image (skimage.data.hubble_deep_field)")
        print("scikit-image is not installed: the sky cases are left out", flush=True)
        cases = tuple(c for c in cases if c not in jd.SKY_CASES)
    for fam, clean in CLEAN.items():
        members = jd.JUNK_CASES if fam == "junk" else jd.SKY_CASES
        if any(c in members for c in cases) and clean not in cases:
            cases = (clean,) + tuple(cases)
    cases = tuple(c for c in jd.CASES if c in cases)  # table order
    routes = ("step", "engine") if args.route == "both" else (args.route,)
    if not args.verbose:
        for name in ("stpipe", "jwst_wiimatch", "py.warnings"):
            logging.getLogger(name).setLevel(logging.WARNING)

    print(f"bench_robust: cases {', '.join(cases)}; junk grid {size}x{size} (5 exposures), "
          f"sky {'872x1000' if not sky_size else f'{sky_size}x{sky_size}'} (6 exposures); "
          f"{seeds} seed(s); injected degree {args.degree}", flush=True)
    t0 = time.perf_counter()
    summary, gen_time = run_all(cases, routes, parsed["step_args"], parsed["plain_step_args"],
                                parsed["engine_args"], parsed["plain_engine_args"], seeds,
                                size, sky_size, args.degree, verbose=args.verbose)
    total = time.perf_counter() - t0
    for route in routes:
        note = (f"WiiMatchStep.call, args {parsed['step_args']}" if route == "step"
                else f"match_backgrounds, args {parsed['engine_args']}")
        print_table(route, summary[route], note)
    some = next(iter(summary.values()))
    scales = {fam: some[c]["unmatched_error"] for fam, c in CLEAN.items() if c in some}
    print("\nerror: worst exposure's RMS of (P_n - P_0) - (T_n - T_0) over its and "
          "exposure 0's pixels (RMS over seeds); ratio: error / the 'against' row's "
          "error (plain: plain least squares on the same data); time: the matcher call.")
    if scales:
        print("with no matching at all the error would be: "
              + ", ".join(f"{f} {v:.3g}" for f, v in scales.items())
              + " (noise: junk sigma 1, sky 0.01 MJy/sr per detector pixel)")
    print(f"generation {gen_time:.1f} s, total {total:.1f} s")
    if args.json:
        out = {"config": {"cases": list(cases), "routes": list(routes), "size": size,
                          "sky_size": sky_size or None, "seeds": seeds,
                          "degree": args.degree, "quick": bool(args.quick),
                          "reference_exposure": REFERENCE, **parsed},
               "cpus": os.cpu_count(), "python": sys.version.split()[0],
               "generation_s": gen_time, "total_s": total, "results": summary}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)
        print(f"results written to {args.json}")
    if all(r["failures"] for rows in summary.values() for r in rows.values()):
        print("every run failed (see the status column): check --step-args / --engine-args",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
