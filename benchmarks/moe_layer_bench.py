"""MoE layer forward+backward on CPU: megatron-core top-k_b vs null-MoE at matched expected FLOPs.

Variants, measured side by side in one run (rounds interleave the variants, medians reported):
  (a) megatron-core MoELayer + TopKRouter at top-k_b (its own alltoall dispatcher on 1 rank; on
      several ranks our dispatcher, because the stock one cannot run on CPU across ranks)
  (b) null-MoE at matched expected FLOPs: k, Z with k*E/(E+Z) = k_b, timed at the rate k_b
      itself: before warm-up its null budget bias is placed (bisection over the bias, on the very
      input and weights the timed steps use) where the input dispatches T*k_b real rows, so the
      match holds in fact, not only in expectation
  (c) the same k as (b) with Z = 0 (plain top-k with our router and dispatcher)

Why placed, not left to the budget control: with one fixed input and no optimizer the sign
control only dithers around the target, by its step's worth of rows, and where the warm-up
happens to stop it sets the timed rate (it stopped at 4399 rows for a target of 4096, +7.4%).
The timed steps' rows are checked against T*k_b (summed over ranks): more than --rows-tolerance
off and the run prints OFF TARGET and exits 1, with the JSON written. Time per real row is
reported beside the ratio; rounds rotate the variants' order, and the ratio is also given as the
median of per-round ratios (robust to load that drifts on a shared machine).

Also counted, per forward of each variant: device-to-host syncs by op
(megatron_nullmoe.host_syncs.count_host_syncs, any device) and, on CUDA, the syncs
torch.cuda.set_sync_debug_mode("warn") reports (the real ones).

Usage:  python benchmarks/moe_layer_bench.py [--ranks 1|2] [--tokens 2048] [--hidden 256] ...
        python benchmarks/moe_layer_bench.py --device cuda --dtype bf16 --json out.json \
            --hidden 2048 --ffn 1024 --experts 64 --topk-base 4 --topk 8 --nulls 64 --tokens 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def build(variant, args, ep):
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nullmoe import NullExpertConfig, _mcore, null_moe_layer
    from megatron_nullmoe.layer import install_null_dispatcher

    k = args.topk_base if variant == "a" else args.topk
    config = TransformerConfig(
        num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=4,
        num_moe_experts=args.experts, moe_router_topk=k, moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=ep, add_bias_linear=False, use_cpu_initialization=True,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
    )
    if variant == "a":
        spec = _mcore.moe_module_spec(use_te=False, num_experts=args.experts, grouped_gemm=False)
        layer = MoELayer(config, _mcore.moe_parts(spec)[1], layer_number=1)
        if ep > 1:  # megatron's alltoall keeps split sizes as tensors on CPU: cannot run
            from megatron_nullmoe.dispatch import NullAlltoAllDispatcher
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            layer.token_dispatcher = NullAlltoAllDispatcher(
                layer.num_local_experts, layer.local_expert_indices, config,
                get_default_pg_collection(),
            )
        return layer, config
    nulls = args.nulls if variant == "b" else 0
    target = args.topk_base if variant == "b" else None
    nc = NullExpertConfig(num_null_experts=nulls, target_real_per_token=target, budget_update_rate=0.1)
    return null_moe_layer(config, nc), config


def step(layer, x):
    out, _ = layer(x)
    out.float().pow(2).mean().backward()


def synced(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def count_syncs(layer, x) -> dict:
    """Host syncs of one forward: by op name (any device) and, on CUDA, the real ones."""
    from megatron_nullmoe.host_syncs import count_host_syncs

    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if x.is_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad(), count_host_syncs() as syncs:
                layer(x)
        finally:
            if x.is_cuda:
                torch.cuda.set_sync_debug_mode("default")
    out["by_op"], out["total"] = dict(syncs.by_op), syncs.total
    if x.is_cuda:
        real = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        out["cuda_sync_warnings"] = len(real)
        out["cuda_sync_examples"] = sorted(set(m.splitlines()[0][:160] for m in real))[:5]
    return out


def summed(values, device) -> list:
    """`values` summed over ranks, on `device` (gloo reduces CPU tensors, NCCL CUDA ones)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def rows(layer, device):
    """(rows dispatched, rows computed) per step, summed over ranks; None for the stock
    dispatcher (it counts nothing: T*k_b rows by construction)."""
    stats = getattr(layer.token_dispatcher, "stats", None)
    if stats is None or not stats.steps:
        return None
    return [n / stats.steps for n in summed([stats.rows_dispatched, stats.rows_computed], device)]


