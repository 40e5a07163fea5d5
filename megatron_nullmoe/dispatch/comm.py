"""Device-agnostic differentiable collectives for the dispatchers.

megatron-core's own `all_to_all` allocates its output on `torch.cuda.current_device()`; these
allocate on the input's device, so the same code runs with NCCL on GPU and gloo on CPU.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, input, output_splits: Sequence[int], input_splits: Sequence[int]):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        if dist.get_world_size(group) == 1:
            return input
        input = input.contiguous()
        output = input.new_empty((sum(output_splits), *input.shape[1:]))
        dist.all_to_all_single(
            output,
            input,
            output_split_sizes=list(output_splits),
            input_split_sizes=list(input_splits),
            group=group,
        )
        return output

    @staticmethod
    def backward(ctx, grad):
        return None, _AllToAll.apply(ctx.group, grad, ctx.input_splits, ctx.output_splits), None, None


def all_to_all(group, input: torch.Tensor, output_splits, input_splits) -> torch.Tensor:
    """Uneven all-to-all along dim 0: rank r sends input_splits[j] rows to rank j."""
    return _AllToAll.apply(group, input, list(output_splits), list(input_splits))


def _sum_then_slice(group, x: torch.Tensor) -> torch.Tensor:
    """Reduce-scatter along dim 0 in equal slices: each rank receives only its own slice (half
    the bytes of an all-reduce). NCCL and gloo (torch >= 2.13 here) both implement it."""
    world = dist.get_world_size(group)
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 (equal sizes); backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, group, input):
        ctx.group = group
        world = dist.get_world_size(group)
        if world == 1:
            return input
        input = input.contiguous()
        parts = [torch.empty_like(input) for _ in range(world)]
        dist.all_gather(parts, input, group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        if dist.get_world_size(ctx.group) == 1:
            return None, grad
        return None, _sum_then_slice(ctx.group, grad)


def all_gather(group, input: torch.Tensor) -> torch.Tensor:
    return _AllGather.apply(group, input)


class _ReduceScatter(torch.autograd.Function):
    """Sum over ranks then keep this rank's equal slice of dim 0; backward all-gathers."""

    @staticmethod
    def forward(ctx, group, input):
        ctx.group = group
        if dist.get_world_size(group) == 1:
            return input
        return _sum_then_slice(group, input)

    @staticmethod
    def backward(ctx, grad):
        return None, _AllGather.apply(ctx.group, grad)


def reduce_scatter(group, input: torch.Tensor) -> torch.Tensor:
    return _ReduceScatter.apply(group, input)
