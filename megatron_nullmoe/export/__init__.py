"""Out of the trainer: a trained model as a Hugging Face folder, and what reads it.

    source.py     a run folder or checkpoint -> the megatron-core model with its weights (1 rank, CPU)
    hf.py         megatron-core model -> NullMoEForCausalLM folder (remote code, safetensors, tokenizer)
    hf_code/      the remote code itself (torch + transformers only), copied into every export
    __main__.py   python -m megatron_nullmoe.export hf SOURCE --out DIR

`megatron_nullmoe.generate` and `megatron_nullmoe.evaluate` read any of these sources.
"""
