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


@pytest.fixture(autouse=True)
def _fresh_moe_metric_tracker():
    """megatron-core keeps MoE metrics in a module-level tracker sized by the first model that logs
    a name; a later test with more layers would index past it. Each test starts empty."""
    from megatron_nullmoe import _mcore

    _mcore.clear_moe_metrics()
    yield
