"""`export hf --format qwen3_moe`: a Qwen3-MoE checkpoint, where Qwen3-MoE computes the same.

Qwen3-MoE is Mixtral's shape (RMSNorm, rope, SwiGLU, grouped-query attention, a softmax router)
plus what Mixtral lacks: per-head q/k RMSNorm (megatron-core's qk_layernorm, always on in
Qwen3), a head size apart from hidden / heads, dense layers anywhere (`mlp_only_layers`), and both
gate rules: `norm_topk_prob=true` is top-k then softmax over the picks (megatron-core's default),
`norm_topk_prob=false` the all-expert softmax probabilities of the picks (its pre-softmax).

Null slots become zero experts as in mixtral.py (whose rules this file shares): exact only with
the null share kept (`keep_null_share`), no selection-only bias and no gate scaling. With
pre-softmax gates every null slot is a zero expert, since each is in the softmax's denominator.
The zero experts are still computed by Qwen3-MoE; the remote-code export is the one that skips them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_nullmoe.export.hf import ExportError, hf_config, hf_state_dict
from megatron_nullmoe.export.mixtral import common_refusals, write_stock, zero_expert_weights


def refusals(fields: dict, tensors: dict) -> list[str]:
    """Why Qwen3-MoE would compute something else than this model ([] when it is exact)."""
    reasons = common_refusals(fields, tensors, "Qwen3-MoE")
    if not fields["qk_layernorm"]:
        reasons.append("qk_layernorm=False: every Qwen3-MoE layer normalises its query and key "
                       "heads (--format mixtral has no q/k norms)")
    if not any(fields["moe_layers"]):
        reasons.append("no MoE layers: Qwen3-MoE needs at least one")
    return reasons


def export_qwen3_moe(model, tokenizer_model: Path, out: Path, provenance: dict,
                     dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    fields = hf_config(model)
    tensors = hf_state_dict(model)
    reasons = refusals(fields, tensors)
    if reasons:
        raise ExportError("--format qwen3_moe would not compute what this model computes: "
                          + "; ".join(reasons) + ". Use the default format (NullMoEForCausalLM), "
                          "which is exact for every mode")
    weights, experts = zero_expert_weights(fields, tensors, "qwen3_moe")
    theta = float(fields["rotary_base"])
    config = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": fields["vocab_size"], "hidden_size": fields["hidden_size"],
        "intermediate_size": fields["ffn_hidden_size"],
        "moe_intermediate_size": fields["moe_ffn_hidden_size"],
        "num_hidden_layers": fields["num_hidden_layers"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_key_value_heads": fields["num_key_value_heads"], "head_dim": fields["head_dim"],
        "hidden_act": "silu", "max_position_embeddings": fields["max_position_embeddings"],
        "rms_norm_eps": fields["norm_eps"], "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "num_experts": experts, "num_experts_per_tok": fields["router_topk"],
        "norm_topk_prob": not fields["router_pre_softmax"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(fields["moe_layers"]) if not moe],
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "tie_word_embeddings": fields["tie_word_embeddings"],
    }
    return write_stock(out, fields, weights, config, tokenizer_model, provenance, dtype,
                       overwrite, "qwen3_moe")
