"""NullMoEForCausalLM: the decoder megatron_nullmoe trains, for Hugging Face transformers.

Written by megatron_nullmoe.export; self-contained (torch and transformers only), loaded with
`trust_remote_code=True`. It computes what megatron-core computes for the same weights: pre-norm
layers (LayerNorm or RMSNorm), learned or rotary positions, GELU or SwiGLU, grouped-query
attention, and MoE layers whose router takes top-k over E real experts plus Z null slots.

Null picks cost nothing: each expert runs only on the tokens that picked it, and a token whose
picks are all null gets exactly zero from the MoE block. Every forward reports the real experts
per token it ran (`output.real_experts_per_token`, the mean over MoE layers of the non-padding
tokens), and the model keeps running totals (`model.routing_totals()`, `reset_routing_totals()`).

NullMoEForConditionalGeneration is megatron-core's LLaVAModel on the same decoder: a CLIP ViT
(`vision_tower`) and an MLP projector (`multi_modal_projector`) turn `pixel_values` into image
embeddings that replace the one image placeholder (`config.image_token_index`) in `input_ids`;
the decoder classes are the ones above, so null picks are skipped in the same way.

Shape legend: B batch, L query positions, T tokens (B * L), H hidden, E real experts,
Z null slots, S = E + Z slots, K top-k; for the VLM, N image positions, C combined positions.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.generation import GenerationMixin
except ImportError:  # older transformers: PreTrainedModel is the generation mixin already
    GenerationMixin = object

from .configuration_nullmoe import NullMoEConfig

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class NullMoECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the real experts per token this forward ran (mean over MoE
    layers, non-padding tokens only; None for a model without MoE layers)."""

    real_experts_per_token: Optional[torch.FloatTensor] = None


# ----------------------------------------------------------------------------- building blocks
def _norm(config):
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def _rotate_half(x):
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Non-interleaved rotary embedding over the first rotary_percent of each head."""

    def __init__(self, config):
        super().__init__()
        self.dim = int(config.head_dim * config.rotary_percent)
        self.base = config.rotary_base

    def inv_freq(self, device):
        # computed at each call, not held in a buffer: from_pretrained (transformers 5) leaves
        # non-persistent buffers uninitialised
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                                 device=device) / self.dim))

    def forward(self, position_ids_BL):
        inv_freq = self.inv_freq(position_ids_BL.device)
        freqs = position_ids_BL.float().unsqueeze(-1) * inv_freq  # [B, L, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _apply_rotary(x_BNLD, cos_BLD, sin_BLD):
    dim = cos_BLD.shape[-1]
    rot, rest = x_BNLD[..., :dim], x_BNLD[..., dim:]
    cos, sin = cos_BLD.unsqueeze(1).to(x_BNLD.dtype), sin_BLD.unsqueeze(1).to(x_BNLD.dtype)
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads,
                                                    config.num_key_value_heads, config.head_dim)
        H = config.hidden_size
        self.q_proj = nn.Linear(H, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(H, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, H, bias=False)

    def forward(self, x_BLH, mask_B1LK, rotary, cache):
        B, L, _ = x_BLH.shape
        q = self.q_proj(x_BLH).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BLH).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BLH).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = _apply_rotary(q, *rotary), _apply_rotary(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask_B1LK, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, L, self.heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """GELU: down(gelu(up(x))); SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config, ffn):
        super().__init__()
        H = config.hidden_size
        self.gated = config.activation == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(H, ffn, bias=False)
        self.up_proj = nn.Linear(H, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, H, bias=False)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


