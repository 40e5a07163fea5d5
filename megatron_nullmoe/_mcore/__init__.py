"""The one seam to megatron-core: every detail that differs between its releases lives here.

Supported: megatron-core 0.16.1 up to 0.19.x. Differences are detected by capability (a signature,
an attribute, the type of a spec object), never by comparing version strings; the version is read
only to refuse a release outside the tested range with one clear message at import.

What differs, and where it is handled:
- 0.16.1 calls `te_general_gemm` in its router gating even without Transformer Engine (a
  NameError): `gating_linear` and the stand-in defined at import.
- 0.17+: routers and MoE layers take `is_mtp_layer` (and 0.18+ layers `name`): `accepted_kwargs`.
- 0.18+: MoE layers are specs of the form `partial(MoELayer, submodules=MoESubmodules(...))`, dense
  MLPs `partial(MLP.as_mlp_submodule, ...)`, where 0.16.1 had `ModuleSpec`s: `moe_parts`,
  `with_moe_router`, `dense_mlp_submodules`.
- 0.18+: `attach_and_log_load_balancing_loss` takes `needs_dp_avg` (the inverse of 0.16.1's
  `reduce_group_has_dp`): `dp_avg_kwargs`.
- 0.18+: MoE metrics live in `get_moe_metrics_tracker()`, and the legacy dict view is a copy:
  `moe_metrics`, `clear_moe_metrics`.
- 0.19: with `transformer_impl="inference_optimized"` a MoE layer swaps its dispatcher every
  forward: `set_token_dispatcher` replaces both.

One fix applies to every release, on CPU and GPU alike: CLIP's norms without Transformer Engine
(`_clip_vit_norms_without_te`, applied at import).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from typing import Optional

import torch

from megatron_nullmoe.errors import NullMoEError

SUPPORTED = ((0, 16, 1), (0, 20, 0))  # [lowest, first unsupported)
SUPPORTED_TEXT = ">=0.16.1,<0.20"


class MegatronCoreVersionError(NullMoEError, ImportError):
    """The installed megatron-core is outside the range this plugin supports."""


def _parse(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


def check_version(version: str) -> None:
    low, high = SUPPORTED
    if not low <= _parse(version) < high:
        raise MegatronCoreVersionError(
            f"megatron-nullmoe supports megatron-core {SUPPORTED_TEXT}; found {version}. Install a "
            f"supported release, e.g. pip install 'megatron-core{SUPPORTED_TEXT}' (see README, "
            "'megatron-core versions')")


try:
    from megatron.core.package_info import __version__ as MCORE_VERSION
except ImportError as err:  # pragma: no cover - megatron-core missing altogether
    raise MegatronCoreVersionError(
        f"megatron-nullmoe needs megatron-core {SUPPORTED_TEXT}, which is not importable ({err})"
    ) from None
check_version(MCORE_VERSION)

from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402

HAVE_TE = bool(getattr(moe_utils, "HAVE_TE", False))
if not hasattr(moe_utils, "te_general_gemm"):
    # 0.16.1 reads this name in router_gating_linear's fallback path, but defines it only when
    # Transformer Engine imports; None is what later releases define it as without TE.
    moe_utils.te_general_gemm = None


def _clip_vit_norms_without_te() -> None:
    """Without Transformer Engine, CLIPViTModel's ln_pre/ln_post default to bare
    torch.nn.LayerNorm, which it then builds with megatron's (config=, hidden_size=) signature: a
    TypeError, on a GPU as on the CPU. megatron-core's WrappedTorchNorm takes that signature, and
    LLaVAModel gives no way to pass the norm in, so the default is replaced (nothing changes where
    TE is installed: the default is then TE's norm)."""
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    init = clip_vit_model.CLIPViTModel.__init__
    if init.__defaults__ is not None:
        init.__defaults__ = tuple(
            WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in init.__defaults__)


_clip_vit_norms_without_te()


def have_te() -> bool:
    """Whether Transformer Engine is importable (the TE layer specs need it)."""
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------- routing
def gating_linear(
    inp: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype
) -> torch.Tensor:
    """Router logits in `dtype`: megatron-core's memory-saving kernel with Transformer Engine,
    otherwise the same torch ops as its fallback path."""
    if HAVE_TE:
        return moe_utils.router_gating_linear(inp, weight, bias, dtype)
    flat = inp.reshape(-1, inp.shape[-1]).to(dtype)
    if bias is None:
        out = torch.mm(flat, weight.to(dtype).t())
    else:
        out = torch.addmm(bias.to(dtype), flat, weight.to(dtype).t())
    return out.view(*inp.shape[:-1], -1)


def accepted_kwargs(fn, **kwargs) -> dict:
    """The subset of kwargs that `fn` (a function or class) accepts: 0.17+ passes `is_mtp_layer`
    and `name` to routers and MoE layers that 0.16.1 does not know."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


_ATTACH_PARAMS = inspect.signature(TopKRouter.attach_and_log_load_balancing_loss).parameters


def dp_avg_kwargs(group_has_dp: bool) -> dict:
    """Keyword for attach_and_log_load_balancing_loss saying whether the reduce group already
    spans data-parallel ranks (0.16.1: reduce_group_has_dp; 0.18+: needs_dp_avg, inverted)."""
    if "needs_dp_avg" in _ATTACH_PARAMS:
        return {"needs_dp_avg": not group_has_dp}
    return {"reduce_group_has_dp": group_has_dp}


def num_layers_for_tracker(config) -> int:
    """Layer count megatron-core's aux-loss tracker is sized with (decoder + MTP layers)."""
    return config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)


