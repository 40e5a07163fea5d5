"""Out of the trainer: a trained model as a Hugging Face folder, and what reads it.

    check.py      the export's logits against the megatron-core model's
    source.py     a run folder, checkpoint or export -> a model (megatron-core, or transformers)
    hf.py         megatron-core model -> NullMoEForCausalLM folder (remote code, safetensors, tokenizer)
    vlm.py        megatron-core LLaVAModel -> NullMoEForConditionalGeneration folder
    hf_code/      the remote code itself (torch + transformers only), copied into every export;
                  routing_math.py there is a link to routing/math.py, copied as a plain file
    __main__.py   python -m megatron_nullmoe.export hf SOURCE --out DIR

megatron_nullmoe.inference (generate, evaluate) builds on these.
"""
