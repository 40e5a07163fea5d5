"""What a user points the export, generate and evaluate commands at, resolved and loaded: the one
place that dispatches over the three kinds of source.

A source is one of:
- a run folder of the trainer (config.yaml and checkpoints/): its newest complete checkpoint;
- a checkpoint folder (iter_NNNNNNN, with nullmoe.json): that checkpoint, with the config.yaml
  of the run folder above it (or `config` given) (these two: run/source.py);
- an export folder (config.json with model_type "nullmoe"): read by transformers directly;
- with `megatron_lm=True` (the export command), a Megatron-LM checkpoint written through the entry
  scripts (a --save folder or one iter_NNNNNNN folder): see megatron_lm/checkpoint.py.

`load_megatron` builds the run's megatron-core model on one CPU rank (every parallel size 1,
fp32) and loads the checkpoint's weights into it, whatever layout they were saved with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from megatron_nullmoe.run.checkpoint import MANIFEST
from megatron_nullmoe.run.source import Source, SourceError, load_run_model, run_source

__all__ = ["KINDS", "Source", "SourceError", "hf_from_megatron", "is_export", "is_vlm_export",
           "load_hf", "load_megatron", "resolve"]

KINDS = ("a run folder (config.yaml and checkpoints/)", "a checkpoint folder (iter_NNNNNNN with "
         f"{MANIFEST})", "an export folder (config.json and export.json)")


def is_export(path: Path) -> bool:
    """A folder this project's export wrote (NullMoEForCausalLM, or --format mixtral, qwen3_moe
    or olmoe)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError):
        return False
    return model_type == "nullmoe" or (model_type in ("mixtral", "qwen3_moe", "olmoe")
                                       and (path / "export.json").is_file())


def resolve(path: str | Path, config: Optional[str] = None,
            tokenizer: Optional[str] = None, megatron_lm: bool = False) -> Source:
    """The source at `path` (see the module doc); SourceError names what is wrong.
    `megatron_lm`: also a Megatron-LM checkpoint (kind "megatron-lm"; only the export reads it)."""
    from megatron_nullmoe.megatron_lm.checkpoint import (is_megatron_lm_checkpoint,
                                                         megatron_lm_source)

    p = Path(path)
    if not p.exists():
        raise SourceError(f"{str(p)!r} does not exist; give {', '.join(KINDS[:-1])} or {KINDS[-1]}")
    if p.is_dir() and is_export(p):
        return Source("export", p)
    if p.is_dir() and (p / "config.json").is_file():
        raise SourceError(f"{p} holds a config.json that is not a nullmoe export (model_type is not "
                          "'nullmoe' and no export.json): export it from its run folder or checkpoint")
    found = run_source(p, config, tokenizer)
    if found is not None:
        return found
    if is_megatron_lm_checkpoint(p):
        if not megatron_lm:
            raise SourceError(f"{p} is a Megatron-LM checkpoint: export it first (python -m "
                              f"megatron_nullmoe.export hf {p} --out DIR), then give the export")
        if config is not None:
            raise SourceError(f"--config {config}: a Megatron-LM checkpoint carries its own "
                              "training arguments; leave --config out")
        return megatron_lm_source(p, tokenizer)
    raise SourceError(f"{p} is none of: {'; '.join(KINDS)}")


def load_megatron(source: Source):
    """The run's megatron-core model (GPT or LLaVA), one CPU rank, fp32, eval mode, with the
    checkpoint's weights."""
    if source.kind == "megatron-lm":
        from megatron_nullmoe.megatron_lm.rebuild import load_megatron_lm

        return load_megatron_lm(source.path, source.tokenizer)[0]
    if source.kind != "checkpoint":
        raise SourceError(f"{source.path} is an export; the megatron-core model needs a run "
                          "folder or checkpoint")
    return load_run_model(source)


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of an export folder, through transformers' Auto classes (eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = json.loads((Path(path) / "config.json").read_text())
    auto_map = config.get("auto_map")
    if auto_map:
        # the folder's own class: once a class of a remote module of the same name is registered,
        # transformers 5's Auto mapping reuses it for a later folder (a GPT and a VLM export, each
        # in a folder called `hf`, would load as one class)
        key = "AutoModelForImageTextToText" if config.get("vision_config") else "AutoModelForCausalLM"
        model = get_class_from_dynamic_module(auto_map[key], str(path)).from_pretrained(
            str(path), dtype=dtype)
    else:  # --format mixtral, qwen3_moe or olmoe: stock transformers
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    return model.eval(), tokenizer


def is_vlm_export(path: Path) -> bool:
    """An export folder of a VLM (its config has a vision_config)."""
    try:
        return bool(json.loads((Path(path) / "config.json").read_text()).get("vision_config"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def hf_from_megatron(model, tokenizer_model: Path):
    """(NullMoEForCausalLM, tokenizer) built in memory from a megatron-core GPT: the export
    without the folder (the same classes and weights an export writes; the config's token ids
    the tokenizer's own). The tokenizer: NullMoETokenizer for a sentencepiece model,
    transformers' PreTrainedTokenizerFast for a tokenizer.json."""
    from megatron_nullmoe.export.hf import hf_config, hf_state_dict
    from megatron_nullmoe.export.hf_code.configuration_nullmoe import NullMoEConfig
    from megatron_nullmoe.export.hf_code.modeling_nullmoe import NullMoEForCausalLM
    from megatron_nullmoe.export.hf_code.tokenization_nullmoe import NullMoETokenizer
    from megatron_nullmoe.export.vlm import hf_vlm_from_megatron, is_llava
    from megatron_nullmoe.run.tokenizer import Tokenizer, load_tokenizer

    if is_llava(model):
        return hf_vlm_from_megatron(model)[0].eval(), NullMoETokenizer(str(tokenizer_model))
    tok = load_tokenizer(tokenizer_model)
    config = NullMoEConfig(**hf_config(model), bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)
    hf_model = NullMoEForCausalLM(config)
    missing, unexpected = hf_model.load_state_dict(hf_state_dict(model), strict=False)
    if missing or unexpected:
        raise SourceError(f"the converted weights do not fit NullMoEForCausalLM: missing "
                          f"{missing[:4]}, unexpected {unexpected[:4]}")
    if isinstance(tok, Tokenizer):
        return hf_model.eval(), NullMoETokenizer(str(tok.path))
    from transformers import PreTrainedTokenizerFast

    return hf_model.eval(), PreTrainedTokenizerFast(tokenizer_object=tok.tok)
