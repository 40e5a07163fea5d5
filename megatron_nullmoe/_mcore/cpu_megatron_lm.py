"""Lets Megatron-LM's own training loop (`megatron.training.pretrain`) run on a CPU-only machine.

The entry scripts in launch/megatron_lm/ call `enable_for_megatron_lm()` before `pretrain()`.
It first enables megatron-core's CPU layer (`_mcore.cpu.enable`), then adapts the training-side
CUDA assumptions of Megatron-LM. Each adaptation is applied only where the code it works around
is present (found by attribute, not by version), so the same function serves core_v0.16.1 to
core_v0.19.x; the names of those applied are returned for the one log line the scripts print.
Megatron-LM itself is never edited; this only rebinds names in its modules, in this process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import subprocess
import sys
import sysconfig

import torch

from megatron_nullmoe._mcore import cpu


def enable_for_megatron_lm() -> list[str]:
    """Adapts Megatron-LM's training code to CPU when CUDA is absent; returns what was adapted
    (empty with CUDA: the GPU path is never touched). Idempotent. Needs Megatron-LM importable."""
    from megatron_nullmoe._mcore import gpu_rules

    if _ADAPTED or (torch.cuda.is_available() and not gpu_rules.is_enabled()):
        return list(_ADAPTED)
    if gpu_rules.requested():
        # Megatron-LM's GPU path itself, with the GPU's rules enforced (_mcore/gpu_rules.py):
        # only what no GPU-path code would notice is adapted (kernels, the dataset helper).
        gpu_rules.enable()
        adaptations = (("the GPU path under emulated GPU rules (NULLMOE_GPU_RULES)",
                        lambda initialize, training: True),
                       ("no fused CUDA kernels", _no_fused_kernels),
                       ("dataset helper built for this interpreter",
                        _dataset_helper_for_this_python))
    else:
        cpu.enable()
        adaptations = (
            ("initialize_megatron(allow_no_cuda=True)", _allow_no_cuda),
            ("model-parallel groups and seeds without a GPU", _one_device_for_setup),
            ("no fused CUDA kernels", _no_fused_kernels),
            ("CUDA RNG state save/restore as no-ops", _no_cuda_rng_state),
            ("data iterators built without drawing from the restored CPU RNG",
             _iterators_keep_rng),
            ("dataset helper built for this interpreter", _dataset_helper_for_this_python),
        )
    from megatron.training import initialize, training

    for name, adapt in adaptations:
        if adapt(initialize, training):
            _ADAPTED.append(name)
    return list(_ADAPTED)


_ADAPTED: list[str] = []


def _allow_no_cuda(initialize, training) -> bool:
    # pretrain() calls initialize_megatron() without allow_no_cuda, which then asserts CUDA.
    fn = getattr(training, "initialize_megatron", None)
    if fn is None or "allow_no_cuda" not in inspect.signature(fn).parameters:
        return False
    training.initialize_megatron = functools.partial(fn, allow_no_cuda=True)
    return True


@contextlib.contextmanager
def _one_device():
    count = torch.cuda.device_count
    torch.cuda.device_count = lambda: 1
    try:
        yield
    finally:
        torch.cuda.device_count = count


def _one_device_for_setup(initialize, training) -> bool:
    # With torch.cuda.device_count() == 0, _initialize_distributed skips the model-parallel
    # groups (TP/PP/EP/DP) and _set_random_seed skips seeding the model-parallel RNG tracker
    # (dropout and init fork it). Both run as if there were one device; the CPU layer maps
    # that device to the CPU (set_device is a no-op, the tracker lives on the CPU generator).
    done = False
    for name in ("_initialize_distributed", "_set_random_seed"):
        fn = getattr(initialize, name, None)
        if fn is None:
            continue

        @functools.wraps(fn)
        def as_one_device(*args, _fn=fn, **kwargs):
            with _one_device():
                return _fn(*args, **kwargs)

        setattr(initialize, name, as_one_device)
        done = True
    return done


def _no_fused_kernels(initialize, training) -> bool:
    # Older tags build megatron.legacy.fused_kernels (CUDA-only) at start-up; without CUDA_HOME
    # the build fails. Nothing on CPU uses them.
    kernels = getattr(initialize, "fused_kernels", None)
    if kernels is None or not hasattr(kernels, "load"):
        return False
    kernels.load = lambda *args, **kwargs: None
    return True


def _no_cuda_rng_state(initialize, training) -> bool:
    # Checkpoint save/load and the rerun state machine store torch.cuda.get_rng_state() beside
    # torch.get_rng_state(). On CPU every random draw comes from the CPU generator, which they
    # already save and restore (and the model-parallel tracker's states with it), so the CUDA
    # slot holds an empty state and restoring it does nothing.
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    torch.cuda.set_rng_state = lambda *args, **kwargs: None
    return True


def _iterators_keep_rng(initialize, training) -> bool:
    # pretrain() restores the checkpoint's RNG states, then builds the data iterators; each
    # DataLoader iterator draws its base seed from the default (CPU) generator. On GPU dropout
    # draws from the restored CUDA generator and never sees this; on CPU it draws from the CPU
    # one, so a resumed run would continue from a shifted state (the first resumed step then
    # differs from an uninterrupted run's). The build runs on a forked CPU generator instead.
    fn = getattr(training, "build_train_valid_test_data_iterators", None)
    if fn is None:
        return False

    @functools.wraps(fn)
    def build(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)

    training.build_train_valid_test_data_iterators = build
    return True


def _dataset_helper_for_this_python(initialize, training) -> bool:
    # megatron/core/datasets/Makefile builds its C++ helper with the first `python3` and
    # `python3-config` on PATH. Under a venv's torchrun that may be another interpreter: one
    # without pybind11, or another version, whose module suffix this one cannot import. The same
    # make, with the include paths and suffix of this interpreter.
    from megatron.core.datasets import utils

    if not hasattr(utils, "compile_helpers"):
        return False

    def compile_helpers():
        try:
            import pybind11
        except ImportError:
            sys.exit("Megatron-LM's dataset helper needs pybind11: pip install pybind11")
        folder = os.path.dirname(os.path.abspath(utils.__file__))
        flags = f"-I{sysconfig.get_paths()['include']} -I{pybind11.get_include()}"
        make = ["make", "-C", folder, f"LIBEXT={sysconfig.get_config_var('EXT_SUFFIX')}",
                f"CPPFLAGS={flags}"]
        if subprocess.run(make).returncode != 0:
            sys.exit("failed to compile Megatron-LM's dataset helper (megatron/core/datasets)")

    utils.compile_helpers = compile_helpers
    return True
