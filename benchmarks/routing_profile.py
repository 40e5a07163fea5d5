"""Where null-MoE's compute goes: per MoE layer, the share of tokens that run 0, 1, ..., k real
experts, and the gate mass a token's expert output is scaled by, for trained models of a sweep.

    python benchmarks/routing_profile.py [--runs runs/sweeps/text-study] [--variants top1,top2,null_keep]
                                         [--seeds 1,2,3] [--windows 64]

Each run's newest checkpoint becomes the exported model in memory (NullMoEForCausalLM, equal to the
megatron-core model), which reads `--windows` validation windows of 128 tokens of the run's own
validation text (the windows evaluation reads). A forward hook on every router records the picks
and gates. Per variant and layer, means over the seeds:
  tokens with j real experts   the share of tokens whose k picks held j real experts
  gate mass / token            the sum of a token's gates: the scale of its MoE output
  gate / real pick             gate mass over real picks: the scale of one expert's output
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def profile(model, windows: torch.Tensor, batch: int = 8) -> list[dict]:
    """Per MoE layer: the share of tokens by number of real picks, and the gate statistics."""
    routers = [m for m in model.modules() if type(m).__name__ == "NullMoERouter"]
    records: dict[int, list] = {i: [] for i in range(len(routers))}

    def hook_for(i):
        def hook(router, _inputs, out):
            index_TK, gates_TK = out
            records[i].append(((index_TK < router.num_real).sum(-1), gates_TK.sum(-1)))
        return hook

    hooks = [r.register_forward_hook(hook_for(i)) for i, r in enumerate(routers)]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch):
                model(windows[start:start + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, router in enumerate(routers):
        real_T = torch.cat([r for r, _ in records[i]])
        mass_T = torch.cat([g for _, g in records[i]]).float()
        share = torch.bincount(real_T, minlength=router.topk + 1).float() / real_T.numel()
        out.append({"share": share.tolist(), "mass": float(mass_T.mean()),
                    "per_pick": float(mass_T.sum() / max(int(real_T.sum()), 1)),
                    "real": float(real_T.float().mean())})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs/sweeps/text-study", type=Path)
    p.add_argument("--variants", default="top1,top2,null_keep")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--windows", type=int, default=64)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_nullmoe.export.source import hf_from_megatron, load_megatron, resolve
    from megatron_nullmoe.run.data.text import read_windows
    from megatron_nullmoe.run.source import single_process
    from megatron_nullmoe.run.tokenizer import Tokenizer

    single_process()
    seeds = [int(s) for s in a.seeds.split(",")]
    print("| variant | layer | tokens with 0 / 1 / ... / k real experts | real experts / token "
          "| gate mass / token | gate / real pick |")
    print("|---|---:|---|---:|---:|---:|")
    for variant in a.variants.split(","):
        per_seed = []
        for seed in seeds:
            source = resolve(a.runs / variant / f"seed{seed}")
            model = hf_from_megatron(load_megatron(source), source.tokenizer)[0].eval()
            windows = read_windows(source.cfg.data.valid_path, Tokenizer(source.tokenizer),
                                   128)[: a.windows, :128]
            per_seed.append(profile(model, windows))
            print(f"{variant}/seed{seed}: step {source.step}", file=sys.stderr)
        for layer in range(len(per_seed[0])):
            rows = [s[layer] for s in per_seed]
            share = [statistics.mean(r["share"][j] for r in rows)
                     for j in range(len(rows[0]["share"]))]
            mean = {k: statistics.mean(r[k] for r in rows) for k in ("real", "mass", "per_pick")}
            print(f"| {variant} | {layer + 1} | {' / '.join(f'{s:.2f}' for s in share)} | "
                  f"{mean['real']:.2f} | {mean['mass']:.3f} | {mean['per_pick']:.3f} |")
    print(f"\nmeans over seeds {a.seeds}; {a.windows} validation windows of 128 tokens per run")


if __name__ == "__main__":
    main()
