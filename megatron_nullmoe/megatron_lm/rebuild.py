"""A Megatron-LM checkpoint's model rebuilt on one CPU rank from its saved args, with its weights.

`load_megatron_lm` reads the training arguments the checkpoint stores (megatron_lm/checkpoint.py),
builds the entry script's model from them on one CPU rank (every parallel size 1, fp32,
megatron-core's local layers, no Transformer Engine), and loads only the model weights into it.

The TransformerConfig is built here, without megatron.training: like Megatron-LM's own
`core_transformer_config_from_args`, every argument named as a field of the installed
TransformerConfig is copied, then the few settings Megatron-LM derives are derived the same way
(--swiglu, --squared-relu, --quick-geglu, --group-query-attention, --num-experts), then the layout
and precision are set to one CPU rank in fp32 (`CPU`, and the local attention backend). This
needs no Megatron-LM checkout (only megatron-core is on the package registry), and args saved by
another Megatron-LM release still build: a field the args lack keeps megatron-core's default,
where Megatron-LM's function reads some arguments unconditionally. It is tested against
`core_transformer_config_from_args` itself (tests/test_export_megatron_lm.py): on a run's real
args, every field but those set for the CPU is equal. The layer spec and the GPTModel come from
the entry script's own builder (`megatron_lm.gpt_builder`) with `--transformer-impl local`; a
null-expert flag the saved args lack reads its value from before the flag existed
(`megatron_lm.args.apply_saved_defaults`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Optional

import torch

from megatron_nullmoe.config import NullExpertConfigError
from megatron_nullmoe.megatron_lm.args import apply_saved_defaults
from megatron_nullmoe.megatron_lm.builders import gpt_builder
from megatron_nullmoe.megatron_lm.checkpoint import (
    MegatronLMCheckpointError,
    load_weights,
    open_checkpoint,
    saved_step,
    tokenizer_path,
)
from megatron_nullmoe.run.source import single_process

# TransformerConfig fields set for one CPU rank in fp32 with megatron-core's local layers, whatever
# the run used (only fields the installed TransformerConfig has are set). None of them changes
# the model's function: layout, precision, fusions, recomputation, CUDA graphs and kernels.
CPU = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
    expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False,
    hierarchical_context_parallel_sizes=None, cp_comm_type=None, hybrid_context_parallel=False,
    max_seqlen_per_dp_cp_rank=None, pipeline_model_parallel_layout=None,
    pipeline_model_parallel_comm_backend=None, num_layers_in_first_pipeline_stage=None,
    num_layers_in_last_pipeline_stage=None, account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False, microbatch_group_size_per_vp_stage=None,
    moe_extended_tp=False, overlap_moe_expert_parallel_comm=False, overlap_p2p_comm=False,
    batch_p2p_comm=True, deallocate_pipeline_outputs=False, variable_seq_lengths=False,
    tp_comm_overlap=False, async_tensor_model_parallel_allreduce=False,
    fp16=False, bf16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32,
    enable_autocast=False, fp8=None, fp8_param=False, fp4=None, fp4_param=False,
    first_last_layers_bf16=False, use_kitchen=False, quant_recipe=None,
    use_cpu_initialization=True, perform_initialization=False, init_model_with_meta_device=False,
    gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
    persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    fused_single_qkv_rope=False, memory_efficient_layer_norm=False,
    use_fused_weighted_squared_relu=False, cross_entropy_loss_fusion=False,
    cross_entropy_fusion_impl="native", moe_permute_fusion=False, moe_router_fusion=False,
    moe_grouped_gemm=False, moe_use_legacy_grouped_gemm=False, moe_token_dispatcher_type="alltoall",
    moe_enable_deepep=False, moe_router_force_load_balancing=False, moe_enable_routing_replay=False,
    moe_router_padding_for_fp8=False, moe_router_padding_for_quantization=False,
    use_te_rng_tracker=False, use_te_activation_func=False, transformer_impl="local",
    recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
    recompute_modules=None, distribute_saved_activations=False, moe_layer_recompute=False,
    cpu_offloading=False, fine_grained_activation_offloading=False, delay_wgrad_compute=False,
    enable_cuda_graph=False, external_cuda_graph=False, cuda_graph_impl="none",
    symmetric_ar_type=None, flash_decode=False, inference_fuse_tp_communication=False,
    mtp_standalone=False,
)


def _refuse(args) -> None:
    """Settings a one-rank CPU build with megatron-core's local layers cannot reproduce."""
    def on(name):
        return getattr(args, name, None)

    checks = [
        ("use_legacy_models", "legacy (non-megatron-core) models have no sharded checkpoint "
                              "layout to rebuild"),
        ("multi_latent_attention", "multi-latent attention is not rebuilt by this export"),
        ("heterogeneous_layers_config_path", "heterogeneous layer configs are not rebuilt"),
        ("experimental_attention_variant", "experimental attention blocks are not rebuilt"),
        ("linear_attention_freq", "linear-attention layers are not rebuilt"),
        ("is_hybrid_model", "hybrid (Mamba) models are not GPT models"),
        ("hybrid_override_pattern", "hybrid (Mamba) models are not GPT models"),
        ("hybrid_layer_pattern", "hybrid (Mamba) models are not GPT models"),
        ("mtp_num_layers", "multi-token-prediction layers are not rebuilt (the entry script "
                           "refuses them with null experts)"),
        ("spec", "a custom layer spec module cannot be rebuilt with local layers"),
        ("window_size", "sliding-window attention needs Transformer Engine's attention"),
        ("fp8_param_gather", "FP8 parameters are Transformer Engine tensors"),
        ("fp4_param_gather", "FP4 parameters are Transformer Engine tensors"),
        ("kitchen_config_file", "quantization recipes need their own kernels"),
        ("kitchen_recipe_number", "quantization recipes need their own kernels"),
        ("te_precision_config_file", "precision recipes need Transformer Engine"),
    ]
    for name, why in checks:
        if on(name):
            raise MegatronLMCheckpointError(
                f"--{name.replace('_', '-')}={on(name)!r}: {why}; this checkpoint cannot be "
                "rebuilt on one CPU rank for export")
    if getattr(args, "ckpt_format", "torch_dist") != "torch_dist":
        raise MegatronLMCheckpointError(
            f"--ckpt-format={args.ckpt_format}: this export reads torch_dist checkpoints")
    position = getattr(args, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope", "none"):
        raise MegatronLMCheckpointError(
            f"--position-embedding-type={position}: not rebuilt by this export (valid: "
            "learned_absolute, rope, none)")
    if on("rope_type") not in (None, "rope"):
        raise MegatronLMCheckpointError(f"--rope-type={args.rope_type}: not rebuilt (valid: rope)")


def _activation(args, kw: dict) -> None:
    """Megatron-LM's derived activation settings (as core_transformer_config_from_args)."""
    import torch.nn.functional as F

    if getattr(args, "swiglu", False):
        kw["activation_func"], kw["gated_linear_unit"] = F.silu, True
    if getattr(args, "squared_relu", False):
        from megatron.core.activations import squared_relu

        kw["activation_func"] = squared_relu
    elif getattr(args, "quick_geglu", False):
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        kw["activation_func"], kw["gated_linear_unit"] = quick_gelu, True


def transformer_config(args):
    """The TransformerConfig of a Megatron-LM run's args, for one CPU rank in fp32 (see the
    module doc); refuses, by name, what that build cannot reproduce."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    _refuse(args)
    fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.init}
    kw = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    kw["num_moe_experts"] = getattr(args, "num_experts", None)
    kw["num_query_groups"] = (args.num_query_groups if getattr(args, "group_query_attention", False)
                              else None)
    _activation(args, kw)
    if getattr(args, "rope_type", None) is None:
        kw.pop("rope_type", None)
    if hasattr(args, "seed"):
        kw["inference_sampling_seed"] = args.seed
    if "attention_backend" in fields:
        from megatron.core.transformer.enums import AttnBackend

        kw["attention_backend"] = AttnBackend.local
    kw.update({k: v for k, v in CPU.items() if k in fields})
    try:
        return TransformerConfig(**{k: v for k, v in kw.items() if k in fields})
    except (AssertionError, ValueError, TypeError, NotImplementedError) as err:
        raise MegatronLMCheckpointError(
            f"megatron-core rejects the config of this checkpoint's args on one CPU rank: {err}"
        ) from None


def cpu_args(args) -> argparse.Namespace:
    """A copy of the run's args for the entry script's builder on one CPU rank: local layers,
    and, for each null-expert flag the run had not, its value before the flag existed (a plain
    Megatron-LM run, or one written before the flag existed)."""
    out = apply_saved_defaults(args)
    out.transformer_impl = "local"
    out.spec = None
    for name, default in (("fp16_lm_cross_entropy", False), ("use_rope_scaling", False),
                          ("rotary_percent", 1.0), ("rotary_base", 10000), ("qk_l2_norm", False),
                          ("untie_embeddings_and_output_weights", False),
                          ("position_embedding_type", "learned_absolute")):
        if not hasattr(out, name):
            setattr(out, name, default)
    return out


def build_model(args):
    """The entry script's GPT (megatron_lm.gpt_builder) from the run's args, one CPU rank, fp32,
    local layers, uninitialised weights (the checkpoint's are loaded over them)."""
    with _local_attention_env():
        config = transformer_config(args)
        single_process()
        try:
            return gpt_builder(cpu_args(args), pre_process=True, post_process=True, config=config)
        except NullExpertConfigError as err:
            raise MegatronLMCheckpointError(f"null experts: {err}") from None
        except (AssertionError, ValueError, TypeError, NotImplementedError) as err:
            raise MegatronLMCheckpointError(
                f"the model of this checkpoint's args cannot be built on one CPU rank with "
                f"megatron-core's local layers: {type(err).__name__}: {err}") from None


@contextlib.contextmanager
def _local_attention_env():
    """Transformer Engine's attention switches (NVTE_FLASH_ATTN, ...) cleared while the local
    model is built: Megatron-LM's initialize sets them for the training backend, and megatron-core
    asserts they agree with the backend of the config (here `local`, which reads none of them)."""
    names = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def load_megatron_lm(path: str | Path, tokenizer: Optional[str | Path] = None):
    """(model, tokenizer model path or None, step) of a Megatron-LM checkpoint: the entry
    script's megatron-core GPT, one CPU rank, fp32, eval mode, with the checkpoint's weights.
    `tokenizer` overrides the run's own (see `tokenizer_from_args` for when that is None)."""
    ckpt, state = open_checkpoint(path)
    args = state["args"]
    found, _ = tokenizer_path(tokenizer, args)
    model = build_model(args)
    load_weights(ckpt, model, state.get("content_metadata"))
    return model.eval(), found, saved_step(ckpt, state)
