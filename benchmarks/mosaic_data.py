"""Synthetic NIRCam-like Level-2 ``cal`` exposures of a survey-size mosaic.

A grid of pointings (tiles overlapping by ~10 %), each observed with a few
small dithers (a few arcsec, small rolls), one NRCA1-like detector per
exposure at the NIRCam short-wavelength pixel scale (0.031"/pixel). Every
exposure sees the same sky (a flat level plus faint compact sources) through
its own TAN WCS, plus its own background PLANE in gnomonic standard
coordinates (xi, eta) in degrees about the mosaic center, plus Gaussian noise.

The metadata is what jwst 3.0.0's association reading, exposure grouping
(each exposure its own group), ``skymatch``, ``resample`` and saving need;
no reference file and no CRDS access is needed.

Use as a module::

    from mosaic_data import write_mosaic
    asn_path, truth = write_mosaic("/tmp/mosaic16", pointings=(2, 2), dithers=4)

or as a script::

    python benchmarks/mosaic_data.py /tmp/mosaic16 --pointings 2 2 --dithers 4 --size 2048

``truth.json`` (next to the association) holds the reference point (mosaic
center) and, per member file, the injected plane as a 2x2 array ``C[i][j]``
multiplying ``xi**i * eta**j`` (degrees about the reference point), plus the
pointing (CRVAL, roll) of each exposure.

Pixel -> standard coordinates are computed analytically (the composition of
two gnomonic projections is a projective map of the plane), which is checked
against the gwcs object on a few pixels of each exposure.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

#: Mosaic center (ICRS degrees) = reference point of the injected planes.
CENTER = (53.16, -27.78)
PIXSCALE = 0.031  # arcsec / pixel (NIRCam SW)
NOISE = 0.05  # MJy/sr per pixel (Gaussian sigma, = ERR)
SKY = 0.2  # flat astrophysical level common to all exposures (MJy/sr)
OVERLAP = 0.10  # fractional overlap of neighbouring tiles
N_BAD = 300  # DO_NOT_USE pixels per exposure (NaN data)
#: base dither pattern (arcsec east, arcsec north), before centering + jitter
DITHER_PATTERN = [(0.0, 0.0), (2.9, 1.3), (1.1, 3.2), (3.8, 2.6),
                  (-1.7, 2.2), (2.4, -1.9), (-2.6, -0.8), (0.6, -3.1), (4.4, 0.4)]
MAX_ROLL = 1.5  # degrees
SOURCE_DENSITY = 130.0  # faint compact sources per arcmin^2 (~150 per 2048^2 detector)
ASN_NAME = "asn_image3.json"
TRUTH_NAME = "truth.json"
PRODUCT = "mosaic"


# ----------------------------------------------------------------------
# spherical geometry (plain numpy, no WCS library)
def _unit(ra, dec):
    a, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])


def _basis(ra0, dec0):
    """(n, e_xi, e_eta): tangent point and its east / north unit vectors."""
    a0, d0 = np.radians(ra0), np.radians(dec0)
    n = np.array([np.cos(d0) * np.cos(a0), np.cos(d0) * np.sin(a0), np.sin(d0)])
    exi = np.array([-np.sin(a0), np.cos(a0), 0.0])
    eeta = np.array([-np.sin(d0) * np.cos(a0), -np.sin(d0) * np.sin(a0), np.cos(d0)])
    return n, exi, eeta


def standard_coords(ra, dec, ra0, dec0):
    """Gnomonic standard coordinates (xi, eta) in degrees about (ra0, dec0)."""
    p = _unit(np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64))
    n, exi, eeta = _basis(ra0, dec0)
    den = np.tensordot(n, p, 1)
    return (np.degrees(np.tensordot(exi, p, 1) / den),
            np.degrees(np.tensordot(eeta, p, 1) / den))


def from_standard(xi, eta, ra0, dec0):
    """Inverse of `standard_coords`: (ra, dec) degrees."""
    n, exi, eeta = _basis(ra0, dec0)
    xi = np.radians(np.asarray(xi, dtype=np.float64))
    eta = np.radians(np.asarray(eta, dtype=np.float64))
    p = (n[:, None] + exi[:, None] * np.ravel(xi) + eeta[:, None] * np.ravel(eta))
    ra = np.degrees(np.arctan2(p[1], p[0])) % 360.0
    dec = np.degrees(np.arctan2(p[2], np.hypot(p[0], p[1])))
    return ra.reshape(np.shape(xi)), dec.reshape(np.shape(xi))


def pc_matrix(roll_deg, pixscale_arcsec=PIXSCALE):
    """Pixel offsets -> exposure standard coordinates (degrees), as in the WCS."""
    th = np.radians(roll_deg)
    return np.array([[-np.cos(th), np.sin(th)],
                     [np.sin(th), np.cos(th)]]) * (pixscale_arcsec / 3600.0)


def pixel_to_standard(x, y, shape, crval, roll, ref=CENTER, pixscale=PIXSCALE):
    """Pixel coordinates of an exposure -> (xi, eta) degrees about ``ref``.

    The exposure's TAN projection maps pixels (affinely) to its own standard
    coordinates (u, v); the direction ``n_k + u e_k + v f_k`` is then
    projected about ``ref`` (a projective map: cheap on millions of pixels).
    """
    ny, nx = shape
    pc = pc_matrix(roll, pixscale)
    dx = np.asarray(x, dtype=np.float64) - (nx - 1) / 2.0
    dy = np.asarray(y, dtype=np.float64) - (ny - 1) / 2.0
    nk, ek, fk = _basis(*crval)
    n0, e0, f0 = _basis(*ref)
    # u, v (radians) = A @ (dx, dy); direction = nk + u ek + v fk
    a = np.radians(pc)
    # components of the (unnormalised) direction projected on n0, e0, f0
    coef = {}
    for name, axis in (("n", n0), ("e", e0), ("f", f0)):
        c0 = float(nk @ axis)
        cu, cv = float(ek @ axis), float(fk @ axis)
        cx = cu * a[0, 0] + cv * a[1, 0]
        cy = cu * a[0, 1] + cv * a[1, 1]
        coef[name] = (c0, cx, cy)
    den = coef["n"][0] + coef["n"][1] * dx + coef["n"][2] * dy
    xi = (coef["e"][0] + coef["e"][1] * dx + coef["e"][2] * dy) / den
    eta = (coef["f"][0] + coef["f"][1] * dx + coef["f"][2] * dy) / den
    return np.degrees(xi), np.degrees(eta)


def standard_to_pixel(xi, eta, shape, crval, roll, ref=CENTER, pixscale=PIXSCALE):
    """Inverse of `pixel_to_standard` (for placing sources)."""
    ra, dec = from_standard(xi, eta, *ref)
    u, v = standard_coords(ra, dec, *crval)
    pc = pc_matrix(roll, pixscale)
    d = np.linalg.solve(pc, np.stack([np.ravel(u), np.ravel(v)]))
    ny, nx = shape
    return (d[0] + (nx - 1) / 2.0).reshape(np.shape(u)), \
        (d[1] + (ny - 1) / 2.0).reshape(np.shape(u))


def poly_eval(coef, xi, eta):
    """sum C[i][j] xi**i eta**j."""
    coef = np.asarray(coef, dtype=np.float64)
    out = np.zeros(np.broadcast(xi, eta).shape)
    for i in range(coef.shape[0]):
        for j in range(coef.shape[1]):
            if coef[i, j] != 0.0:
                out += coef[i, j] * xi ** i * eta ** j
    return out


# ----------------------------------------------------------------------
def tan_wcs(shape, crval, roll_deg, pixscale_arcsec=PIXSCALE):
    """A gwcs TAN WCS ``detector -> world`` (frame names as jwst's imaging WCS)."""
    from astropy import coordinates as coord
    from astropy import units as u
    from astropy.modeling import models
    from gwcs import coordinate_frames as cf
    from gwcs import wcs

    ny, nx = shape
    pc = pc_matrix(roll_deg, pixscale_arcsec)
    transform = ((models.Shift(-(nx - 1) / 2.0) & models.Shift(-(ny - 1) / 2.0))
                 | models.AffineTransformation2D(matrix=pc)
                 | models.Pix2Sky_TAN()
                 | models.RotateNative2Celestial(crval[0], crval[1], 180.0))
    det = cf.Frame2D(name="detector", axes_names=("x", "y"), unit=(u.pix, u.pix))
    sky = cf.CelestialFrame(reference_frame=coord.ICRS(), name="world",
                            axes_names=("lon", "lat"), unit=(u.deg, u.deg))
    w = wcs.WCS([(det, transform), (sky, None)])
    w.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    w.pixel_shape = (nx, ny)
    w.array_shape = (ny, nx)
    return w


def s_region(w, shape):
    ny, nx = shape
    xs = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    ys = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ra, dec = w(xs, ys, with_bounding_box=False)
    return "POLYGON ICRS " + " ".join(f"{a:.9f} {d:.9f}" for a, d in zip(ra, dec))


# ----------------------------------------------------------------------
def layout(pointings=(2, 2), dithers=4, shape=(2048, 2048), seed=0,
           pixscale=PIXSCALE, ref=CENTER):
    """Exposure list: dicts with pointing, dither, crval, roll, filename."""
    rng = np.random.default_rng([seed, 1])
    npx, npy = pointings
    ny, nx = shape
    step_x = (1.0 - OVERLAP) * nx * pixscale  # arcsec
    step_y = (1.0 - OVERLAP) * ny * pixscale
    if dithers > len(DITHER_PATTERN):
        raise ValueError(f"at most {len(DITHER_PATTERN)} dithers")
    pattern = np.array(DITHER_PATTERN[:dithers], dtype=float)
    pattern -= pattern.mean(axis=0)
    exposures = []
    k = 0
    for jy in range(npy):
        for jx in range(npx):
            p = jy * npx + jx
            # tile center (arcsec) in the mosaic's standard coordinates
            cx = (jx - (npx - 1) / 2.0) * step_x
            cy = (jy - (npy - 1) / 2.0) * step_y
            for d in range(dithers):
                jit = rng.uniform(-0.3, 0.3, 2)
                ox, oy = pattern[d] + jit
                ra, dec = from_standard((cx + ox) / 3600.0, (cy + oy) / 3600.0, *ref)
                roll = float(rng.uniform(-MAX_ROLL, MAX_ROLL))
                exposures.append({
                    "index": k, "pointing": p, "dither": d,
                    "crval": [float(ra), float(dec)], "roll": roll,
                    "filename": (f"jw01234001001_{p + 1:02d}{d + 1}01_"
                                 f"{k + 1:05d}_nrca1_cal.fits"),
                })
                k += 1
    return exposures


def random_planes(exposures, shape, seed=0, pixscale=PIXSCALE):
    """Per exposure: C (2x2) of level ~1 (+-0.2) and a gradient changing the
    plane by 0.05-0.2 MJy/sr across a detector."""
    rng = np.random.default_rng([seed, 2])
    width_deg = max(shape) * pixscale / 3600.0
    out = []
    for _ in exposures:
        c = np.zeros((2, 2))
        c[0, 0] = 1.0 + rng.normal(0.0, 0.2)
        change = rng.uniform(0.05, 0.2)
        ang = rng.uniform(0.0, 2 * np.pi)
        c[1, 0] = change / width_deg * np.cos(ang)
        c[0, 1] = change / width_deg * np.sin(ang)
        out.append(c)
    return out


def random_sources(exposures, shape, seed=0, pixscale=PIXSCALE, ref=CENTER):
    """Faint compact sources (xi, eta arcsec about ref; amplitude; sigma arcsec)."""
    rng = np.random.default_rng([seed, 3])
    ny, nx = shape
    # extent of the mosaic in standard coordinates (arcsec)
    corners = []
    for e in exposures:
        xi, eta = pixel_to_standard(np.array([0, nx - 1, nx - 1, 0]),
                                    np.array([0, 0, ny - 1, ny - 1]),
                                    shape, e["crval"], e["roll"], ref, pixscale)
        corners.append(np.stack([xi, eta]) * 3600.0)
    corners = np.concatenate(corners, axis=1)
    lo, hi = corners.min(axis=1), corners.max(axis=1)
    n = int(round(SOURCE_DENSITY * np.prod(hi - lo) / 3600.0))
    x0 = rng.uniform(lo[0], hi[0], n)
    y0 = rng.uniform(lo[1], hi[1], n)
    amp = np.exp(rng.uniform(np.log(0.05), np.log(2.0), n))
    sig = rng.uniform(0.05, 0.15, n)
    return np.stack([x0, y0, amp, sig], axis=1)


def make_exposure(exp, coef, sources, shape=(2048, 2048), seed=0,
                  pixscale=PIXSCALE, ref=CENTER, check_wcs=True):
    """One ``cal`` ImageModel."""
    from stdatamodels.jwst.datamodels import ImageModel

    ny, nx = shape
    k = exp["index"]
    crval, roll = exp["crval"], exp["roll"]
    rng = np.random.default_rng([seed, 4, k])

    y, x = np.mgrid[0:ny, 0:nx].astype(np.float64)  # rows, columns
    xi, eta = pixel_to_standard(x, y, shape, crval, roll, ref, pixscale)
    del x, y
    data = (coef[0, 0] + SKY) + coef[1, 0] * xi + coef[0, 1] * eta
    if coef[1, 1]:
        data += coef[1, 1] * xi * eta

    # compact sources: stamps around their pixel positions
    sx, sy = standard_to_pixel(sources[:, 0] / 3600.0, sources[:, 1] / 3600.0,
                               shape, crval, roll, ref, pixscale)
    for (x0, y0, amp, sig), px, py in zip(sources, sx, sy):
        r = int(np.ceil(5 * sig / pixscale))
        if px < -r or py < -r or px > nx - 1 + r or py > ny - 1 + r:
            continue
        i0, i1 = max(int(py) - r, 0), min(int(py) + r + 2, ny)
        j0, j1 = max(int(px) - r, 0), min(int(px) + r + 2, nx)
        if i0 >= i1 or j0 >= j1:
            continue
        dxi = xi[i0:i1, j0:j1] * 3600.0 - x0
        deta = eta[i0:i1, j0:j1] * 3600.0 - y0
        data[i0:i1, j0:j1] += amp * np.exp(-(dxi * dxi + deta * deta) / (2 * sig * sig))
    del xi, eta
    data = data.astype(np.float32)
    data += np.float32(NOISE) * rng.standard_normal(shape, dtype=np.float32)

    dq = np.zeros(shape, dtype=np.uint32)
    bad = (rng.integers(0, ny, N_BAD), rng.integers(0, nx, N_BAD))
    dq[bad] = 1  # DO_NOT_USE
    data[bad] = np.nan

    w = tan_wcs(shape, crval, roll, pixscale)
    if check_wcs:
        tx = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, nx / 3.0])
        ty = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, ny / 5.0])
        ra, dec = w(tx, ty, with_bounding_box=False)
        a = np.array(standard_coords(ra, dec, *ref))
        b = np.array(pixel_to_standard(tx, ty, shape, crval, roll, ref, pixscale))
        if np.max(np.abs(a - b)) * 3600.0 > 1e-6:
            raise RuntimeError("analytic pixel->sky disagrees with the gwcs")

    m = ImageModel(data=data)
    m.dq = dq
    m.err = np.full(shape, NOISE, dtype=np.float32)
    m.var_rnoise = np.full(shape, NOISE ** 2, dtype=np.float32)
    m.var_poisson = np.zeros(shape, dtype=np.float32)
    m.var_flat = np.zeros(shape, dtype=np.float32)
    m.meta.wcs = w
    _set_meta(m, exp, shape, pixscale)
    m.meta.wcsinfo.s_region = s_region(w, shape)
    return m


