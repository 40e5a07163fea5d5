"""vLLM plugin: serves megatron_nullmoe's Hugging Face export (`NullMoEForCausalLM`) in vLLM.

vLLM imports this through the `vllm.general_plugins` entry point in every one of its processes,
so this module imports nothing but vLLM's registry, and only when `register` is called; the model
(model.py) is named by string and imported only where vLLM builds it. It is a package of its own,
not `megatron_nullmoe.serve`, because importing anything under `megatron_nullmoe` first runs that
package's `__init__`, which imports megatron-core: the serving processes need none of it.

    vllm serve EXPORT --trust-remote-code --dtype float32
    LLM(model=EXPORT, trust_remote_code=True)

`trust_remote_code` is for the export's config and tokenizer classes (model_type "nullmoe" is not
one transformers knows); the model itself is this package's, never the export's remote code.
"""

ARCHITECTURE = "NullMoEForCausalLM"  # config.json "architectures" of the default export
MODEL_CLASS = "megatron_nullmoe_vllm.model:NullMoEForCausalLM"


def register() -> None:
    """The entry point: maps the export's architecture to this package's model class."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
