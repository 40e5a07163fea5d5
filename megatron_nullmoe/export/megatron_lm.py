"""A Megatron-LM checkpoint, written through the project's entry scripts, as a megatron-core GPT.

    SAVE/latest_checkpointed_iteration.txt   the newest iteration (or "release")
    SAVE/iter_0000100/                       torch_dist: metadata.json, .metadata, *.distcp,
                                             and common.pt up to megatron-core 0.18 (from 0.19
                                             the common state is stored inside the .distcp files)

`load_megatron_lm` reads the training arguments Megatron-LM stores with every checkpoint (the
common state's "args", an argparse.Namespace; our --num-null-experts flags are in it too), builds
the entry script's model from them on one CPU rank (every parallel size 1, fp32, megatron-core's
local layers, no Transformer Engine), and loads only the model weights, whatever tensor, expert or
pipeline parallel layout they were saved with (dist_checkpointing reshards).

The TransformerConfig is built here, without megatron.training: like Megatron-LM's own
`core_transformer_config_from_args`, every argument named as a field of the installed
TransformerConfig is copied, then the few settings Megatron-LM derives are derived the same way
(--swiglu, --squared-relu, --quick-geglu, --group-query-attention, --num-experts), then the layout
and precision are set to one CPU rank in fp32 (`CPU`, and the local attention backend). This
needs no Megatron-LM checkout (only megatron-core is on the package registry), and args saved by
another Megatron-LM release still build: a field the args lack keeps megatron-core's default,
where Megatron-LM's function reads some arguments unconditionally. It is tested against
`core_transformer_config_from_args` itself (tests/test_export_megatron_lm.py): on a run's real
args, every field but those set for the CPU is equal. The layer spec and the GPTModel come from
the entry script's own builder (`megatron_lm.gpt_builder`) with `--transformer-impl local`.

Checkpoints written with Transformer Engine layers load too: megatron-core's local spec stores the
pre-MLP norm of a MoE layer as `mlp.linear_fc1.layer_norm_weight` where the TE spec stores
`pre_mlp_layernorm.weight`, so each weight the model asks for is looked up under its TE/local
alias when the checkpoint lacks its own name (`ALIASES`). Every model weight in the checkpoint
must be used and every weight of the model found, or the load is refused with the names.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_nullmoe.export.base import Source, SourceError

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

# TransformerConfig fields set for one CPU rank in fp32 with megatron-core's local layers, whatever
# the run used (only fields the installed TransformerConfig has are set). None of them changes
# the model's function: layout, precision, fusions, recomputation, CUDA graphs and kernels.
CPU = dict(
    tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
    expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False,
    hierarchical_context_parallel_sizes=None, cp_comm_type=None, hybrid_context_parallel=False,
    max_seqlen_per_dp_cp_rank=None, pipeline_model_parallel_layout=None,
    pipeline_model_parallel_comm_backend=None, num_layers_in_first_pipeline_stage=None,
    num_layers_in_last_pipeline_stage=None, account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False, microbatch_group_size_per_vp_stage=None,
    moe_extended_tp=False, overlap_moe_expert_parallel_comm=False, overlap_p2p_comm=False,
    batch_p2p_comm=True, deallocate_pipeline_outputs=False, variable_seq_lengths=False,
    tp_comm_overlap=False, async_tensor_model_parallel_allreduce=False,
    fp16=False, bf16=False, params_dtype=torch.float32, pipeline_dtype=torch.float32,
    enable_autocast=False, fp8=None, fp8_param=False, fp4=None, fp4_param=False,
    first_last_layers_bf16=False, use_kitchen=False, quant_recipe=None,
    use_cpu_initialization=True, perform_initialization=False, init_model_with_meta_device=False,
    gradient_accumulation_fusion=False, bias_activation_fusion=False, masked_softmax_fusion=False,
    persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
    fused_single_qkv_rope=False, memory_efficient_layer_norm=False,
    use_fused_weighted_squared_relu=False, cross_entropy_loss_fusion=False,
    cross_entropy_fusion_impl="native", moe_permute_fusion=False, moe_router_fusion=False,
    moe_grouped_gemm=False, moe_use_legacy_grouped_gemm=False, moe_token_dispatcher_type="alltoall",
    moe_enable_deepep=False, moe_router_force_load_balancing=False, moe_enable_routing_replay=False,
    moe_router_padding_for_fp8=False, moe_router_padding_for_quantization=False,
    use_te_rng_tracker=False, use_te_activation_func=False, transformer_impl="local",
    recompute_granularity=None, recompute_method=None, recompute_num_layers=None,
    recompute_modules=None, distribute_saved_activations=False, moe_layer_recompute=False,
    cpu_offloading=False, fine_grained_activation_offloading=False, delay_wgrad_compute=False,
    enable_cuda_graph=False, external_cuda_graph=False, cuda_graph_impl="none",
    symmetric_ar_type=None, flash_decode=False, inference_fuse_tp_communication=False,
    mtp_standalone=False,
)


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


# ----------------------------------------------------------------------------- args -> model
def _refuse(args) -> None:
    """Settings a one-rank CPU build with megatron-core's local layers cannot reproduce."""
    def on(name):
        return getattr(args, name, None)

    checks = [
        ("use_legacy_models", "legacy (non-megatron-core) models have no sharded checkpoint "
                              "layout to rebuild"),
        ("multi_latent_attention", "multi-latent attention is not rebuilt by this export"),
        ("heterogeneous_layers_config_path", "heterogeneous layer configs are not rebuilt"),
        ("experimental_attention_variant", "experimental attention blocks are not rebuilt"),
        ("linear_attention_freq", "linear-attention layers are not rebuilt"),
        ("is_hybrid_model", "hybrid (Mamba) models are not GPT models"),
        ("hybrid_override_pattern", "hybrid (Mamba) models are not GPT models"),
        ("hybrid_layer_pattern", "hybrid (Mamba) models are not GPT models"),
        ("mtp_num_layers", "multi-token-prediction layers are not rebuilt (the entry script "
                           "refuses them with null experts)"),
        ("spec", "a custom layer spec module cannot be rebuilt with local layers"),
        ("window_size", "sliding-window attention needs Transformer Engine's attention"),
        ("fp8_param_gather", "FP8 parameters are Transformer Engine tensors"),
        ("fp4_param_gather", "FP4 parameters are Transformer Engine tensors"),
        ("kitchen_config_file", "quantization recipes need their own kernels"),
        ("kitchen_recipe_number", "quantization recipes need their own kernels"),
        ("te_precision_config_file", "precision recipes need Transformer Engine"),
    ]
    for name, why in checks:
        if on(name):
            raise MegatronLMCheckpointError(
                f"--{name.replace('_', '-')}={on(name)!r}: {why}; this checkpoint cannot be "
                "rebuilt on one CPU rank for export")
    if getattr(args, "ckpt_format", "torch_dist") != "torch_dist":
        raise MegatronLMCheckpointError(
            f"--ckpt-format={args.ckpt_format}: this export reads torch_dist checkpoints")
    position = getattr(args, "position_embedding_type", "learned_absolute")
    if position not in ("learned_absolute", "rope", "none"):
        raise MegatronLMCheckpointError(
            f"--position-embedding-type={position}: not rebuilt by this export (valid: "
            "learned_absolute, rope, none)")
    if on("rope_type") not in (None, "rope"):
        raise MegatronLMCheckpointError(f"--rope-type={args.rope_type}: not rebuilt (valid: rope)")


