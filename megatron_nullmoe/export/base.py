"""What every kind of source shares: the Source record, its error, and the one-rank process group
the megatron-core models are built in (source.py dispatches over the kinds; megatron_lm.py is one)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_nullmoe.run.config import RunConfig


class SourceError(ValueError):
    """A source that is missing, not one of the three kinds, or incomplete."""


@dataclass(frozen=True)
class Source:
    kind: str  # "checkpoint", "megatron-lm" or "export"
    path: Path  # the checkpoint folder, or the export folder
    cfg: Optional[RunConfig] = None  # the run's config (checkpoints only)
    tokenizer: Optional[Path] = None  # the sentencepiece model (checkpoints only)
    step: Optional[int] = None
    vocab_size: Optional[int] = None


def single_process() -> None:
    """A one-rank gloo group and megatron-core's parallel state, unless the caller has them."""
    import torch.distributed as dist

    from megatron_nullmoe import parallel

    if not dist.is_initialized():
        if "MASTER_PORT" not in os.environ or "RANK" not in os.environ:
            os.environ["MASTER_PORT"] = str(parallel.free_port())
        parallel.init_distributed(rank=0, world_size=1, backend="gloo")
    parallel.init_model_parallel(1, 1, 1)
