"""KL(teacher || student) of next-token distributions from logits sharded over the vocabulary.

With tensor parallelism megatron-core's output layer leaves each rank a slice of the vocabulary
(`V/TP` columns), and so does every softmax over it: like megatron-core's
`vocab_parallel_cross_entropy`, the maxima and the sums of exponentials are reduced over the
tensor-parallel group before any probability is formed, and the backward needs no collective
(the gradient of KL(p_t || p_s) with respect to the student's logits is p_s - p_t, local to each
slice). torch only, the group passed in; the collectives run on the logits' device.

Legend: V/TP this rank's vocabulary columns; `...` any leading token dimensions ([B, S]).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_nullmoe.collectives import reduce_tensor


def _all_reduce(x: torch.Tensor, op: str, group) -> torch.Tensor:
    """x reduced over `group` (collectives.py: the one home of control-value collectives); None
    is no group at all, not the default one."""
    return x if group is None else reduce_tensor(x, group, op)


def _log_softmax(z: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the whole vocabulary of [2, ..., V/TP] (teacher, student) logit slices:
    one MAX and one SUM collective for both models."""
    z = z - _all_reduce(z.amax(-1), "max", group).unsqueeze(-1)
    sums = _all_reduce(z.exp().sum(-1), "sum", group)
    return z - sums.log().unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, teacher, student, group, temperature):
        z = torch.stack([teacher.float(), student.float()]) / temperature
        logp = _log_softmax(z, group)
        p = logp.exp()
        kl = _all_reduce((p[0] * (logp[0] - logp[1])).sum(-1), "sum", group)
        ctx.save_for_backward(p[1] - p[0])
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (diff,) = ctx.saved_tensors  # p_student - p_teacher: d KL / d (logits / temperature)
        grad = diff * (grad_kl / ctx.temperature).unsqueeze(-1)
        return None, grad.to(ctx.dtype), None, None


def vocab_parallel_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                      group: Optional[dist.ProcessGroup] = None,
                      temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) per token ([..., V/TP] -> [...], fp32,
    the same on every rank of `group`). Computed in fp32 whatever the logits' dtype; gradients
    flow to the student's logits only. `group`: the ranks that hold the other vocabulary slices
    (None or one rank: the whole vocabulary is here)."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {list(teacher_logits.shape)} and student logits "
                         f"{list(student_logits.shape)} differ: the two models must share the "
                         "vocabulary and the batch")
    return _VocabParallelKL.apply(teacher_logits.detach(), student_logits, group, temperature)
