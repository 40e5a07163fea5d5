"""The offline bundle for the one-call GPU check: what the GPU machine lacks, fetched here.

    python launch/gpu_check/bundle.py download [--dir D] [--python-version 3.12]  # here, with PyPI
    python launch/gpu_check/bundle.py install  [--dir D] [--venv V]   # there, offline, over this python
    python launch/gpu_check/bundle.py verify   [--dir D]              # sizes and hashes vs the manifest
    python launch/gpu_check/bundle.py standin  --venv V               # here: a stand-in of the GPU venv

The GPU machine: one H200 or H100, `python3` a venv's
Python 3.12 holding torch 2.11 + CUDA 13, transformers 5.x, sentencepiece, pytest and numpy; no
megatron-core, no Transformer Engine, no network, and at most 64 MiB carried with the checkout.
So: manylinux wheels for that Python, one `pip download --no-deps` per package from the explicit
list below (no resolver surprises), plus the Megatron-LM release archive of the same tag as
megatron-core, written with a manifest (name, bytes, sha256, Python). torch, CUDA and what torch
or transformers already bring are never bundled. `--python-version` builds the same bundle for
another Python, so that the install can be tested here against a stand-in (`standin`).

Install makes a venv that sees the installing interpreter's own packages, then installs the
bundle into it by name with --no-index --find-links --no-deps: a package the machine already has
is left alone (its numpy or pillow is not replaced), one it lacks comes from the bundle. The
installing interpreter may itself be a venv's: `python -m venv --system-site-packages` would then
see the *base* interpreter's packages, not that venv's (torch would be invisible), so the new venv
instead gets a .pth file that adds the installing interpreter's `site.getsitepackages()` (after
its own site-packages, so the bundle's pinned versions win). A module missing afterwards fails it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = Path(os.environ.get("GPU_BUNDLE") or ROOT / "gpu_bundle").resolve()
VENV = Path(os.environ.get("GPU_CHECK_VENV") or ROOT / ".venv-gpu").resolve()
LIMIT = 64 * 2**20  # what may travel with the checkout, all of it
MEGATRON_CORE = "0.16.1"
ARCHIVE = f"megatron-lm-core_v{MEGATRON_CORE}.tar.gz"  # Megatron-LM's training code, same tag
ARCHIVES = ROOT.parent / "shared" / "megatron-lm"
PYTHON_VERSION = "3.12"  # the GPU machine's
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_28_x86_64")

# What the GPU machine lacks, with why. Pinned: must be this version. Unpinned: any version the
# machine already has is kept. Import closure measured with these names blocked one at a time.
PACKAGES = {
    f"megatron-core=={MEGATRON_CORE}": "the host framework (wheel with its compiled dataset helper)",
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
    "pip": "the check's venv, where the machine's venv has none (uv makes venvs without pip)",
}
# Assumed on the GPU machine (torch 2.11 with its triton, transformers 5.x, sentencepiece,
# pytest); `install` checks them by name. Megatron-LM's initialize.py imports triton, on CPU too.
PRESENT = ("torch", "triton", "numpy", "packaging", "yaml", "regex", "tqdm", "sentencepiece",
           "typing_extensions", "setuptools", "pytest")
# Imported after install: what the steps import, so that a module the bundle lacks (a dependency
# of a dependency) fails the install, not a step. Run from ROOT, so the project itself is found.
IMPORTS = ("megatron.core", "megatron.energon", "matplotlib", "pydantic", "megatron_nullmoe.train")

# The stand-in for the GPU machine's venv, for testing the install here (`standin`): a venv, not
# the base interpreter, with what the GPU machine's venv holds (triton: a CUDA torch brings it, a
# CPU one does not). torch is pinned to the CPU wheel this machine carries and installed first
# and alone, so no later package can pull a CUDA build.
STANDIN_TORCH = "torch==2.13.0"
STANDIN = ("transformers", "sentencepiece", "pytest", "numpy", "triton")


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
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(bundle: Path, python_version: str = PYTHON_VERSION) -> dict:
    files = sorted(p for p in bundle.iterdir() if p.is_file() and p.name != "manifest.json")
    manifest = {
        "python": python_version, "platforms": list(PLATFORMS), "megatron_core": MEGATRON_CORE,
        "requirements": list(PACKAGES), "assumed_present": list(PRESENT),
        "files": [{"name": p.name, "bytes": p.stat().st_size, "sha256": sha256(p)} for p in files],
    }
    manifest["bytes"] = sum(f["bytes"] for f in manifest["files"])
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def download_command(requirement: str, dest: Path,
                     python_version: str = PYTHON_VERSION) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + [requirement]


def download(bundle: Path, python_version: str = PYTHON_VERSION) -> dict:
    """Fills `bundle` for `python_version`; a bundle that already matches its manifest, this
    Python and this package list is kept as it is (`rm -r` it to fetch again)."""
    path = bundle / "manifest.json"
    if path.is_file() and not verify(bundle):
        manifest = json.loads(path.read_text())
        if manifest.get("python") == python_version and manifest["requirements"] == list(PACKAGES):
            print(f"{bundle} is up to date for Python {python_version} (rm -r it to fetch again)")
            check_size(carried_bytes(bundle))
            return manifest
    bundle.mkdir(parents=True, exist_ok=True)
    for old in (*bundle.glob("*.whl"), *bundle.glob("*.tar.gz"), path):
        old.unlink(missing_ok=True)  # another Python's or an older list's files must not stay
    for requirement in PACKAGES:
        subprocess.run(download_command(requirement, bundle, python_version), check=True)
    shutil.copy2(ARCHIVES / ARCHIVE, bundle / ARCHIVE)
    manifest = write_manifest(bundle, python_version)
    sizes = carried_bytes(bundle)
    print(f"{len(manifest['files'])} files for Python {python_version}, bundle "
          f"{sizes['bundle'] / 2**20:.1f} MiB, checkout {sizes['checkout'] / 2**20:.1f} MiB, carried "
          f"{sum(sizes.values()) / 2**20:.1f} of {LIMIT / 2**20:.0f} MiB; manifest in {path}")
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


def python_problem(manifest: dict, version: str) -> str | None:
    """Why a bundle built for one Python cannot be installed over another (None: it can)."""
    built = manifest.get("python", PYTHON_VERSION)
    if built == version:
        return None
    return (f"the bundle holds wheels for Python {built}, but {sys.executable} is Python "
            f"{version}: build one for it with `make gpu-wheels GPU_PYTHON_VERSION={version}` "
            f"(and GPU_BUNDLE=<another folder> to keep the {built} one)")


def _dist(name: str) -> str:
    """Normalised distribution name of a wheel file or requirement."""
    for sep in ("==", ".tar.gz"):
        name = name.split(sep)[0]
    return name.split("-")[0].lower().replace("_", "-") if name.endswith(".whl") else \
        name.lower().replace("_", "-")


# ----------------------------------------------------------------------------- install
def venv_command(venv: Path, python: str) -> list[str]:
    """A bare venv: neither --system-site-packages (that would see the base interpreter's
    packages, not a venv's) nor pip (the machine's own is used through the .pth, or ensurepip)."""
    return [python, "-m", "venv", "--clear", "--without-pip", str(venv)]


def pip_command(bundle: Path, venv: Path) -> list[str]:
    """The bundle by name, from the bundle only: no index, no dependencies, no builds."""
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index", "--find-links",
            str(bundle), "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-q",
            *PACKAGES]


def offline_env() -> dict:
    """The environment for the offline pip: no pip configuration file or PIP_* setting (a
    find-links or index there would add sources besides the bundle)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"}


