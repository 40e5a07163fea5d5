"""`with_null_experts`: turns megatron-core GPT layer/block specs into their null-expert form."""

from __future__ import annotations

import dataclasses
from typing import Union

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_nullmoe import _mcore
from megatron_nullmoe.config import NullExpertConfig
from megatron_nullmoe.layer import LAYER_CLASSES, null_router

Spec = Union[ModuleSpec, TransformerBlockSubmodules, list]


def _convert_layer(spec: ModuleSpec, null_config: NullExpertConfig) -> tuple[ModuleSpec, bool]:
    mlp = getattr(spec.submodules, "mlp", None)
    if _mcore.moe_parts(mlp) is None:
        return spec, False  # dense layer: left exactly as it was
    if spec.module not in LAYER_CLASSES:
        raise TypeError(
            f"with_null_experts: layer class {getattr(spec.module, '__name__', spec.module)} is "
            f"not supported; supported: {sorted(c.__name__ for c in LAYER_CLASSES)}"
        )
    moe = _mcore.with_moe_router(mlp, null_router(null_config))
    layer_subs = dataclasses.replace(spec.submodules, mlp=moe)
    return dataclasses.replace(spec, module=LAYER_CLASSES[spec.module], submodules=layer_subs), True


def with_null_experts(spec: Spec, null_config: NullExpertConfig) -> Spec:
    """Returns a copy of `spec` whose MoE layers have null experts; dense layers are untouched.

    Accepts what GPTModel and LLaVAModel accept as a language layer spec: a transformer-layer
    ModuleSpec, a TransformerBlockSubmodules (decoder block spec, e.g. from
    `get_gpt_decoder_block_spec`, local or TE), a ModuleSpec wrapping one, or a list of layer
    specs. The input is never modified (megatron-core shares one spec object between layers).
    Raises ValueError when there is no MoE layer to convert.
    """
    if not isinstance(null_config, NullExpertConfig):
        raise TypeError(f"null_config must be a NullExpertConfig, got {type(null_config).__name__}")
    converted: list[bool] = []

    def layer(s):
        new, did = _convert_layer(s, null_config)
        converted.append(did)
        return new

    if isinstance(spec, TransformerBlockSubmodules):
        out = dataclasses.replace(spec, layer_specs=[layer(s) for s in spec.layer_specs])
    elif isinstance(spec, ModuleSpec) and isinstance(spec.submodules, TransformerBlockSubmodules):
        out = dataclasses.replace(spec, submodules=with_null_experts(spec.submodules, null_config))
        converted.append(True)
    elif isinstance(spec, ModuleSpec):
        out = layer(spec)
    elif isinstance(spec, list):
        out = [layer(s) for s in spec]
    else:
        raise TypeError(
            "with_null_experts takes a layer ModuleSpec, a TransformerBlockSubmodules or a list "
            f"of layer specs, got {type(spec).__name__}"
        )
    if not any(converted):
        raise ValueError(
            "with_null_experts: the spec has no MoE layer (build it with num_experts set, e.g. "
            "get_gpt_layer_local_spec(num_experts=E) or get_gpt_decoder_block_spec(config, ...))"
        )
    return out
