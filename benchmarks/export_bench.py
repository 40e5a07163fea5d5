"""Issue 18's numbers: the export's exactness, and what skipping null picks buys at inference.

    python benchmarks/export_bench.py exactness
    python benchmarks/export_bench.py speed [--runs runs/sweeps/text-study] [--seed 1]

exactness: megatron-core GPTs with random weights (tests/_models.build_gpt: std 0.2, budget and
expert biases set) in every gate normalisation x null-logit mode x pre-softmax, converted to
NullMoEForCausalLM; max |logits difference| in fp32 on 3 x 16 tokens, and real experts per token.

speed: the text study's trained models of one seed (`make text-study` makes them): null_keep
(k = 2 over 8 + 8 slots, budget 1 real expert per token), top2 and top1 (the same shape: 4 layers
of width 128, E = 8 experts of FFN 512), each exported to NullMoEForCausalLM in memory, on CPU with
one thread. Prefill: a batch of 8 x 128 tokens of the study's validation text, no cache; decode:
64 greedy tokens after a 16-token prompt of it, KV cache. Rounds interleave the models (this machine is noisy) and the table
gives medians and ratios to top-2. The budget-controlled null_keep model cannot be exported to
Mixtral exactly (its selection bias has no place there), so its "zero experts computed" cost is
top-2's: both run two expert FFNs per token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _single_rank() -> None:
    from megatron_nullmoe.run.source import single_process

    single_process()


def exactness() -> None:
    from megatron_nullmoe import NullExpertConfig
    from megatron_nullmoe.export.check import mcore_logits
    from megatron_nullmoe.export.hf import hf_config, hf_state_dict
    from megatron_nullmoe.export.hf_code.configuration_nullmoe import NullMoEConfig
    from megatron_nullmoe.export.hf_code.modeling_nullmoe import NullMoEForCausalLM
    from tests._models import VOCAB, build_gpt

    _single_rank()
    ids = torch.randint(4, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    print("| gates | null logits | pre-softmax | k | budget bias | max abs diff | real experts/token |")
    print("|---|---|---|---:|---|---:|---:|")
    for gate in ("renormalize", "keep_null_share"):
        for logits in ("shared", "per_expert"):
            for pre, k in ((False, 2), (True, 2), (True, 1)):
                null = NullExpertConfig(num_null_experts=4, null_logits=logits,
                                        gate_normalization=gate, target_real_per_token=1.0)
                model = build_gpt(null, topk=k, moe_router_pre_softmax=pre)
                hf = NullMoEForCausalLM(NullMoEConfig(**hf_config(model)))
                hf.load_state_dict(hf_state_dict(model))
                with torch.no_grad():
                    out = hf.eval()(ids, use_cache=False)
                diff = float((out.logits - mcore_logits(model, ids)).abs().max())
                print(f"| {gate} | {logits} | {pre} | {k} | 0.15 | {diff:.1e} | "
                      f"{float(out.real_experts_per_token):.2f} |")


def vlm_exactness() -> None:
    """The demo VLM at test size (tests/_train.TINY), random weights of std 0.1, budget bias 0.15:
    NullMoEForConditionalGeneration against megatron-core's LLaVAModel on 3 random images."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_nullmoe.export.vlm import hf_vlm_from_megatron, mcore_vlm_logits, sample_inputs
    from megatron_nullmoe.run.config import load_config
    from megatron_nullmoe.run.model import build_model
    from tests._train import ROOT, TINY

    print("\n| VLM gates | null logits | decoder | max abs diff |")
    print("|---|---|---|---:|")
    mixtral = ["model.normalization=RMSNorm", "model.position_embedding=rope",
               "model.activation=swiglu", "model.num_query_groups=2"]
    for gate in ("renormalize", "keep_null_share"):
        for logits, arch in (("shared", []), ("per_expert", []), ("shared", mixtral)):
            cfg = load_config(str(ROOT / "examples" / "demo_vlm.yaml"), TINY + [
                "model.null_experts.target_real_per_token=2.0",
                f"model.null_experts.gate_normalization={gate}",
                f"model.null_experts.null_logits={logits}", *arch])
            model, _ = build_model(cfg, 96, ProcessGroupCollection.use_mpu_process_groups(),
                                   torch.float32, use_te=False)
            g = torch.Generator().manual_seed(11)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                for layer in model.language_model.decoder.layers:
                    layer.mlp.router.null_budget_bias.fill_(0.15)
            model.eval()
            hf = hf_vlm_from_megatron(model)[0].eval()
            images, ids = sample_inputs(model, 10, 3)
            with torch.no_grad():
                got = hf(input_ids=ids, pixel_values=images, use_cache=False).logits
            diff = float((got - mcore_vlm_logits(model, images, ids)).abs().max())
            print(f"| {gate} | {logits} | {'RMSNorm rope SwiGLU GQA' if arch else 'LayerNorm learned GELU'} "
                  f"| {diff:.1e} |")


def speed(runs: Path, seed: int, rounds: int) -> None:
    from megatron_nullmoe.export.source import hf_from_megatron, load_megatron, resolve

    torch.set_num_threads(1)
    models = {}
    for variant in ("null_keep", "top2", "top1"):
        folder = runs / variant / f"seed{seed}"
        source = resolve(folder)
        models[variant] = hf_from_megatron(load_megatron(source), source.tokenizer)[0]
        print(f"{variant}: {folder} (step {source.step})", file=sys.stderr)
    from megatron_nullmoe.run.data.text import read_windows
    from megatron_nullmoe.run.tokenizer import Tokenizer

    # real text: the study's own validation windows (the budget bias was learnt on such text)
    windows = read_windows(source.cfg.data.valid_path, Tokenizer(source.tokenizer), 128)
    prefill_ids = windows[:8, :128]
    prompt = windows[8:9, :16]
    times = {name: {"prefill": [], "decode": []} for name in models}
    real = {}
    with torch.no_grad():
        for name, m in models.items():  # warm-up, and the real experts per token of prefill
            m.reset_routing_totals()
            m(prefill_ids, use_cache=False)
            real[name] = m.routing_totals()["real_experts_per_token"]
        for _ in range(rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(prefill_ids, use_cache=False)
                times[name]["prefill"].append(prefill_ids.numel() / (time.perf_counter() - start))
                start = time.perf_counter()
                m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                           min_new_tokens=64, do_sample=False, pad_token_id=0)
                times[name]["decode"].append(64 / (time.perf_counter() - start))
    base = {k: statistics.median(times["top2"][k]) for k in ("prefill", "decode")}
    print(f"| model | real experts/token | prefill tok/s | vs top-2 | decode tok/s | vs top-2 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        p = statistics.median(times[name]["prefill"])
        d = statistics.median(times[name]["decode"])
        print(f"| {name} | {real[name]:.2f} | {p:,.0f} | {p / base['prefill']:.2f} | {d:,.1f} | "
              f"{d / base['decode']:.2f} |")
    print(f"\n{rounds} interleaved rounds, medians; 1 thread; torch {torch.__version__}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("exactness")
    s = sub.add_parser("speed")
    s.add_argument("--runs", default="runs/sweeps/text-study", type=Path)
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    if a.what == "exactness":
        exactness()
        vlm_exactness()
    else:
        speed(a.runs, a.seed, a.rounds)


if __name__ == "__main__":
    main()
