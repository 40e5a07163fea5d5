"""Active parameters and FLOPs per token of a (null-)MoE decoder, and iso-FLOP partners.

Pure arithmetic on shapes, no framework imports: the trainer turns its config into shapes
(`megatron_nullmoe.train.flops`), and the command line (`__main__.py`) prints them:

    python -m megatron_nullmoe.flops --config examples/vlm_null_moe_gpu.yaml [key=value ...]
    python -m megatron_nullmoe.flops --partners --experts 64 --baseline-topk 4
    python -m megatron_nullmoe.flops --expected --experts 64 --topk 8 --nulls 64

With Z null slots, a token runs r real experts, 0 <= r <= k; balanced routing gives
E[r] = k * E / (E + Z). A null-MoE (k, Z) matches a top-k_b MoE when k * E / (E + Z) = k_b.
FLOPs must be counted from r, not k: Megatron-LM's counter multiplies the expert term by
moe_router_topk and so overstates a null-MoE's work (and its TFLOP/s) by k / r. The trainer logs
FLOPs from the realised r of each logging interval.

Counting convention (Megatron-LM's): a multiply-add is 2 FLOPs; training = 3 x forward (forward,
backward for inputs, backward for weights); attention scores count the full (non-causal) square.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional


def moe_layer_pattern(num_layers: int, freq) -> list[int]:
    """1 for a MoE layer, 0 for a dense one, per decoder layer, in megatron-core's convention:
    an int n makes layers 0, n, 2n, ... MoE; a list is the pattern itself."""
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return list(freq)


@dataclass(frozen=True)
class DecoderShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # dense layers
    seq_length: int
    vocab_size: int
    num_moe_layers: int
    num_experts: int
    moe_ffn_hidden_size: int
    topk: int
    num_null_experts: int = 0
    null_logit_rows: int = 0  # 1 for shared null logits, Z for per-expert, 0 without nulls
    kv_ratio: float = 1.0  # key/value heads over query heads: < 1 with grouped-query attention
    gated_mlp: bool = False  # SwiGLU: three weight matrices per (expert) MLP instead of two
    attention_width: int = 0  # query heads x head size (kv_channels); 0: hidden_size (the usual)

    @property
    def expected_real_per_token(self) -> float:
        return expected_real(topk=self.topk, num_experts=self.num_experts,
                             num_null=self.num_null_experts)


@dataclass(frozen=True)
class VisionShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_patches: int  # tokens the ViT runs per image (class token included)
    patch_size: int
    decoder_hidden_size: int  # projector output
    decoder_ffn_hidden_size: int  # projector hidden


def expected_real(*, topk: int, num_experts: int, num_null: int) -> float:
    """Real experts per token at perfect balance: k * E / (E + Z).

    Keyword-only: three integers of the same kind, easily passed in the wrong order.
    """
    return topk * num_experts / (num_experts + num_null)


def iso_flop_partners(num_experts: int, baseline_topk: int, max_topk: int = 16) -> list[tuple[int, int]]:
    """(k, Z) pairs with k * E / (E + Z) = k_b exactly, k_b < k <= max_topk (plus (k_b, 0))."""
    out = [(baseline_topk, 0)]
    for k in range(baseline_topk + 1, max_topk + 1):
        z = Fraction(num_experts * (k - baseline_topk), baseline_topk)
        if z.denominator == 1:
            out.append((k, int(z)))
    return out


def _layer_forward(h: int, ffn: int, seq: int, kv_ratio: float = 1.0,
                   gated: bool = False, width: int = 0) -> tuple[float, float]:
    """(attention FLOPs, dense-MLP FLOPs) per token of one transformer layer, forward. `width`:
    the attention's query width, heads x head size (0: h)."""
    a = width or h
    # q and o projections, k and v (narrower with GQA), then scores and values
    attention = 2 * 2 * h * a * (1 + kv_ratio) + 2 * 2 * seq * a
    mlp = 2 * _matrices(gated) * h * ffn
    return attention, mlp


def _matrices(gated: bool) -> int:
    return 3 if gated else 2


def decoder_forward_flops(d: DecoderShape, real_per_token: Optional[float] = None) -> float:
    """Forward FLOPs per decoder token; real_per_token defaults to the balanced expectation."""
    r = d.expected_real_per_token if real_per_token is None else real_per_token
    attention, dense_mlp = _layer_forward(d.hidden_size, d.ffn_hidden_size, d.seq_length,
                                          d.kv_ratio, d.gated_mlp, d.attention_width)
    router = 2 * d.hidden_size * (d.num_experts + d.null_logit_rows)
    experts = r * 2 * _matrices(d.gated_mlp) * d.hidden_size * d.moe_ffn_hidden_size
    dense_layers = d.num_layers - d.num_moe_layers
    return (d.num_layers * attention + dense_layers * dense_mlp
            + d.num_moe_layers * (router + experts) + 2 * d.hidden_size * d.vocab_size)


def vision_forward_flops(v: VisionShape) -> float:
    """Forward FLOPs per image: patch embedding, ViT layers, projector."""
    attention, mlp = _layer_forward(v.hidden_size, v.ffn_hidden_size, v.num_patches)
    embed = 2 * 3 * v.patch_size ** 2 * v.hidden_size
    projector = 2 * (v.hidden_size * v.decoder_ffn_hidden_size
                     + v.decoder_ffn_hidden_size * v.decoder_hidden_size)
    return v.num_patches * (embed + v.num_layers * (attention + mlp) + projector)


def active_params_per_token(d: DecoderShape, real_per_token: Optional[float] = None) -> float:
    """Decoder weights a token touches (embeddings and output layer included)."""
    r = d.expected_real_per_token if real_per_token is None else real_per_token
    h, m = d.hidden_size, _matrices(d.gated_mlp)
    attention = 2 * h * (d.attention_width or h) * (1 + d.kv_ratio)
    dense = d.num_layers - d.num_moe_layers
    return (d.num_layers * attention + dense * m * h * d.ffn_hidden_size
            + d.num_moe_layers * (h * (d.num_experts + d.null_logit_rows)
                                  + r * m * h * d.moe_ffn_hidden_size) + 2 * h * d.vocab_size)


def train_flops_per_sample(decoder: DecoderShape, vision: Optional[VisionShape],
                           real_per_token: Optional[float] = None) -> float:
    """Training FLOPs (3 x forward) of one sample: every decoder position plus its image."""
    forward = decoder.seq_length * decoder_forward_flops(decoder, real_per_token)
    if vision is not None:
        forward += vision_forward_flops(vision)
    return 3 * forward
