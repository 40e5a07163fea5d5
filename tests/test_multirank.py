"""Expert parallelism over gloo with real processes: outputs and gradients equal the one-rank
result on the same global batch, and the rows sent to other ranks are exactly the real
assignments to remote experts."""

import pytest
import torch

from megatron_nullmoe import NullExpertConfig, parallel, routing_stats
from tests._dist import run_ranks
from tests._models import HIDDEN, build_layer, global_weights, load_weights, moe_config

SEQ, BATCH_PER_RANK, E, K = 5, 2, 8, 4


def ep_worker(rank, world, dispatcher, null_logits):
    """One EP rank: its slice of a fixed global batch through a layer with fixed global weights."""
    parallel.init_model_parallel(ep=world, seed=7)
    config = moe_config(num_experts=E, topk=K, dispatcher=dispatcher, ep=world)
    nc = NullExpertConfig(num_null_experts=6, null_logits=null_logits)
    layer = build_layer(config, nc)
    load_weights(layer, global_weights(config, nc, seed=3))
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(SEQ, BATCH_PER_RANK * world, HIDDEN, generator=g)
    w_all = torch.randn(SEQ, BATCH_PER_RANK * world, HIDDEN, generator=g)
    cols = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    x = x_all[:, cols].clone().requires_grad_()
    seen = {}
    layer.router.register_forward_hook(lambda m, i, o: seen.update(map=o[1].detach()))
    out, _ = layer(x)
    (out * w_all[:, cols]).sum().backward()
    experts = {
        gid: (layer.experts.local_experts[l].linear_fc1.weight.grad,
              layer.experts.local_experts[l].linear_fc2.weight.grad)
        for l, gid in enumerate(layer.local_expert_indices)
    }
    local = layer.local_expert_indices
    remote_mask = torch.ones(E, dtype=torch.bool)
    remote_mask[local] = False
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "router_grad": layer.router.weight.grad,
        "null_grad": layer.router.null_weight.grad,
        "experts": experts,
        "map": seen["map"],
        "local": local,
        "expected_remote_rows": int(seen["map"][:, remote_mask].sum()),
        "stats": layer.token_dispatcher.stats.as_dict(),
        "routing": routing_stats(layer, group=torch.distributed.group.WORLD)["all"].as_dict(),
    }


def single_rank_result(dispatcher, null_logits, world):
    """The same global batch on one rank, every expert local."""
    config = moe_config(num_experts=E, topk=K, dispatcher=dispatcher)
    parallel.init_model_parallel(ep=1, seed=7)
    nc = NullExpertConfig(num_null_experts=6, null_logits=null_logits)
    layer = build_layer(config, nc)
    load_weights(layer, global_weights(config, nc, seed=3))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SEQ, BATCH_PER_RANK * world, HIDDEN, generator=g).requires_grad_()
    w = torch.randn(SEQ, BATCH_PER_RANK * world, HIDDEN, generator=g)
    out, _ = layer(x)
    (out * w).sum().backward()
    experts = {
        gid: (e.linear_fc1.weight.grad, e.linear_fc2.weight.grad)
        for gid, e in enumerate(layer.experts.local_experts)
    }
    routing = routing_stats(layer, reset=True)["all"].as_dict()
    return out.detach(), x.grad, layer.router.weight.grad, layer.router.null_weight.grad, experts, routing


CASES = [
    (2, "alltoall", "shared"),
    (4, "alltoall", "per_expert"),
    (2, "allgather", "shared"),
]


@pytest.mark.parametrize("world,dispatcher,null_logits", CASES)
def test_expert_parallel_equals_single_rank(single_rank, tmp_path, world, dispatcher, null_logits):
    ranks = run_ranks(world, ep_worker, (dispatcher, null_logits), tmp_path)
    out, x_grad, router_grad, null_grad, experts, routing = single_rank_result(
        dispatcher, null_logits, world
    )
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks], dim=1), out, **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks], dim=1), x_grad, **close)
    # Router weights are replicated: data parallelism sums their gradients over ranks.
    torch.testing.assert_close(sum(r["router_grad"] for r in ranks), router_grad, **close)
    torch.testing.assert_close(sum(r["null_grad"] for r in ranks), null_grad, **close)
    for r in ranks:
        for gid, (fc1, fc2) in r["experts"].items():
            torch.testing.assert_close(fc1, experts[gid][0], **close)
            torch.testing.assert_close(fc2, experts[gid][1], **close)

    # Routing statistics reduced across ranks equal the one-rank statistics of the global batch.
    for r in ranks:
        assert r["routing"]["tokens"] == routing["tokens"]
        assert r["routing"]["real_histogram"] == pytest.approx(routing["real_histogram"])
        assert r["routing"]["expert_tokens"] == pytest.approx(routing["expert_tokens"])
        assert r["routing"]["null_fraction"] == pytest.approx(routing["null_fraction"])
    total_real = sum(int(r["map"].sum()) for r in ranks)
    assert 0 < total_real < SEQ * BATCH_PER_RANK * world * K  # nulls took some picks
    for r in ranks:
        s = r["stats"]
        assert s["rows_dispatched"] == int(r["map"].sum())
        assert s["rows_topk"] == SEQ * BATCH_PER_RANK * K
        rows_for_my_experts = sum(int(q["map"][:, r["local"]].sum()) for q in ranks)
        assert s["rows_computed"] == rows_for_my_experts
        if dispatcher == "alltoall":
            # Exactly the real assignments to remote experts cross ranks: no null, pad or zero row.
            assert s["rows_sent_remote"] == r["expected_remote_rows"]
            assert s["bytes_sent_remote"] == r["expected_remote_rows"] * (HIDDEN * 4 + 4)
        else:
            assert s["rows_sent_remote"] == SEQ * BATCH_PER_RANK * (world - 1)


def zero_rows_worker(rank, world):
    """Rank 1's tokens all go to null slots: it sends nothing, and everything still works."""
    parallel.init_model_parallel(ep=world, seed=7)
    config = moe_config(num_experts=4, topk=2, dispatcher="alltoall", ep=world,
                        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1)
    nc = NullExpertConfig(num_null_experts=2)
    layer = build_layer(config, nc)
    load_weights(layer, global_weights(config, nc, seed=3))
    x = torch.randn(3, 2, HIDDEN)
    if rank == 1:
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.null_weight.fill_(1.0)
        x = torch.ones(3, 2, HIDDEN)  # null logit 16, real logits 0
    x.requires_grad_()
    out, _ = layer(x)
    out.sum().backward()
    return {"out": out.detach(), "stats": layer.token_dispatcher.stats.as_dict(),
            "router_grad": layer.router.weight.grad.abs().sum()}


def test_rank_with_zero_real_rows(tmp_path):
    ranks = run_ranks(2, zero_rows_worker, (), tmp_path)
    assert ranks[1]["stats"]["rows_dispatched"] == 0
    assert ranks[1]["stats"]["rows_sent_remote"] == 0
    assert torch.equal(ranks[1]["out"], torch.zeros_like(ranks[1]["out"]))
    assert ranks[0]["stats"]["rows_dispatched"] > 0
    assert ranks[1]["router_grad"] > 0  # the aux loss still reaches the router
