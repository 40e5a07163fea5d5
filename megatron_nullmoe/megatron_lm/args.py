"""`--num-null-experts` and companions for Megatron-LM's argument parser, and args -> config.

Megatron-LM's `parse_args` builds its parser with allow_abbrev=False, rejects unknown flags, and
hands the parser to `extra_args_provider` (which must return it). `core_transformer_config_from_args`
copies every args attribute whose name is a TransformerConfig field, so our dests deliberately
match no TransformerConfig field (all start with `num_null_` or `null_expert_`).
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

from megatron_nullmoe.config import (
    GATE_NORMALIZATIONS,
    NULL_LOGIT_MODES,
    NullExpertConfig,
    NullExpertConfigError,
)

# flag -> NullExpertConfig field
FLAGS = {
    "--num-null-experts": "num_null_experts",
    "--null-expert-logits": "null_logits",
    "--null-expert-gate-normalization": "gate_normalization",
    "--null-expert-target-real-per-token": "target_real_per_token",
    "--null-expert-budget-update-rate": "budget_update_rate",
}


def add_null_moe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the null-expert flags to a Megatron-LM parser; returns it (extra_args_provider)."""
    defaults = NullExpertConfig()
    group = parser.add_argument_group(title="null experts (megatron-nullmoe)")
    group.add_argument("--num-null-experts", type=int, default=defaults.num_null_experts,
                       help="Z zero-compute null slots added to the --num-experts real experts; "
                            "top-k is taken over E + Z slots (0: standard MoE)")
    group.add_argument("--null-expert-logits", choices=NULL_LOGIT_MODES,
                       default=defaults.null_logits,
                       help="shared: one learned null logit replicated in the Z slots; "
                            "per_expert: one router row per null slot (AdaMoE)")
    group.add_argument("--null-expert-gate-normalization", choices=GATE_NORMALIZATIONS,
                       default=defaults.gate_normalization,
                       help="renormalize: real gates take over the null share; keep_null_share: "
                            "the null share is dropped (the task loss reaches the null logit)")
    group.add_argument("--null-expert-target-real-per-token", type=float, default=None,
                       help="compute-budget control: hold the realised real experts per token "
                            "at this value (in (0, top-k]); off by default")
    group.add_argument("--null-expert-budget-update-rate", type=float,
                       default=defaults.budget_update_rate,
                       help="step size of the budget-control bias per optimizer step")
    return parser


def chain_args_providers(*providers: Optional[Callable]) -> Callable:
    """One extra_args_provider that applies several in turn (e.g. ours and Megatron-LM's own)."""
    def provider(parser):
        for p in providers:
            if p is not None:
                parser = p(parser)
        return parser
    return provider


def null_config_from_args(args) -> NullExpertConfig:
    """NullExpertConfig from Megatron-LM's parsed args (after validate_args)."""
    missing = [dest for dest in FLAGS.values()
               if not hasattr(args, _dest(dest))]
    if missing:
        raise NullExpertConfigError(
            f"args lack {', '.join('--' + _dest(m).replace('_', '-') for m in missing)}: pass "
            "add_null_moe_args as (or inside) Megatron-LM's extra_args_provider")
    cfg = NullExpertConfig(**{field: getattr(args, _dest(field)) for field in FLAGS.values()})
    if cfg.num_null_experts and not getattr(args, "num_experts", None):
        raise NullExpertConfigError(
            f"--num-null-experts={cfg.num_null_experts} needs a MoE model: set --num-experts")
    return cfg


def _dest(field: str) -> str:
    return field if field == "num_null_experts" else f"null_expert_{field.removeprefix('null_')}"
