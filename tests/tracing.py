"""Peak Python memory of a call, for the tests that bound it."""
import gc
import tracemalloc


def traced_peak(function):
    """``(result, peak)``: what ``function()`` returns and the most memory (bytes)
    that tracemalloc saw allocated while it ran (after a garbage collection)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = function()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
