"""Coordinates of the common pixel grid: image or world, centered and scaled.

The polynomial of every image is written in coordinates ``X = C - eff_center``
where ``C`` are either pixel indices in ``(x, y, ...)`` order (``x`` along the
last numpy axis) or the outputs of a user's ``image2world(x, y, ...)``.

For the solve the engine uses ``u = (X - shift) / scale`` per axis, chosen so
that ``u`` spans about ``[-1, 1]`` over the grid, which keeps the monomials
well conditioned whatever the units of ``X`` (pixels, degrees, microns).
"""
import itertools

import numpy as np

__all__ = ["Frame", "make_frame", "create_coordinate_arrays", "CENTER_CS"]

CENTER_CS = ("image", "world")


def _check_center_cs(center_cs):
    if center_cs not in CENTER_CS:
        raise ValueError(
            f"'center_cs' must be 'image' or 'world'; got {center_cs!r}."
        )


def default_center(shape):
    """Middle of the grid in ``(x, y, ...)`` order: ``shape[::-1][j] // 2``."""
    return tuple(float(n // 2) for n in shape[::-1])


def call_image2world(image2world, coords, ndim, what="image2world"):
    """Call ``image2world(*coords)`` and check what it returns.

    ``coords`` are 1-D arrays in ``(x, y, ...)`` order (as the documentation
    of ``image2world`` promises its users). Returns a list of ``ndim`` float64
    arrays of the shape of ``coords[0]``.
    """
    coords = [np.atleast_1d(np.asarray(c, dtype=float)).ravel() for c in coords]
    out = image2world(*coords)
    if isinstance(out, np.ndarray) and out.ndim >= 1 and out.shape[0] == ndim:
        out = list(out)
    if not isinstance(out, (list, tuple)) or len(out) != ndim:
        got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
        raise ValueError(
            f"'{what}' must return {ndim} coordinate arrays (one per image axis, in "
            f"(x, y, ...) order); it returned {got}."
        )
    shape = np.shape(coords[0])
    res = []
    for j, o in enumerate(out):
        arr = np.asarray(o, dtype=float)
        if arr.shape != shape:
            raise ValueError(
                f"'{what}' returned an array of shape {arr.shape} for coordinate {j} "
                f"but was given arrays of shape {shape}: it must work element-wise."
            )
        res.append(arr)
    return res


class Frame:
    """Where the polynomial's coordinates come from, and how they are scaled.

    Attributes
    ----------
    shape : tuple
        Grid shape (numpy order).
    eff_center : tuple
        Origin of the polynomial's coordinates, ``(x, y, ...)`` order.
    coord_system : {'image', 'world'}
    shift, scale : tuple
        ``u = (X - shift) / scale`` per coordinate.
    samples : list of numpy.ndarray, None
        World frames: coordinates ``X`` (one 1-D array per axis) of a sparse
        sample of the grid's pixels (see :meth:`sample_coords`).
    """

    def __init__(self, shape, eff_center, image2world, shift, scale, samples=None):
        self.shape = tuple(shape)
        self.ndim = len(shape)
        self.eff_center = tuple(eff_center)
        self.image2world = image2world
        self.coord_system = "image" if image2world is None else "world"
        self.shift = tuple(shift)
        self.scale = tuple(scale)
        self.samples = samples
        #: world frames: the accumulation's series of the world monomials of
        #: its blocks, by ``(degree, block box)`` (kept between the passes of
        #: a robust match)
        self.fits = {}

    def sample_coords(self):
        """Coordinates ``X`` of a sparse sample of the grid's pixels, corners included.

        Up to 9 pixels per axis (their product over the axes); one 1-D array
        per coordinate, ``(x, y, ...)`` order. Pixels whose world
        coordinates are not finite are left out.
        """
        if self.samples is not None:
            return self.samples
        pts = _sample_pixels(self.shape)
        return [pts[:, self.ndim - 1 - j] - c for j, c in enumerate(self.eff_center)]

    @property
    def separable(self):
        """True when coordinate ``j`` depends on pixel index ``j`` alone (image coordinates)."""
        return self.image2world is None

    def axis_u(self, j):
        """Scaled coordinate ``u_j`` along coordinate ``j`` for every index of its axis."""
        n = self.shape[self.ndim - 1 - j]
        x = np.arange(n, dtype=float) - self.eff_center[j]
        return (x - self.shift[j]) / self.scale[j]

    def coordinates(self):
        """Coordinates ``X`` of every pixel of the grid (what ``ext_return`` gives)."""
        return _grid_coordinates(self.shape, self.image2world, self.eff_center)

    def block_u(self, slices):
        """Scaled coordinates of a block of the grid (world frames).

        Parameters
        ----------
        slices : tuple of slice
            The block, numpy order.

        Returns
        -------
        list of numpy.ndarray
            ``u_j`` for each coordinate, each of the block's shape.
        """
        bshape = tuple(s.stop - s.start for s in slices)
        pix = []
        for k in range(self.ndim - 1, -1, -1):  # (x, y, ...) order
            ax = np.arange(slices[k].start, slices[k].stop, dtype=float)
            ax = ax.reshape((-1,) + (1,) * (self.ndim - 1 - k))
            pix.append(np.broadcast_to(ax, bshape).ravel())
        return [u.reshape(bshape) for u in self.points_u(pix)]

    def points_u(self, pix):
        """Scaled coordinates ``u`` (one 1-D array per axis) of pixels ``pix``
        (1-D arrays of pixel indices, ``(x, y, ...)`` order; world frames)."""
        return self._scaled(call_image2world(self.image2world, pix, self.ndim))

    def _scaled(self, world):
        """``u = (X - shift) / scale`` of world coordinates (one temporary each)."""
        out = []
        for w, c, s0, s1 in zip(world, self.eff_center, self.shift, self.scale):
            u = np.subtract(w, c)  # (w - c - s0) / s1
            u -= s0
            u /= s1
            out.append(u)
        return out


def _grid_coordinates(shape, image2world, eff_center):
    """Coordinates ``X = C - eff_center`` of every pixel of the grid, ``(x, y, ...)`` order."""
    ind = list(np.indices(shape, dtype=float)[::-1])
    if image2world is not None:
        ind = [w.reshape(shape) for w in call_image2world(
            image2world, [a.ravel() for a in ind], len(shape))]
    return tuple(a - c for a, c in zip(ind, eff_center))


def _resolve_center(shape, center, image2world, center_cs):
    """Effective center in the polynomial's coordinate system, ``(x, y, ...)`` order."""
    _check_center_cs(center_cs)
    ndim = len(shape)
    if image2world is not None and not callable(image2world):
        raise TypeError(
            f"'image2world' must be None or a callable f(x, y, ...); got "
            f"{type(image2world).__name__}."
        )
    if center is None:
        center, center_cs = default_center(shape), "image"
    elif center_cs == "world" and image2world is None:
        raise ValueError(
            "'center_cs' is 'world' but 'image2world' is None: give 'image2world' or "
            "pass the center in image coordinates (center_cs='image')."
        )
    if image2world is None or center_cs == "world":
        return tuple(float(c) for c in center)
    # a 1-D array of one point per axis, as image2world is documented to take
    conv = call_image2world(image2world, [np.array([c], dtype=float) for c in center],
                            ndim, what="image2world (applied to 'center')")
    return tuple(float(c[0]) for c in conv)


def _sample_pixels(shape):
    """``(npoints, ndim)`` pixel indices (numpy order): up to 9 per axis, ends included."""
    ndim = len(shape)
    axes = [np.unique(np.linspace(0, n - 1, min(n, 9)).round()) for n in shape]
    return np.array(list(itertools.product(*axes)), dtype=float).reshape(-1, ndim)


def _sample_ranges(shape, image2world, eff_center):
    """Range of each world coordinate (minus center) over a sparse sample of the grid.

    Also returns the sample's coordinates (pixels with finite world
    coordinates only), one 1-D array per axis.
    """
    ndim = len(shape)
    pts = _sample_pixels(shape)
    world = call_image2world(image2world, [pts[:, k] for k in range(ndim)][::-1], ndim)
    good = np.logical_and.reduce([np.isfinite(w) for w in world])
    samples = [w[good] - c for w, c in zip(world, eff_center)]
    lo, hi = [], []
    for w in samples:
        if w.size == 0:
            lo.append(-1.0)
            hi.append(1.0)
        else:
            lo.append(float(w.min()))
            hi.append(float(w.max()))
    return lo, hi, samples


def make_frame(shape, center=None, image2world=None, center_cs="image"):
    """Build the coordinate :class:`Frame` of a grid (see ``match_lsq``'s arguments)."""
    eff_center = _resolve_center(shape, center, image2world, center_cs)
    ndim = len(shape)
    samples = None
    if image2world is None:
        lo = [-c for c in eff_center]
        hi = [n - 1 - c for n, c in zip(shape[::-1], eff_center)]
    else:
        lo, hi, samples = _sample_ranges(shape, image2world, eff_center)
    shift = [(a + b) / 2 for a, b in zip(lo, hi)]
    scale = []
    for a, b, s in zip(lo, hi, shift):
        half = (b - a) / 2
        if not half > 0:
            half = max(abs(s), 1.0)
        scale.append(half)
    assert len(scale) == ndim
    return Frame(shape, eff_center, image2world, shift, scale, samples)


def create_coordinate_arrays(image_shape, center=None, image2world=None,
                             center_cs="image"):
    """Coordinate arrays of a grid, centered on ``center``.

    Parameters
    ----------
    image_shape : tuple of int
        Shape of the grid (numpy order).
    center : sequence of float, float, None, optional
        Origin of the coordinates in ``(x, y, ...)`` order, in image coordinates
        when ``center_cs`` is ``'image'`` (converted with ``image2world`` when
        that is given) or world coordinates when ``center_cs`` is ``'world'``.
        ``None`` means the middle of the grid, ``image_shape[::-1][j] // 2``
        (wiimatch 0.3.2 took these in numpy order, which swaps them for
        non-square grids).
    image2world : callable, None, optional
        ``f(x, y, ...)`` mapping pixel coordinates to world coordinates,
        element-wise, returning one array per axis.
    center_cs : {'image', 'world'}, optional
        Coordinate system of ``center``; ``'world'`` requires ``image2world``.

    Returns
    -------
    coord_arrays : tuple of numpy.ndarray
        One array of ``image_shape`` per coordinate, ``(x, y, ...)`` order.
    eff_center : tuple of float
        The origin used, in the coordinate system of the arrays.
    coord_system : {'image', 'world'}

    Examples
    --------
    >>> (x, y), c, cs = create_coordinate_arrays((2, 3))
    >>> x
    array([[-1.,  0.,  1.],
           [-1.,  0.,  1.]])
    >>> y
    array([[-1., -1., -1.],
           [ 0.,  0.,  0.]])
    >>> c, cs
    ((1.0, 1.0), 'image')
    """
    shape = tuple(int(n) for n in image_shape)
    from .inputs import check_center

    center = check_center(center, len(shape))
    eff_center = _resolve_center(shape, center, image2world, center_cs)
    coord_system = "image" if image2world is None else "world"
    return _grid_coordinates(shape, image2world, eff_center), eff_center, coord_system
