"""Compute-budget control: holds the realised real experts per token at a target.

One scalar bias on the null slots' selection scores (selection only, like megatron-core's
aux-loss-free expert bias: gates never see it) moves by a fixed step after every optimizer step,
up when the step ran more real experts per token than the target, down when fewer. The state
(the bias and the step's [real picks, tokens] counts) lives in the router's buffers, so that it is
checkpointed and moved with the model, and stays float32 / float64 under bf16 wrappers (a bf16
bias stops moving by 0.01 once |bias| >= 4; bf16 counts are inexact above 256). This class is the
rule that reads and updates them; the counts are summed over ranks by the caller, for all routers
in one collective (`model_utils.update_null_budget`).

With a compute schedule (`NullExpertConfig.target_start_real_per_token`) the target moves with
the optimizer step. The step lives in one more router buffer (`budget_step`, float64, counted
exactly to 2**53 and checkpointed, so a run resumed mid-schedule continues at the same target),
and the target of a step is computed from it on the device: no rank reads anything back, and
every rank computes the same value from the same buffer.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class TargetSchedule(NamedTuple):
    """The target from `start` (step 0) to `end` (step `steps` and after), linear or cosine."""

    start: float
    end: float
    steps: int
    kind: str  # "linear" or "cosine"


class BudgetControl:
    """The sign-update rule of one router: `target` real experts per token, steps of `rate`.
    With `schedule`, `target` is the schedule's end and the target of a step is `target_for`."""

    def __init__(self, target: float, rate: float, num_real: int, num_slots: int,
                 schedule: Optional[TargetSchedule] = None):
        self.target, self.rate = target, rate
        self.num_real, self.num_slots = num_real, num_slots
        self.schedule = schedule

    def selection_bias_S(self, null_bias: torch.Tensor) -> torch.Tensor:
        """[S] bias for slot selection: 0 on real experts, the control's bias on null slots."""
        bias_S = torch.zeros(self.num_slots, device=null_bias.device)
        bias_S[self.num_real :] = null_bias
        return bias_S

    def target_for(self, step: Optional[torch.Tensor]):
        """The target of the optimizer step that follows `step` (a float64 scalar tensor: the
        steps done so far), computed on its device with no read to the host; the constant target
        (a float) without a schedule. Same formula as `NullExpertConfig.target_at`: start at step
        0, end from `steps` on; linear, or start + (end - start) * (1 - cos(pi * step/steps))/2."""
        s = self.schedule
        if s is None:
            return self.target
        frac = (step / s.steps).clamp(max=1.0)
        weight = frac if s.kind == "linear" else 0.5 * (1.0 - torch.cos(frac * math.pi))
        target = s.start + (s.end - s.start) * weight
        return target.masked_fill(step >= s.steps, s.end)

    @torch.no_grad()
    def step(self, null_bias: torch.Tensor, counts: torch.Tensor,
             budget_step: Optional[torch.Tensor] = None) -> None:
        """Moves `null_bias` in place by the sign of (realised - target), from `counts` ([real
        picks, tokens] since the last step, already summed over the ranks whose tokens differ).
        No step without tokens. With a schedule the target is that of step `budget_step` (the
        steps done before the one counted), which then advances by one. Runs on the device,
        reading nothing back to the host."""
        if self.schedule is not None and budget_step is None:
            raise ValueError("a scheduled budget target needs the router's budget_step buffer")
        error = counts[0] - self.target_for(budget_step) * counts[1]
        null_bias += (self.rate * torch.sign(error)).to(null_bias.dtype)
        if self.schedule is not None:
            budget_step += 1
