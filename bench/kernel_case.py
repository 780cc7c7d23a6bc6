"""One measured kernel: the shape every kernel benchmark module hands to
`python -m bench.kernels`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Case:
    group: str  # what is measured, e.g. "mu-law encode, 20 ms frame"
    name: str  # which implementation, e.g. "native", "audioop", "numpy LUT", "aiortc"
    func: Callable[[], object]  # one call = one unit of work (a frame, a buffer, a packet)
    baseline: bool = False  # the implementation the group's ratios are taken against
    # speed-up over the baseline this case must reach (2.0 = twice as fast)
    target: float | None = None
