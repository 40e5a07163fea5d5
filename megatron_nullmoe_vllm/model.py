"""NullMoEForCausalLM for vLLM: the decoder of megatron_nullmoe's default export, computed as its
remote code computes it (megatron_nullmoe/export/hf_code/modeling_nullmoe.py) with vLLM's
building blocks: paged attention, tensor-parallel linears, and the fused-MoE layer for the real
experts, routed over E real + Z null slots, computing only the real picks (routing.real_rows).

Shape legend: T tokens (the flattened batch vLLM hands in), H hidden, E real experts,
Z null slots, N null-logit rows (1 shared, Z per expert), S = E + Z slots, I expert FFN size.

Choices and why:
- Norms are torch's LayerNorm / RMSNorm, activations torch's gelu / silu: the export computes
  them so, and vLLM's fused residual-norm kernels round differently.
- GELU experts (the project's default activation): vLLM's CPU fused-MoE kernel only has gated
  activations, act(gate) * up. The expert's up projection is loaded as the gate half, the up half
  as zero weights with bias 1, so the kernel computes gelu(W x) * 1 exactly; the zero half is
  computed too (a GELU expert's first matmul costs twice its FLOPs there).
- The model is not wrapped in vLLM's torch.compile decorator: it runs eagerly, as tested here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                               QKVParallelLinear, RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.platforms import current_platform

from megatron_nullmoe_vllm.config import (ServeConfig, ServeConfigError, check_eager,
                                          check_parallel)
from megatron_nullmoe_vllm.routing import picks, real_rows, routing_math, rows_as_routing

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_QKV = {"q_proj": "q", "k_proj": "k", "v_proj": "v"}


def _norm(cfg: ServeConfig, size: int | None = None) -> nn.Module:
    size = size or cfg.hidden_size
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=cfg.norm_eps)
    return nn.LayerNorm(size, eps=cfg.norm_eps)


class NullMoEAttention(nn.Module):
    def __init__(self, cfg: ServeConfig, cache_config, quant_config, prefix: str):
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        self.heads, self.kv_heads = cfg.num_heads // tp, max(1, cfg.num_kv_heads // tp)
        self.q_size, self.kv_size = self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=False, quant_config=quant_config,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary = None
        if cfg.position_embedding_type == "rope":  # non-interleaved halves: neox style
            self.rotary = get_rope(cfg.head_dim, max_position=cfg.max_positions,
                                   is_neox_style=True,
                                   rope_parameters={"rope_theta": cfg.rotary_base,
                                                    "partial_rotary_factor": cfg.rotary_percent})
        # q/k norms before rotary: per head (a Qwen3-MoE import's), one [D] weight for every head,
        # the same on every tensor-parallel rank; or over the whole projection (an OLMoE
        # import's), a [heads x D] weight whose mean square spans every head
        self.whole = cfg.qk_layernorm and cfg.qk_norm_scope == "projection"
        if self.whole and tp > 1:
            raise ServeConfigError(
                f"tensor_parallel_size={tp} with qk_norm_scope='projection': each rank holds a "
                "slice of the heads, and the q/k norm's mean square over all of them is not "
                "reduced across ranks (not done); serve with tensor_parallel_size=1")
        q_norm, k_norm = (self.q_size, self.kv_size) if self.whole else (cfg.head_dim,) * 2
        self.q_norm = _norm(cfg, q_norm) if cfg.qk_layernorm else None
        self.k_norm = _norm(cfg, k_norm) if cfg.qk_layernorm else None
        self.head_dim = cfg.head_dim
        self.attn = Attention(self.heads, cfg.head_dim, cfg.head_dim ** -0.5,
                              num_kv_heads=self.kv_heads, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions_T, x_TH):
        qkv, _ = self.qkv_proj(x_TH)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.whole:
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.q_norm is not None:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(-2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(-2)
        if self.rotary is not None:
            q, k = self.rotary(positions_T, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class NullMoEDenseMLP(nn.Module):
    """GELU: down(gelu(up x)); SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: ServeConfig, quant_config, prefix: str):
        super().__init__()
        H, F_ = cfg.hidden_size, cfg.ffn_hidden_size
        self.gated = cfg.activation == "swiglu"
        if self.gated:
            self.gate_up_proj = MergedColumnParallelLinear(H, [F_, F_], bias=False,
                                                           quant_config=quant_config,
                                                           prefix=f"{prefix}.gate_up_proj")
        else:
            self.up_proj = ColumnParallelLinear(H, F_, bias=False, quant_config=quant_config,
                                                prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(F_, H, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")

    def forward(self, x_TH):
        if self.gated:
            gate_up, _ = self.gate_up_proj(x_TH)
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(self.up_proj(x_TH)[0])
        out, _ = self.down_proj(h)
        return out


class NullMoERouterWeights(nn.Module):
    """The router's logit rows [E + N, H] (real rows first, then the null rows) and its
    selection-only bias [S]; the slot logits [T, S] repeat a shared null row Z times."""

    def __init__(self, cfg: ServeConfig):
        super().__init__()
        self.num_real, self.num_null = cfg.num_experts, cfg.num_null
        self.weight = nn.Parameter(torch.empty(cfg.num_experts + cfg.num_null_logits,
                                               cfg.hidden_size), requires_grad=False)
        self.register_buffer("selection_bias", torch.zeros(cfg.num_slots, dtype=torch.float32))

    def forward(self, x_TH):
        logits = F.linear(x_TH, self.weight)
        return routing_math.expand_null_logits(logits[:, : self.num_real],
                                               logits[:, self.num_real:], self.num_null)


class NullMoEBlock(nn.Module):
    """Slot logits, the null-slot routing, then vLLM's fused-MoE layer over the E real experts on
    the R real picks only (routing.real_rows): a null pick is never handed to the kernel."""

    def __init__(self, cfg: ServeConfig, quant_config, prefix: str):
        super().__init__()
        self.cfg = cfg
        self.router = NullMoERouterWeights(cfg)
        self.gelu = cfg.activation == "gelu"
        # top-1 over R rows: each row is one real pick, its route read from the [R, 2] table
        # handed in as the layer's router logits (fp32 end to end: ids and gates exact)
        self.experts = FusedMoEFactory(
            num_experts=cfg.num_experts, top_k=1, hidden_size=cfg.hidden_size,
            intermediate_size=cfg.moe_ffn_hidden_size, params_dtype=None, renormalize=False,
            quant_config=quant_config, prefix=f"{prefix}.experts",
            custom_routing_function=rows_as_routing, router_logits_dtype=torch.float32,
            activation="gelu" if self.gelu else "silu", has_bias=self.gelu,
            ckpt_names=("gate_proj", "down_proj", "up_proj"))
        # (token, layer) pairs routed and rows handed to the kernel since the last reset: host
        # ints (R is on the host already, nonzero put it there); read by `routed_rows`
        self.tokens_routed = self.rows_computed = 0

    def forward(self, x_TH):
        gates_TK, index_TK = picks(self.cfg, self.router(x_TH), self.router.selection_bias)
        token_R, rows_R2 = real_rows(gates_TK, index_TK, self.cfg.num_experts)
        self.tokens_routed += x_TH.shape[0]
        self.rows_computed += token_R.numel()
        out_TH = torch.zeros_like(x_TH)
        # every tensor-parallel rank holds the same tokens and routes them alike, so all skip
        # together (the layer all-reduces its output across them)
        if token_R.numel():
            out_TH.index_add_(0, token_R, self.experts(x_TH[token_R], rows_R2).to(x_TH.dtype))
        return out_TH

    def load_expert(self, expert: int, proj: str, w: torch.Tensor) -> None:
        """One export expert matrix into the fused [E, 2I, H] / [E, H, I] weights (gate half w1,
        up half w3, down w2), through the layer's own loader (tensor and expert sharding)."""
        ex = self.experts.routed_experts  # the runner holds the fused weights there
        if proj == "down":
            ex.w2_weight.weight_loader(ex.w2_weight, w, "w2_weight", "w2", expert)
            if self.gelu:
                ex.w2_bias.weight_loader(ex.w2_bias, w.new_zeros(w.shape[0]), "w2_bias", "w2",
                                         expert)
            return
        if not self.gelu:
            shard = "w1" if proj == "gate" else "w3"
            ex.w13_weight.weight_loader(ex.w13_weight, w, "w13_weight", shard, expert)
            return
        # GELU: the up projection is the gated kernel's gate half; its up half gives 1
        ex.w13_weight.weight_loader(ex.w13_weight, w, "w13_weight", "w1", expert)
        ex.w13_weight.weight_loader(ex.w13_weight, torch.zeros_like(w), "w13_weight", "w3", expert)
        zeros = w.new_zeros(w.shape[0])
        ex.w13_bias.weight_loader(ex.w13_bias, zeros, "w13_bias", "w1", expert)
        ex.w13_bias.weight_loader(ex.w13_bias, zeros + 1, "w13_bias", "w3", expert)


def routed_rows(model: nn.Module, reset: bool = False) -> tuple[int, int]:
    """(tokens routed, expert rows computed), summed over the model's MoE layers since the last
    reset: `LLM.apply_model(routed_rows)` reads them from a served model (one entry per worker),
    `functools.partial(routed_rows, reset=True)` zeroes them. rows / tokens is the real experts a
    token ran per MoE layer; top-k computes k."""
    blocks = [m for m in model.modules() if isinstance(m, NullMoEBlock)]
    counts = (sum(b.tokens_routed for b in blocks), sum(b.rows_computed for b in blocks))
    if reset:
        for b in blocks:
            b.tokens_routed = b.rows_computed = 0
    return counts


class NullMoEDecoderLayer(nn.Module):
    def __init__(self, cfg: ServeConfig, index: int, cache_config, quant_config, prefix: str):
        super().__init__()
        self.input_layernorm = _norm(cfg)
        self.self_attn = NullMoEAttention(cfg, cache_config, quant_config, f"{prefix}.self_attn")
        self.post_attention_layernorm = _norm(cfg)
        self.mlp = (NullMoEBlock(cfg, quant_config, f"{prefix}.mlp") if cfg.moe_layers[index]
                    else NullMoEDenseMLP(cfg, quant_config, f"{prefix}.mlp"))

    def forward(self, positions_T, x_TH):
        x_TH = x_TH + self.self_attn(positions_T, self.input_layernorm(x_TH))
        return x_TH + self.mlp(self.post_attention_layernorm(x_TH))


class NullMoEModel(nn.Module):
    def __init__(self, cfg: ServeConfig, cache_config, quant_config, prefix: str):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_positions = (nn.Embedding(cfg.max_positions, cfg.hidden_size)
                                if cfg.position_embedding_type == "learned_absolute" else None)
        self.layers = nn.ModuleList([
            NullMoEDecoderLayer(cfg, i, cache_config, quant_config, f"{prefix}.layers.{i}")
            for i in range(cfg.num_layers)])
        self.norm = _norm(cfg)

    def forward(self, input_ids_T, positions_T, inputs_embeds=None):
        x_TH = self.embed_tokens(input_ids_T) if inputs_embeds is None else inputs_embeds
        if self.embed_positions is not None:
            x_TH = x_TH + self.embed_positions(positions_T)
        for layer in self.layers:
            x_TH = layer(positions_T, x_TH)
        return self.norm(x_TH)


class NullMoEForCausalLM(nn.Module):
    """vLLM's model for an export whose config.json names NullMoEForCausalLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.cfg = cfg = ServeConfig.from_hf(vllm_config.model_config.hf_config)
        par = vllm_config.parallel_config
        check_parallel(tensor=par.tensor_parallel_size, expert=par.enable_expert_parallel,
                       data=par.data_parallel_size, on_cpu=current_platform.is_cpu())
        check_eager(enforce_eager=vllm_config.model_config.enforce_eager,
                    on_cpu=current_platform.is_cpu())
        quant_config = vllm_config.quant_config
        self.model = NullMoEModel(cfg, vllm_config.cache_config, quant_config,
                                  f"{prefix}model" if not prefix else f"{prefix}.model")
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, quant_config=quant_config,
                                      prefix="lm_head")
        if cfg.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(cfg.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor):
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The export's tensors by name (megatron_nullmoe/export/hf.py writes them); returns the
        names of this model's parameters and buffers that were filled."""
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()
        E = self.cfg.num_experts
        for name, w in weights:
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            expert = _EXPERT.match(name)
            if expert:
                layer, j, proj = int(expert[1]), int(expert[2]), expert[3]
                self.model.layers[layer].mlp.load_expert(j, proj, w)
                loaded.update(n for n in params if n.startswith(f"model.layers.{layer}.mlp.experts."))
                continue
            head, _, leaf = name.rpartition(".")
            module, _, proj = head.rpartition(".")
            if proj in _QKV:
                target = f"{module}.qkv_proj.weight"
                params[target].weight_loader(params[target], w, _QKV[proj])
            elif proj in ("gate_proj", "up_proj") and f"{module}.gate_up_proj.weight" in params:
                target = f"{module}.gate_up_proj.weight"
                params[target].weight_loader(params[target], w, 0 if proj == "gate_proj" else 1)
            elif proj == "router" and leaf in ("weight", "null_weight"):
                target = f"{module}.router.weight"
                rows = slice(0, E) if leaf == "weight" else slice(E, None)
                params[target].data[rows].copy_(w)
            elif name in buffers:  # the router's selection_bias
                target = name
                buffers[name].copy_(w)
            elif name in params:
                target = name
                getattr(params[name], "weight_loader", default_weight_loader)(params[name], w)
            else:
                raise ValueError(f"the export holds {name!r}, which NullMoEForCausalLM (vLLM) "
                                 "has no place for: an export from a newer megatron_nullmoe?")
            loaded.add(target)
        return loaded
