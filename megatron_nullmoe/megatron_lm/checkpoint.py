"""A Megatron-LM checkpoint, written through the project's entry scripts: finding it, checking its
format, and reading its saved args, its model weights and its tokenizer.

    SAVE/latest_checkpointed_iteration.txt   the newest iteration (or "release")
    SAVE/iter_0000100/                       torch_dist: metadata.json, .metadata, *.distcp,
                                             and common.pt up to megatron-core 0.18 (from 0.19
                                             the common state is stored inside the .distcp files)

Megatron-LM stores the training arguments with every checkpoint (the common state's "args", an
argparse.Namespace; our --num-null-experts flags are in it too); `megatron_lm/rebuild.py` builds
the entry script's model from them on one CPU rank, and `load_weights` loads only the model
weights into it, whatever tensor, expert or pipeline parallel layout they were saved with
(dist_checkpointing reshards).

Checkpoints written with Transformer Engine layers load too: megatron-core's local spec stores the
pre-MLP norm of a MoE layer as `mlp.linear_fc1.layer_norm_weight` where the TE spec stores
`pre_mlp_layernorm.weight`, so each weight the model asks for is looked up under its TE/local
alias when the checkpoint lacks its own name (`ALIASES`). Every model weight in the checkpoint
must be used and every weight of the model found, or the load is refused with the names.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_nullmoe.run.source import Source, SourceError

TRACKER = "latest_checkpointed_iteration.txt"
ITERATION = re.compile(r"iter_(\d{7})")
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# Prefixes of a GPTModel's weights among a Megatron-LM checkpoint's keys (the rest is optimizer,
# RNG and rerun state).
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
# The same weight under megatron-core's local-spec name and its Transformer Engine name.
ALIASES = (("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
           ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
           ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
           ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"))


class MegatronLMCheckpointError(SourceError):
    """A Megatron-LM checkpoint that is missing, incomplete or corrupt, or whose model cannot be
    rebuilt on one CPU rank (the message names the setting)."""


# ----------------------------------------------------------------------------- finding it
def _is_iteration_folder(p: Path) -> bool:
    return bool(ITERATION.fullmatch(p.name)) or p.name == "release"


def _ours(p: Path) -> bool:
    """An iteration folder of this project's trainer (its manifest, or its per-rank extras)."""
    from megatron_nullmoe.run.checkpoint import MANIFEST

    return (p / MANIFEST).is_file() or (p / "extra").is_dir()


def is_megatron_lm_checkpoint(path: str | Path) -> bool:
    """A Megatron-LM --save folder (with latest_checkpointed_iteration.txt) or one of its
    iteration folders (iter_NNNNNNN or release, holding checkpoint files). Incomplete ones
    count: `load_megatron_lm` then says what is missing."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / TRACKER).is_file():
        return True
    if not _is_iteration_folder(p) or _ours(p):
        return False
    return any((p / name).exists() for name in ("metadata.json", "common.pt", ".metadata")) or \
        any(p.glob("*.distcp")) or any(p.glob("mp_rank_*"))


def find_checkpoint(path: str | Path) -> Path:
    """The iteration folder `path` names: the tracker's iteration of a --save folder, or the
    folder itself. MegatronLMCheckpointError says what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise MegatronLMCheckpointError(f"{p} is not a folder: give a Megatron-LM --save folder or "
                                        "one of its iter_NNNNNNN folders")
    tracker = p / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            found = p / "release"
        elif text.isdigit():
            found = p / f"iter_{int(text):07d}"
        else:
            raise MegatronLMCheckpointError(f"{tracker} holds {text!r}, not an iteration number: "
                                            "the save folder is corrupt; give an iter_NNNNNNN "
                                            "folder instead")
        if not found.is_dir():
            raise MegatronLMCheckpointError(
                f"{tracker} names iteration {text}, but {found} does not exist (deleted or moved); "
                "give an existing iter_NNNNNNN folder")
        return found
    if _is_iteration_folder(p):
        return p
    saved = sorted(c.name for c in p.glob("iter_*") if c.is_dir())
    hint = (f": it holds {', '.join(saved[-3:])} but no {TRACKER} (a save that did not finish?); "
            "give one of them" if saved else "")
    raise MegatronLMCheckpointError(f"{p} is not a Megatron-LM checkpoint (no {TRACKER} and not "
                                    f"an iter_NNNNNNN folder){hint}")


