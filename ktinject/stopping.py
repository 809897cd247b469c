"""Stop strings over streamed text: emit what cannot be the start of a stop string, hold the rest.

Text is emitted as early as possible, but a piece that might begin a stop string is held back
until it is either completed (generation stops, the stop string is not shown) or ruled out.
"""

from __future__ import annotations


class StopMatcher:
    """`feed(piece)` returns (text safe to emit, whether a stop string was hit)."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out, True
        hold = max(
            (k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])),
            default=0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        """At the end of generation, held-back text was not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
