"""A Hugging Face MoE folder (config.json + *.safetensors) as a run's starting weights.

`checkpoint.init_from=HF_DIR` reads it in two places: `load_config` takes the architecture from
its config.json (`recipe_keys`: the recipe may leave those keys out; any it sets that disagree
are refused, each by name with both values), and the trainer's `_init_from` loads the weights
(`load_hf_weights`) through run/hf_layout.py's table, the one the export writes with.

Families (`FAMILIES`): `MixtralForCausalLM`, `Qwen3MoeForCausalLM` (per-head q/k RMSNorm as
megatron-core's qk_layernorm, `head_dim` as kv_channels, `norm_topk_prob` as the gate rule, dense
layers where model.moe_layer_freq can place them) and `OlmoeForCausalLM` (q/k RMSNorms over the
whole projection, heads x head_dim at once: model.qk_norm_scope=projection, qk_norm.py; its
`norm_topk_prob` as Qwen3's). Whatever the trainer cannot reproduce (sliding windows, rope
scaling, tied embeddings, attention bias, clip_qkv, another activation, a dense-layer pattern
moe_layer_freq cannot place) is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_nullmoe.flops import moe_layer_pattern
from megatron_nullmoe.run.checkpoint import MANIFEST, CheckpointError
from megatron_nullmoe.upcycle import NULL_STATE


@dataclass(frozen=True)
class Family:
    """How one architecture's config.json names what the trainer needs."""

    name: str  # its key in hf_layout.RENAMES and its `export hf --format`
    experts: tuple[str, ...]  # the expert count, under the first of these names it has
    expert_ffn: str  # the experts' hidden size (`intermediate_size` is the dense layers')
    qk_norm: Optional[str]  # q/k RMSNorms in every layer over each head or the whole
    # projection (model.qk_norm_scope); None: none
    norm_eps: float  # rms_norm_eps where config.json leaves it out (transformers' default)
    reads_norm_topk_prob: bool  # its gate rule is config.json's norm_topk_prob (else top-k,
    # then softmax over the picks, always)


FAMILIES = {
    "MixtralForCausalLM": Family("mixtral", ("num_local_experts",), "intermediate_size", None,
                                 1e-5, False),
    # the Hub's configs say num_experts; transformers 5 writes num_local_experts (its alias)
    "Qwen3MoeForCausalLM": Family("qwen3_moe", ("num_experts", "num_local_experts"),
                                  "moe_intermediate_size", "head", 1e-6, True),
    # no dense layers: intermediate_size is the experts'
    "OlmoeForCausalLM": Family("olmoe", ("num_experts", "num_local_experts"), "intermediate_size",
                               "projection", 1e-5, True),
}
# architectures people ask for that the trainer cannot reproduce, and why
REFUSED = {
    "Qwen2MoeForCausalLM": "shared experts and QKV biases, which the trainer does not build",
}
# router state a Hugging Face MoE has no tensors for: the null-slot state (upcycle.NULL_STATE),
# the expert bias (its null entries start as the model has them) and its token counts
FRESH = NULL_STATE + ("router.expert_bias", "router.local_tokens_per_expert")


def is_hf_folder(path: str | Path) -> bool:
    """A folder with a config.json that is not one of the trainer's run or checkpoint folders.
    CheckpointError for safetensors without a config.json (a half-copied download)."""
    p = Path(path)
    if not p.is_dir() or (p / MANIFEST).is_file() or (p / "config.yaml").is_file():
        return False
    if (p / "config.json").is_file():
        return True
    if any(p.glob("*.safetensors")):
        raise CheckpointError(f"{p} holds safetensors but no config.json: a Hugging Face folder "
                              "needs both (copy the config.json of the model)")
    return False


