"""The checks of a run's configuration that need a running job, run once per run by `validate`.

`check` needs the world size (what only a running job knows); `check_device` what this machine
can run; `check_model` (run/model.py) what megatron-core and null experts would refuse when the
model is built. Each error names the recipe key and what would be valid. Not all checks are
here: each key and value is checked when the recipe is loaded (run/config.py `load_config`), and
the data kind against the model kind, the tokenizer, `checkpoint.init_from` and a resumed
checkpoint's identity when the trainer reaches them (train/loop.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_nullmoe import _mcore
from megatron_nullmoe.run.config import ConfigError, RunConfig
from megatron_nullmoe.train import faults


def check(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """Checks what only a running job knows (world size); returns (dp size, micro-batches)."""
    from megatron_nullmoe.run.model import check_pipeline

    p, d = cfg.parallel, cfg.data
    for name in ("tensor", "expert"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)}: give a size >= 1")
    check_pipeline(cfg)
    mp = p.tensor * p.pipeline
    if world_size % mp:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x "
                          f"parallel.pipeline = {mp}")
    dp = world_size // mp
    if (world_size // p.pipeline) % p.expert:
        raise ConfigError(f"parallel.expert={p.expert} must divide world size / pipeline = "
                          f"{world_size // p.pipeline} (experts spread over the data- and "
                          "tensor-parallel ranks; expert tensor parallelism is 1)")
    if cfg.model.num_experts % p.expert:
        raise ConfigError(f"model.num_experts={cfg.model.num_experts} is not divisible by "
                          f"parallel.expert={p.expert}")
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(f"data.global_batch_size={d.global_batch_size} is not a multiple of "
                          f"data.micro_batch_size x data-parallel size = {d.micro_batch_size} x {dp}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: keep at least 1")
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps}: train at least 1 step")
    if cfg.exit_after_steps is not None and cfg.exit_after_steps < 1:
        raise ConfigError(f"exit_after_steps={cfg.exit_after_steps}: give a number of steps >= 1, "
                          "or null to run to `steps`")
    try:
        faults.parse_signals(cfg.faults.exit_signals)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return dp, d.global_batch_size // (d.micro_batch_size * dp)


def check_device(cfg: RunConfig) -> None:
    """What this machine can run: tensor parallelism needs TE on GPU."""
    if cfg.parallel.tensor > 1 and not (torch.cuda.is_available() and _mcore.have_te()):
        raise ConfigError(
            f"parallel.tensor={cfg.parallel.tensor} needs a GPU with Transformer Engine: "
            "megatron-core trains MoE layers with tensor parallelism only together with sequence "
            "parallelism, and its non-TE norms refuse sequence parallelism; use parallel.tensor=1")


def run_dtype(cfg: RunConfig) -> torch.dtype:
    check_device(cfg)
    gpu = torch.cuda.is_available()
    if cfg.precision == "bf16" and not gpu:
        raise ConfigError("precision=bf16 needs a GPU; on CPU use precision=fp32 (or auto)")
    if cfg.precision == "auto":
        return torch.bfloat16 if gpu else torch.float32
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def validate(cfg: RunConfig, world_size: int) -> tuple[int, int, torch.dtype]:
    """The configuration checks made before anything is built, once: sizes against the
    world size, what this machine can run, the run folder, and the decoder's megatron-core config
    with null experts. Returns (data-parallel size, micro-batches per step, dtype)."""
    from megatron_nullmoe.run.model import check_model

    dp, micro = check(cfg, world_size)
    dtype = run_dtype(cfg)
    check_model(cfg, dtype)
    run_dir = Path(cfg.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"dir={cfg.dir!r} is a file; give a folder for the run")
    return dp, micro, dtype
