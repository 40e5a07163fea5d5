"""Pre-emption, non-finite values and hangs, on real 2-rank runs (torchrun, gloo, expert parallel 2).

Faults are injected only through tests/_fault_entry.py (a test-only wrapper of the trainer's
entry); the product has no switch for them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._train import ROOT, losses, run, tiny_demo, vlm_args

# Every test here runs the trainer through signals, stalls and bad steps: once per CI run (the
# default megatron-core), with `make test-slow`.
pytestmark = pytest.mark.slow

ENTRY = str(ROOT / "tests" / "_fault_entry.py")
TIMING = ("tokens_per_s", "run_dir")  # wall-clock and the folder name are allowed to differ


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("data") / "demo")


def launch(args: list[str], ranks: int = 2, **fault_env: str) -> subprocess.Popen:
    """torchrun in a session of its own (the test's signals reach it and its descendants only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **fault_env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", ENTRY, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def signal_job(root: int, sig: signal.Signals) -> list[int]:
    """Sends `sig` to `root` and every process descended from it, as Slurm signals every process
    of a job step (torchrun starts each worker in a session of its own, so one os.killpg cannot
    reach them all). Returns the pids signalled."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a process that ended while we looked
    family, grew = {root}, True
    while grew:
        kids = {pid for pid, ppid in parent.items() if ppid in family} - family
        family |= kids
        grew = bool(kids)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return sorted(family)


def wait_until(done, what: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    wait_until(path.exists, f"{path} appeared", proc)


def wait_for_step(pids: Path, step: int, proc: subprocess.Popen) -> None:
    """Waits until rank 0 has started `step` (FAULT_PID_DIR's step file): the stop check of the
    step before is behind every rank, so a signal sent now is answered at `step` or later. (A
    signal sent when a periodic checkpoint's folder appears may still be answered at that very
    step, whose checkpoint then serves as the stop checkpoint.)"""
    marker = pids / "step0"

    def started() -> bool:
        text = marker.read_text().strip() if marker.exists() else ""
        return text.isdigit() and int(text) >= step

    wait_until(started, f"step {step} started", proc)


def summary(run_dir: Path) -> dict:
    out = json.loads((run_dir / "summary.json").read_text())
    return {k: v for k, v in out.items() if k not in TIMING}


# One data-loader worker per rank: a stop signal to every process of the job reaches it too.
COMMON = ["steps=10", "parallel.expert=2", "checkpoint.save_every=4", "logging.log_every=3",
          "data.num_workers=1"]


@pytest.fixture(scope="module")
def full(demo, tmp_path_factory) -> Path:
    """The uninterrupted run that every stopped-and-resumed run of COMMON must equal."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run(vlm_args(demo, run_dir, *COMMON), ranks=2)
    return run_dir


def assert_resumes_exactly(demo, split: Path, latest: str, full: Path) -> None:
    resumed = run(vlm_args(demo, split, *COMMON), ranks=2)
    assert "resumed from" in resumed.stdout and latest in resumed.stdout
    assert losses(split) == losses(full)
    whole, mine = summary(full), summary(split)
    assert math.isclose(mine.pop("model_flops_total"), whole.pop("model_flops_total"),
                        rel_tol=1e-12)
    assert mine == whole  # rows, tokens, null counts: every running total continued


def test_sigterm_between_checkpoints_saves_that_step_and_resumes_exactly(demo, full, tmp_path):
    """SIGTERM reaches one rank only (as a node-local signal would), after the periodic checkpoint
    at step 4 and before the one at 8. Both ranks agree, save the step they reached, and exit;
    the resumed run ends with the uninterrupted run's losses and summary."""
    split, pids = tmp_path / "split", tmp_path / "pids"
    proc = launch(vlm_args(demo, split, *COMMON), FAULT_SLOW_STEP_S="0.5",
                  FAULT_PID_DIR=str(pids))
    wait_for_step(pids, 5, proc)
    os.kill(int((pids / "rank1").read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    latest = (split / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("iter_"))
    assert 4 < stopped_at < 8, (latest, out[-2000:], err[-2000:])
    assert f"stopping at step {stopped_at} of 10 (a stop signal) with a checkpoint" in out
    assert "exitcode  : 75" in err or "exitcode: 75" in err.replace("  ", " ")
    assert not (split / "summary.json").exists()
    assert_resumes_exactly(demo, split, latest, full)


@pytest.mark.parametrize("target", ["launcher", "job"])
def test_sigterm_to_launcher_or_whole_job_still_saves_and_resumes_exactly(
        demo, full, tmp_path, target):
    """The signals of a cluster: SIGTERM to torchrun, which sends it to each worker's process
    group, or SIGTERM to every process of the job, torchrun included (Slurm at pre-emption or
    the time limit). Either way the workers' helpers get it too: megatron-core's checkpoint
    writer (started by the periodic save at step 4) and the data-loader workers. The stop save
    still completes, well before torchrun's SIGKILL 30 s later, and the run resumes exactly."""
    split, pids = tmp_path / "split", tmp_path / "pids"
    proc = launch(vlm_args(demo, split, *COMMON), FAULT_SLOW_STEP_S="0.5",
                  FAULT_PID_DIR=str(pids))
    wait_for_step(pids, 5, proc)
    if target == "launcher":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        assert len(signal_job(proc.pid, signal.SIGTERM)) > 3  # torchrun, 2 ranks, helpers
    out, err = proc.communicate(timeout=120)
    latest = (split / "checkpoints" / "latest").read_text().strip()
    assert 4 < int(latest.removeprefix("iter_")) < 8, (latest, out[-2000:], err[-4000:])
    assert f"stopping at step {latest.removeprefix('iter_').lstrip('0')} of 10 (a stop signal)" \
        in out
    assert "forcefully exiting via SIGKILL" not in err  # the save beat torchrun's deadline
    assert not list((split / "checkpoints").glob("*.tmp"))
    assert_resumes_exactly(demo, split, latest, full)


def test_one_rank_sigint_exit_code_and_exit_at_step(demo, tmp_path):
    """Ctrl-C on a laptop (SIGINT, one process) saves too, and the process exits 75; exit_at_step
    stops a run at an absolute step with a checkpoint and exit code 0."""
    run_dir = tmp_path / "run"
    env = {**_one_process_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "FAULT_SLOW_STEP_S": "0.5"}
    proc = subprocess.Popen([sys.executable, ENTRY, *vlm_args(demo, run_dir, "steps=20",
                                                              "checkpoint.save_every=2")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(run_dir / "checkpoints" / "iter_0000002", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "(a stop signal) with a checkpoint" in out
    step = int((run_dir / "checkpoints/latest").read_text().strip().removeprefix("iter_"))
    assert step >= 2
    done = run(vlm_args(demo, run_dir, "steps=20", f"exit_at_step={step + 2}"))
    assert f"stopping at step {step + 2} of 20 (exit_at_step)" in done.stdout
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"iter_{step + 2:07d}"


def test_ctrl_c_to_the_whole_process_group_with_data_workers(demo, tmp_path):
    """Ctrl-C in a terminal sends INT to every process of the foreground group: data-loader
    workers and dist_checkpointing's writer process too. The trainer still saves the step it
    reached and exits 75 (8 micro-batches a step: more than the worker has prefetched)."""
    run_dir = tmp_path / "run"
    env = {**_one_process_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "FAULT_SLOW_STEP_S": "0.5"}
    proc = subprocess.Popen([sys.executable, ENTRY, *vlm_args(demo, run_dir, "steps=20",
                                                              "checkpoint.save_every=2",
                                                              "data.num_workers=1",
                                                              "data.micro_batch_size=2")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    wait_for(run_dir / "checkpoints" / "iter_0000002", proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "(a stop signal) with a checkpoint" in out
    assert int((run_dir / "checkpoints/latest").read_text().strip().removeprefix("iter_")) >= 2


def test_time_budget_stops_with_a_checkpoint(demo, tmp_path):
    out = run(vlm_args(demo, tmp_path / "run", "steps=200", "exit_after_minutes=0.001"),
              check=False)
    assert out.returncode == 75, out.stderr[-2000:]
    assert "(exit_after_minutes) with a checkpoint" in out.stdout
    assert (tmp_path / "run/checkpoints/latest").read_text().strip() == "iter_0000001"


def test_a_nonfinite_step_is_skipped_and_a_run_of_them_stops_naming_rank_and_checkpoint(
        demo, tmp_path):
    run_dir = tmp_path / "run"
    args = vlm_args(demo, run_dir, "steps=6", "parallel.expert=2", "checkpoint.save_every=2")
    proc = launch(args, FAULT_NAN_STEPS="3", FAULT_NAN_RANK="1")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "warning: step 3 skipped: a non-finite loss on rank(s) 1 (1 in a row, stop at 3)" in out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "train/loss" in r}
    assert math.isnan(train[3]["train/loss"]) and not train[3]["train/update_ok"]
    assert all(math.isfinite(train[s]["train/loss"]) for s in (1, 2, 4, 5, 6))
    assert json.loads((run_dir / "summary.json").read_text())["skipped_steps"] == 1

    bad = tmp_path / "bad"
    proc = launch(vlm_args(demo, bad, "steps=8", "parallel.expert=2", "checkpoint.save_every=2"),
                  FAULT_NAN_STEPS="4,5,6", FAULT_NAN_RANK="1")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert ("error: step 6: a non-finite loss on rank(s) 1, 3 steps in a row "
            "(faults.max_nonfinite_in_a_row=3)") in err
    # step 4 was skipped, so the weights saved at step 4 are still good ones
    assert f"The last good checkpoint is {bad / 'checkpoints' / 'iter_0000004'}" in err
    assert (bad / "checkpoints/latest").read_text().strip() == "iter_0000004"
    assert not (bad / "checkpoints/iter_0000006").exists()


def test_nonfinite_weights_are_never_saved(demo, tmp_path):
    """With the guard off, a NaN step poisons the weights: the next save is refused and the last
    good checkpoint stays the newest."""
    run_dir = tmp_path / "run"
    proc = launch(vlm_args(demo, run_dir, "steps=6", "parallel.expert=2",
                           "checkpoint.save_every=2", "faults.skip_nonfinite=false"),
                  FAULT_NAN_STEPS="3", FAULT_NAN_RANK="0")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "refusing to save step 4: rank(s) 0, 1 hold non-finite weights" in err
    assert (run_dir / "checkpoints/latest").read_text().strip() == "iter_0000002"
    assert not (run_dir / "checkpoints/iter_0000004").exists()


def test_a_stalled_rank_is_named_within_the_timeout(demo, tmp_path):
    start = time.monotonic()
    proc = launch(vlm_args(demo, tmp_path / "run", "steps=20", "parallel.expert=2",
                           "faults.stall_timeout_s=6"), FAULT_STALL_STEP="3", FAULT_STALL_RANK="1")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    assert "stalled: rank 1 (at step 3 'step start'" in err, err[-3000:]
    assert "rank 0 made no progress for" in err
    # start-up and two steps take a few seconds; the stall is reported 6 s (+ one poll) later,
    # far sooner than the 600 s collective timeout would end it
    assert time.monotonic() - start < 120


def test_bad_signal_name_is_a_config_error(demo, tmp_path):
    out = run(vlm_args(demo, tmp_path / "run", "steps=1", "faults.exit_signals=TERM,KILLME"),
              check=False)
    assert out.returncode != 0
    assert "faults.exit_signals: 'KILLME' is not one of TERM, USR1, USR2, INT, HUP" in out.stderr


def _one_process_env() -> dict:
    """This environment less MASTER_PORT: one trainer process takes a free port of its own
    (parallel.init_distributed); this process's (conftest) is taken by its store."""
    return {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}


def test_watchdog_waits_out_long_phases_but_not_a_stall():
    """A save or an evaluation may outlast the stall timeout; anything else may not."""
    from megatron_nullmoe.train import faults

    exits, lines = [], []
    dog = faults.Watchdog(0.3, log=lines.append, exit_fn=exits.append)
    try:
        with dog.long_phase():
            time.sleep(1.0)
        assert exits == []
        dog.beat(7, 2)
        time.sleep(1.0)
        assert exits and exits[0] == faults.EXIT_STALLED
        assert "rank 0 made no progress" in lines[0] and "after step 7 'forward-backward done'" \
            in lines[0]
    finally:
        dog.close()


HELPERS = """
import multiprocessing as mp, os, signal, sys, time
from megatron_nullmoe.train.faults import StopRequest

def idle():
    time.sleep(60)

if __name__ == "__main__":
    stop = StopRequest([signal.SIGTERM, signal.SIGUSR1])
    queue = mp.get_context("spawn").Manager().Queue()  # what megatron-core's writer uses
    worker = mp.get_context("fork").Process(target=idle, daemon=True)  # a data-loader worker
    worker.start()
    helpers = mp.active_children()
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # as to every process of the job
        for pid in [os.getpid()] + [p.pid for p in helpers]:
            os.kill(pid, sig)
    time.sleep(0.5)
    queue.put("alive")
    print(stop.received is not None, len(helpers), all(p.is_alive() for p in helpers),
          queue.get())
    stop.restore()
    print(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
          signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""


def test_stop_signals_reach_the_rank_flag_but_not_its_helpers(tmp_path):
    """The mechanism behind the two tests above, in one process: the rank gets the flag, the
    helpers it starts (a spawned manager, a forked daemon) survive TERM and USR1, restore()
    gives the thread its mask and handlers back, and the process still exits at once although
    its daemon child no longer sees the SIGTERM multiprocessing ends it with."""
    script = tmp_path / "helpers.py"
    script.write_text(HELPERS)
    start = time.monotonic()
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["True 2 True alive", "[] True"]
    # not the daemon's 60 s sleep (start-up alone took 22 s on a loaded 2-core host)
    assert time.monotonic() - start < 50


def test_watchdog_does_not_count_time_the_process_was_suspended():
    """SIGSTOP / SIGCONT (Ctrl-Z, `scontrol suspend`) freezes every thread: after SIGCONT the
    wall clock has moved past the stall timeout, but the rank did not stall; the run goes on.
    A real stall after that is still caught."""
    from megatron_nullmoe.train import faults

    code = (
        "import sys, time\n"
        "from megatron_nullmoe.train import faults\n"
        "dog = faults.Watchdog(2.0)\n"
        "dog.beat(1, 0)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # a step: it ends when the parent says so
        "dog.beat(2, 0)\n"
        "print('survived', flush=True)\n"
        "time.sleep(10.0)\n"  # now a stall: the watchdog ends the process
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(3.0)  # past the timeout of 2 s, frozen
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.5)  # the step goes on for a while after the resume
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "survived" in out, out
    assert proc.returncode == faults.EXIT_STALLED and "made no progress" in out, out
