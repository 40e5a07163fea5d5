"""`report DIR`: results.csv, runs.csv, results.md and two plots from a sweep folder's runs.

Per variant and grid point, over seeds (mean and 95% Student-t interval, see stats.py): final
validation loss; validation and train loss at matched realised FLOPs (the budget is the smallest
final realised FLOPs among the runs of that grid point, all variants and seeds); realised real
experts per token, null-slot rate of vision and text tokens, rows dispatched over standard top-k
rows (these four from the last logged interval, as summary.json has them); tokens/s (the run's
mean after its first interval); the realised FLOPs at the end. Only finished runs count (a
summary.json that reaches the plan's steps, where sweep.json gives them); the others are listed
as missing. Plots: loss against realised FLOPs per variant (the frontier; mean over seeds of the
train curve, validation points as markers, the budget dashed), and null rate by modality
against step. With `compare` pairs in the sweep file, results.md and comparisons.csv give A - B
per pair on the final and matched-FLOP validation losses, paired by seed, with a 95% interval and
a verdict (a side is lower only when the interval excludes 0), beside two readings that one
outlying seed cannot swing (the median of A - B, and on how many seeds A is lower), and "along
training": the same
paired difference in validation loss at each evaluation step (does a gap close, stay or grow).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Optional

from megatron_nullmoe.sweep.state import PLAN_FILE, read_compare, read_plan
from megatron_nullmoe.sweep.stats import (
    interpolate,
    loss_curves,
    matched_budget,
    mean_interval,
    paired_difference,
    paired_diffs,
    verdict,
)

# column -> (what results.md calls it, digits)
METRICS = {
    "final_val_loss": ("final val loss", 4),
    "tail_val_loss": ("val loss, last 4 evals", 4),
    "val_loss_at_budget": ("val loss @ FLOP budget", 4),
    "train_loss_at_budget": ("train loss @ FLOP budget", 4),
    "real_per_token": ("real experts / token", 3),
    "null_rate_vision": ("null rate vision", 3),
    "null_rate_text": ("null rate text", 3),
    "rows_over_topk": ("rows / top-k rows", 3),
    "tokens_per_s": ("tokens/s", 0),
    "model_flops": ("realised FLOPs", None),
}


def find_runs(root: Path) -> list[dict]:
    """The plan's runs (sweep.json), or, without one, every <label>/seed<S> folder under root."""
    if (root / PLAN_FILE).is_file():
        return read_plan(root)
    runs = []
    for folder in sorted(p for p in root.glob("*/seed*") if p.is_dir()):
        variant, *axes = folder.parent.name.split("__")
        runs.append({"key": f"{folder.parent.name}/{folder.name}", "label": folder.parent.name,
                     "variant": variant, "point": [a.split("=", 1) for a in axes],
                     "seed": int(folder.name.removeprefix("seed")), "folder": str(folder.relative_to(root))})
    return runs


def _read(root: Path, run: dict) -> Optional[dict]:
    folder = root / run["folder"]
    if not (folder / "summary.json").is_file():
        return None
    s = json.loads((folder / "summary.json").read_text())
    if s.get("steps", 0) < run.get("steps", 0):  # an earlier, shorter run's summary
        return None
    lines = (folder / "metrics.jsonl").read_text().splitlines() if (folder / "metrics.jsonl").is_file() else []
    records = [json.loads(line) for line in lines if line.strip()]
    rows, topk = s.get("rows_dispatched"), s.get("rows_standard_topk")
    return {**run, "point": tuple(tuple(p) for p in run["point"]), "records": records,
            "curves": loss_curves(records),
            "final_val_loss": s.get("final_val_loss"), "tail_val_loss": s.get("tail_val_loss"),
            "real_per_token": s.get("real_experts_per_token"),
            "null_rate_vision": s.get("null_rate_vision"), "null_rate_text": s.get("null_rate_text"),
            "rows_over_topk": rows / topk if rows is not None and topk else None,
            "tokens_per_s": s.get("tokens_per_s"), "model_flops": s.get("model_flops_total")}


def collect(root: Path) -> tuple[list[dict], list[str], dict]:
    """(finished runs with their metrics, keys of unfinished runs, {grid point: FLOP budget})."""
    runs, missing = [], []
    for run in find_runs(root):
        got = _read(root, run)
        (runs.append(got) if got else missing.append(run["key"]))
    budgets = {}
    for point in dict.fromkeys(r["point"] for r in runs):
        finals = [r["model_flops"] for r in runs if r["point"] == point and r["model_flops"]]
        budgets[point] = matched_budget(finals) if finals else None
    for r in runs:
        b = budgets[r["point"]]
        for kind in ("train", "val"):
            r[f"{kind}_loss_at_budget"] = None if b is None else interpolate(*r["curves"][kind], b)
    return runs, missing, budgets


def aggregate(runs: list[dict], budgets: dict) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["point"], r["variant"]), []).append(r)
    out = []
    for (point, variant), members in groups.items():
        row = {"variant": variant, "point": point, "n": len(members), "flop_budget": budgets[point],
               "seeds": sorted(m["seed"] for m in members)}
        for key in METRICS:
            mean, half, n = mean_interval([m[key] for m in members])
            row[key] = (mean, half, n)
        out.append(row)
    return out


