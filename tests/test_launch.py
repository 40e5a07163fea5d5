"""Launch scripts, tested without a cluster.

- launch/torchrun.sh: its dry run prints exactly the torchrun command for the env knobs given.
- Two torchrun agents on this machine act as two nodes (c10d rendezvous on localhost) and train
  with expert parallelism spanning both: the losses equal a one-node run's.
- launch/slurm.sbatch runs against stand-in `srun` and `scontrol` that record what they are asked:
  node-list expansion, head node, rendezvous, per-node logs, environment, and requeue on USR1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._train import losses, run, tiny_demo, vlm_args

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
SBATCH = ROOT / "launch" / "slurm.sbatch"
RECIPE = "examples/demo_vlm.yaml"


def sh(script: Path, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "RDZV_", "NNODES", "NPROC_PER_NODE", "NODE_RANK",
                                     "MASTER_ADDR", "MASTER_PORT"))}  # in-process tests set these
    full_env.update(env or {})
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, **kw)


def test_torchrun_dry_run_prints_the_command_for_the_knobs():
    out = sh(TORCHRUN_SH, RECIPE, "steps=5", "name=a b", env={"DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes=1"]
    assert "--nproc-per-node=1" in cmd  # no GPUs here
    assert "--master-addr=127.0.0.1" in cmd and "--master-port=29500" in cmd
    assert cmd[-5:] == ["--config", RECIPE, "steps=5", "name=a\\", "b"]  # quoted for the shell
    out = sh(TORCHRUN_SH, RECIPE, env={
        "DRY_RUN": "1", "NNODES": "4", "NPROC_PER_NODE": "8", "RDZV_ENDPOINT": "head:29400",
        "RDZV_ID": "job7", "PYTHON": "/opt/py"})
    cmd = out.stdout.split()
    assert cmd[0] == "/opt/py"
    assert {"--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
            "--rdzv-endpoint=head:29400", "--rdzv-id=job7"} <= set(cmd)
    assert not any(c.startswith("--master-addr") for c in cmd)


def test_torchrun_refuses_a_missing_recipe():
    out = sh(TORCHRUN_SH, "examples/nope.yaml")
    assert out.returncode == 2 and "recipe 'examples/nope.yaml' not found" in out.stderr
    out = sh(TORCHRUN_SH)
    assert out.returncode == 2 and "usage" in out.stderr


@pytest.mark.slow
def test_two_agents_as_two_nodes_equal_one_node(tmp_path):
    """EP=2 spans the two "nodes"; every logged loss equals the 2-process one-node run's."""
    from megatron_nullmoe.parallel import free_port

    data = tiny_demo(tmp_path / "demo", train_samples=256)
    args = vlm_args(data, tmp_path / "one", "steps=4", "parallel.expert=2")
    run(args, ranks=2)
    two = tmp_path / "two"
    port = free_port()
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"127.0.0.1:{port}",
           "RDZV_ID": "two-nodes", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    node_args = [a if not a.startswith("dir=") else f"dir={two}" for a in args[2:]]
    agents = [subprocess.Popen(["bash", str(TORCHRUN_SH), args[1], *node_args], cwd=ROOT,
                               env={**os.environ, **env}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][-3000:] + outputs[1][-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert losses(two) == losses(tmp_path / "one")


# ------------------------------------------------------------------------------ Slurm
FAKE_SCONTROL = r'''#!/usr/bin/env python3
"""Stand-in scontrol: records its arguments; expands node lists like `node[01-03],gpu7`."""
import os, re, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("scontrol " + " ".join(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
        m = re.fullmatch(r"(.*)\[(.*)\]", part)
        if not m:
            print(part)
            continue
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                print(f"{m.group(1)}{i:0{len(lo)}d}")
'''

FAKE_SRUN = r'''#!/usr/bin/env python3
"""Stand-in srun: records arguments and environment, then runs the command once per node (as a
dry run) writing each node's output where --output points, with %N as the node name."""
import json, os, signal, subprocess, sys, time
def _term(*_):  # what the trainer does on TERM: save a checkpoint, then exit
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write("srun got SIGTERM\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, _term)
args = sys.argv[1:]
opts = [a for a in args[: args.index("bash")]]
cmd = args[args.index("bash"):]
keys = ["NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "CUDA_DEVICE_MAX_CONNECTIONS",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING"]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write("srun " + json.dumps({"opts": opts, "cmd": cmd,
                                  "env": {k: os.environ.get(k) for k in keys}}) + "\n")
if os.environ.get("FAKE_SRUN_SLEEP"):
    open(os.environ["FAKE_SRUN_SLEEP"], "w").close()
    time.sleep(60)
out = next(o.split("=", 1)[1] for o in opts if o.startswith("--output="))
nodes = os.environ["FAKE_NODES"].split()
for node in nodes:
    path = out.replace("%N", node)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        subprocess.run(cmd, env={**os.environ, "DRY_RUN": "1", "SLURMD_NODENAME": node},
                       stdout=f, stderr=subprocess.STDOUT, check=True)
'''


@pytest.fixture
def fake_slurm(tmp_path) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text.replace("#!/usr/bin/env python3", f"#!{sys.executable}"))
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "calls.log"),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[01-03]",
            "FAKE_NODES": "node01 node02 node03", "LOG_DIR": str(tmp_path / "logs"),
            "PYTHON": "/venv/bin/python"}


