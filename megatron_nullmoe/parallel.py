"""Process-group set-up: torch.distributed (NCCL on GPU, gloo on CPU) and megatron-core's
parallel state, the same way for tests, benchmarks and training."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (bind to 0, outgoing connections)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port that binds now, drawn at random below the kernel's ephemeral range.

    A port from bind(("", 0)) is free only until the socket closes, and it lies in the range
    the kernel keeps handing out: to the next caller of bind(0) and to every outgoing
    connection (gloo opens one per pair of ranks), so concurrent runs collided on it
    (EADDRINUSE). Below that range only an explicit bind takes a port, and a random draw from
    thousands, from the OS's entropy (not the seeded `random`), makes two callers meet rarely.
    """
    import random

    rng = random.SystemRandom()
    high = _ephemeral_low()
    low = max(1024, min(20000, high - 4096))
    for _ in range(64):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the range below is full: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(rank=None, world_size=None, backend=None, timeout_s: int = 300) -> str:
    """Initialises torch.distributed from arguments or torchrun's environment; returns backend.

    On CPU it enables the CPU compatibility layer first (megatron-core is CUDA-first); with
    `NULLMOE_GPU_RULES=1` it runs the GPU path on the CPU with the GPU's rules enforced instead
    (`_mcore.gpu_rules`: NCCL's rules, gloo's transport). A single process that no launcher gave
    a MASTER_PORT takes a free port, so two runs on one machine do not collide on a fixed one.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # Several ranks must agree on one port, which only a launcher can tell them.
        os.environ["MASTER_PORT"] = str(free_port()) if world_size == 1 else "29500"
    from megatron_nullmoe._mcore import gpu_rules

    if gpu_rules.requested():
        gpu_rules.enable()  # the GPU's rules, with gloo moving the bytes
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":
        from megatron_nullmoe._mcore import cpu as cpu_compat

        cpu_compat.enable()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
    return backend


def init_model_parallel(tp: int = 1, ep: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """megatron-core parallel state plus its named RNG streams."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    if world % (tp * pp) != 0 or (world // pp) % ep != 0:
        raise ValueError(
            f"world size {world} does not split into tensor={tp} x pipeline={pp} with expert={ep} "
            f"(need world % (tp*pp) == 0 and (world/pp) % ep == 0; experts are not tensor-split)"
        )
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,  # null experts refuse expert-TP (config.check)
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
