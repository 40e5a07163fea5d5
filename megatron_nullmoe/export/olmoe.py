"""`export hf --format olmoe`: an OLMoE checkpoint, where OLMoE computes the same.

OLMoE is Qwen3-MoE's decoder with one difference in attention: its q_norm and k_norm are RMSNorms
over the whole q and k projections (heads x head_dim channels at once, model.qk_norm_scope:
projection, megatron_nullmoe/qk_norm.py), not over each head apart; its attention is as wide as
the hidden size, and every layer is MoE. Both gate rules: `norm_topk_prob=true` is top-k then
softmax over the picks, `norm_topk_prob=false` (the published OLMoE's) the all-expert softmax
probabilities of the picks (pre-softmax).

Null slots become zero experts under the rules mixtral.py holds for every stock family (exact only
with the null share kept, no selection-only bias, no gate scaling); OLMoE computes them, the
remote-code export is the one that skips them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_nullmoe.export.mixtral import common_refusals, export_stock


def refusals(fields: dict, tensors: dict) -> list[str]:
    """Why OLMoE would compute something else than this model ([] when it is exact)."""
    reasons = common_refusals(fields, tensors, "OLMoE")
    if not fields["qk_layernorm"]:
        reasons.append("qk_layernorm=False: every OLMoE layer normalises its whole q and k "
                       "projections (--format mixtral has no q/k norms)")
    elif fields["qk_norm_scope"] != "projection":
        reasons.append(f"qk_norm_scope={fields['qk_norm_scope']!r}: every OLMoE layer normalises "
                       "its whole q and k projections, not each head apart (--format qwen3_moe "
                       "does)")
    heads_width = fields["hidden_size"] // fields["num_attention_heads"]
    if fields["head_dim"] != heads_width:
        reasons.append(f"head_dim={fields['head_dim']}: OLMoE's heads are hidden_size / "
                       f"num_attention_heads = {heads_width} wide (its q_norm is sized by "
                       "hidden_size)")
    dense = [i for i, m in enumerate(fields["moe_layers"]) if not m]
    if dense:
        reasons.append(f"dense layers {dense}: every OLMoE layer is MoE (moe_layer_freq=1)")
    return reasons


def _olmoe_config(fields: dict, experts: int) -> dict:
    return {
        "model_type": "olmoe", "architectures": ["OlmoeForCausalLM"],
        "intermediate_size": fields["moe_ffn_hidden_size"], "num_experts": experts,
        "norm_topk_prob": not fields["router_pre_softmax"], "attention_bias": False,
        "clip_qkv": None,
    }


def export_olmoe(model, tokenizer_model: Path, out: Path, provenance: dict,
                 dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    return export_stock(model, "olmoe", refusals, _olmoe_config, tokenizer_model, out,
                        provenance, dtype, overwrite)
