"""The null-expert routing for vLLM's fused-MoE layer: megatron_nullmoe's own routing math,
with every null pick handed to the kernel as expert 0 with gate 0.

Shape legend: T tokens, H hidden, E real experts, Z null slots, S = E + Z slots, K top-k.

The math is megatron_nullmoe/routing/math.py itself (torch only), loaded from its file: importing
it as `megatron_nullmoe.routing.math` would first run `megatron_nullmoe/__init__`, which imports
megatron-core, in every serving process. One copy of the routing rules, no second one to drift.

Why expert 0 with gate 0 (CPU): vLLM's CPU fused-MoE kernel reads every (token, pick) pair as a
row; an id of -1 gives wrong results and then heap corruption, while id 0 with gate 0 adds
exactly 0 * finite = 0. The row is still computed: that is the cost the CPU path keeps.
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


class NullSlotRouting:
    """vLLM's `custom_routing_function` for one MoE layer: (weights_TK fp32, ids_TK int32) of
    the real experts from the slot logits [T, S]; null picks become (id 0, weight 0).

    `selection_bias_S` is the layer's buffer (loaded after this object is made, read at every
    call); it is cast to the logits' dtype first, as the export's router adds it."""

    def __init__(self, cfg, selection_bias_S: torch.Tensor):
        self.cfg = cfg
        self.selection_bias_S = selection_bias_S

    def __call__(self, hidden_states, gating_output, topk, renormalize, **_):
        cfg = self.cfg
        logits_TS = gating_output
        routing = routing_math.topk_over_slots(
            logits_TS, cfg.topk, cfg.score_function, cfg.pre_softmax,
            self.selection_bias_S.to(logits_TS.dtype))
        gates_TK = routing_math.real_gates(routing, cfg.num_experts, cfg.score_function,
                                           cfg.pre_softmax, cfg.gate_normalization,
                                           cfg.scaling_factor)
        index_TK = routing.index_TK
        ids_TK = torch.where(index_TK < cfg.num_experts, index_TK, torch.zeros_like(index_TK))
        return gates_TK.float(), ids_TK.to(torch.int32)
