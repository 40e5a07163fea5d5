"""Text batches from Megatron's indexed dataset format, sampled by megatron-core's own GPTDataset.

The format is what Megatron-LM's tools/preprocess_data.py writes: `PREFIX.bin` (token ids) and
`PREFIX.idx` (document and sequence offsets). `jsonl_to_indexed` writes it from jsonl with our
run's tokenizer, one `text` per document, ended by its eos id (Megatron's "eod"). The files hold
ids only: which tokenizer wrote them cannot be read back, so data.tokenizer must be that one.

GPTDataset builds its shuffled sample index once (rank 0 first, cached in `cache_dir`), so every
rank and every resumed run sees the same sample order; a rank's data position is one integer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from megatron_nullmoe.run.data import DataError, PositionState
from megatron_nullmoe.run.data.text import iter_texts
from megatron_nullmoe.run.tokenizer import Tokenizer


class _MegatronTokenizerView:
    """The few attributes megatron-core's GPTDataset reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = self.eos = tokenizer.eos_id
        # GPTDataset masks the loss where a label is pad and zeroes pad inputs. Packed documents
        # hold no padding, so where pad is eos (Qwen3's <|endoftext|>) or none, megatron-core's
        # own "no pad" (-1): else every document's end would be masked.
        pad = tokenizer.pad_id
        self.pad = -1 if pad is None or pad == tokenizer.eos_id else pad
        # part of GPTDataset's cache key: a different tokenizer must not reuse a cached index
        self.unique_identifiers = {"class": "sentencepiece" if isinstance(tokenizer, Tokenizer)
                                   else "tokenizer.json", "model": str(tokenizer.path),
                                   "vocab_size": tokenizer.vocab_size}


def jsonl_to_indexed(jsonl: str | Path, prefix: str | Path, tokenizer: Tokenizer) -> Path:
    """Writes PREFIX.bin/.idx from a jsonl of {"text": ...}; returns the prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for text in iter_texts(jsonl):
        builder.add_item(torch.tensor(tokenizer.encode(text) + [tokenizer.eos_id]))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return prefix


def _strip(prefix: str) -> str:
    """PREFIX.bin or PREFIX.idx given where PREFIX was meant: use PREFIX."""
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            return prefix[: -len(suffix)]
    return prefix


def _check_prefix(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise DataError(f"indexed dataset file {prefix + suffix} does not exist (data.path is "
                            "the prefix of a PREFIX.bin/PREFIX.idx pair, without the suffix)")


class IndexedData(PositionState):
    """Train and validation batches of one data-parallel rank."""

    def __init__(self, prefix: str, valid_prefix: str | None, tokenizer: Tokenizer,
                 seq_length: int, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 train_samples: int, valid_samples: int, cache_dir: Path):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        prefix, valid_prefix = _strip(prefix), _strip(valid_prefix) if valid_prefix else None
        _check_prefix(prefix)
        if valid_prefix:
            _check_prefix(valid_prefix)
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=seq_length,
            blend_per_split=[([prefix], None), ([valid_prefix], None) if valid_prefix else None,
                             None],
            tokenizer=_MegatronTokenizerView(tokenizer), reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
            path_to_cache=str(cache_dir),
        )
        try:
            self.train, self.valid, _ = BlendedMegatronDatasetBuilder(
                GPTDataset, [train_samples, valid_samples if valid_prefix else None, None],
                lambda: True, config).build()
        except (AssertionError, ValueError, IndexError, OSError) as err:
            raise DataError(f"indexed dataset {prefix}: megatron-core could not read it "
                            f"({type(err).__name__}: {err})") from err
        self.mbs, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.position = 0  # micro-batches this rank has read

    def _batch(self, dataset, start: int) -> dict[str, torch.Tensor]:
        rows = [dataset[(start + j) % len(dataset)] for j in range(self.mbs)]
        tokens = torch.stack([torch.as_tensor(r["tokens"]) for r in rows])
        B, S = tokens.shape
        return {
            "input_ids": tokens, "labels": torch.stack([torch.as_tensor(r["labels"]) for r in rows]),
            "loss_mask": torch.stack([torch.as_tensor(r["loss_mask"]) for r in rows]).float(),
            "position_ids": torch.arange(S).expand(B, S),
            "vision_BS": torch.zeros(B, S, dtype=torch.bool),
            "pad_BS": torch.zeros(B, S, dtype=torch.bool),
        }

    def next_train(self) -> dict[str, torch.Tensor]:
        start = (self.position * self.dp_size + self.dp_rank) * self.mbs
        self.position += 1
        return self._batch(self.train, start)

    def val_batches(self, limit: int) -> Iterator[dict[str, torch.Tensor]]:
        if self.valid is None:
            return
        for i in range(min(limit, len(self.valid) // (self.mbs * self.dp_size))):
            yield self._batch(self.valid, (i * self.dp_size + self.dp_rank) * self.mbs)