def _activation(args, kw: dict) -> None:
    """Megatron-LM's derived activation settings (as core_transformer_config_from_args)."""
    import torch.nn.functional as F

    if getattr(args, "swiglu", False):
        kw["activation_func"], kw["gated_linear_unit"] = F.silu, True
    if getattr(args, "squared_relu", False):
        from megatron.core.activations import squared_relu

        kw["activation_func"] = squared_relu
    elif getattr(args, "quick_geglu", False):
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        kw["activation_func"], kw["gated_linear_unit"] = quick_gelu, True


def transformer_config(args):
    """The TransformerConfig of a Megatron-LM run's args, for one CPU rank in fp32 (see the
    module doc); refuses, by name, what that build cannot reproduce."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    _refuse(args)
    fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.init}
    kw = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    kw["num_moe_experts"] = getattr(args, "num_experts", None)
    kw["num_query_groups"] = (args.num_query_groups if getattr(args, "group_query_attention", False)
                              else None)
    _activation(args, kw)
    if getattr(args, "rope_type", None) is None:
        kw.pop("rope_type", None)
    if hasattr(args, "seed"):
        kw["inference_sampling_seed"] = args.seed
    if "attention_backend" in fields:
        from megatron.core.transformer.enums import AttnBackend

        kw["attention_backend"] = AttnBackend.local
    kw.update({k: v for k, v in CPU.items() if k in fields})
    try:
        return TransformerConfig(**{k: v for k, v in kw.items() if k in fields})
    except (AssertionError, ValueError, TypeError, NotImplementedError) as err:
        raise MegatronLMCheckpointError(
            f"megatron-core rejects the config of this checkpoint's args on one CPU rank: {err}"
        ) from None


def cpu_args(args) -> argparse.Namespace:
    """A copy of the run's args for the entry script's builder on one CPU rank: local layers,
    and, for each null-expert flag the run had not, its value before the flag existed (a plain
    Megatron-LM run, or one written before the flag existed)."""
    from megatron_nullmoe.config import saved_defaults
    from megatron_nullmoe.megatron_lm.args import FLAGS, _dest

    out = copy.copy(args)
    out.transformer_impl = "local"
    out.spec = None
    defaults = saved_defaults()
    for name in FLAGS.values():
        if not hasattr(out, _dest(name)):
            setattr(out, _dest(name), defaults[name])
    for name, default in (("fp16_lm_cross_entropy", False), ("use_rope_scaling", False),
                          ("rotary_percent", 1.0), ("rotary_base", 10000), ("qk_l2_norm", False),
                          ("untie_embeddings_and_output_weights", False),
                          ("position_embedding_type", "learned_absolute")):
        if not hasattr(out, name):
            setattr(out, name, default)
    return out


def build_model(args):
    """The entry script's GPT (megatron_lm.gpt_builder) from the run's args, one CPU rank, fp32,
    local layers, uninitialised weights (the checkpoint's are loaded over them)."""
    from megatron_nullmoe.config import NullExpertConfigError
    from megatron_nullmoe.export.base import single_process
    from megatron_nullmoe.megatron_lm.builders import gpt_builder

    with _local_attention_env():
        config = transformer_config(args)
        single_process()
        try:
            return gpt_builder(cpu_args(args), pre_process=True, post_process=True, config=config)
        except NullExpertConfigError as err:
            raise MegatronLMCheckpointError(f"null experts: {err}") from None
        except (AssertionError, ValueError, TypeError, NotImplementedError) as err:
            raise MegatronLMCheckpointError(
                f"the model of this checkpoint's args cannot be built on one CPU rank with "
                f"megatron-core's local layers: {type(err).__name__}: {err}") from None


@contextlib.contextmanager
def _local_attention_env():
    """Transformer Engine's attention switches (NVTE_FLASH_ATTN, ...) cleared while the local
    model is built: Megatron-LM's initialize sets them for the training backend, and megatron-core
    asserts they agree with the backend of the config (here `local`, which reads none of them)."""
    names = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


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


def _tokenizer(given: Optional[str | Path], args) -> tuple[Optional[Path], str]:
    if given is not None:
        if not Path(given).is_file():
            raise MegatronLMCheckpointError(f"--tokenizer {str(given)!r} does not exist")
        return Path(given), ""
    return tokenizer_from_args(args)


# ----------------------------------------------------------------------------- entry points
def _open(path: str | Path) -> tuple[Path, dict]:
    p = Path(path)
    if not p.exists():
        raise MegatronLMCheckpointError(f"{str(p)!r} does not exist")
    ckpt = find_checkpoint(p)
    _check_format(ckpt)
    return ckpt, read_common_state(ckpt)


def _step(ckpt: Path, state: dict) -> int:
    if isinstance(state.get("iteration"), int):
        return state["iteration"]
    m = ITERATION.fullmatch(ckpt.name)
    return int(m.group(1)) if m else 0


def megatron_lm_source(path: str | Path, tokenizer: Optional[str | Path] = None) -> Source:
    """The Source of a Megatron-LM checkpoint (kind "megatron-lm", path its iteration folder),
    for `resolve`: it reads the args, not the weights. Raises when no tokenizer is found."""
    ckpt, state = _open(path)
    args = state["args"]
    found, why = _tokenizer(tokenizer, args)
    if found is None:
        raise MegatronLMCheckpointError(f"no tokenizer for {ckpt}: {why}; give --tokenizer PATH "
                                        "(a sentencepiece .model with pad 0, unk 1, <s> 2, </s> 3)")
    return Source("megatron-lm", ckpt, None, found, _step(ckpt, state),
                  getattr(args, "padded_vocab_size", None))


def load_megatron_lm(path: str | Path, tokenizer: Optional[str | Path] = None):
    """(model, tokenizer model path or None, step) of a Megatron-LM checkpoint: the entry
    script's megatron-core GPT, one CPU rank, fp32, eval mode, with the checkpoint's weights.
    `tokenizer` overrides the run's own (see `tokenizer_from_args` for when that is None)."""
    ckpt, state = _open(path)
    args = state["args"]
    tokenizer_path, _ = _tokenizer(tokenizer, args)
    model = build_model(args)
    load_weights(ckpt, model, state.get("content_metadata"))
    return model.eval(), tokenizer_path, _step(ckpt, state)
