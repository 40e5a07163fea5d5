"""Model builders for Megatron-LM's `model_provider` path, with null experts.

`gpt_builder` has the signature of Megatron-LM's own (`gpt_builders.gpt_builder(args, pre_process,
post_process, vp_stage=None, config=None, pg_collection=None)`), so an entry script passes
`partial(model_provider, gpt_builder)` to `pretrain()`. Its layer spec is megatron-core's decoder
block spec for this pipeline stage (so `--moe-layer-freq`, pipeline layouts and TE/local follow
Megatron-LM's choice), converted by `with_null_experts` when the stage has MoE layers.

`llava_specs` returns the language and projector specs that Megatron-LM's pretrain_vlm.py gets
wrong with MoE: its projector is built from the language layer's MLP submodules (with MoE, a
router and experts: `MultimodalProjector` then fails), and its TE llava layer spec has no
`pre_mlp_layernorm`, so MoE layers would see un-normalised input (TE fuses that norm only into a
dense fc1). Here the language layer is megatron-core's GPT layer spec (which adds the pre-MLP norm
for MoE) and the projector a dense MLP spec.
"""

from __future__ import annotations

from typing import Optional

from megatron_nullmoe import _mcore
from megatron_nullmoe.config import NullExpertConfigError
from megatron_nullmoe.megatron_lm.args import null_config_from_args
from megatron_nullmoe.model_utils import check_routers
from megatron_nullmoe.spec import with_null_experts


def _use_te(args) -> bool:
    return getattr(args, "transformer_impl", "transformer_engine") == "transformer_engine"


def _refuse_unsupported(args) -> None:
    for attr, why in (
        ("use_legacy_models", "legacy (non-megatron-core) models have no MoE layer specs"),
        ("experimental_attention_variant", "experimental attention block specs are not converted"),
        ("heterogeneous_layers_config_path", "heterogeneous layer specs are not converted"),
        ("mtp_num_layers", "multi-token-prediction layers are not converted"),
    ):
        if getattr(args, attr, None):
            raise NullExpertConfigError(f"--{attr.replace('_', '-')} with null experts: {why}")


def null_decoder_spec(args, config, vp_stage: Optional[int] = None):
    """The decoder spec for this stage: `--spec` if given, else megatron-core's decoder block spec,
    with null experts in its MoE layers. A stage without MoE layers is returned unchanged."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.spec_utils import import_module

    _refuse_unsupported(args)
    null = null_config_from_args(args)
    if getattr(args, "spec", None):
        spec = import_module(args.spec)
    else:
        spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=_use_te(args), normalization=args.normalization,
            qk_l2_norm=getattr(args, "qk_l2_norm", False), vp_stage=vp_stage)
    if not null.num_null_experts:
        return spec
    null.check_once(config)  # its routers, built with this config, skip theirs
    try:
        return with_null_experts(spec, null)
    except ValueError:  # this pipeline stage holds only dense layers (or none at all)
        return spec


def gpt_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """Megatron-LM GPT builder with null experts (drop-in for gpt_builders.gpt_builder)."""
    from megatron.core.models.gpt import GPTModel

    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    spec = null_decoder_spec(args, config, vp_stage)
    return check_routers(GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process,
        post_process=post_process, fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, rope_scaling=args.use_rope_scaling, vp_stage=vp_stage,
        pg_collection=pg_collection,
    ))


def llava_specs(args, config):
    """(language layer spec with null experts, dense projector MLP submodules) for LLaVAModel."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    _refuse_unsupported(args)
    use_te = _use_te(args)
    experts, grouped = args.num_experts, getattr(args, "moe_grouped_gemm", False)
    if getattr(args, "spec", None):
        from megatron.core.transformer.spec_utils import import_module

        language = import_module(args.spec)
    elif use_te:
        language = get_gpt_layer_with_transformer_engine_spec(experts, grouped)
    else:
        language = get_gpt_layer_local_spec(experts, grouped, normalization=args.normalization)
    null = null_config_from_args(args)
    if experts and null.num_null_experts:
        null.check_once(config)
        language = with_null_experts(language, null)
    projector = _mcore.dense_mlp_submodules(use_te)
    return language, projector


def llava_builder(args, language_config, pre_process=True, post_process=True, add_encoder=True,
                  add_decoder=True, parallel_output=True, pg_collection=None):
    """LLaVAModel from Megatron-LM's VLM args, with the fixed specs of `llava_specs`.

    Expects args already adjusted the way pretrain_vlm.py adjusts them (decoder_seq_length
    including image tokens); needs no megatron.training itself.
    """
    import copy

    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import (
        get_vit_layer_with_local_spec,
        get_vit_layer_with_transformer_engine_spec,
    )

    language, projector = llava_specs(args, language_config)
    vision = copy.deepcopy(language_config)
    vision.num_layers = args.encoder_num_layers
    vision.vision_model_type = "clip"
    # The ViT and projector are dense and run unsplit over the sequence.
    projection = copy.deepcopy(language_config)
    for cfg in (vision, projection):
        cfg.num_moe_experts = None
        cfg.context_parallel_size = 1
        cfg.sequence_parallel = False
        cfg.tp_comm_overlap = False
        cfg.pipeline_model_parallel_size = 1
    vision.first_pipeline_num_layers = vision.last_pipeline_num_layers = None
    vit = get_vit_layer_with_transformer_engine_spec() if _use_te(args) \
        else get_vit_layer_with_local_spec()
    return check_routers(LLaVAModel(
        language_transformer_config=language_config, language_transformer_layer_spec=language,
        language_vocab_size=args.padded_vocab_size,
        language_max_sequence_length=args.decoder_seq_length,
        vision_transformer_config=vision, vision_transformer_layer_spec=vit,
        drop_vision_class_token=args.disable_vision_class_token,
        vision_projection_config=projection, vision_projection_layer_spec=projector,
        vision_projection_type="mlp", parallel_output=parallel_output,
        language_position_embedding_type=args.position_embedding_type,
        language_rotary_percent=args.rotary_percent, language_rope_scaling=args.use_rope_scaling,
        pre_process=pre_process, post_process=post_process, add_encoder=add_encoder,
        add_decoder=add_decoder, img_h=args.img_h, img_w=args.img_w, patch_dim=args.patch_dim,
        pg_collection=pg_collection,
    ))
