"""Slurm launcher: one sbatch job array, one task per unfinished run.

The script is written to <dir>/<name>/sweep.sbatch and submitted with `sbatch`. Each task maps
SLURM_ARRAY_TASK_ID to its run (folder and trainer overrides, written into the script), starts
one torchrun agent per node through srun and launch/torchrun.sh (rendezvous on the task's first
node, as launch/slurm.sbatch does), and records its state in the run folder. Pre-emption:
`--signal=B:USR1@120` reaches the batch shell, whose trap requeues this task
(`scontrol requeue <array job>_<task>`); the requeued task resumes from the run's checkpoint,
because the trainer resumes any run folder that holds one.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from megatron_nullmoe.sweep.spec import Launch, Run

ROOT = Path(__file__).resolve().parents[2]

_TASK = """\
set -euo pipefail
cd {workdir}
TASK="${{SLURM_ARRAY_TASK_ID:?run this script with sbatch (a job array task)}}"
case "$TASK" in
{cases}
  *) echo "sweep.sbatch: no run for array task $TASK" >&2; exit 2 ;;
esac
mapfile -t NODES < <(scontrol show hostnames "${{SLURM_JOB_NODELIST:?}}")
export NNODES="${{#NODES[@]}}"
export NPROC_PER_NODE="${{GPUS_PER_NODE:-{gpus}}}"
export RDZV_ENDPOINT="${{NODES[0]}}:${{RDZV_PORT:-29400}}"
export RDZV_ID="nullmoe-${{SLURM_ARRAY_JOB_ID}}-$TASK"
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG="${{NCCL_DEBUG:-WARN}}" OMP_NUM_THREADS="${{OMP_NUM_THREADS:-8}}"
export PYTHON="${{PYTHON:-{python}}}"  # torchrun.sh's interpreter: the one that planned the sweep
mkdir -p "$RUN_DIR"
state() {{
  printf '{{"state": "%s", "rc": %s, "launcher": "slurm", "job": "%s_%s", "host": "%s"}}\\n' \\
    "$1" "$2" "$SLURM_ARRAY_JOB_ID" "$TASK" "$(hostname)" > "$RUN_DIR/sweep_state.json"
}}
REQUEUED=0
# USR1: time limit near (--signal) or the site's pre-emption notice. Requeue this task only.
requeue() {{
  echo "sweep.sbatch: pre-emption signal; requeueing ${{SLURM_ARRAY_JOB_ID}}_$TASK ($RUN_DIR resumes from its checkpoint)"
  REQUEUED=1
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_$TASK"
  kill -TERM "$SRUN_PID" 2>/dev/null || true
}}
trap requeue USR1
trap 'kill -TERM "$SRUN_PID" 2>/dev/null || true' TERM
state running null
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  --output="$RUN_DIR/slurm-%j-%N.log" bash {torchrun} {base} "${{ARGS[@]}}" &
SRUN_PID=$!
set +e
wait "$SRUN_PID"; RC=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; RC=$?; done  # after a trap
set -e
if [[ $REQUEUED == 1 ]]; then state requeued "$RC"
elif [[ $RC == 0 || $RC == 75 ]]; then state exited "$RC"  # 75: stopped with a checkpoint
else state failed "$RC"; fi
exit "$RC"
"""


def array_script(runs: list[Run], base: Path, root: Path, name: str, launch: Launch,
                 workdir: Path) -> str:
    """The sbatch script for `runs` (task i runs runs[i])."""
    q = shlex.quote
    head = ["#!/usr/bin/env bash",
            f"# Sweep {name}: {len(runs)} runs, one array task each (python -m megatron_nullmoe.sweep).",
            f"#SBATCH --job-name={name}", f"#SBATCH --array=0-{len(runs) - 1}",
            f"#SBATCH --nodes={launch.nodes}", "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={launch.gpus_per_node}", "#SBATCH --exclusive",
            "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120",
            f"#SBATCH --output={root.resolve()}/slurm/%A_%a.out"]
    head += [f"#SBATCH --{key}={value}" for key, value in (
        ("time", launch.time), ("partition", launch.partition), ("account", launch.account)) if value]
    head += [f"#SBATCH {line}" for line in launch.sbatch]
    cases = "\n".join(
        f"  {i}) RUN_DIR={q(str(r.folder))}\n     ARGS=({' '.join(q(a) for a in r.overrides)}) ;;"
        for i, r in enumerate(runs))
    body = _TASK.format(workdir=q(str(workdir)), cases=cases, gpus=launch.gpus_per_node,
                        torchrun=q(str(ROOT / "launch" / "torchrun.sh")), base=q(str(base)),
                        python=q(sys.executable))
    return "\n".join(head) + "\n" + body


def submit(script: str, root: Path) -> str:
    """Writes <root>/sweep.sbatch and submits it; returns the array's job id."""
    path = root / "sweep.sbatch"
    (root / "slurm").mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    try:
        out = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=True,
                             env=os.environ)
    except FileNotFoundError:
        raise SystemExit(f"sbatch not found: run this on a Slurm login node (the script is {path})")
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"sbatch refused {path}: {err.stderr.strip()}") from None
    match = re.search(r"(\d+)", out.stdout)
    return match.group(1) if match else out.stdout.strip()
