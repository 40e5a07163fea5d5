"""A trained model at work outside the trainer, on one CPU process (sources: export/source.py).

The three commands:

    generate.py    python -m megatron_nullmoe.generate: a continuation or a caption
    evaluate.py    python -m megatron_nullmoe.evaluate: perplexity, real experts per token
    captions.py    python -m megatron_nullmoe.inference.captions: the VLM's captions of validation
                   images, drawn into RUN/captions.png

and the library they share:

    decode.py      greedy and sampled continuations and captions, KV-cached or not
    perplexity.py  perplexity and the real experts per token inference ran, on a validation set

`megatron_nullmoe/generate.py` and `megatron_nullmoe/evaluate.py` only forward to the first two,
so that the command lines stay short; `python -m megatron_nullmoe.inference.generate` (and
`.evaluate`) run the same code.
"""
