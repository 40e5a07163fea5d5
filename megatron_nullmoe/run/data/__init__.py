"""A run's data: the energon (image + caption), jsonl and indexed loaders.

Every loader (energon.py, text.py, indexed.py; kinds.py builds the one `data.kind` names) is one
data-parallel rank's view and answers the `DataSource` protocol: the trainer reads batches through
it, the checkpointer saves and restores its position. Evaluation and captioning read datasets
through this same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol

from megatron_nullmoe.errors import NullMoEError

if TYPE_CHECKING:
    import torch


class DataError(NullMoEError, ValueError):
    """A dataset (or one of its shards or lines) that is missing, unreadable or inconsistent."""


class DataSource(Protocol):
    """One data-parallel rank's micro-batches (model inputs by name) and its data position."""

    def next_train(self) -> dict[str, torch.Tensor]:
        """The next training micro-batch of this rank."""

    def val_batches(self, limit: int) -> Iterator[dict[str, torch.Tensor]]:
        """At most `limit` validation micro-batches, the same ones on every call."""

    def state(self) -> Any:
        """This rank's data position, saved into every checkpoint (picklable)."""

    def restore(self, state: Any) -> None:
        """Goes back to a position that `state()` returned; called before any batch is read."""


class PositionState:
    """`state()`/`restore()` of a source whose position is one integer: micro-batches read."""

    position: int

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])
