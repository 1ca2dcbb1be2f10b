"""Coordinate utilities (the ``wiimatch.utils`` API)."""
from .core.coords import create_coordinate_arrays

__all__ = ["create_coordinate_arrays"]
