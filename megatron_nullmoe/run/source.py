"""A trained model's source, as the commands that read runs see it; the trainer's runs read as one.

`Source` is the record every kind of source resolves to (a trainer's checkpoint here; a
Megatron-LM checkpoint in megatron_lm/checkpoint.py; an export folder in export/source.py, which
dispatches over the three). This module reads the trainer's own:

- a run folder (config.yaml and checkpoints/): its newest complete checkpoint;
- a checkpoint folder (iter_NNNNNNN, with nullmoe.json): that checkpoint, with the config.yaml
  of the run folder above it (or `config` given);

and builds its megatron-core model on one CPU rank (every parallel size 1, fp32) with the
checkpoint's weights, whatever layout they were saved with.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_nullmoe.errors import NullMoEError
from megatron_nullmoe.run.checkpoint import (MANIFEST, CheckpointError, newest_checkpoint,
                                             read_manifest)
from megatron_nullmoe.run.config import ConfigError, RunConfig, load_run_config


class SourceError(NullMoEError, ValueError):
    """A source that is missing, not one of the three kinds, or incomplete."""


@dataclass(frozen=True)
class Source:
    kind: str  # "checkpoint", "megatron-lm" or "export"
    path: Path  # the checkpoint folder, or the export folder
    cfg: Optional[RunConfig] = None  # the run's config (checkpoints only)
    tokenizer: Optional[Path] = None  # a .model or tokenizer.json (checkpoints only)
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


def run_source(p: Path, config: Optional[str] = None,
               tokenizer: Optional[str] = None) -> Optional[Source]:
    """The Source (kind "checkpoint") of a run or checkpoint folder of the trainer, None when `p`
    is neither (another kind, for the caller to try); SourceError names what is wrong."""
    if p.is_dir() and (p / MANIFEST).is_file():
        ckpt, run_dir = p, p.parent.parent
    elif p.is_dir() and (p / "config.yaml").is_file():
        run_dir = p
        cfg = _config(config or p / "config.yaml")
        ckpt = _latest(Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else p / "checkpoints", p)
    elif p.is_dir() and ((p / "latest").is_file() or any(p.glob(f"iter_*/{MANIFEST}"))):
        ckpt, run_dir = _latest(p, p), p.parent
    else:
        return None
    cfg = _config(config or run_dir / "config.yaml", ckpt)
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError as err:
        raise SourceError(str(err)) from None
    identity = manifest.get("identity") or {}
    return Source("checkpoint", ckpt, cfg, _tokenizer(tokenizer, cfg, run_dir),
                  int(manifest.get("step", 0)), identity.get("vocab_size"))


def _config(path: Path | str, ckpt: Optional[Path] = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        where = f" for checkpoint {ckpt}" if ckpt else ""
        raise SourceError(f"no run config{where}: {path} does not exist (give --config RUN/config.yaml)")
    try:
        return load_run_config(path)
    except ConfigError as err:
        raise SourceError(f"run config {path}: {err}") from None


def _latest(ckpt_dir: Path, run_dir: Path) -> Path:
    found = newest_checkpoint(ckpt_dir)
    if found is None:
        raise SourceError(f"{run_dir} has no complete checkpoint in {ckpt_dir} (a run writes one "
                          "at checkpoint.save_every steps and at its end)")
    return found


def _tokenizer(given: Optional[str], cfg: RunConfig, run_dir: Path) -> Path:
    """The run folder's own copy first (tokenizer.json, else tokenizer.model: what the trainer's
    `save` wrote), then the recipe's path."""
    if given is not None:
        if not Path(given).is_file():
            raise SourceError(f"--tokenizer {given!r} does not exist")
        return Path(given)
    tried = [run_dir / "tokenizer.json", run_dir / "tokenizer.model", cfg.tokenizer_path]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise SourceError(f"no tokenizer found for {run_dir}: tried {', '.join(map(str, tried))}; "
                      "give --tokenizer PATH (the run's sentencepiece .model or tokenizer.json)")


def load_run_model(source: Source):
    """The run's megatron-core model (GPT or LLaVA) of a "checkpoint" source, one CPU rank, fp32,
    eval mode, with the checkpoint's weights."""
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.run.checkpoint import load_model_weights
    from megatron_nullmoe.run.config import Parallel
    from megatron_nullmoe.run.model import build_model
    from megatron_nullmoe.run.tokenizer import load_tokenizer

    single_process()
    cfg = dataclasses.replace(source.cfg, parallel=Parallel(), precision="fp32")
    vocab = source.vocab_size or load_tokenizer(source.tokenizer).vocab_size
    model, _ = build_model(cfg, vocab, ProcessGroupCollection.use_mpu_process_groups(),
                           torch.float32, use_te=False)
    try:
        load_model_weights(source.path, model)
    except CheckpointError as err:
        raise SourceError(str(err)) from None
    return model.eval()
