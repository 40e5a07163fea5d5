"""The offline bundle for the one-call GPU check: what the GPU machine lacks, fetched here.

    python launch/gpu_check/bundle.py download [--dir gpu_bundle]   # here, with PyPI (make gpu-wheels)
    python launch/gpu_check/bundle.py install  [--dir gpu_bundle]   # there, offline (make gpu-check)
    python launch/gpu_check/bundle.py verify   [--dir gpu_bundle]   # sizes and hashes against the manifest

The GPU machine (DESIGN.md section 3): one H200, Python 3.12, torch 2.11 + CUDA 13, transformers
5.x and sentencepiece preinstalled; no megatron-core, no Transformer Engine, no network, and at
most 64 MiB carried with the checkout. So: cp312 manylinux wheels, one `pip download --no-deps`
per package from the explicit list below (no resolver surprises), plus the Megatron-LM release
archive of the same tag as megatron-core, written with a manifest (name, bytes, sha256). torch,
CUDA and what torch or transformers already bring are never bundled.

Install goes into a venv with --system-site-packages (the machine's torch is used), by package
name with --no-index --find-links --no-deps: a package the machine already has is left alone (its
numpy or pillow is not replaced), one it lacks comes from the bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "gpu_bundle"
LIMIT = 64 * 2**20  # what may travel with the checkout, all of it
MEGATRON_CORE = "0.16.1"
ARCHIVE = f"megatron-lm-core_v{MEGATRON_CORE}.tar.gz"  # Megatron-LM's training code, same tag
ARCHIVES = ROOT.parent / "shared" / "megatron-lm"
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_28_x86_64")

# What the GPU machine lacks, with why. Pinned: must be this version. Unpinned: any version the
# machine already has is kept. Import closure measured with these names blocked one at a time.
PACKAGES = {
    f"megatron-core=={MEGATRON_CORE}": "the host framework (cp312 wheel with its compiled dataset helper)",
    "megatron-energon==7.4.1": "VLM recipe data (energon)",
    "einops": "megatron-core", "pybind11": "Megatron-LM's dataset helper build",
    "pydantic": "Megatron-LM config", "pydantic-core": "pydantic", "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "pillow": "demo images, energon", "webdataset": "energon", "braceexpand": "energon",
    "click": "energon", "filetype": "energon", "mfusepy": "energon", "rapidyaml": "energon",
    "multi-storage-client": "energon (imported at start)", "jsonschema": "multi-storage-client",
    "attrs": "jsonschema", "jsonschema-specifications": "jsonschema", "referencing": "jsonschema",
    "rpds-py": "jsonschema", "lark": "multi-storage-client", "opentelemetry-api": "multi-storage-client",
    "psutil": "multi-storage-client", "wcmatch": "multi-storage-client", "bracex": "wcmatch",
    "xattr": "multi-storage-client", "cffi": "xattr", "pycparser": "cffi",
    "python-dateutil": "multi-storage-client, matplotlib", "six": "python-dateutil",
    "deprecation": "energon",
    "matplotlib": "the trainer's end-of-run plot", "contourpy": "matplotlib", "cycler": "matplotlib",
    "fonttools": "matplotlib", "kiwisolver": "matplotlib", "pyparsing": "matplotlib",
}
# Assumed on the GPU machine (torch 2.11, transformers 5.x, sentencepiece); `install` checks them.
PRESENT = ("torch", "triton", "numpy", "packaging", "yaml", "regex", "tqdm", "sentencepiece",
           "typing_extensions", "setuptools")


def carried_bytes(bundle: Path = BUNDLE) -> dict[str, int]:
    """Bytes that travel: the checkout's tracked and untracked-not-ignored files, and the bundle."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    checkout = sum((ROOT / p).stat().st_size for p in listed if p and (ROOT / p).is_file())
    files = [p for p in bundle.rglob("*") if p.is_file()] if bundle.is_dir() else []
    return {"checkout": checkout, "bundle": sum(p.stat().st_size for p in files)}


