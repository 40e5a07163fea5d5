"""The text study's corpus (issue 17): torch's Python sources, pinned by version and hash."""

from __future__ import annotations

import json

import pytest

from megatron_nullmoe.run.data import DataError
from megatron_nullmoe.train.data import corpus


def test_prepares_a_pinned_corpus_with_a_held_out_split_and_tokenizer(tmp_path):
    out = corpus.prepare_corpus(tmp_path / "c", vocab_size=512)
    stamp = json.loads((out / corpus.STAMP).read_text())
    assert stamp["sha256"] == corpus.SHA256 and stamp["version"] == corpus.VERSION
    train = (out / "train.jsonl").read_text().splitlines()
    val = (out / "val.jsonl").read_text().splitlines()
    assert len(val) * (corpus.VAL_EVERY - 1) <= len(train) < (len(val) + 1) * corpus.VAL_EVERY
    assert "def forward" in "".join(json.loads(line)["text"] for line in train[:200])
    from megatron_nullmoe.run.tokenizer import Tokenizer

    assert Tokenizer(out / "tokenizer.model").vocab_size == 512
    before = (out / "train.jsonl").stat().st_mtime_ns
    corpus.prepare_corpus(tmp_path / "c", vocab_size=512)  # the stamp matches: reused
    assert (out / "train.jsonl").stat().st_mtime_ns == before


def test_another_hash_or_version_is_refused_with_both_named(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "SHA256", "0" * 64)
    with pytest.raises(DataError, match=r"corpus hash [0-9a-f]{64} differs from the pinned 0{64}"):
        corpus.prepare_corpus(tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written
    monkeypatch.setattr(corpus, "VERSION", "9.9.9")
    with pytest.raises(DataError, match=r"torch 9\.9\.9's Python source; torch 2\.13\.0 is "
                                        r"installed \(pip install torch==9\.9\.9\)"):
        corpus.corpus_documents()
