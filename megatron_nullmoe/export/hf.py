"""A megatron-core GPT with null experts -> a Hugging Face folder (NullMoEForCausalLM).

The folder holds config.json (model_type "nullmoe", `auto_map` to the remote code), the remote
code (hf_code/, torch and transformers only), model.safetensors, the run's tokenizer (a
sentencepiece model with its remote-code class, or a tokenizer.json as itself),
generation_config.json and export.json (where it came from). The token ids in the configs are
the tokenizer's own.

Weights are renamed and split, never changed: megatron-core's fused QKV ([groups, (heads/groups
q, k, v) x head_dim, H]) becomes q/k/v projections, a SwiGLU fc1 (gate half, then up half)
becomes gate/up projections, and each MoE router's selection-only bias (budget control plus
expert bias, as the router adds it at selection) is saved as the layer's `selection_bias`.
Everything the architecture reads is taken from the built model's own TransformerConfig, so a
setting the remote code cannot reproduce is refused here, by name, rather than exported wrong.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from megatron_nullmoe.errors import NullMoEError

HF_CODE = Path(__file__).parent / "hf_code"
# routing_math.py is a link to routing/math.py: the export ships the trainer's routing math itself
CODE_FILES = ("configuration_nullmoe.py", "modeling_nullmoe.py", "routing_math.py",
              "tokenization_nullmoe.py")
AUTO_MAP = {"AutoConfig": "configuration_nullmoe.NullMoEConfig",
            "AutoModel": "modeling_nullmoe.NullMoEModel",
            "AutoModelForCausalLM": "modeling_nullmoe.NullMoEForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_nullmoe.NullMoETokenizer", None]}


class ExportError(NullMoEError, ValueError):
    """A model this export cannot reproduce exactly, or an output folder it must not touch."""


def _gpt(model):
    from megatron.core.models.gpt import GPTModel

    if not isinstance(model, GPTModel):
        raise ExportError(f"{type(model).__name__} is not a GPTModel: a LLaVAModel exports with "
                          "megatron_nullmoe.export.vlm.export_vlm")
    return model


def _refuse_unsupported(model) -> None:
    c = model.config
    checks = [
        (c.add_bias_linear or getattr(c, "add_qkv_bias", False), "add_bias_linear/add_qkv_bias",
         "linear layers without bias"),
        (getattr(c, "qk_l2_norm", False), "qk_l2_norm", "off (qk_layernorm is exported)"),
        (getattr(c, "multi_latent_attention", False), "multi_latent_attention", "off"),
        (c.layernorm_zero_centered_gamma, "layernorm_zero_centered_gamma", "off"),
        (c.apply_residual_connection_post_layernorm, "apply_residual_connection_post_layernorm",
         "off"),
        (c.normalization not in ("LayerNorm", "RMSNorm"), f"normalization={c.normalization}",
         "LayerNorm or RMSNorm"),
        (model.position_embedding_type not in ("learned_absolute", "rope"),
         f"position_embedding_type={model.position_embedding_type}", "learned_absolute or rope"),
        (getattr(c, "moe_shared_expert_intermediate_size", None), "moe_shared_expert_intermediate_size",
         "no shared experts"),
        (getattr(c, "moe_router_num_groups", None), "moe_router_num_groups",
         "no group-limited routing"),
        (getattr(c, "mtp_num_layers", None), "mtp_num_layers", "no multi-token prediction layers"),
    ]
    for bad, name, valid in checks:
        if bad:
            raise ExportError(f"{name} cannot be exported to NullMoEForCausalLM yet (valid: {valid})")
    _activation(c)
    if getattr(model, "rotary_pos_emb", None) is not None:
        rotary = model.rotary_pos_emb
        if getattr(rotary, "seq_len_interpolation_factor", None) or getattr(
                c, "rotary_interleaved", False):
            raise ExportError("rotary embeddings with interleaving or sequence-length "
                              "interpolation cannot be exported (valid: plain rotary)")


def _activation(c) -> str:
    if c.gated_linear_unit and c.activation_func is F.silu:
        return "swiglu"
    if not c.gated_linear_unit and c.activation_func is F.gelu:
        return "gelu"
    raise ExportError(f"activation {getattr(c.activation_func, '__name__', c.activation_func)} "
                      f"with gated_linear_unit={c.gated_linear_unit} cannot be exported (valid: "
                      "gelu, or silu with gated_linear_unit (SwiGLU))")


def _routers(model) -> list:
    from megatron_nullmoe.router import NullExpertRouter

    return [layer.mlp.router if isinstance(getattr(getattr(layer, "mlp", None), "router", None),
                                           NullExpertRouter) else None
            for layer in model.decoder.layers]


def _qk_norm_scope(model) -> str:
    """What the model's q/k norms span: "projection" where the spec put qk_norm.py's norms in
    (model.qk_norm_scope=projection, OLMoE), else "head" (megatron-core's own, or none)."""
    from megatron_nullmoe.qk_norm import ProjectionQueryNorm

    whole = [isinstance(getattr(layer.self_attention, "q_layernorm", None), ProjectionQueryNorm)
             for layer in model.decoder.layers]
    if any(whole) and not all(whole):
        raise ExportError("q/k norms over the whole projection in some layers only cannot be "
                          "exported (valid: one q/k norm scope for every layer)")
    return "projection" if any(whole) else "head"


def hf_config(model, tokenizer_ids: Optional[dict] = None) -> dict:
    """NullMoEConfig's fields for this megatron-core GPT."""
    _gpt(model)
    _refuse_unsupported(model)
    c = model.config
    routers = _routers(model)
    moe = [r for r in routers if r is not None]
    null = moe[0].null_config if moe else None
    if null is not None and null.modality_topk is not None:
        raise ExportError("vision_topk/text_topk (the modality-fixed control) cannot be exported: "
                          "it needs a vision mask at every forward")
    fields = dict(
        vocab_size=model.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_query_groups or c.num_attention_heads,
        head_dim=c.kv_channels, ffn_hidden_size=c.ffn_hidden_size,
        moe_ffn_hidden_size=c.moe_ffn_hidden_size or c.ffn_hidden_size,
        moe_layers=[int(r is not None) for r in routers],
        num_experts=c.num_moe_experts or 0,
        num_null_experts=null.num_null_experts if null else 0,
        null_logits=null.null_logits if null else "shared",
        router_topk=c.moe_router_topk, router_score_function=c.moe_router_score_function,
        router_pre_softmax=bool(c.moe_router_pre_softmax),
        gate_normalization=null.gate_normalization if null else "renormalize",
        # megatron-core's top-k scaling times the null gate scale (the router's product)
        router_topk_scaling_factor=moe[0].gate_scaling if moe else c.moe_router_topk_scaling_factor,
        normalization=c.normalization, norm_eps=c.layernorm_epsilon,
        qk_layernorm=bool(c.qk_layernorm), qk_norm_scope=_qk_norm_scope(model),
        position_embedding_type=model.position_embedding_type,
        rotary_base=int(getattr(model, "rotary_base", 10000)),
        rotary_percent=float(getattr(c, "rotary_percent", 1.0)),
        max_position_embeddings=model.max_sequence_length, activation=_activation(c),
        tie_word_embeddings=bool(model.share_embeddings_and_output_weights),
    )
    fields.update(tokenizer_ids or {})
    return fields


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The NullMoEForCausalLM weights of this megatron-core GPT (fp32 copies, contiguous): its
    checkpoint tensors renamed and split by run/hf_layout.py's table (the import reads the same
    table back), plus each router's selection-only bias."""
    from megatron_nullmoe.run.hf_layout import Attention, global_tensors, to_hf

    _gpt(model)
    c = model.config
    att = Attention(c.num_attention_heads, c.num_query_groups or c.num_attention_heads,
                    c.kv_channels)
    out = to_hf(global_tensors(model), att, c.gated_linear_unit)
    if "lm_head.weight" not in out:  # tied: the output layer is the embedding
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    for i, (layer, router) in enumerate(zip(model.decoder.layers, _routers(model))):
        if router is None:
            continue
        if not hasattr(layer.mlp.experts, "local_experts"):
            raise ExportError(f"layer {i}: experts of type {type(layer.mlp.experts).__name__}; the "
                              "export reads the SequentialMLP a one-rank CPU build makes")
        bias = router.selection_bias()
        out[f"model.layers.{i}.mlp.router.selection_bias"] = (
            torch.zeros(router.num_slots) if bias is None else bias.detach().float().clone())
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


