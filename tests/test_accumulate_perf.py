"""The world-coordinate accumulation path (issue 7): its monomial table, its
chunks of rows and groups of pairs, and its buffers, against direct sums.

No timings here (the benchmark measures them): these tests check that the
faster path computes the same sums as the plain formulas, whatever the chunk
sizes, the pair groups and the number of threads.
"""
import itertools

import numpy as np
import pytest

from jwst_wiimatch.core import accumulate as acc_mod
from jwst_wiimatch.core.accumulate import _Accumulator, _prepare_image, accumulate
from jwst_wiimatch.core.coords import make_frame
from jwst_wiimatch.core.inputs import check_inputs


def _plain_monomials(u, mdeg, ok):
    """``u**r`` for every ``r <= mdeg``, C order, by the textbook outer product."""
    npix = u[0].size
    table = np.ones((1, npix))
    for a, md in zip(u, mdeg):
        a = a if ok is None else np.where(ok, a, 0.0)
        p = np.empty((md + 1, npix))
        p[0] = 1.0
        for k in range(1, md + 1):
            p[k] = p[k - 1] * a
        table = (table[:, None, :] * p[None, :, :]).reshape(-1, npix)
    return table


class _Frame:
    separable = False


class _Prob:
    images = [None, None]

    def __init__(self, degree):
        self.degree = degree


@pytest.mark.parametrize("degree", [(2, 2), (1, 1), (0, 2), (3, 1), (2,), (0,),
                                    (1, 2, 1), (0, 0, 2)])
@pytest.mark.parametrize("with_ok", [False, True])
def test_world_monomials_are_the_plain_outer_product(degree, with_ok):
    acc = _Accumulator(_Prob(degree), _Frame(), [None, None])
    rng = np.random.default_rng(len(degree) + sum(degree))
    npix = 37
    u = [rng.uniform(-1.5, 1.5, npix) for _ in degree]
    ok = rng.random(npix) > 0.3 if with_ok else None
    mdeg = tuple(2 * d for d in degree)
    ref = _plain_monomials(u, mdeg, ok)
    # into a buffer holding garbage: every row must be written
    buf = np.full(acc._monomial_size() * npix + 5, np.nan)
    phi, phid = acc._world_monomials(u, ok, out=buf)
    assert phi.shape == ref.shape
    # each row is a permutation of the plain table's, bit for bit
    full = np.empty_like(ref)
    full[acc.mono_order] = phi
    np.testing.assert_array_equal(full, ref)
    assert sorted(acc.mono_order.tolist()) == list(range(ref.shape[0]))
    # the data moments' rows (r <= D) are the first rows
    dshape = tuple(d + 1 for d in degree)
    refd = ref.reshape(tuple(m + 1 for m in mdeg) + (npix,))[
        tuple(slice(0, n) for n in dshape)].reshape(-1, npix)
    fd = np.empty_like(refd)
    fd[acc.dmono_order] = phid
    np.testing.assert_array_equal(fd, refd)
    assert np.shares_memory(phid, phi) and phid.shape[0] == int(np.prod(dshape))


def _world(x, y):
    """Non-linear and not separable; not finite on a corner of the grid."""
    ra = 10.0 + 0.01 * x + 2e-4 * x * y + 1e-5 * y * y
    dec = -3.0 + 0.012 * y - 1e-4 * x * x
    bad = (x > 52) & (y > 40)
    return np.where(bad, np.nan, ra), dec