@torch.no_grad()
def place_null_bias(layer, x, target_rows: int) -> int:
    """Sets the null budget bias of `layer`'s router where `x` dispatches `target_rows` real rows
    (summed over ranks; as close as the input allows), and returns the rows it dispatches there.

    For a fixed input and fixed weights the real rows are a step function of the bias, falling
    as it rises (a null slot's selection value rises with it), so a bracket and a bisection find
    it. Only the router runs, in training mode without grad: the router counts nothing then
    (budget counts, statistics), and selection sees the bias in the router's own dtype and
    rounding. Every rank takes the same path: each count is summed over ranks before it is used."""
    router, bias = layer.router, layer.router.null_budget_bias

    def real_rows(b: float) -> int:
        bias.fill_(b)
        _, map_TE = router(x)
        return round(summed([map_TE.sum().item()], x.device)[0])

    lo, hi = -1.0, 1.0
    for _ in range(64):  # low enough that every token picks k real experts
        if real_rows(lo) >= target_rows:
            break
        lo *= 2
    for _ in range(64):  # high enough that nulls take at least T*(k - k_b) picks
        if real_rows(hi) <= target_rows:
            break
        hi *= 2
    for _ in range(60):  # a float32 bias: lo and hi are adjacent long before 60 halvings
        mid = (lo + hi) / 2
        n = real_rows(mid)
        if n == target_rows:
            return n
        lo, hi = (mid, hi) if n > target_rows else (lo, mid)
    best = min((lo, hi), key=lambda b: abs(real_rows(b) - target_rows))
    return real_rows(best)


def main(rank=0, world=1, args=None):
    from megatron_nullmoe import parallel

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if world > 1 or not torch.distributed.is_initialized():
        parallel.init_distributed(rank=rank, world_size=world,
                                  backend="nccl" if device.type == "cuda" else "gloo")
    parallel.init_model_parallel(ep=world, seed=5)
    torch.manual_seed(5 + rank)
    seq = args.tokens // args.batch
    tokens = seq * args.batch
    target = tokens * args.topk_base * world  # real rows per step, all ranks
    x = torch.randn(seq, args.batch, args.hidden, device=device, dtype=dtype)
    layers = {v: build(v, args, world)[0].to(device=device, dtype=dtype) for v in "abc"}
    placed = place_null_bias(layers["b"], x, target)

    for _ in range(args.warmup):  # the bias stays where it was placed: no budget step here
        for layer in layers.values():
            step(layer, x)
            layer.zero_grad(set_to_none=True)
    for layer in layers.values():
        if getattr(layer.token_dispatcher, "stats", None):
            layer.token_dispatcher.stats.reset()

    order = list(layers)
    times = {v: [] for v in layers}
    for r in range(args.rounds):  # rotate the order: no variant always runs first or after (c)
        for v in order[r % len(order):] + order[: r % len(order)]:
            layer = layers[v]
            synced(device)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            step(layer, x)
            synced(device)
            torch.distributed.barrier()
            times[v].append(time.perf_counter() - t0)
            layer.zero_grad(set_to_none=True)
    syncs = {v: count_syncs(layer, x) for v, layer in layers.items()}
    counted = {v: rows(layer, device) for v, layer in layers.items()}
    if rank != 0:
        return None
    return report(args, world, device, times, counted, syncs, target, placed)


