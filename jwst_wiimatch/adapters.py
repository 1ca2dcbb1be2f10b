"""Former name of :mod:`jwst_wiimatch.models` (kept so that existing code works).

Everything here is :mod:`jwst_wiimatch.models`; import from there.
"""
from .models import *  # noqa: F403
from .models import __all__  # noqa: F401
