"""A run's data: the energon (image + caption), jsonl and indexed loaders.

Every loader (energon.py, text.py, indexed.py) is one data-parallel rank's view and answers the
`DataSource` protocol: the trainer reads batches through it, the checkpointer saves and restores
its position. Evaluation and captioning read datasets through this same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from megatron_nullmoe.run.config import ConfigError, RunConfig

if TYPE_CHECKING:
    import torch

    from megatron_nullmoe.run.tokenizer import Tokenizer


class DataError(ValueError):
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


def _energon(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    d = cfg.data
    if cfg.model.kind != "vlm":
        raise ConfigError("data.kind=energon holds image+caption samples: use model.kind=vlm "
                          "(or data.kind=jsonl for a GPT)")
    from megatron_nullmoe.run.data.energon import EnergonData

    return EnergonData(d.path, tokenizer, d.seq_length, cfg.model.vision.image_size,
                       cfg.image_tokens, d.micro_batch_size, dp_rank, dp_size, cfg.seed,
                       d.num_workers, d.shuffle_buffer_size)


def _text_only(cfg: RunConfig) -> None:
    if cfg.model.kind != "gpt":
        raise ConfigError(f"data.kind={cfg.data.kind} is text only: use model.kind=gpt")


def _indexed(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    d = cfg.data
    _text_only(cfg)
    from megatron_nullmoe.run.data.indexed import IndexedData

    return IndexedData(
        d.path, d.valid_path, tokenizer, d.seq_length, d.micro_batch_size, dp_rank, dp_size,
        cfg.seed, train_samples=cfg.steps * d.global_batch_size,
        valid_samples=cfg.logging.eval_steps * d.micro_batch_size * dp_size,
        cache_dir=Path(cfg.dir) / "data_cache")


def _jsonl(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    d = cfg.data
    _text_only(cfg)
    from megatron_nullmoe.run.data.text import JsonlData

    return JsonlData(d.path, d.valid_path, tokenizer, d.seq_length, d.micro_batch_size, dp_rank,
                     dp_size, cfg.seed)


# data.kind -> the builder of its loader (one data-parallel rank's view); each refuses the model kind
# it cannot feed and imports only its own loader. run/config.py's Data.kind choices name these.
DATA_KINDS = {"energon": _energon, "jsonl": _jsonl, "indexed": _indexed}


def build_data(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    build = DATA_KINDS.get(cfg.data.kind)
    if build is None:
        raise ConfigError(f"data.kind={cfg.data.kind!r} is not valid: one of "
                          f"{', '.join(DATA_KINDS)}")
    return build(cfg, tokenizer, dp_rank, dp_size)
