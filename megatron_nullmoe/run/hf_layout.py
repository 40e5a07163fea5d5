"""megatron-core <-> Hugging Face weights: the one table of names and layouts both directions read.

The export (export/hf.py, export/mixtral.py) writes a model's weights with `to_hf`; the import
(`checkpoint.init_from=HF_DIR`, run/hf_folder.py) reads them back with `from_hf`. Both walk
`LAYER_ROWS`/`TOP_ROWS`, so a name or a layout is written down once.

The megatron-core side is the checkpoint key of each tensor (its sharded-state-dict key): the
same for the local and Transformer Engine specs and for every tensor/expert/pipeline layout
(`input_layernorm.weight` is `self_attention.linear_qkv.layer_norm_weight` under both, the
experts of a layer are one [E, ...] tensor, layers are numbered globally). `global_tensors`
gathers a one-rank model into that space; `load_global` scatters global tensors into whatever
slice of them this rank holds, so the import is layout-free.

The Hugging Face side is NullMoEForCausalLM's names; `family_name`/`nullmoe_name` rename the MoE
block to a stock family's (Mixtral: router -> block_sparse_moe.gate, gate/down/up -> w1/w2/w3;
Qwen3-MoE and OLMoE: router -> gate). Their q/k norms are megatron-core's q/k_layernorm.

Layouts (legend: H hidden, G query groups = key/value heads, Q query heads per group, D head
dim, F ffn hidden, E experts): the fused QKV is [G, (Q q-heads, 1 k-head, 1 v-head) x D, H],
split into q [G Q D, H], k [G D, H], v [G D, H]; a SwiGLU fc1 is [gate F; up F] on its rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Row:
    """One megatron-core tensor and the Hugging Face tensor(s) it is, split by `how` (copy, qkv,
    fc1). `experts`: the megatron-core tensor stacks E experts on dim 0; each Hugging Face name
    holds `{j}` for the expert. `optional`: only some architectures have it (biases of LayerNorm,
    learned positions, null rows)."""

    mcore: str
    hf: tuple[str, ...]
    how: str = "copy"
    experts: bool = False
    optional: bool = False


TOP_ROWS = (
    Row("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Row("embedding.position_embeddings.weight", ("model.embed_positions.weight",), optional=True),
    Row("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Row("decoder.final_layernorm.bias", ("model.norm.bias",), optional=True),
    Row("output_layer.weight", ("lm_head.weight",), optional=True),  # absent when tied
)
# under decoder.layers.{i}. / model.layers.{i}.
LAYER_ROWS = (
    Row("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",)),
    Row("self_attention.linear_qkv.layer_norm_bias", ("input_layernorm.bias",), optional=True),
    Row("self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    Row("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    # q/k norms (qk_layernorm): per head (Qwen3) one [D] weight shared by every head; over the
    # projection (OLMoE, qk_norm.py) one [N x D] weight, flat in both names
    Row("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",), optional=True),
    Row("self_attention.q_layernorm.bias", ("self_attn.q_norm.bias",), optional=True),
    Row("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",), optional=True),
    Row("self_attention.k_layernorm.bias", ("self_attn.k_norm.bias",), optional=True),
    # the pre-MLP norm, dense or MoE layer alike
    Row("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",)),
    Row("mlp.linear_fc1.layer_norm_bias", ("post_attention_layernorm.bias",), optional=True),
    # a dense layer
    Row("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1",
        optional=True),
    Row("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), optional=True),
    # a MoE layer
    Row("mlp.router.weight", ("mlp.router.weight",), optional=True),
    Row("mlp.router.null_weight", ("mlp.router.null_weight",), optional=True),
    Row("mlp.experts.experts.linear_fc1.weight",
        ("mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight"), "fc1",
        experts=True, optional=True),
    Row("mlp.experts.experts.linear_fc2.weight", ("mlp.experts.{j}.down_proj.weight",),
        experts=True, optional=True),
)
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")

# the stock families' names of the MoE block: NullMoE name piece -> the family's, applied in
# order (and reversed back); everything outside the MoE block is named alike
RENAMES = {
    "nullmoe": (),
    "mixtral": (("mlp.router.weight", "block_sparse_moe.gate.weight"),
                ("mlp.experts.", "block_sparse_moe.experts."),
                ("gate_proj.", "w1."), ("down_proj.", "w2."), ("up_proj.", "w3.")),
    "qwen3_moe": (("mlp.router.weight", "mlp.gate.weight"),),
    "olmoe": (("mlp.router.weight", "mlp.gate.weight"),),
}


@dataclass(frozen=True)
class Attention:
    """What the QKV layout needs: query heads, key/value groups, head dim."""

    heads: int
    groups: int
    head_dim: int


def row_of(key: str) -> Optional[tuple[Row, str]]:
    """(the row, the Hugging Face prefix) of a megatron-core checkpoint key; None when the table
    has none (router buffers, Transformer Engine's extra state)."""
    m = _LAYER.fullmatch(key)
    rest, rows, prefix = (m.group(2), LAYER_ROWS, f"model.layers.{m.group(1)}.") if m else \
        (key, TOP_ROWS, "")
    return next(((r, prefix) for r in rows if r.mcore == rest), None)


def _names(row: Row, prefix: str, gated: bool, j: Optional[int] = None) -> list[str]:
    names = [prefix + n.format(j=j) for n in row.hf]
    return names if row.how != "fc1" or gated else names[-1:]  # GELU: up only


def _split(row: Row, t: torch.Tensor, att: Attention, gated: bool) -> list[torch.Tensor]:
    if row.how == "qkv":
        per = att.heads // att.groups
        q, k, v = torch.split(t.reshape(att.groups, (per + 2) * att.head_dim, -1),
                              [per * att.head_dim, att.head_dim, att.head_dim], dim=1)
        return [q.reshape(att.heads * att.head_dim, -1), k.reshape(att.groups * att.head_dim, -1),
                v.reshape(att.groups * att.head_dim, -1)]
    if row.how == "fc1" and gated:
        return list(torch.chunk(t, 2, dim=0))
    return [t]


def _fuse(row: Row, parts: list[torch.Tensor], att: Attention) -> torch.Tensor:
    if row.how == "qkv":
        q, k, v = parts
        return torch.cat([q.reshape(att.groups, -1, q.shape[-1]),
                          k.reshape(att.groups, -1, k.shape[-1]),
                          v.reshape(att.groups, -1, v.shape[-1])], dim=1).reshape(-1, q.shape[-1])
    return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]


