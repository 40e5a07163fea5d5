"""Lets megatron-core (CUDA-first) run on a CPU-only machine, for the tests and the CPU demo.

It holds the CPU-only patches of torch and megatron-core (Megatron-LM's are in
`cpu_megatron_lm.py`; the patches that also apply on GPU are `_mcore`'s `te_general_gemm`
stand-in and the rebinding of Megatron-LM's loop functions in `megatron_lm.hooks`). It is active
only after `enable()` is called and only when CUDA is absent (or `force=True`); it is never used
on the GPU path. The null-expert
router and dispatchers do not need it: they use their input's device and take process groups as
arguments. What megatron-core itself needs on CPU:

- `device="cuda"` literals, `torch.cuda.current_device()` and `Tensor.cuda()` in module code:
  a TorchFunctionMode rewrites CUDA devices to CPU and makes `.cuda()` a no-op;
- `torch.cuda.Stream/Event/synchronize` (the alltoall dispatcher makes a stream in __init__):
  no-op stand-ins;
- the CUDA RNG tracker (weight init and dropout fork it): a tracker on the CPU generator.

`gpu_rules.py` reuses the runtime stand-ins to run the GPU code path here with the GPU's
placement rules enforced (the test harness for what this layer would hide).

Differences between megatron-core releases are not handled here but in `megatron_nullmoe._mcore`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_STATE = {"enabled": False, "mode": None}
_CPU = torch.device("cpu")


def is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    """Stand-in for torch.cuda.Stream/Event on CPU: every operation is already synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Megatron's named RNG streams, kept on the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def enable(force: bool = False) -> bool:
    """Activates the CPU compatibility layer when CUDA is absent; returns whether it is active.

    Idempotent. Call it before building megatron-core modules (and before
    `model_parallel_cuda_manual_seed`, which then seeds the CPU tracker).
    """
    if _STATE["enabled"]:
        return True
    if torch.cuda.is_available() and not force:
        return False
    patch_cuda_runtime()
    mode = _CudaToCpu()
    mode.__enter__()
    _STATE.update(enabled=True, mode=mode)
    return True


def patch_cuda_runtime() -> None:
    """What megatron-core calls of the CUDA runtime, as host stand-ins: device index 0, streams and
    events that are already synchronous, seeds and memory counters, the RNG tracker on the CPU
    generator, gradient clipping on any device. Shared with `gpu_rules`, which emulates a GPU on
    top of it. Idempotent."""
    if _STATE.get("runtime"):
        return
    _STATE["runtime"] = True
    _cpu_grad_clipping()
    torch.cuda.current_device = lambda: 0
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _NoStream
    torch.cuda.Event = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.default_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.empty_cache = lambda *a, **k: None
    _install_rng_tracker()


def _cpu_grad_clipping() -> None:
    """megatron-core's clip_grad_by_total_norm_fp32 asserts `grad.type() ==
    'torch.cuda.FloatTensor'`; the same scaling (the norm is computed elsewhere) on any device."""
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
