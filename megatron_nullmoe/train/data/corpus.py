"""The text study's corpus: Python source written by people, pinned by version and hash.

Every machine of this project installs torch 2.13.0 from the package registry (the set-up pins
it), and its Python sources are several MB of code, comments and docstrings that people wrote.
The corpus is a fixed list of its subpackages, one jsonl document per file in sorted path order;
every 20th file (by path) is held out for validation. The tokenizer is a sentencepiece BPE model
trained on the training lines. The corpus's sha256 is pinned here: preparation refuses another
torch version or a corpus whose hash differs, naming both, so two machines that prepare it study
the same text.

    python -m megatron_nullmoe.train.data.corpus --out data/text_study
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from megatron_nullmoe.run.data import DataError
from megatron_nullmoe.run.tokenizer import train_tokenizer

PACKAGE, VERSION = "torch", "2.13.0"
SUBPACKAGES = ("autograd", "distributed", "distributions", "nn", "optim", "utils")
SHA256 = "3a8354f68fa63deec80faee29c40ec1456eb084db0fe9db948c907c97f8f10fa"
VOCAB_SIZE = 4096
VAL_EVERY = 20  # every 20th file by path is a validation document
STAMP = "corpus.json"


def source_files() -> tuple[str, list[Path]]:
    """(installed version, the corpus's files in sorted order, relative to the package)."""
    import torch

    root = Path(torch.__file__).parent
    files = sorted(p for sub in SUBPACKAGES for p in (root / sub).rglob("*.py"))
    return torch.__version__.split("+")[0], [p.relative_to(root.parent) for p in files]


def corpus_documents() -> tuple[list[tuple[str, str]], str]:
    """([(relative path, text)] of every corpus file in order, sha256); checks version and
    hash."""
    import torch

    version, files = source_files()
    if version != VERSION:
        raise DataError(f"the text study's corpus is {PACKAGE} {VERSION}'s Python source; "
                        f"{PACKAGE} {version} is installed (pip install {PACKAGE}=={VERSION})")
    base = Path(torch.__file__).parent.parent
    docs = [(str(f), (base / f).read_text(encoding="utf-8", errors="replace")) for f in files]
    digest = hashlib.sha256()
    for path, text in docs:
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
    if digest.hexdigest() != SHA256:
        raise DataError(f"corpus hash {digest.hexdigest()} differs from the pinned {SHA256} "
                        f"({PACKAGE} {version}, {len(docs)} files of {', '.join(SUBPACKAGES)}): "
                        "this installation's sources are not the study's")
    return docs, digest.hexdigest()


def prepare_corpus(out: Path, vocab_size: int = VOCAB_SIZE) -> Path:
    """Writes train.jsonl, val.jsonl, tokenizer.model and a stamp into `out` (reused when the
    stamp matches)."""
    out = Path(out)
    stamp = {"package": PACKAGE, "version": VERSION, "subpackages": list(SUBPACKAGES),
             "sha256": SHA256, "vocab_size": vocab_size, "val_every": VAL_EVERY}
    if (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        return out
    docs, digest = corpus_documents()
    stamp["sha256"] = digest
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "val": []}
    for i, (_, text) in enumerate(docs):
        splits["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].append(text)
    for name, texts in splits.items():
        tmp = out / f"{name}.jsonl.tmp"
        with tmp.open("w") as f:
            for text in texts:
                f.write(json.dumps({"text": text}) + "\n")
        tmp.replace(out / f"{name}.jsonl")
    lines = [line for text in splits["train"] for line in text.splitlines() if line.strip()]
    train_tokenizer(lines, out / "tokenizer.model", vocab_size)
    (out / STAMP).write_text(json.dumps(stamp, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.train.data.corpus",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default="data/text_study")
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    a = p.parse_args(argv)
    try:
        out = prepare_corpus(Path(a.out), a.vocab_size)
    except DataError as err:
        raise SystemExit(f"corpus: {err}") from None
    stamp = json.loads((out / STAMP).read_text())
    print(f"{out}: {PACKAGE} {VERSION} sources ({', '.join(SUBPACKAGES)}), sha256 "
          f"{stamp['sha256']}, tokenizer of {a.vocab_size} pieces")


if __name__ == "__main__":
    main()
