"""Where null experts plug into megatron-core modules.

megatron-core picks the MoE dispatcher by name inside `MoELayer.__init__` (no registry), and in
0.16.1 `TransformerLayer` hands `pg_collection` to its MLP only when the MLP spec's module *is*
`MoELayer`. So null-expert layer specs keep `MoELayer` as the MLP module (process groups arrive the
normal way in every release), bind `NullExpertRouter` as its router builder, and use these
TransformerLayer subclasses, which swap in the null-aware dispatcher once the layer is built.
"""

from __future__ import annotations


from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer

from megatron_nullmoe import _mcore
from megatron_nullmoe.dispatch import build_dispatcher
from megatron_nullmoe.router import NullExpertRouter, null_router


def install_null_dispatcher(moe_layer: MoELayer, pg_collection) -> None:
    """Replaces a MoELayer's dispatcher with the null-aware one, if its router has null slots."""
    if isinstance(moe_layer, MoELayer) and isinstance(moe_layer.router, NullExpertRouter):
        _mcore.set_token_dispatcher(moe_layer, build_dispatcher(moe_layer, pg_collection))


class NullExpertMoELayer(MoELayer):
    """A MoELayer with the null-aware dispatcher, for code that builds MoE layers directly.

    `submodules.router` must build a NullExpertRouter (`null_router(null_config)` is that builder;
    `null_moe_layer` below builds the whole layer).
    """

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 is_mtp_layer: bool = False, name=None):
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection,
                         **_mcore.accepted_kwargs(MoELayer.__init__, is_mtp_layer=is_mtp_layer,
                                                  name=name))
        if not isinstance(self.router, NullExpertRouter):
            raise TypeError(
                f"NullExpertMoELayer needs a NullExpertRouter, got {type(self.router).__name__}"
            )
        install_null_dispatcher(self, pg_collection)


class NullExpertTransformerLayer(TransformerLayer):
    """TransformerLayer whose MoE MLP (if any) dispatches real rows only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_null_dispatcher(self.mlp, self.pg_collection)


class NullExpertMoETransformerLayer(MoETransformerLayer):
    """MoETransformerLayer whose MoE MLP dispatches real rows only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        install_null_dispatcher(self.mlp, self.pg_collection)


# megatron-core layer class -> its null-expert form.
LAYER_CLASSES = {
    TransformerLayer: NullExpertTransformerLayer,
    MoETransformerLayer: NullExpertMoETransformerLayer,
    NullExpertTransformerLayer: NullExpertTransformerLayer,
    NullExpertMoETransformerLayer: NullExpertMoETransformerLayer,
}


def null_moe_layer(config, null_config, pg_collection=None, layer_number=1, use_te=False):
    """A standalone NullExpertMoELayer with megatron-core's own expert modules (local or TE)."""
    spec = _mcore.moe_module_spec(use_te, config.num_moe_experts, config.moe_grouped_gemm)
    _, subs = _mcore.moe_parts(_mcore.with_moe_router(spec, null_router(null_config)))
    return NullExpertMoELayer(config, subs, layer_number=layer_number, pg_collection=pg_collection)
