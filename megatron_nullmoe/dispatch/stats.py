"""Row and byte counters a dispatcher keeps, to show exactly what null slots save."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class DispatchStats:
    """Cumulative counts on one rank since the last reset.

    rows_dispatched: real (token, expert) rows this rank's tokens produced (what it permutes).
    rows_topk: rows a standard top-k MoE with the same k would have produced (T * k).
    rows_computed: rows this rank's experts ran (what its expert GEMMs see).
    rows_sent_remote / bytes_sent_remote: rows (and bytes: hidden row + gate) sent to other ranks.
    """

    steps: int = 0
    rows_dispatched: int = 0
    rows_topk: int = 0
    rows_computed: int = 0
    rows_sent_remote: int = 0
    bytes_sent_remote: int = 0

    def add(self, **counts: int) -> None:
        self.steps += 1
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + int(value))

    def reset(self) -> None:
        for name in asdict(self):
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return asdict(self)