class NullMoERouter(nn.Module):
    """Top-k over E real experts and Z null slots, as megatron_nullmoe's router (routing/math.py)
    computes it at inference: slot logits, a selection-only bias (budget control, expert bias),
    top-k, then gates per pick (zero at null picks)."""

    def __init__(self, config):
        super().__init__()
        self.num_real, self.num_null = config.num_experts, config.num_null_experts
        self.topk = config.router_topk
        self.score_function = config.router_score_function
        self.pre_softmax = config.router_pre_softmax
        self.renormalize = config.gate_normalization == "renormalize"
        self.scaling = config.router_topk_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_real, config.hidden_size))
        self.null_weight = (nn.Parameter(torch.empty(config.num_null_logits, config.hidden_size))
                            if config.num_null_logits else None)
        self.register_buffer("selection_bias",
                             torch.zeros(self.num_real + self.num_null, dtype=torch.float32))

    def forward(self, x_TH):
        """(index_TK, gates_TK): the picked slots and their gates."""
        weight = self.weight if self.null_weight is None else torch.cat([self.weight, self.null_weight])
        logits = F.linear(x_TH, weight)
        if self.null_weight is not None:
            null = logits[:, self.num_real:]
            if null.shape[-1] == 1:
                null = null.expand(-1, self.num_null)
            logits = torch.cat([logits[:, : self.num_real], null], dim=-1)
        bias = self.selection_bias.to(logits.dtype)
        if self.score_function == "softmax":
            _, index = torch.topk(logits + bias, k=self.topk, dim=-1)
            if self.pre_softmax:
                scores = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
                picked = torch.gather(scores, -1, index)
            else:
                picked = torch.gather(logits, -1, index)
        else:
            scores = torch.sigmoid(logits.float()).type_as(logits)
            _, index = torch.topk(scores + bias, k=self.topk, dim=-1)
            picked = torch.gather(scores, -1, index)
        return index, self._gates(picked, index)

    def _gates(self, picked, index):
        real = index < self.num_real
        if self.score_function == "softmax" and not self.pre_softmax:
            if self.renormalize:
                masked = torch.where(real, picked, torch.full_like(picked, float("-inf")))
                picked = torch.where(real.any(-1, keepdim=True), masked, torch.zeros_like(picked))
            gates = torch.softmax(picked, dim=-1, dtype=torch.float32).type_as(picked)
        elif self.score_function == "softmax":
            gates = picked
            if self.renormalize:
                real_sum = (picked * real).sum(-1, keepdim=True)
                safe = torch.where(real_sum > 0, real_sum, torch.ones_like(real_sum))
                gates = picked * (picked.sum(-1, keepdim=True) / safe)
        else:
            norm = picked * real if self.renormalize else picked
            gates = picked
            if self.topk > 1:
                total = norm.sum(-1, keepdim=True)
                gates = picked / torch.where(total > 0, total + 1e-20, torch.ones_like(total))
        gates = gates * real
        if self.scaling:
            gates = gates * self.scaling
        return gates


class NullMoEBlock(nn.Module):
    """Routes each token, then runs every real expert on the tokens that picked it only."""

    def __init__(self, config):
        super().__init__()
        self.router = NullMoERouter(config)
        self.experts = nn.ModuleList([MLP(config, config.moe_ffn_hidden_size)
                                      for _ in range(config.num_experts)])

    def forward(self, x_BLH, token_mask_BL):
        B, L, H = x_BLH.shape
        x_TH = x_BLH.reshape(-1, H)
        index_TK, gates_TK = self.router(x_TH)
        out_TH = torch.zeros_like(x_TH)
        # real picks only, grouped by expert: one read of the group sizes, then each expert runs
        # on exactly the tokens that picked it (null picks never become rows)
        num_real = self.router.num_real
        is_real = index_TK.reshape(-1) < num_real
        expert_P = index_TK.reshape(-1)[is_real]
        token_P = torch.arange(index_TK.shape[0], device=x_TH.device).repeat_interleave(
            index_TK.shape[1])[is_real]
        gate_P = gates_TK.reshape(-1)[is_real]
        order = torch.argsort(expert_P, stable=True)
        token_P, gate_P = token_P[order], gate_P[order]
        sizes = torch.bincount(expert_P, minlength=num_real).tolist()
        start = 0
        for expert, size in zip(self.experts, sizes):
            if size:
                rows = token_P[start:start + size]
                out = gate_P[start:start + size, None] * expert(x_TH[rows]).float()
                out_TH.index_add_(0, rows, out.to(out_TH.dtype))
                start += size
        real_T = (index_TK < num_real).sum(-1)
        counted = token_mask_BL.reshape(-1)
        return out_TH.view(B, L, H), real_T[counted].sum(), counted.sum()


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.is_moe = bool(config.moe_layers[layer_idx])
        self.mlp = NullMoEBlock(config) if self.is_moe else MLP(config, config.ffn_hidden_size)

    def forward(self, x, mask, rotary, cache, token_mask):
        x = x + self.self_attn(self.input_layernorm(x), mask, rotary, cache)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h), None
        out, real, tokens = self.mlp(h, token_mask)
        return x + out, (real, tokens)


# ----------------------------------------------------------------------------- models
class NullMoEPreTrainedModel(PreTrainedModel):
    config_class = NullMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, NullMoEVisionTower) and module.class_embedding is not None:
            module.class_embedding.data.normal_(0.0, std)
        elif isinstance(module, NullMoEModel):  # non-persistent: from_pretrained leaves them unset
            module.routing_real_picks.data.zero_()
            module.routing_tokens.data.zero_()
        elif isinstance(module, NullMoERouter):
            module.weight.data.normal_(0.0, std)
            if module.null_weight is not None:
                module.null_weight.data.normal_(0.0, std)


