"""Query/key RMSNorms over the whole projection (OLMoE's), as megatron-core spec submodules.

Legend: S sequence, B batch, N heads of the projection (query heads, or key/value groups for
the key), D head dim.

megatron-core's `qk_layernorm` normalises each head apart: SelfAttention builds
`q_layernorm`/`k_layernorm` from the layer spec with `hidden_size` = the head dim and applies
them to the query [S, B, N, D] and key [S, B, G, D] after the split into heads (0.16.1 through
`build_module`, 0.19.2 by calling the class; both pass `hidden_size=`, `config=`, `eps=`).
OLMoE instead normalises all N x D channels of a projection at once, with an [N x D] weight.
`ProjectionQueryNorm`/`ProjectionKeyNorm` do that from the same seam: built with the head dim,
they read N from the config and take the mean square over the last two dims.

Tensor parallelism is refused (`QKNormError`): each rank would hold a slice of the heads, so
the mean square would need a sum over the tensor-parallel group and the weight a sharded
checkpoint layout; neither is done. `QK_NORMS` is the registry the recipe's
`model.qk_norm_scope` picks from.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_nullmoe.errors import NullMoEError


class QKNormError(NullMoEError, ValueError):
    """A q/k norm this module cannot build for the model's config."""


def rms_norm_heads(x_SBND: torch.Tensor, w_ND: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each token over all its heads at once (N x D channels), in fp32, then cast
    back and scaled by the weight, in the order transformers' RMSNorm does it."""
    x = x_SBND.float()
    ms_SB11 = x.pow(2).mean(dim=(-2, -1), keepdim=True)
    return w_ND * (x * torch.rsqrt(ms_SB11 + eps)).to(x_SBND.dtype)


class _ProjectionRMSNorm(torch.nn.Module):
    """An RMSNorm over a whole q or k projection; `weight` is [N x D], flat as transformers'
    q_norm/k_norm weight is, so the checkpoint key `...q_layernorm.weight` holds it as is."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        tp = getattr(config, "tensor_model_parallel_size", 1)
        if tp > 1:
            raise QKNormError(
                f"a q/k norm over the whole projection with tensor parallel size {tp}: each rank "
                "holds a slice of the heads, and their mean square over the tensor-parallel group "
                "is not computed; use tensor parallel size 1 (model.qk_norm_scope=projection "
                "with parallel.tensor=1)")
        if getattr(config, "normalization", "RMSNorm") != "RMSNorm":
            raise QKNormError(f"a q/k norm over the whole projection is an RMSNorm; the config's "
                              f"normalization is {config.normalization!r} (valid: RMSNorm)")
        self.heads, self.head_dim, self.eps = self._heads(config), hidden_size, eps
        self.weight = torch.nn.Parameter(
            torch.ones(self.heads * hidden_size, dtype=getattr(config, "params_dtype",
                                                               torch.float32)))

    @staticmethod
    def _heads(config) -> int:
        raise NotImplementedError

    def forward(self, x_SBND: torch.Tensor) -> torch.Tensor:
        if x_SBND.shape[-2:] != (self.heads, self.head_dim):
            raise QKNormError(f"{type(self).__name__} expects [..., {self.heads}, "
                              f"{self.head_dim}], got {list(x_SBND.shape)}")
        return rms_norm_heads(x_SBND, self.weight.view(self.heads, self.head_dim), self.eps)


class ProjectionQueryNorm(_ProjectionRMSNorm):
    @staticmethod
    def _heads(config) -> int:
        return config.num_attention_heads


class ProjectionKeyNorm(_ProjectionRMSNorm):
    @staticmethod
    def _heads(config) -> int:
        return config.num_query_groups or config.num_attention_heads


# model.qk_norm_scope -> (q_layernorm, k_layernorm) submodules; None keeps megatron-core's own
QK_NORMS = {"head": None, "projection": (ProjectionQueryNorm, ProjectionKeyNorm)}


def with_qk_norm_scope(block_spec, scope: str):
    """A copy of a decoder block spec (TransformerBlockSubmodules) whose attention layers use
    the q/k norms of `scope` (a key of QK_NORMS); the input is never modified."""
    if scope not in QK_NORMS:
        raise QKNormError(f"q/k norm scope {scope!r} is not valid: one of {', '.join(QK_NORMS)}")
    if QK_NORMS[scope] is None:
        return block_spec
    q_norm, k_norm = QK_NORMS[scope]

    def layer(spec):
        attention = spec.submodules.self_attention
        subs = dataclasses.replace(attention.submodules, q_layernorm=q_norm, k_layernorm=k_norm)
        attention = dataclasses.replace(attention, submodules=subs)
        return dataclasses.replace(
            spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))

    return dataclasses.replace(block_spec,
                               layer_specs=[layer(s) for s in block_spec.layer_specs])
