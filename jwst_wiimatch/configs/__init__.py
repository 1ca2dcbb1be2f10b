"""Pipeline configuration files shipped with jwst-wiimatch.

``calwebb_image3_wiimatch.asdf``
    ``calwebb_image3`` with wiimatch in place of skymatch (background-matched
    ``i2d``); class ``jwst_wiimatch.pipeline.WiiMatchImage3Pipeline``.
``calwebb_image3_wiimatch_hook.asdf``
    jwst's ``calwebb_image3`` with wiimatch as a post-hook of ``resample`` in
    single mode (per-exposure images on one grid, with their polynomials).

``python -m jwst_wiimatch.configs`` prints their paths and
``python -m jwst_wiimatch.configs --copy`` writes them into the working
directory (``strun`` takes a configuration file only as a path); both need
jwst (``pip install "jwst-wiimatch[jwst]"``). See ``docs/pipeline.rst``.
"""

from importlib import resources

__all__ = ["CONFIGS", "config_path"]

#: Names of the shipped configuration files.
CONFIGS = ("calwebb_image3_wiimatch.asdf", "calwebb_image3_wiimatch_hook.asdf")


def config_path(name="calwebb_image3_wiimatch.asdf"):
    """Path of a shipped configuration file.

    Examples
    --------
    >>> config_path().endswith("calwebb_image3_wiimatch.asdf")
    True
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown configuration {name!r}; choose one of {CONFIGS}")
    return str(resources.files(__name__) / name)