def _check_format(ckpt: Path) -> None:
    if any(ckpt.glob("mp_rank_*")):
        raise MegatronLMCheckpointError(
            f"{ckpt} is in Megatron-LM's legacy 'torch' format (mp_rank_*/model_optim_rng.pt); "
            "this export reads --ckpt-format torch_dist: convert it with Megatron-LM "
            "(--ckpt-convert-format torch_dist --ckpt-convert-save DIR)")
    meta = ckpt / "metadata.json"
    if not meta.is_file():
        raise MegatronLMCheckpointError(
            f"{ckpt} has no metadata.json: the save did not finish, or it is not a torch_dist "
            "checkpoint (--ckpt-format torch_dist, Megatron-LM's default)")
    try:
        backend = json.loads(meta.read_text()).get("sharded_backend")
    except (json.JSONDecodeError, AttributeError) as err:
        raise MegatronLMCheckpointError(f"{meta} is corrupt ({err})") from None
    if backend != "torch_dist":
        raise MegatronLMCheckpointError(
            f"{ckpt} is a {backend!r} checkpoint; this export reads torch_dist (Megatron-LM's "
            "default --ckpt-format): convert it with Megatron-LM's --ckpt-convert-format")
    if not (ckpt / ".metadata").is_file():
        raise MegatronLMCheckpointError(f"{ckpt} has no .metadata (torch.distributed.checkpoint's "
                                        "index): the save did not finish or files are missing")


def read_common_state(ckpt: Path) -> dict:
    """The checkpoint's common (non-sharded) state: args, iteration, content metadata."""
    from megatron.core import dist_checkpointing

    try:
        state = dist_checkpointing.load_common_state_dict(str(ckpt))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        raise MegatronLMCheckpointError(_unreadable(ckpt, err, "its common state (args)")) from err
    if not isinstance(state, dict) or not isinstance(state.get("args"), argparse.Namespace):
        raise MegatronLMCheckpointError(
            f"{ckpt} holds no Megatron-LM training arguments (common state without 'args'): it "
            "was not written by Megatron-LM's save_checkpoint")
    return state


def _unreadable(ckpt: Path, err: BaseException, what: str) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if not (ckpt / "common.pt").is_file() and "common.pt" in str(err):
        from importlib.metadata import version

        return (f"{ckpt} keeps its common state inside the .distcp files (megatron-core 0.19 or "
                f"newer wrote it), which the installed megatron-core {version('megatron-core')} "
                "cannot read: install the megatron-core release that trained it")
    return f"{ckpt}: cannot read {what}: {first}"


# ----------------------------------------------------------------------------- weights
def _alias(key: str, saved) -> Optional[str]:
    for a, b in ALIASES:
        for mine, theirs in ((a, b), (b, a)):
            if key.endswith(mine):
                other = key[: -len(mine)] + theirs
                if other in saved:
                    return other
    return None


