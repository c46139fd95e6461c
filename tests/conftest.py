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


@pytest.fixture(autouse=True)
def own_tracking_uri():
    """``mlflow.set_tracking_uri`` writes MLFLOW_TRACKING_URI into the environment, and the jobs take
    that variable as the user's choice of store: a test must not leave its store to the next one
    (or to the subprocesses the next one starts)."""
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
