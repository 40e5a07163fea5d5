"""A run's state, read from its folder, and the sweep's plan file.

What the trainer leaves: `summary.json` only when a run reaches its `steps` (a stop by
exit_after_steps, a kill or a pre-emption leaves checkpoints and no summary), `metrics.jsonl`
with one record per logged step, `checkpoints/latest`. What the launchers add: `sweep_state.json`
({"state": queued | running | exited | failed | interrupted | requeued, "rc", "pid", "job",
"host", ...}) and
`sweep.log` (local runs' output). From these:

    done      summary.json with steps >= the planned steps
    running   the last launch says running (a local one on this host: its process is alive; a
              Slurm task: squeue still lists it, where squeue is at hand)
    queued    submitted as a Slurm array task (or requeued) and not started yet
    failed    the last launch exited non-zero
    stopped   started, not finished, not running: the next launch resumes from its checkpoint
    pending   never started
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

STATE_FILE = "sweep_state.json"
PLAN_FILE = "sweep.json"
STATES = ("done", "running", "queued", "failed", "stopped", "pending")


def write_state(folder: Path, state: str, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"state": state, "host": socket.gethostname(), "time": time.time(), **extra}
    (folder / STATE_FILE).write_text(json.dumps(record) + "\n")


def last_step(folder: Path) -> int:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def saved_step(folder: Path) -> int:
    """The step of the run's newest complete checkpoint (the trainer's `checkpoints/latest`), where
    a launch resumes; 0 if it has none (metrics may go further: steps after the last save)."""
    pointer = folder / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("iter_"))
    except (OSError, ValueError):
        return 0


def is_done(folder: Path, steps: int) -> bool:
    path = folder / "summary.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("steps", 0) >= steps
    except json.JSONDecodeError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _slurm_alive(job: str) -> bool:
    """Whether Slurm still holds the array task `job` (<array>_<task>); without squeue on this
    machine, the state file is trusted."""
    if not shutil.which("squeue"):
        return True
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True)
    return out.returncode == 0 and bool(out.stdout.strip())


def run_state(folder: Path, steps: int) -> tuple[str, str]:
    """(state, note) of one run folder; note says the step reached, or why it failed."""
    if is_done(folder, steps):
        return "done", f"{steps}/{steps}"
    if not folder.exists():
        return "pending", ""
    progress = f"{last_step(folder)}/{steps}"
    try:
        launch = json.loads((folder / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        launch = {}
    state = launch.get("state")
    if state == "running" and launch.get("launcher") == "local":
        if launch.get("host") != socket.gethostname() or _alive(int(launch.get("pid", -1))):
            return "running", progress
    elif state in ("queued", "running", "requeued") and _slurm_alive(launch.get("job", "")):
        return ("running" if state == "running" else "queued"), progress
    if state == "failed":
        return "failed", f"{progress}, exit code {launch.get('rc')}"
    return "stopped", progress


# ----------------------------------------------------------------------------- the plan file
def write_plan(root: Path, sweep_file: Path, base: Path, runs, compare=None) -> None:
    """sweep.json in the sweep folder: what `status` and `report` read (folders relative to it),
    and the sweep's `compare` pairs for `report`.

    Runs of the previous plan that this one leaves out are kept when their folder exists and
    their variant and grid point are still planned to train the same: seeds run earlier (`run
    --seeds 4,5,6` after seeds 1-3) stay in the report. "The same" is the run's saved
    config.yaml against the config planned now, less seed, folder and name (an override that
    restates a default changes nothing; a changed default that changes what the variant trains
    drops the run); a run not started yet compares its overrides and steps. A run whose variant
    was changed or removed is dropped, as its results describe another setting."""
    root.mkdir(parents=True, exist_ok=True)
    entries = [
        {"key": r.key, "label": r.label, "variant": r.variant, "point": [list(p) for p in r.point],
         "seed": r.seed, "folder": str(r.folder.relative_to(root)), "steps": r.cfg.steps,
         "overrides": list(r.overrides)} for r in runs]
    setting = {e["label"]: _setting(e, root) for e in entries}
    resolved = {r.label: _resolved(r.cfg.to_dict(), root) for r in runs}
    planned = {e["key"] for e in entries}
    path = root / PLAN_FILE
    if path.is_file():
        try:
            earlier = json.loads(path.read_text()).get("runs", [])
        except (OSError, ValueError, AttributeError):
            earlier = []  # an unreadable plan is rewritten from this sweep alone
        kept = [e for e in earlier if isinstance(e, dict) and e.get("key") not in planned
                and e.get("label") in setting and (root / str(e.get("folder", ""))).is_dir()
                and _trains_the_same(e, root, setting[e["label"]], resolved[e["label"]])]
        if kept:  # seeds are the outer loop, as `plan` orders them
            rank = {label: i for i, label in enumerate(setting)}
            entries = sorted(entries + kept, key=lambda e: (e["seed"], rank[e["label"]]))
    plan = {"sweep_file": str(sweep_file.resolve()), "base": str(base),
            "compare": {k: list(v) for k, v in (compare or {}).items()}, "runs": entries}
    path.write_text(json.dumps(plan, indent=1) + "\n")


def _per_seed_source(path: object, seed: object, root: Path) -> bool:
    """Whether `path` is a run of this sweep with the given seed: the checkpoint an "@SOURCE"
    variant starts from (<root>/<source label>/seed<S>), which differs by seed only."""
    if not isinstance(path, str) or seed is None:
        return False
    p = Path(path.strip("'\""))
    return p.name == f"seed{seed}" and p.parent.parent == Path(root)


def _resolved(config: dict, root: Path) -> dict:
    """A run's whole config, less what differs by seed (its seed, folder and name, and the
    same seed's source checkpoint of an "@SOURCE" variant)."""
    out = {k: v for k, v in config.items() if k not in ("seed", "dir", "name")}
    ckpt = out.get("checkpoint")
    if isinstance(ckpt, dict) and _per_seed_source(ckpt.get("init_from"), config.get("seed"), root):
        out["checkpoint"] = {**ckpt, "init_from": "@source"}
    return out