class NullMoEModel(NullMoEPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (nn.Embedding(config.max_position_embeddings, config.hidden_size)
                                if config.position_embedding_type == "learned_absolute" else None)
        self.rotary = RotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _norm(config)
        self.register_buffer("routing_real_picks", torch.zeros((), dtype=torch.float64), False)
        self.register_buffer("routing_tokens", torch.zeros((), dtype=torch.float64), False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, add_position_embeddings=True):
        """(hidden states [B, L, H], cache, real experts per token or None).
        `add_position_embeddings=False`: `inputs_embeds` hold their learned position embeddings
        already (the VLM adds them to the text positions only); position_ids then serve rotary."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, L = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + L, dtype=torch.bool, device=x.device)
        keys_BK = attention_mask.bool()[:, -(past + L):]
        if position_ids is None:
            position_ids = (keys_BK.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]
        query_pos = torch.arange(past, past + L, device=x.device)
        key_pos = torch.arange(past + L, device=x.device)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None] & keys_BK[:, None, :]
        allowed = allowed | (key_pos[None, :] == query_pos[:, None])[None]  # padding rows: no NaN
        mask_B1LK = allowed[:, None]
        token_mask = keys_BK[:, -L:]
        if self.embed_positions is not None and add_position_embeddings:
            x = x + self.embed_positions(position_ids)
        rotary = self.rotary(position_ids) if self.rotary is not None else None
        real = tokens = None
        for layer in self.layers:
            x, counts = layer(x, mask_B1LK, rotary, cache, token_mask)
            if counts is not None:
                real = counts[0] if real is None else real + counts[0]
                tokens = counts[1] if tokens is None else tokens + counts[1]
        per_token = None
        if real is not None:
            self.routing_real_picks += real.double()
            self.routing_tokens += tokens.double()
            per_token = real.float() / tokens.clamp(min=1).float()
        return self.norm(x), cache, per_token


class NullMoEForCausalLM(NullMoEPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = NullMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _cache(self, cache, past_key_values, use_cache):
        """(the KV cache to use or None, use_cache): transformers 5 passes `cache`, 4 passes
        `past_key_values`; a new DynamicCache when caching starts."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if not use_cache:
            return None, False
        return (DynamicCache() if cache is None else cache), True

    def _logits(self, hidden, logits_to_keep):
        """lm_head over the positions generate asks for (all; the last n; or an index)."""
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        return self.lm_head(hidden)

    def routing_totals(self):
        """Real expert picks and token-layers counted since the last reset, and their ratio:
        the real experts per token (per MoE layer) that inference ran."""
        real = float(self.model.routing_real_picks)
        tokens = float(self.model.routing_tokens)
        return {"real_picks": real, "token_layers": tokens,
                "real_experts_per_token": real / tokens if tokens else float("nan")}

    def reset_routing_totals(self):
        self.model.routing_real_picks.zero_()
        self.model.routing_tokens.zero_()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None,
                return_dict=None, **kwargs):
        cache, use_cache = self._cache(cache, past_key_values, use_cache)
        hidden, cache, per_token = self.model(input_ids, attention_mask, position_ids, cache,
                                              inputs_embeds, use_cache)
        logits = self._logits(hidden, logits_to_keep)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return NullMoECausalLMOutput(loss=loss, logits=logits, real_experts_per_token=per_token,
                                     **{_CACHE_FIELD: cache})


