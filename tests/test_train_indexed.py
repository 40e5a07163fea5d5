"""Megatron's indexed dataset format (.bin/.idx) through megatron-core's own GPTDataset."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_nullmoe.run.data.energon import DataError
from megatron_nullmoe.run.data.indexed import IndexedData, jsonl_to_indexed
from megatron_nullmoe.run.tokenizer import EOS
from tests._train import tiny_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return tiny_demo(tmp_path_factory.mktemp("data") / "demo", train_samples=256)


def test_written_documents_read_back_through_megatron_core(demo, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_nullmoe.run.tokenizer import Tokenizer

    tok = Tokenizer(demo / "tokenizer.model")
    texts = ["two small red circles in the top left", "one large blue square in the centre"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    ds = IndexedDataset(str(jsonl_to_indexed(src, tmp_path / "docs", tok)))
    assert len(ds) == 2
    for i, text in enumerate(texts):
        assert ds[i].tolist() == tok.encode(text) + [EOS]


def make(demo, tmp_path, dp_rank=0, dp_size=1, valid=True):
    from megatron_nullmoe.run.tokenizer import Tokenizer

    prefix = str(demo / "text" / "train_text_document")
    valid_prefix = str(demo / "text" / "val_text_document") if valid else None
    return IndexedData(prefix, valid_prefix, Tokenizer(demo / "tokenizer.model"), seq_length=16,
                       micro_batch_size=4, dp_rank=dp_rank, dp_size=dp_size, seed=3,
                       train_samples=64, valid_samples=8, cache_dir=tmp_path / "cache")


def test_batches_are_shifted_packed_text_and_positions_restore(demo, tmp_path):
    data = make(demo, tmp_path)
    first = data.next_train()
    assert first["input_ids"].shape == first["labels"].shape == (4, 16)
    assert torch.equal(first["input_ids"][:, 1:], first["labels"][:, :-1])
    assert (first["input_ids"] == EOS).any()  # documents are packed, ended by eod
    for _ in range(2):
        data.next_train()
    state = data.state()
    ahead = [data.next_train()["input_ids"] for _ in range(2)]
    again = make(demo, tmp_path)  # reuses GPTDataset's cached index
    again.restore(state)
    assert all(torch.equal(a, again.next_train()["input_ids"]) for a in ahead)
    val = list(data.val_batches(10))
    assert val and all(torch.equal(a["input_ids"], b["input_ids"])
                       for a, b in zip(val, data.val_batches(10)))


def test_ranks_read_different_samples(demo, tmp_path):
    a = make(demo, tmp_path, 0, 2).next_train()["input_ids"]
    b = make(demo, tmp_path, 1, 2).next_train()["input_ids"]
    assert not torch.equal(a, b)


def test_missing_files_are_named(demo, tmp_path):
    from megatron_nullmoe.run.tokenizer import Tokenizer

    with pytest.raises(DataError, match=r"nope\.bin does not exist"):
        IndexedData(str(tmp_path / "nope"), None, Tokenizer(demo / "tokenizer.model"), 16, 4, 0,
                    1, 0, 8, 0, tmp_path)
