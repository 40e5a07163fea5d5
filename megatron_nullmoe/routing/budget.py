"""Compute-budget control: holds the realised real experts per token at a target.

One scalar bias on the null slots' selection scores (selection only, like megatron-core's
aux-loss-free expert bias: gates never see it) moves by a fixed step after every optimizer step,
up when the step ran more real experts per token than the target, down when fewer. The state
(the bias and the step's [real picks, tokens] counts) lives in the router's buffers, so that it is
checkpointed and moved with the model; this class is the rule that reads and updates them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class BudgetControl:
    """The sign-update rule of one router: `target` real experts per token, steps of `rate`."""

    def __init__(self, target: float, rate: float, num_real: int, num_slots: int):
        self.target, self.rate = target, rate
        self.num_real, self.num_slots = num_real, num_slots

    def selection_bias_S(self, null_bias: torch.Tensor) -> torch.Tensor:
        """[S] bias for slot selection: 0 on real experts, the control's bias on null slots."""
        bias_S = torch.zeros(self.num_slots, device=null_bias.device)
        bias_S[self.num_real :] = null_bias
        return bias_S

    @torch.no_grad()
    def step(self, null_bias: torch.Tensor, counts: torch.Tensor, group=None) -> Optional[float]:
        """Moves `null_bias` in place by the sign of (realised - target) over `counts` ([real
        picks, tokens] of this rank since the last step, summed over `group`); returns the
        realised rate, or None when no token was counted."""
        if group is not None and dist.is_initialized():
            dist.all_reduce(counts, group=group)
        if counts[1] <= 0:
            return None
        realised = float(counts[0] / counts[1])
        if realised > self.target:
            null_bias += self.rate
        elif realised < self.target:
            null_bias -= self.rate
        return realised
