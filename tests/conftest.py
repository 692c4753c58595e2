import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")  # tests draw figures without a display
os.environ.setdefault("COURSEKIT_QUICK", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread gains nothing, and on a busy 2-core machine OpenMP threads that
    wait for each other can make short loops a hundred times slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