def check_size(sizes: dict[str, int], limit: int = LIMIT) -> None:
    total = sum(sizes.values())
    if total > limit:
        parts = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
        raise SystemExit(f"carried set is {total / 2**20:.1f} MiB ({parts}), over the "
                         f"{limit / 2**20:.0f} MiB limit: drop packages from PACKAGES in "
                         f"{Path(__file__).relative_to(ROOT)} or trim the checkout")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(bundle: Path) -> dict:
    files = sorted(p for p in bundle.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {
        "python": PYTHON_VERSION, "platforms": list(PLATFORMS), "megatron_core": MEGATRON_CORE,
        "requirements": list(PACKAGES), "assumed_present": list(PRESENT),
        "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in files],
    }
    manifest["bytes"] = sum(f["bytes"] for f in manifest["files"])
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def download_command(requirement: str, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + [requirement]


def download(bundle: Path) -> dict:
    bundle.mkdir(exist_ok=True)
    for requirement in PACKAGES:
        subprocess.run(download_command(requirement, bundle), check=True)
    shutil.copy2(ARCHIVES / ARCHIVE, bundle / ARCHIVE)
    manifest = write_manifest(bundle)
    sizes = carried_bytes(bundle)
    print(f"{len(manifest['files'])} files, bundle {sizes['bundle'] / 2**20:.1f} MiB, checkout "
          f"{sizes['checkout'] / 2**20:.1f} MiB, carried {sum(sizes.values()) / 2**20:.1f} of "
          f"{LIMIT / 2**20:.0f} MiB; manifest in {bundle / 'manifest.json'}")
    check_size(sizes)
    return manifest


def verify(bundle: Path) -> list[str]:
    """Problems with the bundle (missing or changed files, a package without a file); [] if none."""
    path = bundle / "manifest.json"
    if not path.is_file():
        return [f"no {path}: run `make gpu-wheels` on a machine with PyPI access"]
    manifest = json.loads(path.read_text())
    problems = []
    for f in manifest["files"]:
        p = bundle / f["name"]
        if not p.is_file():
            problems.append(f"{f['name']} is missing")
        elif p.stat().st_size != f["bytes"] or sha256(p) != f["sha256"]:
            problems.append(f"{f['name']} differs from the manifest")
    names = {_dist(f["name"]) for f in manifest["files"]}
    problems += [f"no file for {r}" for r in manifest["requirements"] if _dist(r) not in names]
    return problems


def _dist(name: str) -> str:
    """Normalised distribution name of a wheel file or requirement."""
    for sep in ("==", ".tar.gz"):
        name = name.split(sep)[0]
    return name.split("-")[0].lower().replace("_", "-") if name.endswith(".whl") else \
        name.lower().replace("_", "-")


def install_commands(bundle: Path, venv: Path, python: str = "python3") -> list[list[str]]:
    """The offline install: a venv over the machine's packages, then the bundle by name."""
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--find-links",
           str(bundle), "--no-deps", "--disable-pip-version-check", "-q"]
    return [[python, "-m", "venv", "--system-site-packages", str(venv)], pip + list(PACKAGES)]


PYTHON3_CONFIG = """#!{python}
# python3-config for this venv: Megatron-LM's dataset-helper Makefile asks it for the module suffix.
import sys, sysconfig
if "--extension-suffix" in sys.argv: print(sysconfig.get_config_var("EXT_SUFFIX"))
if "--includes" in sys.argv: print("-I" + sysconfig.get_paths()["include"])
"""


def install(bundle: Path, venv: Path) -> None:
    problems = verify(bundle)
    if problems:
        raise SystemExit("gpu bundle is not usable:\n  " + "\n  ".join(problems))
    if not (venv / "bin" / "python").exists():
        for cmd in install_commands(bundle, venv, sys.executable):
            subprocess.run(cmd, check=True)
    config = venv / "bin" / "python3-config"
    config.write_text(PYTHON3_CONFIG.format(python=venv / "bin" / "python"))
    config.chmod(0o755)
    probe = ("import importlib.util as u, sys; missing = [m for m in sys.argv[1:] if u.find_spec(m)"
             " is None]; print('missing on this machine: ' + ', '.join(missing) if missing else 'ok')")
    subprocess.run([str(venv / "bin" / "python"), "-c", probe, *PRESENT, "megatron.core",
                    "megatron.energon"], check=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("download", "install", "verify"))
    p.add_argument("--dir", type=Path, default=BUNDLE)
    p.add_argument("--venv", type=Path, default=ROOT / ".venv-gpu")
    a = p.parse_args(argv)
    if a.action == "download":
        download(a.dir)
    elif a.action == "install":
        install(a.dir, a.venv)
    else:
        problems = verify(a.dir)
        check_size(carried_bytes(a.dir))
        print("\n".join(problems) or "bundle matches its manifest")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
