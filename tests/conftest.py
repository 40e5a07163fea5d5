"""Test set-up: megatron-core on CPU through the compatibility layer, one gloo rank in-process.

Multi-rank tests spawn real processes (see tests/_dist.py) and compare with this rank's results.
"""

import os
import warnings

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from megatron_nullmoe import parallel  # noqa: E402
from megatron_nullmoe._mcore import cpu as cpu_compat  # noqa: E402

cpu_compat.enable()


# `make test` hands whole files to 2 workers in this order (`--dist loadfile
# --no-loadscope-reorder`): the files that take longest first, so that the last file to start is a
# short one and neither worker idles long at the end. Seconds measured on 2 cores, 2 workers,
# megatron-core 0.16.1; files not listed follow in their usual order.
LONGEST_FIRST = {
    "test_train_e2e.py": 500, "test_megatron_lm_upcycle.py": 300, "test_gpu_rules.py": 260,
    "test_megatron_lm_layouts.py": 180,
    "test_megatron_lm_pretrain.py": 200, "test_init_from.py": 180, "test_export.py": 150,
    "test_export_megatron_lm.py": 100, "test_multirank.py": 80, "test_budget_schedule.py": 70,
    "test_cluster_path.py": 60, "test_export_vlm.py": 50, "test_evaluate.py": 50,
    "test_sequence_parallel.py": 45, "test_megatron_lm_recipe.py": 40, "test_router.py": 40,
    "test_model_arch.py": 30, "test_distill.py": 110, "test_hf_qwen3.py": 60,
    "test_hf_import.py": 60, "test_hf_tokenizer.py": 40, "test_hf_import_ranks.py": 40,
    "test_hf_olmoe.py": 100,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.path.name, 0))  # stable: order kept within


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA device; skips without one (run alone: pytest -m gpu tests)")


@pytest.fixture(scope="session")
def single_rank():
    """torch.distributed with one gloo rank and megatron parallel state tp=ep=pp=1."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(parallel.free_port())
        parallel.init_distributed(rank=0, world_size=1, backend="gloo")
    parallel.init_model_parallel(seed=1234)
    yield


@pytest.fixture(scope="module")
def tree():
    """A Megatron-LM release tree matching the installed megatron-core (tests/_megatron_lm_tree.py);
    skips the test where there is none or its training code's dependencies are missing."""
    from importlib.util import find_spec

    from tests._megatron_lm_tree import find_megatron_lm

    missing = [m for m in ("regex", "pydantic", "triton", "pybind11") if find_spec(m) is None]
    if missing:
        pytest.skip(f"Megatron-LM's training code needs {', '.join(missing)}: "
                    "pip install -r requirements-dev.txt")
    found, why = find_megatron_lm()
    if found is None:
        pytest.skip(why)
    return found


@pytest.fixture(autouse=True)
def _fresh_moe_metric_tracker():
    """megatron-core keeps MoE metrics in a module-level tracker sized by the first model that logs
    a name; a later test with more layers would index past it. Each test starts empty."""
    from megatron_nullmoe import _mcore

    _mcore.clear_moe_metrics()
    yield
