"""``wiimatch-demo``: build a realistic example set and run ``strun wiimatch`` on it.

The example is a dithered field observed in ``n`` exposures (6 by default),
each resampled onto one common TAN grid (a gwcs, as ``resample`` with
``single=True`` makes): the same stars and galaxies in every exposure, each
exposure with its own background polynomial (in the step's background frame,
see `jwst_wiimatch.adapters`), Gaussian noise consistent with the ERR array,
a few cosmic-ray hits flagged ``DO_NOT_USE`` (as outlier detection leaves
them), a band of ``NON_SCIENCE`` pixels, and NaN outside each exposure's
footprint. An association ``asn.json`` lists the exposures.

The command then runs ``strun wiimatch asn.json --report=wiimatch_report.json``
(in this process, through stpipe's command-line entry), which writes the
JSON report of the fit (and, with matplotlib installed, the PNG report
``wiimatch_report.png``) into the folder, and prints the injected and
recovered backgrounds per exposure and the fit's chi-square. Matching determines backgrounds only up to one
polynomial common to all exposures, so the table compares them after
removing that common part (the least-squares common polynomial of the
injected-minus-recovered coefficients).

Usage::

    wiimatch-demo [FOLDER] [--n 6] [--degree 1] [--size 400] [--seed 7]
                  [--subtract] [--in-memory-false]
    python -m jwst_wiimatch.demo FOLDER
    wiimatch-demo --engine-only     # the engine alone on numpy arrays
                                    # (jwst_wiimatch.demo_engine)
"""

import argparse
import json
import os
import sys

import numpy as np

from .core import polyval_nd

__all__ = ["make_demo_data", "main"]

_GRID_CRVAL = (53.16, -27.79)  # a deep field; any position works
REPORT = "wiimatch_report.json"  # the step's JSON report, in the demo folder
_PIXSCALE = 0.06  # arcsec / pixel, like NIRCam long-wavelength i2d products


def _tan_wcs(shape, crval, pixscale_arcsec):
    from astropy import coordinates as coord
    from astropy import units as u
    from astropy.modeling import models
    from gwcs import coordinate_frames as cf
    from gwcs import wcs

    ny, nx = shape
    s = pixscale_arcsec / 3600.0
    tr = ((models.Shift(-(nx - 1) / 2.0) & models.Shift(-(ny - 1) / 2.0))
          | (models.Scale(-s) & models.Scale(s))
          | models.Pix2Sky_TAN()
          | models.RotateNative2Celestial(crval[0], crval[1], 180.0))
    det = cf.Frame2D(name="detector", axes_names=("x", "y"), unit=(u.pix, u.pix))
    sky = cf.CelestialFrame(reference_frame=coord.ICRS(), name="world",
                            unit=(u.deg, u.deg))
    w = wcs.WCS([(det, tr), (sky, None)])
    w.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    return w


def _scene(shape, rng):
    """Stars (Gaussian PSF) and galaxies (exponential discs), MJy/sr-like units."""
    ny, nx = shape
    yy, xx = np.indices(shape, dtype=np.float64)
    img = np.zeros(shape)
    for _ in range(int(nx * ny / 2500)):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        amp = 10 ** rng.uniform(-0.5, 1.5)
        img += amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 1.3 ** 2))
    for _ in range(int(nx * ny / 5000)):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        amp = 10 ** rng.uniform(-0.7, 0.5)
        rs = rng.uniform(2, 8)
        q, th = rng.uniform(0.3, 1), rng.uniform(0, np.pi)
        dx, dy = xx - x0, yy - y0
        u = dx * np.cos(th) + dy * np.sin(th)
        v = (-dx * np.sin(th) + dy * np.cos(th)) / q
        img += amp * np.exp(-np.hypot(u, v) / rs)
    return img


def _frame(wcs, shape, ref):
    """The step's background-frame coordinates (xi, eta) of a grid."""
    from .adapters import wcs_grid_world, world_to_frame

    return world_to_frame(wcs_grid_world(wcs, shape), ref)


