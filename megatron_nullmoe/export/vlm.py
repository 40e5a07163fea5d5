"""A megatron-core LLaVAModel with null experts -> a Hugging Face folder
(NullMoEForConditionalGeneration, NullMoEProcessor).

The folder is the GPT export's (hf.py: config.json, remote code, model.safetensors, the
sentencepiece tokenizer, generation_config.json, export.json) plus the vision tower and projector
weights, `vision_config` and `image_token_index` in config.json, and the processor
(processing_nullmoe.py, processor_config.json). It loads with

    AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)  (or ...ForCausalLM)
    AutoProcessor.from_pretrained(DIR, trust_remote_code=True)

The language model is exported by hf.py's own conversion (the decoder classes are shared, so null
picks are skipped exactly as in the GPT export). The vision weights are renamed and split, never
changed: megatron-core's CLIPViTModel (conv1, class_token, position_embeddings, ln_pre, layers
with fused QKV) and its MLP projector. Everything is read from the built model; what the remote
code cannot reproduce is refused by name. Every vision and projector tensor of the model must
land in the export, or the export is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_nullmoe.export.hf import (
    CODE_FILES,
    ExportError,
    hf_config,
    hf_state_dict,
    save_weights,
    write_code,
    write_provenance,
    write_tokenizer,
    writing,
)

VLM_CODE_FILES = CODE_FILES + ("modeling_nullmoe_vlm.py", "processing_nullmoe.py")
VLM_ARCHITECTURE = "NullMoEForConditionalGeneration"
VLM_CLASS = "modeling_nullmoe_vlm.NullMoEForConditionalGeneration"
VLM_AUTO_MAP = {"AutoConfig": "configuration_nullmoe.NullMoEConfig",
                "AutoModelForImageTextToText": VLM_CLASS,
                "AutoModelForCausalLM": VLM_CLASS,
                "AutoProcessor": "processing_nullmoe.NullMoEProcessor"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_nullmoe.NullMoEProcessor"}


def is_llava(model) -> bool:
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    return isinstance(model, LLaVAModel)


def _llava(model):
    if not is_llava(model):
        raise ExportError(f"export_vlm takes a megatron-core LLaVAModel, not {type(model).__name__} "
                          "(a GPTModel exports with hf.export_gpt)")
    return model


def _attention(layer) -> str:
    from megatron.core.transformer.enums import AttnMaskType

    kind = layer.self_attention.attn_mask_type
    if kind == AttnMaskType.causal:
        return "causal"
    if kind == AttnMaskType.no_mask:
        return "bidirectional"
    raise ExportError(f"vision attention mask {kind} cannot be exported (valid: causal, as "
                      "megatron-core's local ViT spec builds it, or no_mask)")


def _refuse_unsupported_vision(model) -> None:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.identity_op import IdentityOp

    if not (model.add_encoder and model.add_decoder and model.pre_process and model.post_process):
        raise ExportError("a pipeline stage of a LLaVAModel cannot be exported: build the whole "
                          "model on one rank (source.load_megatron does)")
    if not isinstance(model.language_model, GPTModel):
        raise ExportError(f"language model {type(model.language_model).__name__} cannot be "
                          "exported (valid: GPTModel)")
    vm = model.vision_model
    vc = vm.config
    checks = [
        (not isinstance(vm, CLIPViTModel) or getattr(vc, "vision_model_type", "clip") != "clip",
         f"vision model {type(vm).__name__}/{getattr(vc, 'vision_model_type', '?')}", "clip"),
        (vm.ln_pre is None or vm.ln_post is not None, "ln_pre/ln_post", "ln_pre only (CLIP)"),
        (vm.conv1.bias is not None, "a patch convolution bias", "none (CLIP)"),
        (not vm.add_class_token, "add_class_token=False", "class tokens (CLIP)"),
        (model._pixel_shuffle, "pixel_shuffle", "off"),
        (model._tile_tags is not None, "tile_tags", "none"),
        (model.vision_projection.projector_type != "mlp",
         f"vision_projection_type={model.vision_projection.projector_type}", "mlp"),
    ]
    for name, c in (("vision", vc), ("projector", model.vision_projection.config)):
        checks += [
            (c.add_bias_linear or getattr(c, "add_qkv_bias", False), f"{name} add_bias_linear",
             "linear layers without bias"),
            (c.layernorm_zero_centered_gamma, f"{name} layernorm_zero_centered_gamma", "off"),
        ]
    checks += [
        (vc.qk_layernorm, "vision qk_layernorm", "off"),
        (vc.apply_residual_connection_post_layernorm,
         "vision apply_residual_connection_post_layernorm", "off"),
        # CLIPViTModel's ln_pre is a LayerNorm whatever the config says: LayerNorm throughout
        (vc.normalization != "LayerNorm", f"vision normalization={vc.normalization}", "LayerNorm"),
        (vc.gated_linear_unit or vc.activation_func is not F.gelu,
         "vision activation", "gelu without gated_linear_unit"),
        (getattr(vc, "apply_query_key_layer_scaling", False), "vision apply_query_key_layer_scaling",
         "off"),
        (getattr(vc, "softmax_type", "vanilla") != "vanilla", "vision softmax_type", "vanilla"),
    ]
    for bad, name, valid in checks:
        if bad:
            raise ExportError(f"{name} cannot be exported to NullMoEForConditionalGeneration yet "
                              f"(valid: {valid})")
    _projector_activation(model.vision_projection.config)
    for layer in vm.decoder.layers:
        _attention(layer)
        if isinstance(layer.input_layernorm, IdentityOp) or isinstance(layer.pre_mlp_layernorm,
                                                                       IdentityOp):
            raise ExportError("vision layers with layer norms fused into their linear layers "
                              "(Transformer Engine spec) cannot be exported: export the one-rank "
                              "CPU build (source.load_megatron), which uses the local spec")
    if len({_attention(layer) for layer in vm.decoder.layers}) > 1:
        raise ExportError("vision layers with different attention masks cannot be exported")


def _projector_activation(c) -> str:
    if c.gated_linear_unit and c.activation_func is F.silu:
        return "swiglu"
    if not c.gated_linear_unit and c.activation_func is F.gelu:
        return "gelu"
    name = getattr(c.activation_func, "__name__", c.activation_func)
    raise ExportError(f"projector activation {name} with gated_linear_unit={c.gated_linear_unit} "
                      "cannot be exported (valid: gelu, or silu with gated_linear_unit)")


def vision_config(model) -> dict:
    """The `vision_config` dict of NullMoEConfig for this LLaVAModel."""
    vm = model.vision_model
    vc = vm.config
    pc = model.vision_projection.config
    if vm.img_h != vm.img_w:
        raise ExportError(f"a {vm.img_h}x{vm.img_w} image size cannot be exported (valid: square)")
    heads = vc.num_attention_heads
    fc1 = model.vision_projection.encoder.linear_fc1.weight
    gated = pc.gated_linear_unit
    config = {
        "hidden_size": vc.hidden_size, "num_hidden_layers": vc.num_layers,
        "num_attention_heads": heads, "num_key_value_heads": vc.num_query_groups or heads,
        "head_dim": vc.kv_channels, "intermediate_size": vc.ffn_hidden_size,
        "image_size": vm.img_h, "patch_size": vm.patch_dim, "num_channels": vm.conv1.in_channels,
        "class_token_len": vm.class_token_len,
        "drop_class_token": bool(model._drop_vision_class_token),
        "norm_eps": vc.layernorm_epsilon, "normalization": vc.normalization, "activation": "gelu",
        "attention": _attention(vm.decoder.layers[0]) if len(vm.decoder.layers) else "causal",
        "projector_hidden_size": fc1.shape[0] // (2 if gated else 1),
        "projector_activation": _projector_activation(pc),
    }
    patches = (vm.img_h // vm.patch_dim) ** 2
    n = patches + (0 if config["drop_class_token"] else vm.class_token_len)
    if n != model.img_seq_len:
        raise ExportError(f"the model places {model.img_seq_len} image embeddings, the export "
                          f"would place {n}")
    config["image_seq_length"] = n
    return config


def hf_vlm_config(model) -> dict:
    """NullMoEConfig's fields for this megatron-core LLaVAModel (the decoder's, from hf.py, plus
    vision_config and image_token_index)."""
    _llava(model)
    _refuse_unsupported_vision(model)
    routers = [getattr(getattr(layer, "mlp", None), "router", None)
               for layer in model.language_model.decoder.layers]
    null = next((getattr(r, "null_config", None) for r in routers
                 if getattr(r, "null_config", None) is not None), None)
    if null is not None and null.modality_topk is not None:
        raise ExportError("vision_topk/text_topk (the modality-fixed control) cannot be exported to "
                          "NullMoEForConditionalGeneration yet: its routers would need to know "
                          "which positions are image positions")
    fields = hf_config(model.language_model)
    fields.update(vision_config=vision_config(model), image_token_index=int(model.image_token_index))
    return fields


# The vision tower's names (state-dict names of the one-rank CPU build); the decoder's are
# run/hf_layout.py's table.
def _norm(out, sd, src, dst) -> None:
    out[dst + ".weight"] = sd[src + ".weight"]
    if src + ".bias" in sd:
        out[dst + ".bias"] = sd[src + ".bias"]


def _mlp(out, sd, src, dst, gated) -> None:
    fc1 = sd[src + "linear_fc1.weight"]
    if gated:
        out[dst + "gate_proj.weight"], out[dst + "up_proj.weight"] = torch.chunk(fc1, 2, dim=0)
    else:
        out[dst + "up_proj.weight"] = fc1
    out[dst + "down_proj.weight"] = sd[src + "linear_fc2.weight"]


def _split_qkv(out, sd, src, dst, heads, groups, hd) -> None:
    qkv = sd[src + "linear_qkv.weight"].view(groups, (heads // groups + 2) * hd, -1)
    q, k, v = torch.split(qkv, [heads // groups * hd, hd, hd], dim=1)
    out[dst + "q_proj.weight"] = q.reshape(heads * hd, -1)
    out[dst + "k_proj.weight"] = k.reshape(groups * hd, -1)
    out[dst + "v_proj.weight"] = v.reshape(groups * hd, -1)
    out[dst + "o_proj.weight"] = sd[src + "linear_proj.weight"]


def hf_vlm_state_dict(model) -> dict[str, torch.Tensor]:
    """The NullMoEForConditionalGeneration weights of this LLaVAModel (fp32 copies)."""
    _llava(model)
    out = hf_state_dict(model.language_model)  # model.*, lm_head.*
    vm, vc = model.vision_model, model.vision_model.config
    sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    used = set()

    class Tracked(dict):
        def __getitem__(self, key):
            used.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            found = super().__contains__(key)
            if found:
                used.add(key)
            return found

    sd = Tracked(sd)
    vis: dict[str, torch.Tensor] = {
        "vision_tower.patch_embedding.weight": sd["vision_model.conv1.weight"],
        "vision_tower.position_embedding.weight": sd["vision_model.position_embeddings.weight"],
    }
    if vm.add_class_token:
        vis["vision_tower.class_embedding"] = sd["vision_model.class_token"]
    _norm(vis, sd, "vision_model.ln_pre", "vision_tower.pre_layernorm")
    heads = vc.num_attention_heads
    groups = vc.num_query_groups or heads
    for i in range(len(vm.decoder.layers)):
        src, dst = f"vision_model.decoder.layers.{i}.", f"vision_tower.layers.{i}."
        _norm(vis, sd, src + "input_layernorm", dst + "input_layernorm")
        _norm(vis, sd, src + "pre_mlp_layernorm", dst + "post_attention_layernorm")
        _split_qkv(vis, sd, src + "self_attention.", dst + "self_attn.", heads, groups, vc.kv_channels)
        _mlp(vis, sd, src + "mlp.", dst + "mlp.", False)
    _mlp(vis, sd, "vision_projection.encoder.", "multi_modal_projector.",
         model.vision_projection.config.gated_linear_unit)
    left = sorted(k for k in sd if k.startswith(("vision_model.", "vision_projection."))
                  and k not in used)
    if left:
        raise ExportError(f"vision weights without a place in NullMoEForConditionalGeneration: "
                          f"{left[:6]}; the export would drop them")
    out.update({k: v.detach().float().contiguous().clone() for k, v in vis.items()})
    return out


# ----------------------------------------------------------------------------- writing
def write_vlm_config(fields: dict, out: Path) -> None:
    config = {"model_type": "nullmoe", "architectures": [VLM_ARCHITECTURE],
              "auto_map": VLM_AUTO_MAP, "torch_dtype": "float32", **fields}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": fields["bos_token_id"], "eos_token_id": fields["eos_token_id"],
                  "pad_token_id": fields["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def write_processor(fields: dict, out: Path) -> None:
    processor = {"processor_class": "NullMoEProcessor", "auto_map": PROCESSOR_AUTO_MAP,
                 "image_size": fields["vision_config"]["image_size"],
                 "image_token_index": fields["image_token_index"], "do_resize": False}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    # AutoProcessor reads the tokenizer config too: name the processor there as well
    tok = json.loads((out / "tokenizer_config.json").read_text())
    tok["processor_class"] = "NullMoEProcessor"
    tok["auto_map"] = {**tok.get("auto_map", {}), **PROCESSOR_AUTO_MAP}
    (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")


def export_vlm(model, tokenizer_model: Path, out: Path, provenance: dict,
               dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Writes the NullMoEForConditionalGeneration folder of `model` (a LLaVAModel) at `out`;
    returns `out`."""
    fields = hf_vlm_config(model)  # refuses before anything is written
    tensors = hf_vlm_state_dict(model)
    with writing(out, overwrite) as tmp:
        fields.update(write_tokenizer(Path(tokenizer_model), tmp))
        write_vlm_config(fields, tmp)
        write_processor(fields, tmp)
        write_code(tmp, VLM_CODE_FILES)
        save_weights(tensors, tmp, dtype)
        write_provenance(tmp, provenance, dtype, format="nullmoe", kind="vlm")
    return Path(out)