def _trains_the_same(entry: dict, root: Path, setting: tuple, resolved: dict) -> bool:
    """Whether an earlier plan's run trains what its label is planned to train now: by the
    config.yaml it saved when it started (read as it trained), else by overrides and steps."""
    from megatron_nullmoe.run.config import ConfigError, load_run_config

    saved = root / str(entry.get("folder", "")) / "config.yaml"
    if not saved.is_file():
        return _setting(entry, root) == setting
    try:
        return _resolved(load_run_config(saved).to_dict(), root) == resolved
    except ConfigError:  # written by a version whose keys this one does not know
        return False


def _setting(entry: dict, root: Path) -> tuple:
    """What a planned run trains, less what differs by seed (its seed, folder and name, and
    the same seed's source checkpoint of an "@SOURCE" variant)."""
    prefix = "checkpoint.init_from="
    overrides = [o for o in entry.get("overrides", [])
                 if not str(o).startswith(("seed=", "dir=", "name="))
                 and not (str(o).startswith(prefix) and _per_seed_source(
                     str(o)[len(prefix):], entry.get("seed"), root))]
    return overrides, entry.get("steps")


def read_plan(root: Path) -> list[dict]:
    path = Path(root) / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {PLAN_FILE}: give the sweep's folder <dir>/<name> "
                                "(`run` writes the plan there)")
    return json.loads(path.read_text())["runs"]


def read_compare(root: Path) -> dict[str, tuple[str, str]]:
    """The `compare` pairs sweep.json holds ({} without a plan or pairs)."""
    path = Path(root) / PLAN_FILE
    if not path.is_file():
        return {}
    return {k: tuple(v) for k, v in json.loads(path.read_text()).get("compare", {}).items()}


def status_table(root: Path, plan: list[dict]) -> str:
    rows = [(r["key"], *run_state(Path(root) / r["folder"], r["steps"])) for r in plan]
    counts = Counter(state for _, state, _ in rows)
    width = max(len(key) for key, _, _ in rows)
    lines = [f"{root}: {len(rows)} runs | " + " | ".join(f"{counts[s]} {s}" for s in STATES),
             f"{'run':<{width}}  {'state':<8} steps"]
    lines += [f"{key:<{width}}  {state:<8} {note}" for key, state, note in rows]
    return "\n".join(lines)
