"""A trained model at work outside the trainer, on one CPU process (sources: export/source.py).

    decode.py      greedy and sampled continuations and captions, KV-cached or not
    perplexity.py  perplexity and the real experts per token inference ran, on a validation set

The command lines are `python -m megatron_nullmoe.generate` and `python -m megatron_nullmoe.evaluate`.
"""
