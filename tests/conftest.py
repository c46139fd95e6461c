import pytest
import torch


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One intra-op thread: on a busy two-core machine two spinning OpenMP threads ran model tests
    several times slower and burned more CPU than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
