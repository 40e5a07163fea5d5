"""A training run's configuration: typed dataclasses built as defaults <- YAML recipe <- overrides.

Every component owns a small dataclass; `RunConfig` composes them. `load_config` merges the recipe
and `key.sub=value` overrides into the defaults, checks every key and value on the way (an unknown
key names the closest valid one), and `save_config` writes the resolved result into the run
folder so that a run can always be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_nullmoe.config import SUPPORTED_DISPATCHERS, NullExpertConfig, saved_defaults
from megatron_nullmoe.errors import NullMoEError


class ConfigError(NullMoEError, ValueError):
    """A recipe or override that does not describe a valid run."""

    what = "config error"


def _choices(*names: str, default: str) -> Any:
    return field(default=default, metadata={"choices": names})


def _at_least(default: Any, low: float) -> Any:
    return field(default=default, metadata={"min": low})


def _above(default: Any, low: float) -> Any:
    return field(default=default, metadata={"above": low})


@dataclass
class Vision:
    """CLIP-style ViT encoder of the VLM (megatron-core CLIPViTModel) and its MLP projector."""

    num_layers: int = _at_least(2, 1)
    hidden_size: int = _at_least(64, 1)
    ffn_hidden_size: int = _at_least(128, 1)
    num_attention_heads: int = _at_least(4, 1)
    image_size: int = _at_least(48, 1)
    patch_size: int = _at_least(8, 1)
    drop_class_token: bool = True

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            low = self.image_size - self.image_size % self.patch_size
            raise ConfigError(
                f"model.vision.image_size={self.image_size} is not a multiple of "
                f"model.vision.patch_size={self.patch_size} (valid: e.g. {low or self.patch_size} "
                f"or {low + self.patch_size})")


@dataclass
class Model:
    """The decoder (GPT) and, for kind=vlm, the vision side."""

    kind: str = _choices("vlm", "gpt", default="vlm")
    num_layers: int = _at_least(2, 1)
    hidden_size: int = _at_least(64, 1)
    ffn_hidden_size: int = _at_least(128, 1)
    num_attention_heads: int = _at_least(4, 1)
    max_position_embeddings: int = _at_least(256, 1)
    # Decoder architecture; the vision tower and projector keep LayerNorm, GELU and learned
    # positions. Mixtral-style: RMSNorm, rope, swiglu and num_query_groups < num_attention_heads.
    normalization: str = _choices("LayerNorm", "RMSNorm", default="LayerNorm")  # every decoder norm
    # learned_absolute: a learned position table; rope: rotary embeddings in every attention layer
    position_embedding: str = _choices("learned_absolute", "rope", default="learned_absolute")
    rotary_base: int = _at_least(10000, 1)  # RoPE's base (theta); read only with rope
    # swiglu: silu(gate) * up, three matrices per MLP (the experts' too); gelu: two matrices
    activation: str = _choices("gelu", "swiglu", default="gelu")
    # key/value heads of grouped-query attention (a divisor of num_attention_heads); null: MHA
    num_query_groups: Optional[int] = _at_least(None, 1)
    # channels of each attention head (megatron-core's kv_channels); null: hidden_size // heads
    kv_channels: Optional[int] = _at_least(None, 1)
    # a norm (model.normalization) over each query and key head before rotary, as Qwen3 has
    # (megatron-core's qk_layernorm)
    qk_layernorm: bool = False
    # what each q/k norm spans: head (one [head_dim] weight over each head apart: Qwen3,
    # megatron-core's own) or projection (all heads of the q or k projection at once, an
    # [heads x head_dim] weight: OLMoE); read only with qk_layernorm
    qk_norm_scope: str = _choices("head", "projection", default="head")
    norm_epsilon: float = _above(1e-5, 0)  # epsilon of every decoder norm (layernorm_epsilon)
    # MoE: decoder layers 0, n, 2n, ... are MoE for moe_layer_freq=n (megatron-core's convention).
    moe_layer_freq: int = 1
    num_experts: int = _at_least(8, 1)
    # rows of the embedding and output layer; null: the tokenizer's size. A Hugging Face model
    # (checkpoint.init_from) sets its own, which may be padded past its tokenizer's ids.
    vocab_size: Optional[int] = _at_least(None, 1)
    moe_ffn_hidden_size: int = _at_least(64, 1)
    router_topk: int = _at_least(2, 1)
    router_score_function: str = _choices("softmax", "sigmoid", default="softmax")
    # softmax over all slots, then top-k, gates not renormalised (megatron-core's
    # moe_router_pre_softmax); None: on for top-1 (else its gate would always be 1), off otherwise
    router_pre_softmax: Optional[bool] = None
    # every gate times this factor (megatron-core's moe_router_topk_scaling_factor); None: 1
    router_topk_scaling_factor: Optional[float] = _above(None, 0)
    aux_loss_coeff: float = _at_least(1e-2, 0)
    z_loss_coeff: Optional[float] = None
    token_dispatcher: str = _choices(*SUPPORTED_DISPATCHERS, default="alltoall")
    # The plugin's own knobs: the section is NullExpertConfig itself (its fields, ranges and checks).
    null_experts: NullExpertConfig = field(default_factory=NullExpertConfig)
    vision: Vision = field(default_factory=Vision)


@dataclass
class Parallel:
    """Sizes of the parallel dimensions; data parallel is what is left of the world size."""

    tensor: int = _at_least(1, 1)
    expert: int = _at_least(1, 1)
    pipeline: int = _at_least(1, 1)
    backend: str = _choices("auto", "gloo", "nccl", default="auto")


@dataclass
class Data:
    """Where samples come from. kind=energon: image+caption webdataset shards prepared for energon;
    kind=jsonl: text-only GPT data, one {"text": ...} object per line; kind=indexed: Megatron's
    PREFIX.bin/.idx (path and valid_path are prefixes), sampled by megatron-core's GPTDataset."""

    kind: str = _choices("energon", "jsonl", "indexed", default="energon")
    path: str = "data/demo"
    valid_path: Optional[str] = None  # jsonl/indexed; energon datasets carry their own val split
    # a sentencepiece .model, a Hugging Face tokenizer.json (special ids from the files beside
    # it), or a folder holding one; None: the dataset's own tokenizer.model
    tokenizer: Optional[str] = None
    seq_length: int = _at_least(32, 1)  # text tokens per sample (images add their patch tokens on top)
    micro_batch_size: int = _at_least(4, 1)
    global_batch_size: int = _at_least(16, 1)
    num_workers: int = _at_least(0, 0)
    shuffle_buffer_size: int = _at_least(64, 1)