def _json(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/config.json cannot be read ({err})") from None


def family_of(path: Path) -> Family:
    """The folder's Family; CheckpointError names an architecture the import cannot read."""
    c = _json(path)
    arch = (c.get("architectures") or [c.get("model_type")])[0]
    if arch in REFUSED:
        raise CheckpointError(f"{path}: architecture {arch!r} cannot be imported: {REFUSED[arch]} "
                              f"(valid: {', '.join(FAMILIES)})")
    if arch not in FAMILIES:
        raise CheckpointError(f"{path}: architecture {arch!r} cannot be imported (valid: "
                              f"{', '.join(FAMILIES)})")
    return FAMILIES[arch]


def _experts(c: dict, family: Family) -> tuple[str, Optional[int]]:
    """(the config.json name, the expert count) of the folder's experts."""
    name = next((n for n in family.experts if n in c), family.experts[0])
    return name, c.get(name)


def moe_layers(c: dict) -> list[int]:
    """1 for each MoE layer, 0 for a dense one, as transformers builds them (Qwen3-MoE: layer i
    is MoE when (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers)."""
    step, dense = c.get("decoder_sparse_step") or 1, set(c.get("mlp_only_layers") or ())
    return [int(i not in dense and (i + 1) % step == 0) for i in range(c["num_hidden_layers"])]


def _moe_layer_freq(c: dict) -> Optional[int]:
    """The model.moe_layer_freq that places the folder's MoE layers, None if none does."""
    want, layers = moe_layers(c), c["num_hidden_layers"]
    return next((n for n in range(1, layers + 1) if moe_layer_pattern(layers, n) == want), None)


def read_config(path: Path) -> dict:
    """The folder's config.json, checked: an architecture this import reads, nothing it cannot
    reproduce. CheckpointError names each problem."""
    family = family_of(path)
    c = _json(path)
    heads, head_dim = c["num_attention_heads"], c.get("head_dim")
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default"
                                        else rope)
    # Qwen3 keeps sliding_window in its config.json but applies it only with use_sliding_window
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    problems = [
        (window is not None, f"sliding_window={window}",
         "the trainer attends to the whole causal context"),
        (bool(c.get("tie_word_embeddings")), "tie_word_embeddings=true",
         "the trainer's output layer is its own"),
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')!r}",
         "SwiGLU (silu) only"),
        (bool(scaling), f"rope_scaling={scaling}", "plain rotary embeddings"),
        (bool(c.get("attention_bias")), "attention_bias=true", "linear layers without bias"),
        (c.get("clip_qkv") is not None, f"clip_qkv={c.get('clip_qkv')}",
         "queries, keys and values are not clamped"),
        # OLMoE sizes its q_norm by hidden_size: heads x head_dim must be that
        (family.qk_norm == "projection" and head_dim not in (None, c["hidden_size"] // heads),
         f"head_dim={head_dim}", f"a projection-wide q/k norm of hidden_size="
         f"{c['hidden_size']} channels needs head_dim = hidden_size / heads"),
        (not _experts(c, family)[1], "{}={}".format(*_experts(c, family)),
         "a MoE model: at least one expert"),
        (_moe_layer_freq(c) is None,
         f"decoder_sparse_step={c.get('decoder_sparse_step')}, "
         f"mlp_only_layers={c.get('mlp_only_layers')}",
         f"the MoE layers {[i for i, m in enumerate(moe_layers(c)) if m]} are not layers 0, n, "
         "2n, ... for any model.moe_layer_freq=n"),
    ]
    bad = [f"{name} ({why})" for flag, name, why in problems if flag]
    if bad:
        arch = (c.get("architectures") or [c.get("model_type")])[0]
        raise CheckpointError(f"{path}: {arch} with settings the trainer cannot reproduce: "
                              + "; ".join(bad))
    return c


def _rope_theta(c: dict) -> float:
    return float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 1e6)))


