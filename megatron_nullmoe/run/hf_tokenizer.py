"""A Hugging Face tokenizer.json, read by the `tokenizers` library, as the run's tokenizer.

It has run/tokenizer.py's interface. Its special ids are the folder's own, never the project's
0/1/2/3: each of bos/eos/pad is the token tokenizer_config.json names (`bos_token`, a string or
an {"content": ...} entry), else special_tokens_map.json's, else config.json's `*_token_id`; a
key set to null in a tokenizer file means the tokenizer has none (Qwen3 has no bos). The files
are the ones beside the tokenizer.json. An eos is required: documents are packed ended by it.

`encode` adds no special ids (a tokenizer.json's post-processor may add <s>): the data adds
bos/eos itself, as for a sentencepiece model. `save` writes tokenizer.json, tokenizer_config.json
(the resolved special tokens written out, `tokenizer_class` PreTrainedTokenizerFast unless it
names one) and special_tokens_map.json: what `AutoTokenizer.from_pretrained` loads, and what this
class reads back with the same ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from megatron_nullmoe.errors import TokenizerError

SPECIALS = ("bos", "eos", "pad")
TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path} cannot be read ({err})") from None
    return found if isinstance(found, dict) else {}


def _content(entry) -> Optional[str]:
    """A special token as tokenizer files write it: a string or {"content": ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


def special_ids(folder: Path, token_to_id) -> dict[str, Optional[int]]:
    """{"bos"/"eos"/"pad": id or None} from the folder's files (module doc: the order they are
    read in). TokenizerError for a named token the vocabulary lacks."""
    tokens = [(name, _read_json(folder / name)) for name in TOKEN_FILES]
    config = _read_json(folder / "config.json")
    ids: dict[str, Optional[int]] = {}
    for special in SPECIALS:
        key = f"{special}_token"
        where = next(((name, found) for name, found in tokens if key in found), None)
        if where is None:
            given = config.get(f"{key}_id")
            ids[special] = given[0] if isinstance(given, list) and given else given
            continue
        name, found = where
        token = _content(found[key])
        if token is None:
            ids[special] = None
            continue
        ids[special] = token_to_id(token)
        if ids[special] is None:
            raise TokenizerError(f"{folder / name}: {key} {token!r} is not in the tokenizer's "
                                 "vocabulary")
    return ids


class HFTokenizer:
    """tokenizer.json through `tokenizers`; the special ids from the files beside it."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as Fast

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {str(path)!r} does not exist (give a "
                                 "tokenizer.json or a sentencepiece .model)")
        try:
            self.tok = Fast.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception for a bad file
            raise TokenizerError(f"tokenizer file {str(path)!r} is not a Hugging Face "
                                 f"tokenizer.json: {err}") from None
        self.path = path
        ids = special_ids(path.parent, self.tok.token_to_id)
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
        if self.eos_id is None:
            raise TokenizerError(
                f"tokenizer {str(path)!r} has no eos token: documents are packed ended by it "
                f"(name eos_token in {path.parent / 'tokenizer_config.json'} or eos_token_id in "
                f"{path.parent / 'config.json'})")

    @property
    def vocab_size(self) -> int:
        """One past the largest id (added tokens included): the rows an embedding needs."""
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i >= 0], skip_special_tokens=True)

    def save(self, folder: Path) -> Path:
        """tokenizer.json and its two token files into `folder` (module doc); returns the json."""
        folder = Path(folder)
        out = folder / "tokenizer.json"
        if out.exists() and out.samefile(self.path):
            return out
        shutil.copyfile(self.path, out)
        config = _read_json(self.path.parent / "tokenizer_config.json")
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        specials = _read_json(self.path.parent / "special_tokens_map.json")
        for special in SPECIALS:
            i = getattr(self, f"{special}_id")
            token = None if i is None else self.tok.id_to_token(i)
            config[f"{special}_token"] = token
            if token is not None or f"{special}_token" in specials:
                specials[f"{special}_token"] = token
        for name, found in zip(TOKEN_FILES, (config, specials)):
            (folder / name).write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
        return out
