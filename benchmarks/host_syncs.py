"""Device-to-host syncs per MoE layer forward and per budget-control step, counted by op.

Counts what would wait for the GPU (megatron_nullmoe.host_syncs), on CPU over gloo: a null MoE
layer (E = 8 + Z = 8 null slots, top-4, budget control on) built from megatron-core's local
experts, one training forward + backward per dispatcher and expert-parallel size, then one
`update_null_budget` step for a 4-layer model's routers.

Usage:  python benchmarks/host_syncs.py            (prints a table; --json for one JSON line)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

CASES = (("alltoall", 1), ("alltoall", 2), ("allgather", 2))


def count_case(rank: int, world: int, dispatcher: str) -> dict:
    from megatron_nullmoe import NullExpertConfig, parallel, update_null_budget
    from megatron_nullmoe.host_syncs import count_host_syncs
    from tests._models import HIDDEN, build_layer, moe_config

    parallel.init_model_parallel(ep=world, seed=3)
    config = moe_config(num_experts=8, topk=4, dispatcher=dispatcher, ep=world)
    nc = NullExpertConfig(num_null_experts=8, target_real_per_token=2.0)
    layer = build_layer(config, nc)
    x = torch.randn(16, 4, HIDDEN, requires_grad=True)
    layer(x)[0].sum().backward()  # warm-up: first-call work is not the steady state
    with count_host_syncs() as fwd:
        out, _ = layer(x)
    with count_host_syncs() as bwd:
        out.sum().backward()
    layers = [build_layer(config, nc) for _ in range(4)]
    for l in layers:
        l(x)
    with count_host_syncs() as budget:
        update_null_budget(torch.nn.ModuleList(layers))
    return {"forward": dict(fwd.by_op), "backward": dict(bwd.by_op),
            "budget_step_4_layers": dict(budget.by_op)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from megatron_nullmoe import parallel
    from tests._dist import run_ranks
    import tempfile

    rows = {}
    for dispatcher, world in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            if world == 1:
                os.environ.setdefault("MASTER_PORT", str(parallel.free_port()))
                parallel.init_distributed(rank=0, world_size=1, backend="gloo")
                rows[f"{dispatcher} EP{world}"] = count_case(0, 1, dispatcher)
                parallel.shutdown()
            else:
                from pathlib import Path

                rows[f"{dispatcher} EP{world}"] = run_ranks(world, count_case, (dispatcher,),
                                                            Path(tmp))[0]
    if args.json:
        print(json.dumps(rows))
        return
    print("| case | forward | backward | budget step (4 layers) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        cells = [f"{sum(r[k].values())} {r[k]}" for k in ("forward", "backward",
                                                        "budget_step_4_layers")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
