"""Local launcher: the sweep's runs as trainer processes on this machine, `parallel` at a time.

Each run is `python -m megatron_nullmoe.train --config <base> <overrides>` (`torchrun --standalone
--nproc-per-node N` for N > 1), in its own process group, its output appended to
<run>/sweep.log. A finished run is skipped; any other is launched, and the trainer resumes it
from its newest checkpoint by itself. A line is printed whenever a run changes state, and a
progress line every `status_every` seconds. Ctrl-C or SIGTERM stops the runs, each with a
checkpoint: they get `stop_grace` seconds to finish a step or an evaluation and save (a loaded
2-core machine needed more than torchrun's 30 s for an evaluation); the next `run` resumes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from megatron_nullmoe.sweep.checks import run_flops
from megatron_nullmoe.sweep.spec import Run
from megatron_nullmoe.sweep.state import (STATE_FILE, is_done, last_step, run_state, saved_step,
                                          write_state)

# Exit codes that are not failures: 0 (finished, or stopped by exit_after_steps) and 75
# (EX_TEMPFAIL: the trainer stopped on a signal or time budget after saving a checkpoint).
RESUMABLE = (0, 75)


def command(run: Run, base: Path, nproc: int) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "megatron_nullmoe.train", "--config", str(base), *run.overrides]


def _env(parallel: int, nproc: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        # A lone trainer process takes a free port of its own (parallel.init_distributed); one
        # inherited from this shell would be shared by every run side by side.
        env.pop("MASTER_PORT", None)
    # Runs side by side share the cores instead of each taking all of them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (parallel * nproc))))
    return env


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


def run_local(runs: list[Run], base: Path, parallel: int = 1, nproc: int = 1,
              status_every: float = 60.0, poll: float = 0.5, stop_grace: float = 120.0,
              echo: Callable[[str], None] = print) -> dict[str, str]:
    """Runs what is neither finished nor running elsewhere (another `run` of this sweep, a
    Slurm task: two launches into one folder would corrupt it); returns {run key: done |
    stopped | failed | elsewhere}. Stopped (Ctrl-C, SIGTERM), each run gets `stop_grace` seconds
    to finish its step (or evaluation) and save; a second Ctrl-C kills them at once."""
    outcome = {}
    for r in runs:
        state = run_state(r.folder, r.cfg.steps)[0]
        if state in ("done", "running", "queued"):
            outcome[r.key] = "done" if state == "done" else "elsewhere"
    todo = [r for r in runs if r.key not in outcome]
    for what, word in (("done", "finished"), ("elsewhere", "running elsewhere")):
        keys = [k for k, v in outcome.items() if v == what]
        if keys:
            echo(f"skipping {len(keys)} {word} run(s): {', '.join(keys)}"
                 + (f" (their {STATE_FILE} says so)" if what == "elsewhere" else ""))
    active: dict[str, tuple[Run, subprocess.Popen]] = {}
    env = _env(parallel, nproc)
    by_key = {r.key: r for r in runs}
    cost = {r.key: run_flops(r.cfg, vocab=32000) for r in runs}  # only their order matters

    def source_state(run: Run) -> str:
        """done / waiting (its source is still to run) / missing (failed, stopped, or neither
        planned here nor finished) for a run that starts from another run's checkpoint."""
        if run.after is None:
            return "done"
        source = by_key.get(run.after)
        if source is None:
            return "done" if is_done(run.folder.parents[1] / run.after, 0) else "missing"
        if outcome.get(run.after) == "done":
            return "done"
        return "missing" if run.after in outcome else "waiting"

    def line(event: str) -> None:
        n = Counter(outcome.values())
        echo(f"[{time.strftime('%H:%M:%S')}] done {n['done']} | running {len(active)} | failed "
             f"{n['failed']} | stopped {n['stopped']} | pending {len(todo)} of {len(runs)}"
             + (f" | elsewhere {n['elsewhere']}" if n["elsewhere"] else "") + f" | {event}")

    # SIGINT too, explicitly (as torchrun does): a shell starts a background job (`&`, nohup)
    # with SIGINT ignored, and Python keeps that, so `kill -INT` would otherwise do nothing.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    last_status = time.monotonic()
    try:
        while todo or active:
            for run in [r for r in todo if source_state(r) == "missing"]:
                todo.remove(run)
                outcome[run.key] = "failed"
                line(f"SKIPPED {run.key}: it starts from {run.after}, which is "
                     f"{outcome.get(run.after, 'not finished')}")
            while todo and len(active) < parallel:
                ready = [r for r in todo if source_state(r) == "done"]
                if not ready:
                    break
                # A run others start from goes first, so that they do not wait in a line; then
                # the earliest seed (a sweep stopped early leaves whole seeds to pair), and in it
                # the largest run, so that the last runs to finish are small ones and no core
                # waits long on one big run at the end.
                awaited = {r.after for r in todo}
                run = min(ready, key=lambda r: (r.key not in awaited, r.seed, -cost[r.key]))
                todo.remove(run)
                run.folder.mkdir(parents=True, exist_ok=True)
                with (run.folder / "sweep.log").open("a") as log:
                    log.write(f"\n# sweep launch {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                    log.flush()
                    proc = subprocess.Popen(
                        command(run, base, nproc), stdout=log, stderr=subprocess.STDOUT,
                        env=env, start_new_session=True)
                write_state(run.folder, "running", launcher="local", pid=proc.pid)
                active[run.key] = (run, proc)
                resume = saved_step(run.folder)
                line(f"started {run.key}" + (f" (resuming at step {resume})" if resume else ""))
            time.sleep(poll)
            for key, (run, proc) in list(active.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                del active[key]
                write_state(run.folder, "exited" if rc in RESUMABLE else "failed", launcher="local",
                            rc=rc)
                if rc not in RESUMABLE:
                    outcome[key] = "failed"
                    line(f"FAILED {key} (exit code {rc}): {_cause(run.folder / 'sweep.log')}")
                else:
                    outcome[key] = "done" if is_done(run.folder, run.cfg.steps) else "stopped"
                    at = run.cfg.steps if outcome[key] == "done" else saved_step(run.folder)
                    line(f"{outcome[key]} {key} at step {at}/{run.cfg.steps}")
            if active and time.monotonic() - last_status > status_every:
                last_status = time.monotonic()
                line("progress: " + ", ".join(f"{k} {last_step(r.folder)}/{r.cfg.steps}"
                                              for k, (r, _) in active.items()))
    except (KeyboardInterrupt, _Stop):
        _stop_all(list(active.values()), stop_grace, echo)
        echo(f"interrupted: stopped {len(active)} run(s); `run` again resumes them")
        raise KeyboardInterrupt from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome


def _cause(log: Path) -> str:
    """The line of a failed run's log that says why (torchrun's own report says only that a
    child failed), and where the whole log is."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    said = [ln for ln in lines if re.search(r"error:|Error\b|Error:", ln)
            and not re.search(r"elastic|error_file|ChildFailedError", ln)]
    return f"{(said or lines or ['(no output)'])[-1]} (log: {log})"


def _stop_all(active, grace: float, echo: Callable[[str], None] = print) -> None:
    """TERM to each run's process group (ours: started with start_new_session): the trainer
    finishes its step, or its evaluation, saves and exits. A run still there after `grace`
    seconds, or at a second Ctrl-C / SIGTERM, is killed; it resumes from its last checkpoint."""
    for run, proc in active:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if active:
        echo(f"stopping {len(active)} run(s): each saves a checkpoint (up to {grace:g} s, "
             "--stop-grace; Ctrl-C again kills them now)")
    deadline = time.monotonic() + grace
    try:
        for run, proc in active:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    except (KeyboardInterrupt, _Stop):
        pass
    for run, proc in active:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            echo(f"killed {run.key} before it saved; it resumes from step {saved_step(run.folder)}")
        write_state(run.folder, "interrupted", launcher="local", rc=proc.returncode)
