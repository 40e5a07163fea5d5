"""A run config's shapes for FLOP counting: RunConfig -> DecoderShape (and VisionShape for a VLM).

The counting itself is `megatron_nullmoe.flops`, which knows no config; this is the one place that
reads a recipe's model section for it (the trainer's TFLOP/s, the sweep's cost, and this module's
command: `python -m megatron_nullmoe.train.flops RECIPE [key=value ...]`, a recipe's parameters and
FLOPs per token).
"""

from __future__ import annotations

import argparse
from typing import Optional

from megatron_nullmoe import flops
from megatron_nullmoe.flops import DecoderShape, VisionShape, moe_layer_pattern
from megatron_nullmoe.run.config import RunConfig
from megatron_nullmoe.run.model import null_config


def shapes_from_config(cfg: RunConfig,
                       vocab_size: int) -> tuple[DecoderShape, Optional[VisionShape]]:
    """DecoderShape (and VisionShape for a VLM) of a training RunConfig."""
    m = cfg.model
    seq = cfg.decoder_seq_length
    moe_layers = sum(moe_layer_pattern(m.num_layers, m.moe_layer_freq))
    null = null_config(cfg)
    groups = m.num_attention_heads if m.num_query_groups is None else m.num_query_groups
    decoder = DecoderShape(
        m.num_layers, m.hidden_size, m.ffn_hidden_size, seq, vocab_size, moe_layers, m.num_experts,
        m.moe_ffn_hidden_size, m.router_topk, null.num_null_experts, null.num_null_logits,
        kv_ratio=groups / m.num_attention_heads,  # grouped-query attention: narrower k and v
        gated_mlp=m.activation == "swiglu",  # three matrices per MLP, the experts' too
        attention_width=m.num_attention_heads * (m.kv_channels or 0))  # 0: hidden / heads
    if m.kind != "vlm":
        return decoder, None
    v = m.vision
    vision = VisionShape(v.num_layers, v.hidden_size, v.ffn_hidden_size,
                         (v.image_size // v.patch_size) ** 2 + 1, v.patch_size, m.hidden_size,
                         m.ffn_hidden_size)
    return decoder, vision


def _fmt(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f} {unit}"
    return f"{x:.1f} "


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.train.flops",
                                description="A training recipe's parameters and FLOPs per token.")
    p.add_argument("recipe", help="a training recipe (YAML)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as the trainer takes them")
    p.add_argument("--vocab-size", type=int, default=32000, help="(default 32000)")
    a = p.parse_args(argv)
    import warnings

    from megatron_nullmoe.errors import NullMoEError
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.model import check_decoder

    warnings.filterwarnings("ignore", category=UserWarning)  # megatron-core's config chatter
    try:
        cfg = load_config(a.recipe, a.overrides)
        check_decoder(cfg)
        decoder, vision = shapes_from_config(cfg, a.vocab_size)
    except NullMoEError as err:
        raise SystemExit(f"{err.what}: {err}") from None
    r = decoder.expected_real_per_token
    print(f"{cfg.name}: E={decoder.num_experts}, k={decoder.topk}, Z={decoder.num_null_experts}, "
          f"{decoder.num_moe_layers} MoE of {decoder.num_layers} layers, {decoder.seq_length} "
          f"positions, vocab {a.vocab_size}")
    print(f"expected real experts per token: {r:.3f} (top-k would run {decoder.topk})")
    print("| | active params / token | forward FLOPs / token | train FLOPs / sample |")
    print("|---|---|---|---|")
    for label, rr in (("expected (balanced)", r), (f"if every slot were real (top-{decoder.topk})",
                                                   float(decoder.topk))):
        print(f"| {label} | {_fmt(flops.active_params_per_token(decoder, rr))} | "
              f"{_fmt(flops.decoder_forward_flops(decoder, rr))}FLOP | "
              f"{_fmt(flops.train_flops_per_sample(decoder, vision, rr))}FLOP |")


if __name__ == "__main__":
    main()
