"""Issue 33's serving benchmark: vLLM prefill and decode tokens/s of a null-MoE against top-2 and
top-1 of the same size, with the expert rows computed per token, side by side in one run.

    make setup-vllm && make bench-serve
    .venv-vllm/bin/python benchmarks/serve_bench.py [--rounds 3] [--hidden 512] [--json out.json]
    # a GPU's shape (untried: the GPU check's machine has no vLLM; see moe_rows_bench.py there)
    .venv-vllm/bin/python benchmarks/serve_bench.py --dtype bfloat16 --hidden 2048 --experts 64 \
        --nulls 64 --batch 64 --decode-tokens 128

Models (random weights, exported by the project's export as tests/_vllm_reference.py builds them,
in a process of their own): a GPT of --layers MoE layers, width --hidden over heads of 64 (a head
size vLLM's CPU attention takes), E = --experts (8) experts of FFN --ffn, GELU, vocabulary 96 (so
the MoE layers hold most of the compute); null: k = 2 over E real + --nulls (8) null slots (shared
null logit, the budget bias at 0.15 as in tests/_models.py); top2 and top1: no null slots. Real
experts per token are counted on the prefill batch through the export's own remote code (its
routers' picks).

Timing: vLLM in this process, --dtype (fp32 by default), eager, prefix caching off. Prefill:
--batch prompts of --prompt-len random tokens, one new token; decode: --batch prompts of 16
tokens, (t(1 + N) - t(1)) for N = --decode-tokens new tokens each, end of text ignored. Each
round starts each model's engine in turn (the order rotates) and takes the median of --repeats
timings; ratios to top2 are taken per round and reported as median [min, max] over rounds (a
shared, noisy machine).

The plugin hands vLLM's fused-MoE kernel only the real picks, one row each
(megatron_nullmoe_vllm/routing.py): kernel rows/token is counted inside the served model
(`routed_rows`, over the prefill timings' batches), beside the real experts/token the export's
remote code chose on the same prompts. The stock top-2 and top-1 exports run through the same
plugin (no null slots: every pick real), so the three differ only in their routing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def models(args) -> dict:
    """name -> (k, null slots)"""
    return {"null": (2, args.nulls), "top2": (2, 0), "top1": (1, 0)}
PROMPT_SEED = 0


def build(args) -> None:
    """In a process of its own (megatron-core's parallel state and vLLM's engine each set up
    torch.distributed): the three exports and their real experts per prefill token."""
    import torch

    from megatron_nullmoe import NullExpertConfig, parallel
    from megatron_nullmoe._mcore import cpu as cpu_compat
    from megatron_nullmoe.export.hf import export_gpt
    from megatron_nullmoe.export.source import load_hf
    from megatron_nullmoe.run.tokenizer import train_tokenizer
    from tests._models import build_gpt

    cpu_compat.enable()
    os.environ["MASTER_PORT"] = str(parallel.free_port())
    parallel.init_distributed(rank=0, world_size=1, backend="gloo")
    parallel.init_model_parallel(seed=1234)
    out = Path(args.build)
    tokenizer = train_tokenizer([f"word{i} and more words {i * 7}" for i in range(200)],
                                out / "tok.model", vocab_size=96)
    ids = prompts(args)["prefill"]
    real = {}
    for name, (k, nulls) in models(args).items():
        model = build_gpt(NullExpertConfig(num_null_experts=nulls), layers=args.layers,
                          topk=k, experts=args.experts, seq=args.max_len, hidden_size=args.hidden,
                          num_attention_heads=args.hidden // 64, ffn_hidden_size=args.ffn,
                          moe_ffn_hidden_size=args.ffn, init_method_std=0.02,
                          moe_router_pre_softmax=k == 1)  # megatron-core requires it at k = 1
        export_gpt(model, tokenizer, out / name, {"source": "benchmarks/serve_bench.py"},
                   overwrite=True)
        hf_model, _ = load_hf(out / name)
        picks = []
        for module in hf_model.modules():
            if type(module).__name__ == "NullMoERouter":
                module.register_forward_hook(lambda m, i, o: picks.append(o[0] < m.num_real))
        with torch.no_grad():
            hf_model(torch.tensor(ids))
        real[name] = float(torch.stack([p.float().sum(-1).mean() for p in picks]).mean())
    (out / "real.json").write_text(json.dumps(real))


def prompts(args) -> dict:
    import random

    rng = random.Random(PROMPT_SEED)
    return {"prefill": [[rng.randrange(4, 96) for _ in range(args.prompt_len)]
                        for _ in range(args.batch)],
            "decode": [[rng.randrange(4, 96) for _ in range(16)] for _ in range(args.batch)]}


def timed(llm, ids, new_tokens: int) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    return time.perf_counter() - start


def measure(export: Path, args) -> dict:
    from vllm import LLM

    from megatron_nullmoe_vllm.model import routed_rows

    llm = LLM(model=str(export), dtype=args.dtype, enforce_eager=True, max_model_len=args.max_len,
              trust_remote_code=True, seed=0, enable_prefix_caching=False)
    try:
        p = prompts(args)
        timed(llm, p["decode"], 2)  # warm-up
        prefill, decode = [], []
        for _ in range(args.repeats):
            llm.apply_model(partial(routed_rows, reset=True))
            prefill.append(args.batch * args.prompt_len / timed(llm, p["prefill"], 1))
            (tokens, rows), = llm.apply_model(routed_rows)
            one = timed(llm, p["decode"], 1)
            decode.append(args.batch * args.decode_tokens
                          / (timed(llm, p["decode"], 1 + args.decode_tokens) - one))
        return {"prefill": statistics.median(prefill), "decode": statistics.median(decode),
                "rows_per_token": rows / tokens}
    finally:
        del llm
        gc.collect()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--nulls", type=int, default=8, help="the null-MoE's null slots")
    p.add_argument("--dtype", default="float32", help="vLLM's dtype (bfloat16 on a GPU)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--build", help=argparse.SUPPRESS)  # internal: the export-building process
    args = p.parse_args(argv)
    if args.hidden % 64:
        p.error(f"--hidden={args.hidden} is not valid: heads are of size 64, so a multiple of 64")
    if args.build:
        return build(args)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # one engine start per model and round
    with tempfile.TemporaryDirectory() as tmp:
        built = subprocess.run([sys.executable, __file__, *(argv if argv is not None
                                                            else sys.argv[1:]), "--build", tmp],
                               capture_output=True, text=True)
        if built.returncode:
            sys.exit(f"building the exports failed:\n{built.stderr[-3000:]}")
        real = json.loads((Path(tmp) / "real.json").read_text())
        names = list(models(args))
        runs = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                runs[n].append(measure(Path(tmp) / n, args))
                print(f"round {r + 1} {n}: {runs[n][-1]}", file=sys.stderr, flush=True)
    import torch

    where = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
             else f"CPU ({os.cpu_count()} cores)")
    print(f"vLLM serving, {where}, {args.dtype}: {args.layers} MoE layers, hidden "
          f"{args.hidden}, E = {args.experts} experts of FFN {args.ffn}; prefill {args.batch} x "
          f"{args.prompt_len} tokens, decode {args.batch} x {args.decode_tokens} new tokens; "
          f"{args.rounds} rounds x {args.repeats} repeats, ratios: median [min, max] over rounds")
    print("| model | kernel rows/token | real experts/token (routing) | prefill tok/s | vs top2 "
          "| decode tok/s | vs top2 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    result = {"args": vars(args), "models": {}}
    for n in names:
        k, nulls = models(args)[n]
        row = {"k": k, "null_slots": nulls, "real_experts_per_token": real[n],
               "kernel_rows_per_token": statistics.median(m["rows_per_token"] for m in runs[n])}
        for phase in ("prefill", "decode"):
            row[phase] = statistics.median(m[phase] for m in runs[n])
            row[f"{phase}_vs_top2"] = [m[phase] / t[phase] for m, t in zip(runs[n], runs["top2"])]
        result["models"][n] = row
        label = f"{n} (k = {k}" + (f" over {args.experts} + {nulls})" if nulls else ")")
        print(f"| {label} | {row['kernel_rows_per_token']:.2f} | {real[n]:.2f} | "
              f"{row['prefill']:,.0f} | "
              f"{spread(row['prefill_vs_top2'])} | {row['decode']:,.1f} | "
              f"{spread(row['decode_vs_top2'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
