"""The GPU cluster path, proven on CPU: collectives on the device their backend serves, budget
control over the routers' own group, exact budget state under bf16, host syncs per dispatch,
and the configurations that must be refused (issue 16).

How a CPU test sees the NCCL rule: on a GPU run the default device (the CPU) is not one NCCL
serves. `strict_devices()` models that here: the default device becomes `meta`, which gloo does
not serve, and every collective refuses a tensor on a device its group's backend does not serve,
with NCCL's message. Code that builds a control value on the default device fails under it, as it
would on a GPU; code that puts it where the group's backend runs passes.
"""

from __future__ import annotations

import ast
import contextlib
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_nullmoe import (NullExpertConfig, NullExpertConfigError, NullExpertRouter,
                              check_routers, dispatch_stats, parallel, routing_stats,
                              update_null_budget)
from tests._dist import run_ranks
from tests._models import HIDDEN, build_layer, moe_config

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_nullmoe"
CHECKED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
           "broadcast", "all_to_all_single", "reduce")


@contextlib.contextmanager
def strict_devices():
    """The default device is one the backend does not serve, and collectives check devices."""
    originals = {name: getattr(dist, name) for name in CHECKED}

    def checked(name):
        def call(*args, **kwargs):
            group = kwargs.get("group")
            served = dist.Backend.backend_capability[str(dist.get_backend(group))]
            for t in [a for a in args if isinstance(a, torch.Tensor)] + [
                    t for a in args if isinstance(a, list) for t in a]:
                if t.device.type not in served:
                    raise RuntimeError(f"{name}: No backend type associated with device type "
                                       f"{t.device.type}")
            return originals[name](*args, **kwargs)
        return call

    for name in CHECKED:
        setattr(dist, name, checked(name))
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _null_run_args():
    """What the hooks read of Megatron-LM's args: the run has null experts."""
    from types import SimpleNamespace

    return SimpleNamespace(num_experts=4, num_null_experts=4)


def control_values_worker(rank, world):
    from megatron_nullmoe.megatron_lm import TrainingLoopHooks
    from megatron_nullmoe.train import faults

    parallel.init_model_parallel(ep=world, seed=1)
    config = moe_config(num_experts=4, topk=2, ep=world)
    layer = build_layer(config, NullExpertConfig(num_null_experts=4, target_real_per_token=1.0))
    layer(torch.randn(6, 2, HIDDEN))
    hooks = TrainingLoopHooks(get_args=_null_run_args)
    hooks.forward_step(lambda data, model: None)(None, layer)
    world_group = dist.group.WORLD
    with strict_devices():
        stop = faults.StopRequest([])
        stop.received = "SIGTERM" if rank == 1 else None
        out = {
            "stop": stop.agreed(),
            "nonfinite": faults.nonfinite_ranks([math.nan if rank == 1 else 0.0]),
            "tokens": routing_stats(layer, world_group)["all"].tokens,
            "rows_topk": dispatch_stats(layer, world_group).rows_topk,
        }
        hooks.after_step()  # the realised rate, then update_null_budget
    out["real_per_token"] = hooks.real_per_token
    layer(torch.randn(6, 2, HIDDEN))
    with strict_devices():
        out["realised"] = update_null_budget(layer)
    return out


def test_control_value_collectives_run_on_the_device_their_backend_serves(tmp_path):
    a, b = run_ranks(2, control_values_worker, (), tmp_path)
    assert a == b  # every rank gets the same answers
    assert a["stop"] == "a stop signal" and a["nonfinite"] == [1]
    assert a["tokens"] == 24 and a["rows_topk"] == 48  # 2 ranks x 12 tokens, top-2
    assert 0 <= a["real_per_token"] <= 2 and len(a["realised"]) == 1


def test_the_served_device_follows_the_backend(monkeypatch):
    from megatron_nullmoe import collectives

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    for backend, near, want in (("nccl", torch.device("cpu"), torch.device("cuda", 3)),
                                ("gloo", torch.device("cpu"), torch.device("cpu")),
                                ("gloo", torch.device("meta"), torch.device("cpu")),
                                ("cpu:gloo,cuda:nccl", torch.device("cpu"), torch.device("cpu"))):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert collectives.group_device(None, near) == want, backend


