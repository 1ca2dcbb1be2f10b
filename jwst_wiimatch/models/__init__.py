"""JWST datamodels and the matching engine: one public face over four ideas.

* :mod:`.pixels`: which pixels of a model are valid, and their sigma;
* :mod:`.frame`: the background frame (sky coordinates of pixels, grids,
  coordinate lattices);
* :mod:`.records`: results in metadata, evaluation and subtraction;
* :mod:`.library`: associations and model libraries without jwst.

Import the documented names from here (``from jwst_wiimatch.models import
evaluate_background``); the private modules may change.
"""
from .frame import (
    FRAME,
    FRAME_CUBE,
    GridChecker,
    check_refpoint,
    default_refpoint,
    frame_coordinates,
    grid_world,
    tangent_plane,
    wcs_grid_world,
    world_to_frame,
)
from .library import WiiMatchLibrary, check_association, load_association
from .pixels import DEFAULT_DQBITS, interpret_dqbits, model_sigma, valid_mask, weight_array
from .records import (
    evaluate_background,
    latest_entry,
    pending_level,
    polynomial_coefficients,
    record_result,
    record_skipped,
    subtract_background,
)

__all__ = [
    "DEFAULT_DQBITS", "FRAME", "FRAME_CUBE", "GridChecker", "WiiMatchLibrary",
    "check_association", "check_refpoint", "default_refpoint", "evaluate_background",
    "frame_coordinates", "grid_world", "interpret_dqbits", "latest_entry",
    "load_association", "model_sigma", "pending_level", "polynomial_coefficients",
    "record_result", "record_skipped", "subtract_background", "tangent_plane",
    "valid_mask", "wcs_grid_world", "weight_array", "world_to_frame",
]