def _request(model, ckpt: Path, content_metadata: Optional[dict]) -> dict:
    """The model's sharded state dict, keyed as the checkpoint stores it; `_extra_state`
    objects (Transformer Engine's FP8 metadata, no weights) are left out, and anything else that
    is not a sharded tensor (a weight it held would then be missing, which `load_weights`
    refuses)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    try:
        saved = load_tensors_metadata(str(ckpt))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:
        raise MegatronLMCheckpointError(_unreadable(ckpt, err, "its tensor index")) from err
    sharded = model.sharded_state_dict(metadata=dict(content_metadata or {}))
    request, missing, used = {}, [], set()
    for name, item in sharded.items():
        if (isinstance(item, ShardedObject) or name.endswith("_extra_state")
                or not isinstance(item, ShardedBase) or not hasattr(item, "key")):
            continue
        if item.key not in saved:
            other = _alias(item.key, saved)
            if other is None:
                missing.append(item.key)
                continue
            item.key = other
        used.add(item.key)
        shape = getattr(item, "global_shape", None)
        if shape is not None and tuple(saved[item.key].global_shape) != tuple(shape):
            raise MegatronLMCheckpointError(
                f"{ckpt}: {item.key} has shape {tuple(saved[item.key].global_shape)}, the model "
                f"built from the checkpoint's own args needs {tuple(shape)}")
        request[name] = item
    unused = sorted(k for k in saved if k.startswith(MODEL_PREFIXES) and k not in used
                    and "_extra_state" not in k)
    if missing:
        raise MegatronLMCheckpointError(
            f"{ckpt} lacks {len(missing)} weight(s) of the model its args describe, e.g. "
            f"{', '.join(missing[:4])}: the checkpoint is incomplete, or was saved with a layer "
            "layout this export does not rebuild")
    if unused:
        raise MegatronLMCheckpointError(
            f"{ckpt} holds {len(unused)} model weight(s) the model rebuilt from its args has no "
            f"place for, e.g. {', '.join(unused[:4])}: a setting of the run is not reproduced")
    return request


def load_weights(ckpt: Path, model, content_metadata: Optional[dict] = None) -> None:
    """Only the model's weights from a Megatron-LM torch_dist checkpoint, into `model` (fp32
    from whatever dtype they were saved in)."""
    from megatron.core import dist_checkpointing

    request = _request(model, ckpt, content_metadata)
    try:
        loaded = dist_checkpointing.load({"__model__": request}, str(ckpt))["__model__"]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        raise MegatronLMCheckpointError(_unreadable(ckpt, err, "its weights")) from err
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise MegatronLMCheckpointError(f"{ckpt}: the loaded weights do not fit the model: "
                                        f"missing {missing[:4]}, unexpected {unexpected[:4]}")


# ----------------------------------------------------------------------------- tokenizer
def tokenizer_from_args(args) -> tuple[Optional[Path], str]:
    """(the run's sentencepiece model, "") when it exists here and has the id layout the export's
    tokenizer writes (pad 0, unk 1, <s> 2, </s> 3), else (None, why not)."""
    from megatron_nullmoe.run.tokenizer import BOS, EOS, PAD, UNK

    kind, model = getattr(args, "tokenizer_type", None), getattr(args, "tokenizer_model", None)
    if kind not in SENTENCEPIECE_TYPES:
        return None, f"the run's --tokenizer-type {kind} is not a sentencepiece model"
    if not model or not Path(model).is_file():
        return None, f"the run's --tokenizer-model {model!r} does not exist here"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model))
    except (OSError, RuntimeError) as err:
        return None, f"the run's --tokenizer-model {model} is not a sentencepiece model ({err})"
    ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
    if ids != (PAD, UNK, BOS, EOS):
        return None, (f"the run's tokenizer {model} has pad/unk/<s>/</s> ids {ids}; the export's "
                      f"tokenizer writes {(PAD, UNK, BOS, EOS)}")
    vocab = getattr(args, "padded_vocab_size", None)
    if vocab is not None and sp.get_piece_size() > vocab:
        return None, (f"the run's tokenizer {model} has {sp.get_piece_size()} pieces, more than "
                      f"the model's {vocab} embeddings")
    return Path(model), ""


def tokenizer_path(given: Optional[str | Path], args) -> tuple[Optional[Path], str]:
    """`given` (which must exist), else the run's own (`tokenizer_from_args`)."""
    if given is not None:
        if not Path(given).is_file():
            raise MegatronLMCheckpointError(f"--tokenizer {str(given)!r} does not exist")
        return Path(given), ""
    return tokenizer_from_args(args)


# ----------------------------------------------------------------------------- entry points
def open_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """(iteration folder, common state) of the checkpoint `path` names, its format checked."""
    p = Path(path)
    if not p.exists():
        raise MegatronLMCheckpointError(f"{str(p)!r} does not exist")
    ckpt = find_checkpoint(p)
    _check_format(ckpt)
    return ckpt, read_common_state(ckpt)


def saved_step(ckpt: Path, state: dict) -> int:
    """The iteration a checkpoint was saved at: its common state's, else its folder's name."""
    if isinstance(state.get("iteration"), int):
        return state["iteration"]
    m = ITERATION.fullmatch(ckpt.name)
    return int(m.group(1)) if m else 0


def megatron_lm_source(path: str | Path, tokenizer: Optional[str | Path] = None) -> Source:
    """The Source of a Megatron-LM checkpoint (kind "megatron-lm", path its iteration folder),
    for `resolve`: it reads the args, not the weights. Raises when no tokenizer is found."""
    ckpt, state = open_checkpoint(path)
    args = state["args"]
    found, why = tokenizer_path(tokenizer, args)
    if found is None:
        raise MegatronLMCheckpointError(f"no tokenizer for {ckpt}: {why}; give --tokenizer PATH "
                                        "(a sentencepiece .model with pad 0, unk 1, <s> 2, </s> 3)")
    return Source("megatron-lm", ckpt, None, found, saved_step(ckpt, state),
                  getattr(args, "padded_vocab_size", None))