@dataclass
class Optim:
    lr: float = _above(3e-3, 0)
    min_lr: float = _at_least(3e-4, 0)
    warmup_steps: int = _at_least(10, 0)
    lr_decay_style: str = _choices("cosine", "linear", "constant", default="cosine")
    weight_decay: float = _at_least(0.01, 0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = _at_least(1.0, 0)


@dataclass
class Checkpoint:
    """megatron-core dist_checkpointing; saved into <run.dir>/checkpoints unless `dir` is given."""

    dir: Optional[str] = None
    save_every: int = _at_least(0, 0)  # 0: only at the end
    keep_last: int = _at_least(2, 1)
    resume: bool = True  # continue from the newest checkpoint in `dir` if there is one
    # A fresh run's starting weights: a run folder (its newest checkpoint) or a checkpoint of the
    # same model, with or without null slots or with other null/router settings (the null state a
    # source lacks starts fresh). Step, optimizer, LR schedule and data order start at 0, as with
    # Megatron-LM's --finetune. Ignored once the run has checkpoints of its own (it resumes those).
    # A Hugging Face folder (config.json + *.safetensors; MixtralForCausalLM or
    # Qwen3MoeForCausalLM) works too: the architecture keys come from its config.json
    # (run/hf_folder.py), and its tokenizer.json (else tokenizer.model) is data.tokenizer unless
    # the recipe names one.
    init_from: Optional[str] = None


# distill.teacher values that switch distillation off (YAML's null means "the default teacher")
NO_TEACHER = ("none", "")


@dataclass
class Distill:
    """Self-distillation from a frozen teacher (ZEDA's first stage): the loss is the LM loss plus
    `weight` x temperature^2 x KL(teacher || student) of the next-token distributions, on the
    tokens the LM loss counts. The teacher is a trainer run or checkpoint folder, or a Hugging Face
    folder, built with its own architecture in the run's precision and parallel layout, frozen
    (train/distill.py). weight 0 (the default): off, nothing is built."""

    # null: checkpoint.init_from (the source the null slots are switched on in); none: off
    teacher: Optional[str] = None
    weight: float = _at_least(0.0, 0)
    # the KL between softmax(logits / temperature) of both models, times temperature^2 (Hinton's
    # convention: the gradient keeps its size as the temperature changes)
    temperature: float = _above(1.0, 0)


@dataclass
class Logging:
    log_every: int = _at_least(10, 1)
    eval_every: int = _at_least(50, 0)  # 0: none on a schedule (eval_at still evaluates)
    eval_steps: int = _at_least(4, 1)
    # Extra steps to evaluate at, besides every eval_every (e.g. [50, 650, 750] with
    # eval_every=100: sparse along the run, every 50 over the last four evaluations, which
    # tail_val_loss averages). Steps past `steps` are ignored, so that a recipe keeps working
    # with a shorter `steps=` override. Evaluation does not change training, so thinning it
    # keeps a run's losses bit-equal.
    eval_at: list[int] = field(default_factory=list, metadata={"min": 1})
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress_bar: bool = True


@dataclass
class Faults:
    """Pre-emption, non-finite values and hangs (see megatron_nullmoe/train/faults.py)."""

    # Signals that save a checkpoint at the next step boundary and exit with code 75 (comma list
    # of names: TERM, USR1, USR2, INT, HUP; empty: none). Every rank agrees on the stop.
    exit_signals: str = "TERM,USR1,INT"
    skip_nonfinite: bool = True  # skip a step whose loss or gradient norm is not finite
    max_nonfinite_in_a_row: int = _at_least(3, 1)  # then stop with an error
    collective_timeout_s: float = _above(600.0, 0)  # torch.distributed timeout of every collective
    # A rank whose progress stalls this long stops the run with an error naming the rank that
    # is behind (a watchdog over per-rank heartbeats); null: no watchdog.
    stall_timeout_s: Optional[float] = _above(300.0, 0)


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/run"
    steps: int = _at_least(100, 1)
    # Stop this process after so many steps, saving a checkpoint (the schedule still runs to
    # `steps`); a later launch resumes. For job time limits, like Megatron-LM's --exit-interval.
    exit_after_steps: Optional[int] = _at_least(None, 1)
    exit_at_step: Optional[int] = _at_least(None, 1)  # stop (with a checkpoint) once at this step
    # Stop with a checkpoint once this much wall time has passed since start (set it a few minutes
    # under the job's time limit, e.g. Slurm's --time), like Megatron-LM's --exit-duration-in-mins.
    exit_after_minutes: Optional[float] = _above(None, 0)
    seed: int = 1234
    precision: str = _choices("auto", "fp32", "bf16", default="auto")
    model: Model = field(default_factory=Model)
    parallel: Parallel = field(default_factory=Parallel)
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    logging: Logging = field(default_factory=Logging)
    faults: Faults = field(default_factory=Faults)
    distill: Distill = field(default_factory=Distill)

    def __post_init__(self) -> None:
        d = self.distill
        if self.distill_teacher is None:
            if d.weight > 0 and d.teacher is None:
                raise ConfigError(
                    f"distill.weight={d.weight} needs a teacher: give distill.teacher=PATH (a run "
                    "or checkpoint folder, or a Hugging Face folder) or checkpoint.init_from=PATH "
                    "(the teacher by default); or distill.weight=0 for no distillation")
            return
        if self.model.kind != "gpt":
            raise ConfigError(f"distill.weight={d.weight} with model.kind={self.model.kind}: "
                              "distillation is done for model.kind=gpt only (a VLM teacher would "
                              "need the images too; not done yet)")
        if self.parallel.pipeline > 1:
            raise ConfigError(
                f"distill.weight={d.weight} with parallel.pipeline={self.parallel.pipeline}: the "
                "teacher runs inside each micro-batch's forward, which a pipeline stage cannot do "
                "(it would need its own pipeline schedule; not done); use parallel.pipeline=1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # Sizes derived from the sections, here once so that nothing re-derives them.
    @property
    def distill_teacher(self) -> Optional[str]:
        """The teacher distillation runs with: None when off (distill.weight=0 or
        distill.teacher=none), else distill.teacher, by default checkpoint.init_from."""
        d = self.distill
        if d.weight == 0 or (d.teacher is not None and d.teacher.strip().lower() in NO_TEACHER):
            return None
        return d.teacher if d.teacher is not None else self.checkpoint.init_from

    @property
    def image_tokens(self) -> int:
        """Positions one image occupies in the decoder sequence: its patches, and the class token
        unless it is dropped (0 for GPT)."""
        if self.model.kind != "vlm":
            return 0
        v = self.model.vision
        return (v.image_size // v.patch_size) ** 2 + (0 if v.drop_class_token else 1)

    @property
    def decoder_seq_length(self) -> int:
        """Decoder positions per sample: image tokens + data.seq_length text tokens."""
        return self.image_tokens + self.data.seq_length

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer the recipe names: data.tokenizer, else the dataset's own
        tokenizer.model (a run folder also keeps a copy of it: `run.source`)."""
        return Path(self.data.tokenizer or Path(self.data.path) / "tokenizer.model")


# ----------------------------------------------------------------------------- building
def load_config(recipe: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> RunConfig:
    """defaults <- YAML recipe <- `a.b=value` overrides, checked key by key and value by value."""
    merged = _read_recipe(recipe) if recipe is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = merged
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML (quote strings "
                              "that contain [ ] { } : or #)") from None
    hf = _hf_source(merged)
    if hf is None:
        return _build(RunConfig, merged, prefix="")
    return _from_hf(merged, hf)


def _hf_source(merged: dict) -> Optional[Path]:
    """The Hugging Face folder checkpoint.init_from names, if it names one."""
    from megatron_nullmoe.run.checkpoint import CheckpointError
    from megatron_nullmoe.run.hf_folder import is_hf_folder

    source = (merged.get("checkpoint") or {}).get("init_from")
    if not isinstance(source, str):
        return None
    try:
        return Path(source) if is_hf_folder(source) else None
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.init_from={source}: {err}") from None


def _from_hf(merged: dict, folder: Path) -> RunConfig:
    """The run with the architecture of a Hugging Face folder: keys the recipe leaves out are
    filled from its config.json, keys it sets must agree (each difference named)."""
    from megatron_nullmoe.run.checkpoint import CheckpointError
    from megatron_nullmoe.run.hf_folder import fill_only, recipe_keys, tokenizer_path

    try:
        want, fill = recipe_keys(folder), fill_only(folder)
    except CheckpointError as err:
        raise ConfigError(f"checkpoint.init_from={folder}: {err}") from None
    tokenizer = tokenizer_path(folder)
    if tokenizer is not None:
        fill["data.tokenizer"] = str(tokenizer)
    elif (merged.get("data") or {}).get("tokenizer") is None:
        raise ConfigError(f"checkpoint.init_from={folder}: the folder has neither tokenizer.json "
                          "nor tokenizer.model, and data.tokenizer is not set: give "
                          "data.tokenizer=PATH (a tokenizer.json, a sentencepiece .model, or a "
                          "folder holding one)")
    for key, value in {**want, **fill}.items():
        *parents, leaf = key.split(".")
        node = merged
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if isinstance(node, dict):  # else _build names the section given a value
            node.setdefault(leaf, value)
    cfg = _build(RunConfig, merged, prefix="")
    differ = []
    for key, value in want.items():
        have = cfg
        for part in key.split("."):
            have = getattr(have, part)
        if have != value:
            differ.append(f"{key}: recipe {have!r}, Hugging Face config {value!r}")
    if differ:
        raise ConfigError(f"checkpoint.init_from={folder}: the recipe's architecture differs from "
                          f"the folder's config.json (leave these keys out to take the folder's): "
                          + "; ".join(differ))
    return cfg


def older_run_defaults() -> dict:
    """What a saved run means where it is silent: a run folder's config.yaml or a checkpoint's
    identity that does not name a key was saved before the key existed, so the key takes the value
    it had then (`config.BEFORE_FIELD`), else today's default. The one place the trainer's runs
    get older defaults: `load_run_config` and the checkpoints' identity both read it."""
    model = dataclasses.asdict(Model())
    model["null_experts"] = saved_defaults()
    return {"model": model}


def load_run_config(path: str | Path) -> RunConfig:
    """A run folder's config.yaml, as the trainer saved it, read as the run trained: a key it does
    not name takes `older_run_defaults()`'s value."""
    return _build(RunConfig, _under(_read_recipe(str(path)), older_run_defaults()), prefix="")


def _under(saved: dict, defaults: dict) -> dict:
    """`saved` with the keys it lacks filled from `defaults`, section by section."""
    out = dict(saved)
    for key, value in defaults.items():
        if isinstance(value, dict) and (out.get(key) is None or isinstance(out.get(key), dict)):
            out[key] = _under(out.get(key) or {}, value)
        elif key not in out:
            out[key] = value
    return out


def _read_recipe(recipe: str) -> dict:
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe {recipe!r} does not exist (give a YAML file, e.g. "
                          "examples/demo_vlm.yaml)")
    try:
        merged = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {recipe!r} is not valid YAML: {err}") from None
    if not isinstance(merged, dict):
        raise ConfigError(f"recipe {recipe!r} must hold a mapping of sections, got "
                          f"{type(merged).__name__}")
    return merged


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str):  # YAML reads bare null/true/1 keys as non-strings
            raise ConfigError(f"config key {name!r} is not a name (quote it in YAML?); valid "
                              f"here: {', '.join(prefix + f for f in fields)}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint} (valid here: "
                              f"{', '.join(prefix + f for f in fields)})")
        kwargs[key] = _convert(hints[key], value, name, fields[key])
    try:
        return cls(**kwargs)
    except ConfigError:  # a section's check that names its keys itself
        raise
    except ValueError as err:  # a section's own checks (NullExpertConfig's), across its fields
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _convert(hint: Any, value: Any, name: str, f: dataclasses.Field) -> Any:
    if dataclasses.is_dataclass(hint):
        if value is None:  # a YAML section whose keys are all commented out: its defaults
            return hint()
        if not isinstance(value, dict):
            raise ConfigError(f"{name} is a section; give its keys ({name}.<key>=...), not {value!r}")
        return _build(hint, value, prefix=f"{name}.")
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} is not valid: expected a list, e.g. [50, 100]")
        item = typing.get_args(hint)[0]
        return [_convert(item, v, f"{name}[{i}]", f) for i, v in enumerate(value)]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool))
    )
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"{name}={value!r} is not valid: expected {want.get(hint, hint)}"
                          + (" or null" if optional else ""))
    value = hint(value)
    low, above = f.metadata.get("min"), f.metadata.get("above")
    if low is not None and value < low:
        raise ConfigError(f"{name}={value!r} is not valid: expected >= {low}")
    if above is not None and not value > above:
        raise ConfigError(f"{name}={value!r} is not valid: expected > {above}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}={value!r} is not valid: one of {', '.join(choices)}{hint_text}")
    return value
