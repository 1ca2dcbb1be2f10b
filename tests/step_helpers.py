"""Builders of small synthetic resampled JWST models for the step tests.

Everything here is independent of the adapters under test: the tangent-plane
coordinates used to inject backgrounds are computed with a vector formula,
not with ``jwst_wiimatch.models``, and backgrounds are evaluated with the
brute-force ``oracle.polyval_nd``. ``tan_wcs`` is the one TAN gwcs builder
of the tests.
"""

import json
import os

import numpy as np

import oracle as O


def tan_wcs(shape, crval, pixscale_arcsec=0.1, rotation_deg=0.0, spectral=None,
            sky_axes_names=None, with_shape=False):
    """A gwcs TAN WCS ``detector -> world`` for a grid of numpy ``shape``.

    The tangent point ``crval`` (ICRS degrees) is at the grid center
    ``((nx - 1) / 2, (ny - 1) / 2)``; pixels are ``pixscale_arcsec`` square,
    +x to the west (RA decreasing) and +y to the north at
    ``rotation_deg = 0``, the axes turned by ``rotation_deg`` (a roll; at 90,
    +x is north).
    The bounding box is the grid, pixel edges included.

    ``spectral=(lam0, dlam)`` adds a linear wavelength axis (cubes): plane z
    has wavelength ``lam0 + dlam * z`` (microns); the celestial frame is then
    named ``sky`` inside a composite frame ``world``. Without it the
    celestial frame itself is ``world``, as JWST names the output frame of
    its imaging gwcs. ``sky_axes_names`` names the celestial axes (gwcs's
    default when None). ``with_shape`` also sets ``pixel_shape`` and
    ``array_shape`` (as the WCS of a jwst ``cal`` product has them).
    """
    from astropy import coordinates as coord
    from astropy import units as u
    from astropy.modeling import models
    from gwcs import coordinate_frames as cf
    from gwcs import wcs

    ny, nx = shape[-2:]
    scale = pixscale_arcsec / 3600.0
    crpix = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    th = np.radians(rotation_deg)
    pc = np.array([[-np.cos(th), np.sin(th)], [np.sin(th), np.cos(th)]]) * scale
    sky = ((models.Shift(-crpix[0]) & models.Shift(-crpix[1]))
           | models.AffineTransformation2D(matrix=pc)
           | models.Pix2Sky_TAN()
           | models.RotateNative2Celestial(crval[0], crval[1], 180.0))
    frame_kw = {} if sky_axes_names is None else {"axes_names": tuple(sky_axes_names)}
    sky_frame = cf.CelestialFrame(reference_frame=coord.ICRS(),
                                  name="world" if spectral is None else "sky",
                                  unit=(u.deg, u.deg), **frame_kw)
    if spectral is None:
        det = cf.Frame2D(name="detector", axes_names=("x", "y"), unit=(u.pix, u.pix))
        w = wcs.WCS([(det, sky), (sky_frame, None)])
        w.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    else:
        nz = shape[0]
        lam0, dlam = spectral
        spec = models.Scale(dlam) | models.Shift(lam0)
        det = cf.CoordinateFrame(naxes=3, axes_type=("PIXEL", "PIXEL", "PIXEL"),
                                 axes_order=(0, 1, 2), name="detector",
                                 axes_names=("x", "y", "z"), unit=(u.pix, u.pix, u.pix))
        spec_frame = cf.SpectralFrame(name="spectral", unit=(u.micron,),
                                      axes_order=(2,), axes_names=("wavelength",))
        world = cf.CompositeFrame([sky_frame, spec_frame], name="world")
        w = wcs.WCS([(det, sky & spec), (world, None)])
        w.bounding_box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5), (-0.5, nz - 0.5))
    if with_shape:
        w.pixel_shape = tuple(shape[::-1])
        w.array_shape = tuple(shape)
    return w