# ----------------------------------------------------------------------------- in memory, checks
def hf_vlm_from_megatron(model, tokenizer_model: Path | None = None):
    """(NullMoEForConditionalGeneration, NullMoEProcessor or None) built in memory from a
    LLaVAModel: the export without the folder (same classes, same weights)."""
    from megatron_nullmoe.export.hf_code.configuration_nullmoe import NullMoEConfig
    from megatron_nullmoe.export.hf_code.modeling_nullmoe_vlm import NullMoEForConditionalGeneration
    from megatron_nullmoe.run.tokenizer import BOS, EOS, PAD

    config = NullMoEConfig(**hf_vlm_config(model), bos_token_id=BOS, eos_token_id=EOS,
                           pad_token_id=PAD)
    hf_model = NullMoEForConditionalGeneration(config)
    missing, unexpected = hf_model.load_state_dict(hf_vlm_state_dict(model), strict=False)
    if missing or unexpected:
        raise ExportError(f"the converted weights do not fit NullMoEForConditionalGeneration: "
                          f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    processor = None
    if tokenizer_model is not None:
        from megatron_nullmoe.export.hf_code.processing_nullmoe import NullMoEProcessor
        from megatron_nullmoe.export.hf_code.tokenization_nullmoe import NullMoETokenizer

        processor = NullMoEProcessor(NullMoETokenizer(str(tokenizer_model)),
                                     image_size=config.vision_config["image_size"],
                                     image_token_index=config.image_token_index)
    return hf_model.eval(), processor


@torch.no_grad()
def mcore_vlm_logits(model, images_B3HW: torch.Tensor, ids_BL: torch.Tensor) -> torch.Tensor:
    """Logits [B, N - 1 + L, V] of a LLaVAModel (eval mode), positions 0..L-1 over the text as
    the trainer and mcore_generate give them; each row of ids holds the placeholder once."""
    B, L = ids_BL.shape
    out = model(images_B3HW, ids_BL, torch.arange(L).expand(B, L), None)
    return (out[0] if isinstance(out, tuple) else out).float()


def sample_inputs(model, length: int = 12, batch: int = 2, seed: int = 0):
    """(images [B, 3, S, S] in [-1, 1], ids [B, L] = [placeholder, <s>, random ids]) for a
    LLaVAModel, the trainer's layout."""
    from megatron_nullmoe.run.tokenizer import BOS

    g = torch.Generator().manual_seed(seed)
    S = model.vision_model.img_h
    images = torch.rand(batch, 3, S, S, generator=g) * 2 - 1
    vocab = model.language_model.vocab_size
    ids = torch.randint(4, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, 1] = model.image_token_index, BOS
    return images, ids