def make_demo_data(folder, n=6, size=400, degree=1, seed=7):
    """Write ``n`` resampled exposures and ``asn.json`` into ``folder``.

    Parameters
    ----------
    folder : str or path-like
        Output folder (created if needed).
    n : int
        Number of exposures (at least 2).
    size : int
        The common grid is ``size x size`` pixels of 0.06 arcsec.
    degree : int
        Degree (per axis) of the injected background polynomials.
    seed : int
        Random seed.

    Returns
    -------
    dict
        ``{"asn": path, "files": [...], "refpoint": [ra0, dec0],
        "degree": [d, d], "truths": [coefficient arrays], "scene": array}``
        (``scene`` is the noiseless sky without background); coefficient
        arrays ``C[i, j]`` multiply ``xi**i * eta**j`` (degrees, about the
        grid center), the step's background frame.
    """
    from stdatamodels.jwst.datamodels import ImageModel
    from stdatamodels.jwst.datamodels.dqflags import pixel

    if n < 2:
        raise ValueError(f"n={n}: the demo needs at least 2 exposures")
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    shape = (size, size)
    wcs = _tan_wcs(shape, _GRID_CRVAL, _PIXSCALE)
    ref = [float(v) for v in wcs((size - 1) / 2.0, (size - 1) / 2.0)]
    xi, eta = _frame(wcs, shape, ref)
    half = float(np.nanmax(np.abs(xi)))  # half-size of the field in degrees
    sky = _scene(shape, rng)
    yy, xx = np.indices(shape, dtype=np.float64)
    files, truths = [], []
    for k in range(n):
        # footprint: a detector ~62% of the grid, dithered and slightly rotated
        ang = np.radians(rng.uniform(-4, 4))
        cx = (size - 1) / 2.0 + rng.uniform(-0.17, 0.17) * size
        cy = (size - 1) / 2.0 + rng.uniform(-0.17, 0.17) * size
        u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
        v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
        foot = (np.abs(u) < 0.31 * size) & (np.abs(v) < 0.31 * size)
        # background: a level of ~0.2-0.4 plus gradients of ~0.05 across the field
        coef = np.zeros((degree + 1, degree + 1))
        for (i, j) in np.ndindex(coef.shape):
            if i + j == 0:
                coef[i, j] = rng.uniform(0.2, 0.4)
            elif i + j <= degree:
                coef[i, j] = rng.uniform(-0.05, 0.05) / half ** (i + j)
        truths.append(coef)
        bkg = polyval_nd(coef, xi, eta)
        sky_noise = 0.01
        err = np.sqrt(sky_noise ** 2 + 2e-4 * np.clip(sky + bkg, 0, None))
        data = sky + bkg + rng.normal(0.0, 1.0, shape) * err
        dq = np.zeros(shape, dtype=np.uint32)
        # cosmic rays that outlier detection flagged
        for _ in range(12):
            y0, x0 = rng.integers(2, size - 2, 2)
            data[y0 - 1:y0 + 2, x0] += rng.uniform(20, 200)
            dq[y0 - 1:y0 + 2, x0] |= pixel["DO_NOT_USE"] | pixel["OUTLIER"]
        # a band of reference-like pixels at one edge of the footprint
        edge = foot & (np.abs(u + 0.30 * size) < 0.01 * size)
        dq[edge] |= pixel["NON_SCIENCE"]
        data[edge] += 5.0
        wht = np.where(foot, rng.uniform(0.9, 1.1), 0.0)
        data[~foot] = np.nan
        err[~foot] = np.nan
        m = ImageModel(data=data.astype(np.float32), err=err.astype(np.float32),
                       dq=dq, wht=wht.astype(np.float32))
        m.meta.wcs = wcs
        name = f"jw09999001001_0220{k + 1}_00001_nrcalong_i2d.fits"
        m.meta.filename = name
        m.meta.instrument.name = "NIRCAM"
        m.meta.instrument.detector = "NRCALONG"
        m.meta.instrument.channel = "LONG"
        m.meta.instrument.filter = "F444W"
        m.meta.exposure.type = "NRC_IMAGE"
        m.meta.observation.date = "2026-11-01"
        m.meta.observation.time = "00:00:00"
        m.meta.bunit_data = "MJy/sr"
        m.save(os.path.join(folder, name))
        m.close()
        files.append(name)
    asn = {
        "asn_type": "image3", "asn_rule": "wiimatch_demo", "asn_id": "a3001",
        "asn_pool": "demo_pool", "program": "09999", "target": "t001",
        "products": [{"name": "wiimatch_demo",
                      "members": [{"expname": f, "exptype": "science"} for f in files]}],
    }
    asn_path = os.path.join(folder, "asn.json")
    with open(asn_path, "w") as fh:
        json.dump(asn, fh, indent=1)
    return {"asn": asn_path, "files": files, "refpoint": ref,
            "degree": [degree, degree], "truths": truths, "scene": sky}


