"""NullMoEForCausalLM: the decoder megatron_nullmoe trains, for Hugging Face transformers.

Written by megatron_nullmoe.export; loaded with `trust_remote_code=True` (torch and transformers
only, plus the files beside it in the export folder). It computes what megatron-core computes for
the same weights: pre-norm layers (LayerNorm or RMSNorm), learned or rotary positions, GELU or
SwiGLU, grouped-query attention, and MoE layers whose router takes top-k over E real experts plus
Z null slots. The routing is routing_math.py, which is megatron_nullmoe/routing/math.py itself
(the file the trainer's router calls), so export and training route with the same code.

Null picks cost nothing: each expert runs only on the tokens that picked it, and a token whose
picks are all null gets exactly zero from the MoE block. Every forward reports the real experts
per token it ran (`output.real_experts_per_token`, the mean over MoE layers of the non-padding
tokens), and the model keeps running totals (`model.routing_totals()`, `reset_routing_totals()`).
The vision-language model on this decoder is modeling_nullmoe_vlm.py.

Shape legend: B batch, L query positions, T tokens (B * L), H hidden, E real experts,
Z null slots, S = E + Z slots, K top-k.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.generation import GenerationMixin
except ImportError:  # older transformers: PreTrainedModel is the generation mixin already
    GenerationMixin = object

from .configuration_nullmoe import NullMoEConfig
from .routing_math import expand_null_logits, real_gates, topk_over_slots

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class NullMoECausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the real experts per token this forward ran (mean over MoE
    layers, non-padding tokens only; None for a model without MoE layers)."""

    real_experts_per_token: Optional[torch.FloatTensor] = None


# ----------------------------------------------------------------------------- building blocks
def _norm(config, size=None):
    size = size or config.hidden_size
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps)


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
        # norms of q and k before rotary (config.qk_layernorm): per head, one [head_dim] weight
        # for all heads (qk_norm_scope "head", Qwen3's), or over all heads of the projection at
        # once with a [heads x head_dim] weight ("projection", OLMoE's)
        qk = getattr(config, "qk_layernorm", False)  # configs written before it have none
        self.whole = getattr(config, "qk_norm_scope", "head") == "projection"  # older: per head
        q_size, k_size = ((self.heads * self.head_dim, self.kv_heads * self.head_dim) if self.whole
                          else (self.head_dim, self.head_dim))
        self.q_norm = _norm(config, q_size) if qk else nn.Identity()
        self.k_norm = _norm(config, k_size) if qk else nn.Identity()

    def _heads(self, x_BLX, norm, heads):
        """[B, heads, L, head_dim] of a projection, normalised before or after the split."""
        B, L, _ = x_BLX.shape
        if self.whole:
            return norm(x_BLX).view(B, L, heads, self.head_dim).transpose(1, 2)
        return norm(x_BLX.view(B, L, heads, self.head_dim)).transpose(1, 2)

    def forward(self, x_BLH, mask_B1LK, rotary, cache):
        B, L, _ = x_BLH.shape
        q = self._heads(self.q_proj(x_BLH), self.q_norm, self.heads)
        k = self._heads(self.k_proj(x_BLH), self.k_norm, self.kv_heads)
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
    """Top-k over E real experts and Z null slots, as megatron_nullmoe's router computes it at
    inference: slot logits, a selection-only bias (budget control, expert bias), top-k, then
    gates per pick (zero at null picks), all by routing_math."""

    def __init__(self, config):
        super().__init__()
        self.num_real, self.num_null = config.num_experts, config.num_null_experts
        self.topk = config.router_topk
        self.score_function = config.router_score_function
        self.pre_softmax = config.router_pre_softmax
        self.gate_normalization = config.gate_normalization
        self.scaling = config.router_topk_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_real, config.hidden_size))
        self.null_weight = (nn.Parameter(torch.empty(config.num_null_logits, config.hidden_size))
                            if config.num_null_logits else None)
        self.register_buffer("selection_bias",
                             torch.zeros(self.num_real + self.num_null, dtype=torch.float32))

    def forward(self, x_TH):
        """(index_TK, gates_TK): the picked slots and their gates."""
        if self.null_weight is None:
            logits_TS = F.linear(x_TH, self.weight)
        else:  # one matmul over real and null rows, as the trainer's router computes them
            logits = F.linear(x_TH, torch.cat([self.weight, self.null_weight]))
            logits_TS = expand_null_logits(logits[:, : self.num_real], logits[:, self.num_real:],
                                           self.num_null)
        routing = topk_over_slots(logits_TS, self.topk, self.score_function, self.pre_softmax,
                                  self.selection_bias.to(logits_TS.dtype))
        gates_TK = real_gates(routing, self.num_real, self.score_function, self.pre_softmax,
                              self.gate_normalization, self.scaling)
        return routing.index_TK, gates_TK


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
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
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
