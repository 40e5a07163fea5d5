"""The prepared GPU check (launch/gpu_check/), tested here on CPU: the bundle's manifest, size
limit and offline install (a venv that sees a venv's packages, a probe that fails on a missing
module), the nvcc stand-in decision, the Transformer Engine extra for torch's CUDA, and a DRY run
of every step (GPU_CHECK_DRY=1: the real run's offline install over a stand-in of the GPU
machine's venv, then gloo, CPU, smaller sizes), asserting on what gpu_check.json records."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch" / "gpu_check"))
sys.path.insert(0, str(ROOT / "launch"))
import bundle  # noqa: E402
import setup_gpu  # noqa: E402
from megatron_lm_step import has_nvcc, iterations, nvcc_stand_in, seed_dataset_helper  # noqa: E402
from steps import Context  # noqa: E402

HERE = ".".join(map(str, sys.version_info[:2]))
STANDIN = ROOT / ".cache" / "gpu-standin"  # ignored; kept between runs (built in minutes)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_", "MASTER_", "GPU_CHECK", "GPU_BUNDLE"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_size_limit_names_the_parts():
    bundle.check_size({"checkout": 10, "bundle": 20}, limit=30)
    with pytest.raises(SystemExit, match=r"\(checkout 0.0 MiB, bundle 0.0 MiB\), over the"):
        bundle.check_size({"checkout": 10, "bundle": 21}, limit=30)


def test_manifest_verifies_and_catches_a_changed_or_missing_file(tmp_path):
    (tmp_path / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"w")
    manifest = bundle.write_manifest(tmp_path, "3.12")
    assert manifest["python"] == "3.12"
    assert manifest["bytes"] == 1 and manifest["files"][0]["sha256"] == bundle.sha256(
        tmp_path / manifest["files"][0]["name"])
    problems = bundle.verify(tmp_path)
    assert "no file for megatron-core==0.16.1" not in problems  # that one is there
    assert "no file for einops" in problems
    (tmp_path / manifest["files"][0]["name"]).write_bytes(b"x")
    assert any("differs from the manifest" in p for p in bundle.verify(tmp_path))
    assert bundle.verify(tmp_path / "none")[0].startswith("no ")


def test_a_bundle_for_another_python_is_refused_with_the_command_that_builds_one():
    assert bundle.python_problem({"python": HERE}, HERE) is None
    why = bundle.python_problem({"python": "3.12"}, "3.11")
    assert "wheels for Python 3.12" in why and "is Python 3.11" in why
    assert "make gpu-wheels GPU_PYTHON_VERSION=3.11" in why


def test_download_and_install_commands_are_offline_and_by_name(tmp_path, monkeypatch):
    down = bundle.download_command("einops", tmp_path)
    assert down[-1] == "einops" and "--no-deps" in down and "--only-binary=:all:" in down
    assert down[down.index("--python-version") + 1] == "3.12"  # the GPU machine's by default
    down = bundle.download_command("einops", tmp_path, "3.11")
    assert down[down.index("--python-version") + 1] == "3.11"
    venv = bundle.venv_command(tmp_path / "venv", "/opt/torch/.venv/bin/python3")
    assert venv[:3] == ["/opt/torch/.venv/bin/python3", "-m", "venv"]
    assert "--system-site-packages" not in venv  # it would see the base's packages, not the venv's
    pip = bundle.pip_command(tmp_path, tmp_path / "venv")
    assert pip[0] == str(tmp_path / "venv" / "bin" / "python")
    assert {"--no-index", "--no-deps", "--find-links", "--only-binary=:all:"} <= set(pip)
    assert pip[pip.index("--find-links") + 1] == str(tmp_path)
    assert f"megatron-core=={bundle.MEGATRON_CORE}" in pip and "torch" not in pip
    assert not any(p.startswith(("torch", "nvidia", "numpy")) for p in bundle.PACKAGES)
    monkeypatch.setenv("PIP_FIND_LINKS", "/somewhere/else")
    monkeypatch.setenv("PIP_INDEX_URL", "https://example.invalid/simple")
    env = bundle.offline_env()
    assert env["PIP_CONFIG_FILE"] == os.devnull and env["PIP_NO_INDEX"] == "1"
    assert "PIP_FIND_LINKS" not in env and "PIP_INDEX_URL" not in env


def _import_origin(python: Path, module: str) -> str | None:
    code = f"import importlib.util as u; s = u.find_spec({module!r}); print(s.origin if s else None)"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return None if done.stdout.strip() == "None" else done.stdout.strip()


def test_the_new_venv_sees_a_venvs_own_packages(tmp_path):
    """This test runs in the project's venv, a venv like the GPU machine's: torch is in it, not
    in the base interpreter. The check's venv must import torch from this venv."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs to run from a venv's python (the project's .venv)")
    import torch

    venv = tmp_path / "venv-gpu"
    parent = bundle.make_venv(venv)
    assert parent["site"] == __import__("site").getsitepackages()
    assert _import_origin(venv / "bin" / "python", "torch") == torch.__spec__.origin
    # made once per parent: a second call keeps it, another parent remakes it
    cfg = (venv / "pyvenv.cfg").stat().st_mtime_ns
    bundle.make_venv(venv)
    assert (venv / "pyvenv.cfg").stat().st_mtime_ns == cfg
    bundle.make_venv(venv, site_dirs=[str(tmp_path / "elsewhere")])
    assert _import_origin(venv / "bin" / "python", "torch") is None
    # the defect: --system-site-packages from a venv's python sees the base's packages only
    base_has_torch = subprocess.run([sys._base_executable, "-c", "import torch"],
                                    capture_output=True).returncode == 0
    if not base_has_torch:
        old = tmp_path / "old"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                        str(old)], check=True)
        assert _import_origin(old / "bin" / "python", "torch") is None