def _step_name():
    """The alias when the package is installed, else the class path."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="stpipe.steps"):
        if ep.value.startswith("jwst_wiimatch."):
            return "wiimatch"
    return "jwst_wiimatch.step.WiiMatchStep"


def compare(info, folder):
    """Table rows comparing injected and recovered backgrounds per exposure.

    Returns a list of ``(file, injected@ref, recovered@ref, rms_diff)``
    where ``rms_diff`` is the RMS over the exposure's valid pixels of
    (injected - common part) - recovered.
    """
    from stdatamodels.jwst import datamodels

    from .adapters import evaluate_background, latest_entry, polynomial_coefficients

    recs, masks, bkgs, status = [], [], [], []
    wcs_model = None
    for f in info["files"]:
        out = os.path.join(folder, f.replace("_i2d.fits", "_wiimatch.fits"))
        with datamodels.open(out) as m:
            status.append(m.meta.cal_step.instance.get("wiimatch"))
            entries = m.meta.background.polynomial_info
            if status[-1] != "COMPLETE" or not entries:
                recs.append(None)
                bkgs.append(None)
            else:
                entry = latest_entry(m)
                recs.append(polynomial_coefficients(entry))
                bkgs.append(evaluate_background(m, entry))
            with datamodels.open(os.path.join(folder, f)) as src:
                masks.append(np.isfinite(src.data))
            if wcs_model is None:
                wcs_model = m.meta.wcs
    shape = masks[0].shape
    xi, eta = _frame(wcs_model, shape, info["refpoint"])
    ok = [k for k, r in enumerate(recs) if r is not None]
    # common polynomial: mean of (injected - recovered) coefficients
    common = np.mean([info["truths"][k] - recs[k] for k in ok], axis=0) if ok else 0
    rows = []
    for k, f in enumerate(info["files"]):
        t = info["truths"][k] - common
        if recs[k] is None:
            rows.append((f, float(t.flat[0]), np.nan, np.nan, status[k]))
            continue
        diff = (polyval_nd(t, xi, eta) - bkgs[k])[masks[k]]
        rows.append((f, float(t.flat[0]), float(recs[k].flat[0]),
                     float(np.sqrt(np.mean(diff ** 2))), status[k]))
    return rows


def _print_report(folder):
    """Say where the report is and what its chi-square says."""
    path = os.path.join(folder, REPORT)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        rep = json.load(fh)
    fit = rep["fit"]
    chi2 = "n/a" if fit["chi2"] is None else f"{fit['chi2']:.3f}"
    print(f"Fit chi-square per degree of freedom: {chi2} (1 = noise; {fit['assessment']})")
    print(f"JSON report: {path}")
    if rep.get("plot"):
        print(f"PNG report:  {os.path.join(folder, rep['plot'])}")
    else:
        print("PNG report:  not drawn (pip install 'jwst-wiimatch[plot]' for it)")


def main(argv=None):
    """Console entry point of ``wiimatch-demo``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--engine-only" in argv:
        from . import demo_engine

        return demo_engine.main([a for a in argv if a != "--engine-only"])
    p = argparse.ArgumentParser(
        prog="wiimatch-demo",
        description="Write an example set of resampled exposures with known "
                    "backgrounds, run 'strun wiimatch asn.json' on it and "
                    "compare injected and recovered backgrounds.")
    p.add_argument("folder", nargs="?", default="wiimatch-demo-data",
                   help="output folder [wiimatch-demo-data]")
    p.add_argument("--n", type=int, default=6, help="number of exposures [6]")
    p.add_argument("--degree", type=int, default=1,
                   help="polynomial degree per axis, injected and fitted [1]")
    p.add_argument("--size", type=int, default=400, help="grid size in pixels [400]")
    p.add_argument("--seed", type=int, default=7, help="random seed [7]")
    p.add_argument("--subtract", action="store_true",
                   help="also subtract the fitted backgrounds")
    p.add_argument("--in-memory-false", action="store_true",
                   help="run with --in_memory=false (models kept on disk)")
    p.add_argument("--engine-only", action="store_true",
                   help="instead, run the engine alone on numpy arrays "
                        "(jwst_wiimatch.demo_engine; takes --nimages, --seed)")
    args = p.parse_args(argv)

    from stpipe import Step

    folder = os.path.abspath(args.folder)
    print(f"Writing {args.n} resampled exposures ({args.size}x{args.size} px) "
          f"into {folder}")
    info = make_demo_data(folder, n=args.n, size=args.size, degree=args.degree,
                          seed=args.seed)
    cmd = [_step_name(), "asn.json", f"--degree={args.degree}", f"--report={REPORT}"]
    if args.subtract:
        cmd.append("--subtract=true")
    if args.in_memory_false:
        cmd.append("--in_memory=false")
    print("Running: strun " + " ".join(cmd))
    here = os.getcwd()
    try:
        os.chdir(folder)
        Step.from_cmdline(cmd)
    finally:
        os.chdir(here)

    rows = compare(info, folder)
    print()
    print("Backgrounds at the reference point (ra, dec) = "
          f"({info['refpoint'][0]:.6f}, {info['refpoint'][1]:.6f}); "
          "injected values have the common part removed")
    print(f"{'exposure':<48s} {'injected':>10s} {'recovered':>10s} "
          f"{'rms diff':>10s}  status")
    worst = 0.0
    for f, t, r, d, st in rows:
        print(f"{f:<48s} {t:>10.5f} {r:>10.5f} {d:>10.2e}  {st}")
        worst = max(worst, d) if np.isfinite(d) else np.inf
    print(f"\nLargest RMS difference over an exposure: {worst:.2e} "
          "(data noise per pixel ~1e-2)")
    _print_report(folder)
    return 0 if all(r[4] == "COMPLETE" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
