"""Diagnostics of a solved fit: per pair, per image, per group and for the whole fit.

Everything here comes from the pair sums the fit was made of (no second pass
over the pixels). For a pair ``(l, m)`` with weights ``w = 1 / (sigma_l**2 +
sigma_m**2)`` over its overlap, and ``r = (I_l - P_l) - (I_m - P_m)`` the
pair residual after matching (``I_l - I_m`` before):

* ``chi = sum w r**2`` (``chi_before``: with ``P = 0``);
* ``rms = sqrt(chi / sum w)``: the weighted RMS of the residual (data units);
* the normalised chi-square ``chi2 = chi / dof``: 1.0 when the residuals are
  the noise that ``sigma`` describes.

Degrees of freedom: a connected group of ``G`` images with ``M`` terms each
fits ``p = (G - h) M - u`` free numbers (``h``: images held at zero, at
least 1, since one common polynomial is not determined by the overlaps;
``u``: coefficients the overlaps do not determine). The group's
``P = sum npix`` pair pixels then have ``P - p`` degrees of freedom, shared
among its pairs in proportion to their pixels: ``dof(l, m) = npix(l, m)
(1 - p / P)``. An image's values sum its pairs'; the fit's sum all pairs'.
Before matching nothing is fitted: ``chi2_before = chi_before / npix``.

(A pixel covered by three or more images enters several pairs, whose
residuals are then correlated; their expected sum is still one per pair
pixel for pure noise, so ``chi2`` stays 1 for noise, up to the small error
of sharing ``p`` as above.)
"""
from dataclasses import dataclass, field

import numpy as np

from .solve import gram_index

__all__ = ["FitDiagnostics", "GroupStats", "PairStats", "fit_diagnostics"]


def _num(x):
    """A float for JSON and metadata: None for NaN or infinity."""
    x = float(x)
    return x if np.isfinite(x) else None


@dataclass
class PairStats:
    """Statistics of one overlapping pair ``(l, m)``, ``l < m`` (see the module docstring)."""

    l: int
    m: int
    npix: int
    rejected: int = None  # pixels left out by robust matching (None: not reported)
    rms_before: float = np.nan
    rms: float = np.nan
    chi2_before: float = np.nan
    chi2: float = np.nan
    dof: float = 0.0
    chi: float = 0.0  # sum w r**2 after matching, as summed (sigmas / sigma_scale)
    wsum: float = field(default=0.0, repr=False)  # sum w (as summed: weights' units)

    def as_dict(self):
        return {"images": [self.l, self.m], "npix": int(self.npix),
                "rejected": None if self.rejected is None else int(self.rejected),
                "rms_before": _num(self.rms_before), "rms": _num(self.rms),
                "chi2_before": _num(self.chi2_before), "chi2": _num(self.chi2),
                "dof": float(self.dof)}


@dataclass
class GroupStats:
    """One connected group of the overlap graph."""

    images: list
    npix: int = 0  # pair pixels of the group
    nparams: int = 0  # free numbers fitted
    dof: float = 0.0
    chi2: float = np.nan
    chi2_before: float = np.nan
    condition: float = np.nan  # of the solved (equilibrated) system; NaN: nothing solved

    def as_dict(self):
        return {"images": [int(i) for i in self.images], "npix": int(self.npix),
                "nparams": int(self.nparams), "dof": float(self.dof),
                "chi2": _num(self.chi2), "chi2_before": _num(self.chi2_before),
                "condition": _num(self.condition)}


