"""What computing only real picks buys at one MoE layer, as the vLLM plugin serves it: null-MoE
(k over E real + Z null slots) against top-k_b and top-1 over the same E experts, forward only,
at decode and prefill batch sizes, times and rows side by side in one run. Torch only, for a GPU
machine without vLLM (the GPU check's; `make bench-serve` measures vLLM end to end).

    python benchmarks/moe_rows_bench.py [--device cuda] [--dtype bf16] [--hidden 2048] \
        [--experts 64] [--nulls 64] [--target-real 1.0] [--tokens 16,64,256,4096] [--json F]

Shape legend: T tokens, H hidden, F expert FFN, E real experts, Z null slots, S = E + Z, K top-k,
R rows computed (real picks).

Each variant is the plugin's MoE block (megatron_nullmoe_vllm/routing.py's `picks` and
`real_rows`, the very functions vLLM runs): slot logits, top-k over the slots, one row per real
pick, the rows sorted by expert, SwiGLU experts as grouped GEMMs over the rows
(`torch._grouped_mm` on CUDA; a loop over experts elsewhere), each row's output added back to its
token. Top-k_b and top-1 are the same block with Z = 0, so the variants differ only in their
routing. The null slots' selection bias is set so that the routing picks --target-real real
experts per token on a calibration batch (the budget control's job in training). Random weights;
each round times every variant in turn (the order rotates), median of --iters; ratios to top-k_b
per round, reported as median [min, max] over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megatron_nullmoe_vllm.routing import picks, real_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Block:
    """One MoE layer's router and experts, computing only real picks."""

    def __init__(self, router_SH, w13_EHF2, w2_EFH, k: int, nulls: int, bias: float, grouped):
        E = w13_EHF2.shape[0]
        self.router_SH, self.w13_EHF2, self.w2_EFH = router_SH, w13_EHF2, w2_EFH
        self.grouped = grouped
        self.cfg = SimpleNamespace(topk=k, num_experts=E, score_function="softmax",
                                   pre_softmax=False, gate_normalization="renormalize",
                                   scaling_factor=None)
        self.bias_S = torch.zeros(E + nulls, device=router_SH.device)
        self.bias_S[E:] = bias
        self.nulls = nulls

    def logits(self, x_TH):
        logits = x_TH @ self.router_SH.T  # E real rows, then one shared null row
        E = self.cfg.num_experts
        return logits[:, :E] if not self.nulls else torch.cat(
            [logits[:, :E], logits[:, E:].expand(-1, self.nulls)], dim=-1)

    def route(self, x_TH):
        return picks(self.cfg, self.logits(x_TH).float(), self.bias_S)

    def __call__(self, x_TH):
        gates_TK, index_TK = self.route(x_TH)
        token_R, rows_R2 = real_rows(gates_TK, index_TK, self.cfg.num_experts)
        expert_R = rows_R2[:, 0].long()
        order = torch.argsort(expert_R, stable=True)
        token_R, expert_R, gate_R = token_R[order], expert_R[order], rows_R2[order, 1]
        x_RH = x_TH[token_R]
        counts_E = torch.bincount(expert_R, minlength=self.cfg.num_experts)
        out_RH = self.grouped(x_RH, counts_E, self.w13_EHF2, self.w2_EFH)
        out_TH = torch.zeros_like(x_TH)
        return out_TH.index_add_(0, token_R, out_RH * gate_R[:, None].to(out_RH.dtype)), len(order)


def swiglu(h_RF2):
    gate, up = h_RF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_mm(x_RH, counts_E, w13_EHF2, w2_EFH):
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    h = torch._grouped_mm(x_RH, w13_EHF2, offs=offs)
    return torch._grouped_mm(swiglu(h), w2_EFH, offs=offs)


def looped(x_RH, counts_E, w13_EHF2, w2_EFH):
    out, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            out.append(swiglu(x_RH[start:start + n] @ w13_EHF2[e]) @ w2_EFH[e])
        start += n
    return torch.cat(out) if out else x_RH.new_zeros(0, w2_EFH.shape[-1])