# ----------------------------------------------------------------------------- vision-language
class _Fields:
    """Attribute view of the vision config, for the decoder's building blocks (_norm, Attention,
    MLP), which read `config.<field>`."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def _vision_fields(v):
    return _Fields(hidden_size=v["hidden_size"], num_attention_heads=v["num_attention_heads"],
                   num_key_value_heads=v["num_key_value_heads"], head_dim=v["head_dim"],
                   normalization=v["normalization"], norm_eps=v["norm_eps"],
                   activation=v["activation"])


class VisionLayer(nn.Module):
    """Pre-norm ViT layer: x + attn(norm(x)), then x + mlp(norm(x)) (megatron-core's
    TransformerLayer with the ViT spec)."""

    def __init__(self, fields, intermediate_size, layer_idx):
        super().__init__()
        self.input_layernorm = _norm(fields)
        self.self_attn = Attention(fields, layer_idx)
        self.post_attention_layernorm = _norm(fields)
        self.mlp = MLP(fields, intermediate_size)

    def forward(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask, None, None)
        return x + self.mlp(self.post_attention_layernorm(x))


class NullMoEVisionTower(nn.Module):
    """megatron-core's CLIPViTModel: patches (a convolution without bias), class tokens first,
    learned position embeddings, ln_pre, the layers; then the class tokens dropped or kept."""

    def __init__(self, v):
        super().__init__()
        fields = _vision_fields(v)
        H, p = v["hidden_size"], v["patch_size"]
        self.image_size, self.num_channels = v["image_size"], v["num_channels"]
        self.class_token_len, self.drop_class_token = v["class_token_len"], v["drop_class_token"]
        self.causal = v["attention"] == "causal"
        self.patch_embedding = nn.Conv2d(v["num_channels"], H, kernel_size=p, stride=p, bias=False)
        self.class_embedding = (nn.Parameter(torch.zeros(1, self.class_token_len, H))
                                if self.class_token_len else None)
        self.position_embedding = nn.Embedding((v["image_size"] // p) ** 2 + self.class_token_len, H)
        self.pre_layernorm = _norm(fields)
        self.layers = nn.ModuleList([VisionLayer(fields, v["intermediate_size"], i)
                                     for i in range(v["num_hidden_layers"])])

    def forward(self, pixel_values_BCHW):
        """[B, 3, image_size, image_size] in [-1, 1] -> [B, N, vision hidden]."""
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values_BCHW.dim() != 4 or tuple(pixel_values_BCHW.shape[1:]) != expected:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values_BCHW.shape)}; this model "
                             f"takes [batch, {', '.join(map(str, expected))}] (pixels in [-1, 1], "
                             "as NullMoEProcessor makes them)")
        x = self.patch_embedding(pixel_values_BCHW.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, patches, H]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_layernorm(x + self.position_embedding.weight.unsqueeze(0))
        L = x.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device)
        if self.causal:  # megatron-core's local ViT spec: a causal mask over the patches
            mask = torch.tril(mask)
        for layer in self.layers:
            x = layer(x, mask[None, None])
        return x[:, self.class_token_len:] if self.drop_class_token else x


class NullMoEProjector(nn.Module):
    """megatron-core's MultimodalProjector ("mlp"): down(act(up(x))), or SwiGLU."""

    def __init__(self, v, out_size):
        super().__init__()
        ffn = v["projector_hidden_size"]
        self.gated = v["projector_activation"] == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(v["hidden_size"], ffn, bias=False)
        self.up_proj = nn.Linear(v["hidden_size"], ffn, bias=False)
        self.down_proj = nn.Linear(ffn, out_size, bias=False)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x)))


def _combined_index(at_B, n, length):
    """For each combined position c < `length`: the text position it comes from (the placeholder
    at at_B stands for n positions) and whether it is an image position."""
    c = torch.arange(length, device=at_B.device).unsqueeze(0)
    at = at_B.unsqueeze(1)
    is_image = (c >= at) & (c < at + n)
    src = torch.where(c < at, c, torch.where(is_image, at, c - (n - 1)))
    return src, is_image, (c - at).clamp(0, n - 1)


def _text_index(at_B, n, length):
    """For each text position t < `length`: its combined position (the placeholder: the first
    image position)."""
    t = torch.arange(length, device=at_B.device).unsqueeze(0)
    at = at_B.unsqueeze(1)
    return torch.where(t <= at, t, t + (n - 1))


