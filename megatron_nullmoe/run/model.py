"""Builds megatron-core's own GPTModel or LLaVAModel from a recipe, with null-expert MoE layers.

The decoder spec is megatron-core's `get_gpt_decoder_block_spec` (so `moe_layer_freq`, pre-MLP
layernorm and TE/local choices are megatron-core's), turned into its null-expert form by
`with_null_experts`. `num_null_experts=0` gives the standard MoE: our router is then exactly
megatron-core's TopKRouter (tested bit for bit), and the dispatcher moves the same rows.

For the VLM, the projector gets a *dense* MLP spec. Megatron-LM's pretrain_vlm.py hands the
projector the language layer's MLP submodules, which with MoE are MoE submodules (a router and
experts in a projector); and its TE llava layer spec has no `pre_mlp_layernorm`, which a MoE layer
needs. Using the decoder block spec and a dense projector spec avoids both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_nullmoe import _mcore
from megatron_nullmoe.config import NullExpertConfig, NullExpertConfigError
from megatron_nullmoe.flops import moe_layer_pattern
from megatron_nullmoe.qk_norm import with_qk_norm_scope
from megatron_nullmoe.run.config import ConfigError, RunConfig
from megatron_nullmoe.run.tokenizer import IMAGE_TOKEN
from megatron_nullmoe.spec import with_null_experts


@dataclass(frozen=True)
class ModelInfo:
    """What the data pipeline and the logs need to know about the built model."""

    image_tokens: int  # positions one image occupies in the decoder sequence (0 for GPT)
    decoder_seq_length: int  # image tokens + text tokens


def null_config(cfg: RunConfig) -> NullExpertConfig:
    """The recipe's `model.null_experts` section is a NullExpertConfig already."""
    return cfg.model.null_experts


# megatron-core / NullExpertConfig names -> this trainer's recipe keys, for error messages
RECIPE_KEYS = {
    "moe_router_topk": "model.router_topk", "num_moe_experts": "model.num_experts",
    "moe_token_dispatcher_type": "model.token_dispatcher",
    **{f.name: f"model.null_experts.{f.name}" for f in dataclasses.fields(NullExpertConfig)},
    "expert_tensor_parallel_size": "parallel.tensor",
}

# model.activation -> megatron-core's (gated_linear_unit, activation_func). With the gate, linear_fc1
# holds the gate half then the up half, and the MLP computes silu(gate) * up (SwiGLU).
ACTIVATIONS = {"gelu": (False, torch.nn.functional.gelu),
               "swiglu": (True, torch.nn.functional.silu)}


def _recipe_keys(message: str) -> str:
    found = [key for name, key in RECIPE_KEYS.items() if name in message]
    return ", ".join(found) or "model.*"


def _common(cfg: RunConfig, dtype: torch.dtype) -> dict:
    on_cpu = not torch.cuda.is_available()
    return dict(
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline,
        # megatron-core trains MoE with tensor parallelism only together with sequence parallelism
        sequence_parallel=cfg.parallel.tensor > 1, hidden_dropout=0.0, attention_dropout=0.0,
        add_bias_linear=False, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        pipeline_dtype=dtype, use_cpu_initialization=on_cpu,
        perform_initialization=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
    )


def _check_architecture(cfg: RunConfig) -> None:
    """The decoder's architecture keys against each other and the tensor-parallel size, refused
    by recipe key (megatron-core would refuse some itself, without the key, or fail mid-forward)."""
    m, tp = cfg.model, cfg.parallel.tensor
    heads, groups = m.num_attention_heads, m.num_query_groups
    if m.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation={m.activation!r} is not valid: one of "
                          f"{', '.join(ACTIVATIONS)}")
    if groups is not None:
        if groups < 1 or heads % groups:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ConfigError(
                f"model.num_query_groups={groups} does not divide model.num_attention_heads="
                f"{heads}: each key/value head serves the same number of query heads; give one "
                f"of {', '.join(map(str, divisors))}, or null for one group per head (MHA)")
        if groups % tp and tp % groups:
            raise ConfigError(
                f"model.num_query_groups={groups} with parallel.tensor={tp}: megatron-core needs "
                "the key/value groups to be a multiple or a divisor of the tensor-parallel size")
    _check_qk_norm_scope(cfg)
    if m.position_embedding == "rope":
        head_dim = m.kv_channels or m.hidden_size // heads  # megatron-core's kv_channels
        what = (f"model.kv_channels = {head_dim}" if m.kv_channels else
                f"model.hidden_size // model.num_attention_heads = {m.hidden_size} // {heads} = "
                f"{head_dim}")
        if head_dim < 2 or head_dim % 2:
            raise ConfigError(
                f"model.position_embedding=rope rotates pairs of channels, so the head dimension "
                f"{what} must be even; change it, or use learned_absolute")


