"""GPU-only tests (marker `gpu`; each skips without CUDA): the null MoE layer on CUDA in bf16 with
the trainer's collectives over an NCCL world of 1, fp32 budget state under megatron-core's
Float16Module, dispatch rows equal to a CPU run's, and (where Transformer Engine imports) the TE
spec with grouped GEMM and an expert that receives no rows.

Run them alone, in their own session (`pytest -m gpu tests`; `make gpu-check` does): they start
an NCCL process group, which cannot share a session with the CPU suite's gloo group.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests._models import moe_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_te = pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                              reason="Transformer Engine is not importable")
T, B, E, K, Z = 64, 2, 8, 4, 8


@pytest.fixture(scope="module")
def nccl():
    """torch.distributed with one NCCL rank and megatron-core's parallel state on it."""
    import torch.distributed as dist

    from megatron_nullmoe import parallel

    if dist.is_initialized() and dist.get_backend() != "nccl":
        pytest.skip("a gloo group already runs in this session: run `pytest -m gpu` alone")
    os.environ["MASTER_PORT"] = str(parallel.free_port())
    parallel.init_distributed(rank=0, world_size=1, backend="nccl")
    parallel.init_model_parallel(seed=1234)
    yield


def _layer(target=None, rate=0.01, **config):
    from megatron_nullmoe import NullExpertConfig
    from megatron_nullmoe.layer import null_moe_layer

    nc = NullExpertConfig(num_null_experts=Z, target_real_per_token=target, budget_update_rate=rate)
    return null_moe_layer(moe_config(num_experts=E, topk=K, **config), nc)


def _bf16(layer):
    from megatron.core.transformer.module import Float16Module

    layer.config.bf16 = True
    return Float16Module(layer.config, layer.cuda())


def test_layer_forward_backward_bf16_with_the_trainers_collectives(nccl):
    import torch.distributed as dist

    from megatron_nullmoe import dispatch_stats, routing_stats, update_null_budget
    from megatron_nullmoe.model_utils import token_group

    torch.manual_seed(0)
    layer = _layer(target=2.0)
    model = _bf16(layer)
    x = torch.randn(T, B, layer.config.hidden_size, device="cuda", requires_grad=True)
    out, _ = model(x)
    out.float().square().mean().backward()
    assert out.is_cuda and torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    group = token_group(layer)
    assert dist.get_backend(group) == "nccl"
    stats = routing_stats(layer, group=group, reset=False)["all"]
    rows = dispatch_stats(layer, group=group)
    assert 0 < rows.rows_dispatched < T * B * K
    assert stats.real_per_token == pytest.approx(rows.rows_dispatched / (T * B))
    realised = update_null_budget(layer)
    assert realised[0] == pytest.approx(rows.rows_dispatched / (T * B))
    assert float(layer.router.null_budget_bias) != 0.0  # moved one step


def test_budget_state_stays_fp32_under_float16module(nccl):
    from megatron_nullmoe import update_null_budget

    layer = _layer(target=2.0, rate=0.01)
    model = _bf16(layer)
    router = layer.router
    assert router.weight.dtype == torch.bfloat16  # the model is bf16 ...
    assert router.null_budget_bias.dtype == torch.float32  # ... its control state is not
    assert router.budget_counts.dtype == torch.float64
    with torch.no_grad():
        router.null_budget_bias.fill_(5.0)  # in bf16, 5.0 +- 0.01 rounds back to 5.0
    # A training forward with grad, as the trainer's: the router counts no forward of a
    # training-mode layer under no_grad (activation recomputation's first pass), so the budget
    # control would have no tokens and take no step.
    assert layer.training and torch.is_grad_enabled()
    model(torch.randn(T, B, layer.config.hidden_size, device="cuda"))
    assert float(router.budget_counts[1]) == T * B  # the forward was counted
    update_null_budget(layer)
    assert abs(float(router.null_budget_bias) - 5.0) == pytest.approx(0.01, rel=1e-3)


def test_dispatch_rows_equal_a_cpu_run(nccl):
    torch.manual_seed(1)
    cpu = _layer()
    # A second layer with the first one's weights (a deepcopy would copy its process groups,
    # which cannot be copied), then moved to the GPU.
    gpu = _layer()
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.state_dict().values(),
                                                        gpu.state_dict().values())
               if isinstance(a, torch.Tensor))
    x = torch.randn(T, B, cpu.config.hidden_size)
    with torch.no_grad():
        _, map_cpu = cpu.router(x.view(-1, x.shape[-1]))
        gpu.token_dispatcher.stats.reset()
        out, _ = gpu(x.cuda())
        _, map_gpu = gpu.router(x.cuda().view(-1, x.shape[-1]))
    assert torch.equal(map_gpu.cpu(), map_cpu)
    assert gpu.token_dispatcher.stats.rows_dispatched == int(map_cpu.sum())
    assert gpu.token_dispatcher.stats.rows_computed == int(map_cpu.sum())


@needs_te
def test_te_grouped_gemm_bf16_with_an_expert_that_gets_no_rows(nccl):
    from megatron_nullmoe import NullExpertConfig
    from megatron_nullmoe.layer import null_moe_layer

    torch.manual_seed(2)
    config = moe_config(num_experts=E, topk=K, moe_grouped_gemm=True, bf16=True,
                        params_dtype=torch.bfloat16)
    layer = null_moe_layer(config, NullExpertConfig(num_null_experts=Z), use_te=True).cuda()
    H = config.hidden_size
    with torch.no_grad():  # expert 0's logit is far below every other slot for positive inputs
        layer.router.weight[0].fill_(-100.0 / H**0.5)
    x = (torch.randn(T, B, H, device="cuda") + 1.0).to(torch.bfloat16).requires_grad_()
    out, _ = layer(x)
    out.float().square().mean().backward()
    _, map_TE = layer.router(x.detach().view(-1, H))
    assert not map_TE[:, 0].any() and map_TE[:, 1:].any()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert layer.token_dispatcher.stats.rows_computed > 0
