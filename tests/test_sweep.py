"""The sweep tool: sweep files and their errors, the plan, the Slurm array, status, report, and a
real skip-and-resume through the trainer.

- Bad sweep files are refused with the key named (unknown keys with the closest valid one, empty
  grid axes and seeds, a variant off its iso-FLOP group).
- The Slurm array runs against recording stand-ins for sbatch, scontrol and srun (those of
  tests/test_launch.py): one task per unfinished run, each mapped to its folder and overrides,
  requeued as `<array job>_<task>` on USR1.
- `report` on synthetic run folders, checked against values computed by hand.
- Two tiny runs through the trainer, side by side: stopped by exit_after_steps, resumed by the
  next `run`, skipped by the one after.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron_nullmoe.sweep import __main__ as cli
from megatron_nullmoe.sweep.checks import check_iso_flop
from megatron_nullmoe.sweep.spec import SweepError, load_sweep, plan
from tests._train import ROOT, TINY, tiny_demo
from tests.test_launch import FAKE_SCONTROL, FAKE_SRUN

DEMO = str(ROOT / "examples" / "demo_vlm.yaml")


def write_sweep(tmp_path: Path, **fields) -> Path:
    sweep = {"name": "t", "dir": str(tmp_path / "runs"), "base": DEMO, "seeds": [1], **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def planned(path: Path, extra=()):
    sweep = load_sweep(path, extra)
    runs = plan(sweep)
    check_iso_flop(sweep, runs)
    return sweep, runs


def cli_main(argv: list[str], capsys) -> tuple[int, str]:
    """`python -m megatron_nullmoe.sweep ARGV` in this process: (exit code, output)."""
    code = 0
    try:
        cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    message = code if isinstance(code, str) else ""
    return (code if isinstance(code, int) else 1 if code else 0), out.out + message + out.err


# ------------------------------------------------------------------------------ sweep files
NULL = {"model.router_topk": 4, "model.null_experts.num_null_experts": 8}
TOP2 = {"model.router_topk": 2, "model.null_experts.num_null_experts": 0}


@pytest.mark.parametrize("fields,message", [
    ({"variant": {}}, "unknown sweep key 'variant'; did you mean 'variants'?"),
    ({"seeds": []}, "seeds=[]: give a non-empty list"),
    ({"seeds": [1, 1]}, "seeds=[1, 1]: give distinct integers"),
    ({"grid": {"optim.lr": []}}, "grid.optim.lr: empty list"),
    ({"grid": {"optim.lrr": [0.1]}}, "grid.optim.lrr: unknown config key 'optim.lrr'; did you mean "
                                     "'optim.lr'?"),
    ({"variants": {"a": {"model.router_topx": 2}}},
     "variants.a: unknown config key 'model.router_topx'; did you mean 'model.router_topk'?"),
    ({"overrides": {"model": {"hidden_sise": 8}}}, "overrides: unknown config key 'model.hidden_sise'"),
    ({"overrides": {"seed": 3}}, "overrides.seed: set by the sweep"),
    ({"variants": {"a__b": {}}}, "variants.a__b='a__b': give a folder-safe name"),
    ({"variants": {"top2": TOP2, "null": {**NULL, "model.router_topk": 6}},
      "iso_flop": {"tolerance": 0.01}},
     "variants.null is not iso-FLOP with variants.top2 (iso_flop.groups.all): model.router_topk=6"),
    ({"variants": {"top2": TOP2, "null": NULL}, "iso_flop": {"groups": {"g": ["top2", "nul"]}}},
     "iso_flop.groups.g: unknown variant 'nul'; did you mean 'null'?"),
    ({"iso_flop": {"tolerence": 0.1}}, "unknown sweep key 'iso_flop.tolerence'; did you mean "
                                       "'iso_flop.tolerance'?"),
    ({"launch": {"nproc_per_node": 0}}, "launch.nproc_per_node=0: give an integer >= 1"),
    ({"variants": {"top2": TOP2, "null": NULL}, "compare": {"gate": ["top2", "top4"]}},
     "compare.gate: unknown variant 'top4'; the sweep's variants are top2, null"),
    ({"variants": {"top2": TOP2, "null": NULL}, "compare": {"gate": ["top2"]}},
     "compare.gate=['top2']: give two different variants, [A, B]"),
    ({"base": "nope.yaml"}, "base='nope.yaml': no such recipe"),
])
def test_bad_sweep_files_name_the_key(tmp_path, fields, message):
    with pytest.raises(SweepError) as err:
        planned(write_sweep(tmp_path, **fields))
    assert message in str(err.value)


def test_a_variant_starting_from_another_names_a_source_that_exists(tmp_path):
    base = {"source": {"model.router_topk": 2}}
    for init, message in (("@nope", "names no variant"), ("@cont", "one level of starting from")):
        path = write_sweep(tmp_path, variants={**base, "cont": {"checkpoint.init_from": init}})
        with pytest.raises(SweepError, match=message):
            plan(load_sweep(path))
    path = write_sweep(tmp_path, variants={**base, "cont": {"checkpoint.init_from": "@source"}},
                       seeds=[1, 2])
    runs = {r.key: r for r in plan(load_sweep(path))}
    assert runs["cont/seed2"].after == "source/seed2" and runs["source/seed2"].after is None


def test_local_runs_start_after_their_source_and_skip_when_it_fails(tmp_path, monkeypatch):
    """Runs that start from another run's checkpoint wait for it (2 at a time, the dependent
    listed first), and are skipped when it fails. A stand-in trainer records the order."""
    from megatron_nullmoe.sweep import local

    order = tmp_path / "order.txt"

    def fake(run, base, nproc):
        fail = run.key == "source/seed2"
        code = (f"import json, pathlib, time; time.sleep(0.3); "
                f"open({str(order)!r}, 'a').write({run.key!r} + '\\n'); "
                + ("raise SystemExit(1)" if fail else
                   f"pathlib.Path({str(run.folder)!r}, 'summary.json').write_text("
                   f"json.dumps({{'steps': {run.cfg.steps}}}))"))
        return [sys.executable, "-c", code]

    monkeypatch.setattr(local, "command", fake)
    path = write_sweep(tmp_path, variants={"cont": {"checkpoint.init_from": "@source"},
                                           "source": {"model.router_topk": 2}}, seeds=[1, 2])
    runs = plan(load_sweep(path))
    outcome = local.run_local(runs, Path(DEMO), parallel=2, poll=0.05, echo=lambda _: None)
    assert outcome == {"source/seed1": "done", "cont/seed1": "done", "source/seed2": "failed",
                       "cont/seed2": "failed"}
    done = order.read_text().split()
    assert done.index("source/seed1") < done.index("cont/seed1") and "cont/seed2" not in done


def test_local_runs_start_by_seed_and_largest_first_within_a_seed(tmp_path, monkeypatch):
    """Seed by seed (a sweep stopped early leaves whole seeds), the largest run of a seed first
    (the last to finish are small ones): here top-4 before top-2 before top-1, though the sweep
    lists them the other way round."""
    from megatron_nullmoe.sweep import local

    order = tmp_path / "order.txt"

    def fake(run, base, nproc):
        code = (f"import json, pathlib; open({str(order)!r}, 'a').write({run.key!r} + '\\n'); "
                f"pathlib.Path({str(run.folder)!r}, 'summary.json').write_text("
                f"json.dumps({{'steps': {run.cfg.steps}}}))")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(local, "command", fake)
    path = write_sweep(tmp_path, variants={f"k{k}": {"model.router_topk": k} for k in (1, 2, 4)},
                       seeds=[1, 2])
    outcome = local.run_local(plan(load_sweep(path)), Path(DEMO), parallel=1, poll=0.02,
                              echo=lambda _: None)
    assert set(outcome.values()) == {"done"}
    assert order.read_text().split() == ["k4/seed1", "k2/seed1", "k1/seed1",
                                         "k4/seed2", "k2/seed2", "k1/seed2"]


def test_iso_flop_per_grid_point_uses_budget_targets(tmp_path):
    budget = {**NULL, "model.router_topk": 8, "model.null_experts.target_real_per_token": 2.0}
    ok = write_sweep(tmp_path, variants={"top2": TOP2, "null": NULL, "budget": budget},
                     iso_flop={"tolerance": 0.0})
    planned(ok)  # 4 * 8 / 16 = 2, and a budget target of 2 with k = 8
    # Iso-FLOP at one grid point, not at another: the error names the point.
    bad = write_sweep(tmp_path, variants={"top2": TOP2, "null": NULL},
                      grid={"model.num_experts": [8, 16]}, iso_flop={"tolerance": 0.01})
    with pytest.raises(SweepError, match=r"iso_flop.groups.all, model.num_experts=16\): .*"
                                         r"= 2.66667 against .* = 2 real"):
        planned(bad)


def test_plan_is_variants_by_grid_by_seeds_with_folders_and_precedence(tmp_path):
    path = write_sweep(
        tmp_path, overrides={"steps": 7, "model": {"router_topk": 2}},
        variants={"top2": TOP2, "null": {**NULL, "steps": 9}},
        grid={"optim.lr": [0.01, 0.001], "size": {"s": {"model.hidden_size": 32},
                                                  "m": {"model.hidden_size": 64}}},
        seeds=[3, 5])
    sweep, runs = planned(path, ["exit_after_steps=2"])
    assert len(runs) == 2 * 2 * 2 * 2
    assert runs[0].seed == 3 and runs[-1].seed == 5  # seeds outermost
    root = tmp_path / "runs" / "t"
    first = runs[1]
    assert first.folder == root / "null__optim.lr=0.01__size=s" / "seed3"
    cfg = first.cfg  # recipe <- overrides <- variant <- grid <- command line <- seed/dir/name
    assert (cfg.steps, cfg.model.router_topk, cfg.optim.lr, cfg.model.hidden_size) == (9, 4, 0.01, 32)
    assert (cfg.exit_after_steps, cfg.seed, cfg.dir) == (2, 3, str(first.folder))
    assert cfg.name == "t/null__optim.lr=0.01__size=s/seed3"
    assert {r.label for r in runs} == {f"{v}__optim.lr={lr}__size={s}" for v in ("top2", "null")
                                       for lr in ("0.01", "0.001") for s in ("s", "m")}
    with pytest.raises(SweepError, match="command-line override 'seed=4': seed is set by the sweep"):
        load_sweep(path, ["seed=4"])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples" / "sweeps").glob("*.yaml")))
def test_example_sweeps_load_and_dry_run(name, capsys):
    path = ROOT / "examples" / "sweeps" / name
    argv = ["run", str(path), "--dry-run", "--vocab-size", "128"]
    if "gpu" in name:
        argv += ["--launcher", "slurm"]
    code, out = cli_main(argv, capsys)
    sweep = load_sweep(path)
    runs = plan(sweep)
    assert code == 0, out
    assert f"sweep {sweep.name}: {len(runs)} runs" in out
    assert "GPU-hours at 400 TFLOP/s x MFU 0.4" in out
    total = float(out.split(" training FLOPs, ")[1].split(" GPU-hours")[0].replace(",", ""))
    assert total > 0
    if "gpu" in name:  # the paper-scale grid: E=64, k_b in {2,4,8}, Z in {E/2, E}, two sizes
        assert len(runs) == 9 * 2 * 3 and {r.cfg.model.num_experts for r in runs} == {64}
        assert {r.cfg.model.null_experts.num_null_experts for r in runs} == {0, 32, 64}
        assert len({r.cfg.model.hidden_size for r in runs}) == 2
        assert "#SBATCH --array=0-53" in out and not (ROOT / sweep.root).exists()
        assert total > 1000  # thousands of GPU-hours, not a toy
    elif name == "text_study.yaml":  # top-1 baseline, top-2 bound, every null variant at 1
        from megatron_nullmoe.sweep.checks import expected_real_per_token

        rate = {r.variant: expected_real_per_token(r.cfg) for r in runs}
        assert rate == {"top1": 1, "top2": 2, **{v: pytest.approx(1, abs=1e-3) for v in rate
                                                 if v not in ("top1", "top2")}}
        assert len(rate) == 12 and len(runs) == 12 * 3
        assert {r.cfg.model.moe_ffn_hidden_size for r in runs} == {512}
    elif name == "upcycle_study.yaml":  # three continuations of each seed's own top-2 source
        by = {(r.variant, r.seed): r for r in runs}
        assert len(runs) == 4 * 3 and by["source", 2].after is None
        for variant in ("a_top2", "b_upcycle", "c_top1"):
            run = by[variant, 2]
            assert run.after == "source/seed2"
            assert run.cfg.checkpoint.init_from == str(sweep.root / "source" / "seed2")
            assert not any(o.startswith("checkpoint.init_from=@") for o in run.overrides)
        assert by["c_top1", 1].cfg.model.router_topk == 1
        assert by["b_upcycle", 1].cfg.model.null_experts.target_start_real_per_token == 2.0
    elif name == "distill_study.yaml":  # three continuations of one Mixtral export (issue 34)
        from megatron_nullmoe.sweep.checks import expected_real_per_token

        rate = {r.variant: expected_real_per_token(r.cfg) for r in runs}
        # the null variants' budget falls 2 -> 1 over the first half of the steps, then holds 1
        assert rate == {"top2": 2, "null_sched": pytest.approx(1.25, abs=0.01),
                        "null_distill": pytest.approx(1.25, abs=0.01)} and len(runs) == 3 * 3
        assert {r.cfg.checkpoint.init_from for r in runs} == {"runs/distill_study/hub_mixtral"}
        assert {r.variant: r.cfg.distill.weight for r in runs} == {
            "top2": 0, "null_sched": 0, "null_distill": 1.0}
    elif "study" in name:  # the CPU study: top-1 baseline, top-2 bound, nulls at 1 real/token
        from megatron_nullmoe.sweep.checks import expected_real_per_token

        rate = {r.variant: expected_real_per_token(r.cfg) for r in runs}
        assert rate == {"top1": 1, "top2": 2, "null_renorm": 1, "null_keep": 1,
                        "fixed_v0_t2": (16 * 0 + 24 * 2) / 40,  # 16 image + 24 text positions
                        "keep_no_budget": 1, "keep_aux_0.1": 1, "keep_per_expert": 1}
        code, out = cli_main(argv + ["--only", "keep_no_budget,keep_aux_0.1"], capsys)
        assert code == 0 and "--only keep_no_budget,keep_aux_0.1: 8 of these 32 runs" in out
        assert {r.cfg.model.null_experts.target_real_per_token for r in runs
                if r.variant.startswith("null")} == {1.0}
        assert {r.cfg.model.null_experts.target_real_per_token for r in runs
                if r.variant == "keep_no_budget"} == {None}
    else:  # the CPU controls, the modality-fixed ones bracketing the null runs' 2 real/token
        from megatron_nullmoe.sweep.checks import expected_real_per_token

        rate = {r.variant: expected_real_per_token(r.cfg) for r in runs}
        assert rate["null_renorm"] == rate["top2"] == 2 and rate["top4"] == 4
        assert rate["fixed_v1_t3"] == (36 * 1 + 12 * 3) / 48  # 36 image + 12 text positions
        assert rate["fixed_v2_t3"] == (36 * 2 + 12 * 3) / 48


# ------------------------------------------------------------------------------ Slurm
@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = ('#!/usr/bin/env python3\nimport os, sys\nopen(os.environ["FAKE_LOG"], "a").write('
              '"sbatch " + " ".join(sys.argv[1:]) + "\\n")\nprint("Submitted batch job 77")\n')
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("sbatch", sbatch)):
        (bin_dir / name).write_text(text.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log")}


def test_slurm_array_dry_run_submission_and_task(tmp_path, fake_slurm, capsys, monkeypatch):
    path = write_sweep(tmp_path, variants={"top2": TOP2, "null": NULL}, seeds=[1, 2],
                       launch={"nodes": 2, "gpus_per_node": 1, "time": "01:00:00"})
    for key, value in fake_slurm.items():
        monkeypatch.setenv(key, value)
    root = tmp_path / "runs" / "t"
    code, out = cli_main(["run", str(path), "--launcher", "slurm", "--dry-run"], capsys)
    assert code == 0 and "#SBATCH --array=0-3" in out and not root.exists(), out
    assert not Path(fake_slurm["FAKE_LOG"]).exists()  # a dry run submits nothing
    # A finished run is not submitted again.
    (root / "top2" / "seed1").mkdir(parents=True)
    (root / "top2" / "seed1" / "summary.json").write_text(json.dumps({"steps": 500}))
    code, out = cli_main(["run", str(path), "--launcher", "slurm"], capsys)
    assert code == 0 and "submitted job array 77: 3 task(s)" in out, out
    script = (root / "sweep.sbatch").read_text()
    assert Path(fake_slurm["FAKE_LOG"]).read_text() == f"sbatch {root / 'sweep.sbatch'}\n"
    for line in ("#SBATCH --array=0-2", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=1", "#SBATCH --time=01:00:00"):
        assert line in script.splitlines()
    assert (root / "sweep.json").is_file()
    # Submitted runs are queued: status says so, and neither launcher starts them again.
    state = json.loads((root / "null" / "seed2" / "sweep_state.json").read_text())
    assert (state["state"], state["job"]) == ("queued", "77_2")
    code, out = cli_main(["status", str(root)], capsys)
    assert "4 runs | 1 done | 0 running | 3 queued" in out
    code, out = cli_main(["run", str(path), "--launcher", "slurm"], capsys)
    assert "nothing to submit" in out and len(Path(fake_slurm["FAKE_LOG"]).read_text().splitlines()) == 1

    # Tasks are the unfinished runs in plan order: null/seed1, top2/seed2, null/seed2. Stand-in srun runs torchrun.sh as a dry run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "NNODES"))}
    env.update(fake_slurm, SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="77", SLURM_JOB_ID="78",
               SLURM_JOB_NODELIST="node[01-02]", FAKE_NODES="node01 node02", PYTHON="/venv/py")
    task = subprocess.run(["bash", str(root / "sweep.sbatch")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert task.returncode == 0, task.stderr
    calls = Path(fake_slurm["FAKE_LOG"]).read_text().splitlines()
    srun = json.loads(next(c for c in calls if c.startswith("srun ")).removeprefix("srun "))
    run_dir = root / "top2" / "seed2"
    assert srun["env"]["NNODES"] == "2" and srun["env"]["NPROC_PER_NODE"] == "1"
    assert srun["env"]["RDZV_ENDPOINT"] == "node01:29400" and srun["env"]["RDZV_ID"] == "nullmoe-77-1"
    assert srun["cmd"][:3] == ["bash", str(ROOT / "launch" / "torchrun.sh"), DEMO]
    assert srun["cmd"][-3:] == ["seed=2", f"dir={run_dir}", "name=t/top2/seed2"]
    node_log = (run_dir / "slurm-%j-node02.log").read_text().split()  # the stand-in keeps %j
    assert node_log[:3] == ["/venv/py", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in node_log and node_log[-1] == "name=t/top2/seed2"
    assert json.loads((run_dir / "sweep_state.json").read_text())["state"] == "exited"

    # Pre-emption: USR1 to the batch shell requeues this array task.
    started = tmp_path / "srun.started"
    proc = subprocess.Popen(["bash", str(root / "sweep.sbatch")], env={
        **env, "FAKE_SRUN_SLEEP": str(started)}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    assert "requeueing 77_1" in stdout
    assert "scontrol requeue 77_1" in Path(fake_slurm["FAKE_LOG"]).read_text().splitlines()
    assert json.loads((run_dir / "sweep_state.json").read_text())["state"] == "requeued"


# ------------------------------------------------------------------------------ status
def test_status_reads_each_run_folder(tmp_path, capsys):
    path = write_sweep(tmp_path, overrides={"steps": 4}, variants={"a": {}, "b": {}, "c": {}},
                       seeds=[1, 2])
    sweep, runs = planned(path)
    from megatron_nullmoe.sweep.state import write_plan, write_state

    write_plan(sweep.root, path, sweep.base, runs)
    folders = {r.key: r.folder for r in runs}
    (folders["a/seed1"]).mkdir(parents=True)
    (folders["a/seed1"] / "summary.json").write_text(json.dumps({"steps": 4}))
    write_state(folders["b/seed1"], "failed", launcher="local", rc=3)
    (folders["b/seed1"] / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    write_state(folders["c/seed1"], "running", launcher="local", pid=os.getpid())
    write_state(folders["a/seed2"], "running", launcher="local", pid=2 ** 22 + 12345)  # gone
    (folders["b/seed2"] / "summary.json").parent.mkdir(parents=True)
    (folders["b/seed2"] / "summary.json").write_text(json.dumps({"steps": 2}))  # an older, shorter run
    code, out = cli_main(["status", str(sweep.root)], capsys)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["a/seed1"] == ["done", "4/4"]
    assert rows["b/seed1"] == ["failed", "2/4,", "exit", "code", "3"]
    assert rows["c/seed1"] == ["running", "0/4"]
    assert rows["a/seed2"] == ["stopped", "0/4"]  # its launcher died: resumable
    assert rows["b/seed2"][0] == "stopped" and rows["c/seed2"] == ["pending"]
    assert "6 runs | 1 done | 1 running | 0 queued | 1 failed | 2 stopped | 1 pending" in out


# ------------------------------------------------------------------------------ report
def _synthetic_run(folder: Path, flops, train, val: dict, summary: dict, steps=None) -> None:
    """metrics.jsonl with train records (cumulative realised FLOPs) and val records, summary.json."""
    folder.mkdir(parents=True)
    steps = steps or list(range(1, len(flops) + 1))
    records = [{"step": s, "train/loss": loss, "throughput/model_flops_total": f,
                "null/vision": 0.5 + 0.01 * s, "null/text": 0.2} for s, f, loss in zip(steps, flops, train)]
    records += [{"step": s, "val/loss": v} for s, v in val.items()]
    records.sort(key=lambda r: r["step"])
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "summary.json").write_text(json.dumps(
        {"steps": steps[-1], "final_val_loss": val[max(val)], "model_flops_total": flops[-1],
         "rows_standard_topk": 100, **summary}))


def test_report_means_intervals_and_matched_flops_by_hand(tmp_path):
    from megatron_nullmoe.sweep.report import report

    root = tmp_path / "sweep"
    common = {"null_rate_vision": 0.6, "null_rate_text": 0.3}
    _synthetic_run(root / "a/seed1", [10, 20, 30, 40], [4, 3, 2, 1], {2: 2.5, 4: 1.5},
                   {"real_experts_per_token": 2.0, "rows_dispatched": 100, "tokens_per_s": 1000, **common})
    _synthetic_run(root / "a/seed2", [10, 20, 30, 40], [5, 4, 3, 2], {2: 3.0, 4: 2.0},
                   {"real_experts_per_token": 2.0, "rows_dispatched": 100, "tokens_per_s": 1100, **common})
    _synthetic_run(root / "b/seed1", [12, 24, 36, 48], [4, 2, 1.5, 1], {2: 2.0, 4: 1.0},
                   {"real_experts_per_token": 1.9, "rows_dispatched": 50, "tokens_per_s": 900, **common})
    _synthetic_run(root / "b/seed2", [11, 22, 33, 44], [4, 3, 2, 1.5], {2: 2.2, 4: 1.2},
                   {"real_experts_per_token": 2.1, "rows_dispatched": 55, "tokens_per_s": 900, **common})
    _synthetic_run(root / "b/seed3", [9, 18, 27, 36], [3, 2.5, 2, 1], {2: 2.4, 4: 1.0},
                   {"real_experts_per_token": 2.0, "rows_dispatched": 45, "tokens_per_s": 900, **common})
    # One seed; logged every 2 steps, evaluated at step 3 (between logs) and at the end.
    _synthetic_run(root / "c/seed1", [25, 50], [3, 1], {3: 2.0, 4: 1.5},
                   {"real_experts_per_token": 4.0, "rows_dispatched": 100, "tokens_per_s": 800, **common},
                   steps=[2, 4])
    (root / "b/seed4").mkdir()  # unfinished: no summary.json
    report(root)

    rows = {r["variant"]: r for r in csv.DictReader((root / "results.csv").open())}
    num = lambda v: float(v) if v else None  # noqa: E731
    # Budget: the smallest final realised FLOPs among all runs of the grid point, b/seed3's 36.
    assert {num(r["flop_budget"]) for r in rows.values()} == {36.0}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert int(a["n"]) == 2 and int(b["n"]) == 3 and int(c["n"]) == 1
    # a: train at 36 is 2 - 0.6 = 1.4 and 3 - 0.6 = 2.4; validation (20, 2.5)-(40, 1.5) -> 1.7,
    # (20, 3.0)-(40, 2.0) -> 2.2. Interval: t(0.975, 1) = 12.7062 x sd / sqrt(2).
    assert num(a["train_loss_at_budget_mean"]) == pytest.approx(1.9)
    assert num(a["train_loss_at_budget_ci95"]) == pytest.approx(6.3531)
    assert num(a["val_loss_at_budget_mean"]) == pytest.approx(1.95)
    assert num(a["val_loss_at_budget_ci95"]) == pytest.approx(3.17655)
    assert num(a["val_loss_at_budget_lo"]) == pytest.approx(1.95 - 3.17655)
    assert num(a["final_val_loss_mean"]) == pytest.approx(1.75)
    assert num(a["final_val_loss_ci95"]) == pytest.approx(3.17655)
    # b: train 1.5 (at 36 exactly), 2 - 0.5 x 3/11, 1.0; validation 1.5, 2.2 - 14/22, 1.0; t(2) = 4.3027.
    assert num(b["train_loss_at_budget_mean"]) == pytest.approx(1.4545454545)
    assert num(b["train_loss_at_budget_ci95"]) == pytest.approx(1.0771556270)
    assert num(b["val_loss_at_budget_mean"]) == pytest.approx(1.3545454545)
    assert num(b["val_loss_at_budget_ci95"]) == pytest.approx(0.7668358491)
    assert num(b["real_per_token_mean"]) == pytest.approx(2.0)
    assert num(b["real_per_token_ci95"]) == pytest.approx(0.2484165003)
    assert num(b["rows_over_topk_mean"]) == pytest.approx(0.5)
    assert num(b["rows_over_topk_ci95"]) == pytest.approx(0.1242082502)
    assert num(a["rows_over_topk_mean"]) == 1.0 and num(a["rows_over_topk_ci95"]) == 0.0
    assert num(a["tokens_per_s_mean"]) == pytest.approx(1050)
    # c: one seed, no interval; train (25, 3)-(50, 1) -> 2.12 at 36. Its first validation point is
    # at step 3, whose FLOPs interpolate between the logged steps 2 and 4: 37.5 > 36, so no value.
    assert num(c["train_loss_at_budget_mean"]) == pytest.approx(2.12)
    assert c["train_loss_at_budget_ci95"] == "" and c["val_loss_at_budget_mean"] == ""
    md = (root / "results.md").read_text()
    assert "not finished (left out): b/seed4" in md
    assert "| a | 2 | 1.7500 ± 3.17" in md and "| c | 1 | 1.5000 | - | - | 2.1200 | 4.000 |" in md
    assert "val loss, last 4 evals" in md  # summary.json's tail_val_loss (absent here)
    assert (root / "frontier.png").stat().st_size > 10_000
    assert (root / "null_rate.png").stat().st_size > 10_000
    runs = list(csv.DictReader((root / "runs.csv").open()))
    assert len(runs) == 6 and {r["run"] for r in runs} >= {"b/seed3", "c/seed1"}


def test_report_compares_pairs_by_seed_with_an_interval_and_a_verdict(tmp_path):
    from megatron_nullmoe.sweep.report import report

    root = tmp_path / "sweep"
    finals = {"big": [1.0, 1.11, 0.89], "small": [1.3, 1.42, 1.18], "same": [1.2, 1.0, 1.4]}
    runs = []
    for variant, values in finals.items():
        for seed, final in enumerate(values, start=1):
            folder = f"{variant}/seed{seed}"
            _synthetic_run(root / folder, [10, 20], [2.0, final], {2: final},
                           {"real_experts_per_token": 1.0, "rows_dispatched": 100})
            runs.append({"key": folder, "label": variant, "variant": variant, "point": [],
                         "seed": seed, "folder": folder, "steps": 2})
    (root / "sweep.json").write_text(json.dumps({"compare": {
        "gate": ["big", "small"], "noise": ["same", "small"], "flip": ["small", "big"]}, "runs": runs}))
    report(root)
    rows = {(r["comparison"], r["metric"]): r for r in csv.DictReader((root / "comparisons.csv").open())}
    # big - small = -0.3, -0.31, -0.29: mean -0.3, sd 0.01, half-width t(2) 4.303 * 0.01 / sqrt(3)
    gate = rows["gate", "final_val_loss"]
    assert float(gate["mean"]) == pytest.approx(-0.3) and int(gate["n"]) == 3
    assert float(gate["ci95"]) == pytest.approx(4.3027 * 0.01 / 3 ** 0.5)  # t table: 4 digits
    assert gate["verdict"] == "big lower" and rows["flip", "final_val_loss"]["verdict"] == "big lower"
    # same - small = -0.1, -0.42, 0.22: the interval holds 0
    assert rows["noise", "final_val_loss"]["verdict"] == "within noise"
    assert rows["gate", "val_loss_at_budget"]["verdict"] == "big lower"  # same FLOPs: budget = end
    md = (root / "results.md").read_text()
    assert ("| gate | big - small | final val loss | 3 | -0.3000 ± 0.0248 | -0.3000 | 3 of 3 | "
            "big lower |") in md
    # one outlying seed: the median and the count say what the mean hides
    noise = rows["noise", "final_val_loss"]
    assert float(noise["median"]) == pytest.approx(-0.1) and noise["a_lower"] == "2"
    # along training: the same paired difference at each evaluation step both sides logged
    assert "Along training" in md and "| gate | big - small | 2 | 3 | -0.3000 ± 0.0248 | big lower |" in md


# ------------------------------------------------------------------------------ real runs
@pytest.mark.slow
def test_skip_and_resume_through_the_trainer(tmp_path, capsys):
    """Two tiny runs side by side: stopped after 2 of 4 steps, resumed to 4, then skipped."""
    demo = tiny_demo(tmp_path / "demo", train_samples=128)
    overrides = dict(item.split("=", 1) for item in TINY)
    overrides = {k: yaml.safe_load(v) for k, v in overrides.items()}
    path = write_sweep(tmp_path, overrides={**overrides, "data.path": str(demo), "steps": 4,
                                            "checkpoint.save_every": 100}, seeds=[1, 2])
    root = tmp_path / "runs" / "t"
    code, out = cli_main(["run", str(path), "--parallel", "2", "exit_after_steps=2"], capsys)
    assert code == 0, out
    assert out.count("stopped base/seed") == 2, out
    for seed in (1, 2):
        folder = root / "base" / f"seed{seed}"
        assert (folder / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
        assert not (folder / "summary.json").exists()
    assert "2 runs | 0 done | 0 running | 0 queued | 0 failed | 2 stopped" in out

    code, out = cli_main(["run", str(path), "--parallel", "2"], capsys)
    assert code == 0, out
    assert "started base/seed1 (resuming at step 2)" in out and "done base/seed2 at step 4/4" in out
    for seed in (1, 2):
        folder = root / "base" / f"seed{seed}"
        assert json.loads((folder / "summary.json").read_text())["steps"] == 4
        assert "resumed from" in (folder / "sweep.log").read_text()
        steps = [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]  # one history across the two launches
    summary = (root / "base" / "seed1" / "summary.json").stat().st_mtime_ns
    log = (root / "base" / "seed1" / "sweep.log").read_text()

    code, out = cli_main(["run", str(path)], capsys)
    assert code == 0 and "skipping 2 finished run(s)" in out and "started" not in out
    assert (root / "base" / "seed1" / "summary.json").stat().st_mtime_ns == summary
    assert (root / "base" / "seed1" / "sweep.log").read_text() == log
    code, out = cli_main(["report", str(root)], capsys)
    assert code == 0 and "| base | 2 |" in out


@pytest.mark.slow
def test_a_failing_run_is_reported_with_its_cause(tmp_path, capsys):
    path = write_sweep(tmp_path, overrides={"data.path": str(tmp_path / "no-data"),
                                            "parallel.expert": 1}, variants={"broken": {}})
    code, out = cli_main(["run", str(path)], capsys)
    assert code == 1
    assert "FAILED broken/seed1 (exit code 1): error:" in out and "no-data" in out, out
    assert "1 runs | 0 done | 0 running | 0 queued | 1 failed" in out
    state = json.loads((tmp_path / "runs/t/broken/seed1/sweep_state.json").read_text())
    assert state["state"] == "failed" and state["rc"] == 1


@pytest.mark.slow
def test_only_launches_the_named_variants(tmp_path, capsys):
    path = write_sweep(tmp_path, overrides={"data.path": str(tmp_path / "no-data"),
                                            "parallel.expert": 1},
                       variants={"gate": {}, "later": {"model.router_topk": 1}})
    code, out = cli_main(["run", str(path), "--only", "nope,gate"], capsys)
    assert code != 0 and "--only 'nope,gate': nope is not a variant of this sweep" in out
    assert "expected some of gate, later" in out
    code, out = cli_main(["run", str(path), "--only", "gate"], capsys)
    assert code == 1 and "FAILED gate/seed1" in out and "later/seed1" in out  # in the table
    assert "started later" not in out and not (tmp_path / "runs/t/later/seed1").exists()


def test_a_run_that_is_running_elsewhere_is_not_launched_twice(tmp_path, capsys):
    from megatron_nullmoe.sweep.state import write_state

    path = write_sweep(tmp_path, overrides={"parallel.expert": 1},
                       launch={"nodes": 1, "gpus_per_node": 1})
    folder = tmp_path / "runs/t/base/seed1"
    write_state(folder, "running", launcher="local", pid=os.getpid())  # alive: this process
    code, out = cli_main(["run", str(path)], capsys)
    assert code == 0 and "skipping 1 running elsewhere run(s): base/seed1" in out, out
    assert not (folder / "sweep.log").exists()
    write_state(folder, "running", launcher="slurm")  # a Slurm task says it runs it
    code, out = cli_main(["run", str(path), "--launcher", "slurm"], capsys)
    assert code == 0 and "nothing to submit" in out, out
    assert not (tmp_path / "runs/t/sweep.sbatch").exists()


def test_seeds_on_the_command_line_replace_the_files(tmp_path, capsys):
    path = write_sweep(tmp_path, overrides={"data.path": str(tmp_path / "no-data"),
                                            "parallel.expert": 1}, seeds=[1, 2])
    assert [r.seed for r in plan(load_sweep(path, seeds=[1, 2, 7]))] == [1, 2, 7]
    code, out = cli_main(["run", str(path), "--seeds", "1,2,7", "--dry-run"], capsys)
    assert code == 0 and "x 3 seeds" in out
    for bad, message in (("1,x", "--seeds '1,x': give integers separated by commas"),
                         ("2,2", "seeds=[2, 2]: give distinct integers")):
        code, out = cli_main(["run", str(path), "--seeds", bad, "--dry-run"], capsys)
        assert code != 0 and message in out


def test_a_plan_for_more_seeds_keeps_the_seeds_run_before(tmp_path):
    """`run --seeds 3` after seeds 1-2 keeps them in sweep.json (so in status and report), unless
    their folder is gone or their variant now trains something else."""
    from megatron_nullmoe.sweep.state import read_plan, write_plan

    def plan_for(seeds, variants):
        path = write_sweep(tmp_path, overrides={"steps": 4}, variants=variants, seeds=seeds)
        sweep, runs = planned(path)
        for r in runs:
            r.folder.mkdir(parents=True, exist_ok=True)
        write_plan(sweep.root, path, sweep.base, runs)
        return sweep.root, [e["key"] for e in read_plan(sweep.root)]

    variants = {"a": {}, "b": {"model.router_topk": 1}}
    root, keys = plan_for([1, 2], variants)
    assert keys == ["a/seed1", "b/seed1", "a/seed2", "b/seed2"]
    _, keys = plan_for([3], variants)
    assert keys == ["a/seed1", "b/seed1", "a/seed2", "b/seed2", "a/seed3", "b/seed3"]
    plan = json.loads((root / "sweep.json").read_text())["runs"]
    assert [e["seed"] for e in plan] == [1, 1, 2, 2, 3, 3]
    assert plan[0]["overrides"][-3:] == ["seed=1", f"dir={root / 'a/seed1'}", "name=t/a/seed1"]
    (root / "a/seed2").rename(root / "a/gone")  # a run whose folder is gone is left out
    _, keys = plan_for([3], {"a": {}, "b": {"model.router_topk": 2}})  # b trains otherwise now
    assert keys == ["a/seed1", "a/seed3", "b/seed3"]
    (root / "sweep.json").write_text("{not json")  # an unreadable plan: this sweep's runs alone
    _, keys = plan_for([2], variants)
    assert keys == ["a/seed2", "b/seed2"]


def test_along_training_pairs_each_evaluation_step_and_keeps_the_last():
    from megatron_nullmoe.sweep.report import along_training

    def run(variant, seed, losses):
        return {"variant": variant, "seed": seed, "point": (),
                "records": [{"step": 10 * (i + 1), "val/loss": v} for i, v in enumerate(losses)]
                + [{"step": 5, "train/loss": 9.0}]}

    gap = [0.3, 0.2, 0.1, 0.0, -0.1]  # A starts behind and ends ahead
    runs = [run("a", s, [2 + g + 0.01 * s for g in gap]) for s in (1, 2, 3)]
    runs += [run("b", s, [2 + 0.01 * s] * 5) for s in (1, 2, 3)]
    rows = along_training(runs, {"ab": ("a", "b")})
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
    assert [round(r["mean"], 6) for r in rows] == gap and all(r["n"] == 3 for r in rows)
    assert rows[0]["verdict"] == "b lower" and rows[-1]["verdict"] == "a lower"
    few = along_training(runs, {"ab": ("a", "b")}, max_rows=2)
    assert len(few) <= 2 and few[-1]["step"] == 50
    assert along_training(runs[:1] + runs[3:4], {"ab": ("a", "b")}) == []  # one seed: no interval


def _slow_saving_trainer(run, base, nproc):
    """A stand-in trainer: checkpoint 3 at once, then on SIGTERM 1 s to save checkpoint 7."""
    code = (f"import pathlib, signal, sys, time\n"
            f"folder = pathlib.Path({str(run.folder)!r})\n"
            "def stop(*_):\n"
            "    time.sleep(1.0)\n"
            "    (folder / 'checkpoints').mkdir(exist_ok=True)\n"
            "    (folder / 'checkpoints' / 'latest').write_text('iter_0000007')\n"
            "    sys.exit(75)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "(folder / 'checkpoints').mkdir(exist_ok=True)\n"
            "(folder / 'checkpoints' / 'latest').write_text('iter_0000003')\n"
            "(folder / 'metrics.jsonl').write_text('{\"step\": 5}\\n')\n"
            "time.sleep(60)\n")
    return [sys.executable, "-c", code]


def test_a_stopped_run_gets_its_grace_to_save_and_a_late_one_is_killed(tmp_path, monkeypatch):
    """SIGTERM to the sweep: every run gets the TERM and `stop_grace` seconds. A stand-in trainer
    that takes 1 s to save (longer than torchrun's habit would allow at a grace of 0.3 s, well
    inside 5 s) saves with the grace of 5 s and is killed with 0.3 s; the message names the step
    it resumes from (its checkpoint's, not the last logged one)."""
    import threading

    from megatron_nullmoe.sweep import local

    monkeypatch.setattr(local, "command", _slow_saving_trainer)
    for grace, step in ((5.0, 7), (0.3, 3)):
        (tmp_path / str(grace)).mkdir()
        path = write_sweep(tmp_path / str(grace), variants={"a": TOP2})
        runs = plan(load_sweep(path))
        said = []
        timer = threading.Timer(4.0, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            local.run_local(runs, Path(DEMO), poll=0.05, stop_grace=grace, echo=said.append)
        timer.cancel()
        assert any("started a/seed1" in s and "resuming" not in s for s in said), said
        assert any(f"each saves a checkpoint (up to {grace:g} s" in s for s in said), said
        assert (f"killed a/seed1 before it saved; it resumes from step {step}" in said) == (
            grace < 1), said
        assert (runs[0].folder / "checkpoints" / "latest").read_text() == f"iter_{step:07d}"


def test_a_kept_seed_is_judged_by_the_config_it_trained(tmp_path):
    """An earlier seed with a saved config.yaml stays when that config is what its variant
    trains now (an override that restates a default changes nothing), and is dropped when it
    trained something else under the same overrides (a default changed since)."""
    import yaml

    from megatron_nullmoe.run.config import save_config
    from megatron_nullmoe.sweep.state import read_plan, write_plan

    def plan_for(seeds, variants):
        path = write_sweep(tmp_path, overrides={"steps": 4}, variants=variants, seeds=seeds)
        sweep, runs = planned(path)
        for r in runs:
            r.folder.mkdir(parents=True, exist_ok=True)
            save_config(r.cfg, r.folder / "config.yaml")  # as the trainer does when it starts
        write_plan(sweep.root, path, sweep.base, runs)
        return sweep.root, [e["key"] for e in read_plan(sweep.root)]

    root, keys = plan_for([1], {"a": {}, "b": {"model.router_topk": 1}})
    topk = yaml.safe_load((root / "a/seed1/config.yaml").read_text())["model"]["router_topk"]
    _, keys = plan_for([2], {"a": {"model.router_topk": topk}, "b": {"model.router_topk": 1}})
    assert keys == ["a/seed1", "b/seed1", "a/seed2", "b/seed2"]
    saved = yaml.safe_load((root / "b/seed1/config.yaml").read_text())
    saved["optim"]["lr"] = saved["optim"]["lr"] * 2  # what b/seed1 trained differs from b now
    (root / "b/seed1/config.yaml").write_text(yaml.safe_dump(saved))
    _, keys = plan_for([3], {"a": {"model.router_topk": topk}, "b": {"model.router_topk": 1}})
    assert keys == ["a/seed1", "a/seed2", "b/seed2", "a/seed3", "b/seed3"]


def test_an_earlier_seed_of_a_variant_that_starts_from_another_is_kept(tmp_path):
    """A variant with `checkpoint.init_from: "@SOURCE"` starts each seed from that seed's source
    run: the path differs by seed, the setting does not, so adding seeds keeps the earlier ones
    (with or without the config.yaml a started run saves)."""
    from megatron_nullmoe.run.config import save_config
    from megatron_nullmoe.sweep.state import read_plan, write_plan

    variants = {"src": {}, "b": {"checkpoint.init_from": "@src", "model.router_topk": 1}}
    for saved in (False, True):
        base = tmp_path / str(saved)
        base.mkdir()
        for seeds in ([1], [2]):
            path = write_sweep(base, overrides={"steps": 4}, variants=variants, seeds=seeds)
            sweep, runs = planned(path)
            for r in runs:
                r.folder.mkdir(parents=True, exist_ok=True)
                if saved:
                    save_config(r.cfg, r.folder / "config.yaml")
            write_plan(sweep.root, path, sweep.base, runs)
        keys = [e["key"] for e in read_plan(sweep.root)]
        assert keys == ["src/seed1", "b/seed1", "src/seed2", "b/seed2"], (saved, keys)


def test_sigint_stops_a_sweep_started_where_sigint_is_ignored(tmp_path, monkeypatch):
    """A shell starts background jobs (`sweep run ... &`, nohup) with SIGINT ignored, which
    Python keeps; `kill -INT` must still stop the sweep as Ctrl-C does: every run gets its TERM
    and saves."""
    import threading

    from megatron_nullmoe.sweep import local

    monkeypatch.setattr(local, "command", _slow_saving_trainer)
    path = write_sweep(tmp_path, variants={"a": TOP2})
    runs = plan(load_sweep(path))
    said = []
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            local.run_local(runs, Path(DEMO), poll=0.05, stop_grace=5.0, echo=said.append)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # given back as it was
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, before)
    assert any("each saves a checkpoint" in s for s in said), said
    assert (runs[0].folder / "checkpoints" / "latest").read_text() == "iter_0000007"
