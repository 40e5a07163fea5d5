"""`python -m megatron_nullmoe.sweep run|status|report`: many trainer runs from one sweep file.

    python -m megatron_nullmoe.sweep run SWEEP.yaml [key=value ...] [--dry-run]
        [--launcher local|slurm] [--parallel N] [--nproc-per-node N] [--stop-grace S]
        [--gpu-tflops T --mfu M]
    python -m megatron_nullmoe.sweep status DIR        (DIR = <dir>/<name> of the sweep file)
    python -m megatron_nullmoe.sweep report DIR [--out OUT]

`run` checks every planned config first (keys, iso-FLOP groups, what the trainer would refuse at
start-up for the world size), then launches the runs that are not finished; key=value arguments
apply to every run after the sweep's own overrides (e.g. exit_after_steps=1000 for a time-boxed
session). Running it again skips finished runs and resumes the others from their checkpoints.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_nullmoe.sweep",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="launch (or with --dry-run, plan) every run of a sweep file")
    r.add_argument("sweep", help="the sweep file (YAML)")
    r.add_argument("overrides", nargs="*", help="key.sub=value for every run, after the sweep's")
    r.add_argument("--launcher", choices=("local", "slurm"), default="local")
    r.add_argument("--dir", help="put the sweep's folder here instead of the file's dir")
    r.add_argument("--parallel", type=int, default=1, help="local: runs at once (default 1)")
    r.add_argument("--nproc-per-node", type=int,
                   help="local: processes per run (default: the sweep's launch.nproc_per_node, or 1)")
    r.add_argument("--only", metavar="VARIANT[,VARIANT...]",
                   help="launch only these variants (e.g. the validity gate first); the plan, "
                        "status and report still cover the whole sweep")
    r.add_argument("--seeds", metavar="SEED[,SEED...]",
                   help="run these seeds instead of the sweep file's (e.g. 1,2,3,4,5 to add two "
                        "seeds to a finished 3-seed sweep: finished runs are kept)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the plan, its compute and (slurm) the array script; start nothing")
    r.add_argument("--gpu-tflops", type=float, default=400.0,
                   help="assumed peak TFLOP/s per GPU for the GPU-hours estimate (default 400)")
    r.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (0.4)")
    r.add_argument("--vocab-size", type=int,
                   help="for the FLOP estimate (default: the recipe's tokenizer, else 32000)")
    r.add_argument("--stop-grace", type=float, default=120.0, metavar="SECONDS",
                   help="local: how long a stopped run (Ctrl-C, SIGTERM) may take to finish its "
                        "step or evaluation and save before it is killed (default 120)")
    r.add_argument("--status-every", type=float, default=60.0,
                   help="local: seconds between progress lines (default 60)")
    s = sub.add_parser("status", help="state of every run of a launched sweep")
    s.add_argument("dir", help="the sweep's folder, <dir>/<name>")
    rep = sub.add_parser("report", help="results.csv, results.md and plots over seeds")
    rep.add_argument("dir", help="the sweep's folder, <dir>/<name>")
    rep.add_argument("--out", help="where to write (default: DIR)")
    return p


def _hours(h: float) -> str:
    return f"{h:,.1f}" if h >= 10 else f"{h:.3g}"


def _print_plan(sweep, runs, a, world: int, nproc_label: str) -> None:
    from megatron_nullmoe.sweep.checks import estimate, vocab_size
    from megatron_nullmoe.sweep.state import run_state

    vocab, source = vocab_size(runs[0].cfg, a.vocab_size)
    rows = estimate(runs, vocab, a.gpu_tflops, a.mfu)
    points = max(1, len({r.point for r in runs}))
    print(f"sweep {sweep.name}: {len(runs)} runs = {len(sweep.variants)} variants x {points} grid "
          f"points x {len(sweep.seeds)} seeds -> {sweep.root}/")
    print(f"base {sweep.base}; launcher {a.launcher}, {nproc_label}")
    print("\n| variant / grid point | real experts/token | steps | train FLOPs/run | GPU-hours/run |")
    print("|---|---:|---:|---:|---:|")
    for label in dict.fromkeys(r["label"] for r in rows):
        row = next(r for r in rows if r["label"] == label)
        print(f"| {label} | {row['real_per_token']:g} | {row['steps']} | {row['flops']:.3e} | "
              f"{_hours(row['gpu_hours'])} |")
    total, hours = sum(r["flops"] for r in rows), sum(r["gpu_hours"] for r in rows)
    print(f"\ntotal: {len(runs)} runs, {total:.3e} training FLOPs, {_hours(hours)} GPU-hours at "
          f"{a.gpu_tflops:g} TFLOP/s x MFU {a.mfu:g} ({_hours(hours / len(runs) / world)} h wall per "
          f"run on {world} GPUs); vocabulary {vocab} ({source})")
    states = Counter(run_state(r.folder, r.cfg.steps)[0] for r in runs)
    print("now: " + ", ".join(f"{n} {s}" for s, n in states.items()))


def _select(runs, sweep, only):
    from megatron_nullmoe.sweep.spec import SweepError

    if only is None:
        return runs
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in sweep.variants]
    if unknown or not names:
        raise SweepError(f"--only {only!r}: {', '.join(unknown) or 'no variant named'} is not a "
                         f"variant of this sweep; expected some of {', '.join(sweep.variants)}")
    return [r for r in runs if r.variant in names]


def _seeds(text):
    from megatron_nullmoe.sweep.spec import SweepError

    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--seeds {text!r}: give integers separated by commas, e.g. 1,2,3,4,5") \
            from None


def _run(a) -> int:
    from megatron_nullmoe.sweep.checks import check_iso_flop, check_runtime
    from megatron_nullmoe.errors import NullMoEError
    from megatron_nullmoe.sweep.spec import load_sweep, plan
    from megatron_nullmoe.sweep.state import (is_done, run_state, status_table, write_plan,
                                              write_state)

    if a.parallel < 1 or (a.nproc_per_node is not None and a.nproc_per_node < 1):
        sys.exit("--parallel and --nproc-per-node must be >= 1")
    if not a.stop_grace >= 0:
        sys.exit(f"--stop-grace must be a number of seconds >= 0, not {a.stop_grace}")
    sweep = nproc = None
    try:
        sweep = load_sweep(a.sweep, a.overrides, a.dir, _seeds(a.seeds))
        runs = plan(sweep)
        check_iso_flop(sweep, runs)
        selected = _select(runs, sweep, a.only)
        nproc = a.nproc_per_node or sweep.launch.nproc_per_node
        if a.launcher == "slurm":
            world = sweep.launch.nodes * sweep.launch.gpus_per_node
            label = f"{sweep.launch.nodes} node(s) x {sweep.launch.gpus_per_node} GPUs per run"
        else:
            world, label = nproc, f"{nproc} process(es) per run, {a.parallel} run(s) at once"
        check_runtime(selected, world)
    except NullMoEError as err:
        hint = ""
        if (a.launcher == "local" and sweep is not None and nproc is not None
                and sweep.launch.nodes * sweep.launch.gpus_per_node > nproc):
            hint = (f" (this sweep's launch section asks for {sweep.launch.nodes} node(s) x "
                    f"{sweep.launch.gpus_per_node} GPUs per run: use --launcher slurm, or "
                    "--nproc-per-node to run it here)")
        sys.exit(f"sweep error: {err}{hint}")
    if a.dry_run:
        _print_plan(sweep, runs, a, world, label)
        if a.only is not None:
            print(f"--only {a.only}: {len(selected)} of these {len(runs)} runs would launch")
    if a.launcher == "slurm":
        from megatron_nullmoe.sweep.slurm import array_script, submit

        todo = [r for r in selected if run_state(r.folder, r.cfg.steps)[0] not in
                ("done", "running", "queued")]
        waiting = [r for r in todo if r.after is not None
                   and not is_done(r.folder.parents[1] / r.after, 0)]
        if waiting:  # one array has no order: those start from runs not finished yet
            print(f"leaving out {len(waiting)} run(s) that start from a run not finished yet "
                  f"({', '.join(sorted({r.after for r in waiting}))}): run this again once it is")
            todo = [r for r in todo if r not in waiting]
        if len(todo) < len(runs):
            print(f"leaving out {len(runs) - len(todo)} run(s) that are finished, running or queued")
        if not todo:
            print("nothing to submit")
            return 0
        script = array_script(todo, sweep.base, sweep.root, sweep.name, sweep.launch, Path.cwd())
        if a.dry_run:
            print(f"\n# sbatch script ({len(todo)} tasks):\n{script}")
            return 0
        write_plan(sweep.root, sweep.path, sweep.base, runs, sweep.compare)
        job = submit(script, sweep.root)
        for i, r in enumerate(todo):  # a second `run` must not submit or start them again
            write_state(r.folder, "queued", launcher="slurm", job=f"{job}_{i}")
        print(f"submitted job array {job}: {len(todo)} task(s), script {sweep.root / 'sweep.sbatch'}; "
              f"python -m megatron_nullmoe.sweep status {sweep.root}")
        return 0
    if a.dry_run:
        return 0
    from megatron_nullmoe.sweep.local import run_local

    write_plan(sweep.root, sweep.path, sweep.base, runs, sweep.compare)
    try:
        outcome = run_local(selected, sweep.base, a.parallel, nproc, a.status_every,
                            stop_grace=a.stop_grace)
    except KeyboardInterrupt:
        return 130
    from megatron_nullmoe.sweep.state import read_plan

    print(status_table(sweep.root, read_plan(sweep.root)))
    return 1 if "failed" in outcome.values() else 0


def main(argv=None) -> None:
    parser = _parser()
    a, unknown = parser.parse_known_args(argv)  # key=value may come after the options too
    if a.command == "run" and all("=" in u and not u.startswith("-") for u in unknown):
        a.overrides += unknown
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    warnings.filterwarnings("ignore")
    if a.command == "run":
        sys.exit(_run(a))
    from megatron_nullmoe.sweep.state import read_plan, status_table

    root = Path(a.dir)
    if a.command == "status":
        try:
            print(status_table(root, read_plan(root)))
        except FileNotFoundError as err:
            sys.exit(str(err))
        return
    from megatron_nullmoe.sweep.report import report

    out = report(root, a.out)
    print(f"wrote {out / 'results.md'}, results.csv, runs.csv, frontier.png, null_rate.png")
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