def standard_coords(ra, dec, ra0, dec0):
    """Gnomonic standard coordinates (degrees), by unit vectors."""
    a, d = np.radians(ra), np.radians(dec)
    a0, d0 = np.radians(ra0), np.radians(dec0)
    p = np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)])
    n0 = np.array([np.cos(d0) * np.cos(a0), np.cos(d0) * np.sin(a0), np.sin(d0)])
    exi = np.array([-np.sin(a0), np.cos(a0), 0.0])
    eeta = np.array([-np.sin(d0) * np.cos(a0), -np.sin(d0) * np.sin(a0), np.cos(d0)])
    den = np.tensordot(n0, p, 1)
    return (np.degrees(np.tensordot(exi, p, 1) / den),
            np.degrees(np.tensordot(eeta, p, 1) / den))


def grid_world(w, shape):
    """World coordinates of every pixel of a grid of numpy ``shape`` through
    the WCS ``w`` (no bounding box), in the WCS's output order."""
    pix = np.indices(shape, dtype=np.float64)[::-1]
    return w(*pix, with_bounding_box=False)


def grid_frame(w, shape, ref):
    """(xi, eta[, dlam]) of every pixel of a grid about ``ref`` (vector formula)."""
    world = grid_world(w, shape)
    xi, eta = standard_coords(world[0], world[1], ref[0], ref[1])
    return [xi, eta] + ([world[2] - ref[2]] if len(shape) == 3 else [])


def make_models(n=4, shape=(48, 56), crval=(150.0, 2.0), degree=1, seed=1,
                noise=0.05, cube=False, with_dq=True, with_err=True,
                pixscale_arcsec=0.1, spectral=(5.0, 0.01), rotation_deg=20.0):
    """Synthetic resampled models on one grid, each with its own background.

    Returns ``(models, truths, refpoint)``: ``truths[k]`` is the injected
    coefficient array in standard coordinates (xi, eta[, dlam]) in degrees
    about ``refpoint`` = world coordinates of the grid center.
    """
    from stdatamodels.jwst.datamodels import IFUCubeModel, ImageModel

    rng = np.random.default_rng(seed)
    w = tan_wcs(shape, crval, pixscale_arcsec, rotation_deg,
                spectral=spectral if cube else None)
    center = [np.array([(s - 1) / 2.0]) for s in shape[::-1]]
    ref = [float(np.ravel(v)[0]) for v in w(*center)]
    frame = grid_frame(w, shape, ref)
    ndim = len(shape)
    deg = (degree,) * ndim if np.isscalar(degree) else tuple(degree)
    # sources: the same in every exposure
    ny, nx = shape[-2:]
    scene = np.zeros(shape[-2:])
    yy, xx = np.indices((ny, nx))
    for _ in range(8):
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        amp, s = rng.uniform(2, 20), rng.uniform(0.8, 3.0)
        scene += amp * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s))
    if cube:
        scene = scene[None, :, :] * np.linspace(0.8, 1.2, shape[0])[:, None, None]
    # typical coordinate extent, to scale injected coefficients to O(1) effects
    ext = [max(np.nanmax(np.abs(c)), 1e-12) for c in frame]
    models, truths = [], []
    for k in range(n):
        coef = np.zeros(tuple(d + 1 for d in deg))
        for e in np.ndindex(coef.shape):
            size = 1.0 if sum(e) == 0 else 0.5 / (1 + sum(e))
            coef[e] = rng.uniform(-size, size) / np.prod([ext[a] ** e[a] for a in range(ndim)])
        coef.flat[0] += 3.0
        truths.append(coef)
        bkg = O.polyval_nd(coef, frame)
        err = np.full(shape, noise, dtype=np.float32)
        data = (scene + bkg + rng.normal(0, noise, shape)).astype(np.float32)
        # footprint: a band covering ~70% of the grid, shifted per exposure
        off = int(round((k / max(n - 1, 1) - 0.5) * 0.3 * nx))
        foot = (xx >= 0.15 * nx + off) & (xx < 0.85 * nx + off)
        foot &= (yy >= 0.1 * ny + k % 2 * 3) & (yy < 0.9 * ny + k % 2 * 3)
        foot = np.broadcast_to(foot, shape)
        data[~foot] = np.nan
        err[~foot] = np.nan
        dq = np.zeros(shape, dtype=np.uint32)
        if with_dq:
            # a few cosmic-ray hits, flagged DO_NOT_USE (as outlier detection does)
            for _ in range(5):
                p = tuple(rng.integers(0, s) for s in shape)
                data[p] += 500.0
                dq[p] |= 1
            dq[..., 0, :] |= 512  # NON_SCIENCE row
            data[..., 0, :] = 1e4
        cls = IFUCubeModel if cube else ImageModel
        m = cls(data=data)
        if with_err:
            m.err = err
        if with_dq:
            m.dq = dq
        if cube:
            m.weightmap = np.where(foot, 1.0, 0.0).astype(np.float32)
        else:
            m.wht = np.where(foot, 1.0, 0.0).astype(np.float32)
        m.meta.wcs = w
        m.meta.filename = f"exp{k + 1}_{'s3d' if cube else 'i2d'}.fits"
        m.meta.instrument.name = "MIRI" if cube else "NIRCAM"
        m.meta.exposure.type = "MIR_MRS" if cube else "NRC_IMAGE"
        m.meta.observation.date = "2026-01-01"
        m.meta.observation.time = "00:00:00"
        models.append(m)
    return models, truths, ref


