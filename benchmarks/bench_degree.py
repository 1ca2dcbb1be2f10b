"""degree='auto' against every fixed polynomial, on injected backgrounds under noise.

Issue 8 asks that the automatic choice's true error be no worse than 1.2x that
of the best fixed degree. For each case (a kind of background and the size of
its non-constant terms, in noise sigmas over a footprint) the script draws
``--seeds`` noise realisations and geometries, fits ``degree='auto'`` and
every fixed candidate (degrees 0-3, tensor and total terms), and measures the
true error: the RMS over each image's footprint of fitted minus injected
background, the part common to all images removed (matching cannot see it).

Per case it prints the RMS over the realisations of the true error of
``auto`` and of the best fixed polynomial for that case (the one a user who
knew the kind of background would fix), and their ratio. Per realisation,
no rule can stay within 1.2x of the best fixed polynomial *of that noise
draw*: it prints how often ``auto`` does, and for scale how often always
fitting the true kind of polynomial does.

    python benchmarks/bench_degree.py            # both geometries, 20 seeds
    python benchmarks/bench_degree.py --quick    # 4 images, 6 seeds
"""
import argparse
import time
import warnings

import numpy as np

from jwst_wiimatch.core import polyval_nd
from jwst_wiimatch.core.engine import match_backgrounds

KINDS = (0, 1, 2, "bilinear")
#: the polynomial that generated each kind (degree, terms)
TRUE = {0: (0, "tensor"), 1: (1, "total"), 2: (2, "total"), "bilinear": (1, "tensor")}
FIXED = [(d, t) for d in range(4) for t in ("total", "tensor") if not (d == 0 and t == "total")]
GEOMETRIES = {
    "4 images": dict(n=4, shape=(96, 96), frac=(2, 3)),
    "6 images": dict(n=6, shape=(96, 128), frac=(1, 2)),
}


def make_case(kind, seed, amp, n=4, shape=(96, 96), frac=(2, 3), sigma=1.0):
    """``n`` noisy images (sigma 1) on boxes of ``frac`` of the grid, random offsets.

    Backgrounds: a constant (3 sigma scatter) plus, for ``kind`` 1, a plane;
    2, a quadratic of total degree 2; ``'bilinear'``, a plane and an ``x*y``
    term; each term's coefficient ``N(0, amp)`` on coordinates in [-1, 1].
    """
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    x = (xx - nx / 2) / (nx / 2)
    y = (yy - ny / 2) / (ny / 2)
    imgs, masks, bgs = [], [], []
    for _ in range(n):
        c = rng.normal(0, amp, 6)
        b = np.full(shape, rng.normal(0, 3.0))
        if kind != 0:
            b = b + c[1] * x + c[2] * y
        if kind == "bilinear":
            b = b + c[5] * x * y
        if kind == 2:
            b = b + c[3] * x * x + c[4] * y * y + c[5] * x * y
        fy, fx = frac[0] * ny // frac[1], frac[0] * nx // frac[1]
        oy, ox = rng.integers(0, ny - fy + 1), rng.integers(0, nx - fx + 1)
        m = np.zeros(shape, bool)
        m[oy:oy + fy, ox:ox + fx] = True
        imgs.append(b + rng.normal(0, sigma, shape))
        masks.append(m)
        bgs.append(b)
    return imgs, masks, [sigma] * n, bgs


def true_error(res, masks, bgs):
    """RMS over each footprint of the background error, the common part removed."""
    shape = masks[0].shape
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    X, Y = xx - res.eff_center[0], yy - res.eff_center[1]
    dims = tuple(d + 1 for d in res.degree)
    e = np.array([polyval_nd(c.reshape(dims), X, Y) - b for c, b in zip(res.coef, bgs)])
    e -= e.mean(axis=0)
    return float(np.sqrt(np.mean([np.mean(ei[m] ** 2) for ei, m in zip(e, masks)])))


def run_geometry(name, geom, amps, seeds):
    print(f"\n{name}: grid {geom['shape']}, footprints {geom['frac'][0]}/{geom['frac'][1]} "
          f"of each axis, noise 1, {seeds} realisations per case")
    print(f"{'kind':>9s} {'amp':>5s} {'auto':>8s} {'best fixed':>14s} {'its error':>9s} "
          f"{'ratio':>6s}  auto chose")
    ratios, per_real, per_true, t_auto, t_fixed = [], [], [], 0.0, 0.0
    for kind in KINDS:
        for amp in (amps[:1] if kind == 0 else amps):
            errs = {k: [] for k in FIXED}
            auto, chosen = [], {}
            for s in range(seeds):
                imgs, masks, sig, bgs = make_case(kind, 1000 + s, amp, **geom)
                t0 = time.perf_counter()
                r = match_backgrounds(imgs, masks, sig, degree="auto")
                t_auto += time.perf_counter() - t0
                auto.append(true_error(r, masks, bgs))
                lab = r.degree_scores["labels"][list(zip(
                    r.degree_scores["candidates"], r.degree_scores["terms"])).index(
                        (r.degree[0], r.terms))]
                chosen[lab] = chosen.get(lab, 0) + 1
                for d, t in FIXED:
                    t0 = time.perf_counter()
                    rf = match_backgrounds(imgs, masks, sig, degree=d, terms=t)
                    t_fixed += time.perf_counter() - t0
                    errs[(d, t)].append(true_error(rf, masks, bgs))
                best = min(v[-1] for v in errs.values())
                per_real.append(auto[-1] / best)
                per_true.append(errs[TRUE[kind]][-1] / best)
            rms = {k: float(np.sqrt(np.mean(np.square(v)))) for k, v in errs.items()}
            kbest = min(rms, key=rms.get)
            a = float(np.sqrt(np.mean(np.square(auto))))
            ratios.append(a / rms[kbest])
            label = f"{kbest[0]}" + (" (total)" if kbest[1] == "total" else "")
            picks = ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items()))
            print(f"{kind!s:>9s} {amp:5.2f} {a:8.4f} {label:>14s} {rms[kbest]:9.4f} "
                  f"{a / rms[kbest]:6.3f}  {picks}")
    r = np.array(ratios)
    pr, pt = np.array(per_real), np.array(per_true)
    print(f"per case: worst ratio {r.max():.3f}, mean {r.mean():.3f} (target <= 1.2)")
    print(f"per realisation: auto over 1.2x that draw's best fixed in {np.sum(pr > 1.2)} of "
          f"{pr.size} (worst {pr.max():.2f}); always the true polynomial: {np.sum(pt > 1.2)} "
          f"(worst {pt.max():.2f})")
    nfix = len(FIXED)
    print(f"time: auto {t_auto / len(pr):.3f} s per fit, a fixed fit "
          f"{t_fixed / (len(pr) * nfix):.3f} s ({t_auto / t_fixed * nfix:.1f}x)")
    return r.max()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 images only, 6 seeds, 3 sizes")
    p.add_argument("--seeds", type=int, default=None)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    amps = [0.1, 0.3, 1.0] if a.quick else [0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 3.0]
    seeds = a.seeds or (6 if a.quick else 20)
    geoms = {"4 images": GEOMETRIES["4 images"]} if a.quick else GEOMETRIES
    worst = max(run_geometry(name, g, amps, seeds) for name, g in geoms.items())
    print(f"\nworst per-case ratio {worst:.3f} (issue 8: <= 1.2)")


if __name__ == "__main__":
    main()
