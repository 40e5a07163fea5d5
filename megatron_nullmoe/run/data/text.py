"""Text-only GPT batches from jsonl: one {"text": "..."} object per line.

Documents are tokenised as `<s> text </s>` (the tokenizer's own bos and eos ids; no <s> where it
has no bos), concatenated and cut into windows of seq_length + 1
tokens (standard GPT packing, so there is no padding). Windows are shuffled per epoch from the
seed and dealt round-robin to data-parallel ranks; the data position is one integer per rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from megatron_nullmoe.run.data import DataError, PositionState
from megatron_nullmoe.run.tokenizer import Tokenizer


def iter_texts(path: str | Path) -> Iterator[str]:
    """The `text` of every non-blank line; a bad line is an error naming file:line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"jsonl path {str(path)!r} is a folder; give a .jsonl file")
    if not path.is_file():
        raise DataError(f"jsonl file {str(path)!r} does not exist")
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError(f"\"text\" is {type(text).__name__}, not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: expected a JSON object with a string \"text\" "
                                f"field ({type(err).__name__}: {err})") from None
            yield text


def read_windows(path: str | Path, tokenizer: Tokenizer, seq_length: int) -> torch.Tensor:
    stream: list[int] = []
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for text in iter_texts(path):
        stream += bos + tokenizer.encode(text) + [tokenizer.eos_id]
    windows = len(stream) // (seq_length + 1)
    if windows == 0:
        raise DataError(f"{path} holds {len(stream)} tokens, fewer than one sequence of "
                        f"data.seq_length + 1 = {seq_length + 1}")
    return torch.tensor(stream[: windows * (seq_length + 1)]).view(windows, seq_length + 1)


class JsonlData(PositionState):
    """Train and validation batches of one data-parallel rank."""

    def __init__(self, path: str, valid_path: str | None, tokenizer: Tokenizer, seq_length: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        self.train_windows = read_windows(path, tokenizer, seq_length)
        self.val_windows = (read_windows(valid_path, tokenizer, seq_length)
                            if valid_path else self.train_windows[:0])
        if len(self.train_windows) < micro_batch_size * dp_size:
            raise DataError(f"{path} has {len(self.train_windows)} sequences, fewer than one "
                            f"global micro-batch ({micro_batch_size} x {dp_size} ranks)")
        self.mbs, self.dp_rank, self.dp_size, self.seed = micro_batch_size, dp_rank, dp_size, seed
        self.position = 0  # micro-batches this rank has read

    def _order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_windows), generator=g)

    def next_train(self) -> dict[str, torch.Tensor]:
        per_epoch = len(self.train_windows) // (self.mbs * self.dp_size)
        epoch, index = divmod(self.position, per_epoch)
        start = (index * self.dp_size + self.dp_rank) * self.mbs
        rows = self._order(epoch)[start:start + self.mbs]
        self.position += 1
        return _inputs(self.train_windows[rows])

    def val_batches(self, limit: int) -> Iterator[dict[str, torch.Tensor]]:
        mine = self.val_windows[self.dp_rank::self.dp_size]
        for i in range(min(limit, len(mine) // self.mbs)):
            yield _inputs(mine[i * self.mbs:(i + 1) * self.mbs])

def _inputs(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    B, L = tokens.shape[0], tokens.shape[1] - 1
    return {
        "input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
        "loss_mask": torch.ones(B, L), "position_ids": torch.arange(L).expand(B, L),
        "vision_BS": torch.zeros(B, L, dtype=torch.bool), "pad_BS": torch.zeros(B, L, dtype=torch.bool),
    }
