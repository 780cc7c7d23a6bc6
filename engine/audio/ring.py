"""The output ring: int16 samples queued for one caller, cancellable by utterance generation.

The face over engine._native.ring.OutputRing (all loops and state live there). Three absolute
cursors, ack_pos <= read_pos <= write_pos, split the audio into heard, sent-but-unheard (kept so
`rewind()` can replay it) and queued. Every write carries the utterance's generation;
`cancel(g)` drops all audio of generations <= g in O(1) when g is the newest (barge-in) and
discards any late write of those generations, so a cut utterance's tail never reaches the
caller. Writes arrive in non-decreasing generation order; a write older than the newest
generation is stale and is discarded too.

Bounds and accounting: a write takes only what fits in `free` (the rest is counted in
`overflow_samples`); discarded late chunks are counted in `discarded_samples`; audio removed by
cancel/clear in `dropped_samples`. Generation boundaries are kept in a 64-entry table; if more
than 64 utterances are queued at once the two oldest are merged under the older generation, so a
cancel of it also drops the newer one (silence rather than stale audio).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["OutputRing"]

if TYPE_CHECKING:
    from typing import Any

    from numpy.typing import NDArray
    from typing_extensions import Buffer

    # numpy arrays export buffers, but numpy's stubs only say so from Python 3.12 on.
    BytesLike = Buffer | NDArray[Any]

    class OutputRing:
        """A ring of `capacity` int16 samples with generation-tagged writes."""

        def __init__(self, capacity: int) -> None: ...
        def write(self, pcm: BytesLike, generation: int) -> int:
            """Append samples; returns how many were accepted."""

        def read_into(self, out: BytesLike, n: int) -> int:
            """Copy up to n queued samples into `out`, advancing read_pos; returns the count."""

        def ack(self, n: int) -> int:
            """The caller heard n more samples; returns how far ack_pos moved."""

        def rewind(self) -> int:
            """Move read_pos back to ack_pos; returns the samples re-queued."""

        def cancel(self, generation: int) -> int:
            """Drop every sample of generations <= generation; returns the samples dropped."""

        def clear(self) -> int:
            """Drop everything unacked and queued; returns the samples dropped."""

        # Read-only properties; see the module docstring and native/ring.pyx for meanings.
        @property
        def capacity(self) -> int: ...
        @property
        def write_pos(self) -> int: ...
        @property
        def read_pos(self) -> int: ...
        @property
        def ack_pos(self) -> int: ...
        @property
        def queued(self) -> int: ...
        @property
        def unacked(self) -> int: ...
        @property
        def free(self) -> int: ...
        @property
        def read_generation(self) -> int: ...
        @property
        def cancelled_generation(self) -> int: ...
        @property
        def newest_generation(self) -> int: ...
        @property
        def discarded_samples(self) -> int: ...
        @property
        def overflow_samples(self) -> int: ...
        @property
        def dropped_samples(self) -> int: ...

else:
    from engine._native.ring import OutputRing