COMPARED = ("final_val_loss", "tail_val_loss", "val_loss_at_budget")  # the losses `compare` pairs are judged on


def comparisons(runs: list[dict], compare: dict[str, tuple[str, str]]) -> list[dict]:
    """Per compare pair, grid point and loss: A - B paired by seed, its interval and verdict."""
    out = []
    for name, (a, b) in compare.items():
        for point in dict.fromkeys(r["point"] for r in runs):
            by = {v: {r["seed"]: r for r in runs if r["variant"] == v and r["point"] == point}
                  for v in (a, b)}
            for key in COMPARED:
                diffs = paired_diffs({s: r[key] for s, r in by[a].items()},
                                     {s: r[key] for s, r in by[b].items()})
                mean, half, n = mean_interval(diffs)
                out.append({"name": name, "a": a, "b": b, "point": point, "metric": key,
                            "n": n, "mean": mean, "ci95": half, "verdict": verdict(mean, half, a, b),
                            "median": statistics.median(diffs) if diffs else None,
                            "a_lower": sum(d < 0 for d in diffs)})
    return out


def along_training(runs: list[dict], compare: dict[str, tuple[str, str]],
                   max_rows: int = 16) -> list[dict]:
    """Per compare pair and grid point: A - B in validation loss at each evaluation step that
    every paired run logged, paired by seed (does a gap close, stay or grow?). At most `max_rows`
    steps, evenly spread, the last always kept."""
    out = []
    for name, (a, b) in compare.items():
        for point in dict.fromkeys(r["point"] for r in runs):
            val = {v: {r["seed"]: {rec["step"]: rec["val/loss"] for rec in r["records"]
                                   if rec.get("val/loss") is not None}
                       for r in runs if r["variant"] == v and r["point"] == point} for v in (a, b)}
            seeds = sorted(set(val[a]) & set(val[b]))
            if len(seeds) < 2:
                continue
            steps = sorted(set.intersection(*(set(val[v][s]) for v in (a, b) for s in seeds)))
            if len(steps) > max_rows:
                stride = -(-len(steps) // max_rows)
                steps = sorted(set(steps[::-1][::stride]))
            for step in steps:
                mean, half, n = paired_difference({s: val[a][s][step] for s in seeds},
                                                  {s: val[b][s][step] for s in seeds})
                out.append({"name": name, "a": a, "b": b, "point": point, "step": step, "n": n,
                            "mean": mean, "ci95": half, "verdict": verdict(mean, half, a, b)})
    return out


def _fmt(value: Optional[float], digits: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value:.3e}" if digits is None else f"{value:.{digits}f}"


def write_tables(root: Path, out: Path, runs, missing, groups, budgets, compared=(),
                 along=()) -> None:
    axes = list(dict.fromkeys(axis for g in groups for axis, _ in g["point"]))
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", *axes, "n", "flop_budget",
                    *(f"{k}_{s}" for k in METRICS for s in ("mean", "ci95", "lo", "hi"))])
        for g in groups:
            point = dict(g["point"])
            cells = []
            for key in METRICS:
                mean, half, _ = g[key]
                cells += [mean, half, None if half is None else mean - half,
                          None if half is None else mean + half]
            w.writerow([g["variant"], *(point.get(a) for a in axes), g["n"], g["flop_budget"],
                        *("" if c is None else c for c in cells)])
    with (out / "runs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "variant", *axes, "seed", *METRICS])
        for r in runs:
            point = dict(r["point"])
            w.writerow([r["key"], r["variant"], *(point.get(a) for a in axes), r["seed"],
                        *("" if r[k] is None else r[k] for k in METRICS)])
    lines = [f"# Sweep results: {root}", "",
             f"{len(runs)} finished runs" + (f"; not finished (left out): {', '.join(missing)}"
                                             if missing else "") + ".",
             "Mean over seeds ± half-width of the 95% Student-t interval (none for one seed).",
             "Loss @ FLOP budget: each run's loss curve against cumulative realised model FLOPs, "
             "read at the smallest final realised FLOPs among the runs of its grid point.", ""]
    for point in dict.fromkeys(g["point"] for g in groups):
        title = ", ".join(f"{a}={v}" for a, v in point) or "all runs"
        lines += [f"## {title}", "", f"FLOP budget: {_fmt(budgets[point], None)}", "",
                  "| variant | n | " + " | ".join(name for name, _ in METRICS.values()) + " |",
                  "|---|---:|" + "---:|" * len(METRICS)]
        for g in (g for g in groups if g["point"] == point):
            cells = []
            for key, (_, digits) in METRICS.items():
                mean, half, _ = g[key]
                cells.append(_fmt(mean, digits) + ("" if half is None else f" ± {_fmt(half, digits)}"))
            lines.append(f"| {g['variant']} | {g['n']} | " + " | ".join(cells) + " |")
        lines.append("")
        rows = [c for c in compared if c["point"] == point]
        if rows:
            lines += ["Comparisons: A - B paired by seed, mean ± 95% half-width; a side is lower "
                      "only when the interval excludes 0. The median and the count of seeds "
                      "where A is lower are there to see whether one seed makes the mean.", "",
                      "| comparison | A - B | loss | seeds | A - B (mean ± 95%) | median | "
                      "A lower on | verdict |", "|---|---|---|---:|---:|---:|---:|---|"]
            for c in rows:
                diff = _fmt(c["mean"], 4) + ("" if c["ci95"] is None else f" ± {_fmt(c['ci95'], 4)}")
                lines.append(f"| {c['name']} | {c['a']} - {c['b']} | {METRICS[c['metric']][0]} | "
                             f"{c['n']} | {diff} | {_fmt(c['median'], 4)} | "
                             f"{c['a_lower']} of {c['n']} | {c['verdict']} |")
            lines.append("")
        rows = [c for c in along if c["point"] == point]
        if rows:
            lines += ["Along training: A - B in validation loss at each evaluation step, paired "
                      "by seed (mean ± 95% half-width).", "",
                      "| comparison | A - B | step | seeds | A - B (mean ± 95%) | verdict |",
                      "|---|---|---:|---:|---:|---|"]
            for c in rows:
                diff = _fmt(c["mean"], 4) + ("" if c["ci95"] is None else f" ± {_fmt(c['ci95'], 4)}")
                lines.append(f"| {c['name']} | {c['a']} - {c['b']} | {c['step']} | {c['n']} | "
                             f"{diff} | {c['verdict']} |")
            lines.append("")
    if compared:
        axes = list(dict.fromkeys(axis for c in compared for axis, _ in c["point"]))
        with (out / "comparisons.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["comparison", "a", "b", *axes, "metric", "n", "mean", "ci95", "median",
                        "a_lower", "verdict"])
            for c in compared:
                point = dict(c["point"])
                w.writerow([c["name"], c["a"], c["b"], *(point.get(x) for x in axes), c["metric"],
                            c["n"], *("" if c[k] is None else c[k] for k in ("mean", "ci95", "median")),
                            c["a_lower"], c["verdict"]])
    (out / "results.md").write_text("\n".join(lines))


