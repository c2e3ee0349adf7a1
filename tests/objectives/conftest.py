import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny ops: one intra-op thread avoids the thread pool's overhead on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
