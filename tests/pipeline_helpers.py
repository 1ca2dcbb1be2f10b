"""Synthetic Level-2 (``cal``) NIRCam-like exposures for the calwebb tests.

A dithered field: every exposure sees the same sky (a flat astrophysical
level plus a few compact sources) through its own detector grid (its own
pointing and roll), plus its own background plane, plus Gaussian noise with
a matching ERR / VAR_RNOISE. The metadata is what jwst 3.0.0's
``Image3Pipeline`` (association reading, exposure grouping, ``skymatch``,
``resample``, saving) needs; no reference file and no CRDS access is needed.

Backgrounds are injected as planes in the gnomonic standard coordinates
``(xi, eta)`` (degrees) about the field center, computed by
``step_helpers.standard_coords`` (a vector formula independent of the
package under test) and evaluated with ``oracle.polyval_nd``; the detector
WCS comes from ``step_helpers.tan_wcs``.
"""

import json
import os

import numpy as np

import oracle as O
import step_helpers as h
from mosaic_data import set_nircam_cal_meta

#: Field center (ICRS degrees).
FIELD = (53.16, -27.78)
PIXSCALE = 0.1  # arcsec / pixel
SHAPE = (64, 64)
NOISE = 0.01  # MJy/sr per pixel
SKY = 0.2  # astrophysical level common to all exposures (MJy/sr)

# (dx, dy) pointing offsets in arcsec (east, north) and roll in degrees
DITHERS = [(0.0, 0.0, 0.0), (2.2, 0.9, 4.0), (0.7, 2.5, -3.0), (2.6, 2.8, 7.0)]
# background planes: (level, d/dxi, d/deta) with gradients per arcsec
PLANES = [(1.00, 0.020, -0.010), (1.30, -0.015, 0.025), (0.80, 0.010, 0.030),
          (1.10, -0.025, -0.020)]


def gradient_coefficients(plane):
    """Injected plane as a [[c00, c01], [c10, c11]] array in (xi, eta) degrees."""
    level, gx, gy = plane
    c = np.zeros((2, 2))
    c[0, 0] = level
    c[1, 0] = gx * 3600.0
    c[0, 1] = gy * 3600.0
    return c


#: offset (arcsec, east) of the second detector of an exposure
DETECTOR_GAP = 6.9


def exposure_wcs(k, shape=SHAPE, detector=0):
    """gwcs of exposure ``k``, ``detector`` (TAN, own pointing and roll), CRVAL."""
    dx, dy, roll = DITHERS[k]
    dx = dx + detector * DETECTOR_GAP
    dec = FIELD[1] + dy / 3600.0
    ra = FIELD[0] + dx / 3600.0 / np.cos(np.radians(dec))
    # jwst's imaging WCS: celestial frame "world" with axes lon, lat, and shapes set
    w = h.tan_wcs(shape, (ra, dec), PIXSCALE, rotation_deg=roll,
                  sky_axes_names=("lon", "lat"), with_shape=True)
    return w, (ra, dec)


def sky_model(ra, dec, seed=7):
    """Noise-free common sky (MJy/sr) at sky positions, incl. a few sources."""
    rng = np.random.default_rng(seed)
    xi, eta = h.standard_coords(ra, dec, *FIELD)
    xi, eta = xi * 3600.0, eta * 3600.0  # arcsec
    out = np.full(np.shape(xi), SKY)
    for _ in range(6):
        x0, y0 = rng.uniform(-2.0, 5.0, 2)
        amp, s = rng.uniform(0.5, 3.0), rng.uniform(0.1, 0.3)
        out += amp * np.exp(-((xi - x0) ** 2 + (eta - y0) ** 2) / (2 * s * s))
    return out


def injected_background(k, ra, dec):
    """Background plane of exposure ``k`` at sky positions."""
    xi, eta = h.standard_coords(ra, dec, *FIELD)
    return O.polyval_nd(gradient_coefficients(PLANES[k]), [xi, eta])