def to_hf(tensors: dict[str, torch.Tensor], att: Attention, gated: bool) -> dict[str, torch.Tensor]:
    """NullMoE-named tensors of megatron-core global tensors (keys the table lacks are left out)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        found = row_of(key)
        if found is None:
            continue
        row, prefix = found
        for j, piece in (enumerate(t) if row.experts else [(None, t)]):
            out.update(zip(_names(row, prefix, gated, j), _split(row, piece, att, gated)))
    return out


def from_hf(key: str, shape: tuple, get: Callable[[str], Optional[torch.Tensor]],
            att: Attention, gated: bool) -> Optional[torch.Tensor]:
    """The megatron-core global tensor `key` (of `shape`) from NullMoE-named tensors (`get`
    answers None for a name it lacks); None when the table has no row for it or a name is
    missing. A tensor of another shape is returned as is, for the caller to refuse by name."""
    found = row_of(key)
    if found is None:
        return None
    row, prefix = found
    experts = range(shape[0]) if row.experts else [None]
    stacked = []
    for j in experts:
        parts = [get(n) for n in _names(row, prefix, gated, j)]
        if any(p is None for p in parts):
            return None
        stacked.append(_fuse(row, parts, att))
    return torch.stack(stacked) if row.experts else stacked[0]


def other_stage(name: str, held: set[str], num_layers: int) -> bool:
    """Whether the NullMoE-named tensor `name` belongs to a part of the model that another
    pipeline stage holds, `held` being this rank's checkpoint keys: a layer below num_layers of
    which this rank holds nothing, the embedding on a rank without it (not the first stage), the
    final norm or output layer on a rank without the final norm (not the last stage). Each stage
    then answers only for the tensors of its own part, and together the stages refuse every
    tensor that has no place in the whole model."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        i = int(m.group(1))
        return i < num_layers and not any(k.startswith(f"decoder.layers.{i}.") for k in held)
    row = next((r for r in TOP_ROWS if name in r.hf), None)
    if row is None:
        return False
    anchor = "embedding.word_embeddings.weight" if row.mcore.startswith("embedding.") else \
        "decoder.final_layernorm.weight"
    return anchor not in held


def family_name(name: str, family: str) -> str:
    """A NullMoE tensor name as `family` (a key of RENAMES) names it."""
    for ours, theirs in RENAMES[family]:
        name = name.replace(ours, theirs)
    return name


def nullmoe_name(name: str, family: str) -> str:
    """A `family` tensor name as NullMoE names it (family_name's inverse)."""
    for ours, theirs in reversed(RENAMES[family]):
        name = name.replace(theirs, ours)
    return name


# ----------------------------------------------------------------------------- the model's side
def _leaves(model) -> list:
    """The model's ShardedTensors (factories built: a SwiGLU fc1 is two, its halves), each viewing
    this rank's part of one global tensor."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    return [v for v in nested_values(sd) if isinstance(v, ShardedTensor)]


def _where(sh) -> tuple:
    """This rank's slice of the global tensor: the prepended (expert) axes are single indices."""
    p = sh.prepend_axis_num
    return tuple(sh.global_offset[:p]) + tuple(
        slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))


def global_tensors(model) -> dict[str, torch.Tensor]:
    """{checkpoint key: global tensor} of a model on one rank (the export's view of it)."""
    out: dict[str, torch.Tensor] = {}
    for sh in _leaves(model):
        full = out.setdefault(sh.key, torch.zeros(sh.global_shape, dtype=sh.data.dtype))
        full[_where(sh)] = sh.data.detach()
    return out


def load_global(model, get: Callable[[str, tuple], Optional[torch.Tensor]],
                may_lack: Callable[[str], bool]) -> list[str]:
    """Copies `get(key, global shape)` into this rank's part of every model tensor. A key `get`
    answers None for is kept as the model has it if `may_lack(key)`, else refused; a shape that
    differs is refused. Nothing is written unless everything fits. Returns the keys kept.
    ValueError lists every key that does not fit."""
    leaves, plan, kept, refused = _leaves(model), [], [], []
    cache: dict[str, Optional[torch.Tensor]] = {}
    for sh in leaves:
        if sh.key not in cache:
            cache[sh.key] = get(sh.key, tuple(sh.global_shape))
        t = cache[sh.key]
        if t is None:
            if may_lack(sh.key):
                kept.append(sh.key)
            else:
                refused.append(f"{sh.key} (not in the source)")
        elif tuple(t.shape) != tuple(sh.global_shape):
            refused.append(f"{sh.key} (source {list(t.shape)}, this model {list(sh.global_shape)})")
        else:
            plan.append((sh, t))
    if refused:
        raise ValueError("does not fit this model: " + "; ".join(sorted(set(refused))))
    with torch.no_grad():
        for sh, t in plan:
            sh.data.copy_(t[_where(sh)])
    return sorted(set(kept))
