"""Training data: the generated demo set, energon and jsonl loaders, the tokenizer."""


class DataError(ValueError):
    """A dataset (or one of its shards or lines) that is missing, unreadable or inconsistent."""
