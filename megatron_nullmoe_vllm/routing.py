"""The null-expert routing for vLLM's fused-MoE layer: megatron_nullmoe's own routing math, and
the real picks laid out as the rows the kernel computes, one (token, real expert) pair a row.

Shape legend: T tokens, H hidden, E real experts, Z null slots, S = E + Z slots, K top-k,
R real picks (the rows computed; R <= T K, and R = 0 when every pick is null).

The math is megatron_nullmoe/routing/math.py itself (torch only), loaded from its file: importing
it as `megatron_nullmoe.routing.math` would first run `megatron_nullmoe/__init__`, which imports
megatron-core, in every serving process. One copy of the routing rules, no second one to drift.

Why rows, not a [T, K] table with null picks masked: vLLM's fused-MoE kernels take every (token,
pick) entry of their [T, K] ids as a row to compute. The CPU kernel has no id it skips (-1 gives
wrong results, then heap corruption); the GPU kernels skip ids that the expert map marks as on
another rank, a map vLLM builds only under expert parallelism. So the block hands the kernel R
rows of top-1 instead: each real pick once, its token's hidden state gathered, its output added
back to its token. Null picks cost nothing on every device; the gather and the add are O(R H).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_MATH_NAME = "megatron_nullmoe_vllm._routing_math"


def _load_math():
    if _MATH_NAME in sys.modules:
        return sys.modules[_MATH_NAME]
    # find_spec of a top-level package locates it without executing its __init__
    package = importlib.util.find_spec("megatron_nullmoe")
    if package is None or not package.submodule_search_locations:
        raise ImportError("megatron_nullmoe is not installed: the vLLM plugin reads its routing "
                          "math (pip install -e . in the serving venv; make setup-vllm)")
    path = Path(list(package.submodule_search_locations)[0]) / "routing" / "math.py"
    spec = importlib.util.spec_from_file_location(_MATH_NAME, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MATH_NAME] = module
    spec.loader.exec_module(module)
    return module


routing_math = _load_math()


def picks(cfg, logits_TS: torch.Tensor, selection_bias_S: torch.Tensor):
    """(gates_TK, index_TK) of the slot logits, as the export's router computes them: indices
    over E + Z slots (>= E: null), gates of the real picks (null picks' gates are 0).
    `selection_bias_S` is cast to the logits' dtype first, as the export's router adds it."""
    routing = routing_math.topk_over_slots(
        logits_TS, cfg.topk, cfg.score_function, cfg.pre_softmax,
        selection_bias_S.to(logits_TS.dtype))
    gates_TK = routing_math.real_gates(routing, cfg.num_experts, cfg.score_function,
                                       cfg.pre_softmax, cfg.gate_normalization,
                                       cfg.scaling_factor)
    return gates_TK, routing.index_TK


def real_rows(gates_TK: torch.Tensor, index_TK: torch.Tensor, num_experts: int):
    """(token_R, rows_R2) of the real picks, token-major: the token each row belongs to, and the
    row's (expert id, gate) as fp32 columns, the form `rows_as_routing` reads back. fp32 holds
    every expert id exactly (< 2**24) and the gate as the kernel takes it."""
    token_R, pick_R = (index_TK < num_experts).nonzero(as_tuple=True)
    rows_R2 = torch.stack([index_TK[token_R, pick_R].float(),
                           gates_TK[token_R, pick_R].float()], dim=1)
    return token_R, rows_R2


def rows_as_routing(hidden_states, gating_output, topk, renormalize, **_):
    """vLLM's `custom_routing_function` of a top-1 layer whose "router logits" are `real_rows`'
    [R, 2] table: (weights_R1 fp32, ids_R1 int32). The table travels where vLLM moves router
    logits (beside the hidden states), so the pairing of rows and routes never breaks."""
    if topk != 1 or gating_output.shape[-1] != 2:
        raise ValueError(f"rows_as_routing reads [R, 2] (expert id, gate) rows of a top-1 layer; "
                         f"got top-k {topk}, logits {tuple(gating_output.shape)}")
    rows = gating_output.float()
    return rows[:, 1:2].contiguous(), rows[:, 0:1].to(torch.int32)
