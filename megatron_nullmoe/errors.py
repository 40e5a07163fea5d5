"""`NullMoEError`: the base of every error the package raises on purpose.

Each error class also derives from the builtin its callers expect (ValueError for input that is not
valid, RuntimeError for a run that cannot go on, ImportError for a missing package), and names what
is wrong and what would be valid. A command catches `NullMoEError` once and prints its message on
one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NullMoEError(Exception):
    """An error the package raised on purpose; its message is for the user as it is."""

    what = "error"  # how a command's one-line report of it starts ("config error: ...")


class TokenizerError(NullMoEError, ValueError):
    """A tokenizer file that is missing or cannot be read. Here, not in run/tokenizer.py, because
    both tokenizer kinds raise it: run/tokenizer.py (sentencepiece, and `load_tokenizer`, which
    picks a kind) and run/hf_tokenizer.py (tokenizer.json) each import it from below."""
