"""End-to-end training tokens/s of the demo VLM, null-MoE vs plain MoE at matched expected FLOPs.

    .venv/bin/python benchmarks/train_throughput.py [--steps 40] [--repeats 2] [--ranks 2]
        [--seeds 1234,1,2] [--configs a,b,c]

Runs the real trainer (torchrun, expert parallel = ranks, gloo on CPU) on the demo recipe for:
  (a) plain  top-k_b=2, Z=0   megatron-core's standard routing (our router at Z=0 equals TopKRouter)
  (b) null   top-k=4,  Z=8    iso-FLOP partner of (a): 4 * 8 / (8 + 8) = 2 real experts per token
  (c) plain  top-k=4,  Z=0    what (b) would cost without null slots
Runs are interleaved (a b c a b c ...) so that machine noise hits all alike; the table reports each
configuration's median tokens/s (first logged interval excluded) and ratios to (a).
Needs the demo data (make demo-data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "(a) plain top-2, Z=0": ["model.router_topk=2", "model.null_experts.num_null_experts=0"],
    "(b) null top-4, Z=8": ["model.router_topk=4", "model.null_experts.num_null_experts=8"],
    "(c) plain top-4, Z=0": ["model.router_topk=4", "model.null_experts.num_null_experts=0"],
}


def one_run(name: str, overrides: list[str], steps: int, ranks: int, data: str, tmp: Path,
            seed: int) -> dict:
    run_dir = tmp / f"{name[:3].strip('()')}_{len(list(tmp.iterdir()))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", "-m", "megatron_nullmoe.train",
           "--config", str(ROOT / "examples/demo_vlm.yaml"), *overrides, f"steps={steps}",
           f"parallel.expert={ranks}", f"data.path={data}", f"dir={run_dir}",
           "logging.progress_bar=false", "logging.tensorboard=false", "logging.eval_every=0",
           "logging.log_every=10", "checkpoint.save_every=0", f"seed={seed}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--data", default=str(ROOT / "data/demo"))
    p.add_argument("--seeds", default="1234", help="comma-separated model/data seeds")
    p.add_argument("--configs", default="a,b,c", help="which of (a), (b), (c) to run")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    configs = {n: o for n, o in CONFIGS.items() if n[1] in a.configs.split(",")}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.repeats):
            for seed in seeds:
                for name, overrides in configs.items():
                    results[name].append(
                        one_run(name, overrides, a.steps, a.ranks, a.data, Path(tmp), seed))
    base_name = next(iter(results))
    base = statistics.median(r["tokens_per_s"] for r in results[base_name])
    print(f"demo VLM, {a.ranks} ranks (EP={a.ranks}), {a.steps} steps, seeds {seeds}, "
          f"{a.repeats} interleaved repeats")
    print(f"| config | tokens/s (median) | vs {base_name[:3]} | real experts/token | "
          "rows / top-k rows | final loss (mean ± sd over runs) |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in runs)
        real = statistics.mean(r["real_experts_per_token"] for r in runs)
        rows = statistics.mean(r["rows_dispatched"] / r["rows_standard_topk"] for r in runs)
        losses = [r["final_train_loss"] for r in runs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        print(f"| {name} | {tps:.0f} | {tps / base:.2f} | {real:.2f} | {rows:.2f} | "
              f"{statistics.mean(losses):.3f} ± {sd:.3f} |")


if __name__ == "__main__":
    main()