def plot(out: Path, runs: list[dict], budgets: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = list(budgets)
    for name, draw in (("frontier.png", _frontier), ("null_rate.png", _null_rate)):
        fig, axs = plt.subplots(1, len(points), figsize=(5.5 * len(points), 4), squeeze=False)
        for ax, point in zip(axs[0], points):
            members = [r for r in runs if r["point"] == point]
            for i, variant in enumerate(dict.fromkeys(r["variant"] for r in members)):
                draw(ax, np, [r for r in members if r["variant"] == variant], variant, f"C{i}")
            if name == "frontier.png" and budgets[point]:
                ax.axvline(budgets[point], color="grey", ls=":", label="FLOP budget")
            if name == "frontier.png":  # losses span decades: the tail is where variants differ
                ax.set_yscale("log")
            ax.set_title(", ".join(f"{a}={v}" for a, v in point) or "all runs")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _frontier(ax, np, seeds: list[dict], variant: str, color: str) -> None:
    curves = [s["curves"]["train"] for s in seeds if s["curves"]["train"][0]]
    if curves:
        grid = np.linspace(max(c[0][0] for c in curves), min(c[0][-1] for c in curves), 100)
        mean = np.mean([np.interp(grid, c[0], c[1]) for c in curves], axis=0)
        ax.plot(grid, mean, color=color, label=f"{variant} (train, mean of {len(curves)})")
    for s in seeds:
        ax.plot(*s["curves"]["val"], "o", color=color, ms=3, alpha=0.7)
    ax.set(xlabel="realised model FLOPs", ylabel="loss (line: train, dots: validation)")


def _null_rate(ax, np, seeds: list[dict], variant: str, color: str) -> None:
    for key, style in (("null/vision", "-"), ("null/text", "--")):
        series = [{r["step"]: r[key] for r in s["records"] if r.get(key) is not None} for s in seeds]
        steps = sorted(set.intersection(*(set(x) for x in series))) if series else []
        if steps and any(x[t] for x in series for t in steps):  # no null slots: nothing to draw
            ax.plot(steps, [np.mean([x[t] for x in series]) for t in steps], style, color=color,
                    label=f"{variant} {key.split('/')[1]}")
    ax.set(xlabel="step", ylabel="null-slot rate (mean over seeds)", ylim=(0, 1))


def report(root: Path, out: Optional[Path] = None) -> Path:
    root = Path(root)
    out = Path(out or root)
    runs, missing, budgets = collect(root)
    if not runs:
        raise SystemExit(f"{root}: no finished run (summary.json) to report"
                         + (f"; unfinished: {', '.join(missing)}" if missing else ""))
    out.mkdir(parents=True, exist_ok=True)
    groups = aggregate(runs, budgets)
    compare = read_compare(root)
    write_tables(root, out, runs, missing, groups, budgets, comparisons(runs, compare),
                 along_training(runs, compare))
    plot(out, runs, budgets)
    return out
