"""Entry point that registers the step with stpipe (``strun wiimatch``).

``pyproject.toml`` declares this module's `get_steps` in the ``stpipe.steps``
entry-point group; ``stpipe list`` then shows ``wiimatch``.
"""

import importlib.util

__all__ = ["get_steps"]


def get_steps():
    """Steps this package provides to stpipe.

    Returns
    -------
    list of tuple
        ``(fully qualified class name, alias, is_pipeline)`` for each step.

    Examples
    --------
    >>> get_steps()[0]
    ('jwst_wiimatch.step.WiiMatchStep', 'wiimatch', False)
    """
    steps = [("jwst_wiimatch.step.WiiMatchStep", "wiimatch", False)]
    if importlib.util.find_spec("jwst") is not None:
        # calwebb_image3 with wiimatch in skymatch's slot (needs jwst)
        steps.append(("jwst_wiimatch.pipeline.WiiMatchImage3Pipeline",
                      "calwebb_image3_wiimatch", True))
    return steps
