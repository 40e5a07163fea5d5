"""Small megatron-core MoE layers for tests, with weights that do not depend on the EP layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_nullmoe import NullExpertConfig
from megatron_nullmoe.layer import null_moe_layer

HIDDEN, FFN = 16, 24


def moe_config(num_experts=4, topk=2, dispatcher="alltoall", ep=1, **overrides) -> TransformerConfig:
    kw = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=2,
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
        add_bias_linear=False,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def build_layer(config, null_config: NullExpertConfig, pg_collection=None):
    return null_moe_layer(config, null_config, pg_collection=pg_collection)


def global_weights(config, null_config, seed=0) -> dict:
    """Deterministic weights for all E experts, the router and the null rows."""
    g = torch.Generator().manual_seed(seed)
    E, H = config.num_moe_experts, config.hidden_size
    return {
        "router": torch.randn(E, H, generator=g) * 0.5,
        "null": torch.randn(max(null_config.num_null_logits, 1), H, generator=g) * 0.5,
        "fc1": torch.randn(E, config.ffn_hidden_size, H, generator=g) * 0.3,
        "fc2": torch.randn(E, H, config.ffn_hidden_size, generator=g) * 0.3,
    }


def load_weights(layer, weights: dict) -> None:
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        if layer.router.null_weight is not None:
            layer.router.null_weight.copy_(weights["null"][: layer.router.null_weight.shape[0]])
        for l, g in enumerate(layer.local_expert_indices):
            expert = layer.experts.local_experts[l]
            expert.linear_fc1.weight.copy_(weights["fc1"][g])
            expert.linear_fc2.weight.copy_(weights["fc2"][g])


def dense_reference(x_TH, probs_TE, map_TE, weights, activation=F.gelu) -> torch.Tensor:
    """out = sum over chosen real experts e of g_e * FFN_e(x), computed densely."""
    out = torch.zeros_like(x_TH)
    for e in range(map_TE.shape[1]):
        h = activation(x_TH @ weights["fc1"][e].t()) @ weights["fc2"][e].t()
        out = out + (probs_TE[:, e] * map_TE[:, e]).unsqueeze(-1) * h
    return out


VOCAB = 96


def build_gpt(null: NullExpertConfig, *, layers: int = 2, moe_freq=1, topk: int = 2,
              experts: int = 4, seq: int = 16, position: str = "learned_absolute",
              rotary_base: int = 10000, qk_norm_scope: str = "head", **config):
    """A megatron-core GPTModel with null-expert MoE layers (local spec, CPU, fp32, eval mode),
    random weights (std 0.2, so routing is far from uniform) and, as in a trained model, selection
    biases set: the budget-control bias at 0.15 and the expert bias random."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nullmoe.flops import moe_layer_pattern
    from megatron_nullmoe.qk_norm import with_qk_norm_scope
    from megatron_nullmoe.spec import with_null_experts

    kw = dict(num_layers=layers, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
              num_moe_experts=experts, moe_ffn_hidden_size=24, moe_router_topk=topk,
              moe_layer_freq=moe_layer_pattern(layers, moe_freq), moe_token_dispatcher_type="alltoall",
              moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
              add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
              attention_dropout=0.0, bias_activation_fusion=False, masked_softmax_fusion=False,
              bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
              gradient_accumulation_fusion=False, init_method_std=0.2)
    kw.update(config)
    tc = TransformerConfig(**kw)
    spec = with_qk_norm_scope(get_gpt_decoder_block_spec(tc, use_transformer_engine=False),
                              qk_norm_scope)  # "projection": OLMoE's q/k norms (qk_norm.py)
    spec = with_null_experts(spec, null)
    model = GPTModel(tc, spec, vocab_size=VOCAB, max_sequence_length=seq,
                     position_embedding_type=position, rotary_base=rotary_base,
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.decoder.layers:
            router = getattr(layer.mlp, "router", None)
            if router is None:
                continue
            if router.null_budget_bias is not None:  # as trained: some null picks either way
                router.null_budget_bias.fill_(0.15)
            if router.enable_expert_bias:
                router.expert_bias.copy_(torch.randn(router.num_slots, generator=g) * 0.05)
    return model.eval()