def _set_meta(m, exp, shape, pixscale):
    m.meta.filename = exp["filename"]
    set_nircam_cal_meta(m.meta, exp["index"], shape, pixscale, exp["crval"], exp["roll"],
                        visit_group=f"{exp['pointing'] + 1:02d}",
                        sequence_id=f"{exp['dither'] + 1}")


def set_nircam_cal_meta(meta, index, shape, pixscale, crval, roll, *, detector="NRCA1",
                        visit_group="02", sequence_id="1", subarray=None):
    """Metadata of a NIRCam imaging ``cal`` exposure, as calwebb_image3 reads it.

    ``index`` numbers the exposure (its times and exposure number);
    ``crval`` and ``roll`` are its pointing (degrees); ``subarray``
    defaults to ``'FULL'`` for 2048 x 2048, else ``'GENERIC'``. The file
    name and ``s_region`` are the caller's.
    """
    ny, nx = shape
    meta.bunit_data = "MJy/sr"
    meta.bunit_err = "MJy/sr"
    meta.telescope = "JWST"
    meta.instrument.name = "NIRCAM"
    meta.instrument.detector = detector
    meta.instrument.channel = "SHORT"
    meta.instrument.module = "A"
    meta.instrument.filter = "F200W"
    meta.instrument.pupil = "CLEAR"
    meta.exposure.type = "NRC_IMAGE"
    t0 = 60000.0 + 0.01 * index
    meta.exposure.start_time = t0
    meta.exposure.end_time = t0 + 0.005
    meta.exposure.mid_time = t0 + 0.0025
    meta.exposure.exposure_time = 400.0
    meta.exposure.effective_exposure_time = 400.0
    meta.exposure.duration = 420.0
    meta.exposure.measurement_time = 380.0
    meta.exposure.elapsed_exposure_time = 400.0
    meta.exposure.nints = 1
    meta.observation.date = "2026-01-01"
    meta.observation.time = "00:00:00"
    meta.observation.program_number = "01234"
    meta.observation.observation_number = "001"
    meta.observation.visit_number = "001"
    meta.observation.visit_group = visit_group
    meta.observation.sequence_id = sequence_id
    meta.observation.activity_id = "01"
    meta.observation.exposure_number = f"{index + 1:05d}"
    meta.target.type = "FIXED"
    if subarray is None:
        subarray = "FULL" if tuple(shape) == (2048, 2048) else "GENERIC"
    meta.subarray.name = subarray
    meta.subarray.xstart = 1
    meta.subarray.ystart = 1
    meta.subarray.xsize = nx
    meta.subarray.ysize = ny
    meta.photometry.pixelarea_arcsecsq = pixscale ** 2
    meta.photometry.pixelarea_steradians = (pixscale / 206264.806) ** 2
    meta.wcsinfo.ra_ref = crval[0]
    meta.wcsinfo.dec_ref = crval[1]
    meta.wcsinfo.roll_ref = roll
    meta.wcsinfo.v3yangle = 0.0
    meta.wcsinfo.vparity = -1
    for step in ("assign_wcs", "flat_field", "photom"):
        setattr(meta.cal_step, step, "COMPLETE")