def recipe_keys(path: Path) -> dict[str, object]:
    """{recipe key: value} of the architecture the folder's config.json describes: RMSNorm, rope,
    SwiGLU; the gate rule top-k then softmax over the picks (Mixtral, Qwen3 norm_topk_prob=true)
    or softmax over all experts, picks not renormalised (Qwen3/OLMoE norm_topk_prob=false,
    megatron-core's pre-softmax); the q/k norms (Qwen3: per head, OLMoE: per projection) and
    head_dim."""
    family, c = family_of(path), read_config(path)
    theta = _rope_theta(c)
    if theta != int(theta):
        raise CheckpointError(f"{path}: rope_theta={theta} is not an integer (model.rotary_base is)")
    heads, head_dim = c["num_attention_heads"], c.get("head_dim")
    keys = {
        "model.kind": "gpt", "model.num_layers": c["num_hidden_layers"],
        "model.hidden_size": c["hidden_size"], "model.num_attention_heads": heads,
        "model.num_query_groups": c.get("num_key_value_heads") or heads,
        "model.kv_channels": None if head_dim in (None, c["hidden_size"] // heads) else head_dim,
        "model.qk_layernorm": family.qk_norm is not None,
        "model.qk_norm_scope": family.qk_norm or "head",
        "model.norm_epsilon": float(c.get("rms_norm_eps", family.norm_eps)),
        "model.moe_ffn_hidden_size": c[family.expert_ffn],
        "model.num_experts": _experts(c, family)[1], "model.router_topk": c["num_experts_per_tok"],
        "model.moe_layer_freq": _moe_layer_freq(c), "model.normalization": "RMSNorm",
        "model.position_embedding": "rope", "model.rotary_base": int(theta),
        "model.activation": "swiglu", "model.router_score_function": "softmax",
        # norm_topk_prob=false (Qwen3, OLMoE) keeps the all-expert softmax probabilities as gates
        "model.router_pre_softmax": family.reads_norm_topk_prob and not c.get("norm_topk_prob"),
        "model.router_topk_scaling_factor": None, "model.vocab_size": c["vocab_size"],
    }
    if not all(moe_layers(c)):  # the dense layers' weights depend on it
        keys["model.ffn_hidden_size"] = c["intermediate_size"]
    return keys


# Keys filled from the folder when the recipe leaves them out, never compared: no weight
# depends on them (rope has no position table; without dense layers, ffn_hidden_size is unused).
FILL_ONLY = {"model.max_position_embeddings": "max_position_embeddings",
             "model.ffn_hidden_size": "intermediate_size"}


def fill_only(path: Path) -> dict[str, object]:
    c = read_config(path)
    return {key: c[name] for key, name in FILL_ONLY.items() if name in c}


def tokenizer_path(path: Path) -> Optional[Path]:
    """The folder's tokenizer, if it has one: tokenizer.json (what transformers loads first),
    else a sentencepiece tokenizer.model (run/tokenizer.py's `load_tokenizer` reads either)."""
    from megatron_nullmoe.run.tokenizer import FILES

    return next((Path(path) / name for name in FILES if (Path(path) / name).is_file()), None)


class _Tensors:
    """The folder's safetensors by name, read lazily (a file is opened once, a tensor read when
    asked), so that only what the model takes is ever in memory."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has a config.json but no *.safetensors")
        self.where = {}
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        for handle in self.handles:
            for name in handle.keys():
                self.where[name] = handle

    def get(self, name: str):
        handle = self.where.get(name)
        return None if handle is None else handle.get_tensor(name)


def load_hf_weights(path: Path, model) -> list[str]:
    """The folder's weights into `model` (this rank's part of each tensor, whatever its parallel
    layout); returns the checkpoint keys left as the model had them (null-slot router state).
    CheckpointError lists every tensor that is missing or shaped differently, and every tensor
    of the folder without a place in this rank's part of the model (a pipeline stage leaves the
    other stages' tensors to them)."""
    from megatron_nullmoe.run.hf_layout import (Attention, from_hf, load_global, nullmoe_name,
                                                other_stage)

    family = family_of(path)
    read_config(path)
    c = model.config
    att = Attention(c.num_attention_heads, c.num_query_groups or c.num_attention_heads,
                    c.kv_channels)
    tensors = _Tensors(path)
    by_ours = {nullmoe_name(name, family.name): name for name in tensors.where}
    used: set[str] = set()
    held: set[str] = set()  # this rank's checkpoint keys (a pipeline stage holds only its part)

    def get(name: str):
        theirs = by_ours.get(name)
        if theirs is not None:
            used.add(theirs)
        return None if theirs is None else tensors.get(theirs)

    def global_tensor(key: str, shape: tuple):
        held.add(key)
        return from_hf(key, shape, get, att, c.gated_linear_unit)

    try:
        kept = load_global(model, global_tensor, lambda key: key.endswith(FRESH))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    left = sorted(name for name in set(tensors.where) - used
                  if not other_stage(nullmoe_name(name, family.name), held, c.num_layers))
    if left:
        raise CheckpointError(f"{path}: tensors without a place in this model: {left[:6]}"
                              + (f" and {len(left) - 6} more" if len(left) > 6 else ""))
    return kept
