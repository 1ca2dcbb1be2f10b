"""Entry point that registers the step with stpipe (``strun wiimatch``).

``pyproject.toml`` declares this module's `get_steps` in the ``stpipe.steps``
entry-point group; ``stpipe list`` then shows ``wiimatch``.
"""

__all__ = ["get_steps"]


def get_steps():
    """Steps this package provides to stpipe.

    Returns
    -------
    list of tuple
        ``(fully qualified class name, alias, is_pipeline)`` for each step.

    Examples
    --------
    >>> get_steps()
    [('jwst_wiimatch.step.WiiMatchStep', 'wiimatch', False)]
    """
    return [("jwst_wiimatch.step.WiiMatchStep", "wiimatch", False)]
