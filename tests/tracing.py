"""What a call does inside: its peak Python memory (for the tests that bound it),
and the engine's accumulators (for the tests that probe their methods)."""
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


def capture_accumulators(monkeypatch):
    """A list that receives every ``_Accumulator`` the engine makes from now on
    (in the order made), so that a test can call its methods after a match."""
    from jwst_wiimatch.core import accumulate

    made = []
    init = accumulate._Accumulator.__init__

    def recording(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(accumulate._Accumulator, "__init__", recording)
    return made
