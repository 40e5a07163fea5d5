"""Runs the GPU code path on a CPU machine with the GPU's placement rules enforced.

The CPU tests run megatron-core through `cpu.py`, which turns every "cuda" request into the CPU:
there a tensor left on the CPU and a tensor "on the GPU" are the same thing, so a model that never
reaches the GPU, or a control value handed to an NCCL collective from the host, passes every CPU
test and stops a GPU run at its first step. This mode keeps the two apart. With
`NULLMOE_GPU_RULES=1` in the environment of a trainer or Megatron-LM entry process (read by
`parallel.init_distributed` and `cpu_megatron_lm.enable_for_megatron_lm`), or `enable()` called before anything is
built:

- `torch.cuda.is_available()` is True, so the code under test takes its GPU branches: no CPU
  initialisation, `precision=auto` is bf16, the model builder asks for "cuda" devices, collectives
  pick their device from an NCCL backend;
- every tensor lives on the emulated GPU except those the code puts on the host: a factory
  called without a device (as torch puts it on the CPU), `.cpu()`/`.to("cpu")` (copies), and what
  is computed from host tensors alone. Host storages are recorded until freed (so views and
  `.data` share their side, and a freed address is never mistaken later); "cuda" devices,
  `.cuda()` and `.to("cuda")` land on the emulated GPU, which reports `device` cuda:0,
  `is_cuda` True and `torch.cuda.*Tensor` types. Gradients, which autograd allocates out of
  Python's sight, are on the GPU, as their forward tensors are;
- the rules, each checked where a GPU would fail, raise `GpuRuleError` with the place:
  1. a module handed to megatron-core's `Float16Module` or `DistributedDataParallel` holds a
     parameter or buffer on the CPU (megatron-core moves nothing itself: the caller must
     `.cuda()` first, as Megatron-LM's `get_model` does);
  2. a tensor handed to a collective of a group that NCCL would serve is on the CPU ("No backend
     type associated with device type cpu"); groups made with `backend="gloo"` serve the CPU;
  3. an operation mixes a GPU tensor with a host tensor of one or more dimensions
     ("Expected all tensors to be on the same device"); copies, device moves and indexing with
     host indices may cross, as on a GPU;
  4. the ranks of a group enter different collectives (one skipped a collective the others
     entered: on a GPU they wait until the timeout). Each collective first compares what every
     rank of its group entered, so the place is named at the next collective.

The collectives really run, over gloo on the CPU: a run under this mode trains (with the GPU path's
initialisation, so not the weights of a CPU run). What it cannot see: CUDA kernels and their
numerics, memory, streams and overlap (every stream is the host's), NCCL's own limits (timeouts,
dtypes), Transformer Engine and torch.compile (off), host tensors made where Python cannot see (in
C++, or in data-loader worker processes: they count as on the GPU), collectives torch runs inside
its object collectives (it picks their device itself), and a rank that skips a collective the
others enter and then enters none (that hangs here as there, until the collective timeout).
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_nullmoe._mcore import cpu
from megatron_nullmoe.errors import NullMoEError

ENV = "NULLMOE_GPU_RULES"
_GPU = torch.device("cuda", 0)
_CPU = torch.device("cpu")
_STATE = {"enabled": False, "host": {}, "gloo_groups": set()}


class GpuRuleError(NullMoEError, RuntimeError):
    """The code under test did what a GPU run would fail at (see the module docstring)."""


def requested() -> bool:
    """Whether this process was asked to run under the GPU rules (`NULLMOE_GPU_RULES=1`)."""
    return os.environ.get(ENV, "") not in ("", "0")


def is_enabled() -> bool:
    return _STATE["enabled"]


# ------------------------------------------------------------------------------- marking
# The host side is what is marked: a storage made on the CPU by a Python-visible call (a factory
# without a device, `.cpu()`, an operation on host tensors) is recorded until it is freed (a
# finalizer on the storage). Everything else is on the emulated GPU, which is also where
# autograd's gradients (allocated in C++) belong: a gradient follows its forward tensor.
def _key(t: torch.Tensor):
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, meta)
        return None, None
    return (storage.data_ptr(), storage) if storage.nbytes() else (None, None)


def on_gpu(t: torch.Tensor) -> bool:
    """Whether `t` lives on the emulated GPU. Empty tensors count as on it: they carry no data
    to misplace."""
    key, _ = _key(t)
    return key is None or key not in _STATE["host"]


def _mark(t: torch.Tensor, gpu: bool) -> None:
    key, storage = _key(t)
    if key is None:
        return
    host = _STATE["host"]
    if gpu:
        host.pop(key, None)
    elif key not in host:
        host[key] = weakref.finalize(storage, host.pop, key, None)


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from (x for x in v if isinstance(x, torch.Tensor))


# Calls that may take tensors from both sides, as a GPU allows: copies between devices, indexing
# with host indices, moves.
_CROSSING = {torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
             torch.Tensor.index_put_, torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu,
             torch.Tensor.index_select, torch.Tensor.new_tensor, torch.tensor, torch.as_tensor,
             torch.Tensor.data.__set__, torch.Tensor.grad.__set__, torch.Tensor.set_,
             torch._has_compatible_shallow_copy_type, torch.Tensor.is_set_to}
_GETTERS = {torch.Tensor.device.__get__: lambda t: _GPU if on_gpu(t) else _CPU,
            torch.Tensor.is_cuda.__get__: on_gpu,
            torch.Tensor.is_cpu.__get__: lambda t: not on_gpu(t),
            torch.Tensor.get_device: lambda t: 0 if on_gpu(t) else -1}


def _target_device(func, args, kwargs):
    """The device a `.to(...)` call asks for, or None."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            return _GPU if on_gpu(a) else _CPU
        if isinstance(a, (torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool)):
            return a
    return None


