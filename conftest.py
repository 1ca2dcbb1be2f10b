"""pytest collection rules for the doctest run over the package."""

import importlib.util

# never import a module's __main__ while collecting doctests
collect_ignore = ["jwst_wiimatch/configs/__main__.py"]

if importlib.util.find_spec("jwst") is None:
    # the calwebb integration needs the optional jwst package
    collect_ignore.append("jwst_wiimatch/pipeline.py")
