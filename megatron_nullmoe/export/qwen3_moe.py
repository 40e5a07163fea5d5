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

from megatron_nullmoe.export.mixtral import common_refusals, export_stock


def refusals(fields: dict, tensors: dict) -> list[str]:
    """Why Qwen3-MoE would compute something else than this model ([] when it is exact)."""
    reasons = common_refusals(fields, tensors, "Qwen3-MoE")
    if not fields["qk_layernorm"]:
        reasons.append("qk_layernorm=False: every Qwen3-MoE layer normalises its query and key "
                       "heads (--format mixtral has no q/k norms)")
    elif fields["qk_norm_scope"] != "head":
        reasons.append(f"qk_norm_scope={fields['qk_norm_scope']!r}: Qwen3-MoE normalises each "
                       "query and key head apart, not the whole projection (--format olmoe does)")
    if not any(fields["moe_layers"]):
        reasons.append("no MoE layers: Qwen3-MoE needs at least one")
    return reasons


def _qwen3_config(fields: dict, experts: int) -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "intermediate_size": fields["ffn_hidden_size"],
        "moe_intermediate_size": fields["moe_ffn_hidden_size"], "num_experts": experts,
        "norm_topk_prob": not fields["router_pre_softmax"], "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, moe in enumerate(fields["moe_layers"]) if not moe],
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    }


def export_qwen3_moe(model, tokenizer_model: Path, out: Path, provenance: dict,
                     dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    return export_stock(model, "qwen3_moe", refusals, _qwen3_config, tokenizer_model, out,
                        provenance, dtype, overwrite)
