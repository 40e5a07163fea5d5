"""Per-step work an entry script adds around Megatron-LM's own forward step and FLOPs counter.

- `with_budget_control(forward_step)`: Megatron-LM gives no per-optimizer-step hook to a script
  (train() overwrites config.finalize_model_grads_func), so the budget-control step runs at the
  first training micro-batch of each step, for the previous step's counts. It is a collective over
  the data-parallel group, and every rank runs the same number of forward steps.
- `null_moe_flops(args, batch_size, real_per_token)`: Megatron-LM's num_floating_point_operations
  multiplies the expert term by moe_router_topk, overstating a null-MoE's work by k / realised;
  this counts the realised rate instead.
"""

from __future__ import annotations

import functools
from typing import Callable


def with_budget_control(forward_step: Callable, num_microbatches: Callable[[], int],
                        group_fn: Callable) -> Callable:
    """Wraps a Megatron-LM forward_step(data_iterator, model, ...) with budget control."""
    from megatron_nullmoe.model_utils import null_routers, update_null_budget

    calls = {"n": 0}

    @functools.wraps(forward_step)
    def step(data_iterator, model, *args, **kwargs):
        if model.training:
            if calls["n"] and calls["n"] % num_microbatches() == 0:
                update_null_budget(model, group=group_fn())
            calls["n"] += 1
        return forward_step(data_iterator, model, *args, **kwargs)

    step.null_routers = null_routers  # for introspection in tests
    return step


def null_moe_flops(args, batch_size: int, real_per_token: float) -> float:
    """Training FLOPs of one step for a Megatron-LM GPT config, experts counted at the realised
    rate (swiglu and GQA as Megatron-LM counts them; MoE on every `--moe-layer-freq`-th layer)."""
    h, s, layers = args.hidden_size, args.seq_length, args.num_layers
    kv = (args.num_query_groups if getattr(args, "group_query_attention", False)
          else args.num_attention_heads) / args.num_attention_heads
    expansion = 3 if getattr(args, "swiglu", False) else 2
    freq = getattr(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        pattern = [1 if i % freq == 0 else 0 for i in range(layers)]
    else:
        pattern = list(freq)
    moe_layers = sum(pattern) if args.num_experts else 0
    ffn = args.ffn_hidden_size
    moe_ffn = args.moe_ffn_hidden_size or ffn
    per_token_layers = (
        layers * (2 * h * h * (1 + kv) + 2 * s * h)  # q+o, k+v (GQA), scores and values
        + (layers - moe_layers) * expansion * h * ffn
        + moe_layers * (expansion * h * moe_ffn * real_per_token + h * args.num_experts)
    )
    return 3 * 2 * batch_size * s * (per_token_layers + h * args.padded_vocab_size)
