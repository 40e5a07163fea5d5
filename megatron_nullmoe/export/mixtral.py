"""The plain-architecture export: a Mixtral checkpoint, where Mixtral computes the same function.

Why Mixtral: it is the standard top-k MoE format that everything reads (transformers without
remote code, vLLM, SGLang, llama.cpp), and Megatron-LM's Mixtral recipe is the null-MoE recipe
this project ships. A model with per-head q/k norms or pre-softmax gates exports as Qwen3-MoE
instead (qwen3_moe.py, which shares this file's rules).

Mixtral's router takes softmax over all its experts, then top-k, then renormalises over the k
picks: the top-k-then-softmax gate. Null slots become experts whose weights are all zero, and the
router gets the null rows: a shared null logit needs min(Z, k) copies (no token can pick more),
per-expert null logits all Z. That is exact only when the null share is *kept* (a zero expert's
gate is simply not spent): `keep_null_share`, or no null slots at all; and only with no
selection-only bias, which Mixtral has no place for. Everything else is refused with its reason:
renormalised gates, pre-softmax gates, sigmoid scores, a budget-control or expert bias, the top-k
scaling factor, dense layers, and the architecture's LayerNorm, learned positions or GELU.
The zero experts are still computed by Mixtral (it cannot skip them): the remote-code export
(`hf.py`) is the one that saves compute.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_nullmoe.export.hf import (ExportError, hf_config, hf_state_dict, save_weights,
                                        write_code, write_provenance, write_tokenizer, writing)
from megatron_nullmoe.run.hf_layout import family_name


def common_refusals(fields: dict, tensors: dict, stock: str) -> list[str]:
    """Why a stock top-k MoE family (`stock`: its name for messages) with RMSNorm, rope, SwiGLU
    and a softmax router would compute something else; the families' own rules come on top."""
    reasons = []
    want = {"normalization": "RMSNorm", "position_embedding_type": "rope", "activation": "swiglu",
            "router_score_function": "softmax"}
    for key, value in want.items():
        if fields[key] != value:
            reasons.append(f"{key}={fields[key]!r}: {stock} has {value!r} only")
    if fields["rotary_percent"] != 1.0:
        reasons.append(f"rotary_percent={fields['rotary_percent']}: {stock} rotates whole heads")
    if fields["num_null_experts"] and fields["gate_normalization"] == "renormalize":
        reasons.append(f"gate_normalization='renormalize': the real picks take over the null "
                       f"picks' share, which {stock}'s gates over the picks (zero experts "
                       "included) do not; only 'keep_null_share' is exact")
    if fields["router_topk_scaling_factor"] not in (None, 1, 1.0):
        reasons.append(f"moe_router_topk_scaling_factor={fields['router_topk_scaling_factor']}: "
                       f"{stock} has no gate scaling (the factor is megatron-core's top-k "
                       "scaling times null_experts.gate_scale's; gate_scale='none' removes the "
                       "latter)")
    biased = [(name.split(".")[2], float(t.abs().max())) for name, t in tensors.items()
              if name.endswith("selection_bias") and bool(t.abs().max() > 0)]
    if biased:
        worst = max(b for _, b in biased)
        reasons.append(f"a selection-only router bias (budget control or expert bias) in layers "
                       f"{[int(i) for i, _ in biased]} (largest |bias| {worst:.3g}): {stock}'s "
                       "router has no place for it")
    return reasons


def refusals(fields: dict, tensors: dict) -> list[str]:
    """Why Mixtral would compute something else than this model ([] when it is exact)."""
    reasons = common_refusals(fields, tensors, "Mixtral")
    dense = [i for i, m in enumerate(fields["moe_layers"]) if not m]
    if dense:
        reasons.append(f"dense layers {dense}: every Mixtral layer is MoE (moe_layer_freq=1)")
    if fields["router_pre_softmax"]:
        reasons.append("router_pre_softmax=True: Mixtral renormalises its top-k gates (top-k then "
                       "softmax); pre-softmax gates are the all-slot probabilities")
    if fields["qk_layernorm"]:
        reasons.append("qk_layernorm=True: Mixtral has no q/k norms (--format qwen3_moe has, "
                       "per head; --format olmoe over the whole projection)")
    return reasons


def null_copies(fields: dict) -> int:
    """Zero experts that stand for the Z null slots. Top-k then softmax over the picks: a shared
    null logit needs min(Z, k) copies (no token picks more), per-expert null logits all Z. The
    all-slot softmax (pre-softmax) needs all Z, as each null slot is in its denominator."""
    Z, k = fields["num_null_experts"], fields["router_topk"]
    if not Z:
        return 0
    return min(Z, k) if fields["null_logits"] == "shared" and not fields["router_pre_softmax"] \
        else Z