@dataclass
class FitDiagnostics:
    """Diagnostics of one fit (see the module docstring).

    Attributes
    ----------
    weighted : bool
        Whether sigmas were given: without them every sigma is 1 and the
        chi-squares are in those units (not a test of the noise).
    chi2, chi2_before, dof : float
        The whole fit's normalised chi-square after / before matching and
        its degrees of freedom (NaN / 0 without any overlap).
    npix : int
        Pair pixels (a pixel counts once per pair it is in).
    rejected : int, None
        Pair pixels left out by robust matching (None: not reported).
    image_npix, image_rejected : numpy.ndarray
        ``(N,)`` valid pixels of each image that overlap another image, and
        those rejected (``image_rejected`` None: not reported).
    image_rms, image_rms_before, image_chi2, image_chi2_before, image_dof : numpy.ndarray
        ``(N,)`` over all pairs of each image (NaN without overlap).
    pairs : list of PairStats
    groups : list of GroupStats
        One per connected group of the overlap graph (the engine's
        ``components``, in order).
    """

    weighted: bool
    chi2: float
    chi2_before: float
    dof: float
    npix: int
    rejected: int
    image_npix: np.ndarray
    image_rejected: np.ndarray
    image_rms: np.ndarray
    image_rms_before: np.ndarray
    image_chi2: np.ndarray
    image_chi2_before: np.ndarray
    image_dof: np.ndarray
    pairs: list = field(default_factory=list)
    groups: list = field(default_factory=list)

    def pair(self, l, m):
        """The `PairStats` of images ``l`` and ``m`` (either order), or None."""
        key = (min(l, m), max(l, m))
        return next((p for p in self.pairs if (p.l, p.m) == key), None)

    def image(self, i):
        """A JSON-able dict of image ``i``'s statistics."""
        rej = self.image_rejected
        return {"npix": int(self.image_npix[i]),
                "rejected": None if rej is None else int(rej[i]),
                "rms_before": _num(self.image_rms_before[i]), "rms": _num(self.image_rms[i]),
                "chi2_before": _num(self.image_chi2_before[i]),
                "chi2": _num(self.image_chi2[i]), "dof": float(self.image_dof[i])}

    def as_dict(self):
        """A JSON-able dict: ``fit``, ``images``, ``pairs``, ``groups``."""
        return {
            "fit": {"weighted": bool(self.weighted), "chi2": _num(self.chi2),
                    "chi2_before": _num(self.chi2_before), "dof": float(self.dof),
                    "npix": int(self.npix),
                    "rejected": None if self.rejected is None else int(self.rejected)},
            "images": [self.image(i) for i in range(len(self.image_npix))],
            "pairs": [p.as_dict() for p in self.pairs],
            "groups": [g.as_dict() for g in self.groups],
        }


def _pair_rejected(pair_rejected, l, m):
    if pair_rejected is None:
        return None
    if isinstance(pair_rejected, dict):
        return int(pair_rejected.get((l, m), pair_rejected.get((m, l), 0)))
    return int(np.asarray(pair_rejected)[l, m])