def test_pip_comes_from_the_bundle_where_the_machine_has_none(tmp_path):
    """A parent without pip (a uv-made venv) and maybe without ensurepip: the bundle's pip wheel
    bootstraps pip into the check's venv (here the wheel ensurepip carries stands in for it)."""
    import ensurepip

    wheels = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*.whl"))
    if not wheels:
        pytest.skip("this Python carries no pip wheel")
    venv, wheel_dir = tmp_path / "venv", tmp_path / "bundle"
    bundle.make_venv(venv, site_dirs=[str(tmp_path / "empty")])  # sees no pip
    wheel_dir.mkdir()
    shutil.copy(wheels[-1], wheel_dir)
    assert bundle.ensure_pip(venv, wheel_dir) == f"{wheels[-1].name} from the bundle"
    assert _import_origin(venv / "bin" / "python", "pip").startswith(str(venv))
    assert "pip" in bundle.PACKAGES  # so the real bundle carries one


def test_install_probe_fails_naming_a_missing_or_broken_module():
    found = bundle.probe(sys.executable, present=("json", "torch"), imports=("email.mime.text",))
    assert found["torch"].endswith("torch/__init__.py") and found["cuda"] is None
    with pytest.raises(SystemExit, match=r"no_such_module_xyz is not importable"):
        bundle.probe(sys.executable, present=("json", "no_such_module_xyz"), imports=())
    with pytest.raises(SystemExit, match=r"import no_such_pkg_xyz.sub failed after install: "
                                         r"ModuleNotFoundError"):
        bundle.probe(sys.executable, present=(), imports=("no_such_pkg_xyz.sub",))


def test_a_failed_install_fails_the_check_and_skips_the_steps_that_need_it(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check" / "check.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(
                              GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(out),
                              GPU_BUNDLE=str(tmp_path / "no-bundle"),
                              GPU_CHECK_VENV=str(tmp_path / "venv"),
                              GPU_CHECK_ONLY="install,environment,demo_data"))
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    install = report["steps"]["install"]
    assert install["status"] == "failed" and "make gpu-wheels" in install["error"]
    assert report["steps"]["environment"]["status"] == "ok"  # still says what the machine has
    assert report["steps"]["demo_data"] == {"status": "skipped", "seconds": 0.0,
                                            "why": "the install step failed (see its error)"}


def test_the_megatron_lm_step_reads_the_log_with_the_packages_parser():
    """One parser of Megatron-LM's iteration lines (megatron_lm/logs.py), which the check's
    driver loads by path: it runs where the package's megatron-core import may fail."""
    from megatron_nullmoe.megatron_lm import logs

    log = ("[2026-01-02 03:04:05] iteration        2/      10 | consumed samples: 16 | "
           "lm loss: 6.912E+00 | real_experts_per_token: 1.50 |\nnot an iteration line\n")
    want = {2: {"consumed samples": "16", "lm loss": "6.912E+00", "real_experts_per_token": "1.50"}}
    assert iterations(log) == logs.iterations(log) == want
    assert Path(iterations.__code__.co_filename) == Path(logs.__file__)


