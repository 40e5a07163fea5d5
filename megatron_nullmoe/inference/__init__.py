"""A trained model at work outside the trainer, on one CPU process (sources: export/source.py).

    decode.py      greedy and sampled continuations and captions, KV-cached or not
    perplexity.py  perplexity and the real experts per token inference ran, on a validation set
    captions.py    the VLM's captions of validation images, drawn into RUN/captions.png

The command lines are `python -m megatron_nullmoe.generate`, `python -m megatron_nullmoe.evaluate`
and `python -m megatron_nullmoe.inference.captions`.
"""