def _check_qk_norm_scope(cfg: RunConfig) -> None:
    """model.qk_norm_scope=projection against the keys its norm needs (qk_norm.py)."""
    m, tp = cfg.model, cfg.parallel.tensor
    if m.qk_norm_scope == "head":
        return
    where = f"model.qk_norm_scope={m.qk_norm_scope!r}"
    if not m.qk_layernorm:
        raise ConfigError(f"{where} with model.qk_layernorm=false: there is no q/k norm to span "
                          "the projection; set model.qk_layernorm=true, or leave "
                          "model.qk_norm_scope at 'head'")
    if m.normalization != "RMSNorm":
        raise ConfigError(f"{where} with model.normalization={m.normalization!r}: the "
                          "projection-wide q/k norm is an RMSNorm (valid: RMSNorm)")
    if tp > 1:
        raise ConfigError(
            f"{where} with parallel.tensor={tp}: each rank would hold a slice of the heads, and "
            "the norm's mean square over the tensor-parallel group is not computed (not done); "
            "use parallel.tensor=1 (expert and data parallelism are fine)")


def decoder_config(cfg: RunConfig, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    m = cfg.model
    if m.moe_layer_freq < 1:
        raise ConfigError(f"model.moe_layer_freq={m.moe_layer_freq} is not valid: layers 0, n, "
                          "2n, ... are MoE, so n must be an integer >= 1")
    _check_architecture(cfg)
    pattern = moe_layer_pattern(m.num_layers, m.moe_layer_freq)
    gated, activation = ACTIVATIONS[m.activation]
    try:
        return TransformerConfig(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
            kv_channels=m.kv_channels, qk_layernorm=m.qk_layernorm,
            normalization=m.normalization, layernorm_epsilon=m.norm_epsilon,
            gated_linear_unit=gated, activation_func=activation,
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size, moe_router_topk=m.router_topk,
            moe_layer_freq=pattern, moe_token_dispatcher_type=m.token_dispatcher,
            moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=m.aux_loss_coeff,
            moe_z_loss_coeff=m.z_loss_coeff, moe_router_score_function=m.router_score_function,
            moe_router_pre_softmax=(m.router_topk == 1 if m.router_pre_softmax is None
                                    else m.router_pre_softmax),
            moe_router_topk_scaling_factor=m.router_topk_scaling_factor,
            expert_model_parallel_size=cfg.parallel.expert, expert_tensor_parallel_size=1,
            **_common(cfg, dtype),
        )
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"model: megatron-core rejects this decoder config: {err}") from None


def vision_configs(cfg: RunConfig, dtype: torch.dtype):
    from megatron.core.transformer.transformer_config import TransformerConfig

    v = cfg.model.vision
    try:
        vision = TransformerConfig(
            num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
            num_attention_heads=v.num_attention_heads, **_common(cfg, dtype),
        )
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"model.vision: megatron-core rejects this ViT config: {err}") from None
    vision.vision_model_type = "clip"  # read by LLaVAModel; not a TransformerConfig field
    projection = TransformerConfig(  # an MLP; heads only need to divide by the TP size
        num_layers=1, hidden_size=cfg.model.hidden_size, ffn_hidden_size=cfg.model.ffn_hidden_size,
        num_attention_heads=cfg.model.num_attention_heads, **_common(cfg, dtype),
    )
    return vision, projection