def record_metric(name: str, value: torch.Tensor, layer_number: int, config, avg_group) -> None:
    """Adds a per-layer value to megatron-core's MoE metrics (printed by Megatron-LM's log line)."""
    moe_utils.save_to_aux_losses_tracker(
        name, value, layer_number, num_layers_for_tracker(config), avg_group=avg_group)


def moe_metrics() -> dict[str, torch.Tensor]:
    """name -> per-layer values currently held by megatron-core's MoE metrics tracker."""
    return {k: v["values"] for k, v in moe_utils.get_moe_layer_wise_logging_tracker().items()
            if v["values"] is not None}


def clear_moe_metrics() -> None:
    """Empties megatron-core's MoE metrics tracker (0.18+: the tracker object; 0.16.1: the dict,
    which is sized by the first model that logs a name)."""
    tracker = getattr(moe_utils, "get_moe_metrics_tracker", None)  # 0.18+
    if tracker is not None:
        tracker().metrics.clear()
    else:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()


# ----------------------------------------------------------------------------- dispatch
class DispatcherSwapError(NullMoEError, RuntimeError):
    """A MoE layer would still reach one of megatron-core's own dispatchers."""


def set_token_dispatcher(moe_layer, dispatcher) -> None:
    """Makes `dispatcher` the layer's only dispatcher. 0.19's inference-optimized layers keep a
    training and an inference dispatcher and pick one at every forward; both become ours, so no
    forward can bypass the null-aware path.

    Then checks that no dispatcher of megatron-core's is left on the layer under any attribute
    name: a release that renamed these attributes would otherwise run its stock dispatcher
    silently (sizing its permutation as T * top-k rows, null picks included)."""
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

    moe_layer.token_dispatcher = dispatcher
    for attr in ("_training_token_dispatcher", "_inference_token_dispatcher"):
        if hasattr(moe_layer, attr):
            setattr(moe_layer, attr, dispatcher)
    stale = sorted(name for name, value in vars(moe_layer).items()
                   if isinstance(value, MoETokenDispatcher) and value is not dispatcher)
    if stale:
        raise DispatcherSwapError(
            f"megatron-core {MCORE_VERSION}: {type(moe_layer).__name__} still holds megatron-core "
            f"dispatcher(s) in {', '.join(stale)} after the null-aware dispatcher was installed; "
            "this release keeps its dispatchers under names megatron-nullmoe does not know, so "
            f"null slots would become rows. Supported releases: megatron-core {SUPPORTED_TEXT}")


# -------------------------------------------------------------------------------- specs
def moe_parts(mlp):
    """(MoE layer class, MoESubmodules) if `mlp` is a MoE layer spec of any supported release
    (a ModuleSpec, or 0.18+'s partial(MoELayer, submodules=...)), else None."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if isinstance(mlp, ModuleSpec):
        cls, subs = mlp.module, mlp.submodules
    elif isinstance(mlp, functools.partial):
        cls, subs = mlp.func, mlp.keywords.get("submodules")
    else:
        return None
    if isinstance(cls, type) and issubclass(cls, MoELayer) and subs is not None:
        return cls, subs
    return None


def with_moe_router(mlp, router):
    """A copy of the MoE layer spec `mlp` whose router builder is `router` (same spec form)."""
    _, subs = moe_parts(mlp)
    subs = dataclasses.replace(subs, router=router)
    if isinstance(mlp, ModuleSpec):
        return dataclasses.replace(mlp, submodules=subs)
    return functools.partial(mlp.func, *mlp.args, **{**mlp.keywords, "submodules": subs})


def dense_mlp_submodules(use_te: bool):
    """MLPSubmodules of megatron-core's dense MLP spec (what a vision projector is built from)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec

    spec = get_mlp_module_spec(use_te=use_te, num_experts=None)
    if isinstance(spec, functools.partial):
        return spec.keywords["submodules"]
    return spec.submodules


def moe_module_spec(use_te: bool, num_experts: int, grouped_gemm: bool):
    """megatron-core's MoE layer spec (ModuleSpec or partial, as the release builds it)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    return get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=grouped_gemm)