def _inputs(n=6, shape=(57, 64), seed=2):
    rng = np.random.default_rng(seed)
    ims, masks, sigs = [], [], []
    for i in range(n):
        m = np.zeros(shape, dtype=bool)
        y0, x0 = rng.integers(0, shape[0] // 3), rng.integers(0, shape[1] // 3)
        m[y0:y0 + 2 * shape[0] // 3, x0:x0 + 2 * shape[1] // 3] = True
        m &= rng.random(shape) > 0.05
        ims.append(rng.normal(size=shape) + i)
        masks.append(m)
        sigs.append(rng.uniform(0.5, 2.0, shape).astype(np.float32))
    return ims, masks, sigs


def _direct(ims, masks, sigs, frame, degree):
    """S, T, chi and pixel counts of every pair, summed over the whole grid at once."""
    shape = ims[0].shape
    yy, xx = np.indices(shape, dtype=float)
    X = [w - c for w, c in zip(frame.image2world(xx, yy), frame.eff_center)]
    u = [(a - s0) / s1 for a, s0, s1 in zip(X, frame.shift, frame.scale)]
    fin = np.isfinite(u[0]) & np.isfinite(u[1])
    mdeg = tuple(2 * d for d in degree)
    out = {}
    for a, b in itertools.combinations(range(len(ims)), 2):
        sel = masks[a] & masks[b] & fin
        if not sel.any():
            continue
        w = 1.0 / (sigs[a][sel].astype(float) ** 2 + sigs[b][sel].astype(float) ** 2)
        d = ims[a][sel] - ims[b][sel]
        phi = _plain_monomials([v[sel] for v in u], mdeg, None)
        S = (phi @ w).reshape(tuple(m + 1 for m in mdeg))
        T = (phi @ (w * d)).reshape(tuple(m + 1 for m in mdeg))[
            tuple(slice(0, k + 1) for k in degree)]
        out[a, b] = (S, T, float(np.sum(w * d * d)), int(sel.sum()))
    return out


@pytest.mark.parametrize("chunk,batch,threads", [
    (None, None, 1),  # the defaults: whole blocks of rows
    (1, None, 1),  # one row per chunk
    (3000, 2, 2),  # a few rows per chunk, pairs in groups of two
    (1, 4, 3),
])
def test_world_sums_equal_direct_sums(monkeypatch, chunk, batch, threads):
    ims, masks, sigs = _inputs()
    degree = (2, 2)
    if chunk is not None:
        monkeypatch.setattr(acc_mod, "WORLD_CHUNK_ELEMS", chunk)
    if batch is not None:
        monkeypatch.setattr(acc_mod, "PAIR_BATCH", batch)
    monkeypatch.setattr(acc_mod, "BLOCK_PIXELS", 700)  # several blocks
    prob = check_inputs(ims, masks, sigs, degree)
    frame = make_frame(prob.shape, image2world=_world)
    mom = accumulate(prob, frame, threads=threads)
    ref = _direct(ims, masks, sigs, frame, degree)
    assert set(mom.S) == set(ref)
    for key, (S, T, chi, npix) in ref.items():
        np.testing.assert_allclose(mom.S[key], S, rtol=1e-12, atol=1e-12 * np.abs(S).max())
        np.testing.assert_allclose(mom.T[key], T, rtol=1e-12, atol=1e-12 * np.abs(T).max())
        np.testing.assert_allclose(mom.chi[key], chi, rtol=1e-12)
        assert mom.npix[key] == npix
    assert mom.bad_coords > 0  # the corner where the world coordinates are NaN


def test_world_sums_do_not_depend_on_threads(monkeypatch):
    ims, masks, sigs = _inputs(n=7, seed=5)
    monkeypatch.setattr(acc_mod, "BLOCK_PIXELS", 500)
    monkeypatch.setattr(acc_mod, "WORLD_CHUNK_ELEMS", 4000)
    monkeypatch.setattr(acc_mod, "PAIR_BATCH", 5)
    prob = check_inputs(ims, masks, sigs, (1, 2))
    frame = make_frame(prob.shape, image2world=_world)
    one = accumulate(prob, frame, threads=1)
    many = accumulate(prob, frame, threads=3)
    assert list(one.S) == list(many.S)
    for key in one.S:  # blocks are added in block order: identical sums
        np.testing.assert_array_equal(one.S[key], many.S[key])
        np.testing.assert_array_equal(one.T[key], many.T[key])
        assert one.chi[key] == many.chi[key]
        assert one.npix[key] == many.npix[key]


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan, 1e-45])
@pytest.mark.parametrize("masked", [False, True])
def test_float32_sigma_checks(bad, masked):
    """float32 sigmas skip the upper-bound pass; bad values are still found."""
    rng = np.random.default_rng(0)
    shape = (20, 30)
    ims = [rng.normal(size=shape) for _ in range(2)]
    sigs = [rng.uniform(0.5, 1.5, shape).astype(np.float32) for _ in range(2)]
    sigs[0][5, 7] = bad
    masks = [np.ones(shape, dtype=bool), np.ones(shape, dtype=bool)]
    if masked:
        masks[0][:2] = False
    prob = check_inputs(ims, masks, sigs, (1, 1))
    frame = make_frame(prob.shape)
    mom = accumulate(prob, frame, threads=1)
    box = ((0, shape[0]), (0, shape[1]))
    _, _, valid, counts = _prepare_image(prob, 0, box)  # the careful path's verdict
    # the bad pixel is out, a float32 denormal sigma (its square is normal) in
    assert np.count_nonzero(masks[0] & ~valid) == (0 if bad == 1e-45 else 1)
    assert mom.npix[0, 1] == int(np.count_nonzero(valid & masks[1]))
    assert (mom.nonfinite[0], mom.sigma_out[0]) == counts[:2]
