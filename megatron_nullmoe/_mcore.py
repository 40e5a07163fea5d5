"""Version adapter: every megatron-core detail that differs between versions lives here.

Tested against megatron-core 0.16.1 (the newest release that installs on Python 3.11); 0.17+
passes extra keyword arguments (e.g. `is_mtp_layer=`) to router builders, which our builders accept.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe import moe_utils

HAVE_TE = bool(getattr(moe_utils, "HAVE_TE", False))


def gating_linear(
    inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Router logits in `dtype`. Uses megatron-core's memory-saving kernel when Transformer Engine
    is present; otherwise the same torch ops as its fallback path (0.16.1's fallback itself reads
    an undefined `te_general_gemm` when TE is absent)."""
    if HAVE_TE:
        return moe_utils.router_gating_linear(inp, weight, bias, dtype)
    flat = inp.reshape(-1, inp.shape[-1]).to(dtype)
    if bias is None:
        out = torch.mm(flat, weight.to(dtype).t())
    else:
        out = torch.addmm(bias.to(dtype), flat, weight.to(dtype).t())
    return out.view(*inp.shape[:-1], -1)


def num_layers_for_tracker(config) -> int:
    """Layer count megatron-core's aux-loss tracker is sized with (decoder + MTP layers)."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
