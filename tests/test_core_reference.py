"""The engine against the reference ``wiimatch`` 0.3.2, where 0.3.2 works.

The reference is only usable on: square grids when ``center=None`` (it swaps
axes of the default center otherwise), sigmas given whenever masks are
given, bool/int8 masks holding 0/1, float64 data.  On those cases
coefficients, a and b must agree within 1e-8 relative.  For non-square
grids with ``center=None`` the fitted *surfaces* must agree while the
coefficients (expressed about a different center) differ.
"""
import itertools

import numpy as np
import pytest

import oracle as O
from jwst_wiimatch.match import match_lsq
import jwst_wiimatch

wiimatch = pytest.importorskip("wiimatch")
from wiimatch.containers import WMInMemoryData  # noqa: E402
from wiimatch.match import match_lsq as ref_match_lsq  # noqa: E402


def ref_call(images, masks=None, sigmas=None, **kw):
    """Reference call kept in memory (its default writes tmp files)."""
    wrap = (lambda lst: None if lst is None else
            [WMInMemoryData(np.asarray(x)) for x in lst])
    return ref_match_lsq(wrap(images), wrap(masks), wrap(sigmas),
                         default_container=WMInMemoryData, **kw)


def rel_err(x, y):
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    assert x.shape == y.shape
    return np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-300)


SQUARE = {1: (11,), 2: (8, 8), 3: (5, 5, 5)}
NONSQUARE = {1: (11,), 2: (7, 9), 3: (4, 5, 6)}
DEGREES = {1: [0, 1, 3], 2: [0, 1, 2, (2, 1)], 3: [0, 1, (1, 2, 0)]}


def _cases():
    out = []
    i = 0
    for ndim in (1, 2, 3):
        for deg, wt, geom in itertools.product(
                DEGREES[ndim], ["neither", "sigmas", "both"],
                ["none", "given", "i2w_image", "i2w_world", "i2w_none"]):
            if (i % 2) and geom in ("i2w_world", "i2w_none"):
                i += 1
                continue  # thin the grid a little
            out.append(pytest.param(ndim, deg, wt, geom, i,
                                    id=f"{ndim}d-deg{deg}-{wt}-{geom}"))
            i += 1
    return out


def make_case(ndim, deg, wt, geom, seed):
    rng = np.random.default_rng(1000 + seed)
    square = geom in ("none", "i2w_none")
    shape = (SQUARE if square else NONSQUARE)[ndim]
    n = 3
    bmasks = O.box_masks(rng, shape, n, frac=0.8, holes=0.05)
    images = [rng.normal(size=shape) + 2.0 * i for i in range(n)]
    sig = [rng.uniform(0.5, 2.0, size=shape) for _ in range(n)]
    kw = dict(degree=deg)
    if wt == "both":
        mdtype = np.int8 if seed % 2 else bool
        kw["masks"] = [m.astype(mdtype) for m in bmasks]
        kw["sigmas"] = sig
    elif wt == "sigmas":
        kw["sigmas"] = [np.where(m, s, 0.0) for m, s in zip(bmasks, sig)]
    inner = tuple(rng.uniform(0.3 * (k - 1), 0.7 * (k - 1))
                  for k in shape[::-1])
    if geom == "given":
        kw["center"] = inner
    elif geom == "i2w_image":
        kw.update(image2world=O.smooth_image2world, center=inner,
                  center_cs="image")
    elif geom == "i2w_world":
        kw.update(image2world=O.smooth_image2world,
                  center=tuple(float(v) - 0.2
                               for v in O.smooth_image2world(*inner)),
                  center_cs="world")
    elif geom == "i2w_none":
        kw.update(image2world=O.smooth_image2world)
    return images, kw


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
@pytest.mark.parametrize("ndim, deg, wt, geom, seed", _cases())
def test_equal_to_reference(ndim, deg, wt, geom, seed, solver):
    images, kw = make_case(ndim, deg, wt, geom, seed)
    masks = kw.pop("masks", None)
    sigmas = kw.pop("sigmas", None)
    ref = ref_call(images, masks, sigmas, ext_return=True, solver=solver,
                   **kw)
    got = match_lsq(images, masks, sigmas, ext_return=True, solver=solver,
                    **kw)
    assert rel_err(got[1], ref[1]) <= 1e-8, "a"
    assert rel_err(got[2], ref[2]) <= 1e-8, "b"
    assert rel_err(got[0], ref[0]) <= 1e-8, "coef"
    for c, rc in zip(got[3], ref[3]):
        np.testing.assert_allclose(c, rc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got[4], float),
                               np.asarray(ref[4], float), rtol=1e-13)
    assert got[5] == ref[5]


