"""Make the project root importable (the modules live at the top level, one file per concept); shared fixtures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo group of one in this process (train.sample takes a global max over ranks), torn down after the test.
    A file store, not the environment: the subprocesses the tests start must not inherit RANK or MASTER_PORT."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def pytest_configure(config):
    """One intra-op thread in this process, as torchrun gives each worker: the in-process runs then time and behave
    the same on a busy machine as on an idle one (two threads spin against the subprocesses the tests start)."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