def test_nvcc_stand_in_is_decided_on_the_nvcc_file_not_the_folder(tmp_path):
    home = tmp_path / "cuda"
    assert not has_nvcc(None) and not has_nvcc(str(home))
    (home / "bin").mkdir(parents=True)  # /usr/local/cuda with runtime libraries only
    assert not has_nvcc(str(home))
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o644)
    assert not has_nvcc(str(home))  # not runnable
    ctx = Context(dry=False, out=tmp_path / "out", python=sys.executable,
                  info={"cuda_home": str(home), "cuda": "13.0"})
    made = nvcc_stand_in(ctx)
    assert made and made != str(home)
    release = subprocess.run([f"{made}/bin/nvcc", "-V"], capture_output=True, text=True).stdout
    assert "release 13.0" in release
    nvcc.chmod(0o755)
    assert has_nvcc(str(home)) and nvcc_stand_in(ctx) is None


def test_dataset_helper_is_taken_from_the_wheel_only_when_its_source_is_the_trees(tmp_path):
    """A fresh Megatron-LM tree on a machine without a compiler: the installed megatron-core
    wheel's compiled helper goes into the tree when both helpers.cpp are the same file."""
    import sysconfig
    from importlib.util import find_spec

    wheel = Path(find_spec("megatron.core.datasets").origin).parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not (wheel / f"helpers_cpp{suffix}").is_file():
        pytest.skip("this megatron-core carries no compiled dataset helper")
    ctx = Context(dry=True, out=tmp_path, python=sys.executable,
                  info={"mcore_datasets": str(wheel), "ext_suffix": suffix})
    ours = tmp_path / "tree" / "megatron" / "core" / "datasets"
    ours.mkdir(parents=True)
    (ours / "helpers.cpp").write_bytes((wheel / "helpers.cpp").read_bytes() + b"// changed\n")
    assert "differs" in seed_dataset_helper(ctx, tmp_path / "tree")
    assert not (ours / f"helpers_cpp{suffix}").exists()
    shutil.copy(wheel / "helpers.cpp", ours / "helpers.cpp")
    helper = f"helpers_cpp{suffix}"
    assert seed_dataset_helper(ctx, tmp_path / "tree") == f"copied {helper} from the megatron-core wheel"
    assert (ours / helper).read_bytes() == (wheel / helper).read_bytes()
    assert (ours / f"helpers_cpp{suffix}").stat().st_mtime >= (ours / "helpers.cpp").stat().st_mtime
    assert seed_dataset_helper(ctx, tmp_path / "tree") == "already built in the tree"


@pytest.mark.parametrize("cuda,extra", [("12.8", "core_cu12"), ("13.0", "core_cu13"),
                                        ("13.1", "core_cu13")])
def test_transformer_engine_core_matches_torchs_cuda(cuda, extra):
    from packaging.requirements import Requirement

    assert setup_gpu.te_extra(cuda) == extra
    req = Requirement(setup_gpu.requirement(extra))
    assert req.name == "transformer-engine" and req.extras == {extra, "pytorch"}
    assert req.specifier.contains("2.10.0") and not req.specifier.contains("2.12.0")
    cmd = setup_gpu.pip_command(str(req))
    assert cmd[1:5] == ["-m", "pip", "install", "--no-build-isolation"]


def test_transformer_engine_is_refused_for_a_cpu_torch_or_another_cuda():
    with pytest.raises(SystemExit, match=r"torch 2.13.0\+cpu is a CPU build \(torch.version.cuda "
                                         r"is None\).*CUDA 12 or 13"):
        setup_gpu.te_extra(None, "2.13.0+cpu")
    with pytest.raises(SystemExit, match=r"built for CUDA 11.8.*CUDA 12 and 13 only"):
        setup_gpu.te_extra("11.8")
    done = subprocess.run([sys.executable, str(ROOT / "launch" / "setup_gpu.py"), "--dry-run"],
                          capture_output=True, text=True)
    import torch

    if torch.version.cuda is None:  # this machine: refused, installing nothing
        assert done.returncode == 1 and "is a CPU build" in done.stderr
    else:
        assert done.returncode == 0 and setup_gpu.te_extra(torch.version.cuda) in done.stdout


def test_the_measured_bundle_fits_when_present():
    if not (bundle.BUNDLE / "manifest.json").is_file():
        pytest.skip("no gpu_bundle/ here (make gpu-wheels fills it)")
    assert bundle.verify(bundle.BUNDLE) == []
    sizes = bundle.carried_bytes()
    assert sum(sizes.values()) <= bundle.LIMIT, sizes


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """`GPU_CHECK_DRY=1 GPU_PYTHON=<stand-in> make gpu-check` with no package index: a stand-in of
    the GPU machine's venv (CPU torch, transformers, sentencepiece, pytest, numpy) and a bundle
    for this Python, both built once into .cache/gpu-standin (minutes), then the real offline
    install into a fresh venv and every step in it."""
    python = bundle.make_standin(STANDIN / "venv")
    wheels = STANDIN / f"bundle-{HERE}"
    bundle.download(wheels, HERE)
    out = tmp_path_factory.mktemp("gpu_check")
    venv = tmp_path_factory.mktemp("venv") / "venv-gpu"
    done = subprocess.run(["make", "gpu-check", f"GPU_PYTHON={python}", f"GPU_BUNDLE={wheels}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=_env(
                              GPU_CHECK_DRY="1", GPU_CHECK_OUT=str(out), GPU_CHECK_VENV=str(venv),
                              PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull))
    report = json.loads((out / "gpu_check.json").read_text())
    return report, done.stdout + done.stderr, out, python, venv


