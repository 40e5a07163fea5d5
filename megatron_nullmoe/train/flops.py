"""A run config's shapes for FLOP counting: RunConfig -> DecoderShape (and VisionShape for a VLM).

The counting itself is `megatron_nullmoe.flops`, which knows no config; this is the one place that
reads a recipe's model section for it (the trainer's TFLOP/s, the sweep's cost, `flops --config`).
"""

from __future__ import annotations

from typing import Optional

from megatron_nullmoe.flops import DecoderShape, VisionShape, moe_layer_pattern
from megatron_nullmoe.train.config import RunConfig
from megatron_nullmoe.train.model import image_tokens, null_config


def shapes_from_config(cfg: RunConfig,
                       vocab_size: int) -> tuple[DecoderShape, Optional[VisionShape]]:
    """DecoderShape (and VisionShape for a VLM) of a training RunConfig."""
    m = cfg.model
    seq = image_tokens(cfg) + cfg.data.seq_length
    moe_layers = sum(moe_layer_pattern(m.num_layers, m.moe_layer_freq))
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
