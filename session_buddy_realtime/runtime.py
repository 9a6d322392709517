"""How this package's own server processes run (``serve``, ``edge``).

A server that holds thousands of long-lived connections keeps a large, stable heap:
with CPython's default collector settings (a young generation of 700 objects) a burst
of connections triggers a full collection every time the heap grows by a quarter, each
scanning every connection's objects, and during a burst of 10,000 handshakes that was
a quarter of the server's CPU. ``tune_collector`` makes the young generation larger,
so full collections come seldom; garbage cycles are still collected, a little later.

Only for processes this package owns: inside a host (Session-Buddy) the process and its
collector are the host's, and nothing here is applied (``docs/performance.md`` gives
the figures for both).
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["COLLECTOR_THRESHOLDS", "tune_collector"]

COLLECTOR_THRESHOLDS: Final = (10_000, 10, 10)
"""``gc.set_threshold`` for our processes: a young generation of 10,000 objects (a few
MB of young objects at most) instead of 700; the older generations as by default."""


def tune_collector() -> None:
    """Set the collector for a process that holds many long-lived connections."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
