"""jwst-wiimatch: optimal least-squares background matching of images on one grid.

``jwst_wiimatch.match_lsq`` is a drop-in for ``wiimatch.match.match_lsq``
(wiimatch 0.3.2); :func:`jwst_wiimatch.core.match_backgrounds` gives the full
result with diagnostics.
"""
from .match import match_lsq

try:
    from importlib.metadata import version as _version

    __version__ = _version("jwst-wiimatch")
except Exception:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = ["match_lsq", "__version__"]