def fit_diagnostics(mom, coef_u, degree, components, condition=None, undetermined=(),
                    held=None, sigma_scale=1.0, weighted=True, rejected=None,
                    pair_rejected=None):
    """Diagnostics of a fit from its pair sums.

    Parameters
    ----------
    mom : jwst_wiimatch.core.accumulate.PairMoments
        The pair sums the fit was solved from (scaled coordinates).
    coef_u : numpy.ndarray
        ``(N, M)`` coefficients in the same (scaled) basis.
    degree : tuple of int
    components : list of list of int
        Connected groups of the overlap graph.
    condition : list of float, None
        Per group, the condition number of its solved system
        (`jwst_wiimatch.core.solve.SolveInfo.condition`).
    undetermined : sequence of tuple
        ``(image, term)`` of the coefficients the overlaps do not determine.
    held : list of list of int, None
        Per group, the images held at zero (a reference set; empty: the
        group's common polynomial was set by a convention).
    sigma_scale : float
        Every sigma was divided by this before the sums (chi-squares are
        multiplied back by ``1 / sigma_scale**2``).
    weighted : bool
        Whether sigmas were given.
    rejected : array-like, None
        ``(N,)`` pixels of each image left out by robust matching.
    pair_rejected : dict or array-like, None
        Pair pixels left out by robust matching: ``{(l, m): count}`` or an
        ``(N, N)`` array.

    Returns
    -------
    FitDiagnostics
    """
    n = mom.nimages
    idx = gram_index(degree)
    nterms = idx[0].shape[0]
    scale = float(sigma_scale)

    def unscaled(x):  # sums of the rescaled sigmas' weights -> the given sigmas' units
        # (inf when the given sigmas are so small that it is beyond float64:
        # the chi-square is then that large, and said so, not a stray warning)
        with np.errstate(over="ignore"):
            return np.asarray(x, dtype=np.float64) / scale / scale
    group_of = {}
    for g, comp in enumerate(components):
        for i in comp:
            group_of[int(i)] = g
    nundet = np.zeros(len(components), dtype=int)
    for i, _ in undetermined:
        nundet[group_of[int(i)]] += 1

    pairs = []
    for (l, m), s in sorted(mom.S.items()):
        dc = coef_u[l] - coef_u[m]
        t = np.ravel(mom.T[(l, m)])
        before = float(mom.chi[(l, m)])
        after = max(before - 2 * dc @ t + dc @ s[idx] @ dc, 0.0)
        wsum = float(np.ravel(s)[0])
        npix = int(mom.npix[(l, m)])
        with np.errstate(invalid="ignore", divide="ignore"):
            rms_b = np.sqrt(before / wsum) if wsum > 0 else np.nan
            rms_a = np.sqrt(after / wsum) if wsum > 0 else np.nan
        pairs.append(PairStats(
            l=int(l), m=int(m), npix=npix, rejected=_pair_rejected(pair_rejected, l, m),
            rms_before=float(rms_b), rms=float(rms_a),
            chi2_before=unscaled(before / npix) if npix else np.nan,
            chi=after, wsum=wsum))

    groups = []
    for g, comp in enumerate(components):
        cond = np.nan if condition is None else float(condition[g])
        gs = GroupStats(images=[int(i) for i in comp], condition=cond)
        if len(comp) > 1:
            h = max(1, len(held[g]) if held is not None else 0)
            gs.nparams = max(0, (len(comp) - h) * nterms - int(nundet[g]))
        groups.append(gs)
    for p in pairs:
        groups[group_of[p.l]].npix += p.npix
    for p in pairs:
        gs = groups[group_of[p.l]]
        p.dof = p.npix * max(0.0, 1.0 - gs.nparams / gs.npix) if gs.npix else 0.0
        p.chi2 = unscaled(p.chi / p.dof) if p.dof > 0 else np.nan
    for g, gs in enumerate(groups):
        mine = [p for p in pairs if group_of[p.l] == g]
        gs.dof = float(sum(p.dof for p in mine))
        chi = sum(p.chi for p in mine)
        gs.chi2 = unscaled(chi / gs.dof) if gs.dof > 0 else np.nan
        before = sum(p.chi2_before * p.npix for p in mine)
        gs.chi2_before = before / gs.npix if gs.npix else np.nan

    chi_i = np.zeros(n)
    chib_i = np.zeros(n)
    dof_i = np.zeros(n)
    npp_i = np.zeros(n)
    for p in pairs:
        for i in (p.l, p.m):
            chi_i[i] += p.chi
            chib_i[i] += p.chi2_before * p.npix
            dof_i[i] += p.dof
            npp_i[i] += p.npix
    rms_a, rms_b = _image_rms(pairs, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        img_chi2 = np.where(dof_i > 0, unscaled(chi_i / np.where(dof_i > 0, dof_i, 1)),
                            np.nan)
        img_chi2b = np.where(npp_i > 0, chib_i / np.where(npp_i > 0, npp_i, 1), np.nan)
    tot_dof = float(sum(p.dof for p in pairs))
    tot_npix = int(sum(p.npix for p in pairs))
    tot_chi = float(sum(p.chi for p in pairs))
    tot_chib = float(sum(p.chi2_before * p.npix for p in pairs))
    if rejected is not None:
        rejected = np.asarray(rejected, dtype=np.int64).reshape(n)
    pair_rej = [p.rejected for p in pairs]
    return FitDiagnostics(
        weighted=bool(weighted),
        chi2=unscaled(tot_chi / tot_dof) if tot_dof > 0 else np.nan,
        chi2_before=tot_chib / tot_npix if tot_npix else np.nan,
        dof=tot_dof, npix=tot_npix,
        rejected=None if pair_rejected is None else int(sum(pair_rej)),
        image_npix=np.asarray(mom.image_npix, dtype=np.int64).copy(),
        image_rejected=rejected, image_rms=rms_a, image_rms_before=rms_b,
        image_chi2=img_chi2, image_chi2_before=img_chi2b, image_dof=dof_i,
        pairs=pairs, groups=groups)


def _image_rms(pairs, n):
    """Per-image weighted RMS over all its pairs, after and before."""
    num_a = np.zeros(n)
    num_b = np.zeros(n)
    wsum = np.zeros(n)
    for p in pairs:
        if not p.wsum > 0:
            continue
        for i in (p.l, p.m):
            num_a[i] += p.wsum * p.rms ** 2
            num_b[i] += p.wsum * p.rms_before ** 2
            wsum[i] += p.wsum
    ok = wsum > 0
    safe = np.where(ok, wsum, 1.0)
    return (np.where(ok, np.sqrt(num_a / safe), np.nan),
            np.where(ok, np.sqrt(num_b / safe), np.nan))
