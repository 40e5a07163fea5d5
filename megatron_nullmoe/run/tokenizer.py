"""The run's tokenizer: a sentencepiece `.model` (`Tokenizer`), or a Hugging Face tokenizer.json
(run/hf_tokenizer.py's `HFTokenizer`); `load_tokenizer` picks by the file.

Both have one interface: encode (no special ids added), decode, vocab_size, bos_id, eos_id,
pad_id (None where the tokenizer has none), path, and save(folder) (the files that load it again).
Everything downstream of the tokenizer (data packing, padding, loss masks, generate's stop id, the
export's token ids) reads these ids, never the constants below. The constants are the layout the
project's own sentencepiece models are trained with (0 <pad>, 1 <unk>, 2 <s>, 3 </s>); the VLM's
caption data needs that layout. The image placeholder is not a vocabulary entry: LLaVA takes it as
a negative id (IMAGE_TOKEN) that it replaces by the image's patch embeddings.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Iterable, Optional

import sentencepiece as spm

from megatron_nullmoe.errors import TokenizerError

PAD, UNK, BOS, EOS = 0, 1, 2, 3
IMAGE_TOKEN = -200  # megatron-core's DEFAULT_IMAGE_TOKEN_INDEX


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


def _or_none(i: int) -> Optional[int]:
    return None if i < 0 else i


class Tokenizer:
    """A sentencepiece model; its special ids are its own (a Hub model's tokenizer.model has
    0 <unk>, 1 <s>, 2 </s> and no pad). Names the file on every failure."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist (give a sentencepiece "
                                 ".model or a tokenizer.json, or prepare the demo data, which "
                                 "trains one)")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"tokenizer file {str(path)!r} is not a sentencepiece model: "
                                 f"{err}") from None
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"tokenizer {str(path)!r} has no </s> (eos) id: documents are "
                                 "packed ended by eos (train it with eos_id set)")
        self.bos_id, self.eos_id = _or_none(self.sp.bos_id()), self.sp.eos_id()
        self.pad_id = _or_none(self.sp.pad_id())

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i >= 0])

    def save(self, folder: Path) -> Path:
        """Copies the model to folder/tokenizer.model (what `load_tokenizer(folder)` reads)."""
        out = Path(folder) / "tokenizer.model"
        if not out.exists() or not out.samefile(self.path):
            shutil.copyfile(self.path, out)
        return out


FILES = ("tokenizer.json", "tokenizer.model")  # what a folder's tokenizer is, in this order


def load_tokenizer(path: str | Path):
    """The tokenizer at `path`: a tokenizer.json (any *.json: `HFTokenizer`, special ids from the
    files beside it), a sentencepiece .model, or a folder holding one of `FILES` (the first
    found). TokenizerError names the path and what would be valid."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in FILES if (path / name).is_file()]
        if not found:
            raise TokenizerError(f"tokenizer folder {str(path)!r} has neither "
                                 f"{' nor '.join(FILES)} (give one of those files, or a folder "
                                 "holding one)")
        path = found[0]
    if path.suffix == ".json":
        from megatron_nullmoe.run.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    return Tokenizer(path)