class _EmulatedGpu(TorchFunctionMode):
    """Runs every torch call on the CPU while keeping the marks (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        getter = _GETTERS.get(func)
        if getter is not None:
            return getter(args[0])
        if func is torch.Tensor.cuda:
            t = args[0]
            if on_gpu(t):
                return t
            out = t.clone(memory_format=torch.preserve_format)
            _mark(out, True)
            return out
        if func is torch.Tensor.cpu:
            t = args[0]
            if not on_gpu(t):
                return t
            out = t.clone(memory_format=torch.preserve_format)
            _mark(out, False)
            return out
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if getattr(func, "__module__", "").startswith("torch.distributed"):
            # torch's collectives, also as called inside its object collectives (which pick
            # their buffers' device from the real backend): the public entry points are audited
            # by `_audited`, with the group's emulated backend
            return func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)  # "torch.FloatTensor": megatron-core's optimizer checks the name
            return name.replace("torch.", "torch.cuda.", 1) if on_gpu(args[0]) else name
        explicit = None
        if "device" in kwargs and kwargs["device"] is not None:
            explicit = cpu.is_cuda_device(kwargs["device"])
            kwargs["device"] = _CPU
        inputs = list(_tensors(args)) + list(_tensors(kwargs.values()))
        marked = [on_gpu(t) for t in inputs]
        if explicit is None and any(marked) and not all(marked) and func not in _CROSSING:
            host = [t for t, m in zip(inputs, marked) if not m and t.dim() > 0]
            if host:
                raise GpuRuleError(
                    f"{getattr(func, '__qualname__', func)} mixes tensors on the GPU with a CPU "
                    f"tensor of shape {tuple(host[0].shape)}: on a GPU this raises 'Expected all "
                    "tensors to be on the same device'")
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if "out" in kwargs or (name.endswith("_") and not name.endswith("__")):
            return out  # written in place: the storage keeps its device
        gpu = explicit if explicit is not None else any(marked)  # no tensor in: a CPU factory
        for t in _tensors([out] if isinstance(out, torch.Tensor) else
                          (out if isinstance(out, (list, tuple)) else [])):
            _mark(t, gpu)
        return out

    @staticmethod
    def _to(args, kwargs):
        t = args[0]
        target = _target_device(torch.Tensor.to, args, kwargs)
        rest = [a for a in args[1:] if not (isinstance(a, (torch.device, str, torch.Tensor))
                                            or (isinstance(a, int) and not isinstance(a, bool)))]
        kwargs.pop("device", None)
        if target is None or cpu.is_cuda_device(target) == on_gpu(t):
            out = t.to(*rest, **kwargs)
            if out is not t:
                _mark(out, on_gpu(t))
            return out
        kwargs["copy"] = True
        out = t.to(*rest, **kwargs)
        _mark(out, cpu.is_cuda_device(target))
        return out


# --------------------------------------------------------------------------- collectives
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                "reduce_scatter_tensor", "reduce_scatter", "all_to_all_single", "all_to_all",
                "reduce", "send", "recv", "gather", "scatter", "batch_isend_irecv")


def served_by_nccl(group) -> bool:
    """Whether NCCL would serve `group` on a GPU: every group but those made with "gloo"."""
    return group is None or group not in _STATE["gloo_groups"]


_POINT_TO_POINT = ("send", "recv", "batch_isend_irecv")  # pairs of ranks, not the whole group


def _group_of(name, fn, args, kwargs):
    if name == "batch_isend_irecv":
        return getattr(args[0][0], "group", None) if args and args[0] else None
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except TypeError:  # torch reports the call's own error
        return kwargs.get("group")
    return bound.arguments.get("group")


def _same_collective(name: str, group, tensors) -> None:
    """Rule 4: every rank of `group` enters the same collective. Each rank's (name, dtypes) is
    gathered over the group first (torch's object collective, unaudited), so a rank that skipped
    one is named at the next collective instead of pairing with the wrong one or hanging."""
    if group is dist.GroupMember.NON_GROUP_MEMBER or dist.get_world_size(group) < 2:
        return
    mine = f"{name}({', '.join(str(t.dtype).replace('torch.', '') for t in tensors)})"
    seen = [None] * dist.get_world_size(group)
    dist.distributed_c10d.all_gather_object(seen, mine, group=group)
    if len(set(seen)) > 1:
        ranks = dist.get_process_group_ranks(group) if group is not None else range(len(seen))
        entered = "; ".join(f"rank {r}: {what}" for r, what in zip(ranks, seen))
        raise GpuRuleError(
            f"the ranks of one group entered different collectives ({entered}): on a GPU the "
            "ranks wait for each other until the collective timeout. Every rank must enter the "
            "same collectives in the same order, whatever its pipeline stage holds")


def _audited(name: str, fn):
    @functools.wraps(fn)
    def collective(*args, **kwargs):
        group = _group_of(name, fn, args, kwargs)
        tensors = ([op.tensor for op in args[0]] if name == "batch_isend_irecv"
                   else list(_tensors(args)) + list(_tensors(kwargs.values())))
        if name not in _POINT_TO_POINT:
            _same_collective(name, group, tensors)
        if served_by_nccl(group):
            host = [t for t in tensors if not on_gpu(t)]
            if host:
                raise GpuRuleError(
                    f"torch.distributed.{name} on a group NCCL serves is handed a CPU tensor "
                    f"(shape {tuple(host[0].shape)}, {host[0].dtype}): on a GPU this raises 'No "
                    "backend type associated with device type cpu'. Put control values on "
                    "collectives.group_device(group)")
        return fn(*args, **kwargs)

    collective.__wrapped_by_gpu_rules__ = True
    return collective


def _new_group(fn):
    @functools.wraps(fn)
    def new_group(*args, **kwargs):
        backend = kwargs.get("backend")
        gloo = backend is not None and str(backend).lower() == "gloo"
        kwargs["backend"] = "gloo"  # the real transport here; NCCL's options do not apply
        kwargs.pop("pg_options", None)
        group = fn(*args, **kwargs)
        if gloo and group is not None:
            _STATE["gloo_groups"].add(group)
        return group

    return new_group


def _init_process_group(fn):
    @functools.wraps(fn)
    def init_process_group(*args, **kwargs):
        # NCCL's rules are audited; gloo moves the bytes
        if args:
            args = ("gloo", *args[1:])
        else:
            kwargs["backend"] = "gloo"
        for key in ("device_id", "pg_options"):
            kwargs.pop(key, None)
        return fn(*args, **kwargs)

    return init_process_group


def _get_backend(fn):
    @functools.wraps(fn)
    def get_backend(group=None):
        return "gloo" if group is not None and group in _STATE["gloo_groups"] else "nccl"

    return get_backend


# --------------------------------------------------------------------------------- audits
def audit_placement(module: torch.nn.Module, where: str) -> None:
    """Rule 1: every parameter and buffer of `module` on the (emulated) GPU."""
    left = [n for n, p in module.named_parameters() if not on_gpu(p)]
    left += [n for n, b in module.named_buffers() if b is not None and not on_gpu(b)]
    if left:
        shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
        raise GpuRuleError(
            f"{where} is handed a model with {len(left)} parameter(s)/buffer(s) still on the CPU: "
            f"{shown}. megatron-core does not move them; call model.cuda(torch.cuda."
            "current_device()) before wrapping, as Megatron-LM's get_model does")


def _audit_wrapper(cls, where: str, module_arg: int) -> None:
    init = cls.__init__
    if getattr(init, "__wrapped_by_gpu_rules__", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        module = kwargs.get("module", args[module_arg] if len(args) > module_arg else None)
        if isinstance(module, torch.nn.Module):
            audit_placement(module, where)
        init(self, *args, **kwargs)

    __init__.__wrapped_by_gpu_rules__ = True
    cls.__init__ = __init__


def _no_op(*args, **kwargs):
    return None


def enable() -> None:
    """Turns the mode on for this process (idempotent). Call it before torch.distributed and
    megatron-core's parallel state are set up and before anything is built."""
    if _STATE["enabled"]:
        return
    if torch.cuda.is_available():
        raise GpuRuleError(f"{ENV}=1 emulates a GPU on a machine without one; this machine has "
                           "CUDA: run on the GPU itself")
    cpu.patch_cuda_runtime()
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = _no_op
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    torch.cuda.reset_peak_memory_stats = _no_op
    torch.cuda.nccl.version = lambda: (0, 0, 0)  # torch's collective logger asks under "nccl"
    from torch import _dynamo

    _dynamo.config.disable = True  # megatron-core's jit_fuser: eager (no GPU to compile for)
    for name in _COLLECTIVES:
        setattr(dist, name, _audited(name, getattr(dist, name)))
    dist.new_group = _new_group(dist.new_group)
    dist.init_process_group = _init_process_group(dist.init_process_group)
    dist.get_backend = _get_backend(dist.get_backend)
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    _audit_wrapper(Float16Module, "megatron-core's Float16Module", 1)
    _audit_wrapper(DistributedDataParallel, "megatron-core's DistributedDataParallel", 2)
    mode = _EmulatedGpu()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)