# ----------------------------------------------------------------------------- writing
@contextlib.contextmanager
def writing(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh temporary folder beside `out` to write the export into; it replaces `out` only once
    complete, and is removed if writing fails. An `out` that holds files is refused unless
    `overwrite`, so nothing already written is lost to a mistyped folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} already holds files; give an empty or new folder, or "
                          "--overwrite to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def write_provenance(out: Path, provenance: dict, dtype: torch.dtype, **fields) -> None:
    """export.json: where the export came from (source, step, run) and how it was written."""
    (out / "export.json").write_text(json.dumps(
        {**provenance, **fields, "dtype": str(dtype).replace("torch.", "")}, indent=2) + "\n")


def write_tokenizer(tokenizer_path: Path, out: Path) -> dict:
    """The run's tokenizer, loadable by AutoTokenizer: a tokenizer.json with its token files
    (run/hf_tokenizer.py's `save`), or tokenizer.model with its remote-code class (the caller
    writes the code); returns its special token ids, for the model's config."""
    from megatron_nullmoe.run.tokenizer import Tokenizer, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if not isinstance(tok, Tokenizer):
        tok.save(out)
        return ids
    unk = tok.sp.unk_id()
    shutil.copyfile(tok.path, out / "tokenizer.model")
    specials = {f"{name}_token": tok.sp.id_to_piece(i) for name, i in
                (("bos", tok.bos_id), ("eos", tok.eos_id), ("unk", unk), ("pad", tok.pad_id))
                if i is not None}
    config = {"tokenizer_class": "NullMoETokenizer", "auto_map": TOKENIZER_AUTO_MAP,
              "add_bos_token": tok.bos_id is not None, "add_eos_token": False,
              "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False,
              "bos_token": None, "pad_token": None, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return {**ids, "unk_token_id": unk}


def write_code(out: Path, names: tuple[str, ...] = CODE_FILES) -> None:
    """Copies the remote code into `out` as plain files (links followed)."""
    for name in names:
        shutil.copyfile(HF_CODE / name, out / name)


def write_config(fields: dict, out: Path, architecture: str = "NullMoEForCausalLM") -> None:
    config = {"model_type": "nullmoe", "architectures": [architecture], "auto_map": AUTO_MAP,
              "torch_dtype": "float32", **fields}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": fields["bos_token_id"], "eos_token_id": fields["eos_token_id"],
                  "pad_token_id": fields["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def save_weights(tensors: dict[str, torch.Tensor], out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    cast = {k: (v if k.endswith("selection_bias") else v.to(dtype)) for k, v in tensors.items()}
    save_file(cast, str(out / "model.safetensors"), metadata={"format": "pt"})


def export_gpt(model, tokenizer_model: Path, out: Path, provenance: dict,
               dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Writes the NullMoEForCausalLM folder of `model` at `out`; returns `out`."""
    fields = hf_config(model)  # refuses before anything is written
    tensors = hf_state_dict(model)
    with writing(out, overwrite) as tmp:
        fields.update(write_tokenizer(Path(tokenizer_model), tmp))
        write_config(fields, tmp)
        write_code(tmp)
        save_weights(tensors, tmp, dtype)
        write_provenance(tmp, provenance, dtype, format="nullmoe")
    return Path(out)
