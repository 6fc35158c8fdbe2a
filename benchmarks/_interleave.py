"""Cost of one logged epoch, from epochs interleaved inside one long run.

On a shared machine whose speed drifts by 20-50 % for seconds at a time, comparing whole
runs with and without a component cannot resolve a 1 % effect. Here one run logs every
``PERIOD``-th epoch only, and each cycle compares its own epochs, a second or so apart:

    cost = t[e] + t[e + 1] - 2 * t[e + 2]      (e = a logged epoch)

Epoch e holds the epoch-end work (it is timed up to the end of the callbacks), epoch e + 1
the background upload that overlaps the next epoch's training, and e + 2 is clean. Drift
slower than a cycle cancels; the trimmed mean over many cycles is the cost. The same
arithmetic on a run without the component shows the method's own error.
"""

from __future__ import annotations

import math
import statistics
from typing import List, Sequence, Tuple

PERIOD = 3


def cycle_costs(epoch_times: Sequence[float]) -> List[float]:
    """Per-cycle cost in seconds; ``epoch_times[i]`` is epoch i, logged when i % PERIOD == 0.

    Epoch 0 (one-off costs: tracing, the first MLflow writes) and an unfinished last
    cycle are left out.
    """
    return [epoch_times[e] + epoch_times[e + 1] - 2.0 * epoch_times[e + 2]
            for e in range(PERIOD, len(epoch_times) - PERIOD + 1, PERIOD)]


def trimmed(costs: Sequence[float], cut: float = 0.1) -> Tuple[float, float]:
    """Mean with ``cut`` of each tail dropped, and its standard error (in the input's unit)."""
    xs = sorted(costs)
    k = int(len(xs) * cut)
    kept = xs[k:len(xs) - k] if len(xs) > 2 * k else xs
    if len(kept) < 2:
        return (kept[0] if kept else float("nan")), float("nan")
    return statistics.mean(kept), statistics.stdev(kept) / math.sqrt(len(kept))