def s_region(w, shape=SHAPE):
    ny, nx = shape
    xs = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    ys = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    ra, dec = w(xs, ys, with_bounding_box=False)
    return "POLYGON ICRS " + " ".join(f"{a:.9f} {d:.9f}" for a, d in zip(ra, dec))


def make_cal(k, backgrounds=True, seed=100, shape=SHAPE, detector=0):
    """One synthetic ``cal`` ImageModel (exposure ``k``, 0-based; ``detector``
    0 is NRCA1, 1 is NRCA2, east of it, in the same exposure)."""
    from stdatamodels.jwst.datamodels import ImageModel

    rng = np.random.default_rng(seed + k + 50 * detector)
    w, (ra0, dec0) = exposure_wcs(k, shape, detector)
    ra, dec = h.grid_world(w, shape)
    data = sky_model(ra, dec)
    if backgrounds:
        data = data + injected_background(k, ra, dec)
    data = data + rng.normal(0.0, NOISE, shape)
    dq = np.zeros(shape, dtype=np.uint32)
    # a few bad pixels, flagged and NaN as in real cal files
    for _ in range(4):
        p = tuple(int(rng.integers(2, s - 2)) for s in shape)
        dq[p] = 1  # DO_NOT_USE
        data[p] = np.nan
    m = ImageModel(data=data.astype(np.float32))
    m.dq = dq
    m.err = np.full(shape, NOISE, dtype=np.float32)
    m.var_rnoise = np.full(shape, NOISE ** 2, dtype=np.float32)
    m.var_poisson = np.zeros(shape, dtype=np.float32)
    m.var_flat = np.zeros(shape, dtype=np.float32)
    m.meta.wcs = w
    m.meta.filename = f"jw01234001001_0210{k + 1}_00001_nrca{detector + 1}_cal.fits"
    set_nircam_cal_meta(m.meta, k, shape, PIXSCALE, (ra0, dec0), DITHERS[k][2],
                        detector=f"NRCA{detector + 1}", subarray="SUB64P")
    m.meta.wcsinfo.s_region = s_region(w, shape)
    return m


def write_field(folder, n=4, backgrounds=True, product="wiifield", detectors=1):
    """Save ``n`` exposures of ``detectors`` cal files each and an image3
    association; return its path."""
    os.makedirs(folder, exist_ok=True)
    members = []
    for k in range(n):
        for det in range(detectors):
            m = make_cal(k, backgrounds=backgrounds, detector=det)
            m.save(os.path.join(folder, m.meta.filename))
            members.append({"expname": m.meta.filename, "exptype": "science"})
            m.close()
    asn = {"asn_type": "image3", "asn_rule": "DMS_Level3_Base", "asn_id": "a3001",
           "asn_pool": "synthetic", "program": "01234", "target": "1",
           "products": [{"name": product, "members": members}]}
    path = os.path.join(folder, "asn_image3.json")
    with open(path, "w") as fh:
        json.dump(asn, fh)
    return path


def overlap_seam_rms(models, min_pixels=50):
    """RMS of pairwise differences of images on one grid, over their overlaps.

    ``models`` are images on one common grid (resampled singles). Returns the
    RMS over every pixel of every overlapping pair (each pair's mean is NOT
    removed: a constant offset is a seam too).
    """
    datas = [np.asarray(m.data, dtype=np.float64) for m in models]
    wht = [np.asarray(m.wht) if m.wht is not None else np.ones_like(d)
           for m, d in zip(models, datas)]
    sq, npix = 0.0, 0
    for a in range(len(datas)):
        for b in range(a + 1, len(datas)):
            sel = (np.isfinite(datas[a]) & np.isfinite(datas[b])
                   & (wht[a] > 0) & (wht[b] > 0))
            # stay away from footprint edges (partial pixel coverage)
            if np.count_nonzero(sel) < min_pixels:
                continue
            d = (datas[a] - datas[b])[sel]
            sq += float(np.sum(d * d))
            npix += d.size
    return np.sqrt(sq / npix)
