"""Active parameters and FLOPs per token of a (null-)MoE decoder, and iso-FLOP partners.

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

import argparse
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional


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

    @property
    def expected_real_per_token(self) -> float:
        return expected_real(self.num_experts, self.topk, self.num_null_experts)


@dataclass(frozen=True)
class VisionShape:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_patches: int  # tokens the ViT runs per image (class token included)
    patch_size: int
    decoder_hidden_size: int  # projector output
    decoder_ffn_hidden_size: int  # projector hidden


def expected_real(num_experts: int, topk: int, num_null: int) -> float:
    """Balanced expectation of real experts per token: k * E / (E + Z)."""
    return topk * num_experts / (num_experts + num_null)


def iso_flop_partners(num_experts: int, baseline_topk: int, max_topk: int = 16) -> list[tuple[int, int]]:
    """(k, Z) pairs with k * E / (E + Z) = k_b exactly, k_b < k <= max_topk (plus (k_b, 0))."""
    out = [(baseline_topk, 0)]
    for k in range(baseline_topk + 1, max_topk + 1):
        z = Fraction(num_experts * (k - baseline_topk), baseline_topk)
        if z.denominator == 1:
            out.append((k, int(z)))
    return out


def _layer_forward(h: int, ffn: int, seq: int) -> tuple[float, float]:
    """(attention FLOPs, dense-MLP FLOPs) per token of one transformer layer, forward."""
    attention = 2 * 4 * h * h + 2 * 2 * seq * h  # q,k,v,o projections + scores and values
    mlp = 2 * 2 * h * ffn
    return attention, mlp


def decoder_forward_flops(d: DecoderShape, real_per_token: Optional[float] = None) -> float:
    """Forward FLOPs per decoder token; real_per_token defaults to the balanced expectation."""
    r = d.expected_real_per_token if real_per_token is None else real_per_token
    attention, dense_mlp = _layer_forward(d.hidden_size, d.ffn_hidden_size, d.seq_length)
    router = 2 * d.hidden_size * (d.num_experts + d.null_logit_rows)
    experts = r * 2 * 2 * d.hidden_size * d.moe_ffn_hidden_size
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
    h = d.hidden_size
    attention = 4 * h * h
    dense = d.num_layers - d.num_moe_layers
    return (d.num_layers * attention + dense * 2 * h * d.ffn_hidden_size
            + d.num_moe_layers * (h * (d.num_experts + d.null_logit_rows)
                                  + r * 2 * h * d.moe_ffn_hidden_size) + 2 * h * d.vocab_size)


def shapes_from_config(cfg, vocab_size: int) -> tuple[DecoderShape, Optional[VisionShape]]:
    """DecoderShape (and VisionShape for a VLM) of a training RunConfig."""
    from megatron_nullmoe.train.model import image_tokens, null_config

    m = cfg.model
    seq = image_tokens(cfg) + cfg.data.seq_length
    moe_layers = sum(1 for i in range(m.num_layers) if i % m.moe_layer_freq == 0)
    null = null_config(cfg)
    decoder = DecoderShape(
        m.num_layers, m.hidden_size, m.ffn_hidden_size, seq, vocab_size, moe_layers, m.num_experts,
        m.moe_ffn_hidden_size, m.router_topk, null.num_null_experts, null.num_null_logits)
    if m.kind != "vlm":
        return decoder, None
    v = m.vision
    vision = VisionShape(v.num_layers, v.hidden_size, v.ffn_hidden_size,
                         (v.image_size // v.patch_size) ** 2 + 1, v.patch_size, m.hidden_size,
                         m.ffn_hidden_size)
    return decoder, vision


def train_flops_per_sample(decoder: DecoderShape, vision: Optional[VisionShape],
                           real_per_token: Optional[float] = None) -> float:
    """Training FLOPs (3 x forward) of one sample: every decoder position plus its image."""
    forward = decoder.seq_length * decoder_forward_flops(decoder, real_per_token)
    if vision is not None:
        forward += vision_forward_flops(vision)
    return 3 * forward


# ------------------------------------------------------------------------------------ CLI
def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.1f} "


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.flops", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="a training recipe (YAML); prints its FLOPs per token")
    p.add_argument("--vocab-size", type=int, default=32000, help="for --config (default 32000)")
    p.add_argument("--partners", action="store_true", help="iso-FLOP (k, Z) for --experts and --baseline-topk")
    p.add_argument("--expected", action="store_true", help="expected real experts of --experts/--topk/--nulls")
    p.add_argument("--experts", type=int)
    p.add_argument("--baseline-topk", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--nulls", type=int)
    p.add_argument("--max-topk", type=int, default=16)
    p.add_argument("overrides", nargs="*", help="key=value overrides for --config")
    a = p.parse_args(argv)
    for flag, value, low in (("--experts", a.experts, 1), ("--baseline-topk", a.baseline_topk, 1),
                             ("--topk", a.topk, 1), ("--nulls", a.nulls, 0), ("--max-topk", a.max_topk, 1)):
        if value is not None and value < low:
            p.error(f"{flag}={value}: expected >= {low}")
    if a.partners:
        if a.experts is None or a.baseline_topk is None:
            p.error("--partners needs --experts E and --baseline-topk K_B")
        if a.baseline_topk > a.experts:
            p.error(f"--baseline-topk={a.baseline_topk} exceeds --experts={a.experts}")
        print(f"iso-FLOP partners of top-{a.baseline_topk} over E={a.experts}: k * E / (E + Z) = "
              f"{a.baseline_topk}")
        print("| k | Z (num_null_experts) | null share Z/(E+Z) |\n|---|---|---|")
        for k, z in iso_flop_partners(a.experts, a.baseline_topk, a.max_topk):
            print(f"| {k} | {z} | {z / (a.experts + z):.3f} |")
        return
    if a.expected:
        if a.experts is None or a.topk is None or a.nulls is None:
            p.error("--expected needs --experts E, --topk K and --nulls Z")
        if a.topk > a.experts + a.nulls:
            p.error(f"--topk={a.topk} exceeds the {a.experts + a.nulls} slots (E + Z)")
        r = expected_real(a.experts, a.topk, a.nulls)
        print(f"expected real experts per token: {a.topk} * {a.experts} / ({a.experts} + {a.nulls}) "
              f"= {r:g} (iso-FLOP with top-{r:g})" if float(r).is_integer() else
              f"expected real experts per token: {r:.4f} (no integer top-k baseline matches)")
        return
    if not a.config:
        p.error("give --config RECIPE, --partners or --expected")
    import warnings

    import torch

    from megatron_nullmoe.train.config import ConfigError, load_config

    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's config chatter

    from megatron_nullmoe.config import NullExpertConfigError
    from megatron_nullmoe.train.model import decoder_config, null_config

    try:
        cfg = load_config(a.config, a.overrides)
        null_config(cfg).check(decoder_config(cfg, torch.float32))
        decoder, vision = shapes_from_config(cfg, a.vocab_size)
    except (ConfigError, NullExpertConfigError) as err:
        raise SystemExit(f"config error: {err}") from None
    r = decoder.expected_real_per_token
    print(f"{cfg.name}: E={decoder.num_experts}, k={decoder.topk}, Z={decoder.num_null_experts}, "
          f"{decoder.num_moe_layers} MoE of {decoder.num_layers} layers, {decoder.seq_length} "
          f"positions, vocab {a.vocab_size}")
    print(f"expected real experts per token: {r:.3f} (top-k would run {decoder.topk})")
    print("| | active params / token | forward FLOPs / token | train FLOPs / sample |")
    print("|---|---|---|---|")
    for label, rr in (("expected (balanced)", r), (f"if every slot were real (top-{decoder.topk})",
                                                   float(decoder.topk))):
        print(f"| {label} | {_fmt(active_params_per_token(decoder, rr))} | "
              f"{_fmt(decoder_forward_flops(decoder, rr))}FLOP | "
              f"{_fmt(train_flops_per_sample(decoder, vision, rr))}FLOP |")


if __name__ == "__main__":
    main()
