"""Block averages of an image: the matching images of coarse matching.

Backgrounds are smooth, so they can be matched on images made of averages of
``f x f`` blocks of pixels. Each block gets the inverse-variance weighted mean
of its valid pixels and the uncertainty of that mean; its weight is the sum of
the pixel weights, so a weighted least-squares fit on the blocks uses the
same information as the fit on the pixels, up to the variation of the
polynomial within a block.
"""
import numpy as np

__all__ = ["bin_image", "weighted_mean"]


def bin_image(data, sigma, valid, factor, start=(0, 0)):
    """Inverse-variance weighted block means of a 2-D image.

    Parameters
    ----------
    data : numpy.ndarray
        2-D image (any real dtype; invalid pixels may hold anything).
    sigma : numpy.ndarray, None
        Per-pixel uncertainty of ``data``; ``None``: every valid pixel has
        weight 1 (the block's sigma is then ``1 / sqrt(count)``).
    valid : numpy.ndarray of bool
        Pixels to use.
    factor : int
        Block size ``f``: blocks are ``f x f`` pixels.
    start : tuple of int
        Index (numpy order) of ``data[0, 0]`` on the pixel grid whose blocks
        are ``[f i, f (i + 1))``: blocks are aligned with that grid, not with
        ``data``.

    Returns
    -------
    mean : numpy.ndarray
        float64 block means (0 where a block has no valid pixel).
    sigma : numpy.ndarray
        float64 uncertainty of each mean, ``1 / sqrt(sum w)`` (0 where empty: the
        engine's mark of a pixel not to use).
    count : numpy.ndarray
        int64 number of valid pixels of each block.
    origin : tuple of int
        Block index (numpy order) of ``mean[0, 0]``.

    Examples
    --------
    >>> d = np.arange(16.0).reshape(4, 4)
    >>> m, s, n, o = bin_image(d, None, np.ones((4, 4), bool), 2)
    >>> m
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    >>> s[0, 0], int(n[0, 0]), o
    (np.float64(0.5), 4, (0, 0))
    """
    f = int(factor)
    if f < 1:
        raise ValueError(f"the binning factor must be a positive integer; got {factor!r}")
    data = np.asarray(data)
    ny, nx = data.shape
    y0, x0 = (int(v) for v in start)
    # pad so that the padded array starts and ends on block boundaries
    py, px = y0 % f, x0 % f
    by = -(-(py + ny) // f)
    bx = -(-(px + nx) // f)
    w = np.zeros((by * f, bx * f))
    wd = np.zeros_like(w)
    inner = (slice(py, py + ny), slice(px, px + nx))
    ok = np.asarray(valid, dtype=bool)
    if sigma is None:
        np.copyto(w[inner], 1.0, where=ok)
    else:
        s = np.asarray(sigma, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ok = ok & np.isfinite(s) & (s > 0)
            np.divide(1.0, s * s, out=w[inner], where=ok)
    ok = ok & np.isfinite(data)
    w[inner][~ok] = 0.0
    np.multiply(w[inner], data, out=wd[inner], where=ok)
    sw = w.reshape(by, f, bx, f).sum(axis=(1, 3))
    swd = wd.reshape(by, f, bx, f).sum(axis=(1, 3))
    cnt = np.zeros((by * f, bx * f), dtype=np.int64)
    cnt[inner] = ok
    count = cnt.reshape(by, f, bx, f).sum(axis=(1, 3))
    mean, sig = weighted_mean(sw, swd)
    return mean, sig, count, (y0 // f, x0 // f)


def weighted_mean(sw, swd):
    """Means ``swd / sw`` of weighted sums and their sigma ``1 / sqrt(sw)``.

    Where ``sw`` is 0 (no data) the mean is 0 and the sigma is 0, the
    engine's mark of a pixel not to use.

    Examples
    --------
    >>> weighted_mean(np.array([4.0, 0.0]), np.array([2.0, 0.0]))
    (array([0.5, 0. ]), array([0.5, 0. ]))
    """
    good = sw > 0
    safe = np.where(good, sw, 1.0)
    return np.where(good, swd / safe, 0.0), np.where(good, 1.0 / np.sqrt(safe), 0.0)
