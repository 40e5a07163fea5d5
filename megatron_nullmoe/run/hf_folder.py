"""A Hugging Face MoE folder (config.json + *.safetensors) as a run's starting weights.

`checkpoint.init_from=HF_DIR` reads it in two places: `load_config` takes the architecture from
its config.json (`recipe_keys`: the recipe may leave those keys out; any it sets that disagree
are refused, each by name with both values), and the trainer's `_init_from` loads the weights
(`load_hf_weights`) through run/hf_layout.py's table, the one the export writes with. Only
`MixtralForCausalLM` for now; what this trainer cannot reproduce (sliding windows, rope scaling,
tied embeddings, a head dim apart from hidden / heads, another norm eps) is refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_nullmoe.run.checkpoint import MANIFEST, CheckpointError
from megatron_nullmoe.upcycle import NULL_STATE

ARCHITECTURES = ("MixtralForCausalLM",)
NORM_EPS = 1e-5  # megatron-core's layernorm_epsilon, which the trainer builds with
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


def read_config(path: Path) -> dict:
    """The folder's config.json, checked: an architecture this import reads, nothing it cannot
    reproduce. CheckpointError names each problem."""
    try:
        c = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}/config.json cannot be read ({err})") from None
    arch = c.get("architectures") or [c.get("model_type")]
    if arch[0] not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch[0]!r} cannot be imported yet (valid: "
                              f"{', '.join(ARCHITECTURES)}; Qwen3-MoE and OLMoE are not done)")
    heads = c["num_attention_heads"]
    rope = c.get("rope_parameters") or {}
    scaling = c.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default"
                                        else rope)
    problems = [
        (c.get("sliding_window") is not None, f"sliding_window={c.get('sliding_window')}",
         "the trainer attends to the whole causal context"),
        (bool(c.get("tie_word_embeddings")), "tie_word_embeddings=true",
         "the trainer's output layer is its own"),
        (c.get("head_dim") not in (None, c["hidden_size"] // heads),
         f"head_dim={c.get('head_dim')}", f"the trainer's is hidden_size // num_attention_heads "
         f"= {c['hidden_size'] // heads}"),
        (c.get("hidden_act", "silu") != "silu", f"hidden_act={c.get('hidden_act')!r}",
         "SwiGLU (silu) only"),
        (float(c.get("rms_norm_eps", NORM_EPS)) != NORM_EPS, f"rms_norm_eps={c.get('rms_norm_eps')}",
         f"the trainer's norms use {NORM_EPS}"),
        (bool(scaling), f"rope_scaling={scaling}", "plain rotary embeddings"),
        (bool(c.get("attention_bias")), "attention_bias=true", "linear layers without bias"),
    ]
    bad = [f"{name} ({why})" for flag, name, why in problems if flag]
    if bad:
        raise CheckpointError(f"{path}: {arch[0]} with settings the trainer cannot reproduce: "
                              + "; ".join(bad))
    return c


def _rope_theta(c: dict) -> float:
    return float((c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 1e6)))


def recipe_keys(path: Path) -> dict[str, object]:
    """{recipe key: value} of the architecture the folder's config.json describes (Mixtral:
    RMSNorm, rope, SwiGLU, every layer MoE, top-k then softmax over the picks)."""
    c = read_config(path)
    theta = _rope_theta(c)
    if theta != int(theta):
        raise CheckpointError(f"{path}: rope_theta={theta} is not an integer (model.rotary_base is)")
    return {
        "model.kind": "gpt", "model.num_layers": c["num_hidden_layers"],
        "model.hidden_size": c["hidden_size"], "model.num_attention_heads": c["num_attention_heads"],
        "model.num_query_groups": c.get("num_key_value_heads") or c["num_attention_heads"],
        "model.moe_ffn_hidden_size": c["intermediate_size"], "model.num_experts":
            c["num_local_experts"], "model.router_topk": c["num_experts_per_tok"],
        "model.moe_layer_freq": 1, "model.normalization": "RMSNorm",
        "model.position_embedding": "rope", "model.rotary_base": int(theta),
        "model.activation": "swiglu", "model.router_score_function": "softmax",
        "model.router_pre_softmax": False, "model.router_topk_scaling_factor": None,
        "model.vocab_size": c["vocab_size"],
    }


# Keys filled from the folder when the recipe leaves them out, never compared: no weight
# depends on them (rope has no position table; Mixtral has no dense layers).
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
    CheckpointError lists every tensor that is missing or shaped differently."""
    from megatron_nullmoe.run.hf_layout import Attention, from_hf, load_global, nullmoe_name

    read_config(path)
    c = model.config
    att = Attention(c.num_attention_heads, c.num_query_groups or c.num_attention_heads,
                    c.kv_channels)
    tensors = _Tensors(path)
    by_ours = {nullmoe_name(name): name for name in tensors.where}
    used: set[str] = set()

    def get(name: str):
        theirs = by_ours.get(name)
        if theirs is not None:
            used.add(theirs)
        return None if theirs is None else tensors.get(theirs)

    def global_tensor(key: str, shape: tuple):
        return from_hf(key, shape, get, att, c.gated_linear_unit)

    try:
        kept = load_global(model, global_tensor, lambda key: key.endswith(FRESH))
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    left = sorted(set(tensors.where) - used)
    if left:
        raise CheckpointError(f"{path}: tensors without a place in this model: {left[:6]}"
                              + (f" and {len(left) - 6} more" if len(left) > 6 else ""))
    return kept