def calibrate(block: Block, x_TH, target: float) -> float:
    """The null slots' selection bias giving `target` real picks per token on x_TH (bisection;
    more bias, more null picks)."""
    lo, hi = -30.0, 30.0
    for _ in range(40):
        block.bias_S[block.cfg.num_experts:] = mid = (lo + hi) / 2
        real = (block.route(x_TH)[1] < block.cfg.num_experts).sum(-1).float().mean().item()
        lo, hi = (mid, hi) if real > target else (lo, mid)
    return mid


def timed(fn, x, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def spread(values) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=1024, help="each expert's FFN size")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--nulls", type=int, default=64)
    p.add_argument("--k", type=int, default=2, help="the null-MoE's and the baseline's top-k")
    p.add_argument("--target-real", type=float, default=1.0)
    p.add_argument("--tokens", default="16,64,256,4096", help="batch sizes, comma-separated")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if not 0 < a.target_real < a.k:
        p.error(f"--target-real={a.target_real} is not valid: between 0 and --k={a.k}")
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    tokens = [int(t) for t in a.tokens.split(",")]
    torch.manual_seed(0)
    H, Fe, E = a.hidden, a.ffn, a.experts
    router_SH = torch.randn(E + 1, H, device=device, dtype=dtype) * H ** -0.5
    w13_EHF2 = torch.randn(E, H, 2 * Fe, device=device, dtype=dtype) * H ** -0.5
    w2_EFH = torch.randn(E, Fe, H, device=device, dtype=dtype) * Fe ** -0.5
    grouped, path = looped, "a loop over experts"
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        try:  # the kernel takes bf16 on sm90+; anything else falls back to the loop
            x = torch.randn(8, H, device=device, dtype=dtype)
            grouped_mm(x, torch.tensor([8] + [0] * (E - 1), device=device), w13_EHF2, w2_EFH)
            grouped, path = grouped_mm, "torch._grouped_mm"
        except (RuntimeError, NotImplementedError) as err:
            path = f"a loop over experts (torch._grouped_mm: {str(err).splitlines()[0][:80]})"
    variants = {"null": Block(router_SH, w13_EHF2, w2_EFH, a.k, a.nulls, 0.0, grouped),
                f"top{a.k}": Block(router_SH[:E], w13_EHF2, w2_EFH, a.k, 0, 0.0, grouped),
                "top1": Block(router_SH[:E], w13_EHF2, w2_EFH, 1, 0, 0.0, grouped)}
    base = f"top{a.k}"
    calib = torch.randn(4096, H, device=device, dtype=dtype)
    bias = calibrate(variants["null"], calib, a.target_real)
    result = {"args": vars(a), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "experts_by": path, "null_bias": bias,
              "batches": {}}
    print(f"MoE layer forward, {result['device']}, {a.dtype}: H={H}, E={E} SwiGLU experts of FFN "
          f"{Fe} ({path}); null: k={a.k} over {E} + {a.nulls} slots at {a.target_real} real per "
          f"token; {a.rounds} rounds x {a.iters} iters, ratios median [min, max] over rounds")
    print(f"| T | model | rows/token | ms | {base} / model |")
    print("|---:|---|---:|---:|---:|")
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, H, device=device, dtype=dtype)
            names = list(variants)
            ms = {n: [] for n in names}
            rows = {n: variants[n](x)[1] / T for n in names}
            for r in range(a.rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    ms[n].append(timed(lambda x, n=n: variants[n](x), x, device, a.warmup, a.iters))
            entry = {}
            for n in names:
                speed = [b / m for b, m in zip(ms[base], ms[n])]
                entry[n] = {"rows_per_token": rows[n], "ms": statistics.median(ms[n]),
                            "speedup_vs_base": speed}
                print(f"| {T} | {n} | {rows[n]:.2f} | {statistics.median(ms[n]):.3f} | "
                      f"{spread(speed)} |")
            result["batches"][T] = entry
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
