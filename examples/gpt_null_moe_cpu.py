"""A tiny megatron-core GPT with null-expert MoE layers, trained for a few steps on CPU.

    .venv/bin/python examples/gpt_null_moe_cpu.py --steps 60

Shows the whole public API on one process: `with_null_experts` on megatron-core's decoder block
spec, routing statistics (with a stand-in "vision" prefix mask), rows dispatched vs standard top-k,
and compute-budget control. The task is next-token prediction on repeated random sequences, so
the loss must fall. Full pretraining (data, checkpoints, multi-rank) is the training entry point's
job (issue #3).
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--nulls", type=int, default=8)
    args = p.parse_args()
    if args.steps < 1 or args.nulls < 0 or args.topk < 1 or args.experts < 1:
        p.error("--steps, --experts and --topk must be >= 1, --nulls >= 0")

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nullmoe import (
        NullExpertConfig,
        dispatch_stats,
        routing_stats,
        set_vision_mask,
        update_null_budget,
        with_null_experts,
    )
    from megatron_nullmoe import parallel

    os.environ.setdefault("MASTER_PORT", str(parallel.free_port()))
    parallel.init_distributed(rank=0, world_size=1)
    parallel.init_model_parallel(seed=0)

    config = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_moe_experts=args.experts, moe_router_topk=args.topk, moe_layer_freq=[0, 1],
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=0.01, add_bias_linear=False, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    balanced = args.topk * args.experts / (args.experts + args.nulls)
    null = NullExpertConfig(num_null_experts=args.nulls, target_real_per_token=balanced)
    spec = with_null_experts(get_gpt_decoder_block_spec(config, use_transformer_engine=False), null)
    vocab, seq, batch = 64, 32, 8
    model = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=seq)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, vocab, (batch, seq // 2), generator=g)
    tokens = torch.cat([half, half], dim=1)  # second half repeats the first: learnable
    positions = torch.arange(seq).expand(batch, seq)
    vision = torch.zeros(batch, seq, dtype=torch.bool)
    vision[:, :8] = True  # stand-in: pretend the first 8 positions are image patches

    for step in range(1, args.steps + 1):
        set_vision_mask(model, vision[:, :-1])
        loss = model(tokens[:, :-1], positions[:, :-1], None, labels=tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        realised = update_null_budget(model)[0]
        if step == 1 or step % 10 == 0:
            stats = routing_stats(model, reset=True)["all"]
            by = stats.null_fraction_by_modality()
            print(f"step {step:3d}  loss {loss.item():.3f}  real/token {stats.real_per_token:.2f} "
                  f"(target {balanced:.2f}, budget step saw {realised:.2f})  null vision "
                  f"{by['vision']:.2f} text {by['text']:.2f}")
    rows = dispatch_stats(model)
    print(f"rows dispatched {rows.rows_dispatched} vs standard top-{args.topk} {rows.rows_topk} "
          f"({rows.rows_dispatched / rows.rows_topk:.2f})")
    parallel.shutdown()


if __name__ == "__main__":
    main()
