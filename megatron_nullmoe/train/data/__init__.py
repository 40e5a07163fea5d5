"""Training data: the generated demo set, energon and jsonl loaders, the tokenizer."""