def zero_expert_weights(fields: dict, tensors: dict, family: str) -> tuple[dict, int]:
    """(`family`'s tensors, its expert count E + null copies): the null slots become experts
    whose weights are all zero, their router rows the null rows."""
    E, copies = fields["num_experts"], null_copies(fields)
    out = {name: t for name, t in tensors.items()
           if ".mlp." not in name or not fields["moe_layers"][int(name.split(".")[2])]}
    for i, moe in enumerate(fields["moe_layers"]):
        if not moe:
            continue
        src = f"model.layers.{i}.mlp."
        rows = [tensors[src + "router.weight"]]
        if copies:
            null = tensors[src + "router.null_weight"]
            rows.append(null.expand(copies, -1) if null.shape[0] == 1 else null)
        out[family_name(src + "router.weight", family)] = torch.cat(rows).contiguous()
        for j in range(E + copies):  # experts E.. are the null slots: all-zero weights
            for proj in ("gate_proj", "down_proj", "up_proj"):
                weight = tensors[f"{src}experts.{min(j, E - 1)}.{proj}.weight"]
                out[family_name(f"{src}experts.{j}.{proj}.weight", family)] = \
                    weight if j < E else torch.zeros_like(weight)
    return out, E + copies


def write_stock(out: Path, fields: dict, weights: dict, config: dict, tokenizer_model: Path,
                provenance: dict, dtype: torch.dtype, overwrite: bool, family: str) -> Path:
    """The folder of a stock family: its config.json (`config`, plus the tokenizer's ids and the
    dtype), generation_config.json, the weights, the tokenizer and export.json."""
    with writing(out, overwrite) as tmp:
        ids = write_tokenizer(Path(tokenizer_model), tmp)
        if (tmp / "tokenizer.model").is_file():  # its remote-code class; the model is stock
            write_code(tmp, ("tokenization_nullmoe.py",))
        config = {**config, "torch_dtype": str(dtype).replace("torch.", ""), **ids}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False},
                                                               indent=2) + "\n")
        save_weights(weights, tmp, dtype)
        experts = config.get("num_local_experts") or config.get("num_experts")
        write_provenance(tmp, provenance, dtype, format=family, real_experts=fields["num_experts"],
                         zero_experts=experts - fields["num_experts"])
    return Path(out)


def export_stock(model, family: str, refusals, family_config, tokenizer_model: Path, out: Path,
                 provenance: dict, dtype: torch.dtype, overwrite: bool) -> Path:
    """A stock family's folder (`family`: mixtral, qwen3_moe, olmoe), or ExportError with every
    reason `refusals(fields, tensors)` gives. `family_config(fields, experts)`: the config.json
    keys of the family's own, beside the decoder keys every family shares (`shared_config`)."""
    fields = hf_config(model)
    tensors = hf_state_dict(model)
    reasons = refusals(fields, tensors)
    if reasons:
        raise ExportError(f"--format {family} would not compute what this model computes: "
                          + "; ".join(reasons) + ". Use the default format (NullMoEForCausalLM), "
                          "which is exact for every mode")
    weights, experts = zero_expert_weights(fields, tensors, family)
    config = {**shared_config(fields), **family_config(fields, experts)}
    return write_stock(out, fields, weights, config, tokenizer_model, provenance, dtype,
                       overwrite, family)


def shared_config(fields: dict) -> dict:
    """The config.json keys Mixtral, Qwen3-MoE and OLMoE name alike: the decoder's shape,
    RMSNorm, rope."""
    theta = float(fields["rotary_base"])
    return {
        "vocab_size": fields["vocab_size"], "hidden_size": fields["hidden_size"],
        "num_hidden_layers": fields["num_hidden_layers"],
        "num_attention_heads": fields["num_attention_heads"],
        "num_key_value_heads": fields["num_key_value_heads"], "head_dim": fields["head_dim"],
        "hidden_act": "silu", "max_position_embeddings": fields["max_position_embeddings"],
        "rms_norm_eps": fields["norm_eps"], "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "num_experts_per_tok": fields["router_topk"],
        "tie_word_embeddings": fields["tie_word_embeddings"],
    }


def _mixtral_config(fields: dict, experts: int) -> dict:
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "intermediate_size": fields["moe_ffn_hidden_size"], "num_local_experts": experts,
            "sliding_window": None}


def export_mixtral(model, tokenizer_model: Path, out: Path, provenance: dict,
                   dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    return export_stock(model, "mixtral", refusals, _mixtral_config, tokenizer_model, out,
                        provenance, dtype, overwrite)