def build_model(cfg: RunConfig, vocab_size: int, pg_collection, dtype: torch.dtype,
                use_te: Optional[bool] = None):
    """Returns (model, ModelInfo). The model lives on the current device, unwrapped. The config
    must have passed `check_model` (the trainer's `validate` runs it once per run)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.core import parallel_state as ps

    if use_te is None:
        use_te = _default_use_te()
    config = decoder_config(cfg, dtype)
    null = null_config(cfg)
    # With pipeline parallelism the block spec holds this stage's layers only. `normalization`
    # as Megatron-LM passes it: the local spec then builds RMSNorm layers with torch's RMSNorm.
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                      normalization=config.normalization)
    if cfg.model.qk_layernorm:
        spec = with_qk_norm_scope(spec, cfg.model.qk_norm_scope)
    try:
        spec = with_null_experts(spec, null)
    except ValueError:  # a pipeline stage with dense layers only
        pass
    info = ModelInfo(cfg.image_tokens, cfg.decoder_seq_length)
    if cfg.model.kind == "gpt":
        model = GPTModel(config, spec, vocab_size=vocab_size,
                         max_sequence_length=cfg.model.max_position_embeddings,
                         position_embedding_type=cfg.model.position_embedding,
                         rotary_base=cfg.model.rotary_base,
                         pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(), pg_collection=pg_collection)
        return model, info
    model = _build_llava(cfg, config, spec, vocab_size, pg_collection, dtype, use_te)
    if not hasattr(model, "model_type"):  # the schedules ask; Megatron-LM sets it in get_model
        from megatron.core.transformer.enums import ModelType

        model.model_type = ModelType.encoder_or_decoder
    return model, info


def check_model(cfg: RunConfig, dtype: torch.dtype) -> None:
    """What the model build would refuse on this machine, checked before anything is built: the
    norms it can build, and `check_decoder`. (The pipeline layout is `check_pipeline`'s, which
    `validate.check` runs first.)"""
    _check_norm_builds(cfg)
    check_decoder(cfg, dtype)


def check_decoder(cfg: RunConfig, dtype: torch.dtype = torch.float32) -> None:
    """The recipe's decoder on any machine: megatron-core's own decoder config checks, null experts
    against it, and the sequence length; ConfigError names the recipe keys."""
    config = decoder_config(cfg, dtype)
    try:
        null_config(cfg).check(config)
    except NullExpertConfigError as err:
        raise ConfigError(f"{err} [recipe keys: {_recipe_keys(str(err))}]") from None
    seq = cfg.decoder_seq_length
    if seq > cfg.model.max_position_embeddings:
        raise ConfigError(
            f"model.max_position_embeddings={cfg.model.max_position_embeddings} is below the "
            f"decoder sequence: {cfg.image_tokens} image tokens + data.seq_length="
            f"{cfg.data.seq_length} = {seq}")


def _default_use_te() -> bool:
    return _mcore.have_te() and torch.cuda.is_available()


def _check_norm_builds(cfg: RunConfig) -> None:
    """RMSNorm needs a norm that has it: Transformer Engine's, or (local spec) torch's RMSNorm,
    which megatron-core uses when apex is absent (the CPU case). With apex but no TE, the local
    spec's final norm is apex's FusedLayerNorm, which refuses RMSNorm."""
    if cfg.model.normalization != "RMSNorm" or _default_use_te():
        return
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if gpt_layer_specs.LNImpl is not WrappedTorchNorm:
        raise ConfigError(
            f"model.normalization=RMSNorm: without Transformer Engine megatron-core's local spec "
            f"uses {getattr(gpt_layer_specs.LNImpl, '__name__', gpt_layer_specs.LNImpl)} (apex) "
            "for the final norm, which supports LayerNorm only; install Transformer Engine, or "
            "use model.normalization=LayerNorm")


def check_pipeline(cfg: RunConfig) -> None:
    p, m = cfg.parallel.pipeline, cfg.model
    if p < 1:
        raise ConfigError(f"parallel.pipeline={p}: give a size >= 1")
    if p > 1 and m.kind != "gpt":
        raise ConfigError(f"parallel.pipeline={p} with model.kind={m.kind}: this trainer "
                          "pipelines the GPT decoder only (LLaVA's encoder stage is not set up)")
    if m.num_layers % p:
        raise ConfigError(f"model.num_layers={m.num_layers} does not split evenly into "
                          f"parallel.pipeline={p} stages")


def _build_llava(cfg, config, spec, vocab_size, pg_collection, dtype, use_te):
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import (
        get_vit_layer_with_local_spec,
        get_vit_layer_with_transformer_engine_spec,
    )

    v = cfg.model.vision
    vision, projection = vision_configs(cfg, dtype)
    vit_spec = (get_vit_layer_with_transformer_engine_spec() if use_te
                else get_vit_layer_with_local_spec())
    _bidirectional(vit_spec)
    projector_spec = _mcore.dense_mlp_submodules(use_te)
    return LLaVAModel(
        language_transformer_config=config, language_transformer_layer_spec=spec,
        language_vocab_size=vocab_size,
        language_max_sequence_length=cfg.model.max_position_embeddings,
        language_position_embedding_type=cfg.model.position_embedding,
        language_rotary_base=cfg.model.rotary_base,
        vision_transformer_config=vision, vision_transformer_layer_spec=vit_spec,
        drop_vision_class_token=v.drop_class_token, vision_projection_config=projection,
        vision_projection_layer_spec=projector_spec, img_h=v.image_size, img_w=v.image_size,
        patch_dim=v.patch_size, image_token_index=IMAGE_TOKEN, pg_collection=pg_collection,
    )


def describe(model) -> dict:
    """Parameter counts for the logs: total, and the part that lives in (real) experts."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"parameters": total, "expert_parameters": experts}


def _bidirectional(vit_spec) -> None:
    """A ViT attends over all its patches. megatron-core 0.16's local ViT spec (the CPU build)
    asks for a causal mask, unlike its Transformer Engine spec and 0.19's local spec: without this,
    a model trained on GPU would run a different ViT when loaded on CPU (export, generate)."""
    from megatron.core.transformer.enums import AttnMaskType

    vit_spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
