"""`python -m megatron_nullmoe.flops`: iso-FLOP partners and expected real experts per token.

The formulas and this entry know no recipe; a recipe's FLOPs are `python -m
megatron_nullmoe.train.flops RECIPE`, beside the trainer's config that it reads.
"""

from __future__ import annotations

import argparse

from megatron_nullmoe import flops


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.flops",
                                description=flops.__doc__.split("\n")[0])
    p.add_argument("--partners", action="store_true", help="iso-FLOP (k, Z) for --experts and --baseline-topk")
    p.add_argument("--expected", action="store_true", help="expected real experts of --experts/--topk/--nulls")
    p.add_argument("--experts", type=int)
    p.add_argument("--baseline-topk", type=int)
    p.add_argument("--topk", type=int)
    p.add_argument("--nulls", type=int)
    p.add_argument("--max-topk", type=int, default=16)
    a = p.parse_args(argv)
    for flag, value, low in (("--experts", a.experts, 1), ("--baseline-topk", a.baseline_topk, 1),
                             ("--topk", a.topk, 1), ("--nulls", a.nulls, 0), ("--max-topk", a.max_topk, 1)):
        if value is not None and value < low:
            p.error(f"{flag}={value}: expected >= {low}")
    if a.partners:
        if a.experts is None or a.baseline_topk is None:
            p.error("--partners needs --experts E and --baseline-topk K_B")
        if a.baseline_topk > a.experts:
            p.error(f"--baseline-topk={a.baseline_topk} exceeds --experts={a.experts}")
        print(f"iso-FLOP partners of top-{a.baseline_topk} over E={a.experts}: k * E / (E + Z) = "
              f"{a.baseline_topk}")
        print("| k | Z (num_null_experts) | null share Z/(E+Z) |\n|---|---|---|")
        for k, z in flops.iso_flop_partners(a.experts, a.baseline_topk, a.max_topk):
            print(f"| {k} | {z} | {z / (a.experts + z):.3f} |")
        return
    if a.expected:
        if a.experts is None or a.topk is None or a.nulls is None:
            p.error("--expected needs --experts E, --topk K and --nulls Z")
        if a.topk > a.experts + a.nulls:
            p.error(f"--topk={a.topk} exceeds the {a.experts + a.nulls} slots (E + Z)")
        r = flops.expected_real(topk=a.topk, num_experts=a.experts, num_null=a.nulls)
        print(f"expected real experts per token: {a.topk} * {a.experts} / ({a.experts} + {a.nulls}) "
              f"= {r:g} (iso-FLOP with top-{r:g})" if float(r).is_integer() else
              f"expected real experts per token: {r:.4f} (no integer top-k baseline matches)")
        return
    p.error("give --partners or --expected (a recipe's FLOPs: python -m "
            "megatron_nullmoe.train.flops RECIPE)")

if __name__ == "__main__":
    main()