def _calls(env: dict) -> list[str]:
    return Path(env["FAKE_LOG"]).read_text().splitlines()


def test_slurm_script_starts_one_agent_per_node_with_rendezvous_on_the_head(fake_slurm, tmp_path):
    out = sh(SBATCH, RECIPE, "steps=7", env=fake_slurm)
    assert out.returncode == 0, out.stderr
    calls = _calls(fake_slurm)
    assert calls[0] == "scontrol show hostnames node[01-03]"
    srun = json.loads(calls[1].removeprefix("srun "))
    assert {"--nodes=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            f"--output={tmp_path}/logs/%N.log"} <= set(srun["opts"])
    assert srun["cmd"] == ["bash", str(TORCHRUN_SH), RECIPE, "steps=7"]
    assert srun["env"] == {"NNODES": "3", "NPROC_PER_NODE": "8", "RDZV_ENDPOINT": "node01:29400",
                           "RDZV_ID": "nullmoe-4242", "CUDA_DEVICE_MAX_CONNECTIONS": "1",
                           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    for node in ("node01", "node02", "node03"):  # per-node logs, each with its torchrun command
        cmd = (tmp_path / "logs" / f"{node}.log").read_text().split()
        assert cmd[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
        assert {"--nnodes=3", "--nproc-per-node=8", "--rdzv-endpoint=node01:29400",
                "--rdzv-id=nullmoe-4242"} <= set(cmd)
        assert cmd[-4:] == ["megatron_nullmoe.train", "--config", RECIPE, "steps=7"]


def test_slurm_node_list_parsing_and_gpus_knob(fake_slurm):
    env = {**fake_slurm, "SLURM_JOB_NODELIST": "gpu[7-8],login3", "GPUS_PER_NODE": "4",
           "FAKE_NODES": "gpu7 gpu8 login3", "RDZV_PORT": "3000", "DRY_RUN": "1"}
    out = sh(SBATCH, RECIPE, env=env)
    assert out.returncode == 0, out.stderr
    assert "# head node gpu7, 3 nodes x 4 processes" in out.stdout
    assert "--rdzv-endpoint=gpu7:3000" in out.stdout and "--nproc-per-node=4" in out.stdout
    assert not any(c.startswith("srun") for c in _calls(env))  # a dry run starts nothing


def test_slurm_requeues_on_preemption_signal(fake_slurm, tmp_path):
    started = tmp_path / "srun.started"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(fake_slurm, FAKE_SRUN_SLEEP=str(started))
    proc = subprocess.Popen(["bash", str(SBATCH), RECIPE], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not started.exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    stdout, _ = proc.communicate(timeout=30)
    assert "requeueing job 4242" in stdout
    calls = _calls(fake_slurm)
    # the training step is stopped (it saves) and has exited before the job is requeued
    assert calls.index("srun got SIGTERM") < calls.index("scontrol requeue 4242")


def test_slurm_script_needs_a_recipe(fake_slurm):
    out = sh(SBATCH, env=fake_slurm)
    assert out.returncode == 2 and "usage" in out.stderr
