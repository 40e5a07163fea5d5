"""Sentencepiece tokenizer: trained on the demo captions at preparation time, or a `.model` file.

The id layout is fixed so that models and data agree: 0 <pad>, 1 <unk>, 2 <s>, 3 </s>. The image
placeholder is not a vocabulary entry: LLaVA takes it as a negative id (IMAGE_TOKEN) that it
replaces by the image's patch embeddings.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from megatron_nullmoe.errors import NullMoEError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
IMAGE_TOKEN = -200  # megatron-core's DEFAULT_IMAGE_TOKEN_INDEX


class TokenizerError(NullMoEError, ValueError):
    """A tokenizer file that is missing or cannot be read."""


def train_tokenizer(texts: Iterable[str], out: Path, vocab_size: int = 128) -> Path:
    """Trains a small BPE model on `texts` and writes it to `out` (a .model file)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", hard_vocab_limit=False, character_coverage=1.0,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS, minloglevel=2,
    )
    tmp = out.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out


class Tokenizer:
    """Thin wrapper that checks the id layout and names the file on every failure."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist (give a sentencepiece "
                                 ".model, or prepare the demo data, which trains one)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"tokenizer file {str(path)!r} is not a sentencepiece model: "
                                 f"{err}") from None
        if self.sp.pad_id() != PAD or self.sp.eos_id() != EOS:
            raise TokenizerError(
                f"tokenizer {str(path)!r} has pad={self.sp.pad_id()} eos={self.sp.eos_id()}; "
                f"this trainer needs pad={PAD} and eos={EOS} (train with pad_id={PAD}, eos_id={EOS})")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i >= 0])