def write_asn(models, folder, name="asn.json"):
    """Save models into ``folder`` and write an association listing them."""
    os.makedirs(folder, exist_ok=True)
    members = []
    for m in models:
        path = os.path.join(folder, m.meta.filename)
        m.save(path)
        members.append({"expname": m.meta.filename, "exptype": "science"})
    asn = {"asn_type": "image3", "asn_id": "a3001", "asn_pool": "none",
           "products": [{"name": "wiitest", "members": members}]}
    asn_path = os.path.join(folder, name)
    with open(asn_path, "w") as fh:
        json.dump(asn, fh)
    return asn_path


def frame_of_grid(model, ref):
    """(xi, eta[, dlam]) of every pixel of ``model`` about ``ref`` (vector formula)."""
    return grid_frame(model.meta.wcs, model.data.shape, ref)


def relative_error(recovered, truths, masks, stat="rms"):
    """Error of recovered background differences.

    ``recovered`` and ``truths`` are lists of background arrays on the grid.
    Returns the largest, over models n, of the RMS (``stat='rms'``) or the
    maximum (``stat='max'``) of ``|(P_n - P_0) - (T_n - T_0)|`` over pixels
    valid in model n or model 0.
    """
    worst = 0.0
    for n in range(1, len(truths)):
        dt = truths[n] - truths[0]
        dr = recovered[n] - recovered[0]
        sel = masks[n] | masks[0]
        diff = np.abs(dt - dr)[sel]
        val = np.sqrt(np.mean(diff ** 2)) if stat == "rms" else np.max(diff)
        worst = max(worst, float(val))
    return worst


def passthrough_step(loggers=("stpipe",)):
    """An stpipe Step class that returns its input, never contacts CRDS and
    configures the loggers named (to host WiiMatchStep as a hook)."""
    from stpipe import Step

    from jwst_wiimatch.step import NoCRDS

    class Passthrough(NoCRDS, Step):
        spec = """
        output_ext = string(default='.fits')
        """

        def process(self, data):
            return data

        @staticmethod
        def get_stpipe_loggers():
            return tuple(loggers)

    return Passthrough


def make_cube_build_cubes(n=3, shape=(8, 24, 28), noise=0.05, seed=5):
    """``make_models`` cubes (degree 1 per axis) with the names and metadata that
    cube_build writes for one exposure and one band (MIRI MRS ch1-short)."""
    models, truths, ref = make_models(n=n, shape=shape, cube=True, degree=[1, 1, 1],
                                      noise=noise, seed=seed)
    for k, m in enumerate(models):
        m.meta.filename = f"jw01234001001_0210{k + 1}_00001_mirifushort_ch1-short_s3d.fits"
        m.meta.instrument.channel = "1"
        m.meta.instrument.band = "SHORT"
        m.meta.ifu.error_type = "ERR"
        m.meta.cal_step.cube_build = "COMPLETE"
    return models, truths, ref
