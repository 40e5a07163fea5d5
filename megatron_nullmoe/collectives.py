"""Control-value collectives: the one place where loss sums, stop flags, counts and statistics
cross ranks.

A collective's tensor must live on a device its group's backend serves: NCCL serves CUDA only
(a CPU tensor raises "No backend type associated with device type cpu"), gloo serves the CPU.
Control values are small and read on the host, so callers hand in Python numbers (or a tensor on
any device) and these functions put the buffer where the group's backend can reduce it. Model
activations cross ranks in `dispatch.comm` instead (differentiable, on the model's device).

With torch.distributed not initialised, or group size 1, every function returns its input
reduced over one rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def served_device_types(group=None) -> tuple[str, ...]:
    """Device types the group's backend runs collectives on, in order of preference.

    A backend string may name one backend ("nccl", "gloo") or one per device type
    ("cpu:gloo,cuda:nccl", what `init_process_group` makes when asked for both)."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:
        return tuple(part.split(":")[0] for part in backend.split(","))
    capability = getattr(dist.Backend, "backend_capability", {})
    return tuple(capability.get(backend, ("cpu",) if backend == "gloo" else ("cuda",)))


def group_device(group=None, near: Optional[torch.device] = None) -> torch.device:
    """The device a collective on `group` should run on: `near` (a tensor's own device) if the
    backend serves it, else the backend's first device type (the current GPU for CUDA)."""
    served = served_device_types(group)
    if near is not None and near.type in served:
        return near
    kind = served[0]
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def _active(group) -> bool:
    return dist.is_initialized() and dist.get_world_size(group) > 1


def _op(op: str):
    if op not in OPS:
        raise ValueError(f"reduce op {op!r}: valid ops are {sorted(OPS)}")
    return OPS[op]


def reduce_tensor(tensor: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """A reduced copy of `tensor` over `group`, on a device the group serves (the tensor's own
    when served, so GPU buffers on NCCL stay on the GPU and nothing waits for the host)."""
    if not _active(group):
        return tensor.clone()
    buffer = tensor.detach().to(group_device(group, tensor.device), copy=True).contiguous()
    dist.all_reduce(buffer, op=_op(op), group=group)
    return buffer


def reduce_values(values: Sequence[float], group=None, op: str = "sum",
                  dtype: torch.dtype = torch.float64) -> list[float]:
    """Python numbers reduced elementwise over `group` (one collective, read on the host)."""
    values = [float(v) for v in values]
    if not _active(group) or not values:
        return values
    buffer = torch.tensor(values, dtype=dtype, device=group_device(group))
    dist.all_reduce(buffer, op=_op(op), group=group)
    return buffer.tolist()


def gather_values(value: float, group=None) -> list[float]:
    """One number from every rank of `group`, in group rank order (one collective)."""
    if not _active(group):
        return [float(value)]
    device = group_device(group)
    mine = torch.tensor([float(value)], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [float(p) for p in torch.cat(parts).tolist()]


def gather_objects(obj, group=None) -> list:
    """A picklable object from every rank of `group`, in group rank order. torch pickles through
    a tensor on the current GPU under NCCL (set by `parallel.init_distributed`)."""
    if not _active(group):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s picklable object on every rank of `group` (torch pickles through a tensor on
    the current GPU under NCCL)."""
    if not _active(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group=None) -> None:
    """Waits for every rank of `group` (NCCL's barrier runs on the current GPU)."""
    if _active(group):
        dist.barrier(group=group)


def group_ranks(group=None) -> list[int]:
    """Global rank numbers of `group`, in group rank order."""
    if not dist.is_initialized():
        return [0]
    if group is None:
        return list(range(dist.get_world_size()))
    return list(dist.get_process_group_ranks(group))
