"""The export's config.json fields the vLLM model reads, checked in one place.

`ServeConfig.from_hf(config)` takes the NullMoEConfig vLLM loaded from the export (its remote
configuration class, so every field is filled in) and refuses, naming the field, the value and
what would be valid, anything model.py does not compute exactly as the export's remote code
does (megatron_nullmoe/export/hf_code/modeling_nullmoe.py). The gate scale needs no field: the
export folds it into `router_topk_scaling_factor`, as the router multiplies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# field -> the values model.py implements (the export writes no others today)
CHOICES = {
    "null_logits": ("shared", "per_expert"),
    "router_score_function": ("softmax", "sigmoid"),
    "gate_normalization": ("renormalize", "keep_null_share"),
    "normalization": ("LayerNorm", "RMSNorm"),
    "position_embedding_type": ("learned_absolute", "rope"),
    "activation": ("gelu", "swiglu"),
}
# read apart from CHOICES: exports written before the field lack it
QK_NORM_SCOPES = ("head", "projection")


class ServeConfigError(ValueError):
    """An export this vLLM model cannot serve exactly."""


@dataclass(frozen=True)
class ServeConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    moe_ffn_hidden_size: int
    moe_layers: tuple[bool, ...]
    num_experts: int  # E real experts
    num_null: int  # Z null slots
    num_null_logits: int  # router rows of the null slots: 1 (shared), Z (per expert), 0
    topk: int
    score_function: str
    pre_softmax: bool
    gate_normalization: str
    scaling_factor: Optional[float]  # megatron-core's top-k scaling times the null gate scale
    normalization: str
    norm_eps: float
    qk_layernorm: bool  # norms of q and k before rotary
    # what they span: "head" (each head apart, one [head_dim] weight for all heads) or
    # "projection" (all heads of the q or k projection at once: an OLMoE import's)
    qk_norm_scope: str
    position_embedding_type: str
    rotary_base: float
    rotary_percent: float
    max_positions: int
    activation: str
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, c) -> "ServeConfig":
        if getattr(c, "vision_config", None):
            raise ServeConfigError(
                "vision_config is set (a vision-language export, NullMoEForConditionalGeneration): "
                "the vLLM plugin serves text-only exports (vision_config: null) so far")
        for name, valid in CHOICES.items():
            value = getattr(c, name)
            if value not in valid:
                raise ServeConfigError(f"{name}={value!r} cannot be served by the vLLM plugin "
                                       f"(valid: {', '.join(valid)})")
        moe_layers = tuple(bool(m) for m in c.moe_layers)
        if len(moe_layers) != c.num_hidden_layers:
            raise ServeConfigError(f"moe_layers has {len(moe_layers)} entries for "
                                   f"num_hidden_layers={c.num_hidden_layers}")
        if any(moe_layers) and c.num_experts < 1:
            raise ServeConfigError(f"num_experts={c.num_experts} with MoE layers in moe_layers "
                                   "(valid: at least 1)")
        scope = getattr(c, "qk_norm_scope", "head")  # exports before the field: per head
        if scope not in QK_NORM_SCOPES:
            raise ServeConfigError(f"qk_norm_scope={scope!r} cannot be served by the vLLM plugin "
                                   f"(valid: {', '.join(QK_NORM_SCOPES)})")
        num_null = c.num_null_experts or 0
        null_rows = 0 if not num_null else (1 if c.null_logits == "shared" else num_null)
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, ffn_hidden_size=c.ffn_hidden_size,
            moe_ffn_hidden_size=c.moe_ffn_hidden_size, moe_layers=moe_layers,
            num_experts=c.num_experts, num_null=num_null, num_null_logits=null_rows,
            topk=c.router_topk, score_function=c.router_score_function,
            pre_softmax=bool(c.router_pre_softmax), gate_normalization=c.gate_normalization,
            scaling_factor=c.router_topk_scaling_factor, normalization=c.normalization,
            norm_eps=c.norm_eps, qk_layernorm=bool(getattr(c, "qk_layernorm", False)),
            qk_norm_scope=scope,
            position_embedding_type=c.position_embedding_type,
            rotary_base=float(c.rotary_base), rotary_percent=float(c.rotary_percent),
            max_positions=c.max_position_embeddings, activation=c.activation,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)))

    @property
    def num_slots(self) -> int:
        return self.num_experts + self.num_null


def check_parallel(*, tensor: int, expert: bool, data: int, on_cpu: bool) -> None:
    """Refuses, by vLLM's flag name, the parallel layouts the model cannot serve exactly.

    Tensor parallelism serves as in any vLLM model: every tensor-parallel rank holds the same
    tokens and routes them alike, so all hand the fused-MoE layer the same real rows. Expert
    parallelism: on GPU vLLM's kernels skip the rows of experts another rank holds (its expert
    map), as for a stock MoE; vLLM 0.32's CPU fused-MoE kernel never reads the expert map, so
    each rank would index experts it does not hold. With data parallelism too, ranks exchange
    tokens inside the layer, and a rank whose tokens are all null would skip that exchange."""
    if expert and on_cpu:
        raise ServeConfigError(
            f"enable_expert_parallel=True (tensor_parallel_size={tensor}) on CPU: vLLM's CPU "
            "fused-MoE kernel ignores the expert map, so a rank would compute experts it does not "
            "hold; serve with --tensor-parallel-size alone (each rank holds a slice of every "
            "expert), or on GPU")
    if expert and data > 1:
        raise ServeConfigError(
            f"enable_expert_parallel=True with data_parallel_size={data}: not served (a rank "
            "whose tokens pick only null slots skips the layer's token exchange); use "
            "data_parallel_size=1 with expert parallelism across the tensor-parallel ranks")


def check_eager(*, enforce_eager: bool, on_cpu: bool) -> None:
    """Off CPU, refuses CUDA graphs by vLLM's flag name: the MoE blocks hand the kernel as many
    rows as the routing picked real experts (a data-dependent shape, read on the host), which a
    captured graph cannot replay. CPU serving has no graphs to capture."""
    if not on_cpu and not enforce_eager:
        raise ServeConfigError(
            "enforce_eager=False: the null-MoE blocks compute a data-dependent number of rows "
            "(the real picks), which CUDA graphs cannot capture; serve with --enforce-eager "
            "(LLM(..., enforce_eager=True))")
