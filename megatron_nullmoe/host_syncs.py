"""Counts the operations that make the host wait for the device (device-to-host syncs).

On a GPU each of these blocks the CPU until the GPU has caught up: reading a value (`item`,
`tolist`, `int(t)`, `bool(t)`, `float(t)`), copying to the host (`cpu`, `to("cpu")`, `numpy`),
and ops whose output size depends on the data (`nonzero`, `masked_select`, boolean indexing,
`unique`, `repeat_interleave` with tensor repeats and no output size). On the hot path of a MoE
layer each one stalls the launch queue, so the dispatchers are written to need at most one per
dispatch (the split sizes a dynamic row count needs on the host).

`count_host_syncs()` counts them on any device, CPU included, where nothing actually waits: the
CPU suite checks the budget with it, and the GPU check sets it beside
`torch.cuda.set_sync_debug_mode`, which sees the real syncs. To count on the CPU what would wait
on a GPU it follows which tensors a GPU run would hold on the host: those made by a factory with
no device (or device="cpu"), copies made by `.cpu()`, and anything computed from host tensors
only. A read of a host tensor is not counted; a read of any other tensor is.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# op name -> why it waits for the device
SYNC_OPS = {
    "item": "reads a value", "tolist": "reads values", "__bool__": "reads a value",
    "__int__": "reads a value", "__float__": "reads a value", "__index__": "reads a value",
    "cpu": "copies to the host", "numpy": "copies to the host",
    "nonzero": "data-dependent size", "argwhere": "data-dependent size",
    "masked_select": "data-dependent size", "unique": "data-dependent size",
    "unique_consecutive": "data-dependent size",
}


def _is_sync(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", "")
    if name in SYNC_OPS:
        return name
    if name == "to":  # to the host: "cpu" by name, or the CPU from another device
        device = kwargs.get("device", args[1] if len(args) > 1 else None)
        if device == "cpu" or (isinstance(device, torch.device) and device.type == "cpu"
                               and args[0].device.type != "cpu"):
            return "to(cpu)"
    if name == "__getitem__" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
            return "boolean index"
    if name == "repeat_interleave" and kwargs.get("output_size") is None:
        repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
        if isinstance(repeats, torch.Tensor):
            return "repeat_interleave"
    return None


def _subject(args, kwargs):
    return args[0] if args else next(iter(kwargs.values()), None)


class HostSyncCounter(TorchFunctionMode):
    """Counts host syncs by op while active: `total`, and `by_op` (a Counter)."""

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()
        self._host: set[int] = set()  # ids of live tensors that a GPU run keeps on the host

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def _is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self._host

    def _mark_host(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self._host:
                self._host.add(id(t))
                weakref.finalize(t, self._host.discard, id(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = _is_sync(func, args, kwargs)
        subject = _subject(args, kwargs)
        if name is not None and not self._is_host(subject):
            self.by_op[name] += 1
        out = func(*args, **kwargs)
        device = kwargs.get("device")
        if tensors:
            # (on the CPU `.cpu()` returns its input itself, which stays what it was)
            host = all(self._is_host(t) for t in tensors) or (
                name in ("cpu", "to(cpu)") and out is not subject)
        else:  # a factory: the default device of a GPU run is the CPU
            host = device is None or device == "cpu"
        if host:
            self._mark_host(out)
        return out


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncCounter]:
    """with count_host_syncs() as syncs: ...; then syncs.total, syncs.by_op."""
    counter = HostSyncCounter()
    with counter:
        yield counter
