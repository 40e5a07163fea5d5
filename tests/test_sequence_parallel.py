"""Tensor parallelism with sequence parallelism: each rank's MoE layer routes its slice of the
sequence, and the model's whole-sequence vision and padding masks are cut to that slice.

Layers: the slice against megatron-core's own split functions (context-parallel chunks, then
the sequence-parallel scatter); then a MoE layer on 2 real processes (TP = 2 with sequence
parallelism, over gloo) against the same layer on one rank and the whole input: outputs,
gradients, routing statistics (vision/text null fractions included) and dispatched rows.

Shape legend: B batch, S sequence, H hidden, T tokens.
"""

import inspect

import pytest
import torch
import torch.distributed as dist

from megatron_nullmoe import NullExpertConfig, dispatch_stats, parallel, routing_stats
from megatron_nullmoe import set_vision_mask
from megatron_nullmoe.routing.stats import RoutingRecorder, SequenceShard
from tests._dist import run_ranks
from tests._models import HIDDEN, build_layer, global_weights, load_weights, moe_config

SEQ, BATCH, E, K, TP = 8, 2, 4, 2, 2
NULL = NullExpertConfig(num_null_experts=4)


class _Group:
    """The two methods megatron-core's split functions ask of a process group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (2, 3)])
def test_mask_shard_is_megatron_cores_split(single_rank, monkeypatch, tp, cp):
    """Token t of a rank's router is the token megatron-core hands that rank: CP chunks
    (get_batch_on_this_cp_rank), transposed to [seq, batch], then the SP scatter."""
    from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
    from megatron.core.utils import get_batch_on_this_cp_rank

    # 0.19 asks torch.distributed for the group's rank and size
    for name, method in (("get_rank", "rank"), ("get_world_size", "size")):
        real = getattr(torch.distributed, name)
        monkeypatch.setattr(torch.distributed, name, lambda group=None, real=real, method=method:
                            getattr(group, method)() if isinstance(group, _Group) else real(group))
    # 0.19 adds is_hybrid_cp and reads a cu_seqlens key (None: one sequence per row)
    newer = "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
    hybrid, cu = ({"is_hybrid_cp": False}, {"cu_seqlens": None}) if newer else ({}, {})
    seq = 2 * cp * tp * 3
    ids_BS = torch.arange(BATCH * seq).view(BATCH, seq)
    for cp_rank in range(cp):
        local_BS = get_batch_on_this_cp_rank({"x": ids_BS.clone(), **cu}, cp_group=_Group(cp_rank, cp),
                                             **hybrid)["x"]
        for tp_rank in range(tp):
            want_T = scatter_to_sequence_parallel_region(
                local_BS.t().contiguous(), group=_Group(tp_rank, tp)).reshape(-1)
            shard = SequenceShard(tp_rank=tp_rank, tp_size=tp, cp_rank=cp_rank, cp_size=cp)
            recorder = RoutingRecorder(E, K, shard)
            assert torch.equal(recorder.token_mask(ids_BS, want_T.numel(), "cpu"), want_T)


def test_mask_that_does_not_cover_the_sequence_is_named():
    recorder = RoutingRecorder(E, K, SequenceShard(tp_rank=1, tp_size=2))
    with pytest.raises(ValueError, match=r"mask has 12 entries but this MoE layer routes 8 tokens "
                       r"on this rank, which holds 1/2 of the sequence \(tensor-parallel rank 1 "
                       r"of 2.*\(16 entries, seq splitting into 2 sequence-parallel"):
        recorder.token_mask(torch.zeros(2, 6, dtype=torch.bool), 8, "cpu")
    # the right number of entries, but a sequence that does not split into the pieces
    recorder = RoutingRecorder(E, K, SequenceShard(cp_rank=0, cp_size=2))
    with pytest.raises(ValueError, match="4 context-parallel chunks"):
        recorder.token_mask(torch.zeros(1, 6, dtype=torch.bool), 3, "cpu")


def _inputs():
    """A fixed whole-sequence input, loss weights, and masks that differ per sample (so a
    wrong cut, or a missing transpose, changes the per-modality counts)."""
    g = torch.Generator().manual_seed(11)
    x_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    w_SBH = torch.randn(SEQ, BATCH, HIDDEN, generator=g)
    vision_BS = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    vision_BS[0, :3] = True
    vision_BS[1, 2:7] = True
    pad_BS = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    pad_BS[1, -2:] = True
    # vision tokens lean towards the null logit, so the two modalities' null rates differ
    null_H = global_weights(moe_config(num_experts=E, topk=K), NULL, seed=3)["null"][0]
    x_SBH = x_SBH + 2.0 * vision_BS.t().unsqueeze(-1) * null_H / null_H.norm()
    return x_SBH, w_SBH, vision_BS, pad_BS


def _run_layer(layer, x_SBH, w_SBH, vision_BS, pad_BS, group):
    x = x_SBH.clone().requires_grad_()
    set_vision_mask(layer, vision_BS, pad_BS)
    out, _ = layer(x)
    (out * w_SBH).sum().backward()
    experts = {gid: (layer.experts.local_experts[l].linear_fc1.weight.grad,
                     layer.experts.local_experts[l].linear_fc2.weight.grad)
               for l, gid in enumerate(layer.local_expert_indices)}
    return {"out": out.detach(), "x_grad": x.grad, "router_grad": layer.router.weight.grad,
            "null_grad": layer.router.null_weight.grad, "experts": experts,
            "routing": routing_stats(layer, group=group)["all"].as_dict(),
            "rows": dispatch_stats(layer, group=group).as_dict()["rows_dispatched"],
            "sp_marked": (getattr(layer.router.weight, "sequence_parallel", False),
                          getattr(layer.router.null_weight, "sequence_parallel", False))}


def _layer(ep, dispatcher, **tp):
    config = moe_config(num_experts=E, topk=K, dispatcher=dispatcher, ep=ep,
                        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1, **tp)
    layer = build_layer(config, NULL)
    load_weights(layer, global_weights(config, NULL, seed=3))
    return layer


def tp_worker(rank, world, ep, dispatcher):
    """One TP rank: its sequence slice of the fixed input; the masks whole, as the trainer has them."""
    parallel.init_model_parallel(tp=world, ep=ep, seed=7)
    layer = _layer(ep, dispatcher, tensor_model_parallel_size=world, sequence_parallel=True,
                   expert_tensor_parallel_size=1)
    x_SBH, w_SBH, vision_BS, pad_BS = _inputs()
    rows = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    return _run_layer(layer, x_SBH[rows], w_SBH[rows], vision_BS, pad_BS, dist.group.WORLD)


@pytest.mark.parametrize("ep,dispatcher", [(1, "alltoall"), (2, "alltoall"), (2, "allgather")])
def test_tensor_parallel_layer_equals_single_rank(single_rank, tmp_path, ep, dispatcher):
    ranks = run_ranks(TP, tp_worker, (ep, dispatcher), tmp_path)
    with torch.random.fork_rng():  # later tests draw from the global stream as they would
        parallel.init_model_parallel(seed=7)
        one = _run_layer(_layer(1, dispatcher), *_inputs(), None)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), one["out"], **close)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), one["x_grad"], **close)
    # Router weights are replicated over TP ranks and marked sequence-parallel, so that
    # finalize_model_grads sums their gradients over the TP group: the sum is the one-rank grad.
    assert all(r["sp_marked"] == (True, True) for r in ranks)
    torch.testing.assert_close(sum(r["router_grad"] for r in ranks), one["router_grad"], **close)
    torch.testing.assert_close(sum(r["null_grad"] for r in ranks), one["null_grad"], **close)
    for gid, (fc1, fc2) in one["experts"].items():
        holders = [r["experts"][gid] for r in ranks if gid in r["experts"]]
        torch.testing.assert_close(sum(h[0] for h in holders), fc1, **close)
        torch.testing.assert_close(sum(h[1] for h in holders), fc2, **close)

    want = one["routing"]
    by = want["null_fraction_by_modality"]
    assert want["tokens"] == SEQ * BATCH - 2  # the two padded positions are left out
    assert by["vision"] is not None and by["text"] is not None and by["vision"] != by["text"]
    for r in ranks:
        got = r["routing"]
        assert got["tokens"] == want["tokens"]
        assert got["null_fraction"] == pytest.approx(want["null_fraction"])
        assert got["expert_tokens"] == pytest.approx(want["expert_tokens"])
        assert got["null_fraction_by_modality"]["vision"] == pytest.approx(by["vision"])
        assert got["null_fraction_by_modality"]["text"] == pytest.approx(by["text"])
        assert r["rows"] == one["rows"]
