"""End-to-end benchmark on a survey-size mosaic: jwst's skymatch vs wiimatch.

Each candidate runs in a fresh child process (``python bench_mosaic.py --run
NAME ...``) on the same image3 association of synthetic NIRCam-like ``cal``
files (``mosaic_data.py``), saving its outputs into a scratch folder as
``strun`` would. The parent records the child's wall time (the step call
alone, measured in the child, and the whole child process including Python
start-up and imports) and the child's peak resident memory (``os.wait4``
rusage of that child only), then reads the outputs and compares the
subtracted backgrounds with the injected ones.

Candidates
    ``skymatch``           jwst ``SkyMatchStep`` (skymethod='match', subtract=True)
    ``wiimatch_sky``       ``jwst_wiimatch.pipeline.WiiMatchSkyStep`` (defaults)
    ``io_floor``           open each cal file, touch data/err/dq, save it, close
    ``resample_single``    jwst ``ResampleStep`` with single=True (saves singles)
    ``wiimatch_singles``   ``jwst_wiimatch.step.WiiMatchStep`` on the singles
    ``wiimatch_singles_ondisk``  the same with in_memory=False
    ``io_floor_singles``   the I/O floor on the singles

The ``*_singles`` candidates need the singles made once with ``--make-singles``
(made automatically when asked for and missing).

Background error: each output's subtracted background (wiimatch: the last
``meta.background.polynomial_info`` entry; skymatch: ``meta.background.level``)
is evaluated on a 16x16 grid of sky points across its detector footprint,
and compared with the injected plane there. Matching determines backgrounds
only up to one polynomial common to all exposures, so the best common
polynomial (least squares over all exposures' differences, same degree as
the fit, at least the injected plane's) is removed first; the error is the
largest per-exposure RMS of what remains (the target for wiimatch is
<= 3e-4 MJy/sr with noise 0.05; skymatch fits constants only, so its error
is of the order of the injected gradients and is reported, not judged).

Usage::

    python benchmarks/bench_mosaic.py --data /tmp/mosaic16               # 2x2x4 x 2048^2
    python benchmarks/bench_mosaic.py --data /tmp/mosaic_small --pointings 2 2 \\
        --dithers 2 --size 512 --only skymatch,io_floor,wiimatch_sky
    python benchmarks/bench_mosaic.py --data /tmp/mosaic16 --make-singles
    python benchmarks/bench_mosaic.py --data /tmp/mosaic16 \\
        --only io_floor_singles,wiimatch_singles,wiimatch_singles_ondisk --json res.json
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(HERE))
import mosaic_data as md  # noqa: E402

CANDIDATES = ("skymatch", "io_floor", "wiimatch_sky", "wiimatch_sky_dask", "resample_single",
              "wiimatch_singles", "wiimatch_singles_ondisk", "io_floor_singles")
DEFAULT = ("skymatch", "io_floor", "wiimatch_sky")
SINGLES_DIR = "singles"
SINGLES_ASN = "asn_singles.json"
BASELINE = "skymatch"


# ----------------------------------------------------------------------
# child side
def _members(asn_path):
    with open(asn_path) as fh:
        asn = json.load(fh)
    folder = os.path.dirname(os.path.abspath(asn_path))
    return [os.path.join(folder, m["expname"])
            for p in asn["products"] for m in p["members"]]


def _io_floor(asn_path, out):
    from stdatamodels.jwst import datamodels

    total = 0.0
    for path in _members(asn_path):
        m = datamodels.open(path)
        # touch the arrays a matcher reads (only those the file holds)
        for attr in ("data", "err", "dq", "wht"):
            if m.hasattr(attr):
                total += float(np.nansum(np.asarray(getattr(m, attr))))
        m.save(os.path.join(out, os.path.basename(path)))
        m.close()
        del m
    return total


def _wii_args():
    """Extra wiimatch step parameters (JSON in WIIMATCH_BENCH_ARGS, from --wii-args)."""
    return json.loads(os.environ.get("WIIMATCH_BENCH_ARGS") or "{}")


def child(name, asn_path, out):
    """Run one candidate; return the step time (s)."""
    if name == "skymatch":
        from jwst.skymatch import SkyMatchStep

        t0 = time.perf_counter()
        SkyMatchStep.call(asn_path, skymethod="match", subtract=True,
                          save_results=True, output_dir=out)
    elif name == "wiimatch_sky":
        from jwst_wiimatch.pipeline import WiiMatchSkyStep

        t0 = time.perf_counter()
        WiiMatchSkyStep.call(asn_path, save_results=True, output_dir=out, **_wii_args())
    elif name == "wiimatch_sky_dask":
        # a LocalCluster of 2 single-threaded worker processes (started
        # before the clock): the per-exposure work and the pair sums run as
        # dask tasks
        from dask.distributed import LocalCluster

        from jwst_wiimatch.pipeline import WiiMatchSkyStep

        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster:
            t0 = time.perf_counter()
            WiiMatchSkyStep.call(asn_path, save_results=True, output_dir=out,
                                 scheduler=cluster.scheduler_address, **_wii_args())
            return time.perf_counter() - t0
    elif name in ("wiimatch_singles", "wiimatch_singles_ondisk"):
        from jwst_wiimatch.step import WiiMatchStep

        kw = {"in_memory": False} if name.endswith("ondisk") else {}
        kw.update(_wii_args())
        t0 = time.perf_counter()
        WiiMatchStep.call(asn_path, save_results=True, output_dir=out, **kw)
    elif name == "resample_single":
        from jwst.resample import ResampleStep

        t0 = time.perf_counter()
        ResampleStep.call(asn_path, single=True, save_results=True, output_dir=out)
    elif name in ("io_floor", "io_floor_singles"):
        from stdatamodels.jwst import datamodels  # noqa: F401  (import not timed)

        t0 = time.perf_counter()
        _io_floor(asn_path, out)
    else:
        raise ValueError(f"unknown candidate {name!r}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------
# parent side
def child_env(folder, pythonpath=None):
    env = dict(os.environ)
    if pythonpath:
        # e.g. a ``git archive`` of another revision of jwst_wiimatch
        env["PYTHONPATH"] = os.pathsep.join(
            [os.path.abspath(pythonpath)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["STPIPE_DISABLE_CRDS_STEPPARS"] = "true"
    env["CRDS_SERVER_URL"] = "https://crds.invalid"  # any CRDS contact fails
    env["CRDS_PATH"] = os.path.join(folder, "crds_cache")
    return env


def run_child(name, asn_path, out, folder, log_path, pythonpath=None):
    """Run one candidate in a fresh process; (step s, process s, peak RSS bytes)."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    result = os.path.join(out, "_result.json")
    cmd = [sys.executable, HERE, "--run", name, "--asn", asn_path, "--out", out,
           "--result", result]
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env(folder, pythonpath))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        with open(log_path) as fh:
            tail = fh.read()[-4000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    with open(result) as fh:
        info = json.load(fh)
    os.remove(result)
    return info, wall, usage.ru_maxrss * 1024  # Linux: kilobytes


def read_backgrounds(out, truth):
    """{member name: polynomial entry} of the subtracted backgrounds in ``out``."""
    from stdatamodels.jwst import datamodels

    # outputs are matched to exposures by their (unique) exposure number:
    # jwst names skymatch outputs after the association, not the exposure
    keys = {os.path.basename(name).split("_")[2]: name for name in truth["members"]}
    found = {}
    for path in sorted(glob.glob(os.path.join(out, "*.fits"))):
        with datamodels.open(path) as m:
            name = keys.get(str(m.meta.observation.exposure_number))
            if name is None:
                continue
            bkg = m.meta.background
            info = getattr(bkg, "polynomial_info", None)
            if info:
                e = info[-1]
                e = e.instance if hasattr(e, "instance") else dict(e)
                found[name] = {"degree": [int(d) for d in e["degree"]],
                               "refpoint": [float(v) for v in e["refpoint"]],
                               "coefficients": [float(c) for c in e["coefficients"]]}
            elif bkg.level is not None:
                found[name] = {"degree": [0, 0], "refpoint": list(truth["refpoint"]),
                               "coefficients": [float(bkg.level)],
                               "subtracted": bool(bkg.subtracted)}
    return found


def background_error(found, truth, n=16):
    """Largest per-exposure RMS of (injected - recovered - best common polynomial).

    Returns ``(max, median, max_without_matching, n_matched, per_exposure)``:
    ``max_without_matching`` is the same metric for no matching at all
    (recovered = 0), i.e. how much the injected planes differ beyond one
    common polynomial; ``per_exposure`` maps member names to their RMS.
    """
    if not found:
        return None
    ref = truth["refpoint"]
    deg = [1, 1]
    for e in found.values():
        deg = [max(deg[0], e["degree"][0]), max(deg[1], e["degree"][1])]
    names = sorted(found)
    diffs, inj, bases = [], [], []
    for name in names:
        member = truth["members"][name]
        ra, dec = md.footprint_samples(member, truth, n)
        ra, dec = ra.ravel(), dec.ravel()
        xi, eta = md.standard_coords(ra, dec, *ref)
        t = md.poly_eval(member["coefficients"], xi, eta)
        e = found[name]
        coef = np.reshape(e["coefficients"], [d + 1 for d in e["degree"]])
        rxi, reta = md.standard_coords(ra, dec, *e["refpoint"])
        r = md.poly_eval(coef, rxi, reta)
        diffs.append(t - r)
        inj.append(t)
        bases.append(np.stack([xi ** i * eta ** j for i in range(deg[0] + 1)
                               for j in range(deg[1] + 1)], axis=1))
    A = np.concatenate(bases)

    def worst(values):
        b = np.concatenate(values)
        p, *_ = np.linalg.lstsq(A, b, rcond=None)
        rms = [float(np.sqrt(np.mean((v - B @ p) ** 2))) for v, B in zip(values, bases)]
        return max(rms), float(np.median(rms)), rms

    err_max, err_med, rms = worst(diffs)
    raw_max, _, _ = worst(inj)
    return err_max, err_med, raw_max, len(names), dict(zip(names, rms))


def ensure_data(args):
    folder = args.data
    truth_path = os.path.join(folder, md.TRUTH_NAME)
    if os.path.exists(truth_path):
        truth = md.read_truth(folder)
        want = {"pointings": args.pointings, "dithers": args.dithers,
                "shape": None if args.size is None else [args.size, args.size]}
        for key, value in want.items():
            if value is not None and list(np.atleast_1d(value)) != list(np.atleast_1d(truth[key])):
                sys.exit(f"{folder} holds data with {key}={truth[key]}, not {value}; "
                         "use another --data folder")
        return os.path.join(folder, md.ASN_NAME), truth
    pointings = args.pointings or (2, 2)
    dithers = args.dithers or 4
    size = args.size or 2048
    print(f"generating {pointings[0]}x{pointings[1]} pointings x {dithers} dithers "
          f"of {size}x{size} in {folder} ...", flush=True)
    t0 = time.perf_counter()
    asn, truth = md.write_mosaic(folder, pointings, dithers, (size, size), args.seed)
    print(f"  done in {time.perf_counter() - t0:.1f} s", flush=True)
    return asn, truth


def warm_cache(paths):
    """Read files once so that every candidate starts from the page cache."""
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def make_singles(args, asn, truth):
    folder = os.path.join(args.data, SINGLES_DIR)
    logs = os.path.join(args.data, "logs")
    os.makedirs(logs, exist_ok=True)
    print(f"making singles in {folder} (jwst ResampleStep, single=True) ...", flush=True)
    info, wall, rss = run_child("resample_single", asn, folder, args.data,
                                os.path.join(logs, "make_singles.log"))
    step_t = info["time"]
    files = sorted(f for f in glob.glob(os.path.join(folder, "*.fits")))
    if not files:
        sys.exit(f"resample wrote no FITS files into {folder}")
    path = md.write_asn(folder, files, product="mosaic_singles", name=SINGLES_ASN)
    print(f"  {len(files)} singles in {step_t:.1f} s (process {wall:.1f} s, "
          f"peak RSS {rss / 2**30:.2f} GB); association {path}", flush=True)
    return path


def fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--data", default="/tmp/mosaic16",
                    help="data folder (generated there if it holds no truth.json)")
    ap.add_argument("--pointings", type=int, nargs=2, default=None)
    ap.add_argument("--dithers", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(DEFAULT),
                    help=f"comma-separated candidates of {', '.join(CANDIDATES)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per candidate (best time, largest peak RSS)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--wii-args", default=None,
                    help='extra parameters of the wiimatch steps as JSON, e.g. \'{"binning": 4}\'')
    ap.add_argument("--make-singles", action="store_true",
                    help="write jwst resample singles + their association, then exit")
    ap.add_argument("--pythonpath", default=None,
                    help="prepend this folder to the children's PYTHONPATH (e.g. an "
                         "extracted `git archive` of another jwst_wiimatch revision)")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep each candidate's output folder (DATA/bench_out/NAME)")
    # child mode
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--asn", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.wii_args:
        json.loads(args.wii_args)  # fail early on bad JSON
        os.environ["WIIMATCH_BENCH_ARGS"] = args.wii_args

    if args.run:
        t = child(args.run, args.asn, args.out)
        info = {"time": t}
        if "jwst_wiimatch" in sys.modules:
            info["jwst_wiimatch"] = os.path.dirname(sys.modules["jwst_wiimatch"].__file__)
        with open(args.result, "w") as fh:
            json.dump(info, fh)
        return 0

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in CANDIDATES]
    if bad:
        sys.exit(f"unknown candidate(s) {bad}; choose from {CANDIDATES}")
    os.makedirs(args.data, exist_ok=True)
    asn, truth = ensure_data(args)
    singles_asn = os.path.join(args.data, SINGLES_DIR, SINGLES_ASN)
    if args.make_singles:
        make_singles(args, asn, truth)
        return 0
    if any(n.endswith("_singles") or "_singles_" in n for n in names) \
            and not os.path.exists(singles_asn):
        make_singles(args, asn, truth)

    nexp = len(truth["members"])
    size_gb = sum(os.path.getsize(p) for p in _members(asn)) / 1e9
    print(f"data: {args.data}: {nexp} exposures {truth['shape'][1]}x{truth['shape'][0]}"
          f" ({truth['pointings'][0]}x{truth['pointings'][1]} pointings x "
          f"{truth['dithers']} dithers), {size_gb:.2f} GB of cal files; "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    logs = os.path.join(args.data, "logs")
    os.makedirs(logs, exist_ok=True)

    results = {}
    for name in names:
        src = singles_asn if "singles" in name else asn
        warm_cache(_members(src))
        out = os.path.join(args.data, "bench_out", name)
        times, walls, rss = [], [], []
        for r in range(args.repeat):
            print(f"running {name} ({r + 1}/{args.repeat}) ...", end=" ", flush=True)
            info, wall, peak = run_child(name, src, out, args.data,
                                         os.path.join(logs, f"{name}.log"), args.pythonpath)
            st = info["time"]
            times.append(st)
            walls.append(wall)
            rss.append(peak)
            print(f"{st:.1f} s, process {wall:.1f} s, peak RSS {peak / 2**30:.2f} GB"
                  + (f"  [jwst_wiimatch from {info['jwst_wiimatch']}]"
                     if "jwst_wiimatch" in info else ""), flush=True)
        res = {"time_s": min(times), "times_s": times, "process_s": min(walls),
               "peak_rss_bytes": max(rss), "peak_rss_gb": max(rss) / 2**30,
               "bkg_error": None}
        if "jwst_wiimatch" in info:
            res["jwst_wiimatch"] = info["jwst_wiimatch"]
        if not name.startswith("io_floor") and name != "resample_single":
            found = read_backgrounds(out, truth)
            err = background_error(found, truth)
            if err is not None:
                res.update(bkg_error=err[0], bkg_error_median=err[1],
                           bkg_error_unmatched=err[2], n_matched=err[3],
                           bkg_error_per_exposure=err[4])
            if len(found) < nexp:
                print(f"  note: background found for {len(found)} of {nexp} exposures",
                      flush=True)
            res["coefficients"] = {k: v["coefficients"] for k, v in found.items()}
        res["n_outputs"] = len(glob.glob(os.path.join(out, "*.fits")))
        results[name] = res
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)

    base = results.get(BASELINE)
    print()
    head = (f"{'candidate':<26}{'time s':>9}{'process s':>11}{'peak RSS GB':>13}"
            f"{'time/skym':>11}{'mem/skym':>10}{'bkg error':>11}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        tr = r["time_s"] / base["time_s"] if base else None
        mr = r["peak_rss_bytes"] / base["peak_rss_bytes"] if base else None
        r["time_ratio"], r["mem_ratio"] = tr, mr
        print(f"{name:<26}{r['time_s']:>9.1f}{r['process_s']:>11.1f}"
              f"{r['peak_rss_gb']:>13.2f}{fmt(tr, '.2f'):>11}{fmt(mr, '.2f'):>10}"
              f"{fmt(r['bkg_error'], '.2e'):>11}")
    if "wiimatch_sky" in results and "wiimatch_sky_dask" in results:
        a = results["wiimatch_sky"].get("coefficients", {})
        b = results["wiimatch_sky_dask"].get("coefficients", {})
        diffs = [np.max(np.abs(np.subtract(a[k], b[k])) / np.maximum(np.abs(a[k]), 1e-300))
                 for k in a if k in b]
        if diffs and len(diffs) == len(a):
            print(f"\nwiimatch_sky_dask vs wiimatch_sky: largest relative coefficient "
                  f"difference {max(diffs):.1e} over {len(diffs)} exposures")
    unmatched = [r.get("bkg_error_unmatched") for r in results.values()
                 if r.get("bkg_error_unmatched") is not None]
    print("\ntime s: the step call in the child; process s: the whole child "
          "(start-up, imports); peak RSS: the child's ru_maxrss.")
    if unmatched:
        print(f"bkg error: max over exposures of the RMS (MJy/sr) of injected - "
              f"subtracted background beyond one common polynomial; with no matching "
              f"at all it would be {unmatched[0]:.2e}.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"data": os.path.abspath(args.data), "n_exposures": nexp,
                       "shape": truth["shape"], "pointings": truth["pointings"],
                       "dithers": truth["dithers"], "cal_gb": size_gb,
                       "cpus": os.cpu_count(), "python": sys.version.split()[0],
                       "results": results}, fh, indent=1)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
