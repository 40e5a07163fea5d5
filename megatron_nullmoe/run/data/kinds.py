"""data.kind -> the builder of its loader: one data-parallel rank's view of a run's data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from megatron_nullmoe.run.config import ConfigError, RunConfig
from megatron_nullmoe.run.data import DataSource

if TYPE_CHECKING:
    from megatron_nullmoe.run.tokenizer import Tokenizer


def _energon(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    d = cfg.data
    if cfg.model.kind != "vlm":
        raise ConfigError("data.kind=energon holds image+caption samples: use model.kind=vlm "
                          "(or data.kind=jsonl for a GPT)")
    from megatron_nullmoe.run.data.energon import EnergonData
    from megatron_nullmoe.run.tokenizer import BOS, EOS, PAD

    # caption rows are padded and masked with the project's ids (run/data/energon.py, and the
    # VLM export's processor): a tokenizer with other special ids would be read wrong
    have = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
    if have != (PAD, BOS, EOS):
        raise ConfigError(f"data.kind=energon needs a tokenizer with pad/bos/eos ids "
                          f"{(PAD, BOS, EOS)} (the project's sentencepiece layout); "
                          f"{tokenizer.path} has {have}")
    return EnergonData(d.path, tokenizer, d.seq_length, cfg.model.vision.image_size,
                       cfg.image_tokens, d.micro_batch_size, dp_rank, dp_size, cfg.seed,
                       d.num_workers, d.shuffle_buffer_size)


def _text_only(cfg: RunConfig) -> None:
    if cfg.model.kind != "gpt":
        raise ConfigError(f"data.kind={cfg.data.kind} is text only: use model.kind=gpt")


def _indexed(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    d = cfg.data
    _text_only(cfg)
    from megatron_nullmoe.run.data.indexed import IndexedData

    return IndexedData(
        d.path, d.valid_path, tokenizer, d.seq_length, d.micro_batch_size, dp_rank, dp_size,
        cfg.seed, train_samples=cfg.steps * d.global_batch_size,
        valid_samples=cfg.logging.eval_steps * d.micro_batch_size * dp_size,
        cache_dir=Path(cfg.dir) / "data_cache")


def _jsonl(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    d = cfg.data
    _text_only(cfg)
    from megatron_nullmoe.run.data.text import JsonlData

    return JsonlData(d.path, d.valid_path, tokenizer, d.seq_length, d.micro_batch_size, dp_rank,
                     dp_size, cfg.seed)


# data.kind -> the builder of its loader (one data-parallel rank's view); each refuses the model kind
# it cannot feed and imports only its own loader. run/config.py's Data.kind choices name these.
DATA_KINDS = {"energon": _energon, "jsonl": _jsonl, "indexed": _indexed}


def build_data(cfg: RunConfig, tokenizer: Tokenizer, dp_rank: int, dp_size: int) -> DataSource:
    build = DATA_KINDS.get(cfg.data.kind)
    if build is None:
        raise ConfigError(f"data.kind={cfg.data.kind!r} is not valid: one of "
                          f"{', '.join(DATA_KINDS)}")
    return build(cfg, tokenizer, dp_rank, dp_size)
