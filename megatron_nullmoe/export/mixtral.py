"""The plain-architecture export: a Mixtral checkpoint, where Mixtral computes the same function.

Why Mixtral: it is the standard top-k MoE format that everything reads (transformers without
remote code, vLLM, SGLang, llama.cpp), and Megatron-LM's Mixtral recipe is the null-MoE recipe
this project ships. Qwen2/3-MoE would add pre-softmax gates (`norm_topk_prob=False`), but Qwen3
always applies per-head q/k norms and Qwen2-MoE always has a shared expert and QKV biases.

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
from megatron_nullmoe.run.hf_layout import mixtral_name


def refusals(fields: dict, tensors: dict) -> list[str]:
    """Why Mixtral would compute something else than this model ([] when it is exact)."""
    reasons = []
    want = {"normalization": "RMSNorm", "position_embedding_type": "rope", "activation": "swiglu",
            "router_score_function": "softmax"}
    for key, value in want.items():
        if fields[key] != value:
            reasons.append(f"{key}={fields[key]!r}: Mixtral has {value!r} only")
    if fields["rotary_percent"] != 1.0:
        reasons.append(f"rotary_percent={fields['rotary_percent']}: Mixtral rotates whole heads")
    dense = [i for i, m in enumerate(fields["moe_layers"]) if not m]
    if dense:
        reasons.append(f"dense layers {dense}: every Mixtral layer is MoE (moe_layer_freq=1)")
    if fields["router_pre_softmax"]:
        reasons.append("router_pre_softmax=True: Mixtral renormalises its top-k gates (top-k then "
                       "softmax); pre-softmax gates are the all-slot probabilities")
    if fields["num_null_experts"] and fields["gate_normalization"] == "renormalize":
        reasons.append("gate_normalization='renormalize': the real picks take over the null picks' "
                       "share, which Mixtral's softmax over the picks (zero experts included) "
                       "does not; only 'keep_null_share' is exact")
    if fields["router_topk_scaling_factor"] not in (None, 1, 1.0):
        reasons.append(f"moe_router_topk_scaling_factor={fields['router_topk_scaling_factor']}: "
                       "Mixtral has no gate scaling")
    biased = [(name.split(".")[2], float(t.abs().max())) for name, t in tensors.items()
              if name.endswith("selection_bias") and bool(t.abs().max() > 0)]
    if biased:
        worst = max(b for _, b in biased)
        reasons.append(f"a selection-only router bias (budget control or expert bias) in layers "
                       f"{[int(i) for i, _ in biased]} (largest |bias| {worst:.3g}): Mixtral's "
                       "router has no place for it")
    return reasons


def mixtral_weights(fields: dict, tensors: dict) -> tuple[dict, int]:
    """(Mixtral's tensors, its expert count E + null copies)."""
    E, Z, k = fields["num_experts"], fields["num_null_experts"], fields["router_topk"]
    copies = 0 if not Z else (min(Z, k) if fields["null_logits"] == "shared" else Z)
    out = {name: t for name, t in tensors.items() if ".mlp." not in name}
    for i in range(fields["num_hidden_layers"]):
        src = f"model.layers.{i}.mlp."
        rows = [tensors[src + "router.weight"]]
        if copies:
            null = tensors[src + "router.null_weight"]
            rows.append(null.expand(copies, -1) if null.shape[0] == 1 else null)
        out[mixtral_name(src + "router.weight")] = torch.cat(rows).contiguous()
        for j in range(E + copies):  # experts E.. are the null slots: all-zero weights
            for proj in ("gate_proj", "down_proj", "up_proj"):
                weight = tensors[f"{src}experts.{min(j, E - 1)}.{proj}.weight"]
                out[mixtral_name(f"{src}experts.{j}.{proj}.weight")] = \
                    weight if j < E else torch.zeros_like(weight)
    return out, E + copies


def export_mixtral(model, tokenizer_model: Path, out: Path, provenance: dict,
                   dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    fields = hf_config(model)
    tensors = hf_state_dict(model)
    reasons = refusals(fields, tensors)
    if reasons:
        raise ExportError("--format mixtral would not compute what this model computes: "
                          + "; ".join(reasons) + ". Use the default format (NullMoEForCausalLM), "
                          "which is exact for every mode")
    weights, experts = mixtral_weights(fields, tensors)
    with writing(out, overwrite) as tmp:
        ids = write_tokenizer(Path(tokenizer_model), tmp)
        if (tmp / "tokenizer.model").is_file():  # its remote-code class; the model is stock
            write_code(tmp, ("tokenization_nullmoe.py",))
        config = {
            "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "vocab_size": fields["vocab_size"], "hidden_size": fields["hidden_size"],
            "intermediate_size": fields["moe_ffn_hidden_size"],
            "num_hidden_layers": fields["num_hidden_layers"],
            "num_attention_heads": fields["num_attention_heads"],
            "num_key_value_heads": fields["num_key_value_heads"], "head_dim": fields["head_dim"],
            "hidden_act": "silu", "max_position_embeddings": fields["max_position_embeddings"],
            "rms_norm_eps": fields["norm_eps"], "rope_theta": float(fields["rotary_base"]),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(fields["rotary_base"])},
            "num_local_experts": experts, "num_experts_per_tok": fields["router_topk"],
            "sliding_window": None, "tie_word_embeddings": fields["tie_word_embeddings"],
            "torch_dtype": str(dtype).replace("torch.", ""), **ids,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (tmp / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False},
                                                               indent=2) + "\n")
        save_weights(weights, tmp, dtype)
        write_provenance(tmp, provenance, dtype, format="mixtral", real_experts=fields["num_experts"],
                         zero_experts=experts - fields["num_experts"])
    return Path(out)