@pytest.mark.slow
def test_dry_check_writes_both_reports_with_every_step(dry):
    report, log, out, python, _ = dry
    assert report["dry"] is True and report["python"] == str(python)
    assert list(report["steps"]) == ["install", "environment", "demo_data", "train_gpt",
                                     "train_vlm", "megatron_lm", "layer_bench", "serve_rows",
                                     "gpu_tests"]
    assert "| train_vlm |" in (out / "gpu_check.md").read_text()
    for name, step in report["steps"].items():
        assert step["status"] in ("ok", "failed", "skipped"), name
        assert step["status"] != "failed" or step["error"], name


def _ok(report, name):
    step = report["steps"][name]
    assert step["status"] == "ok", f"{name}: {step.get('error') or step.get('why')}"
    return step


@pytest.mark.slow
def test_dry_installs_offline_over_a_venvs_python_and_the_steps_use_its_torch(dry):
    report, log, out, python, venv = dry
    install = _ok(report, "install")
    site = str(python.parent.parent / "lib")
    assert install["parent"] == str(python) and install["venv"] == str(venv)
    assert install["torch"].startswith(site)  # the stand-in venv's torch, not the base's
    env = _ok(report, "environment")
    assert env["executable"] == str(venv / "bin" / "python")
    assert env["torch_file"].startswith(site) and env["torch"].startswith("2.13.0")
    assert env["megatron_core"] == bundle.MEGATRON_CORE
    assert env["mcore_datasets"].startswith(str(venv))  # megatron-core from the bundle


@pytest.mark.parametrize("name", ["train_gpt", "train_vlm"])
@pytest.mark.slow
def test_dry_trainer_runs_with_budget_control_moving(dry, name):
    step = _ok(dry[0], name)
    assert step["steps"] == 30 and all(math.isfinite(x) for x in step["losses"])
    assert step["losses"][-1] < step["losses"][0]
    assert step["budget_bias"]["dtypes"] == ["float32"]
    assert any(v != 0 for v in step["budget_bias"]["values"].values())
    assert 0 < step["rows_dispatched"] < step["rows_standard_topk"]


@pytest.mark.slow
def test_dry_megatron_lm_pretrain(dry):
    report = dry[0]
    if report["steps"]["megatron_lm"]["status"] == "skipped":
        pytest.skip(report["steps"]["megatron_lm"]["why"])
    step = _ok(report, "megatron_lm")
    assert step["iterations"] == [1, 2, 3] and all(map(math.isfinite, step["lm_loss"]))
    assert all(0 < r < 4 for r in step["real_experts_per_token"])


@pytest.mark.slow
def test_dry_layer_bench_counts_rows_and_host_syncs(dry):
    step = _ok(dry[0], "layer_bench")
    a, b, c = (step["variants"][v] for v in "abc")
    T = step["tokens"]
    assert a["rows_dispatched_per_step"] == T * 4 and c["rows_dispatched_per_step"] == T * 8
    assert 0 < b["rows_dispatched_per_step"] < c["rows_dispatched_per_step"]
    for v in (a, b, c):
        assert v["ms_fwd_bwd"] > 0
    # megatron-core's own router + dispatcher read the device several times; ours once
    assert b["host_syncs_per_forward"]["total"] <= 1 < a["host_syncs_per_forward"]["total"]


@pytest.mark.slow
def test_dry_serve_rows_computes_only_real_picks(dry):
    step = _ok(dry[0], "serve_rows")
    for T, entry in step["batches"].items():
        assert entry["top2"]["rows_per_token"] == 2 and entry["top1"]["rows_per_token"] == 1
        # calibrated to 1 real expert per token: the plugin's rows are the real picks only
        assert 0.5 < entry["null"]["rows_per_token"] < 1.5, T
        assert all(m["ms"] > 0 for m in entry.values())


@pytest.mark.slow
def test_dry_gpu_tests_are_collected_and_skip_without_cuda(dry):
    step = dry[0]["steps"]["gpu_tests"]
    assert step["status"] == "skipped" and step["counts"]["skipped"] >= 4
    assert step["transformer_engine"].startswith("skipped")