@pytest.mark.parametrize("ndim, deg, wt, geom, seed", _cases()[::3])
def test_oracle_equals_reference(ndim, deg, wt, geom, seed):
    """Self-check of the oracle on the reference's working domain."""
    images, kw = make_case(ndim, deg, wt, geom, seed)
    masks = kw.pop("masks", None)
    sigmas = kw.pop("sigmas", None)
    ref = ref_call(images, masks, sigmas, ext_return=True, **kw)
    a, b, coords, eff, cs = O.oracle_normal_equations(images, masks, sigmas,
                                                      **kw)
    assert rel_err(a, ref[1]) <= 1e-12
    assert rel_err(b, ref[2]) <= 1e-12
    assert rel_err(O.oracle_solve(images, masks, sigmas, **kw),
                   ref[0]) <= 1e-8
    assert cs == ref[5]


# ------------------------------------------------------------ seed example
def seed_images():
    im1 = np.zeros((5, 5, 4), dtype=float)
    ind = np.indices(im1.shape, dtype=float)
    im3 = 1.32 + 0.15 * ind[0] + 0.62 * ind[1] + 0.74 * ind[2]
    mask = np.ones_like(im1, dtype=np.int8)
    sigma = np.ones_like(im1, dtype=float)
    return [im1, im3], [mask, mask], [sigma, sigma]


@pytest.mark.parametrize("solver", ["RLU", "PINV"])
def test_seed_example(solver):
    images, masks, sigmas = seed_images()
    coef, a, b, coords, eff, cs = match_lsq(
        images, masks, sigmas, degree=(1, 1, 1), center=(0, 0, 0),
        ext_return=True, solver=solver)
    expected = np.array([-0.66, -0.075, -0.31, 0, -0.37, 0, 0, 0])
    np.testing.assert_allclose(coef[0], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(coef[1], -expected, rtol=0, atol=1e-12)
    assert a[0, 0] == 50
    assert b[0] == -198.5
    assert b[-1] == 1607
    assert coef.shape == (2, 8) and coef.dtype == np.float64
    # also through the package-level name
    np.testing.assert_allclose(
        jwst_wiimatch.match_lsq(images, masks, sigmas, degree=(1, 1, 1),
                                center=(0, 0, 0), solver=solver),
        coef, rtol=0, atol=1e-14)
    ref = ref_call(images, masks, sigmas, degree=(1, 1, 1),
                   center=(0, 0, 0), ext_return=True, solver=solver)
    assert rel_err(a, ref[1]) <= 1e-12
    assert rel_err(b, ref[2]) <= 1e-12
    assert rel_err(coef, ref[0]) <= 1e-8


# ------------------------------------------------------------ center=None
@pytest.mark.parametrize("solver", ["RLU", "PINV"])
@pytest.mark.parametrize("shape, deg", [((7, 11), (2, 1)),
                                        ((9, 6), 2),
                                        ((4, 6, 7), (1, 2, 1))])
def test_nonsquare_default_center_same_surfaces(shape, deg, solver):
    rng = np.random.default_rng(77)
    n = 3
    bmasks = O.box_masks(rng, shape, n, frac=0.8, holes=0.05)
    masks = [m.astype(np.int8) for m in bmasks]
    images = [rng.normal(size=shape) + i for i in range(n)]
    sig = [rng.uniform(0.5, 2.0, size=shape) for _ in range(n)]
    ref = ref_call(images, masks, sig, degree=deg, ext_return=True,
                   solver=solver)
    got = match_lsq(images, masks, sig, degree=deg, ext_return=True,
                    solver=solver)
    ndim = len(shape)
    degt = (deg,) * ndim if np.ndim(deg) == 0 else tuple(deg)
    # our effective center is the middle in (x, y, ...) order ...
    assert tuple(float(c) for c in got[4]) == O.default_center(shape)
    # ... the reference's is numpy-axis order (the defect)
    assert tuple(float(c) for c in ref[4]) == tuple(
        float(k // 2) for k in shape)
    s_ref = O.surfaces(ref[0], ref[3], degt)
    s_got = O.surfaces(got[0], got[3], degt)
    scale = np.max(np.abs(s_ref))
    assert np.max(np.abs(s_got - s_ref)) <= 1e-8 * scale
    # while the coefficients themselves differ
    assert rel_err(got[0], ref[0]) > 1e-3