def write_asn(folder, filenames, product=PRODUCT, name=ASN_NAME):
    members = [{"expname": os.path.basename(f), "exptype": "science"} for f in filenames]
    asn = {"asn_type": "image3", "asn_rule": "DMS_Level3_Base", "asn_id": "a3001",
           "asn_pool": "synthetic", "program": "01234", "target": "1",
           "products": [{"name": product, "members": members}]}
    path = os.path.join(folder, name)
    with open(path, "w") as fh:
        json.dump(asn, fh, indent=1)
    return path


def write_mosaic(folder, pointings=(2, 2), dithers=4, shape=(2048, 2048), seed=0,
                 verbose=False):
    """Write the ``cal`` files, an image3 association and ``truth.json``.

    Returns ``(asn_path, truth)``; ``truth`` is the dict stored in
    ``truth.json``: ``refpoint`` [ra, dec], ``pixscale``, ``shape``,
    ``noise``, ``sky`` and ``members`` {file name: {``coefficients`` (2x2,
    C[i][j] * xi**i * eta**j, degrees about refpoint), ``crval``, ``roll``,
    ``pointing``, ``dither``}}.
    """
    shape = tuple(int(s) for s in shape)
    os.makedirs(folder, exist_ok=True)
    exposures = layout(tuple(pointings), int(dithers), shape, seed)
    planes = random_planes(exposures, shape, seed)
    sources = random_sources(exposures, shape, seed)
    truth = {"refpoint": list(CENTER), "pixscale": PIXSCALE, "shape": list(shape),
             "noise": NOISE, "sky": SKY, "pointings": list(pointings),
             "dithers": int(dithers), "seed": int(seed), "nsources": len(sources),
             "members": {}}
    t0 = time.perf_counter()
    for exp, coef in zip(exposures, planes):
        m = make_exposure(exp, coef, sources, shape, seed)
        m.save(os.path.join(folder, exp["filename"]))
        m.close()
        del m
        truth["members"][exp["filename"]] = {
            "coefficients": coef.tolist(), "crval": exp["crval"], "roll": exp["roll"],
            "pointing": exp["pointing"], "dither": exp["dither"],
        }
        if verbose:
            print(f"  {exp['filename']}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    asn_path = write_asn(folder, [e["filename"] for e in exposures])
    with open(os.path.join(folder, TRUTH_NAME), "w") as fh:
        json.dump(truth, fh, indent=1)
    return asn_path, truth


def read_truth(folder):
    with open(os.path.join(folder, TRUTH_NAME)) as fh:
        return json.load(fh)


def footprint_samples(member, truth, n=16):
    """(ra, dec) of an ``n x n`` grid of pixel positions across a detector."""
    ny, nx = truth["shape"]
    y, x = np.meshgrid(np.linspace(0, ny - 1, n), np.linspace(0, nx - 1, n),
                       indexing="ij")
    xi, eta = pixel_to_standard(x, y, (ny, nx), member["crval"], member["roll"],
                                truth["refpoint"], truth["pixscale"])
    return from_standard(xi, eta, *truth["refpoint"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--pointings", type=int, nargs=2, default=(2, 2))
    ap.add_argument("--dithers", type=int, default=4)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    asn, truth = write_mosaic(args.folder, args.pointings, args.dithers,
                              (args.size, args.size), args.seed, verbose=True)
    print(f"wrote {len(truth['members'])} exposures, {truth['nsources']} sources, "
          f"{asn} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
