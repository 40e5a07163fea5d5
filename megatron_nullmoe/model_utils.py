"""Model-level helpers: find null-expert routers and dispatchers, read and reduce their stats.

Everything is stored on the modules; these functions only walk the model. Process groups are
passed in: `group` is the set of ranks whose tokens differ (data x context parallel, plus tensor
parallel under sequence parallelism). With group=None the numbers are this rank's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_nullmoe.dispatch import DispatchStats
from megatron_nullmoe.router import NullExpertRouter
from megatron_nullmoe.routing.stats import RoutingStats


def null_routers(model: torch.nn.Module) -> list[NullExpertRouter]:
    """All null-expert routers of a model (or list of model chunks), in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for c in chunks for m in c.modules() if isinstance(m, NullExpertRouter)]


def _dispatchers(model):
    """Null-aware dispatchers (they carry DispatchStats) of all MoE layers, in module order."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    found = [getattr(m, "token_dispatcher", None) for c in chunks for m in c.modules()]
    return [d for d in found if isinstance(getattr(d, "stats", None), DispatchStats)]


def set_vision_mask(
    model, vision_mask_BS: Optional[torch.Tensor], pad_mask_BS: Optional[torch.Tensor] = None
) -> None:
    """Hands every router a [batch, seq] bool mask (True = vision token) for the next forwards,
    and optionally a [batch, seq] padding mask (True = padding) whose tokens stats leave out.

    Used only for statistics: the router itself never sees modality, and padding given here
    is still routed (models such as LLaVA do not pass a padding mask to MoE layers). None clears.
    """
    for router in null_routers(model):
        router.vision_mask = vision_mask_BS
        router.stats_pad_mask = pad_mask_BS


def _reduce(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    if group is None or not dist.is_initialized() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    dist.all_reduce(flat, group=group)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def routing_stats(model, group=None, reset: bool = False) -> dict:
    """Routing statistics per MoE layer (key: layer number) and summed over layers ("all").

    Counts are summed over `group` before ratios are taken, so results are exact globally.
    Every rank of `group` must call this (it is a collective when group is given).
    """
    per_layer = {}
    for i, router in enumerate(null_routers(model)):
        stats = router.routing_stats(reset=reset)
        if stats is None:
            continue
        keys = sorted(stats.counts)
        reduced = _reduce([stats.counts[k] for k in keys], group)
        key = router.layer_number if router.layer_number is not None else i
        per_layer[key] = RoutingStats(stats.topk, dict(zip(keys, reduced)))
    out: dict = dict(per_layer)
    if per_layer:
        total = None
        for stats in per_layer.values():
            total = stats if total is None else total + stats
        out["all"] = total
    return out


def dispatch_stats(model, group=None, reset: bool = False) -> DispatchStats:
    """Rows and bytes moved by all null-aware dispatchers, summed over layers (and `group`)."""
    total = DispatchStats()
    dispatchers = _dispatchers(model)
    for d in dispatchers:
        for name, value in d.stats.as_dict().items():
            setattr(total, name, getattr(total, name) + value)
        if reset:
            d.stats.reset()
    names = [n for n in total.as_dict() if n != "steps"]
    reduced = _reduce([torch.tensor([float(getattr(total, n)) for n in names])], group)[0]
    for n, v in zip(names, reduced.tolist()):
        setattr(total, n, int(round(v)))
    return total


def update_null_budget(model, group=None) -> list[Optional[float]]:
    """One compute-budget control step for every router; call once per optimizer step."""
    return [router.update_budget(group) for router in null_routers(model)]