def parent_pth(site_dirs: list[str]) -> str:
    """The .pth that makes a venv see another interpreter's packages: `site.addsitedir` for each
    of its site-packages, so the .pth files there (editable installs, namespace hooks) apply too,
    as they do for that interpreter."""
    return "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs)


def make_venv(venv: Path, python: str = sys.executable,
              site_dirs: list[str] | None = None) -> dict:
    """A venv at `venv` that sees `python`'s own packages (`site_dirs`, default this interpreter's
    `site.getsitepackages()`): made once per parent, remade when the parent changes."""
    site_dirs = list(site.getsitepackages() if site_dirs is None else site_dirs)
    marker = venv / "gpu-check-parent.json"
    want = {"python": str(python), "version": sys.version.split()[0], "site": site_dirs}
    if not (marker.is_file() and json.loads(marker.read_text()) == want
            and (venv / "bin" / "python").exists()):
        subprocess.run(venv_command(venv, python), check=True)
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        purelib = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True,
                                 text=True, check=True).stdout.strip()
        Path(purelib, "_gpu_check_parent.pth").write_text(parent_pth(site_dirs))
        marker.write_text(json.dumps(want, indent=1) + "\n")
    return want


def ensure_pip(venv: Path, bundle: Path) -> str:
    """pip for the venv: the parent's, seen through the .pth; else the bundle's pip wheel, run
    from the wheel itself; else the interpreter's ensurepip (absent from some distributions)."""
    py = str(venv / "bin" / "python")
    if subprocess.run([py, "-c", "import pip"], capture_output=True).returncode == 0:
        return "the parent interpreter's pip"
    tried = []
    for wheel in sorted(bundle.glob("pip-*.whl")):
        done = subprocess.run([py, str(wheel / "pip"), "install", "--no-index", "--no-deps", "-q",
                               str(wheel)], env=offline_env(), capture_output=True, text=True)
        if done.returncode == 0:
            return f"{wheel.name} from the bundle"
        tried.append(f"{wheel.name}: {done.stdout}{done.stderr}")
    done = subprocess.run([py, "-m", "ensurepip", "--default-pip"], capture_output=True, text=True)
    if done.returncode == 0:
        return "ensurepip"
    tried.append(f"ensurepip: {done.stdout}{done.stderr}")
    raise SystemExit(f"no pip for {venv}: the parent interpreter has none, and\n  "
                     + "\n  ".join(tried))