COLLECTIVE_HOMES = {"collectives.py", "dispatch/comm.py"}


def test_only_the_collective_modules_call_torch_distributed_collectives():
    """Control values cross ranks in collectives.py, activations in dispatch/comm.py; no other
    module hands torch.distributed a tensor (so none can hand it one on the wrong device)."""
    names = set(CHECKED) | {"barrier", "broadcast_object_list", "all_gather_object", "gather",
                            "scatter", "reduce_scatter", "send", "recv", "isend", "irecv"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in COLLECTIVE_HOMES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in names
                    and isinstance(node.value, ast.Name) and node.value.id == "dist"):
                offenders.append(f"{rel}:{node.lineno} dist.{node.attr}")
    assert not offenders, offenders


# ---------------------------------------------------------------------- budget control group
def tp_budget_worker(rank, world):
    """Tensor parallel 2 with sequence parallelism: each rank routes its own tokens."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.megatron_lm import TrainingLoopHooks

    parallel.init_model_parallel(tp=2, seed=1)
    config = moe_config(num_experts=4, topk=2, tensor_model_parallel_size=2,
                        sequence_parallel=True, expert_tensor_parallel_size=1)
    nc = NullExpertConfig(num_null_experts=4, target_real_per_token=1.9, budget_update_rate=0.1)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    routers = torch.nn.ModuleList(
        [NullExpertRouter(config, pg_collection=pgs, null_config=nc) for _ in range(2)])
    hooks = TrainingLoopHooks(get_args=_null_run_args)
    hooks.forward_step(lambda data, model: None)(None, routers)
    g = torch.Generator().manual_seed(rank)
    history = []
    for _ in range(4):
        for router in routers:
            # rank 1's zero inputs tie every logit: top-2 takes two real experts (2.0 > 1.9);
            # rank 0's random ones run fewer: alone, the two ranks would steer opposite ways
            x = torch.randn(8, 2, HIDDEN, generator=g) if rank == 0 else torch.zeros(3, 2, HIDDEN)
            router(x)
        hooks.after_step()
        history.append([float(r.null_budget_bias) for r in routers])
    return history, hooks.real_per_token


def test_budget_bias_is_identical_on_tensor_parallel_ranks(tmp_path):
    (bias0, rate0), (bias1, rate1) = run_ranks(2, tp_budget_worker, (), tmp_path)
    assert bias0 == bias1 and rate0 == rate1
    assert any(b != 0 for step in bias0 for b in step)  # the control did move


# ------------------------------------------------------------------------------- bf16 state
def test_bf16_wrapper_keeps_budget_and_expert_bias_state_exact(single_rank):
    from megatron.core.transformer.module import Float16Module

    config = moe_config(num_experts=4, topk=2, bf16=True)
    nc = NullExpertConfig(num_null_experts=4, target_real_per_token=1.0, budget_update_rate=0.01)
    layer = build_layer(config, nc)
    wrapped = Float16Module(config, layer)
    router = layer.router
    assert router.weight.dtype == torch.bfloat16  # the wrapper did cast the model
    assert router.null_budget_bias.dtype == torch.float32
    assert router.budget_counts.dtype == torch.float64
    x = torch.randn(300, 1, HIDDEN, dtype=torch.bfloat16)
    for _ in range(3):
        router(x)
    assert router.budget_counts[1].item() == 900  # exact past bf16's 256
    router.null_budget_bias.fill_(5.0)
    update_null_budget(wrapped)
    assert abs(abs(router.null_budget_bias.item() - 5.0) - 0.01) < 1e-6  # still moves from 5.0

    biased = moe_config(num_experts=4, topk=2, bf16=True, moe_router_enable_expert_bias=True,
                        moe_router_score_function="sigmoid")
    layer = build_layer(biased, NullExpertConfig(num_null_experts=4))
    Float16Module(biased, layer)
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.router.local_tokens_per_expert.dtype == torch.float32


# ------------------------------------------------------------------------------- refusals
def test_expert_bias_with_budget_control_is_refused():
    config = moe_config(num_experts=4, topk=2, moe_router_enable_expert_bias=True,
                        moe_router_score_function="sigmoid")
    with pytest.raises(NullExpertConfigError,
                       match="target_real_per_token=1.0 .* moe_router_enable_expert_bias"):
        NullExpertConfig(num_null_experts=4, target_real_per_token=1.0).check(config)
    NullExpertConfig(num_null_experts=4).check(config)  # either alone is fine


def test_mixed_stock_and_null_routers_with_expert_bias_are_refused(single_rank):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter

    config = moe_config(num_experts=4, topk=2, moe_router_enable_expert_bias=True,
                        moe_router_score_function="sigmoid")
    mixed = torch.nn.ModuleDict({
        "decoder": NullExpertRouter(config, null_config=NullExpertConfig(num_null_experts=4)),
        "mtp": TopKRouter(config, pg_collection=get_default_pg_collection())})
    with pytest.raises(NullExpertConfigError, match=r"4 slots: mtp; 8 slots: decoder"):
        check_routers(mixed)
    check_routers(torch.nn.ModuleList([mixed["decoder"]]))  # one kind: fine


def test_a_dispatcher_left_under_an_unknown_name_is_an_error():
    import types

    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from megatron_nullmoe import _mcore

    stock = object.__new__(MoEAlltoAllTokenDispatcher)
    layer = types.SimpleNamespace(token_dispatcher=stock, _renamed_dispatcher=stock)
    with pytest.raises(_mcore.DispatcherSwapError,
                       match=rf"megatron-core {re.escape(_mcore.MCORE_VERSION)}: .* _renamed_dispatcher"):
        _mcore.set_token_dispatcher(layer, "ours")


# ------------------------------------------------------------------------------ host syncs
def test_at_most_one_host_sync_per_dispatch(single_rank):
    """Counted as benchmarks/host_syncs.py counts them (what would wait for a GPU)."""
    from benchmarks.host_syncs import count_case

    for dispatcher in ("alltoall", "allgather"):
        counts = count_case(0, 1, dispatcher)
        assert sum(counts["forward"].values()) <= 1, (dispatcher, counts)
        assert sum(counts["backward"].values()) == 0, (dispatcher, counts)
        assert sum(counts["budget_step_4_layers"].values()) <= 1, (dispatcher, counts)
    parallel.init_model_parallel(seed=1234)


def test_at_most_one_host_sync_per_dispatch_across_ranks(tmp_path):
    from benchmarks.host_syncs import count_case

    for dispatcher in ("alltoall", "allgather"):
        (tmp_path / dispatcher).mkdir()
        for counts in run_ranks(2, count_case, (dispatcher,), tmp_path / dispatcher):
            assert sum(counts["forward"].values()) <= 1, (dispatcher, counts)
            assert sum(counts["budget_step_4_layers"].values()) <= 1, (dispatcher, counts)


def test_free_port_draws_below_the_kernels_ephemeral_range_and_ignores_the_seeded_random():
    """A rendezvous port from bind(0) lies where the kernel keeps handing ports out (to gloo's
    pair connections, to the next bind(0)), so side-by-side runs collided on it (EADDRINUSE in
    CI). free_port draws below that range, from the OS's entropy: two test processes that seeded
    `random` alike still draw different ports."""
    import random
    import socket

    low = parallel._ephemeral_low()
    ports = [parallel.free_port() for _ in range(20)]
    assert all(1024 <= p < low for p in ports), (ports, low)
    assert len(set(ports)) > 10, ports
    random.seed(0)
    first = [parallel.free_port() for _ in range(5)]
    random.seed(0)
    assert [parallel.free_port() for _ in range(5)] != first
    with socket.socket() as s:  # what it returns is free to bind
        s.bind(("127.0.0.1", ports[-1]))