class NullMoEForConditionalGeneration(NullMoEForCausalLM):
    """Image + text -> next-token logits, as megatron-core's LLaVAModel computes them.

    `input_ids` hold the image placeholder (`config.image_token_index`, -200) once per row where
    `pixel_values` have an image (the trainer's layout: [placeholder, <s>, text...]); the
    placeholder is replaced by the image's N = config.image_seq_length embeddings, so the
    decoder (and `logits`) run over the combined sequence of len(input_ids) - 1 + N positions.
    As in megatron-core, learned position embeddings are added to the text positions only, at
    their text index (`position_ids`, the image counted as one position), while rotary
    positions count every combined position. `attention_mask` may cover the text (as
    `generate` keeps it) or the combined positions. With a cache the image is read once, at
    the first step (generate passes pixel_values at the first step only).
    `labels` follow input_ids (shifted inside, -100 ignored); image positions predict nothing.
    Without pixel_values (and no placeholder) it is the decoder alone on text.
    """

    _no_split_modules = ["DecoderLayer", "VisionLayer"]

    def __init__(self, config):
        NullMoEPreTrainedModel.__init__(self, config)
        if config.vision_config is None:
            raise ValueError("this config has no vision_config: it is a text-only export; load it "
                             "with AutoModelForCausalLM (NullMoEForCausalLM)")
        self.vision_tower = NullMoEVisionTower(config.vision_config)
        self.multi_modal_projector = NullMoEProjector(config.vision_config, config.hidden_size)
        self.model = NullMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values):
        """[B, 3, S, S] in [-1, 1] -> image embeddings [B, N, H] (the decoder's hidden size)."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            inputs.pop("pixel_values", None)  # the image is in the cache already
        return inputs

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, cache=None, return_dict=None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("NullMoEForConditionalGeneration takes input_ids (with the image "
                             "placeholder) and pixel_values, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids are required")
        cache, use_cache = self._cache(cache, past_key_values, use_cache)
        B, L = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        placeholder = input_ids == self.config.image_token_index
        per_row = placeholder.sum(-1)
        if pixel_values is not None:
            if past:
                raise ValueError("pixel_values with a non-empty cache: the image goes in the first "
                                 "forward only (its embeddings are in the cache after it)")
            if not bool((per_row == 1).all()):
                raise ValueError(f"with pixel_values every row of input_ids needs the image "
                                 f"placeholder {self.config.image_token_index} exactly once; got "
                                 f"{per_row.tolist()} per row (NullMoEProcessor puts it first)")
            if pixel_values.shape[0] != B:
                raise ValueError(f"{pixel_values.shape[0]} images for {B} rows of input_ids: give "
                                 "one image per row")
            image = (placeholder.long().argmax(-1), self.config.image_seq_length)
        elif bool(per_row.any()):
            raise ValueError(f"input_ids hold the image placeholder "
                             f"{self.config.image_token_index} but no pixel_values were given")
        else:
            image = getattr(cache, "nullmoe_image", None) if past else None
        extra = image[1] - 1 if image is not None else 0
        C = L + extra if pixel_values is not None else L  # positions this forward adds
        if past + C > self.config.max_position_embeddings:
            raise ValueError(f"{past + C} decoder positions (image and text) pass the model's "
                             f"max_position_embeddings={self.config.max_position_embeddings}")

        # the attention mask over text positions and over combined positions
        text_len = past - extra + L if pixel_values is None else L
        if attention_mask is None:
            text_mask = torch.ones(B, text_len, dtype=torch.bool, device=input_ids.device)
            comb_mask = None
        elif attention_mask.shape[1] == text_len:
            text_mask = attention_mask.bool()
            comb_mask = text_mask
            if image is not None:
                src, _, _ = _combined_index(image[0], image[1], past + C)
                comb_mask = torch.gather(text_mask, 1, src)
        elif extra and attention_mask.shape[1] == past + C:  # combined already
            comb_mask = attention_mask.bool()
            text_mask = torch.gather(comb_mask, 1, _text_index(image[0], image[1], text_len))
        else:
            raise ValueError(f"attention_mask has {attention_mask.shape[1]} positions; expected "
                             f"{text_len} (the text, the placeholder counted once)"
                             + (f" or {past + C} (with the image's positions)" if extra else ""))
        if position_ids is None:  # learned positions: the text index, as megatron-core's LLaVA
            position_ids = (text_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -L:]

        x = self.model.embed_tokens(input_ids.masked_fill(placeholder, 0))
        if self.model.embed_positions is not None:
            x = x + self.model.embed_positions(position_ids)
        if pixel_values is not None:
            images = self.get_image_features(pixel_values).to(x.dtype)  # [B, N, H]
            src, is_image, img = _combined_index(image[0], image[1], C)
            H = x.shape[-1]
            x = torch.where(is_image.unsqueeze(-1),
                            torch.gather(images, 1, img.unsqueeze(-1).expand(-1, -1, H)),
                            torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, H)))
            if cache is not None:
                cache.nullmoe_image = image  # where later steps' text masks get the image
        hidden, cache, per_token = self.model(None, comb_mask, None, cache, x, use_cache,
                                              add_position_embeddings=False)
        logits = self._logits(hidden, logits_to_keep)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, image if pixel_values is not None else None, C)
        return NullMoECausalLMOutput(loss=loss, logits=logits, real_experts_per_token=per_token,
                                     **{_CACHE_FIELD: cache})

    @staticmethod
    def _loss(logits, labels, image, C):
        if logits.shape[1] != C:
            raise ValueError("labels need the logits of every position (logits_to_keep=0)")
        if image is not None:
            src, is_image, _ = _combined_index(image[0], image[1], C)
            labels = torch.gather(labels, 1, src).masked_fill(is_image, -100)
            # image positions predict nothing (megatron-core's loss mask)
            targets = labels[:, 1:].masked_fill(is_image[:, :-1], -100)
        else:
            targets = labels[:, 1:]
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               targets.reshape(-1), ignore_index=-100)
