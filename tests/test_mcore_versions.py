"""The megatron-core version seam (`megatron_nullmoe._mcore`): range check, and each adapter
against the installed release. The whole suite runs on 0.16.1 (`make test`) and on 0.19.x
(`make test MCORE=0.19.2`), so every assertion here is checked against both spec forms."""

from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from megatron_nullmoe import _mcore
from megatron_nullmoe import NullExpertConfig, NullExpertRouter, null_router
from tests._models import HIDDEN, build_layer, moe_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.18.2", "0.19.2", "0.19.0rc1"])
def test_supported_versions_pass(version):
    _mcore.check_version(version)


@pytest.mark.parametrize("version", ["0.15.3", "0.16.0", "0.20.0", "1.0.0"])
def test_unsupported_versions_name_the_version_and_the_range(version):
    with pytest.raises(_mcore.MegatronCoreVersionError) as err:
        _mcore.check_version(version)
    assert version in str(err.value) and ">=0.16.1,<0.20" in str(err.value)


def test_import_with_an_unsupported_megatron_core_fails_once_and_clearly(tmp_path):
    """A megatron-core outside the range (a stand-in package first on the path) stops the import
    of megatron_nullmoe with one message, before anything reaches into megatron-core's modules."""
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "package_info.py").write_text("__version__ = '0.21.0'\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    out = subprocess.run([sys.executable, "-c", "import megatron_nullmoe"], capture_output=True,
                         text=True, env=env, cwd=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron_nullmoe._mcore.MegatronCoreVersionError")
    assert "found 0.21.0" in last and ">=0.16.1,<0.20" in last


def test_installed_version_is_reported():
    import megatron_nullmoe
    from megatron.core.package_info import __version__

    assert megatron_nullmoe.MCORE_VERSION == __version__


def test_accepted_kwargs_drops_what_a_release_does_not_know():
    def old(config, pg_collection=None):
        pass

    def new(config, pg_collection=None, is_mtp_layer=False):
        pass

    def open_ended(config, **kwargs):
        pass

    assert _mcore.accepted_kwargs(old, is_mtp_layer=True) == {}
    assert _mcore.accepted_kwargs(new, is_mtp_layer=True, name="x") == {"is_mtp_layer": True}
    assert _mcore.accepted_kwargs(open_ended, name="x") == {"name": "x"}


def test_dp_avg_keyword_matches_the_installed_router():
    params = inspect.signature(TopKRouter.attach_and_log_load_balancing_loss).parameters
    kw = _mcore.dp_avg_kwargs(group_has_dp=True)
    assert set(kw) <= set(params)
    assert kw in ({"needs_dp_avg": False}, {"reduce_group_has_dp": True})


def test_moe_spec_parts_and_router_swap_for_both_spec_forms():
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    subs = MoESubmodules(experts=None)
    router = null_router(NullExpertConfig(num_null_experts=2))
    as_spec = ModuleSpec(module=MoELayer, submodules=subs)
    as_partial = functools.partial(MoELayer, submodules=subs)
    for spec in (as_spec, as_partial):
        new = _mcore.with_moe_router(spec, router)
        assert type(new) is type(spec)
        assert _mcore.moe_parts(new) == (MoELayer, MoESubmodules(experts=None, router=router))
        assert _mcore.moe_parts(spec)[1].router is not router  # input left alone
    assert _mcore.moe_parts(functools.partial(print, submodules=subs)) is None
    assert _mcore.moe_parts(ModuleSpec(module=torch.nn.Linear)) is None


def test_installed_release_spec_form_is_understood():
    spec = _mcore.moe_module_spec(use_te=False, num_experts=4, grouped_gemm=False)
    cls, subs = _mcore.moe_parts(spec)
    assert cls is MoELayer and subs.router is TopKRouter
    dense = _mcore.dense_mlp_submodules(use_te=False)
    assert dense.linear_fc1 is not None and dense.linear_fc2 is not None


def test_permute_moves_exactly_the_real_rows_in_expert_order():
    from megatron_nullmoe.dispatch.permute import permute

    x = torch.arange(4.0).unsqueeze(-1).expand(4, 3)
    rmap = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    probs = torch.rand(4, 3)
    x_R, p_R, idx = permute(x, rmap, probs, 5)
    assert idx.tolist() == [0, 3, 2, 0, 2]  # expert 0: tokens 0, 3; expert 1: 2; expert 2: 0, 2
    assert x_R[:, 0].tolist() == [0.0, 3.0, 2.0, 0.0, 2.0]
    assert p_R.tolist() == [probs[0, 0], probs[3, 0], probs[2, 1], probs[0, 2], probs[2, 2]]


def test_permute_equals_the_installed_releases_and_unpermute_undoes_it():
    """The host-sized permute gives megatron-core's own unfused permute's rows, gates and
    indices, so its unpermute (scatter-add by token) restores each token's sum of rows."""
    from megatron.core.transformer.moe.moe_utils import permute as mcore_permute, unpermute

    from megatron_nullmoe.dispatch.permute import permute

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, generator=g)
    rmap = torch.rand(37, 6, generator=g) < 0.3
    rmap[:, 4] = False  # an expert with no rows
    probs = torch.rand(37, 6, generator=g)
    rows = int(rmap.sum())
    kwargs = {"num_out_tokens": rows} if "num_out_tokens" in inspect.signature(
        mcore_permute).parameters else {}
    theirs = mcore_permute(x, rmap, probs=probs, **kwargs)
    ours = permute(x, rmap, probs, rows)
    for a, b in zip(ours, theirs[:3]):
        assert torch.equal(a, b)
    back = unpermute(ours[0], ours[2], restore_shape=x.shape, routing_map=rmap)
    assert torch.allclose(back, x * rmap.sum(1, keepdim=True))


def test_set_token_dispatcher_leaves_no_other_dispatcher_to_switch_to():
    """0.19's inference-optimized layer swaps between a training and an inference dispatcher at
    every forward; both must be the null-aware one."""
    layer = types.SimpleNamespace(token_dispatcher="theirs", _training_token_dispatcher="theirs",
                                  _inference_token_dispatcher="theirs-inference")
    _mcore.set_token_dispatcher(layer, "ours")
    assert vars(layer) == dict.fromkeys(vars(layer), "ours")
    plain = types.SimpleNamespace(token_dispatcher="theirs")
    _mcore.set_token_dispatcher(plain, "ours")
    assert vars(plain) == {"token_dispatcher": "ours"}


def test_mtp_flag_reaches_topk_router_and_files_metrics_after_the_decoder(single_rank):
    config = moe_config(num_experts=4, topk=2, mtp_num_layers=1)
    router = NullExpertRouter(config, null_config=NullExpertConfig(num_null_experts=4),
                              is_mtp_layer=True)
    router.set_layer_number(1)
    assert router.is_mtp_layer
    _mcore.clear_moe_metrics()
    router.train()
    router(torch.randn(3, 2, HIDDEN))
    values = _mcore.moe_metrics()["real_experts_per_token"]
    assert values.numel() == 2 and values[0] == 0 and values[1] > 0  # slot num_layers + 1


def test_layer_built_by_spec_uses_the_null_dispatcher(single_rank):
    layer = build_layer(moe_config(), NullExpertConfig(num_null_experts=2))
    from megatron_nullmoe.dispatch import NullAlltoAllDispatcher

    assert isinstance(layer.token_dispatcher, NullAlltoAllDispatcher)
    assert isinstance(layer.router, NullExpertRouter)