PROBE = """
import importlib, importlib.util as u, json, sys
present, imports = (json.loads(a) for a in sys.argv[1:3])
missing = [m for m in present if u.find_spec(m) is None]
cuda = None
if "torch" in present and "torch" not in missing:
    import torch
    cuda = torch.version.cuda
broken = {}
for m in imports:
    try:
        importlib.import_module(m)
    except Exception as err:
        broken[m] = f"{type(err).__name__}: {err}"[:500]
torch_file = sys.modules["torch"].__file__ if "torch" in sys.modules else None
print("GPU_CHECK_PROBE", json.dumps(dict(missing=missing, broken=broken, cuda=cuda, torch=torch_file)))
"""


def probe(python: str, present=PRESENT, imports=IMPORTS) -> dict:
    """Checks an environment: `present` found by name, `imports` imported for real (run from
    ROOT). Raises SystemExit naming what is missing or broken."""
    done = subprocess.run([python, "-c", PROBE, *(json.dumps(list(x)) for x in (present, imports))],
                          cwd=ROOT, capture_output=True, text=True)
    if "GPU_CHECK_PROBE" not in done.stdout:
        raise SystemExit(f"the install probe crashed in {python}:\n{done.stdout}{done.stderr}"[-3000:])
    found = json.loads(done.stdout.split("GPU_CHECK_PROBE", 1)[1].splitlines()[0])
    problems = [f"{m} is not importable: the interpreter the check runs on (GPU_PYTHON; the GPU "
                f"machine's python3) should have it (PRESENT in {Path(__file__).name}), and the "
                f"bundle does not carry it; here, `make gpu-check-dry` builds a stand-in that has it"
                for m in found["missing"]]
    problems += [f"import {m} failed after install: {err} (a package PACKAGES in "
                 f"{Path(__file__).name} lacks?)" for m, err in found["broken"].items()]
    if problems:
        raise SystemExit(f"environment {python} is incomplete:\n  " + "\n  ".join(problems))
    return found


PYTHON3_CONFIG = """#!{python}
# python3-config for this venv: Megatron-LM's dataset-helper Makefile asks it for the module suffix.
import sys, sysconfig
if "--extension-suffix" in sys.argv: print(sysconfig.get_config_var("EXT_SUFFIX"))
if "--includes" in sys.argv: print("-I" + sysconfig.get_paths()["include"])
"""


def install(bundle: Path = BUNDLE, venv: Path = VENV) -> dict:
    """Installs `bundle` over this interpreter into `venv` offline; raises SystemExit with what
    is wrong (an unusable bundle, another Python's wheels, a module missing afterwards)."""
    problems = verify(bundle)
    version = ".".join(map(str, sys.version_info[:2]))
    problem = None if problems else python_problem(
        json.loads((bundle / "manifest.json").read_text()), version)
    if problems or problem:
        raise SystemExit(f"gpu bundle {bundle} is not usable:\n  " + "\n  ".join(problems or [problem]))
    parent = make_venv(venv)
    pip_from = ensure_pip(venv, bundle)
    done = subprocess.run(pip_command(bundle, venv), env=offline_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"offline install from {bundle} failed:\n{done.stdout}{done.stderr}"[-4000:])
    config = venv / "bin" / "python3-config"
    config.write_text(PYTHON3_CONFIG.format(python=venv / "bin" / "python"))
    config.chmod(0o755)
    found = probe(str(venv / "bin" / "python"))
    return {"venv": str(venv), "parent": parent["python"], "parent_site": parent["site"],
            "pip": pip_from, "torch": found["torch"], "cuda": found["cuda"]}


# ----------------------------------------------------------------------------- stand-in
def make_standin(venv: Path, python: str = sys.executable) -> Path:
    """A venv like the GPU machine's (torch in the venv, not in the base interpreter), built once:
    a CPU torch, then the rest with torch pinned again, so that nothing can replace it."""
    stamp = venv / "gpu-standin.json"
    want = json.dumps([STANDIN_TORCH, *STANDIN])
    py = venv / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == want and py.exists():
        return py
    subprocess.run([python, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [STANDIN_TORCH], check=True)
    subprocess.run(pip + [*STANDIN, STANDIN_TORCH], check=True)
    cuda = subprocess.run([str(py), "-c", "import torch; print(torch.version.cuda)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    if cuda != "None":
        raise SystemExit(f"the stand-in's torch is a CUDA {cuda} build: it must be the CPU wheel")
    stamp.write_text(want)
    return py


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("download", "install", "verify", "standin"))
    p.add_argument("--dir", type=Path, default=BUNDLE)
    p.add_argument("--venv", type=Path, default=VENV)
    p.add_argument("--python-version", default=PYTHON_VERSION,
                   help="the Python the wheels are for (download); default the GPU machine's")
    a = p.parse_args(argv)
    if a.action == "download":
        download(a.dir.resolve(), a.python_version)
    elif a.action == "install":
        print(json.dumps(install(a.dir.resolve(), a.venv.resolve()), indent=1))
    elif a.action == "standin":
        print(make_standin(a.venv.resolve()))
    else:
        problems = verify(a.dir)
        check_size(carried_bytes(a.dir))
        print("\n".join(problems) or "bundle matches its manifest")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
