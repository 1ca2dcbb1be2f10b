"""The core of jwst-wiimatch: numpy/scipy only (never stpipe, stdatamodels or gwcs).

Modules: :mod:`.poly` (terms, evaluation, changes of basis), :mod:`.coords`
(coordinate frames), :mod:`.inputs` (argument checks), :mod:`.accumulate`
(per-pair moments, block by block), :mod:`.solve` (assembly and solvers),
:mod:`.engine` (:func:`match_backgrounds`).
"""
from .engine import MatchResult, match_backgrounds
from .poly import polyval_nd
from .solve import MatchWarning

__all__ = ["MatchResult", "MatchWarning", "match_backgrounds", "polyval_nd"]
