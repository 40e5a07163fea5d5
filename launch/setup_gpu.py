"""Transformer Engine for this environment's torch (`make setup-gpu`): the requirement in
requirements-gpu.txt with the TE core built for torch's CUDA major.

    python launch/setup_gpu.py [--dry-run]

Transformer Engine ships its compiled core per CUDA major (`transformer_engine_cu12` /
`_cu13`, chosen by the extra `core_cu12` / `core_cu13`; the bare `core` extra means cu12). A core
for another CUDA major than torch's fails at import, so the extra is read from
`torch.version.cuda`, never assumed; a CPU torch (no CUDA) is refused.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-gpu.txt"
PLACEHOLDER = "${TE_CUDA_EXTRA}"  # pip's own ${VAR} syntax, so the file also works by hand
EXTRAS = {"12": "core_cu12", "13": "core_cu13"}  # CUDA major -> Transformer Engine core extra


def te_extra(cuda: str | None, torch_version: str = "?") -> str:
    """The Transformer Engine core extra for torch's `torch.version.cuda`; SystemExit naming
    what is wrong and what would be valid otherwise."""
    if cuda is None:
        raise SystemExit(f"torch {torch_version} is a CPU build (torch.version.cuda is None): "
                         "Transformer Engine needs a CUDA build of torch (CUDA "
                         f"{' or '.join(EXTRAS)}); the GPU extras are optional, the CPU path needs none")
    major = cuda.split(".")[0]
    if major not in EXTRAS:
        raise SystemExit(f"torch {torch_version} is built for CUDA {cuda}: Transformer Engine "
                         f"ships a core for CUDA {' and '.join(EXTRAS)} only "
                         f"({', '.join(EXTRAS.values())})")
    return EXTRAS[major]


def requirement(extra: str, path: Path = REQUIREMENTS) -> str:
    """The one requirement line of requirements-gpu.txt with the extra filled in."""
    lines = [ln.strip() for ln in path.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1 or PLACEHOLDER not in lines[0]:
        raise SystemExit(f"{path} should hold one requirement with {PLACEHOLDER}; found {lines}")
    return lines[0].replace(PLACEHOLDER, extra)


def pip_command(req: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-build-isolation", req]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the pip command, install nothing")
    a = p.parse_args(argv)
    import torch

    cmd = pip_command(requirement(te_extra(torch.version.cuda, torch.__version__)))
    print(" ".join(cmd) if a.dry_run else f"torch {torch.__version__} (CUDA "
          f"{torch.version.cuda}): {' '.join(cmd)}", flush=True)
    if not a.dry_run:
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