def report(args, world, device, times, counted, syncs, target, placed) -> dict:
    """Prints the table (rows per rank per step, time per real row, ratios to (a)), writes the
    JSON, and exits 1 when (b)'s timed rows are more than --rows-tolerance off the target."""
    tokens = args.tokens // args.batch * args.batch
    med = {v: statistics.median(t) for v, t in times.items()}
    paired = {v: statistics.median(t / a for t, a in zip(times[v], times["a"])) for v in times}
    disp = {v: (r[0] if r else target) / world for v, r in counted.items()}
    comp = {v: (r[1] if r else target) / world for v, r in counted.items()}
    off = disp["b"] * world / target - 1.0
    print(f"\nMoE layer fwd+bwd, {device.type} {args.dtype}, {world} rank(s) (EP={world}), "
          f"{tokens} tokens/rank, H={args.hidden}, FFN={args.ffn}, E={args.experts}, "
          f"threads/rank={torch.get_num_threads()}, {args.rounds} rounds (median)")
    print(f"{'variant':44s} {'rows disp/step':>14s} {'rows comp/step':>14s} {'ms':>8s} "
          f"{'us/real row':>11s} {'vs (a)':>7s} {'paired':>7s}")
    labels = {
        "a": f"(a) megatron TopKRouter k={args.topk_base}",
        "b": f"(b) null-MoE k={args.topk} Z={args.nulls} (budget {args.topk_base})",
        "c": f"(c) null-MoE code k={args.topk} Z=0",
    }
    for v in "abc":
        star = "" if counted[v] else "*"
        print(f"{labels[v]:44s} {f'{disp[v]:.0f}{star}':>14s} {f'{comp[v]:.0f}{star}':>14s} "
              f"{med[v] * 1e3:8.1f} {med[v] * 1e6 / disp[v]:11.2f} {med[v] / med['a']:7.3f} "
              f"{paired[v]:7.3f}")
    flag = "" if abs(off) <= args.rows_tolerance else "   OFF TARGET"
    print(f"(b) rows/step {disp['b']:.0f} vs target {target / world:.0f} per rank ({off:+.2%}, "
          f"tolerance {args.rows_tolerance:.1%}; placed bias gave {placed / world:.0f}){flag}")
    print(f"(b)/(c) time {med['b'] / med['c']:.2f}; ideal real-row ratio "
          f"{disp['b'] / disp['c']:.2f}   (* stock dispatcher: T*k by construction)")
    print("host syncs per forward: " + "; ".join(
        f"({v}) {s['total']}" + (f", CUDA-reported {s['cuda_sync_warnings']}" if "cuda_sync_warnings" in s
                                 else "") for v, s in syncs.items()))
    result = {"device": device.type, "dtype": args.dtype, "ranks": world, "tokens": tokens,
              "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts,
              "rows_target_per_step": target / world, "rows_off_target": off,
              "rows_tolerance": args.rows_tolerance, "rows_on_target": not flag, "variants": {}}
    for v in "abc":
        result["variants"][v] = {
            "label": labels[v], "ms_fwd_bwd": med[v] * 1e3,
            "ms_rounds": [t * 1e3 for t in times[v]],
            "us_per_real_row": med[v] * 1e6 / disp[v], "vs_a": med[v] / med["a"],
            "vs_a_paired_median": paired[v],
            "rows_dispatched_per_step": disp[v], "rows_computed_per_step": comp[v],
            "rows_from": ("dispatcher stats, mean over ranks" if counted[v]
                          else "stock dispatcher: T*k_b by construction"),
            "host_syncs_per_forward": syncs[v]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if flag:
        raise SystemExit(f"(b) timed {disp['b']:.0f} rows/step, {off:+.2%} off the target "
                         f"{target / world:.0f}: not at the iso-FLOP point")
    return result


def _spawned(rank, world, args):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    main(rank, world, args)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk-base", type=int, default=2)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--nulls", type=int, default=8)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--threads", type=int, help="torch threads of a 1-rank run (default: torch's; "
                   "1 is steadier on a machine whose cores other work shares)")
    p.add_argument("--rows-tolerance", type=float, default=0.01,
                   help="largest relative gap of (b)'s timed rows from T*k_b before the run fails")
    a = p.parse_args()
    from megatron_nullmoe.flops import expected_real
    from megatron_nullmoe.parallel import free_port

    # exact: a correctly rounded quotient that is a whole number k_b is k_b
    real = expected_real(topk=a.topk, num_experts=a.experts, num_null=a.nulls)
    if real != a.topk_base:
        raise SystemExit(f"not iso-FLOP: k*E/(E+Z) = {real} != k_b = {a.topk_base}")

    os.environ["MASTER_PORT"] = str(free_port())
    if a.ranks == 1:
        torch.set_num_threads(a.threads or max(1, torch.get_num_threads()))
        main(0, 1, a)
    else:
        import torch.multiprocessing as mp

        os.environ["OMP_NUM_THREADS"] = "1"
        mp.start_processes(_spawned, args=(a.ranks, a), nprocs=a.ranks, start_method="spawn")
